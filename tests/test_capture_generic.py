"""Capture of hand-written attention: pytorch_pretrained_vit, nn.Softmax modules, (out, attn) returns,
all read at the op (a softmax whose result multiplies the values), whatever the modules are named.

Sources of truth: pytorch_pretrained_vit's own ``attn.scores``, and a from-weights
recomputation softmax(Q K^T / sqrt(d)) from each block's input, caught by the test's own
hooks. Invariants: one record per layer (no double capture), rows sum to 1, outputs unchanged,
no hook left after a normal exit or an exception, batched equals one-by-one.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitviz
from vitviz import capture

ATOL = 1e-5


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def hook_count(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def block_inputs(modules):
    """Context: record the first positional input of each module in ``modules``; yields the list."""
    class _Catch:
        def __enter__(self):
            self.seen = [None] * len(modules)
            self.handles = [mod.register_forward_pre_hook(self._pre(i))
                            for i, mod in enumerate(modules)]
            return self.seen

        def _pre(self, i):
            def pre(_mod, args):
                self.seen[i] = args[0]
            return pre

        def __exit__(self, *exc):
            for h in self.handles:
                h.remove()

    return _Catch()


def heads_softmax(x, w_q, b_q, w_k, b_k, heads):
    """softmax(Q K^T / sqrt(d)) per head: x [B, N, D] -> [B, H, N, N]."""
    q = F.linear(x, w_q, b_q).unflatten(-1, (heads, -1)).transpose(1, 2)  # [B, H, N, d]
    k = F.linear(x, w_k, b_k).unflatten(-1, (heads, -1)).transpose(1, 2)  # [B, H, N, d]
    return (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(dim=-1)  # [B, H, N, N]


# --------------------------------------------------------------------------------------------
# pytorch_pretrained_vit
# --------------------------------------------------------------------------------------------

@pytest.fixture
def ppv_vit(monkeypatch):
    """pytorch_pretrained_vit's ViT built by the library with small arguments (random weights)."""
    import pytorch_pretrained_vit as ppv  # dev dependency
    import pytorch_pretrained_vit.model as ppv_model

    # ViT(name=None, ...) reads an undefined global `resize_positional_embedding` in 0.0.7
    monkeypatch.setattr(ppv_model, "resize_positional_embedding", False, raising=False)
    model = ppv.ViT(None, patches=8, dim=32, ff_dim=64, num_heads=4, num_layers=2,
                    image_size=(24, 40), num_classes=7).eval()
    with torch.no_grad():  # the library zero-initialises fc and class_token: give them values
        nn.init.normal_(model.fc.weight)
        nn.init.normal_(model.class_token)
    return model


def test_pytorch_pretrained_vit_matches_scores_and_weights(ppv_vit):
    m = vitviz.wrap(ppv_vit)
    assert m.layout == vitviz.TokenLayout(num_prefix=1, grid=(3, 5))
    assert m.patch_size == (8, 8)
    img = torch.randn(2, 3, 24, 40)
    blocks = list(ppv_vit.transformer.blocks)
    with torch.no_grad():
        plain = ppv_vit(img)
        with block_inputs(blocks) as xs, capture(m) as rec:
            captured = m(img)
        scores = torch.stack([b.attn.scores for b in blocks])  # [L, B, H, N, N]
        golden = torch.stack([
            heads_softmax(b.norm1(x), b.attn.proj_q.weight, b.attn.proj_q.bias,
                          b.attn.proj_k.weight, b.attn.proj_k.bias, b.attn.n_heads)
            for b, x in zip(blocks, xs)])
    assert [(s.name, s.adapter) for s in rec.sites] == [  # no adapter: found at the op
        ("transformer.blocks.0.attn", None), ("transformer.blocks.1.attn", None)]
    attn = rec.attentions
    assert attn.tensor.shape == (2, 2, 4, 16, 16)  # [L, B, H, N, N]
    assert attn.layout == vitviz.TokenLayout(num_prefix=1, grid=(3, 5))
    assert len(rec.passes[0].records) == 2  # once per layer
    assert plain.abs().max() > 0  # the head is not zero: the next line can fail
    torch.testing.assert_close(captured, plain, atol=ATOL, rtol=0)
    torch.testing.assert_close(attn.tensor, scores, atol=0, rtol=0)
    torch.testing.assert_close(attn.tensor, golden, atol=ATOL, rtol=0)
    torch.testing.assert_close(attn.tensor.sum(-1), torch.ones(2, 2, 4, 16), atol=ATOL, rtol=0)


def test_pytorch_pretrained_vit_hooks_removed_after_exception(ppv_vit):
    n_hooks = hook_count(ppv_vit)
    with pytest.raises(ValueError, match="inside"):
        with capture(ppv_vit):
            ppv_vit(torch.randn(1, 3, 24, 40))
            assert hook_count(ppv_vit) > n_hooks
            raise ValueError("inside the block")
    assert hook_count(ppv_vit) == n_hooks == 0


# --------------------------------------------------------------------------------------------
# hand-written ViTs
# --------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """lucidrains vit-pytorch style: pre-norm, to_qkv, ``self.attend = nn.Softmax(dim=-1)``.

    With ``return_attn`` it also returns the attention (a tuple-returning module that contains
    an nn.Softmax: it must be captured once, not twice).
    """

    def __init__(self, dim, heads, dim_head, return_attn=False):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale, self.return_attn = heads, dim_head ** -0.5, return_attn
        self.norm = nn.LayerNorm(dim)
        self.attend = nn.Softmax(dim=-1)
        self.dropout = nn.Dropout(0.1)
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x):
        x = self.norm(x)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, H, N, d]
                   for t in self.to_qkv(x).chunk(3, dim=-1))
        attn = self.dropout(self.attend(q @ k.transpose(-1, -2) * self.scale))  # [B, H, N, N]
        out = self.to_out((attn @ v).transpose(1, 2).flatten(2))  # [B, N, D]
        return (out, attn) if self.return_attn else out

    def reference(self, x):
        """From weights, at this module's input: [B, H, N, N]."""
        w_q, w_k, _ = self.to_qkv.weight.chunk(3)
        return heads_softmax(self.norm(x), w_q, None, w_k, None, self.heads)


class LucidViT(nn.Module):
    def __init__(self, dim=32, heads=4, depth=2, patch=8, grid=(3, 5), return_attn=False):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, 1 + grid[0] * grid[1], dim))
        self.layers = nn.ModuleList([
            nn.ModuleList([Attention(dim, heads, dim // heads, return_attn),
                           nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(),
                                         nn.Linear(2 * dim, dim))])
            for _ in range(depth)])
        self.head = nn.Linear(dim, 5)

    def forward(self, img):
        x = self.patch_embed(img).flatten(2).transpose(1, 2)  # [B, N-1, D]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embedding
        for attn, ff in self.layers:
            a = attn(x)
            x = x + (a[0] if isinstance(a, tuple) else a)
            x = x + ff(x)
        return self.head(x[:, 0])


class MultiHeadSelfAttention(nn.Module):
    """A course ViT's attention: F.softmax (no module to hook), returns (out, attn)."""

    def __init__(self, dim, heads, single_head_3d=False):
        super().__init__()
        self.heads, self.single_head_3d = heads, single_head_3d
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = (lin(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, H, N, d]
                   for lin in (self.q, self.k, self.v))
        attn = F.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)  # [B, H, N, N]
        out = self.proj((attn @ v).transpose(1, 2).flatten(2))  # [B, N, D]
        if self.single_head_3d:
            attn = attn[:, 0]  # [B, N, N]
        return out, attn

    def reference(self, x):
        return heads_softmax(x, self.q.weight, self.q.bias, self.k.weight, self.k.bias, self.heads)


class AttentionBlock(nn.Module):
    """Its class name says attention too, but it returns one tensor: only its child is hooked."""

    def __init__(self, dim, heads, single_head_3d=False):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = MultiHeadSelfAttention(dim, heads, single_head_3d)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        h, _ = self.attn(self.norm1(x))
        x = x + h
        return x + self.mlp(self.norm2(x))


class HandWrittenViT(nn.Module):
    def __init__(self, dim=32, heads=4, depth=2, patch=4, grid=(4, 6), single_head_3d=False):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + grid[0] * grid[1], dim))
        self.blocks = nn.Sequential(*[AttentionBlock(dim, heads, single_head_3d)
                                      for _ in range(depth)])
        self.head = nn.Linear(dim, 3)

    def forward(self, img):
        x = self.patch_embed(img).flatten(2).transpose(1, 2)  # [B, N-1, D]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.head(self.blocks(x)[:, 0])


def run_against_reference(model, attn_modules, img):
    """(captured output, plain output, rec, from-weights reference [L, B, H, N, N])."""
    with torch.no_grad():
        plain = model(img)
        with block_inputs(attn_modules) as xs, capture(model) as rec:
            captured = model(img)
        ref = torch.stack([mod.reference(x) for mod, x in zip(attn_modules, xs)])
    return captured, plain, rec, ref


def test_lucidrains_softmax_module_matches_weights():
    model = LucidViT().eval()
    attns = [layer[0] for layer in model.layers]
    img = torch.randn(2, 3, 24, 40)
    captured, plain, rec, ref = run_against_reference(model, attns, img)
    # the module that multiplies the softmax output with the values
    assert [(s.name, s.adapter) for s in rec.sites] == [("layers.0.0", None), ("layers.1.0", None)]
    assert rec.attentions.tensor.shape == (2, 2, 4, 16, 16)
    assert rec.attentions.layout == vitviz.TokenLayout(num_prefix=1, grid=(3, 5))
    torch.testing.assert_close(rec.attentions.tensor, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(captured, plain, atol=ATOL, rtol=0)


def test_tuple_returning_attention_containing_softmax_is_captured_once():
    model = LucidViT(return_attn=True).eval()
    attns = [layer[0] for layer in model.layers]
    captured, plain, rec, ref = run_against_reference(model, attns, torch.randn(1, 3, 24, 40))
    assert [s.name for s in rec.sites] == ["layers.0.0", "layers.1.0"]
    assert len(rec.passes) == 1 and len(rec.passes[0].records) == 2  # one per layer
    torch.testing.assert_close(rec.attentions.tensor, ref, atol=ATOL, rtol=0)


def test_course_vit_tuple_output_matches_weights():
    model = HandWrittenViT().eval()
    m = vitviz.wrap(model)
    assert m.patch_size == (4, 4) and m.num_prefix == 1 and m.has_cls
    attns = [b.attn for b in model.blocks]
    img = torch.randn(3, 3, 16, 24)
    captured, plain, rec, ref = run_against_reference(m, attns, img)
    # the modules running the attention, not the AttentionBlocks around them
    assert [(s.name, s.adapter) for s in rec.sites] == [("blocks.0.attn", None), ("blocks.1.attn", None)]
    assert rec.attentions.tensor.shape == (2, 3, 4, 25, 25)
    assert rec.attentions.layout == vitviz.TokenLayout(num_prefix=1, grid=(4, 6))
    torch.testing.assert_close(rec.attentions.tensor, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(captured, plain, atol=ATOL, rtol=0)
    torch.testing.assert_close(rec.attentions.tensor.sum(-1), torch.ones(2, 3, 4, 25),
                               atol=ATOL, rtol=0)
    # batched equals one-by-one
    for i in range(3):
        with torch.no_grad(), capture(m) as rec_i:
            m(img[i:i + 1])
        torch.testing.assert_close(rec.attentions.tensor[:, i:i + 1], rec_i.attentions.tensor,
                                   atol=ATOL, rtol=0)


def test_every_head_is_read_even_when_the_module_returns_one():
    # the module returns only head 0 ([B, N, N]); the op it multiplies with V has all four
    model = HandWrittenViT(single_head_3d=True).eval()
    attns = [b.attn for b in model.blocks]
    _, _, rec, ref = run_against_reference(model, attns, torch.randn(2, 3, 16, 24))
    assert rec.attentions.tensor.shape == (2, 2, 4, 25, 25)  # [L, B, H, N, N]
    torch.testing.assert_close(rec.attentions.tensor, ref, atol=ATOL, rtol=0)


class SoftmaxOnly3D(nn.Module):
    """Single-head attention with an nn.Softmax giving [B, Q, K] (a module named 'attn')."""

    def __init__(self, dim=8):
        super().__init__()
        self.q, self.k = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.attn_softmax = nn.Softmax(dim=2)  # the last dim of [B, Q, K], not written -1
        self.cls_softmax = nn.Softmax(dim=1)  # not an attention: its name says nothing of it

    def forward(self, x):
        a = self.attn_softmax(self.q(x) @ self.k(x).transpose(1, 2) / 8 ** 0.5)  # [B, N, N]
        return self.cls_softmax((a @ x).mean(1))

    def reference(self, x):
        return heads_softmax(x, self.q.weight, self.q.bias, self.k.weight, self.k.bias, 1)


def test_softmax_module_three_d_and_name_match():
    model = SoftmaxOnly3D().eval()
    x = torch.randn(2, 6, 8)
    with torch.no_grad(), capture(vitviz.wrap(model, grid=(2, 3), num_prefix=0)) as rec:
        model(x)
    assert [s.name for s in rec.sites] == ["<root>"]  # the softmax output is multiplied in forward
    assert rec.attentions.tensor.shape == (1, 2, 1, 6, 6)
    torch.testing.assert_close(rec.attentions.tensor[0], model.reference(x), atol=ATOL, rtol=0)


class CrossAttention(nn.Module):
    """Text queries over image tokens; returns (out, attn [B, H, T, N])."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.q, self.kv = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)

    def forward(self, text, image):
        q = self.q(text).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, H, T, d]
        k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, H, N, d]
                for t in self.kv(image).chunk(2, dim=-1))
        attn = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)  # [B, H, T, N]
        return (attn @ v).transpose(1, 2).flatten(2), attn


def test_tuple_output_non_square_is_cross_attention():
    model = CrossAttention().eval()
    text, image = torch.randn(2, 4, 16), torch.randn(2, 15, 16)
    with torch.no_grad(), capture(vitviz.wrap(model, grid=(3, 5), num_prefix=0)) as rec:
        _, attn = model(text, image)
    assert rec.attentions is None
    assert rec.cross.tensor.shape == (1, 2, 2, 4, 15)
    assert rec.cross.layout == vitviz.TokenLayout(num_prefix=0, grid=(3, 5))
    torch.testing.assert_close(rec.cross.tensor[0], attn, atol=0, rtol=0)


class CachingAttention(nn.Module):
    """Returns (out, cached keys [B, H, N, d]): a 4-D float second item that is not attention."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads, self.k = heads, nn.Linear(dim, dim)

    def forward(self, x):
        return x, self.k(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)


def test_a_module_named_attention_without_attention_is_not_captured():
    model = CachingAttention().eval()
    with pytest.raises(vitviz.CaptureError, match="no attention call was seen"):
        with capture(vitviz.wrap(model, grid=(2, 2), num_prefix=0)):
            model(torch.randn(1, 4, 8))
    assert hook_count(model) == 0


@pytest.mark.parametrize("make", [LucidViT, HandWrittenViT])
def test_hooks_removed_after_normal_exit_and_exception(make):
    model = make().eval()
    hw = (24, 40) if make is LucidViT else (16, 24)
    with torch.no_grad(), capture(model):
        model(torch.randn(1, 3, *hw))
        assert hook_count(model) > 0
    assert hook_count(model) == 0
    with pytest.raises(KeyError):
        with torch.no_grad(), capture(model):
            model(torch.randn(1, 3, *hw))
            raise KeyError("inside the block")
    assert hook_count(model) == 0
