"""vitviz.caption on vision-language models whose image tokens form several grids (LLaVA-NeXT:
the base image and the any-resolution tiles with image-newline tokens).

Sources of truth: the model's own ``generate`` (the generated ids), its own eager
``output_attentions`` on the teacher-forced sequence, and its own packed image features (where
each crop's projected patch feature and the newline embedding land in the sequence); grids placed
on the picture are checked against hand-computed values. Tiny random models built offline.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import vitviz
from vitviz.analyze.cross import _overlap, place_grids
from vitviz.errors import LayoutError, VitvizError
from vitviz.explain.captioning import ImageGrid, caption, vlm_family
from vitviz.explain.captioning._vlm import anyres_canvas, anyres_tiles

sys.path.insert(0, str(Path(__file__).parent))
from test_vlm import IMG, _text, eager_rows, tiny_processor  # noqa: E402

ATOL = 1e-5
PINS = [[16, 32], [32, 16], [32, 32]]


def build_llava_next(seed=0, strategy="default"):
    torch.manual_seed(seed)
    vc = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=16, patch_size=8, initializer_range=0.2)
    cfg = transformers.LlavaNextConfig(vision_config=vc, text_config=transformers.LlamaConfig(**_text()),
                                       image_token_index=IMG, image_grid_pinpoints=PINS, vision_feature_layer=-2,
                                       vision_feature_select_strategy=strategy)
    m = transformers.LlavaNextForConditionalGeneration(cfg).eval()
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m


@pytest.fixture(scope="module")
def llava_next():
    return build_llava_next()


# a 16x32 picture (a pinpoint): base 2x2 tokens, then tiles 2x4 with a newline after each row
NEXT_IDS = torch.tensor([[1, 5, 6] + [IMG] * (4 + 2 * 5) + [7, 8]])


def next_processor():
    """A LlavaNextProcessor: the word-level tokenizer of test_vlm, 16 px crops, pinpoints PINS."""
    p = tiny_processor()
    ip = transformers.LlavaNextImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                              image_grid_pinpoints=PINS)
    return transformers.LlavaNextProcessor(image_processor=ip, tokenizer=p.tokenizer, patch_size=8,
                                           vision_feature_select_strategy="default", image_token="<image>",
                                           num_additional_image_tokens=1, chat_template=p.chat_template)


def model_features(model, pv, sizes):
    """What the model puts at its image tokens (its own packing), and the per-crop projected features
    computed here from the vision tower's hidden states: ``([Ni, D], [n, g·g, D])``."""
    inner = model.model
    with torch.no_grad():
        packed = inner.get_image_features(pixel_values=pv, image_sizes=sizes).pooler_output[0]  # [Ni, D]
        hidden = inner.vision_tower(pv[0], output_hidden_states=True).hidden_states[-2][:, 1:]  # [n, g·g, Dv]
        crops = inner.multi_modal_projector(hidden)  # [n, g·g, D]
    return packed, crops


def check_layout(model, grids, pv, sizes):
    """Every grid token holds the feature of its crop's patch, every other key the newline embedding."""
    packed, crops = model_features(model, pv, sizes)
    base, tiles = grids
    g = model.config.vision_config.image_size // model.config.vision_config.patch_size
    torch.testing.assert_close(packed[base.keys()], crops[0], atol=1e-6, rtol=0)
    hb, wb = (int(v) for v in anyres_canvas(pv, sizes, model.config).shape[-2:])
    nw = wb // model.config.vision_config.image_size
    p = model.config.vision_config.patch_size
    r0, c0 = tiles.region[0] // p, tiles.region[1] // p
    gh, gw = tiles.grid
    for r in range(gh):
        for c in range(gw):
            rr, cc = r0 + r, c0 + c  # on the canvas' patch grid
            crop = 1 + (rr // g) * nw + cc // g
            key = int(tiles.keys()[r * gw + c])
            torch.testing.assert_close(packed[key], crops[crop, (rr % g) * g + cc % g], atol=1e-6, rtol=0)
    on = torch.cat([base.keys(), tiles.keys()])
    assert len(set(on.tolist())) == len(on)
    rest = sorted(set(range(packed.shape[0])) - set(on.tolist()))
    assert len(rest) == gh  # one newline per row of the tiles' grid
    for key in rest:
        torch.testing.assert_close(packed[key], model.model.image_newline, atol=0, rtol=0)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_llava_next_rows_equal_its_own_eager_attentions_and_generate(llava_next, impl):
    torch.manual_seed(3)
    px = torch.randn(1, 3, 16, 32)
    llava_next.set_attn_implementation(impl)
    try:
        cap = caption(llava_next, px, input_ids=NEXT_IDS, max_new_tokens=5)
    finally:
        llava_next.set_attn_implementation("sdpa")
    pv, sizes = anyres_tiles(px, llava_next.config)
    with torch.no_grad():
        ref_ids = llava_next.generate(input_ids=NEXT_IDS, pixel_values=pv, image_sizes=sizes, max_new_tokens=5,
                                      do_sample=False)
    assert torch.equal(cap.ids, ref_ids[0])
    P, T = NEXT_IDS.shape[1], len(cap.token_ids)
    assert T == 5 and len(set(cap.token_ids)) > 1
    ref, _ = eager_rows(llava_next, cap.ids[None, :P + T - 1], P, T, pixel_values=pv, image_sizes=sizes)
    assert cap.cross.tensor.shape == (2, 1, 4, T, 14)
    torch.testing.assert_close(cap.cross.tensor, ref, atol=ATOL, rtol=0)
    assert cap.image_grids == (ImageGrid(0, (2, 2), (0, 0, 16, 32), (8.0, 16.0)),
                               ImageGrid(4, (2, 4), (0, 0, 16, 32), (8.0, 8.0), newline=1))
    check_layout(llava_next, cap.image_grids, pv, sizes)


def test_anyres_tiles_are_the_pictures_crops_and_the_canvas_inverts_them(llava_next):
    x = torch.randn(1, 3, 32, 16)
    pv, sizes = anyres_tiles(x, llava_next.config)
    assert pv.shape == (1, 3, 3, 16, 16) and sizes.tolist() == [[32, 16]]
    torch.testing.assert_close(pv[0, 1], x[0, :, :16], atol=0, rtol=0)  # top tile, then bottom
    torch.testing.assert_close(pv[0, 2], x[0, :, 16:], atol=0, rtol=0)
    torch.testing.assert_close(anyres_canvas(pv, sizes, llava_next.config), x, atol=0, rtol=0)
    # the base image: the picture resized to one crop (a constant picture stays constant)
    pv, _ = anyres_tiles(torch.full((1, 3, 32, 16), 0.25), llava_next.config)
    torch.testing.assert_close(pv[0, 0], torch.full((3, 16, 16), 0.25), atol=1e-6, rtol=0)


def test_llava_next_word_grids_place_the_base_on_the_tiles(llava_next):
    torch.manual_seed(4)
    cap = caption(llava_next, torch.randn(1, 3, 16, 32), input_ids=NEXT_IDS, max_new_tokens=4)
    a = cap.cross.tensor[-1, 0].mean(0)  # [T, 14]: last layer, heads averaged
    base = a[:, :4].reshape(-1, 2, 2)
    tiles = torch.cat([a[:, 4:8], a[:, 9:13]], dim=-1).reshape(-1, 2, 4)  # keys 8 and 13: newlines
    # reference written out: a base cell (8x16 px) covers two tile cells (8x8 px): half to each
    ref = tiles + base.repeat_interleave(2, dim=-1) / 2
    torch.testing.assert_close(vitviz.word_grids(cap), ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(vitviz.word_grids(cap, grid=0), base, atol=0, rtol=0)
    torch.testing.assert_close(vitviz.word_grids(cap, grid=1), tiles, atol=0, rtol=0)
    # the total is kept: everything on the image tokens but the newlines
    total = a.sum(-1) - a[:, 8] - a[:, 13]
    torch.testing.assert_close(vitviz.word_grids(cap).sum((-1, -2)), total, atol=1e-6, rtol=0)
    assert vitviz.word_grids(cap, layer=None, head_fusion=None).shape == (2, 4, 4, 2, 4)
    with pytest.raises(LayoutError, match="grid 2 is out of range for 2 image grids"):
        vitviz.word_grids(cap, grid=2)


def test_place_grids_golden():
    grids = (ImageGrid(0, (2, 2), (0, 0, 16, 32), (8.0, 16.0)),
             ImageGrid(4, (2, 4), (0, 0, 16, 32), (8.0, 8.0), newline=1))
    a = torch.tensor([4.0, 0, 0, 0] + [1.0, 0, 0, 0, 9, 0, 0, 0, 0, 9])  # keys 8 and 13: newlines
    expected = torch.tensor([[3.0, 2, 0, 0], [0, 0, 0, 0]])
    torch.testing.assert_close(place_grids(a, grids), expected, atol=0, rtol=0)
    # overlap by area when the cells do not nest: 2 coarse cells of 6 px over 3 fine cells of 4 px
    m = _overlap((0, 12, 3), (0, 12, 2))
    torch.testing.assert_close(m, torch.tensor([[4 / 6, 0], [2 / 6, 2 / 6], [0, 4 / 6]]), atol=1e-7, rtol=0)
    uneven = (ImageGrid(0, (1, 2), (0, 0, 4, 12), (4.0, 6.0)), ImageGrid(2, (1, 3), (0, 0, 4, 12), (4.0, 4.0)))
    got = place_grids(torch.tensor([6.0, 3.0, 0, 0, 0]), uneven)
    torch.testing.assert_close(got, torch.tensor([[4.0, 3.0, 2.0]]), atol=1e-6, rtol=0)
    assert ImageGrid(4, (2, 4), (0, 0, 16, 32), (8.0, 8.0), newline=1).keys().tolist() == [4, 5, 6, 7, 9, 10, 11, 12]


@pytest.mark.parametrize("size, grids", [
    ((20, 36), (ImageGrid(0, (2, 2), (8, 0, 24, 32), (8.0, 16.0)),
                ImageGrid(4, (2, 4), (8, 0, 24, 32), (8.0, 8.0), newline=1))),
    ((36, 20), (ImageGrid(0, (2, 2), (0, 8, 32, 24), (16.0, 8.0)),
                ImageGrid(4, (4, 2), (0, 8, 32, 24), (8.0, 8.0), newline=1))),
])
def test_llava_next_with_a_processor_unpads_the_tiles(size, grids):
    """A 20x36 picture: the 32x32 canvas, padded above and below; the tiles' grid keeps its middle
    two patch rows (8 to 24 px), the base image covers the same part of the canvas. A 36x20
    picture: the same with columns."""
    model = build_llava_next(seed=1)
    proc = next_processor()
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (*size, 3), dtype=np.uint8))
    cap = caption(model, img, prompt="Describe", processor=proc, max_new_tokens=4)
    expected = proc(images=img, text="USER: <image> Describe ASSISTANT:", return_tensors="pt")
    P = expected["input_ids"].shape[1]
    assert torch.equal(cap.ids[:P], expected["input_ids"][0])
    with torch.no_grad():
        ref_ids = model.generate(**expected, max_new_tokens=4, do_sample=False)
    assert torch.equal(cap.ids, ref_ids[0])
    assert cap.image_grids == grids
    pv, sizes = expected["pixel_values"], expected["image_sizes"]
    check_layout(model, cap.image_grids, pv, sizes)
    T = len(cap.token_ids)
    ref, _ = eager_rows(model, cap.ids[None, :P + T - 1], P, T, pixel_values=pv, image_sizes=sizes)
    torch.testing.assert_close(cap.cross.tensor, ref, atol=ATOL, rtol=0)
    assert cap.image.shape == (32, 32, 3)  # the canvas the tiles were cut from
    fig, axes = cap.figure()
    assert len(axes) >= 1 + len(cap.words)
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_llava_next_encoder_is_the_vision_towers_own_attention_per_crop(llava_next):
    torch.manual_seed(5)
    px = torch.randn(1, 3, 16, 32)
    cap = caption(llava_next, px, input_ids=NEXT_IDS, max_new_tokens=2)
    pv, _ = anyres_tiles(px, llava_next.config)
    vision = llava_next.model.vision_tower
    vision.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            ref = torch.stack(vision(pv[0], output_attentions=True).attentions)  # [L, 3, H, 5, 5]
    finally:
        vision.set_attn_implementation("sdpa")
    assert cap.encoder is not None and cap.encoder.tensor.shape == ref.shape
    torch.testing.assert_close(cap.encoder.tensor, ref, atol=ATOL, rtol=0)


def test_llava_next_bad_inputs_are_one_line_errors(llava_next):
    with pytest.raises(VitvizError, match=r"image_grid_pinpoints \[\(16, 32\), \(32, 16\), \(32, 32\)\]; "
                                          "got 16x16") as e:
        caption(llava_next, torch.randn(1, 3, 16, 16), input_ids=NEXT_IDS)
    assert "\n" not in str(e.value)
    with pytest.raises(VitvizError, match=r"has 13 image tokens .* gives 14 \(2x2 \+ 2x4 \+ 2 newline tokens\)"):
        caption(llava_next, torch.randn(1, 3, 16, 32), input_ids=[1] + [IMG] * 13 + [7])
    with pytest.raises(VitvizError, match="vision_feature_select_strategy='default' only"):
        caption(build_llava_next(strategy="full"), torch.randn(1, 3, 16, 32), input_ids=NEXT_IDS)
    assert vlm_family(llava_next) == "llava-next"


# ---------------------------------------------------------------------------------------------
# Idefics3 / SmolVLM: sub-images and the global image, each pixel-shuffled
# ---------------------------------------------------------------------------------------------

SPLIT = {"Idefics3": (transformers.Idefics3ForConditionalGeneration, transformers.Idefics3Config),
         "SmolVLM": (transformers.SmolVLMForConditionalGeneration, transformers.SmolVLMConfig)}


def build_idefics3(family="Idefics3", seed=0):
    torch.manual_seed(seed)
    cls, ccls = SPLIT[family]
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8, initializer_range=0.2)
    cfg = ccls(vision_config=vc, text_config=dict(model_type="llama", **_text()), image_token_id=IMG, scale_factor=2)
    m = cls(cfg).eval()
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m


# a 32x64 picture: two 32 px sub-images and the global image, each 4x4 patches shuffled into 2x2 tokens
SPLIT_IDS = torch.tensor([[1, 5, 6] + [IMG] * 12 + [7, 8]])


def shuffled_features(model, pv):
    """The projected tokens of every sub-image, by a pixel shuffle written out here: token (R, C)
    holds its 2x2 block of patches, row offset major, then column offset, then channels."""
    inner = model.model
    f = model.config.scale_factor
    with torch.no_grad():
        hidden = inner.vision_model(pixel_values=pv[0]).last_hidden_state  # [n, g·g, D]
        n, gg, d = hidden.shape
        g = int(gg ** 0.5)
        k = g // f
        blocks = hidden.reshape(n, k, f, k, f, d).permute(0, 1, 3, 2, 4, 5).reshape(n, k * k, f * f * d)
        return inner.connector.modality_projection(blocks)  # [n, k·k, D_lm]


@pytest.mark.parametrize("family", sorted(SPLIT))
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_idefics3_rows_equal_its_own_eager_attentions_and_generate(family, impl):
    model = build_idefics3(family)
    torch.manual_seed(6)
    px = torch.randn(1, 3, 32, 64)
    model.set_attn_implementation(impl)
    try:
        cap = caption(model, px, input_ids=SPLIT_IDS, max_new_tokens=5)
    finally:
        model.set_attn_implementation("sdpa")
    pv = torch.cat([px[..., :32], px[..., 32:],
                    torch.nn.functional.interpolate(px, size=(32, 32), mode="bilinear", antialias=True)])[None]
    with torch.no_grad():
        ref_ids = model.generate(input_ids=SPLIT_IDS, pixel_values=pv, max_new_tokens=5, do_sample=False)
    assert torch.equal(cap.ids, ref_ids[0])
    P, T = SPLIT_IDS.shape[1], len(cap.token_ids)
    assert T == 5 and len(set(cap.token_ids)) > 1
    ref, _ = eager_rows(model, cap.ids[None, :P + T - 1], P, T, pixel_values=pv)
    assert cap.cross.tensor.shape == (2, 1, 4, T, 12)
    torch.testing.assert_close(cap.cross.tensor, ref, atol=ATOL, rtol=0)
    assert cap.image_grids == (ImageGrid(0, (2, 2), (0, 0, 32, 32), (16.0, 16.0)),
                               ImageGrid(4, (2, 2), (0, 32, 32, 64), (16.0, 16.0)),
                               ImageGrid(8, (2, 2), (0, 0, 32, 64), (16.0, 32.0)))
    # where the model puts each sub-image's shuffled tokens: the grids' keys, in order
    with torch.no_grad():
        packed = model.model.get_image_features(pixel_values=pv).pooler_output[0]  # [12, D]
    mine = shuffled_features(model, pv)  # [3, 4, D]
    for i, grid in enumerate(cap.image_grids):
        torch.testing.assert_close(packed[grid.keys()], mine[i], atol=1e-6, rtol=0)


def test_idefics3_word_grids_put_the_sub_images_side_by_side_and_spread_the_global_one():
    model = build_idefics3()
    torch.manual_seed(7)
    cap = caption(model, torch.randn(1, 3, 32, 64), input_ids=SPLIT_IDS, max_new_tokens=3)
    a = cap.cross.tensor[-1, 0].mean(0)  # [T, 12]
    left, right, glob = (a[:, 4 * i:4 * i + 4].reshape(-1, 2, 2) for i in range(3))
    # reference written out: sub-images side by side on 16 px cells; a global cell (16x32 px) covers two
    ref = torch.cat([left, right], dim=-1) + glob.repeat_interleave(2, dim=-1) / 2
    torch.testing.assert_close(vitviz.word_grids(cap), ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(vitviz.word_grids(cap, grid=-1), glob, atol=0, rtol=0)
    torch.testing.assert_close(vitviz.word_grids(cap).sum((-1, -2)), a.sum(-1), atol=1e-6, rtol=0)


def test_idefics3_one_sub_image_is_the_global_image_alone():
    model = build_idefics3(seed=2)
    torch.manual_seed(8)
    px = torch.randn(1, 3, 32, 32)
    ids = torch.tensor([[1, 5] + [IMG] * 4 + [7]])
    cap = caption(model, px, input_ids=ids, max_new_tokens=3)
    with torch.no_grad():
        ref_ids = model.generate(input_ids=ids, pixel_values=px[None], max_new_tokens=3, do_sample=False)
    assert torch.equal(cap.ids, ref_ids[0])
    assert cap.image_grids == (ImageGrid(0, (2, 2), (0, 0, 32, 32), (16.0, 16.0)),)
    assert cap.cross.layout == vitviz.TokenLayout(0, (2, 2))
    P, T = ids.shape[1], len(cap.token_ids)
    ref, _ = eager_rows(model, cap.ids[None, :P + T - 1], P, T, pixel_values=px[None])
    torch.testing.assert_close(cap.cross.tensor, ref, atol=ATOL, rtol=0)


def test_idefics3_bad_inputs_are_one_line_errors():
    model = build_idefics3()
    with pytest.raises(VitvizError, match="multiples of the vision tower's image_size 32; got 32x48") as e:
        caption(model, torch.randn(1, 3, 32, 48), input_ids=SPLIT_IDS)
    assert "\n" not in str(e.value)
    with pytest.raises(VitvizError, match=r"has 12 image tokens .* gives 20 \(2x2 \+ 2x2 \+ 2x2 \+ 2x2 \+ 2x2"):
        caption(model, torch.randn(1, 3, 64, 64), input_ids=SPLIT_IDS)


# ---------------------------------------------------------------------------------------------
# InstructBLIP: BLIP-2's read-back, with the instruction given to the Q-Former too
# ---------------------------------------------------------------------------------------------

def build_instructblip(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.InstructBlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, initializer_range=0.2),
        qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            encoder_hidden_size=32, initializer_range=0.2, vocab_size=50),
        text_config=dict(model_type="opt", hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=96, word_embed_proj_dim=32, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         init_std=0.2),
        num_query_tokens=4, image_token_index=IMG, initializer_range=0.2)
    m = transformers.InstructBlipForConditionalGeneration(cfg).eval()
    m.generation_config.eos_token_id = None
    return m


def test_instructblip_rows_over_the_queries_and_their_read_back_to_patches():
    m = build_instructblip(seed=0)
    ids = torch.tensor([[IMG] * 4 + [1, 5, 6]])
    qids = torch.tensor([[3, 7, 11, 4]])  # the instruction in the Q-Former's own vocabulary
    torch.manual_seed(9)
    px = torch.randn(1, 3, 32, 32)
    cap = caption(m, px, input_ids=ids, qformer_input_ids=qids, max_new_tokens=4)
    with torch.no_grad():
        ref_ids = m.generate(pixel_values=px, input_ids=ids, qformer_input_ids=qids, max_new_tokens=4,
                             do_sample=False)
        other = m.generate(pixel_values=px, input_ids=ids, qformer_input_ids=qids[:, :1], max_new_tokens=4,
                           do_sample=False)
    assert torch.equal(cap.ids, ref_ids[0]) and len(set(cap.token_ids)) > 1
    assert not torch.equal(other, ref_ids)  # the instruction matters: it must reach the Q-Former
    P, T = ids.shape[1], len(cap.token_ids)
    inp = cap.ids[None, :P + T - 1]
    m.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = m(pixel_values=px, input_ids=inp, qformer_input_ids=qids, output_attentions=True)
            image = m.vision_model(px).last_hidden_state  # [1, 17, D]
            qout = m.qformer(input_ids=qids, query_embeds=m.query_tokens, encoder_hidden_states=image,
                             output_attentions=True)
    finally:
        m.set_attn_implementation("sdpa")
    lm = torch.stack(out.language_model_outputs.attentions)  # [L, 1, H, S, S]
    torch.testing.assert_close(cap.cross.tensor, lm[:, :, :, P - 1:P - 1 + T, :4], atol=ATOL, rtol=0)
    qf = torch.stack([a for a in qout.cross_attentions if a is not None])  # [Lq, 1, H, Q, 17]
    assert cap.qformer.tensor.shape == (1, 1, 4, 4, 17)
    torch.testing.assert_close(cap.qformer.tensor, qf, atol=ATOL, rtol=0)
    c = cap.cross.tensor[-1, 0].mean(0)  # [T, Q]
    r = qf[:, 0].mean(dim=(0, 1))  # [Q, 17]: the documented read-back rule
    torch.testing.assert_close(vitviz.word_grids(cap), (c @ r)[:, 1:].reshape(T, 4, 4))


def test_instructblip_needs_the_instruction_for_its_qformer():
    with pytest.raises(VitvizError, match="pass qformer_input_ids= with input_ids=") as e:
        caption(build_instructblip(), torch.randn(1, 3, 32, 32), input_ids=[IMG] * 4 + [1, 5])
    assert "\n" not in str(e.value)


def split_processor():
    """An Idefics3Processor: a word-level tokenizer with the image marker tokens, 32 px sub-images of a
    picture at most 64 px long, 4 tokens per sub-image."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "<unk>", "Describe", "<fake_token_around_image>", "<global-img>",
             "<end_of_utterance>"] + [f"<row_{r}_col_{c}>" for r in (1, 2) for c in (1, 2)]
    words += [f"w{i}" for i in range(len(words), IMG)] + ["<image>"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
                              "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"})
    tok.add_special_tokens({"additional_special_tokens": [w for w in words[4:] if w.startswith("<")]})
    ip = transformers.Idefics3ImageProcessor(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    return transformers.Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4)


def test_idefics3_with_a_processor_splits_as_the_processor_does():
    model = build_idefics3(seed=3)
    proc = split_processor()
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (30, 60, 3), dtype=np.uint8))
    cap = caption(model, img, prompt="Describe", processor=proc, max_new_tokens=4)
    expected = proc(images=[img], text="<image>\nDescribe", return_tensors="pt")
    P = expected["input_ids"].shape[1]
    assert torch.equal(cap.ids[:P], expected["input_ids"][0])
    with torch.no_grad():
        ref_ids = model.generate(**expected, max_new_tokens=4, do_sample=False)
    assert torch.equal(cap.ids, ref_ids[0])
    # resized to 32x64: two sub-images side by side, then the global image
    assert cap.image_grids == (ImageGrid(0, (2, 2), (0, 0, 32, 32), (16.0, 16.0)),
                               ImageGrid(4, (2, 2), (0, 32, 32, 64), (16.0, 16.0)),
                               ImageGrid(8, (2, 2), (0, 0, 32, 64), (16.0, 32.0)))
    T = len(cap.token_ids)
    inputs = {k: v for k, v in expected.items() if k not in ("input_ids", "attention_mask")}
    ref, _ = eager_rows(model, cap.ids[None, :P + T - 1], P, T, **inputs)
    torch.testing.assert_close(cap.cross.tensor, ref, atol=ATOL, rtol=0)
    assert cap.image.shape == (32, 64, 3)  # the sub-images side by side
    fig, axes = cap.figure()
    assert len(axes) >= 1 + len(cap.words)
    import matplotlib.pyplot as plt

    plt.close(fig)
    # the vision tower's own attention, per crop (the sub-images, then the global image)
    vision = model.model.vision_model
    vision.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            own = torch.stack(vision(pixel_values=expected["pixel_values"][0], output_attentions=True).attentions)
    finally:
        vision.set_attn_implementation("sdpa")
    assert cap.encoder is not None and cap.encoder.tensor.shape == own.shape == (2, 3, 4, 16, 16)
    torch.testing.assert_close(cap.encoder.tensor, own, atol=ATOL, rtol=0)
    with torch.no_grad():
        packed = model.model.get_image_features(pixel_values=expected["pixel_values"]).pooler_output[0]
    mine = shuffled_features(model, expected["pixel_values"])
    for i, grid in enumerate(cap.image_grids):
        torch.testing.assert_close(packed[grid.keys()], mine[i], atol=1e-6, rtol=0)


def test_llava_next_relevance_is_placed_like_the_attention(llava_next):
    torch.manual_seed(10)
    cap = caption(llava_next, torch.randn(1, 3, 16, 32), input_ids=NEXT_IDS, max_new_tokens=3, relevance=True)
    rel = cap.relevance.tensor[0, 0, 0]  # [T, 14]
    assert rel.shape == (3, 14) and (rel >= 0).all()
    placed = vitviz.word_grids(cap, method="relevance")
    torch.testing.assert_close(placed, place_grids(rel, cap.image_grids), atol=0, rtol=0)
    assert placed.shape == (3, 2, 4)


def test_llava_next_beam_search_equals_generate(llava_next):
    torch.manual_seed(11)
    px = torch.randn(1, 3, 32, 16)
    ids = torch.tensor([[1, 5] + [IMG] * (4 + 4 * 3) + [7]])  # 32x16: tiles 4x2, a newline after each row
    cap = caption(llava_next, px, input_ids=ids, max_new_tokens=4, num_beams=3)
    pv, sizes = anyres_tiles(px, llava_next.config)
    with torch.no_grad():
        ref = llava_next.generate(input_ids=ids, pixel_values=pv, image_sizes=sizes, max_new_tokens=4, num_beams=3,
                                  do_sample=False)
    assert torch.equal(cap.ids, ref[0])
    P, T = ids.shape[1], len(cap.token_ids)
    own, _ = eager_rows(llava_next, cap.ids[None, :P + T - 1], P, T, pixel_values=pv, image_sizes=sizes)
    torch.testing.assert_close(cap.cross.tensor, own, atol=ATOL, rtol=0)
    assert cap.image_grids[1] == ImageGrid(4, (4, 2), (0, 0, 32, 16), (8.0, 8.0), newline=1)
