"""Rows-only capture: ``vitviz.capture(m, rows="cls" | [indices])``.

The model's fused kernel computes every output; vitviz computes ``softmax(q_rows·kᵀ·s + mask)``
for the rows asked for only, so CLS and query maps never form an ``[N, N]`` tensor.

Sources of truth: the rows of a full capture (the probabilities at the same op), SDPA's
probabilities by its definition with masks and causal attention, a dispatch-level spy that
records the shape of every tensor any kernel returns, and hand-made maps.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import DispatchShapes, inputs, tiny_timm
from torch import nn

import vitviz
from vitviz.attention import sdpa_probabilities
from vitviz.errors import CaptureError, LayoutError
from vitviz.types import AttentionMaps, TokenLayout


def _square(shapes, n):
    return [s for s in shapes if len(s) >= 2 and s[-2:] == (n, n)]


def _full(model, x):
    with torch.no_grad(), vitviz.capture(model) as rec:
        model(x)
    return rec.attentions


@pytest.mark.parametrize("keep", [[-1], "all"])
def test_cls_rows_equal_the_full_capture_and_no_n_by_n_tensor_is_formed(keep):
    model = tiny_timm(depth=3)
    x = inputs(2)
    n = 1 + 4 * 4
    full = _full(model, x)
    spy = DispatchShapes()
    with torch.no_grad(), vitviz.capture(model, keep=keep, rows="cls") as rec, spy:
        out = model(x)
    assert not _square(spy.shapes, n)  # no [.., N, N] tensor on this path
    maps = rec.attentions
    assert maps.rows == (0,)
    layers = [2] if keep == [-1] else [0, 1, 2]
    assert maps.tensor.shape == (len(layers), 2, 2, 1, n)  # [L, B, H, R, N]
    # layer 0 sees the same input in both captures; later ones differ by the fused kernel's rounding
    torch.testing.assert_close(maps.tensor[:, :, :, 0], full.tensor[layers, :, :, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(vitviz.cls_maps(maps), vitviz.cls_maps(full), atol=1e-6, rtol=0)
    torch.testing.assert_close(out, model(x), atol=1e-5, rtol=0)  # the model's own output
    torch.testing.assert_close(maps.tensor.sum(-1), torch.ones(len(layers), 2, 2, 1))


def test_the_spy_sees_n_by_n_in_a_full_capture():
    """The spy of the test above can fail: the full capture forms [N, N]."""
    model = tiny_timm(depth=2)
    spy = DispatchShapes()
    with torch.no_grad(), vitviz.capture(model, keep=[-1]) as rec, spy:
        model(inputs(1))
    assert _square(spy.shapes, 17) and rec.attentions.rows is None


def test_rows_by_index_serve_query_maps_and_refuse_other_queries():
    model = tiny_timm(depth=2)
    x = inputs(2)
    full = _full(model, x)
    with torch.no_grad(), vitviz.capture(model, rows=[0, 6, -1]) as rec:  # token 6: patch (1, 1)
        model(x)
    maps = rec.attentions
    assert maps.rows == (0, 6, 16)
    for query in [(1, 1), 6, (3, 3), "cls"]:
        torch.testing.assert_close(vitviz.query_maps(maps, query), vitviz.query_maps(full, query), atol=1e-6, rtol=0)
    with pytest.raises(LayoutError, match=r"rows of tokens \[0, 6, 16\]"):
        vitviz.query_maps(maps, (0, 0))  # token 1: not captured
    with pytest.raises(LayoutError, match="every query token"):
        vitviz.rollout(maps)
    with pytest.raises(LayoutError, match="every query token"):
        vitviz.analyze.attention_entropy(maps)


class _MaskedAttention(nn.Module):
    """Self-attention through SDPA with a float mask (or a boolean one) and/or causal."""

    def __init__(self, mask=None, causal=False):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.mask, self.causal = mask, causal
        self.seen = {}

    def forward(self, x):  # [B, N, 8]
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, 4).permute(2, 0, 3, 1, 4)  # [B, 2, N, 4] each
        self.seen = dict(q=q, k=k)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, is_causal=self.causal)
        return out.transpose(1, 2).reshape(b, n, 8)


class _Tokens(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.attn = attn

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)  # [B, 4, 8]
        return self.attn(torch.cat([self.cls.expand(len(t), -1, -1), t], 1))


@pytest.mark.parametrize("kind", ["float", "bool", "causal"])  # (SDPA refuses a mask with causal)
def test_rows_follow_masks_and_causal_attention(kind):
    torch.manual_seed(0)
    n = 5
    mask = None
    if kind.startswith("bool"):
        mask = torch.rand(1, 2, n, n) > 0.4
        mask[..., 0] = True
    elif kind == "float":
        mask = torch.randn(2, 1, n, n)
    attn = _MaskedAttention(mask, causal="causal" in kind)
    model = vitviz.wrap(_Tokens(attn).eval(), grid=(2, 2), num_prefix=1)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), vitviz.capture(model, rows=[3, 1]) as rec:
        model(x)
    q, k = attn.seen["q"], attn.seen["k"]
    want = sdpa_probabilities(q, k, attn_mask=mask, is_causal="causal" in kind)[..., [3, 1], :]  # [B, H, 2, N]
    torch.testing.assert_close(rec.attentions.tensor[0], want, atol=1e-6, rtol=0)
    assert rec.attentions.rows == (3, 1)


def test_eager_models_keep_the_rows_of_their_own_probabilities():
    model = tiny_timm(depth=2)
    for block in model.blocks:
        block.attn.fused_attn = False  # the model computes its softmax itself
    x = inputs(1)
    full = _full(model, x)
    with torch.no_grad(), vitviz.capture(model, rows="cls") as rec:
        model(x)
    torch.testing.assert_close(rec.attentions.tensor, full.tensor[..., :1, :], atol=0, rtol=0)


def test_rows_errors_say_what_to_do():
    model = tiny_timm(depth=2)
    x = inputs(1)
    with pytest.raises(CaptureError, match="grad=True without rows"):
        with vitviz.capture(model, rows="cls", grad=True):
            pass
    for bad in ["first", [], [0.5], True]:
        with pytest.raises(CaptureError, match="rows must be"):
            with vitviz.capture(model, rows=bad):
                pass
    with pytest.raises(CaptureError, match="distinct token indices"):
        with torch.no_grad(), vitviz.capture(model, rows=[40]):
            model(x)
    no_cls = vitviz.wrap(tiny_timm(depth=2, class_token=False, global_pool="avg"))
    with pytest.raises(CaptureError, match="no CLS token"):
        with torch.no_grad(), vitviz.capture(no_cls, rows="cls"):
            no_cls(x)


def test_rows_only_maps_by_hand():
    layout = TokenLayout(num_prefix=1, grid=(1, 2))  # 3 tokens
    t = torch.tensor([[0.2, 0.3, 0.5], [0.1, 0.1, 0.8]]).view(1, 1, 1, 2, 3)  # rows of tokens 0 and 2
    maps = AttentionMaps(t, layout, rows=[0, 2])
    assert not maps.square and maps.keys == layout
    torch.testing.assert_close(vitviz.cls_maps(maps), torch.tensor([[[[0.3, 0.5]]]]))
    torch.testing.assert_close(vitviz.query_maps(maps, (0, 1)), torch.tensor([[[[0.1, 0.8]]]]))
    assert "rows=[0, 2]" in repr(maps) and "[L, B, H, R, N]" in repr(maps)
    assert maps.to(torch.float64).rows == (0, 2)
    with pytest.raises(LayoutError, match=r"\[L, B, H, 3, N\]"):
        AttentionMaps(t, layout, rows=[0, 1, 2])
    with pytest.raises(LayoutError, match="distinct token indices"):
        AttentionMaps(t, layout, rows=[0, 3])
    with pytest.raises(LayoutError, match="not both"):
        AttentionMaps(t, layout, key_layout=TokenLayout(0, (1, 3)), rows=[0, 2])
