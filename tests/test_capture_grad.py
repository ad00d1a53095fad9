"""Gradient capture: ``capture(model, grad=True)`` reads d score / d A (post-softmax) by tensor hooks.

Source of truth: the same model's forward re-written from its weights with the attention
probabilities ``P = softmax(q k^T * scale)`` kept as tensors of the graph, and
``torch.autograd.grad(score, P)`` (for pytorch_pretrained_vit: the library's own ``scores``
attribute, the tensor it multiplies with ``v``). Invariants: logits and attentions unchanged,
batched equals one-by-one, no module or tensor hook left after a normal exit or an exception.
"""

import math

import pytest
import torch
from helpers import CourseViT, hook_state, tiny_hf, tiny_timm
from torch import nn

import vitviz
from vitviz import capture
from vitviz.errors import CaptureError

ATOL = 1e-6


def close(a, b, atol=ATOL, rtol=1e-4):
    return torch.allclose(a, b, atol=atol, rtol=rtol)


def timm_manual(model, x):
    """timm ViT forward from its weights: (logits, [P_l [B, H, N, N]], [pre-softmax S_l])."""
    h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    probs, scores = [], []
    for blk in model.blocks:
        a = blk.attn
        y = blk.norm1(h)
        b, n, _ = y.shape
        q, k, v = a.qkv(y).reshape(b, n, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        s = (a.q_norm(q) * a.scale) @ a.k_norm(k).transpose(-2, -1)  # [B, H, N, N]
        p = s.softmax(dim=-1)
        scores.append(s)
        probs.append(p)
        o = (p @ v).transpose(1, 2).reshape(b, n, -1)
        h = h + blk.ls1(a.proj(a.norm(o)))
        h = h + blk.ls2(blk.mlp(blk.norm2(h)))
    return model.forward_head(model.norm(h)), probs, scores


def hf_manual(model, x):
    """transformers ViT forward from its weights: (logits, [P_l])."""
    h = model.vit.embeddings(x)
    probs = []
    for layer in model.vit.layers:
        att = layer.attention
        y = layer.layernorm_before(h)
        b, n, _ = y.shape
        q, k, v = (proj(y).view(b, n, -1, att.head_dim).transpose(1, 2)
                   for proj in (att.q_proj, att.k_proj, att.v_proj))
        p = ((q @ k.transpose(2, 3)) * att.scaling).softmax(dim=-1)  # [B, H, N, N]
        probs.append(p)
        h = h + att.o_proj((p @ v).transpose(1, 2).reshape(b, n, -1))
        h = h + layer.mlp(layer.layernorm_after(h))
    return model.classifier(model.vit.layernorm(h)[:, 0]), probs


def mha_probs(mha, q_in, kv_in):
    """(P [B, H, Q, K], V [B, H, K, d]) of an nn.MultiheadAttention from in_proj_weight."""
    d, heads = mha.embed_dim, mha.num_heads
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3)

    def split(t):
        return t.unflatten(-1, (heads, d // heads)).transpose(1, 2)  # [B, H, S, d]

    q, k, v = split(q_in @ w_q.T + b_q), split(kv_in @ w_k.T + b_k), split(kv_in @ w_v.T + b_v)
    return (q @ k.transpose(-1, -2) / math.sqrt(d // heads)).softmax(dim=-1), v


def course_manual(model, img):
    """CourseViT forward from its weights (post-norm encoder layers): (logits, [P_l])."""
    h = model.embed(img)
    probs = []
    for layer in model.encoder.layers:
        mha = layer.self_attn
        p, v = mha_probs(mha, h, h)
        probs.append(p)
        sa = mha.out_proj((p @ v).transpose(1, 2).flatten(2))
        h = layer.norm1(h + sa)
        h = layer.norm2(h + layer.linear2(layer.activation(layer.linear1(h))))
    return model.head(h[:, 0]), probs


def captured_grads(model, x, weights):
    """(logits, rec) of a capture with grad=True and (logits * weights).sum() backpropagated."""
    with capture(model, grad=True) as rec:
        out = model(x)
        logits = getattr(out, "logits", out)
        (logits * weights).sum().backward()
    return logits.detach(), rec


# --------------------------------------------------------------------------------------------
# equal to autograd on the from-weights forward
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,kw", [
    ("vit_tiny_patch16_224", {}),
    ("deit_tiny_distilled_patch16_224", {}),
    ("vit_tiny_patch16_224", dict(class_token=False, global_pool="avg")),
])
def test_timm_grad_equals_autograd_wrt_probabilities(name, kw):
    model = tiny_timm(name, **kw)
    torch.manual_seed(1)
    x, w = torch.randn(2, 3, 32, 32), torch.randn(2, 5)
    with torch.no_grad():
        plain = model(x)
    ref_logits, probs, pre = timm_manual(model, x)
    ref = torch.stack(torch.autograd.grad((ref_logits * w).sum(), probs))  # [L, B, H, N, N]
    logits, rec = captured_grads(model, x, w)
    grads = rec.attention_grads
    assert close(logits, plain, atol=1e-5) and close(ref_logits.detach(), plain, atol=1e-5)
    assert grads.tensor.shape == ref.shape == rec.attentions.tensor.shape
    assert grads.layout == rec.attentions.layout
    assert grads.tensor.abs().max() > 1e-3  # not trivially zero
    assert close(grads.tensor, ref)
    assert close(rec.attentions.tensor, torch.stack(probs).detach())
    # the test tells post-softmax from pre-softmax gradients apart
    again_logits, _, again_pre = timm_manual(model, x)
    ref_pre = torch.stack(torch.autograd.grad((again_logits * w).sum(), again_pre))
    assert not close(grads.tensor, ref_pre, atol=1e-3)


def test_transformers_vit_grad_equals_autograd_wrt_probabilities():
    model = tiny_hf()
    torch.manual_seed(1)
    x, w = torch.randn(2, 3, 32, 32), torch.randn(2, 5)
    with torch.no_grad():
        plain = model(x).logits  # sdpa, the default
    ref_logits, probs = hf_manual(model, x)
    ref = torch.stack(torch.autograd.grad((ref_logits * w).sum(), probs))
    logits, rec = captured_grads(model, x, w)
    assert model.config._attn_implementation == "sdpa"  # restored
    assert close(logits, plain, atol=1e-5)
    assert rec.attention_grads.tensor.shape == (2, 2, 4, 17, 17)
    assert rec.attention_grads.tensor.abs().max() > 1e-3
    assert close(rec.attention_grads.tensor, ref)


def test_torch_mha_grad_equals_autograd_wrt_probabilities():
    """MHA returns a view of its probabilities that no gradient reaches: read on its base."""
    model = CourseViT(seed=0).eval()
    vm = vitviz.wrap(model, grid=(3, 5), num_prefix=1)
    torch.manual_seed(1)
    x, w = torch.randn(2, 3, 24, 40), torch.randn(2, 5)
    with torch.no_grad():
        plain = model(x)  # fused fast path
    ref_logits, probs = course_manual(model, x)
    ref = torch.stack(torch.autograd.grad((ref_logits * w).sum(), probs))
    fastpath = torch.backends.mha.get_fastpath_enabled()
    logits, rec = captured_grads(vm, x, w)
    assert torch.backends.mha.get_fastpath_enabled() == fastpath
    assert close(logits, plain, atol=1e-5)
    assert rec.attention_grads.tensor.shape == (2, 2, 4, 16, 16)
    assert rec.attention_grads.tensor.abs().max() > 1e-3
    assert close(rec.attention_grads.tensor, ref)


class WeightsUser(nn.Module):
    """A standalone MHA whose caller uses the head-averaged weights it asked for."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.c = nn.Parameter(torch.randn(5, 5))

    def forward(self, x):
        out, w = self.attn(x, x, x)  # need_weights=True, average_attn_weights=True (defaults)
        return out.sum(-1) @ torch.ones(5) + (w * self.c).sum((-1, -2))


def test_torch_mha_grad_includes_the_callers_use_of_the_weights():
    model = WeightsUser().eval()
    vm = vitviz.wrap(model, grid=(2, 2), num_prefix=1)
    torch.manual_seed(1)
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        plain = model(x)
    p, v = mha_probs(model.attn, x, x)
    out = model.attn.out_proj((p @ v).transpose(1, 2).flatten(2))
    ref_out = out.sum(-1) @ torch.ones(5) + (p.mean(1) * model.c).sum((-1, -2))
    ref = torch.autograd.grad(ref_out.sum(), p)[0]
    with capture(vm, grad=True) as rec:
        got = model(x)
        got.sum().backward()
    assert close(got.detach(), plain, atol=1e-5)
    assert close(rec.attention_grads.tensor[0], ref)

    # unbatched input [S, D]: weights [H, Q, K], a view of the [H, Q, K] softmax
    s = x[0]  # [S, D]; the same tensor as query and key: self-attention
    with capture(vm, grad=True) as rec:
        model.attn(s, s, s)[0].pow(2).sum().backward()
    p0, v0 = mha_probs(model.attn, x[:1], x[:1])
    ref0 = torch.autograd.grad(model.attn.out_proj((p0 @ v0).transpose(1, 2).flatten(2)).pow(2).sum(), p0)[0]
    assert rec.attention_grads.tensor.shape == (1, 1, 2, 5, 5)
    assert close(rec.attention_grads.tensor[0], ref0)


@pytest.fixture
def ppv_vit(monkeypatch):
    """pytorch_pretrained_vit's ViT built by the library with small arguments (random weights)."""
    import pytorch_pretrained_vit as ppv  # dev dependency
    import pytorch_pretrained_vit.model as ppv_model

    monkeypatch.setattr(ppv_model, "resize_positional_embedding", False, raising=False)
    torch.manual_seed(0)
    model = ppv.ViT(None, patches=8, dim=32, ff_dim=64, num_heads=4, num_layers=2,
                    image_size=(24, 40), num_classes=7).eval()
    with torch.no_grad():  # the library zero-initialises fc and class_token
        nn.init.normal_(model.fc.weight)
        nn.init.normal_(model.class_token)
    return model


def test_pytorch_pretrained_vit_grad_equals_autograd_wrt_its_scores(ppv_vit):
    torch.manual_seed(1)
    x, w = torch.randn(2, 3, 24, 40), torch.randn(2, 7)
    logits, rec = captured_grads(vitviz.wrap(ppv_vit), x, w)
    # reference: the library keeps `scores`, the tensor it multiplies with v
    out = ppv_vit(x)
    scores = [blk.attn.scores for blk in ppv_vit.transformer.blocks]
    ref = torch.stack(torch.autograd.grad((out * w).sum(), scores))
    assert rec.attention_grads.tensor.abs().max() > 1e-3
    assert close(rec.attention_grads.tensor, ref)


# --------------------------------------------------------------------------------------------
# invariants
# --------------------------------------------------------------------------------------------

def test_batch_equals_one_by_one_and_attentions_unchanged():
    model = tiny_timm()
    torch.manual_seed(2)
    x, target = torch.randn(3, 3, 32, 32), torch.tensor([0, 3, 1])
    with capture(model, grad=True) as rec:
        model(x).gather(1, target[:, None]).sum().backward()
    with torch.no_grad(), capture(model) as plain_rec:
        model(x)
    assert torch.equal(rec.attentions.tensor, plain_rec.attentions.tensor)
    for b in range(3):
        with capture(model, grad=True) as one:
            model(x[b:b + 1])[0, target[b]].backward()
        assert close(rec.attention_grads.tensor[:, b:b + 1], one.attention_grads.tensor, atol=1e-6)


def test_layers_in_the_order_they_run():
    """Each layer's gradient sits at its own index (distinct per layer, matched to the reference)."""
    model = tiny_timm(depth=3)
    x = torch.randn(1, 3, 32, 32)
    ref_logits, probs, _ = timm_manual(model, x)
    ref = torch.autograd.grad(ref_logits[0, 2], probs)
    with capture(model, grad=True) as rec:
        model(x)[0, 2].backward()
    g = rec.attention_grads.tensor
    for layer in range(3):
        assert close(g[layer], ref[layer])
        assert not close(g[layer], ref[(layer + 1) % 3], atol=1e-4)


def test_gradients_of_several_backward_calls_are_summed():
    model = tiny_timm()
    x = torch.randn(1, 3, 32, 32)
    with capture(model, grad=True) as rec:
        out = model(x)
        out[0, 1].backward(retain_graph=True)
        once = rec.attention_grads.tensor.clone()
        out[0, 1].backward()
    assert close(rec.attention_grads.tensor, 2 * once)


def test_grad_inputs_avoid_parameter_gradients():
    model = tiny_timm()
    x = torch.randn(1, 3, 32, 32)
    with capture(model, grad=True) as rec:
        out = model(x)
        torch.autograd.grad(out[0, 4], rec.grad_inputs())
    with capture(model, grad=True) as ref:
        model(x)[0, 4].backward()
    assert close(rec.attention_grads.tensor, ref.attention_grads.tensor)
    model.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())


def test_no_hooks_left_after_exit_and_after_an_exception():
    model = tiny_timm()
    before = hook_state(model)
    x = torch.randn(1, 3, 32, 32)
    with capture(model, grad=True) as rec:
        out = model(x)
        graph = rec.grad_inputs()
        assert len(graph) == 2 and all(len(t._backward_hooks) == 1 for t in graph)
    assert all(not t._backward_hooks for t in graph)  # tensor hooks removed
    assert hook_state(model) == before and all(b.attn.fused_attn for b in model.blocks)
    out[0, 0].backward()  # after the block: the removed hooks record nothing
    with pytest.raises(CaptureError, match="backward"):
        _ = rec.attention_grads
    with pytest.raises(CaptureError, match="inside"):
        rec.grad_inputs()

    with pytest.raises(RuntimeError, match="boom"):
        with capture(model, grad=True) as rec:
            out = model(x)
            graph = rec.grad_inputs()
            raise RuntimeError("boom")
    assert all(not t._backward_hooks for t in graph)
    assert hook_state(model) == before and all(b.attn.fused_attn for b in model.blocks)


def test_errors_say_what_to_do():
    model = tiny_timm()
    x = torch.randn(1, 3, 32, 32)
    with capture(model) as rec:  # grad not requested
        model(x)[0, 0].backward()
    with pytest.raises(CaptureError, match="grad=True"):
        _ = rec.attention_grads
    assert not rec.passes[-1].hooked and not rec.passes[-1].grads
    with torch.no_grad(), capture(model, grad=True) as rec:
        model(x)
    with pytest.raises(CaptureError, match="no_grad"):
        _ = rec.attention_grads


def test_frozen_parameters_need_an_input_that_requires_grad():
    model = tiny_timm().requires_grad_(False)
    x = torch.randn(1, 3, 32, 32)
    with capture(model, grad=True) as rec:
        model(x)
    with pytest.raises(CaptureError, match="requires_grad"):
        _ = rec.attention_grads
    with capture(model, grad=True) as rec:
        model(x.requires_grad_())[0, 1].backward()
    assert rec.attention_grads.tensor.abs().max() > 0
