"""Attention read at the attention op: a ``TorchFunctionMode`` scoped to the capture block.

Inside ``with vitviz.capture(m)``, every torch function the model calls on this thread passes
through :class:`AttentionOps` first. Three kinds of call are attention, and each is answered by
the op's own definition from the exact inputs the model passed (its q and k after RoPE,
q/k-norm and biases, its mask and its scale):

- ``F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale,
  enable_gqa)``: the probabilities are ``softmax(q kᵀ·scale + mask)`` as SDPA defines them
  (boolean masks keep ``True`` entries, float masks are added, ``is_causal`` is the
  top-left-aligned lower triangle, the default scale ``1/√d``, GQA repeats the key and value
  heads). When the capture needs the probabilities of this call in the forward pass, ``A`` is
  computed once and the output as ``A @ v`` (the eager path's cost, no recomputation);
  otherwise the model's own fused kernel runs untouched. When only a gradient stream needs
  the layer, the fused kernel runs too and the backward pass gives ``dA = dOut·vᵀ`` (exact,
  since ``out = A·v``), with ``A`` recomputed from the saved q and k as the gradient arrives:
  no ``[B, H, N, N]`` tensor is kept between the passes.
- an explicit softmax over the last dimension whose result is multiplied with values
  (``@``, ``matmul``, ``bmm``, ``einsum``), possibly through dropout or a dtype cast on the way:
  that softmax output is the attention (timm's and transformers' eager paths,
  pytorch_pretrained_vit, lucidrains-style ``nn.Softmax``, course ViTs with ``torch.einsum``).
  The model computes it anyway; nothing is recomputed.
- ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``): called with
  ``need_weights=True, average_attn_weights=False``; the caller gets exactly what it asked for.

Inside ``__torch_function__`` this mode is off, so the calls made by the function answered
are not seen again; an outer capture's mode (nested captures) still sees them and records
the same attention. The mode is thread-local: another thread's forward never reaches it.
Nothing on the model is switched: with a mode active, torch itself skips the
``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` fast paths (they refuse inputs
that have a torch function), so ``MultiheadAttention.forward`` runs as written.
"""

from __future__ import annotations

import inspect
import math
import sys
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

_SDPA = F.scaled_dot_product_attention
_MHA = F.multi_head_attention_forward
_MHA_SIGNATURE = inspect.signature(_MHA)
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SOFTMAX = {torch.softmax, torch.Tensor.softmax, F.softmax, torch.special.softmax}
# calls through which a softmax output is still the same probabilities (eval dropout, casts)
_PASS_THROUGH = {F.dropout, torch.dropout, torch.Tensor.to, torch.Tensor.type_as, torch.Tensor.float,
                 torch.Tensor.half, torch.Tensor.bfloat16, torch.Tensor.double, torch.Tensor.contiguous}
_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm}
_HALF = (torch.float16, torch.bfloat16)


def _sdpa_arguments(args: tuple, kwargs: dict) -> dict:
    """SDPA's arguments by name, with its defaults."""
    bound = dict(zip(_SDPA_ARGS, args))
    bound.update(kwargs)
    bound.setdefault("attn_mask", None)
    bound.setdefault("dropout_p", 0.0)
    bound.setdefault("is_causal", False)
    bound.setdefault("scale", None)
    bound.setdefault("enable_gqa", False)
    return bound


def _repeat_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """GQA: each of ``t``'s ``Hk`` key/value heads serves ``num_heads / Hk`` query heads
    (``[..., Hk, S, d] -> [..., num_heads, S, d]``); ``t`` itself when the counts agree."""
    if t.shape[-3] == num_heads:
        return t
    return t.repeat_interleave(num_heads // t.shape[-3], dim=-3)


def sdpa_probabilities(query: torch.Tensor, key: torch.Tensor, *, attn_mask=None, is_causal: bool = False,
                       scale: float | None = None, enable_gqa: bool = False,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """The attention probabilities of ``F.scaled_dot_product_attention``, by its definition.

    ``softmax(q kᵀ·scale + mask)``: a boolean mask keeps the entries that are ``True``, a
    float mask is added, ``is_causal`` keeps the top-left-aligned lower triangle, ``scale``
    defaults to ``1/√d``, and with ``enable_gqa`` each key head serves ``Hq / Hk`` query heads.
    Half-precision inputs give float32 probabilities (the softmax is taken in float32).

    Args:
        query: ``[..., Hq, L, d]`` the queries as the model passed them (after RoPE, q-norm).
        key: ``[..., Hk, S, d]`` the keys as the model passed them.
        attn_mask: a boolean mask (``True`` keeps) or a float mask added to the logits,
            broadcastable to ``[..., Hq, L, S]``; None for none.
        is_causal: keep the top-left-aligned lower triangle only.
        scale: the logit scale (default ``1/√d``).
        enable_gqa: grouped-query attention: each key head serves ``Hq / Hk`` query heads.
        out: a tensor of the result's shape and dtype to compute into (no autograd): the
            logits are written there and normalised in place, with no temporary ``[..., L, S]``.

    Returns:
        ``[..., Hq, L, S]`` probabilities (rows sum to 1; float32 for half-precision inputs).

    Shape:
        query: ``[..., Hq, L, d]``, key: ``[..., Hk, S, d]`` -> ``[..., Hq, L, S]``
    """
    if enable_gqa:
        key = _repeat_heads(key, query.shape[-3])
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    query = query * scale  # [..., L, d]: cheaper than scaling the [..., L, S] logits
    # the logits are a fresh tensor (or `out`): masked in place, which autograd allows (matmul's
    # backward needs q and k, not its result)
    logits = torch.matmul(query, key.transpose(-2, -1), out=out)  # [..., L, S]
    if is_causal:
        length, source = query.shape[-2], key.shape[-2]
        keep = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
        logits.masked_fill_(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits.masked_fill_(~attn_mask, float("-inf"))
        elif out is None:
            logits = logits + attn_mask  # promotes half logits to a float32 mask's dtype
        else:
            logits.add_(attn_mask)
    if out is not None:  # normalised in place: no temporary [..., L, S]
        return torch._softmax(logits, -1, False, out=logits)
    return torch.softmax(logits, dim=-1, dtype=torch.float32 if logits.dtype in _HALF else None)


def _sdpa_output(probs: torch.Tensor, value: torch.Tensor, dropout_p: float, enable_gqa: bool,
                 num_heads: int) -> torch.Tensor:
    """``dropout(A) @ v`` in the value's dtype (``[..., Hq, L, dv]``)."""
    if enable_gqa:
        value = _repeat_heads(value, num_heads)
    a = probs if probs.dtype == value.dtype else probs.to(value.dtype)
    if dropout_p > 0:
        a = F.dropout(a, p=dropout_p)
    return torch.matmul(a, value)


# bytes of probabilities computed at once by sdpa_fused_heads (one sample, a few heads). Measured
# on a 2-core x86-64 CPU, one ViT-B/16 layer with timm's strided q, k, v: at 224 px (b16) every
# head of a sample at once (1.9 MB) took 12.4 ms against 13.8 ms in 1 MB chunks (the fused kernel:
# 10.7-11 ms); at 384 px (b8) 6 heads (8 MB) took 46-47 ms against 72 ms one head at a time (37 ms)
_CHUNK_BYTES = 8 << 20


def sdpa_fused_heads(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, fusion: str,
                     attn_mask=None, is_causal: bool = False, scale: float | None = None,
                     enable_gqa: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA's output and its head-fused probabilities, computed a few heads at a time.

    Each chunk of ``softmax(q kᵀ·scale + mask)`` (one sample, up to ``_CHUNK_BYTES`` of heads) is
    computed in place in a scratch tensor, multiplied with its values into the output, and folded
    into the head fusion
    (mean, max or min), so the ``[B, H, L, S]`` probabilities never go through main memory:
    what a stream that fuses heads first (rollout) needs, at close to the fused kernel's cost.

    Shape:
        query ``[B, Hq, L, d]``, key ``[B, Hk, S, d]``, value ``[B, Hk, S, dv]`` ->
        (output ``[B, Hq, L, dv]``, fused ``[B, 1, L, S]`` float32)
    """
    b, h, length, _ = query.shape
    source = key.shape[-2]
    if enable_gqa:
        key, value = _repeat_heads(key, h), _repeat_heads(value, h)
    out = query.new_empty(b, h, length, value.shape[-1])  # [B, H, L, dv]
    fused = torch.empty(b, 1, length, source, dtype=torch.float32, device=query.device)  # [B, 1, L, S]
    per = max(1, min(h, _CHUNK_BYTES // (length * source * query.element_size())))
    scratch = query.new_empty(per, length, source)  # [h', L, S]
    mask = None if attn_mask is None else attn_mask.expand(b, h, length, source)
    for i in range(b):
        acc = fused[i, 0]  # [L, S]
        for h0 in range(0, h, per):
            h1 = min(h, h0 + per)
            probs = sdpa_probabilities(query[i, h0:h1], key[i, h0:h1], is_causal=is_causal, scale=scale,
                                       attn_mask=None if mask is None else mask[i, h0:h1],
                                       out=scratch[:h1 - h0])  # [h', L, S]
            torch.matmul(probs, value[i, h0:h1], out=out[i, h0:h1])
            if fusion == "mean":
                if h0 == 0:
                    torch.sum(probs, dim=0, out=acc)  # [L, S], straight into the result
                else:
                    acc.add_(probs.sum(dim=0))
            else:
                part = probs.amax(dim=0) if fusion == "max" else probs.amin(dim=0)  # [L, S]
                if h0 == 0:
                    acc.copy_(part)
                else:
                    torch.maximum(acc, part, out=acc) if fusion == "max" else torch.minimum(acc, part, out=acc)
    if fusion == "mean":
        fused.div_(h)
    return out, fused


def _attention_grad(value: torch.Tensor, enable_gqa: bool, num_heads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``dOut -> dA = dOut·vᵀ``: the gradient with respect to the probabilities of an SDPA call
    whose output ``out = A·v`` came from the fused kernel (``[..., L, dv] -> [..., L, S]``)."""
    v = _repeat_heads(value.detach(), num_heads) if enable_gqa else value.detach()
    return lambda d_out: torch.matmul(d_out.detach(), v.transpose(-2, -1))


# bytes of float32 probabilities per block of sdpa_backward on the CPU. Measured on a 2-core
# x86-64 CPU, one ViT-B/16 layer's backward: at 384 px blocks of 4-6 heads (5-8 MB) beat whole
# samples by 1.3x and single heads too; at 224 px a whole sample (1.8 MB) is as fast. Larger blocks
# also mean fewer small ops (each a parallel region, which stalls when a core is busy elsewhere).
_BACKWARD_CHUNK_BYTES = 8 << 20


def _chunks(batch: int, heads: int, length: int, source: int, device: torch.device):
    """``(b0, b1, h0, h1)`` blocks of ``[B, H, L, S]``: on the CPU one sample and a few heads at a
    time (about ``_BACKWARD_CHUNK_BYTES`` of float32 probabilities, so that a block stays in the
    cache while it is used several times); elsewhere everything at once (a GPU runs one kernel per op)."""
    if device.type != "cpu":
        return [(0, batch, 0, heads)]
    per = max(1, min(heads, _BACKWARD_CHUNK_BYTES // (length * source * 4)))
    return [(i, i + 1, h0, min(heads, h0 + per)) for i in range(batch) for h0 in range(0, heads, per)]


def sdpa_backward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, d_out: torch.Tensor, *,
                  attn_mask=None, is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
                  fusion: tuple[str, bool] | None = None, keep: bool = False):
    """The backward pass of ``F.scaled_dot_product_attention`` from the probabilities recomputed
    once, block by block, and what a gradient stream reads from them on the way.

    With ``A = softmax(q kᵀ·s + mask)`` and ``out = A·v`` (SDPA's definition, dropout 0):
    ``dA = dOut·vᵀ``, ``dV = Aᵀ·dOut``, ``dS = A ⊙ (dA − rowsum(dA ⊙ A))`` (the softmax's
    Jacobian), ``dQ = dS·k·s`` and ``dK = dSᵀ·q·s`` (as FlashAttention's backward, Dao et al.
    2022, Algorithm 4, which uses the equal ``rowsum(dOut ⊙ out)``). One pass over the blocks
    gives the gradients and, for a stream, either ``fuse_h(A ⊙ dA)`` (``fusion``, each head
    clamped at 0 first when its flag says so: Chefer et al. 2021's ``mean_h[(dA ⊙ A)⁺]``) or the
    whole ``A`` and ``dA`` (``keep``). Half-precision inputs are computed in float32.

    Args:
        query, key, value: ``[B, Hq, L, d]``, ``[B, Hk, S, d]``, ``[B, Hk, S, dv]`` as the model
            passed them.
        d_out: ``[B, Hq, L, dv]`` the gradient with respect to the call's output.
        attn_mask, is_causal, scale, enable_gqa: the call's own arguments.
        fusion: ``(head_fusion, clamp_first)``: also return ``fuse_h(A ⊙ dA)`` (``"mean"``,
            ``"max"`` or ``"min"`` over the heads, of ``(A ⊙ dA)⁺`` when ``clamp_first``).
        keep: also return ``A`` and ``dA`` ``[B, Hq, L, S]`` float32.

    Returns:
        ``(dq, dk, dv, extra)`` with the gradients in the inputs' dtypes and ``extra`` the fused
        ``[B, L, S]`` float32 (``fusion``), ``(A, dA)`` (``keep``) or None.
    """
    b, h, length, d = query.shape
    source, heads_kv = key.shape[-2], key.shape[-3]
    work = torch.float32 if query.dtype in _HALF else query.dtype
    s = scale if scale is not None else 1.0 / math.sqrt(d)
    if enable_gqa:
        key, value = _repeat_heads(key, h), _repeat_heads(value, h)
    device = query.device
    dq = torch.empty(b, h, length, d, dtype=work, device=device)
    dk = torch.empty(b, h, source, d, dtype=work, device=device)
    dv = torch.empty(b, h, source, value.shape[-1], dtype=work, device=device)
    fused = torch.empty(b, length, source, dtype=work, device=device) if fusion is not None else None
    probs_all = torch.empty(b, h, length, source, dtype=torch.float32, device=device) if keep else None
    grads_all = torch.empty_like(probs_all) if keep else None
    blocked = ~torch.ones(length, source, dtype=torch.bool, device=device).tril() if is_causal else None
    mask = None if attn_mask is None else attn_mask.expand(b, h, length, source)
    chunks = _chunks(b, h, length, source, device)
    # scratch reused by every block (no allocation, no page faults per block): A, dA, A ⊙ dA
    # (then dS), and the clamped product / per-block head sum of the fusion
    nb, nh = chunks[0][1] - chunks[0][0], chunks[0][3] - chunks[0][2]
    scratch = torch.empty(4, nb, nh, length, source, dtype=work, device=device)
    head_sum = torch.empty(nb, length, source, dtype=work, device=device) if fusion is not None else None
    for b0, b1, h0, h1 in chunks:
        qc = query[b0:b1, h0:h1].to(work)  # [b', h', L, d]
        kc, vc = key[b0:b1, h0:h1].to(work), value[b0:b1, h0:h1].to(work)  # [b', h', S, d]
        oc = d_out[b0:b1, h0:h1].to(work)  # [b', h', L, dv]
        a, da, p, part = (t[:b1 - b0, :h1 - h0] for t in scratch)  # [b', h', L, S] each
        if keep and work == torch.float32:  # computed where the caller keeps them
            a, da = probs_all[b0:b1, h0:h1], grads_all[b0:b1, h0:h1]
        torch.matmul(qc * s, kc.transpose(-2, -1), out=a)
        if blocked is not None:
            a.masked_fill_(blocked, float("-inf"))
        if mask is not None:
            m = mask[b0:b1, h0:h1]
            if m.dtype == torch.bool:
                a.masked_fill_(~m, float("-inf"))
            else:
                a.add_(m)
        torch._softmax(a, -1, False, out=a)  # normalised in place
        torch.matmul(oc, vc.transpose(-2, -1), out=da)  # dA = dOut·vᵀ
        if keep and work != torch.float32:
            probs_all[b0:b1, h0:h1] = a
            grads_all[b0:b1, h0:h1] = da
        torch.matmul(a.transpose(-2, -1), oc, out=dv[b0:b1, h0:h1])  # dV = Aᵀ·dOut
        torch.mul(a, da, out=p)  # A ⊙ dA
        if fusion is not None:
            head_fusion, clamp_first = fusion
            src = torch.clamp(p, min=0, out=part) if clamp_first else p
            f, hs = fused[b0:b1], head_sum[:b1 - b0]  # [b', L, S]
            first = h0 == 0
            if head_fusion == "mean":
                torch.sum(src, dim=1, out=f if first else hs)
                if not first:
                    f.add_(hs)
            else:
                reduce = torch.amax if head_fusion == "max" else torch.amin
                reduce(src, dim=1, out=f if first else hs)
                if not first:
                    torch.maximum(f, hs, out=f) if head_fusion == "max" else torch.minimum(f, hs, out=f)
        # dS = A ⊙ dA − A ⊙ rowsum(A ⊙ dA), in place of A ⊙ dA
        p.addcmul_(a, p.sum(dim=-1, keepdim=True).expand_as(a), value=-1.0)
        torch.matmul(p, kc, out=dq[b0:b1, h0:h1])  # dS·k
        torch.matmul(p.transpose(-2, -1), qc, out=dk[b0:b1, h0:h1])  # dSᵀ·q
    dq.mul_(s)
    dk.mul_(s)
    if h != heads_kv:  # GQA: each key / value head served h / Hk query heads: their gradients add up
        dk = dk.view(b, heads_kv, h // heads_kv, source, d).sum(dim=2)
        dv = dv.view(b, heads_kv, h // heads_kv, source, dv.shape[-1]).sum(dim=2)
    if fused is not None and fusion is not None and fusion[0] == "mean":
        fused.div_(h)
    extra = fused.float() if fused is not None else ((probs_all, grads_all) if keep else None)
    return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype), extra


class FusedCall:
    """One SDPA call that ran the model's fused kernel under :class:`_SdpaReadInBackward`: its
    inputs, kept for the gradient hook on its output, which computes the attention's backward
    once (:func:`sdpa_backward`) and leaves ``dq, dk, dv`` here for the Function to return.

    Internal; shared by the Function and the capture's tensor hook on the call's output."""

    __slots__ = ("query", "key", "value", "attn_mask", "is_causal", "scale", "enable_gqa", "stash")

    def __init__(self, query, key, value, attn_mask, is_causal, scale, enable_gqa):
        self.query, self.key, self.value = query.detach(), key.detach(), value.detach()
        self.attn_mask, self.is_causal, self.scale, self.enable_gqa = attn_mask, is_causal, scale, enable_gqa
        self.stash: tuple | None = None

    def read(self, d_out: torch.Tensor, *, fusion: tuple[str, bool] | None = None, keep: bool = False):
        """The backward pass for ``d_out`` (the gradient of the call's output, as it arrives):
        the gradients are left for the Function; returns what the streams read (see
        :func:`sdpa_backward`: the fused ``[B, L, S]`` or ``(A, dA)``)."""
        if self.query is None:
            raise RuntimeError("FusedCall.read: this call's gradient was already read")
        dq, dk, dv, extra = sdpa_backward(self.query, self.key, self.value, d_out, attn_mask=self.attn_mask,
                                          is_causal=self.is_causal, scale=self.scale, enable_gqa=self.enable_gqa,
                                          fusion=fusion, keep=keep)
        self.stash = (_identity(d_out), (dq, dk, dv))
        self.query = self.key = self.value = None  # the Function keeps its own saved tensors
        return extra

    def gradients(self, query, key, value, d_out):
        """``(dq, dk, dv)`` for ``d_out``: those the hook computed for this very gradient, else computed now."""
        stash, self.stash = self.stash, None
        if stash is not None and stash[0] == _identity(d_out):
            return stash[1]
        dq, dk, dv, _ = sdpa_backward(query, key, value, d_out, attn_mask=self.attn_mask, is_causal=self.is_causal,
                                      scale=self.scale, enable_gqa=self.enable_gqa)
        return dq, dk, dv


def _identity(t: torch.Tensor) -> tuple:
    """What tells one gradient tensor from another (storage, layout and version), with no sync."""
    return (t.data_ptr(), tuple(t.shape), t.stride(), t._version)


class _SdpaReadInBackward(torch.autograd.Function):
    """``F.scaled_dot_product_attention`` as the model called it (the fused kernel) whose backward
    pass is :func:`sdpa_backward`: the probabilities that a gradient stream reads and the
    gradients of q, k and v come from one recomputation of ``A`` instead of SDPA's own backward
    beside vitviz's. The attention mask must not require grad (then SDPA itself runs)."""

    @staticmethod
    def forward(ctx, query, key, value, call: FusedCall):  # type: ignore[override]
        ctx.call = call
        ctx.save_for_backward(query, key, value)
        return _SDPA(query, key, value, attn_mask=call.attn_mask, is_causal=call.is_causal, scale=call.scale,
                     enable_gqa=call.enable_gqa)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out):  # type: ignore[override]
        query, key, value = ctx.saved_tensors
        dq, dk, dv = ctx.call.gradients(query, key, value, d_out)
        return dq, dk, dv, None


def _mha_weights_view_base(weights: torch.Tensor) -> torch.Tensor | None:
    """The tensor ``F.multi_head_attention_forward`` multiplied with ``V``, of which the returned
    per-head ``weights`` are a view (``[B*H, Q, K]`` viewed as ``[B, H, Q, K]``); None when
    ``weights`` is not such a view. Gradients are read there: the view is a separate autograd
    node that no gradient of the output reaches."""
    base = weights._base
    if (base is None or base.numel() != weights.numel()
            or base.data_ptr() != weights.data_ptr() or not base.is_contiguous()):
        return None
    return base


# elementwise arithmetic through which softmax outputs are mixed into the weights that multiply
# the values (ConViT's GPSA: a gated sum of two softmaxes, renormalised)
_MIX = {torch.mul, torch.Tensor.mul, torch.Tensor.mul_, torch.Tensor.__mul__, torch.Tensor.__rmul__,
        torch.Tensor.__imul__, torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__,
        torch.Tensor.__radd__, torch.Tensor.__iadd__, torch.sub, torch.Tensor.sub, torch.Tensor.sub_,
        torch.Tensor.__sub__, torch.Tensor.__rsub__, torch.Tensor.__isub__, torch.div, torch.true_divide,
        torch.Tensor.div, torch.Tensor.div_, torch.Tensor.__truediv__, torch.Tensor.__itruediv__,
        torch.Tensor.masked_fill, torch.Tensor.masked_fill_}
_TRANSPOSE = {torch.transpose, torch.Tensor.transpose}
# how far the rows of a mixture of softmax outputs may be from summing to 1 to be probabilities
_ROW_SUM_TOLERANCE = 1e-3


def _is_probabilities(t: torch.Tensor) -> bool:
    """Whether ``t`` holds probabilities over its last dimension (non-negative, rows sum to 1)."""
    t = t.detach()
    rows = t.sum(dim=-1, dtype=torch.float32)
    return bool((t >= 0).all()) and bool(((rows - 1).abs() <= _ROW_SUM_TOLERANCE).all())


class _Carry:
    """What a tensor carries: a softmax output, or a mixture of softmax outputs (``mixed``), maybe
    transposed over its last two dimensions (``transposed``). ``source`` is the tensor that is
    the attention (weak); ``ops`` the recorder's entries of the softmax calls it comes from."""

    __slots__ = ("source", "ops", "mixed", "transposed")

    def __init__(self, source: torch.Tensor, ops: tuple, mixed: bool = False, transposed: bool = False):
        self.source = weakref.ref(source)
        self.ops = ops
        self.mixed = mixed
        self.transposed = transposed


class AttentionOps(TorchFunctionMode):
    """The torch-function mode of one capture. Internal: :func:`vitviz.capture` enters it.

    Args:
        recorder: the capture's internal recorder. ``op(kind, module)`` counts an attention op
            (an SDPA call, a softmax over the last dimension of a 3-D or larger tensor, an
            ``F.multi_head_attention_forward`` call) run by ``module`` (the innermost module of
            the model on the stack, or None) and returns its entry, which every path below
            resolves: recorded, left out on request, or skipped with its reason (``resolve``,
            ``unread``). ``site_for(module, queries, keys)`` gives the site and role of a call
            of ``queries`` over ``keys`` tokens, or None for a call the capture does not read;
            ``needs(role, site)`` says whether the next layer of that role needs its
            probabilities; ``skip(role, ops)`` counts a layer left to the fused kernel;
            ``record(site, role, attn, graph=, ops=)`` records one; ``record_consumed`` one
            read from a softmax multiplied with values; ``wants_gradient(role)`` and
            ``record_from_output(...)`` serve gradient streams from a fused call's output.
        modules: ``id(module) -> module`` of the model, to find the module running a call.
    """

    def __init__(self, recorder: Any, modules: dict[int, torch.nn.Module]):
        super().__init__()
        self.recorder = recorder
        self.modules = modules
        # id(tensor) -> (weak ref of that tensor, the _Carry of the softmax output(s) it carries)
        self.softmax_outputs: dict[int, tuple[weakref.ref, _Carry]] = {}

    # -- which module runs this call -------------------------------------------------------
    def enclosing_module(self) -> torch.nn.Module | None:
        """The innermost module of the model whose code is on the Python stack (its ``forward``
        or a function it called), found from the frames' ``self``."""
        frame = sys._getframe(2)
        modules = self.modules
        while frame is not None:
            code = frame.f_code
            if code.co_argcount and code.co_varnames[0] == "self":
                owner = frame.f_locals.get("self")
                if owner is not None and id(owner) in modules and modules[id(owner)] is owner:
                    return owner
            frame = frame.f_back
        return None

    # -- the mode --------------------------------------------------------------------------
    def __torch_function__(self, func: Callable, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA:
            return self._sdpa(args, kwargs)
        if func in _SOFTMAX:
            out = func(*args, **kwargs)
            self._note_softmax(args, kwargs, out)
            return out
        if func is _MHA:
            return self._mha(args, kwargs)
        if not self.softmax_outputs:
            return func(*args, **kwargs)
        if func in _MATMUL:
            if len(args) >= 2:
                first, second = self._carried(args[0]), self._carried(args[1])
                if first is not None and not first.transposed:
                    self._consume(first)  # A @ v
                elif second is not None and second.transposed:
                    self._consume(second)  # v @ Aᵀ (EfficientViT-MSRA): out[..., i] = Σ_j v[..., j] A[i, j]
            return func(*args, **kwargs)
        if func in _PASS_THROUGH:
            out = func(*args, **kwargs)
            carry = self._carried(args[0]) if args else None
            if carry is not None:
                self._carry(out, carry)
            return out
        if func in _TRANSPOSE:
            out = func(*args, **kwargs)
            carry = self._carried(args[0]) if args else None
            if carry is not None and _swaps_last_two(args, kwargs):
                self._carry(out, _Carry(carry.source(), carry.ops, carry.mixed, not carry.transposed))
            return out
        if func in _MIX:
            out = func(*args, **kwargs)
            self._mix(args, out)
            return out
        if func is torch.einsum:
            operands = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
            for t in operands:
                carry = self._carried(t)
                if carry is not None and not carry.transposed:
                    self._consume(carry)
                    break
            return func(*args, **kwargs)
        return func(*args, **kwargs)

    # -- F.scaled_dot_product_attention ----------------------------------------------------
    def _sdpa(self, args: tuple, kwargs: dict):
        a = _sdpa_arguments(args, kwargs)
        q, k, v = a["query"], a["key"], a["value"]
        rec = self.recorder
        module = self.enclosing_module()
        op = rec.op("sdpa", module)
        if not all(isinstance(t, torch.Tensor) for t in (q, k, v)) or q.dim() < 3 or q.is_nested:
            rec.resolve([op], "skipped", "attention",
                        "F.scaled_dot_product_attention on nested (ragged) tensors is not read"
                        if isinstance(q, torch.Tensor) and q.is_nested else
                        "F.scaled_dot_product_attention called with inputs vitviz does not read")
            return _SDPA(*args, **kwargs)
        found = rec.site_for(module, q.shape[-2], k.shape[-2])
        if found is None:
            rec.unread([op], module)
            return _SDPA(*args, **kwargs)
        site, role = found
        heads = q.shape[-3] if q.dim() >= 4 else 1
        gqa = a["enable_gqa"] and q.dim() >= 4
        if not rec.needs(role, site):
            mask = a["attn_mask"]
            if (q.dim() == 4 and k.dim() == 4 and v.dim() == 4 and a["dropout_p"] == 0 and torch.is_grad_enabled()
                    and (q.requires_grad or k.requires_grad or v.requires_grad)
                    and not (isinstance(mask, torch.Tensor) and mask.requires_grad) and rec.wants_gradient(role)):
                # the fused kernel forward; the backward pass recomputes A once for both the
                # gradients of q, k, v and the stream's dA = dOut·vᵀ (SDPA's own backward does not run)
                call = FusedCall(q, k, v, mask, a["is_causal"], a["scale"], gqa)
                out = _SdpaReadInBackward.apply(q, k, v, call)
                rec.record_from_output(site, role, out, None, call, num_keys=k.shape[-2], num_queries=q.shape[-2],
                                       ops=[op], backward=call)
                return out
            out = _SDPA(*args, **kwargs)  # the model's own fused kernel
            if a["dropout_p"] == 0 and out.requires_grad and rec.wants_gradient(role):
                # gradients without materialising A in the forward pass: out = A·v, so
                # d/dA = dOut·vᵀ, with A recomputed from q and k when the gradient arrives
                rec.record_from_output(site, role, out, _attention_grad(v, gqa, heads),
                                       lambda: sdpa_probabilities(
                                           q.detach(), k.detach(), attn_mask=a["attn_mask"], is_causal=a["is_causal"],
                                           scale=a["scale"], enable_gqa=a["enable_gqa"]),
                                       num_keys=k.shape[-2], num_queries=q.shape[-2], ops=[op])
            else:
                rec.skip(role, ops=[op])
            return out
        rows = rec.rows_only(role, site, q.shape[-2], k.shape[-2]) if q.dim() == 4 else None
        if rows is not None:
            # the fused kernel gives the output; only the rows asked for are computed: [B, H, R, S]
            out = _SDPA(*args, **kwargs)
            select = rec.row_selector(rows, q.device)
            mask = a["attn_mask"]
            if isinstance(mask, torch.Tensor) and mask.dim() >= 2 and mask.shape[-2] != 1:
                mask = mask[..., select, :]  # [..., R, S]
            if a["is_causal"]:  # token i keeps keys j <= i (top-left aligned; SDPA takes no mask with it)
                index = torch.arange(q.shape[-2], device=q.device)[select]  # [R]
                mask = torch.arange(k.shape[-2], device=q.device) <= index[:, None]  # [R, S]
            with torch.no_grad():
                probs = sdpa_probabilities(q[..., select, :], k, attn_mask=mask, scale=a["scale"],
                                           enable_gqa=a["enable_gqa"])  # [B, H, R, S]
            rec.record(site, role, probs, ops=[op], rows=rows, queries=q.shape[-2])
            return out
        fusion = rec.fused_heads(role, q)
        differentiable = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        if fusion is not None and q.dim() == 4 and a["dropout_p"] == 0 and not differentiable:
            # computed in place (out=): no autograd, so only where the model's output needs no graph
            out, fused = sdpa_fused_heads(q, k, v, fusion=fusion, attn_mask=a["attn_mask"],
                                          is_causal=a["is_causal"], scale=a["scale"],
                                          enable_gqa=a["enable_gqa"])
            rec.record(site, role, fused, ops=[op])  # [B, 1, L, S]: streams only, nothing kept
            return out
        buffer = None
        if q.dim() == 4 and q.dtype == torch.float32 and not (
                torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)):
            buffer = rec.buffer(role, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]), q.device)
        probs = sdpa_probabilities(q, k, attn_mask=a["attn_mask"], is_causal=a["is_causal"],
                                   scale=a["scale"], enable_gqa=a["enable_gqa"], out=buffer)  # [..., (Hq,) L, S]
        out = _sdpa_output(probs, v, a["dropout_p"], gqa, heads)
        if probs.dim() > 4:  # e.g. Twins' [B, windows, H, L, S]: the windows folded into the batch
            rec.record(site, role, probs.reshape(-1, *probs.shape[-3:]), graph=probs, ops=[op])
        else:
            rec.record(site, role, probs, ops=[op])
        return out

    # -- explicit softmax multiplied with values -------------------------------------------
    def _note_softmax(self, args: tuple, kwargs: dict, out) -> None:
        if not isinstance(out, torch.Tensor) or out.dim() < 3 or not out.is_floating_point():
            return
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        if not isinstance(dim, int) or dim % out.dim() != out.dim() - 1:
            return  # not normalised over the last dimension: not attention over keys
        op = self.recorder.op("softmax", self.enclosing_module())
        self._carry(out, _Carry(out, (op,) if op is not None else ()))

    def _carried(self, tensor) -> _Carry | None:
        """The softmax output(s) ``tensor`` carries, or None."""
        if not isinstance(tensor, torch.Tensor):
            return None
        entry = self.softmax_outputs.get(id(tensor))
        if entry is None:
            return None
        ref, carry = entry
        if ref() is not tensor or carry.source() is None:
            del self.softmax_outputs[id(tensor)]
            return None
        return carry

    def _carry(self, out, carry: _Carry) -> None:
        """Remember that ``out`` carries ``carry``."""
        if isinstance(out, torch.Tensor):
            self.softmax_outputs[id(out)] = (weakref.ref(out), carry)

    def _mix(self, args: tuple, out) -> None:
        """Elementwise arithmetic on softmax outputs: the result carries their mixture (when it
        has their shape), e.g. GPSA's ``(1 - g)·patch + g·pos``, then divided by its row sums."""
        carries = [c for c in (self._carried(t) for t in args) if c is not None]
        if not carries or not isinstance(out, torch.Tensor) or any(c.transposed for c in carries):
            return
        shape = carries[0].source().shape
        if out.shape[-2:] != shape[-2:] or out.dim() != len(shape):
            return
        ops = tuple(dict.fromkeys(op for c in carries for op in c.ops))
        self._carry(out, _Carry(out, ops, mixed=True))

    def _consume(self, carry: _Carry) -> None:
        """``carry``'s tensor is multiplied with values: its source is attention."""
        source = carry.source()
        if source is None:
            return
        # forget every tensor carrying these softmax outputs: they are read once
        ops = {id(op) for op in carry.ops}
        for key in [key for key, (_, c) in self.softmax_outputs.items()
                    if c is carry or c.source() is None or c.source() is source or ops & {id(op) for op in c.ops}]:
            del self.softmax_outputs[key]
        rec = self.recorder
        module = self.enclosing_module()
        found = rec.site_for(module, source.shape[-2], source.shape[-1])
        if found is None:
            rec.unread(carry.ops, module)
        elif carry.mixed and not _is_probabilities(source):
            rec.resolve(carry.ops, "skipped", "mixed attention",
                        "its softmax outputs are combined into weights whose rows do not sum to 1 before "
                        "they multiply the values, so they are not attention probabilities")
        else:
            rec.record_consumed(*found, source, carry.ops)

    # -- F.multi_head_attention_forward ----------------------------------------------------
    def _mha(self, args: tuple, kwargs: dict):
        bound = _MHA_SIGNATURE.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        need_weights, average = bool(a["need_weights"]), bool(a["average_attn_weights"])
        rec = self.recorder
        module = self.enclosing_module()
        op = rec.op("mha", module)
        found = rec.site_for(module, a["query"].shape[0], a["key"].shape[0], same_tokens=a["query"] is a["key"])
        if found is None:
            rec.unread([op], module)
        elif not rec.needs(found[1], found[0]) and not rec.wants_gradient(found[1]):
            rec.skip(found[1], ops=[op])
            return _MHA(*args, **kwargs)  # a layer nothing needs: as the caller asked
        a["need_weights"], a["average_attn_weights"] = True, False
        out, weights = _MHA(*bound.args, **bound.kwargs)
        if weights is not None and found is not None:
            graph = _mha_weights_view_base(weights) if weights.requires_grad else None
            per_head = weights.unsqueeze(0) if weights.dim() == 3 else weights  # [B, H, Q, K]
            self.recorder.record(*found, per_head, graph=graph, ops=[op])
        if not need_weights:
            return out, None
        if average and weights is not None:
            return out, weights.mean(dim=-3)  # [B, Q, K], as torch averages the heads
        return out, weights

    def forget(self) -> None:
        """Drop the softmax outputs remembered so far (a new forward pass, or the end)."""
        self.softmax_outputs.clear()


def _swaps_last_two(args: tuple, kwargs: dict) -> bool:
    """Whether a ``transpose(t, dim0, dim1)`` call swaps the last two dimensions of ``t``."""
    t = args[0]
    dims = list(args[1:3]) + [kwargs[k] for k in ("dim0", "dim1") if k in kwargs]
    if len(dims) != 2 or not all(isinstance(d, int) for d in dims):
        return False
    n = t.dim()
    return {d % n for d in dims} == {n - 2, n - 1}
