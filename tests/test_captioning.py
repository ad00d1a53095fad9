"""vitviz.caption: the cross-attention of the query that predicted each word, for every kind of decoder.

Source of truth: transformers' own step-by-step attentions from
``generate(output_attentions=True, return_dict_in_generate=True)`` (beams traced with its
``beam_indices``), and, for nn.TransformerDecoder captioners, torch's own ``need_weights=True``
attention recomputed step by step. Every model is tiny and random, built from configs.
"""

import copy

import numpy as np
import pytest
import torch
import transformers
from helpers import build_blip, build_ved, hook_state
from torch import nn

import vitviz
from vitviz.analyze._rollout import rollout_matrix
from vitviz.analyze.cross import word_grids
from vitviz.errors import CaptureError, VitvizError
from vitviz.explain.captioning import Caption, caption, greedy_decode
from vitviz.types import TokenLayout

ATOL = 1e-5  # PITFALLS: teacher forcing reproduces generate's cached steps within 1e-5


# ---------------------------------------------------------------------------------------------
# tiny captioners
# ---------------------------------------------------------------------------------------------

class TinyCATR(nn.Module):
    """CATR-style: a CNN feature map (12x20 image -> 3x5 grid, not square), optionally a
    transformer encoder over it, and an nn.TransformerDecoder over word embeddings."""

    def __init__(self, dim=32, heads=4, depth=2, vocab=13, enc_layers=0):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.1, batch_first=True),
            enc_layers, enable_nested_tensor=False) if enc_layers else None
        self.embed = nn.Embedding(vocab, dim)
        self.text_pos = nn.Parameter(torch.randn(1, 32, dim))
        self.decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(dim, heads, 2 * dim, dropout=0.1, batch_first=True), depth)
        self.lm_head = nn.Linear(dim, vocab)

    def memory(self, img):
        mem = self.stem(img).flatten(2).transpose(1, 2)  # [B, 15, D] row-major over the 3x5 grid
        return self.encoder(mem) if self.encoder is not None else mem

    def words(self, ids):
        return self.embed(ids) + self.text_pos[:, :ids.shape[1]]  # [B, S, D]

    def forward(self, img, ids):
        mask = nn.Transformer.generate_square_subsequent_mask(ids.shape[1])
        return self.lm_head(self.decoder(self.words(ids), self.memory(img), tgt_mask=mask))


class CATRWithGenerate(TinyCATR):
    """A captioner with its own generate(): greedy from token 1, stops at token 2."""

    def generate(self, img, max_new_tokens=20):
        return greedy_decode(self, img, start_ids=[1], end_ids=[2], max_new_tokens=max_new_tokens)


def catr_step_reference(model: TinyCATR, img, ids, prompt_len, num):
    """Step-by-step cross-attention from torch's own MHA (need_weights=True): [L, 1, H, T, Ni].

    At step t the decoder runs on the prefix ids[:, :prompt_len + t] only (as during greedy
    decoding) and the row of its last query is kept.
    """
    mem = model.memory(img)
    steps = []
    for t in range(num):
        prefix = ids[:, :prompt_len + t]
        x = model.words(prefix)
        mask = nn.Transformer.generate_square_subsequent_mask(prefix.shape[1])
        per_layer = []
        for layer in model.decoder.layers:
            sa, _ = layer.self_attn(x, x, x, attn_mask=mask, need_weights=False)
            x1 = layer.norm1(x + sa)
            _, w = layer.multihead_attn(x1, mem, mem, need_weights=True, average_attn_weights=False)
            per_layer.append(w[0, :, -1])  # [H, Ni] of the last query
            x = layer(x, mem, tgt_mask=mask)
        steps.append(torch.stack(per_layer))  # [L, H, Ni]
    return torch.stack(steps, dim=2)[:, None]  # [L, 1, H, T, Ni]


def generate_reference(model, x, num_beams, decoder_cross=False, **kw):
    """transformers' own step-by-step cross-attention of the chosen hypothesis: [L, 1, H, T, Ni].

    A deep copy is used (output_attentions leaves transformers' hooks on the model). Step s's
    attention is ``[B*beams, H, q, Ni]``; the chosen hypothesis' token s came from the beam
    ``beam_indices[0, s]``, and its query is the last one (``q - 1``).
    """
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    steps = []
    handle = None
    if decoder_cross:  # BLIP's generate returns no cross-attentions: read its text decoder's outputs
        handle = ref.text_decoder.register_forward_hook(
            lambda _m, _a, out: steps.append(out.cross_attentions))
    with torch.no_grad():
        out = ref.generate(pixel_values=x, num_beams=num_beams, do_sample=False, output_attentions=True,
                           return_dict_in_generate=True, **kw)
    if handle is not None:
        handle.remove()
    else:
        steps = list(out.cross_attentions)
    beams = getattr(out, "beam_indices", None)
    rows = []
    for s, layers in enumerate(steps):
        b = 0 if beams is None else int(beams[0, s])
        rows.append(torch.stack([a[b, :, -1] for a in layers]))  # [L, H, Ni]
    return torch.stack(rows, dim=2)[:, None], out, beams  # [L, 1, H, S_gen, Ni]


def impls(model: nn.Module) -> list:
    return [m.config._attn_implementation for m in model.modules()
            if isinstance(getattr(m, "config", None), transformers.PretrainedConfig)]


def image_tensor(seed=1, hw=(32, 32)):
    torch.manual_seed(seed)
    return torch.randn(1, 3, *hw)  # [1, 3, H, W]


# ---------------------------------------------------------------------------------------------
# VisionEncoderDecoderModel (ViT + GPT-2)
# ---------------------------------------------------------------------------------------------

def test_ved_greedy_equals_generate_step_by_step_and_predicting_query_is_aligned():
    model = build_ved()
    x = image_tensor()
    hooks, before = hook_state(model), impls(model)
    cap = caption(model, x, max_new_tokens=7)
    assert hook_state(model) == hooks and impls(model) == before == ["sdpa"] * len(before)

    ref, out, _ = generate_reference(model, x, 1, max_new_tokens=7)
    assert torch.equal(cap.ids, out.sequences[0])
    assert cap.token_ids == out.sequences[0, 1:].tolist() and cap.prompt_len == 1
    t = cap.cross.tensor  # [L, 1, H, T, Ni]
    assert t.shape == (2, 1, 4, 7, 17)
    assert cap.cross.layout == TokenLayout(1, (4, 4))
    torch.testing.assert_close(t, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(t.sum(-1), torch.ones(2, 1, 4, 7), atol=1e-5, rtol=0)
    # off by one would show: row t is not the attention of the next step
    assert (t[..., :-1, :] - ref[..., 1:, :]).abs().max() > 1e-3

    # row t is the query that predicted token t: its logits' arg-max is token t (greedy)
    with torch.no_grad():
        logits = model(pixel_values=x, decoder_input_ids=cap.ids[None, :-1]).logits  # [1, S-1, V]
    assert logits[0].argmax(-1).tolist() == cap.token_ids
    assert isinstance(cap, Caption) and cap.encoder.tensor.shape == (2, 1, 4, 17, 17)


def test_ved_beam_search_traces_the_chosen_hypothesis():
    model = build_ved(seed=3)
    x = image_tensor(4)
    cap = caption(model, x, max_new_tokens=6, num_beams=3)
    ref, out, beams = generate_reference(model, x, 3, max_new_tokens=6)
    assert torch.equal(cap.ids, out.sequences[0])
    # a test that can fail: the chosen hypothesis did not always come from beam 0
    assert (beams[0, :6] > 0).any()
    naive = torch.stack([torch.stack([a[0, :, -1] for a in layers]) for layers in out.cross_attentions],
                        dim=2)[:, None]  # beam 0 throughout: [L, 1, H, T, Ni]
    assert (naive - ref).abs().max() > 1e-3
    torch.testing.assert_close(cap.cross.tensor, ref, atol=ATOL, rtol=0)


def test_ved_end_token_ends_the_caption_and_has_no_row():
    x = image_tensor()
    full = caption(build_ved(), x, max_new_tokens=8)
    ids = full.token_ids
    k = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])  # first new token after the start
    cap = caption(build_ved(eos=ids[k]), x, max_new_tokens=8)
    assert cap.ids.tolist() == [1] + ids[:k + 1]  # generation stopped at the end token
    assert cap.token_ids == ids[:k] and len(cap.tokens) == k
    torch.testing.assert_close(cap.cross.tensor, full.cross.tensor[..., :k, :], atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# BLIP
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("beams, seed", [(1, 7), (3, 6)])
def test_blip_equals_its_text_decoders_own_step_by_step_cross_attention(beams, seed):
    model = build_blip(seed=seed)
    x = image_tensor(6)
    hooks = hook_state(model)
    cap = caption(model, x, max_new_tokens=6, num_beams=beams)
    assert hook_state(model) == hooks
    ref, out, idx = generate_reference(model, x, beams, decoder_cross=True, max_new_tokens=6)
    assert torch.equal(cap.ids, out.sequences[0]) and cap.ids[0] == 2  # starts with [BOS]
    num = len(cap.token_ids)
    assert cap.cross.tensor.shape == (2, 1, 4, num, 17)
    assert cap.cross.tensor.std(-1).mean() > 0.02  # not uniform: the comparison can fail
    torch.testing.assert_close(cap.cross.tensor, ref[..., :num, :], atol=ATOL, rtol=0)
    assert (cap.cross.tensor[..., 1:, :] - ref[..., :num - 1, :]).abs().max() > 1e-3  # off by one
    if beams > 1:
        assert (idx[0, :num] > 0).any()  # not beam 0 throughout: the trace matters
    else:  # generation stopped at [SEP]: it ends the caption and has no row
        assert out.sequences[0, -1] == 3 and num == out.sequences.shape[1] - 2 == 2
    assert cap.cross.layout == TokenLayout(1, (4, 4))


def test_blip_with_tokenizer_shows_words():
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "on", "the", "grass", "run",
             "##ning", "##s", ".", "pizza", "girl", "slice", "of", "holding", "young", "##ly", "big"]
    tok = BertTokenizer(vocab={v: i for i, v in enumerate(vocab)})
    m = vitviz.wrap(build_blip(seed=2, vocab=len(vocab)), tokenizer=tok)
    cap = caption(m, image_tensor(2), max_new_tokens=8)
    assert cap.note is None
    assert cap.tokens == tok.convert_ids_to_tokens(cap.token_ids)
    assert cap.cross.tokens == cap.tokens
    assert cap.text == tok.decode(cap.token_ids, skip_special_tokens=True).strip()
    # the words partition the tokens, in order
    assert [w.start for w in cap.words][0] == 0 and cap.words[-1].stop == len(cap.tokens)
    assert all(a.stop == b.start for a, b in zip(cap.words, cap.words[1:]))
    assert word_grids(cap, merge="mean").shape == (len(cap.words), 4, 4)


def test_no_tokenizer_means_token_ids_and_a_note():
    cap = caption(build_blip(), image_tensor(), max_new_tokens=4)
    assert cap.tokens == [str(i) for i in cap.token_ids]
    assert cap.text == " ".join(cap.tokens)
    assert [w.text for w in cap.words] == cap.tokens
    assert "token ids" in cap.note


# ---------------------------------------------------------------------------------------------
# CATR-style nn.TransformerDecoder over a non-square CNN feature map
# ---------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _restore_mha_fastpath():
    before = torch.backends.mha.get_fastpath_enabled()
    yield
    torch.backends.mha.set_fastpath_enabled(before)


def test_catr_non_square_grid_equals_torch_step_by_step_attention():
    torch.manual_seed(7)
    model = TinyCATR().eval()
    m = vitviz.wrap(model, grid=(3, 5), num_prefix=0)
    img = torch.randn(1, 3, 12, 20)  # [1, 3, H, W] -> 3x5 feature map
    hooks, fastpath = hook_state(model), torch.backends.mha.get_fastpath_enabled()
    cap = caption(m, img, start_ids=[1], end_ids=[2], max_new_tokens=6)
    assert hook_state(model) == hooks and torch.backends.mha.get_fastpath_enabled() == fastpath
    num = len(cap.token_ids)
    assert num >= 3
    assert cap.cross.layout == TokenLayout(num_prefix=0, grid=(3, 5))
    assert cap.cross.tensor.shape == (2, 1, 4, num, 15)
    with torch.no_grad():
        ref = catr_step_reference(model, img, cap.ids[None], 1, num)
        logits = model(img, cap.ids[None, :num])  # [1, T, V]
    torch.testing.assert_close(cap.cross.tensor, ref, atol=ATOL, rtol=0)
    assert logits[0].argmax(-1).tolist() == cap.token_ids  # row t predicted token t
    assert cap.encoder is None  # a CNN encoder has no self-attention

    # non-square grid: 3 rows of 5, row-major as the feature map was flattened
    grids = word_grids(cap)  # [T, 3, 5]
    assert grids.shape == (num, 3, 5)
    torch.testing.assert_close(grids, cap.cross.tensor[-1, 0].mean(0).reshape(num, 3, 5))
    assert torch.equal(grids[:, 1, 0], cap.cross.tensor[-1, 0].mean(0)[:, 5])
    with pytest.raises(vitviz.LayoutError, match="encoder"):
        word_grids(cap, rollout=True)


def test_catr_own_generate_and_decode_function_agree_with_builtin_greedy():
    torch.manual_seed(8)
    model = CATRWithGenerate().eval()
    m = vitviz.wrap(model, grid=(3, 5), num_prefix=0)
    img = torch.randn(1, 3, 12, 20)
    own = caption(m, img, max_new_tokens=5)
    plain = TinyCATR().eval()
    plain.load_state_dict(model.state_dict())
    builtin = caption(vitviz.wrap(plain, grid=(3, 5), num_prefix=0), img, start_ids=[1], end_ids=[2],
                      max_new_tokens=5)
    fn = caption(vitviz.wrap(plain, grid=(3, 5), num_prefix=0), img, end_ids=[2], max_new_tokens=5,
                 decode=lambda mod, px, max_new_tokens: model.generate(px, max_new_tokens))
    assert own.token_ids == builtin.token_ids == fn.token_ids
    torch.testing.assert_close(own.cross.tensor, builtin.cross.tensor, atol=0, rtol=0)
    torch.testing.assert_close(fn.cross.tensor, builtin.cross.tensor, atol=0, rtol=0)


def test_catr_with_transformer_encoder_composes_with_rollout():
    torch.manual_seed(9)
    model = TinyCATR(enc_layers=2).eval()
    m = vitviz.wrap(model, grid=(3, 5), num_prefix=0)
    cap = caption(m, torch.randn(1, 3, 12, 20), start_ids=[1], max_new_tokens=4)
    assert cap.encoder.tensor.shape == (2, 1, 4, 15, 15)
    composed = word_grids(cap, rollout=True)  # [T, 3, 5]
    c = cap.cross.tensor[-1, 0].mean(0)  # [T, 15]
    expect = (c @ rollout_matrix(cap.encoder)[0]).reshape(-1, 3, 5)
    torch.testing.assert_close(composed, expect)
    # no prefix tokens: composed rows are still distributions over the 15 input patches
    torch.testing.assert_close(composed.sum((-1, -2)), torch.ones(len(cap.token_ids)))
    assert not torch.allclose(composed, word_grids(cap))


def test_prompt_len_rows_start_at_the_last_given_token():
    torch.manual_seed(10)
    model = TinyCATR().eval()
    m = vitviz.wrap(model, grid=(3, 5), num_prefix=0)
    img = torch.randn(1, 3, 12, 20)
    cap = caption(m, img, start_ids=[1, 5, 6], max_new_tokens=4)  # start token + 2 prompt tokens
    assert cap.prompt_len == 3 and cap.ids[:3].tolist() == [1, 5, 6] and len(cap.token_ids) == 4
    with torch.no_grad():
        ref = catr_step_reference(model, img, cap.ids[None], 3, 4)
    torch.testing.assert_close(cap.cross.tensor, ref, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------

def test_a_classifier_is_not_a_captioner():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                            num_classes=3)
    with pytest.raises(VitvizError, match="not a captioner"):
        caption(vit, torch.randn(1, 3, 32, 32))


def test_a_decoder_without_cross_attention_is_a_capture_error():
    class NoCross(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(5, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 5)

        def forward(self, img, ids):
            x = self.embed(ids)
            return self.head(self.attn(x, x, x)[0])

    with pytest.raises(CaptureError, match="cross-attention"):
        caption(vitviz.wrap(NoCross(), grid=(2, 2), num_prefix=0), torch.randn(1, 3, 8, 8),
                start_ids=[0], max_new_tokens=2)


def test_one_image_per_call():
    with pytest.raises(VitvizError, match="one image"):
        caption(build_ved(), torch.randn(2, 3, 32, 32))


# ---------------------------------------------------------------------------------------------
# images in, figures out
# ---------------------------------------------------------------------------------------------

def test_caption_from_an_image_keeps_the_view_and_draws_the_strip():
    import matplotlib.pyplot as plt

    m = vitviz.wrap(build_ved())
    img = (np.arange(40 * 50 * 3) % 251).astype(np.uint8).reshape(40, 50, 3)
    cap = caption(m, img, max_new_tokens=3)
    assert cap.image.shape == (32, 32, 3) and cap.image.dtype == np.uint8
    expect = caption(m, m.preprocess(img), max_new_tokens=3)
    assert expect.image is None
    torch.testing.assert_close(cap.cross.tensor, expect.cross.tensor, atol=0, rtol=0)
    figs = plt.get_fignums()
    fig, axes = cap.figure()
    assert len(axes) == 1 + len(cap.words)
    assert [a.get_title() for a in axes[1:]] == [w.text for w in cap.words]
    assert plt.get_fignums() == figs  # no pyplot figure left open
    png = cap._repr_png_()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(vitviz.ImageError, match="tensor"):
        expect.figure()


# ---------------------------------------------------------------------------------------------
# gradient-weighted relevance (Chefer et al. 2021)
# ---------------------------------------------------------------------------------------------

def hf_relevance_reference(ref, x, ids, pos, target):
    """Relevance row from transformers' own attentions: ``ref`` (a deep copy, eager) called with
    output_attentions=True, torch.autograd.grad of the word's logit w.r.t. the returned attentions."""
    from vitviz.analyze.cross import encoder_decoder_relevance

    out = ref(pixel_values=x, decoder_input_ids=ids, output_attentions=True)
    groups = [out.encoder_attentions, out.decoder_attentions, out.cross_attentions]
    flat = [a for g in groups for a in g]
    grads = torch.autograd.grad(out.logits[0, pos, target], flat, allow_unused=True)
    grads = [torch.zeros_like(a) if g is None else g for a, g in zip(flat, grads)]
    enc, text, cross = (torch.stack(g).detach() for g in groups)
    n_enc, n_text = len(groups[0]), len(groups[1])
    g_enc = torch.stack(grads[:n_enc])
    g_text = torch.stack(grads[n_enc:n_enc + n_text])
    g_cross = torch.stack(grads[n_enc + n_text:])
    return encoder_decoder_relevance(cross, g_cross, text, g_text, enc, g_enc)[0, pos]  # [Ni]


def test_ved_relevance_equals_transformers_attentions_and_the_prefix_pass():
    model = build_ved()
    x = image_tensor()
    hooks = hook_state(model)
    cap = caption(model, x, max_new_tokens=4, relevance=True)
    assert hook_state(model) == hooks
    assert all(p.grad is None for p in model.parameters())  # parameter grads untouched
    rel = cap.relevance.tensor  # [1, 1, 1, T, Ni]
    assert rel.shape == (1, 1, 1, 4, 17) and cap.relevance.layout == cap.cross.layout
    assert torch.isfinite(rel).all() and rel.min() >= 0 and rel.amax(-1).min() > 0
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    full = cap.ids[None, :-1]  # the teacher-forced input
    for t, (tok, pos) in enumerate(zip(cap.token_ids, range(4))):
        expect = hf_relevance_reference(ref, x, full, pos, tok)
        torch.testing.assert_close(rel[0, 0, 0, t], expect, atol=1e-6, rtol=1e-4)
        # what the model had while predicting token t: only the prefix up to its query
        prefix = hf_relevance_reference(ref, x, cap.ids[None, :pos + 1], pos, tok)
        torch.testing.assert_close(rel[0, 0, 0, t], prefix, atol=1e-6, rtol=1e-4)
    grids = word_grids(cap, method="relevance")
    assert grids.shape == (4, 4, 4)
    torch.testing.assert_close(grids, rel[0, 0, 0, :, 1:].reshape(4, 4, 4))
    with pytest.raises(ValueError, match="rollout"):
        word_grids(cap, method="relevance", rollout=True)


def test_catr_relevance_with_encoder_runs_through_torch_mha():
    torch.manual_seed(9)
    model = TinyCATR(enc_layers=2).eval()
    m = vitviz.wrap(model, grid=(3, 5), num_prefix=0)
    hooks = hook_state(model)
    cap = caption(m, torch.randn(1, 3, 12, 20), start_ids=[1], max_new_tokens=4, relevance=True)
    assert hook_state(model) == hooks and all(p.grad is None for p in model.parameters())
    rel = cap.relevance.tensor[0, 0, 0]  # [T, 15]
    assert rel.shape == (4, 15) and torch.isfinite(rel).all() and rel.min() >= 0
    assert rel.sum(-1).min() > 0
    assert word_grids(cap, method="relevance", merge="mean").shape == (len(cap.words), 3, 5)


def test_relevance_needs_a_graph():
    model = build_ved()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(CaptureError, match="require grad"):
        caption(model, image_tensor(), max_new_tokens=2, relevance=True)
    cap = caption(model, image_tensor(), max_new_tokens=2)
    with pytest.raises(vitviz.LayoutError, match="relevance=True"):
        word_grids(cap, method="relevance")
