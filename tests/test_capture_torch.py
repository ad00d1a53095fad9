"""Capture of torch.nn.MultiheadAttention: nn.TransformerEncoder/Decoder and standalone MHA.

Sources of truth: the same MHA modules called with ``need_weights=True,
average_attn_weights=False`` on the same inputs (layer by layer), and a from-weights
recomputation softmax(Q K^T / sqrt(d)) from ``in_proj_weight``. Invariants: rows sum to 1,
outputs unchanged (also against the fused fast path), the fast-path flag restored, no hook
left after a normal exit or an exception, batched equals one-by-one.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import CourseViT
from torch import nn

import vitviz
from vitviz import capture

ATOL = 1e-5


# --------------------------------------------------------------------------------------------
# models and references
# --------------------------------------------------------------------------------------------

class TinyCaptioner(nn.Module):
    """A CNN encoder (3x5 feature map for a 12x20 image) + nn.TransformerDecoder over words."""

    def __init__(self, dim=32, heads=4, depth=2, vocab=11):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerDecoderLayer(dim, heads, 2 * dim, dropout=0.1, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, depth)
        self.lm_head = nn.Linear(dim, vocab)

    def memory(self, img):
        return self.stem(img).flatten(2).transpose(1, 2)  # [B, 15, D]

    def forward(self, img, tokens):
        tgt = self.embed(tokens)  # [B, T, D]
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        return self.lm_head(self.decoder(tgt, self.memory(img), tgt_mask=mask))


def from_weights(mha: nn.MultiheadAttention, q_in, kv_in, attn_mask=None):
    """softmax(Q K^T / sqrt(d) + mask) per head from in_proj_weight; inputs [B, S, D] -> [B, H, Q, K]."""
    d_model, h = mha.embed_dim, mha.num_heads
    w_q, w_k, _ = mha.in_proj_weight.chunk(3)  # 3 x [D, D]
    b_q, b_k, _ = mha.in_proj_bias.chunk(3)
    q = (q_in @ w_q.T + b_q).unflatten(-1, (h, d_model // h)).transpose(1, 2)  # [B, H, Q, d]
    k = (kv_in @ w_k.T + b_k).unflatten(-1, (h, d_model // h)).transpose(1, 2)  # [B, H, K, d]
    logits = q @ k.transpose(-1, -2) / math.sqrt(d_model // h)  # [B, H, Q, K]
    if attn_mask is not None:
        logits = logits + attn_mask
    return logits.softmax(dim=-1)


def encoder_reference(model: CourseViT, img):
    """Per-layer attention by calling each layer's MHA with need_weights=True: [L, B, H, N, N]."""
    x = model.embed(img)
    maps, golden = [], []
    for layer in model.encoder.layers:
        h = layer.norm1(x) if layer.norm_first else x
        _, w = layer.self_attn(h, h, h, need_weights=True, average_attn_weights=False)
        maps.append(w)  # [B, H, N, N] whatever batch_first is
        hb = h if model.batch_first else h.transpose(0, 1)  # [B, N, D]
        golden.append(from_weights(layer.self_attn, hb, hb))
        x = layer(x)
    return torch.stack(maps), torch.stack(golden)


def hook_count(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


@pytest.fixture(autouse=True)
def _seed_and_fastpath():
    torch.manual_seed(0)
    before = torch.backends.mha.get_fastpath_enabled()
    yield
    torch.backends.mha.set_fastpath_enabled(before)  # never leak a flag into other tests


@pytest.fixture
def fused_counter(monkeypatch):
    """Count calls of the encoder layer's fused kernel (the real kernel still runs)."""
    calls = []
    real = torch._transformer_encoder_layer_fwd

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", spy)
    return calls


# --------------------------------------------------------------------------------------------
# encoder
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("no_grad", [True, False])
def test_encoder_matches_reference(batch_first, no_grad, fused_counter):
    model = CourseViT(batch_first=batch_first).eval()
    m = vitviz.wrap(model)
    img = torch.randn(2, 3, 24, 40)
    fast_path_expected = batch_first and no_grad
    with torch.set_grad_enabled(not no_grad):
        plain = model(img)
        # the test really exercises the fused kernel when its conditions hold
        assert bool(fused_counter) == fast_path_expected
        fused_counter.clear()
        with capture(m) as rec:
            captured = m(img)
        assert not fused_counter  # torch skips its fused kernel while the capture's mode is active
        ref, golden = encoder_reference(model, img)

    torch.testing.assert_close(captured, plain, atol=ATOL, rtol=0)  # outputs unchanged
    maps = rec.attentions
    assert maps.tensor.shape == (2, 2, 4, 16, 16)  # [L, B, H, N, N]
    assert maps.layout == vitviz.TokenLayout(num_prefix=1, grid=(3, 5))
    assert rec.cross is None and rec.text is None
    assert len(rec.passes) == 1 and len(rec.passes[0].records) == 2  # once per layer
    torch.testing.assert_close(maps.tensor, ref.detach(), atol=ATOL, rtol=0)
    torch.testing.assert_close(maps.tensor, golden.detach(), atol=ATOL, rtol=0)
    torch.testing.assert_close(maps.tensor.sum(-1), torch.ones(2, 2, 4, 16), atol=ATOL, rtol=0)
    assert not maps.tensor.requires_grad


def test_norm_first_encoder_matches_reference():
    model = CourseViT(norm_first=True).eval()
    img = torch.randn(1, 3, 24, 40)
    with torch.no_grad():
        plain = model(img)
        with capture(model) as rec:
            captured = model(img)
        ref, golden = encoder_reference(model, img)
    torch.testing.assert_close(captured, plain, atol=ATOL, rtol=0)
    torch.testing.assert_close(rec.attentions.tensor, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(rec.attentions.tensor, golden, atol=ATOL, rtol=0)


def sites_of(model):
    """The sites capture hooks (no forward pass needed)."""
    with capture(model) as rec:
        return rec.sites


def test_sites_and_roles():
    enc_sites = sites_of(CourseViT())
    assert [(s.name, s.role, s.adapter.name) for s in enc_sites] == [
        ("encoder.layers.0.self_attn", "image", "torch_mha"),
        ("encoder.layers.1.self_attn", "image", "torch_mha")]
    dec_roles = [(s.name, s.role) for s in sites_of(vitviz.wrap(TinyCaptioner(depth=1), grid=(3, 5), num_prefix=0))]
    assert dec_roles == [("decoder.layers.0.self_attn", "text"),
                         ("decoder.layers.0.multihead_attn", "cross")]


@pytest.mark.parametrize("before", [True, False])
def test_fastpath_flag_untouched_and_attention_still_read(before, fused_counter):
    torch.backends.mha.set_fastpath_enabled(before)
    model = CourseViT().eval()
    with torch.no_grad(), capture(model) as rec:
        assert torch.backends.mha.get_fastpath_enabled() is before  # no process-wide switch
        model(torch.randn(1, 3, 24, 40))
    assert not fused_counter and rec.attentions.tensor.shape[0] == 2
    assert torch.backends.mha.get_fastpath_enabled() is before


def test_hooks_removed_and_flag_restored_after_exception():
    torch.backends.mha.set_fastpath_enabled(True)
    model = TinyCaptioner().eval()
    n_hooks = hook_count(model)
    with pytest.raises(RuntimeError, match="boom"):
        with capture(vitviz.wrap(model, grid=(3, 5), num_prefix=0)):
            assert hook_count(model) > n_hooks
            model(torch.randn(1, 3, 12, 20), torch.tensor([[1, 2]]))
            raise RuntimeError("boom")
    assert hook_count(model) == n_hooks
    assert torch.backends.mha.get_fastpath_enabled() is True


def test_hooks_removed_after_normal_exit():
    model = CourseViT().eval()
    n_hooks = hook_count(model)
    with torch.no_grad(), capture(model):
        model(torch.randn(1, 3, 24, 40))
    assert hook_count(model) == n_hooks == 0


def test_batched_equals_one_by_one():
    model = CourseViT().eval()
    img = torch.randn(3, 3, 24, 40)
    with torch.no_grad():
        with capture(model) as rec:
            model(img)
        batched = rec.attentions.tensor  # [L, 3, H, N, N]
        for i in range(3):
            with capture(model) as rec_i:
                model(img[i:i + 1])
            torch.testing.assert_close(batched[:, i:i + 1], rec_i.attentions.tensor,
                                       atol=ATOL, rtol=0)


# --------------------------------------------------------------------------------------------
# decoder: text self-attention and cross-attention over a non-square grid
# --------------------------------------------------------------------------------------------

def decoder_reference(model: TinyCaptioner, img, tokens):
    """(text [L, B, H, T, T], cross [L, B, H, T, 15], cross from weights) by re-running each layer."""
    x, mem = model.embed(tokens), model.memory(img)
    mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
    text, cross, golden = [], [], []
    for layer in model.decoder.layers:
        assert not layer.norm_first
        sa, w_self = layer.self_attn(x, x, x, attn_mask=mask, need_weights=True,
                                     average_attn_weights=False)
        x1 = layer.norm1(x + layer.dropout1(sa))
        _, w_cross = layer.multihead_attn(x1, mem, mem, need_weights=True,
                                          average_attn_weights=False)
        text.append(w_self)
        cross.append(w_cross)
        golden.append(from_weights(layer.multihead_attn, x1, mem))
        x = layer(x, mem, tgt_mask=mask)
    return torch.stack(text), torch.stack(cross), torch.stack(golden)


def test_decoder_cross_attention_non_square_grid():
    model = TinyCaptioner().eval()
    m = vitviz.wrap(model, grid=(3, 5), num_prefix=0)
    img, tokens = torch.randn(2, 3, 12, 20), torch.tensor([[1, 4, 2, 7], [3, 3, 9, 0]])
    with torch.no_grad():
        plain = model(img, tokens)
        with capture(m) as rec:
            captured = m(img, tokens)
        text, cross, golden = decoder_reference(model, img, tokens)

    torch.testing.assert_close(captured, plain, atol=ATOL, rtol=0)
    assert rec.attentions is None  # no image self-attention in this model
    assert rec.cross.tensor.shape == (2, 2, 4, 4, 15)  # [L, B, H, T, Ni]
    assert rec.cross.layout == vitviz.TokenLayout(num_prefix=0, grid=(3, 5))
    torch.testing.assert_close(rec.cross.tensor, cross, atol=ATOL, rtol=0)
    torch.testing.assert_close(rec.cross.tensor, golden, atol=ATOL, rtol=0)
    torch.testing.assert_close(rec.text, text, atol=ATOL, rtol=0)
    # causal text self-attention: nothing above the diagonal, rows sum to 1
    upper = torch.triu(torch.ones(4, 4, dtype=torch.bool), diagonal=1)
    assert rec.text[..., upper].abs().max() == 0
    torch.testing.assert_close(rec.text.sum(-1), torch.ones(2, 2, 4, 4), atol=ATOL, rtol=0)


# --------------------------------------------------------------------------------------------
# standalone MultiheadAttention: role per call, and the caller gets what it asked for
# --------------------------------------------------------------------------------------------

def test_standalone_mha_role_per_call_and_unchanged_returns():
    mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    m = vitviz.wrap(mha, grid=(2, 3), num_prefix=1)
    x, text = torch.randn(2, 7, 16), torch.randn(2, 4, 16)
    with torch.no_grad():
        out_avg, w_avg = mha(x, x, x)  # default: averaged heads
        out_none, w_none = mha(x, x, x, None, False)  # positional need_weights=False
        _, w_heads = mha(text, x, x, average_attn_weights=False)

        with capture(m) as rec:
            c_avg, cw_avg = mha(x, x, x)
        assert rec.attentions.tensor.shape == (1, 2, 2, 7, 7) and rec.cross is None
        torch.testing.assert_close(rec.attentions.tensor[0], from_weights(mha, x, x),
                                   atol=ATOL, rtol=0)
        with capture(m) as rec2:
            c_none, cw_none = mha(x, x, x, None, False)
        assert rec2.attentions.tensor.shape == (1, 2, 2, 7, 7)
        with capture(m) as rec3:
            _, cw_heads = mha(text, x, x, average_attn_weights=False)
        assert rec3.attentions is None
        assert rec3.cross.tensor.shape == (1, 2, 2, 4, 7)  # query is not key: cross-attention

    torch.testing.assert_close(c_avg, out_avg, atol=ATOL, rtol=0)
    torch.testing.assert_close(cw_avg, w_avg, atol=ATOL, rtol=0)  # still averaged [B, Q, K]
    torch.testing.assert_close(c_none, out_none, atol=ATOL, rtol=0)
    assert w_none is None and cw_none is None
    torch.testing.assert_close(cw_heads, w_heads, atol=ATOL, rtol=0)
    torch.testing.assert_close(rec3.cross.tensor[0], w_heads, atol=ATOL, rtol=0)


def test_standalone_mha_batch_first_false_and_unbatched():
    mha = nn.MultiheadAttention(16, 4).eval()  # [S, B, D] inputs
    m = vitviz.wrap(mha, grid=(1, 5), num_prefix=0)
    x = torch.randn(5, 3, 16)
    with torch.no_grad():
        with capture(m) as rec:
            mha(x, x, x, need_weights=False)
        xb = x.transpose(0, 1)  # [B, S, D]
        torch.testing.assert_close(rec.attentions.tensor[0], from_weights(mha, xb, xb),
                                   atol=ATOL, rtol=0)
        # unbatched [S, D]: weights [H, S, S] get a batch dim; the caller still gets [S, S]
        x0 = x[:, 0]  # [S, D]; one object, so that `query is key` tells self-attention
        plain = mha(x0, x0, x0)
        with capture(m) as rec1:
            out = mha(x0, x0, x0)
    assert rec1.attentions.tensor.shape == (1, 1, 4, 5, 5)
    torch.testing.assert_close(rec1.attentions.tensor[0], rec.attentions.tensor[0, :1],
                               atol=ATOL, rtol=0)
    assert out[1].shape == (5, 5)
    torch.testing.assert_close(out[0], plain[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1], plain[1], atol=ATOL, rtol=0)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_padded_batch_skips_nested_tensor_fast_path():
    # With a key padding mask in eval/no-grad, nn.TransformerEncoder turns the batch into a
    # nested tensor before any layer (hooks do not stop this); capture must switch it off.
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2).eval()  # enable_nested_tensor=True by default
    assert enc.use_nested_tensor
    m = vitviz.wrap(enc, grid=(2, 3), num_prefix=1)
    x = torch.randn(2, 7, 32)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True  # sample 1: two padding tokens at the end
    with torch.no_grad():
        plain = enc(x, src_key_padding_mask=pad)  # nested path: zeros at padded positions
        with capture(m) as rec:
            captured = enc(x, src_key_padding_mask=pad)
        ref, h = [], x
        for lay in enc.layers:
            ref.append(lay.self_attn(h, h, h, key_padding_mask=pad, need_weights=True,
                                     average_attn_weights=False)[1])
            h = lay(h, src_key_padding_mask=pad)
    attn = rec.attentions.tensor  # [L, B, H, N, N]
    torch.testing.assert_close(attn, torch.stack(ref), atol=ATOL, rtol=0)
    assert attn[:, 1, :, :, 5:].abs().max() == 0  # padded keys get no attention
    torch.testing.assert_close(captured[~pad], plain[~pad], atol=ATOL, rtol=0)


def test_layers_not_kept_run_as_the_caller_asked():
    import inspect

    from torch.overrides import TorchFunctionMode

    names = list(inspect.signature(F.multi_head_attention_forward).parameters)

    class Spy(TorchFunctionMode):  # an outer mode sees the calls the capture passes on
        asked: list = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.multi_head_attention_forward:
                self.asked.append(dict(zip(names, args), **kwargs).get("need_weights", True))
            return func(*args, **kwargs)

    model = CourseViT().eval()
    img = torch.randn(1, 3, 24, 40)
    with torch.no_grad(), Spy(), capture(model) as full:
        model(img)
    assert Spy.asked == [True, True]  # weights asked for at every layer
    Spy.asked.clear()
    with torch.no_grad(), Spy(), capture(model, keep=[-1]) as last:
        out = model(img)
    # the encoder layer calls its attention with need_weights=False: layer 0 ran that way
    assert Spy.asked == [False, True]
    torch.testing.assert_close(last.attentions.tensor[0], full.attentions.tensor[-1], atol=ATOL, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(out, model(img), atol=ATOL, rtol=0)
