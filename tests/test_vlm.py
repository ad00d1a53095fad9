"""vitviz.caption on decoder-only vision-language models (LLaVA-1.5, PaliGemma, Qwen2-VL).

Sources of truth: the model's own ``generate`` (the generated ids) and its own eager
``output_attentions`` on the teacher-forced sequence, sliced at the rows of the positions that
chose the tokens and at the image-token keys; the vision tower's own ``output_attentions``;
Qwen2-VL's own image processor (the flattened patches). Every model is tiny and random, built
from configs offline.
"""

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import vitviz
from vitviz.errors import VitvizError
from vitviz.explain.captioning import ImageGrid, caption, vlm_family
from vitviz.explain.captioning._vlm import _block_order, qwen_image, qwen_patches
from vitviz.explain.captioning._vlm_rows import RowsReader

ATOL = 1e-5
IMG = 95  # the image placeholder id of every tiny model here
VOCAB = 96


def _text(**kw):
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=1024, initializer_range=0.2)
    base.update(kw)
    return base


def build_llava(seed=0, strategy="default", image_size=32, patch=8):
    torch.manual_seed(seed)
    vc = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=image_size, patch_size=patch,
                                       initializer_range=0.2)
    cfg = transformers.LlavaConfig(vision_config=vc, text_config=transformers.LlamaConfig(**_text()),
                                   image_token_index=IMG, vision_feature_select_strategy=strategy,
                                   vision_feature_layer=-2, image_seq_length=(image_size // patch) ** 2)
    m = transformers.LlavaForConditionalGeneration(cfg).eval()
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m


def build_paligemma(seed=0):
    torch.manual_seed(seed)
    vc = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, image_size=32, patch_size=8)
    # untied output embeddings: with tied ones a random Gemma repeats its last input token
    tc = dict(model_type="gemma", tie_word_embeddings=False, **_text(num_key_value_heads=1, head_dim=8))
    cfg = transformers.PaliGemmaConfig(vision_config=vc, text_config=tc, image_token_index=IMG, projection_dim=32,
                                       tie_word_embeddings=False)
    m = transformers.PaliGemmaForConditionalGeneration(cfg).eval()
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m


def build_qwen2vl(seed=0):
    torch.manual_seed(seed)
    vc = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, patch_size=4, spatial_merge_size=2,
              temporal_patch_size=2, mlp_ratio=2)
    tc = _text(rope_parameters=dict(rope_type="default", mrope_section=[1, 1, 2], rope_theta=10000.0))
    cfg = transformers.Qwen2VLConfig(vision_config=vc, text_config=tc, image_token_id=IMG, vision_start_token_id=93,
                                     vision_end_token_id=94, video_token_id=92, bos_token_id=1, eos_token_id=2,
                                     pad_token_id=0)
    m = transformers.Qwen2VLForConditionalGeneration(cfg).eval()
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m


def eager_rows(model, inp, P, T, **inputs):
    """The model's own eager attentions on the teacher-forced sequence: [L, 1, H, T, Ni]."""
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids=inp, output_attentions=True, **inputs)
    finally:
        model.set_attn_implementation("sdpa")
    att = torch.stack(out.attentions)  # [L, 1, H, S, S]
    cols = (inp[0] == IMG).nonzero()[:, 0]
    return att[:, :, :, P - 1:P - 1 + T][..., cols], att


LLAVA_IDS = torch.tensor([[1, 5, 6] + [IMG] * 16 + [7, 8]])


@pytest.fixture(scope="module")
def llava():
    return build_llava()


# ---------------------------------------------------------------------------------------------
# LLaVA-1.5
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_llava_rows_equal_its_own_eager_attentions_and_generate(llava, impl):
    torch.manual_seed(1)
    px = torch.randn(1, 3, 32, 32)
    llava.set_attn_implementation(impl)
    try:
        cap = caption(llava, px, input_ids=LLAVA_IDS, max_new_tokens=6)
    finally:
        llava.set_attn_implementation("sdpa")
    with torch.no_grad():
        ref_ids = llava.generate(input_ids=LLAVA_IDS, pixel_values=px, max_new_tokens=6, do_sample=False)
    assert torch.equal(cap.ids, ref_ids[0])
    P, T = LLAVA_IDS.shape[1], len(cap.token_ids)
    assert cap.prompt_len == P and T == 6 and cap.token_ids == ref_ids[0, P:].tolist()
    assert len(set(cap.token_ids)) > 1  # random weights that do not repeat one token
    ref, full = eager_rows(llava, cap.ids[None, :P + T - 1], P, T, pixel_values=px)
    assert cap.cross.tensor.shape == (2, 1, 4, T, 16)
    torch.testing.assert_close(cap.cross.tensor, ref, atol=ATOL, rtol=0)
    # raw weights, not renormalised: each row sums to less than 1, the rest is on text tokens
    sums = cap.cross.tensor.sum(-1)
    assert (sums < 1 - 1e-3).all() and (sums > 0).all()
    text = full[:, :, :, P - 1:P - 1 + T].sum(-1) - sums  # [L, 1, H, T]
    torch.testing.assert_close(sums + text, torch.ones_like(sums), atol=ATOL, rtol=0)
    assert cap.cross.layout == vitviz.TokenLayout(0, (4, 4))
    assert cap.image_grids == (ImageGrid(0, (4, 4), (0, 0, 32, 32), (8, 8), 0),)
    assert vitviz.word_grids(cap).shape == (T, 4, 4)
    with pytest.raises(vitviz.errors.LayoutError, match="not composed"):
        vitviz.word_grids(cap, rollout=True)


def test_llava_encoder_is_the_vision_towers_own_attention(llava):
    torch.manual_seed(2)
    px = torch.randn(1, 3, 32, 32)
    cap = caption(llava, px, input_ids=LLAVA_IDS, max_new_tokens=3)
    vision = llava.model.vision_tower
    vision.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            ref = torch.stack(vision(px, output_attentions=True).attentions)  # [L, 1, H, 17, 17]
    finally:
        vision.set_attn_implementation("sdpa")
    assert cap.encoder.layout == vitviz.TokenLayout(1, (4, 4))
    torch.testing.assert_close(cap.encoder.tensor, ref, atol=ATOL, rtol=0)
    assert caption(llava, px, input_ids=LLAVA_IDS, max_new_tokens=3, keep_encoder=False).encoder is None


def test_llava_beam_search_equals_generate(llava):
    torch.manual_seed(3)
    px = torch.randn(1, 3, 32, 32)
    cap = caption(llava, px, input_ids=LLAVA_IDS, max_new_tokens=5, num_beams=3)
    with torch.no_grad():
        ref_ids = llava.generate(input_ids=LLAVA_IDS, pixel_values=px, max_new_tokens=5, num_beams=3, do_sample=False)
    assert torch.equal(cap.ids, ref_ids[0])
    P, T = LLAVA_IDS.shape[1], len(cap.token_ids)
    ref, _ = eager_rows(llava, cap.ids[None, :P + T - 1], P, T, pixel_values=px)
    torch.testing.assert_close(cap.cross.tensor, ref, atol=ATOL, rtol=0)


def test_llava_full_strategy_keeps_the_cls_token_first():
    m = build_llava(strategy="full")
    ids = torch.tensor([[1, 5] + [IMG] * 17 + [7]])
    px = torch.randn(1, 3, 32, 32)
    cap = caption(m, px, input_ids=ids, max_new_tokens=3)
    assert cap.cross.layout == vitviz.TokenLayout(1, (4, 4)) and cap.cross.tensor.shape[-1] == 17
    P, T = ids.shape[1], len(cap.token_ids)
    ref, _ = eager_rows(m, cap.ids[None, :P + T - 1], P, T, pixel_values=px)
    torch.testing.assert_close(cap.cross.tensor, ref, atol=ATOL, rtol=0)
    grids = vitviz.word_grids(cap)  # [T, 4, 4]: the CLS column dropped
    torch.testing.assert_close(grids, cap.cross.tensor[-1, 0].mean(0)[:, 1:].reshape(T, 4, 4))


def test_llava_end_token_ends_the_caption_and_has_no_row(llava):
    torch.manual_seed(4)
    px = torch.randn(1, 3, 32, 32)
    free = caption(llava, px, input_ids=LLAVA_IDS, max_new_tokens=6)
    cut = caption(llava, px, input_ids=LLAVA_IDS, max_new_tokens=6, end_ids=[free.token_ids[2]])
    assert cut.token_ids == free.token_ids[:2]
    torch.testing.assert_close(cut.cross.tensor, free.cross.tensor[..., :2, :], atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# the rows reader: golden values
# ---------------------------------------------------------------------------------------------

class _Attn(torch.nn.Module):
    def forward(self, q, k, v, causal):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)


def test_rows_reader_causal_rows_by_hand():
    # q = 0: every allowed key gets the same logit, so causal row i is 1/(i+1) on keys 0..i
    layer = _Attn()
    q, k, v = torch.zeros(1, 1, 4, 2), torch.randn(1, 1, 4, 2), torch.randn(1, 1, 4, 2)
    reader = RowsReader([layer], rows=torch.tensor([1, 3]), cols=torch.tensor([0, 2]))
    reader.attach()
    try:
        with reader:
            out = layer(q, k, v, True)
    finally:
        reader.detach()
    assert not layer._forward_hooks and not layer._forward_pre_hooks
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    expected = torch.tensor([[0.5, 0.0], [0.25, 0.25]])  # row 1: keys 0,1 of which col 0; row 3: keys 0..3
    torch.testing.assert_close(reader.result()[0, 0, 0], expected)
    # not causal: 1/4 everywhere
    reader = RowsReader([layer], rows=torch.tensor([0]), cols=torch.tensor([1, 3]))
    reader.attach()
    try:
        with reader:
            layer(q, k, v, False)
    finally:
        reader.detach()
    torch.testing.assert_close(reader.result()[0, 0, 0], torch.tensor([[0.25, 0.25]]))


def test_rows_reader_refuses_a_layer_it_did_not_see():
    reader = RowsReader([_Attn(), _Attn()], rows=torch.tensor([0]), cols=torch.tensor([0]))
    with pytest.raises(vitviz.errors.CaptureError, match="2 of 2 language-model attention layers"):
        reader.result()


# ---------------------------------------------------------------------------------------------
# PaliGemma (prefix-LM) and Qwen2-VL (2x2 merged patches)
# ---------------------------------------------------------------------------------------------

def test_paligemma_prefix_lm_rows_equal_its_own_eager_attentions():
    m = build_paligemma(seed=1)
    ids = torch.tensor([[IMG] * 16 + [1, 5, 6, 7]])
    torch.manual_seed(5)
    px = torch.randn(1, 3, 32, 32)
    cap = caption(m, px, input_ids=ids, max_new_tokens=5)
    with torch.no_grad():
        ref_ids = m.generate(input_ids=ids, pixel_values=px, token_type_ids=torch.zeros_like(ids), max_new_tokens=5,
                             do_sample=False)
    assert torch.equal(cap.ids, ref_ids[0]) and len(set(cap.token_ids)) > 1
    P, T = ids.shape[1], len(cap.token_ids)
    tt = torch.cat([torch.zeros(1, P, dtype=torch.long), torch.ones(1, T - 1, dtype=torch.long)], dim=1)
    ref, full = eager_rows(m, cap.ids[None, :P + T - 1], P, T, pixel_values=px, token_type_ids=tt)
    torch.testing.assert_close(cap.cross.tensor, ref, atol=ATOL, rtol=0)
    assert (full[:, 0, :, 0, P - 1] > 0).all()  # the prefix is bidirectional: image token 0 sees the prompt's end
    assert cap.cross.layout == vitviz.TokenLayout(0, (4, 4))
    assert cap.encoder.layout == vitviz.TokenLayout(0, (4, 4))


def test_qwen2vl_patches_equal_its_image_processor_and_invert():
    m = build_qwen2vl()
    ip = transformers.Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2, do_resize=False)
    rgb = np.random.default_rng(0).integers(0, 256, (24, 16, 3), dtype=np.uint8)
    ref = ip(images=rgb, return_tensors="pt")
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    mean, std = torch.tensor(ip.image_mean).view(1, 3, 1, 1), torch.tensor(ip.image_std).view(1, 3, 1, 1)
    patches, thw = qwen_patches((x - mean) / std, m.config.vision_config)
    assert thw.tolist() == ref["image_grid_thw"].tolist() == [[1, 6, 4]]
    torch.testing.assert_close(patches, ref["pixel_values"], atol=1e-5, rtol=0)
    torch.testing.assert_close(qwen_image(patches, thw, m.config.vision_config), (x - mean) / std)
    # merge-block order -> row-major, by hand for a 4x4 grid of 2x2 blocks
    assert _block_order(4, 4, 2).tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]


def test_qwen2vl_merged_grid_rows_equal_its_own_eager_attentions():
    m = build_qwen2vl(seed=2)
    ids = torch.tensor([[1, 93] + [IMG] * 6 + [94, 5, 6]])  # 24x16 px, patch 4, 2x2 merge: 3x2 tokens
    torch.manual_seed(6)
    px = torch.randn(1, 3, 24, 16)
    cap = caption(m, px, input_ids=ids, max_new_tokens=5)
    patches, thw = qwen_patches(px, m.config.vision_config)
    inputs = dict(pixel_values=patches, image_grid_thw=thw)
    with torch.no_grad():
        ref_ids = m.generate(input_ids=ids, mm_token_type_ids=(ids == IMG).int(), max_new_tokens=5, do_sample=False,
                             **inputs)
    assert torch.equal(cap.ids, ref_ids[0]) and len(set(cap.token_ids)) > 1
    P, T = ids.shape[1], len(cap.token_ids)
    inp = cap.ids[None, :P + T - 1]
    ref, _ = eager_rows(m, inp, P, T, mm_token_type_ids=(inp == IMG).int(), **inputs)
    torch.testing.assert_close(cap.cross.tensor, ref, atol=ATOL, rtol=0)
    assert cap.cross.layout == vitviz.TokenLayout(0, (3, 2))
    assert cap.image_grids == (ImageGrid(0, (3, 2), (0, 0, 24, 16), (8, 8), 0),)
    # the vision tower on its 6x4 patch grid, row-major (its own order is by 2x2 blocks)
    # (its attention modules return no weights: the eager function's are recorded)
    from transformers.models.qwen2_vl import modeling_qwen2_vl as mq

    vision, seen, eager = m.model.visual, [], mq.eager_attention_forward

    def recording(module, *args, **kwargs):
        out = eager(module, *args, **kwargs)
        if isinstance(module, mq.VisionAttention):
            seen.append(out[1])
        return out

    vision.set_attn_implementation("eager")
    mq.eager_attention_forward = recording
    try:
        with torch.no_grad():
            m(input_ids=inp, mm_token_type_ids=(inp == IMG).int(), **inputs)
    finally:
        mq.eager_attention_forward = eager
        vision.set_attn_implementation("sdpa")
    order = _block_order(6, 4, 2)
    ref_enc = torch.stack([a.reshape(1, 4, 24, 24) for a in seen])[..., order, :][..., order]
    assert cap.encoder.layout == vitviz.TokenLayout(0, (6, 4))
    torch.testing.assert_close(cap.encoder.tensor, ref_enc, atol=ATOL, rtol=0)


def test_qwen25vl_rows_equal_its_own_eager_attentions_and_its_windowed_tower_is_noted():
    torch.manual_seed(3)
    vc = dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=4, patch_size=4,
              spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1])
    tc = _text(rope_parameters=dict(rope_type="default", mrope_section=[1, 1, 2], rope_theta=10000.0))
    cfg = transformers.Qwen2_5_VLConfig(vision_config=vc, text_config=tc, image_token_id=IMG, vision_start_token_id=93,
                                        vision_end_token_id=94, video_token_id=92, bos_token_id=1, eos_token_id=2,
                                        pad_token_id=0)
    m = transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    m.generation_config.eos_token_id = None
    ids = torch.tensor([[1, 93] + [IMG] * 16 + [94, 5, 6]])  # 32x32 px: 8x8 patches, 4x4 merged tokens
    px = torch.randn(1, 3, 32, 32)
    cap = caption(m, px, input_ids=ids, max_new_tokens=4)
    P, T = ids.shape[1], len(cap.token_ids)
    inp = cap.ids[None, :P + T - 1]
    patches, thw = qwen_patches(px, m.config.vision_config)
    ref, _ = eager_rows(m, inp, P, T, pixel_values=patches, image_grid_thw=thw, mm_token_type_ids=(inp == IMG).int())
    torch.testing.assert_close(cap.cross.tensor, ref, atol=ATOL, rtol=0)
    assert cap.cross.layout == vitviz.TokenLayout(0, (4, 4))
    assert cap.encoder is None and "window" in cap.note


def build_blip2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.Blip2Config(
        vision_config=_tiny_vision(num_hidden_layers=2, initializer_range=0.2),
        qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            encoder_hidden_size=32, initializer_range=0.2),
        text_config=dict(model_type="opt", hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=VOCAB, word_embed_proj_dim=32, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         init_std=0.2),
        num_query_tokens=4, image_token_index=IMG, initializer_range=0.2)
    m = transformers.Blip2ForConditionalGeneration(cfg).eval()
    m.generation_config.eos_token_id = None
    return m


def test_blip2_rows_over_the_queries_and_their_read_back_to_patches():
    m = build_blip2(seed=1)
    ids = torch.tensor([[IMG] * 4 + [1, 5, 6]])
    torch.manual_seed(8)
    px = torch.randn(1, 3, 32, 32)
    cap = caption(m, px, input_ids=ids, max_new_tokens=4)
    with torch.no_grad():
        ref_ids = m.generate(pixel_values=px, input_ids=ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(cap.ids, ref_ids[0]) and len(set(cap.token_ids)) > 1
    P, T = ids.shape[1], len(cap.token_ids)
    inp = cap.ids[None, :P + T - 1]
    m.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = m(pixel_values=px, input_ids=inp, output_attentions=True)
            image = m.vision_model(px).last_hidden_state  # [1, 17, D]
            qout = m.qformer(query_embeds=m.query_tokens, encoder_hidden_states=image, output_attentions=True)
    finally:
        m.set_attn_implementation("sdpa")
    lm = torch.stack(out.language_model_outputs.attentions)  # [L, 1, H, S, S]
    torch.testing.assert_close(cap.cross.tensor, lm[:, :, :, P - 1:P - 1 + T, :4], atol=ATOL, rtol=0)
    qf = torch.stack([a for a in qout.cross_attentions if a is not None])  # [Lq, 1, H, Q, 17]
    assert cap.qformer.tensor.shape == (1, 1, 4, 4, 17) and cap.qformer.layout == vitviz.TokenLayout(1, (4, 4))
    torch.testing.assert_close(cap.qformer.tensor, qf, atol=ATOL, rtol=0)
    # the read-back rule, by hand: mean over the Q-Former's layers and heads, then c @ R, CLS dropped
    c = cap.cross.tensor[-1, 0].mean(0)  # [T, Q]
    r = qf[:, 0].mean(dim=(0, 1))  # [Q, 17]
    torch.testing.assert_close(vitviz.word_grids(cap), (c @ r)[:, 1:].reshape(T, 4, 4))
    # the attention on the image is kept: summed over every vision token, each word's map is its row's sum
    from vitviz.analyze.cross import query_readback

    torch.testing.assert_close((c @ query_readback(cap.qformer)).sum(-1), c.sum(-1))
    assert cap.encoder.layout == vitviz.TokenLayout(1, (4, 4))


def test_query_readback_golden():
    # 2 queries over CLS + 2 patches; two layers whose mean is [[0, 1, 0], [0, 0.5, 0.5]]
    a = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]], [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])  # [2, Q, N]
    from vitviz.analyze.cross import query_readback
    from vitviz.types import CrossAttentionMaps

    qf = CrossAttentionMaps(a[:, None, None], vitviz.TokenLayout(1, (1, 2)))  # [2, 1, 1, 2, 3]
    torch.testing.assert_close(query_readback(qf), torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.5, 0.5]]))
    cross = CrossAttentionMaps(torch.tensor([0.2, 0.4])[None, None, None, None], vitviz.TokenLayout(0, (1, 2)))

    class Cap:  # word 0 spent 0.2 on query 0 and 0.4 on query 1
        pass

    cap = Cap()
    cap.cross, cap.qformer = cross, qf
    torch.testing.assert_close(vitviz.word_grids(cap), torch.tensor([[[0.2 + 0.2, 0.2]]]))


# ---------------------------------------------------------------------------------------------
# bad input, refused families
# ---------------------------------------------------------------------------------------------

def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_bad_prompts_are_one_line_errors(llava):
    px = torch.randn(1, 3, 32, 32)
    with pytest.raises(VitvizError, match="no image token") as e:
        caption(llava, px, input_ids=torch.tensor([[1, 5, 6, 7]]))
    assert "image token id 95" in _one_line(e)
    with pytest.raises(VitvizError, match="placeholders for 2 images") as e:
        caption(llava, px, input_ids=torch.tensor([[1] + [IMG] * 32 + [5]]))
    _one_line(e)
    with pytest.raises(VitvizError, match="has 10 image tokens") as e:
        caption(llava, px, input_ids=torch.tensor([[1] + [IMG] * 10 + [5]]))
    _one_line(e)
    with pytest.raises(VitvizError, match="no processor") as e:
        caption(llava, px)
    _one_line(e)
    with pytest.raises(VitvizError, match="one image"):
        caption(llava, torch.randn(2, 3, 32, 32), input_ids=LLAVA_IDS)


def test_a_text_only_model_has_no_image_input():
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_text())).eval()
    with pytest.raises(VitvizError, match="has no image input") as e:
        caption(lm, torch.randn(1, 3, 32, 32), input_ids=torch.tensor([[1, 2, 3]]))
    _one_line(e)


def test_prompt_is_refused_for_encoder_decoders():
    from helpers import build_ved

    with pytest.raises(VitvizError, match="decoder-only vision-language"):
        caption(build_ved(), torch.randn(1, 3, 32, 32), prompt="a photo of")


def _tiny_vision(**kw):
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                patch_size=8)
    base.update(kw)
    return base


REFUSED = {
    "BLIP-2 models with an encoder-decoder language model": lambda: transformers.Blip2ForConditionalGeneration(
        transformers.Blip2Config(
            vision_config=_tiny_vision(), qformer_config=dict(hidden_size=32, num_hidden_layers=1,
                                                              num_attention_heads=4, intermediate_size=64,
                                                              encoder_hidden_size=32),
            text_config=dict(model_type="t5", d_model=32, d_ff=64, num_layers=1, num_heads=4, d_kv=8,
                             vocab_size=VOCAB), num_query_tokens=4, image_token_index=IMG)),
    "InstructBLIP models with an encoder-decoder language model": lambda: (
        transformers.InstructBlipForConditionalGeneration(transformers.InstructBlipConfig(
            vision_config=_tiny_vision(), qformer_config=dict(hidden_size=32, num_hidden_layers=1,
                                                              num_attention_heads=4, intermediate_size=64,
                                                              encoder_hidden_size=32),
            text_config=dict(model_type="t5", d_model=32, d_ff=64, num_layers=1, num_heads=4, d_kv=8,
                             vocab_size=VOCAB), num_query_tokens=4, image_token_index=IMG))),
    "LLaVA-OneVision": lambda: transformers.LlavaOnevisionForConditionalGeneration(transformers.LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", **_tiny_vision()),
        text_config=dict(model_type="qwen2", **_text()), image_token_index=IMG)),
}


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_families_not_captured_yet_are_refused_with_their_reason(family):
    model = REFUSED[family]()
    what = family if "encoder-decoder" in family else f"{family} models"
    with pytest.raises(VitvizError, match=f"does not capture {what} yet") as e:
        caption(model, torch.randn(1, 3, 32, 32), input_ids=torch.tensor([[1, IMG, 5]]))
    msg = _one_line(e)
    assert ("Captured decoder-only families: LLaVA-1.5, LLaVA-NeXT, PaliGemma, Qwen2-VL / Qwen2.5-VL, "
            "Idefics3 / SmolVLM, BLIP-2") in msg


def test_family_table():
    assert vlm_family(build_llava()) == "llava"
    assert vlm_family(torch.nn.Linear(2, 2)) is None


# ---------------------------------------------------------------------------------------------
# with a processor: prompt, chat template, the image the model saw, the strip
# ---------------------------------------------------------------------------------------------

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "USER:", "ASSISTANT:", "Describe", "the", "image.", "a", "dog"]


def tiny_processor():
    """A LlavaProcessor: a word-level tokenizer whose <image> is id 95, a 32 px CLIP image processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = WORDS + [f"w{i}" for i in range(len(WORDS), IMG)] + ["<image>"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>",
                                               eos_token="</s>", pad_token="<pad>",
                                               extra_special_tokens={"image_token": "<image>"})
    ip = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return transformers.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8,
                                       vision_feature_select_strategy="default", image_token="<image>",
                                       num_additional_image_tokens=1,
                                       chat_template="USER: {% for m in messages %}{% for c in m['content'] %}"
                                                     "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}"
                                                     "{% endif %}{% endfor %}{% endfor %} ASSISTANT:")


def test_llava_with_a_processor_prompt_and_strip(llava):
    proc = tiny_processor()
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    cap = caption(llava, img, prompt="Describe the image.", processor=proc, max_new_tokens=4)
    expected = proc(images=img, text="USER: <image> Describe the image. ASSISTANT:", return_tensors="pt")
    P = expected["input_ids"].shape[1]
    assert torch.equal(cap.ids[:P], expected["input_ids"][0]) and cap.prompt_len == P
    with torch.no_grad():
        ref_ids = llava.generate(**expected, max_new_tokens=4, do_sample=False)
    assert torch.equal(cap.ids, ref_ids[0])
    assert cap.tokens == proc.tokenizer.convert_ids_to_tokens(cap.token_ids) and cap.note is None
    # the image the model saw: the processor's resized and cropped pixels
    assert cap.image.shape == (32, 32, 3) and cap.image.dtype == np.uint8
    mean = torch.tensor(proc.image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(proc.image_processor.image_std).view(3, 1, 1)
    seen = torch.from_numpy(cap.image).permute(2, 0, 1).float() / 255
    torch.testing.assert_close((seen - mean) / std, expected["pixel_values"][0], atol=0.5 / 255 / 0.26, rtol=0)
    fig, axes = cap.figure()
    assert len(axes) >= 1 + len(cap.words)
    import matplotlib.pyplot as plt

    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# the command line, on a tiny LLaVA saved with its processor
# ---------------------------------------------------------------------------------------------

def test_caption_command_on_a_saved_llava_with_prompt(llava, tmp_path, capsys):
    from vitviz.cli import main

    model_dir = tmp_path / "llava"
    llava.save_pretrained(model_dir)
    tiny_processor().save_pretrained(model_dir)
    img = tmp_path / "cat.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(img)
    out = tmp_path / "out"
    code = main(["caption", str(img), "--model", str(model_dir), "--prompt", "Describe the image.",
                 "--max-new-tokens", "3", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (out / "cat_caption.png").is_file()
    # the same caption as from Python with the model's processor
    vm = vitviz.load_model(str(model_dir))
    cap = caption(vm, img, prompt="Describe the image.", processor=tiny_processor(), max_new_tokens=3)
    assert cap.text and cap.text in captured.out
    # a model loaded from its folder finds its processor; a preprocessed tensor (the gallery's batches) is
    # given to the model as it is, with the processor's prompt
    x = vm.preprocess(img)
    from_tensor = caption(vm, x, max_new_tokens=3)
    ids = tiny_processor()(images=Image.open(img), text="USER: <image> Describe the image. ASSISTANT:",
                           return_tensors="pt")["input_ids"]
    assert torch.equal(from_tensor.ids, caption(llava, x, input_ids=ids, max_new_tokens=3).ids)
    assert from_tensor.image is not None
    from vitviz.explain import get_method, run_methods

    method = get_method("caption")  # the gallery's caption method
    result = run_methods(vm, x, [(method, method.options({"max_new_tokens": 3}))]).results[0]
    assert result.texts == [from_tensor.text] and result.maps[0].shape == (len(from_tensor.words), 4, 4)
    # --prompt for a captioner that takes none, and a directory without processor files: one line, status 2
    bare = tmp_path / "bare"
    llava.save_pretrained(bare)
    assert main(["caption", str(img), "--model", str(bare), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' progress bars
    assert "no processor files" in err and err.startswith("vitviz")


# ---------------------------------------------------------------------------------------------
# relevance=True: Chefer et al. 2021's self-attention rule over the language model's sequence
# ---------------------------------------------------------------------------------------------

def chefer_reference(model, inp, positions, targets, **inputs):
    """R = I; R += mean_h[(dA * A)+] @ R per layer, from the eager attentions and autograd, the full
    [S, S] matrix in the forward order; row p at the image tokens. [T, Ni]"""
    model.set_attn_implementation("eager")
    try:
        with torch.enable_grad():
            out = model(input_ids=inp, output_attentions=True, **inputs)
            attn = list(out.attentions)  # L x [1, H, S, S], in the graph
            cols = (inp[0] == IMG).nonzero()[:, 0]
            rows = []
            for p, tok in zip(positions, targets):
                grads = torch.autograd.grad(out.logits[0, p, tok], attn, retain_graph=True)
                r = torch.eye(inp.shape[1])
                for a, g in zip(attn, grads):
                    r = r + (g * a).clamp(min=0).mean(dim=1)[0] @ r
                rows.append(r[p, cols])
    finally:
        model.set_attn_implementation("sdpa")
    return torch.stack(rows)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_llava_relevance_equals_the_full_matrix_rule_with_autograd(llava, impl):
    torch.manual_seed(7)
    px = torch.randn(1, 3, 32, 32)
    llava.set_attn_implementation(impl)
    try:
        cap = caption(llava, px, input_ids=LLAVA_IDS, max_new_tokens=4, relevance=True)
    finally:
        llava.set_attn_implementation("sdpa")
    plain = caption(llava, px, input_ids=LLAVA_IDS, max_new_tokens=4)
    assert cap.token_ids == plain.token_ids  # generation unchanged
    torch.testing.assert_close(cap.cross.tensor, plain.cross.tensor, atol=ATOL, rtol=0)
    P, T = cap.prompt_len, len(cap.token_ids)
    ref = chefer_reference(llava, cap.ids[None, :P + T - 1], range(P - 1, P - 1 + T), cap.token_ids, pixel_values=px)
    assert cap.relevance.tensor.shape == (1, 1, 1, T, 16)
    torch.testing.assert_close(cap.relevance.tensor[0, 0, 0], ref, atol=1e-5, rtol=1e-4)
    assert (cap.relevance.tensor >= 0).all() and cap.relevance.tensor.sum() > 0
    assert vitviz.word_grids(cap, method="relevance").shape == (T, 4, 4)
    assert all(p.grad is None for p in llava.parameters())  # only the attention's gradients were computed


def test_paligemma_and_qwen2vl_relevance_equal_the_full_matrix_rule():
    m = build_paligemma(seed=3)
    ids = torch.tensor([[IMG] * 16 + [1, 5, 6, 7]])
    px = torch.randn(1, 3, 32, 32)
    cap = caption(m, px, input_ids=ids, max_new_tokens=3, relevance=True, keep_encoder=False)
    P, T = cap.prompt_len, len(cap.token_ids)
    tt = torch.cat([torch.zeros(1, P, dtype=torch.long), torch.ones(1, T - 1, dtype=torch.long)], dim=1)
    ref = chefer_reference(m, cap.ids[None, :P + T - 1], range(P - 1, P - 1 + T), cap.token_ids, pixel_values=px,
                           token_type_ids=tt)
    torch.testing.assert_close(cap.relevance.tensor[0, 0, 0], ref, atol=1e-5, rtol=1e-4)

    m = build_qwen2vl(seed=4)
    ids = torch.tensor([[1, 93] + [IMG] * 6 + [94, 5, 6]])
    px = torch.randn(1, 3, 24, 16)
    cap = caption(m, px, input_ids=ids, max_new_tokens=3, relevance=True)
    P, T = cap.prompt_len, len(cap.token_ids)
    inp = cap.ids[None, :P + T - 1]
    patches, thw = qwen_patches(px, m.config.vision_config)
    ref = chefer_reference(m, inp, range(P - 1, P - 1 + T), cap.token_ids, pixel_values=patches, image_grid_thw=thw,
                           mm_token_type_ids=(inp == IMG).int())
    torch.testing.assert_close(cap.relevance.tensor[0, 0, 0], ref, atol=1e-5, rtol=1e-4)
