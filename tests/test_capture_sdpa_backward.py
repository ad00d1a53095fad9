"""The attention's backward pass answered once from the recomputed probabilities.

Where a gradient stream (relevance) reads a layer that ran the model's fused SDPA kernel, vitviz
answers that call's backward pass itself (``_mode.sdpa_backward``): ``A`` is recomputed once
and gives the stream ``mean_h[(dA ⊙ A)⁺]`` and autograd ``dQ``, ``dK``, ``dV``, so SDPA's own
backward does not run beside it.

Sources of truth: autograd through an explicit (unfused) attention written out here in float64
(``softmax(q kᵀ·s + mask) @ v``), with boolean and float masks, causal and grouped-query
attention; the model's input gradient without any capture; hand-computed values on 2x2 inputs.
"""

import pytest
import torch
from helpers import inputs, tiny_timm
from torch.utils._python_dispatch import TorchDispatchMode

import vitviz
import vitviz.attention._mode as ops
from vitviz.analyze import RelevanceStream, relevance_map
from vitviz.analyze.gradient import chefer_layer


def _reference(q, k, v, d_out, *, mask=None, causal=False, scale=None, groups=1):
    """Autograd through attention written out: (dq, dk, dv, A, dA) in float64."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    kk, vv = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)
    s = scale if scale is not None else q.shape[-1] ** -0.5
    logits = q @ kk.transpose(-2, -1) * s  # [B, H, L, S]
    if causal:
        logits = logits.masked_fill(~torch.ones(logits.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
    a = torch.softmax(logits, dim=-1)
    a.retain_grad()
    (a @ vv).backward(d_out)
    return q.grad, k.grad, v.grad, a.detach(), a.grad


CASES = {
    "plain": dict(),
    "scale": dict(scale=0.3),
    "causal": dict(causal=True),
    "bool mask": dict(mask="bool"),
    "float mask": dict(mask="float"),
    "gqa": dict(groups=2),
    "gqa causal float mask": dict(groups=2, causal=True, mask="float"),
}


@pytest.mark.parametrize("chunk", [1 << 20, 5 * 7 * 4])  # whole layers, and one head at a time
@pytest.mark.parametrize("case", list(CASES))
def test_gradients_equal_autograd_through_the_unfused_attention(case, chunk, monkeypatch):
    monkeypatch.setattr(ops, "_BACKWARD_CHUNK_BYTES", chunk)
    kw = dict(CASES[case])
    groups = kw.pop("groups", 1)
    g = torch.Generator().manual_seed(0)
    b, h, length, source, d = 2, 4, 5, 7 if not kw.get("causal") else 5, 3
    q = torch.randn(b, h, length, d, dtype=torch.float64, generator=g)
    k = torch.randn(b, h // groups, source, d, dtype=torch.float64, generator=g)
    v = torch.randn(b, h // groups, source, 2, dtype=torch.float64, generator=g)
    d_out = torch.randn(b, h, length, 2, dtype=torch.float64, generator=g)
    mask = kw.pop("mask", None)
    if mask == "bool":
        mask = torch.rand(b, 1, length, source, generator=g) > 0.3
        mask[..., 0] = True  # every row keeps a key
    elif mask == "float":
        mask = torch.randn(1, h, length, source, dtype=torch.float64, generator=g)
    rq, rk, rv, ra, rda = _reference(q, k, v, d_out, mask=mask, groups=groups, **kw)
    options = dict(attn_mask=mask, is_causal=kw.get("causal", False), scale=kw.get("scale"),
                   enable_gqa=groups > 1)
    dq, dk, dv, fused = ops.sdpa_backward(q, k, v, d_out, fusion=("mean", True), **options)
    for got, want in ((dq, rq), (dk, rk), (dv, rv)):
        assert got.dtype == torch.float64 and got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    # what the relevance stream reads: Chefer's mean_h[(dA ⊙ A)⁺] of autograd's dA
    torch.testing.assert_close(fused, chefer_layer(ra, rda), atol=1e-6, rtol=1e-6)
    *_, (a, da) = ops.sdpa_backward(q, k, v, d_out, keep=True, **options)
    torch.testing.assert_close(a, ra.float(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(da, rda.float(), atol=1e-6, rtol=1e-6)
    for fusion in ("max", "min"):  # gradient rollout's fusions (no clamp before fusing)
        *_, got = ops.sdpa_backward(q, k, v, d_out, fusion=(fusion, False), **options)
        want = (ra * rda).amax(dim=1) if fusion == "max" else (ra * rda).amin(dim=1)
        torch.testing.assert_close(got, want.float(), atol=1e-6, rtol=1e-6)


def test_hand_computed_2x2():
    # k = 0: every logit is 0, A = 1/2 everywhere; v = [1, 3], dOut = [1, 0]
    q = torch.tensor([[[[1.0], [0.0]]]])
    k = torch.zeros(1, 1, 2, 1)
    v = torch.tensor([[[[1.0], [3.0]]]])
    d_out = torch.tensor([[[[1.0], [0.0]]]])
    dq, dk, dv, fused = ops.sdpa_backward(q, k, v, d_out, scale=1.0, fusion=("mean", True))
    # dA = dOut vᵀ = [[1, 3], [0, 0]]; A ⊙ dA = [[.5, 1.5], [0, 0]]; row sums [2, 0]
    # dS = A ⊙ dA − A·rowsum = [[-.5, .5], [0, 0]]; dV = Aᵀ dOut = [.5, .5]
    # dQ = dS k = 0; dK = dSᵀ q = [-.5, .5]
    torch.testing.assert_close(dv, torch.tensor([[[[0.5], [0.5]]]]))
    torch.testing.assert_close(dq, torch.zeros(1, 1, 2, 1))
    torch.testing.assert_close(dk, torch.tensor([[[[-0.5], [0.5]]]]))
    torch.testing.assert_close(fused, torch.tensor([[[0.5, 1.5], [0.0, 0.0]]]))


class _AtenOps(TorchDispatchMode):
    """The names of the aten ops that run while it is active (the kernels, forward and backward)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def _input_grad(model, x, *, stream=None):
    xg = x.detach().requires_grad_(True)
    if stream is None:
        out = model(xg)
        return torch.autograd.grad(out[:, 1].sum(), xg)[0], None
    with vitviz.capture(model, grad=True, keep="none", streams={"r": stream}) as rec:
        out = model(xg)
        spy = _AtenOps()
        with spy:
            grad = torch.autograd.grad(out[:, 1].sum(), xg)[0]
    return grad, (rec, spy.names)


def test_input_gradient_unchanged_and_sdpa_backward_not_run():
    model = tiny_timm(real_head=True, depth=3).double()
    x = inputs(2).double()
    plain, _ = _input_grad(model, x)
    stream = RelevanceStream("chefer")
    captured, (rec, names) = _input_grad(model, x, stream=stream)
    torch.testing.assert_close(captured, plain, atol=1e-12, rtol=1e-10)  # the model's own gradient
    assert not [n for n in names if "scaled_dot_product" in n]  # SDPA's own backward never ran
    assert "bmm" in names or "matmul" in names or "mm" in names  # (the spy sees the backward's kernels)
    # the stream equals relevance from stored probabilities and autograd's gradients (both
    # store float32 attention and factors, whatever the model's dtype: float32 rounding)
    with vitviz.capture(model, grad=True) as ref:
        model(x.detach().requires_grad_(True))[:, 1].sum().backward()
    want = relevance_map(ref.attentions, ref.attention_grads, method="chefer")
    torch.testing.assert_close(rec.stream("r"), want, atol=1e-6, rtol=1e-5)


def test_spy_sees_sdpa_backward_without_the_capture():
    """The spy of the test above can fail: without vitviz's Function, SDPA's backward runs."""
    model = tiny_timm(depth=2).double()
    xg = inputs(1).double().requires_grad_(True)
    out = model(xg)
    spy = _AtenOps()
    with spy:
        torch.autograd.grad(out[:, 1].sum(), xg)
    assert [n for n in spy.names if "scaled_dot_product" in n]


@pytest.mark.parametrize("method, options", [("chefer", {}), ("grad_rollout", dict(head_fusion="max")),
                                             ("grad_rollout", dict(discard_ratio=0.5))])
def test_streams_that_need_heads_and_fused_streams_agree(method, options):
    """A stream without grad_fusion gets the whole A and dA from the same backward pass."""

    class Heads:  # needs every head: update_grad only
        def __init__(self):
            self.inner = RelevanceStream(method, **options)

        def reset(self):
            self.inner.reset()

        def update_grad(self, *args, **kwargs):
            self.inner.update_grad(*args, **kwargs)

        def result(self, layout):
            return self.inner.result(layout)

    model = tiny_timm(real_head=True, depth=3).double()
    x = inputs(2).double()
    fused, heads = RelevanceStream(method, **options), Heads()
    got = {}
    for name, stream in (("fused", fused), ("heads", heads)):
        grad, (rec, _) = _input_grad(model, x, stream=stream)
        got[name] = rec.stream("r")
    # the same A and dA, fused in the model's dtype or stored as float32 first: float32 rounding
    torch.testing.assert_close(got["fused"], got["heads"], atol=1e-6, rtol=1e-5)


def test_a_second_backward_through_the_graph_is_refused_by_the_stream_but_gradients_stay_right():
    model = tiny_timm(real_head=True).double()
    xg = inputs(1).double().requires_grad_(True)
    plain = torch.autograd.grad(model(xg)[:, 0].sum(), xg)[0]
    with vitviz.capture(model, grad=True, keep="none", streams={"r": RelevanceStream()}):
        score = model(xg)[:, 0].sum()
        first = torch.autograd.grad(score, xg, retain_graph=True)[0]
        with pytest.raises(vitviz.errors.CaptureError, match="second gradient"):
            torch.autograd.grad(score, xg)
    torch.testing.assert_close(first, plain, atol=1e-12, rtol=1e-10)
