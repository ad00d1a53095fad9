"""Layer-wise relevance propagation for transformers at the op level: AttnLRP and CP-LRP.

The rules are applied as modified gradients (the "Gradient × Input" form of LRP used by
lxt's efficient mode): every op keeps its forward value and changes only how its gradient is
passed back, so that ``x ⊙ ∂score/∂x`` at the input is the LRP relevance. They are applied
inside a ``TorchFunctionMode`` that sees each torch function the model calls, for one forward
pass; no module or class is patched, the model's parameters are never touched (each parameter
an op receives is handed on detached, so no parameter gradient is built), and after the block
autograd is what it was.

The rules (Achtibat et al. 2024, "AttnLRP: Attention-Aware Layer-Wise Relevance Propagation
for Transformers", ICML; Ali et al. 2022, "XAI for Transformers: Better Explanations through
Conservative Propagation", ICML; Montavon et al. 2019, "Layer-Wise Relevance Propagation: An
Overview"):

- **softmax**: AttnLRP's rule (Achtibat et al., Prop. 3.3 / Eq. 13,
  ``R_i = x_i (R_i^out - s_i Σ_j R_j^out)``). With ``R^out = s ⊙ g`` this is ``x ⊙`` the
  plain gradient of softmax, ``s ⊙ (g - Σ_j s_j g_j)``: the gradient passes unchanged.
- **a product of two activations** (``q·kᵀ``, ``A·v``, elementwise gates, einsum): the uniform
  rule (Achtibat et al., Eq. 7): each of the ``n`` activation operands gets ``1/n`` of the
  relevance, i.e. its gradient divided by ``n``. Inside attention that is ``q`` and ``k``
  ``/4`` and ``v`` ``/2``, so SDPA keeps its fused kernel forward and backward, with scaled
  gradients (the same as writing out ``softmax(q kᵀ)·v`` with the rules on each op).
- **layer norm, RMSNorm, division by an activation, ``rsqrt`` factors, ``F.normalize``**: the
  identity rule for normalisation (Achtibat et al., Eq. 9 and Sec. 3.3.3): the normaliser
  (standard deviation, RMS, norm) is a constant in the backward pass; the centering of layer
  norm is linear and keeps its gradient.
- **elementwise nonlinearities** (GELU, SiLU, sigmoid, tanh, powers ``x**p``, ...): the identity rule
  (Achtibat et al., Eq. 9): ``∂/∂x := f(x)/x``, so ``x·grad_in = f(x)·grad_out``.
- **linear and convolution layers**: the plain gradient (the ε-rule with ε → 0, as lxt's
  efficient mode), or with ``gamma`` the γ-rule (Montavon et al. 2019, Sec. 10.2.3):
  ``R_j = Σ_k a_j (w_jk + γ w_jk⁺) / (Σ_j a_j (w_jk + γ w_jk⁺) + b_k + γ b_k⁺) · R_k``.
- **CP-LRP** (Ali et al. 2022, Sec. 3): the attention probabilities are constants (detached
  where they multiply the values), so no relevance flows through the softmax; otherwise the
  same rules.

Attention the rules must see: ``F.scaled_dot_product_attention``, ``F.multi_head_attention_forward``
(written out here from its definition: projections, heads, SDPA, output projection) and a
softmax over the last dimension whose output is multiplied with values. A softmax output of
that kind that never reaches a product the mode handles, and a forward pass in which no
attention op ran at all (a compiled model, an external kernel), are refused.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..attention import sdpa_probabilities
from ..errors import VitvizError

LRP_METHODS = ("attnlrp", "cp-lrp")
"""The relevance methods computed by :func:`lrp_gradient`."""

_STABILIZER = 1e-6  # the γ-rule's denominator stabiliser (z + ε·sign(z), sign(0) = 1), as zennit's


# ---------------------------------------------------------------------------------------------
# gradient rules as autograd functions (their forward is the op's own value)
# ---------------------------------------------------------------------------------------------

class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times ``factor`` (the uniform rule's share)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g * ctx.factor, None


def _share(t: Any, factor: float) -> Any:
    """``t`` with its gradient scaled by ``factor`` (``t`` itself for 1 or a non-activation)."""
    if factor == 1.0 or not _active(t):
        return t
    return _ScaleGrad.apply(t, factor)


class _IdentityRule(torch.autograd.Function):
    """``y = f(x)``; the gradient ``g · f(x)/x`` (the identity rule for elementwise functions)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fn: Callable, args: tuple, kwargs: dict) -> torch.Tensor:
        y = fn(x, *args, **kwargs)
        ratio = torch.div(y, x)  # f(x)/x; at x = 0 the relevance x·g·ratio is 0: ratio 0 there
        ctx.save_for_backward(torch.nan_to_num_(ratio, nan=0.0, posinf=0.0, neginf=0.0))  # in place: no temporaries
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (ratio,) = ctx.saved_tensors
        return g * ratio, None, None, None


class _LayerNormRule(torch.autograd.Function):
    """``F.layer_norm``; the gradient with the standard deviation held constant (identity rule):
    ``y = (x - mean(x)) / std · w + b`` -> ``dx = (g·w - mean(g·w)) / std``."""

    @staticmethod
    def forward(ctx, x, shape, weight, bias, eps):
        y, _mean, rstd = torch.native_layer_norm(x, shape, weight, bias, eps)
        ctx.dims = tuple(range(x.dim() - len(shape), x.dim()))
        ctx.save_for_backward(rstd, weight)
        return y

    @staticmethod
    def backward(ctx, g):
        rstd, weight = ctx.saved_tensors  # rstd [..., 1, (1)]
        gw = g if weight is None else g * weight
        dx = (gw - gw.mean(dim=ctx.dims, keepdim=True)) * rstd
        return dx.to(g.dtype), None, None, None, None


class _RMSNormRule(torch.autograd.Function):
    """``F.rms_norm``; the gradient with the RMS held constant: ``dx = g·w / rms``."""

    @staticmethod
    def forward(ctx, x, shape, weight, eps):
        y = F.rms_norm(x, shape, weight, eps)
        dims = tuple(range(x.dim() - len(shape), x.dim()))
        e = torch.finfo(x.dtype).eps if eps is None else eps
        rstd = torch.rsqrt(x.float().pow(2).mean(dim=dims, keepdim=True) + e)
        ctx.save_for_backward(rstd, weight)
        return y

    @staticmethod
    def backward(ctx, g):
        rstd, weight = ctx.saved_tensors
        gw = g if weight is None else g * weight
        return (gw * rstd).to(g.dtype), None, None, None


def _stabilize(z: torch.Tensor) -> torch.Tensor:
    """``z + ε·sign(z)`` with ``sign(0) = 1``: a denominator that is never 0."""
    return z + _STABILIZER * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def _gamma_params(weight: torch.Tensor, bias: torch.Tensor | None, gamma: float):
    """``w + γ w⁺`` and ``b + γ b⁺`` (Montavon et al. 2019, the γ-rule)."""
    w = weight + gamma * weight.clamp(min=0)
    b = None if bias is None else bias + gamma * bias.clamp(min=0)
    return w, b


class _GammaRule(torch.autograd.Function):
    """A linear map ``y = f(x; W, b)`` (``F.linear`` / ``F.convNd``) whose gradient follows the
    γ-rule in Gradient × Input form: with the output relevance ``R = y ⊙ g``,
    ``dx = ∂f(x; W + γW⁺, b + γb⁺)/∂x ᵀ · (R / z_γ)`` (so ``x ⊙ dx`` is the γ-rule's relevance)."""

    @staticmethod
    def forward(ctx, x, fn, weight, bias, rest, gamma):
        y = fn(x, weight, bias, *rest)
        ctx.fn, ctx.rest, ctx.gamma = fn, rest, gamma
        ctx.save_for_backward(x, weight, bias, y)
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, bias, y = ctx.saved_tensors
        w, b = _gamma_params(weight, bias, ctx.gamma)
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            z = ctx.fn(xx, w, b, *ctx.rest)  # z_γ
            (dx,) = torch.autograd.grad(z, xx, grad_outputs=g * y / _stabilize(z.detach()))
        return dx, None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# the op-level mode
# ---------------------------------------------------------------------------------------------

def _active(t: Any) -> bool:
    """An activation: a tensor on the input's autograd graph (parameters reach the mode's ops
    detached, so only what depends on the input requires grad)."""
    return isinstance(t, torch.Tensor) and t.requires_grad


def _detach_params(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    def d(a):
        if isinstance(a, torch.nn.Parameter):
            return a.detach()
        if isinstance(a, (list, tuple)) and any(isinstance(b, torch.nn.Parameter) for b in a):
            return type(a)(b.detach() if isinstance(b, torch.nn.Parameter) else b for b in a)
        return a
    return tuple(d(a) for a in args), {k: d(v) for k, v in kwargs.items()}


def _has_param(args: tuple, kwargs: dict) -> bool:
    for a in args:
        if isinstance(a, torch.nn.Parameter):
            return True
        if isinstance(a, (list, tuple)) and any(isinstance(b, torch.nn.Parameter) for b in a):
            return True
    return any(isinstance(v, torch.nn.Parameter) for v in kwargs.values()) if kwargs else False


_SDPA = F.scaled_dot_product_attention
_MHA = F.multi_head_attention_forward
_MHA_SIGNATURE = inspect.signature(_MHA)
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SOFTMAX = {torch.softmax, torch.Tensor.softmax, F.softmax, torch.special.softmax}
_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm}
_RMATMUL = {torch.Tensor.__rmatmul__}
# input + batch1 @ batch2 (a masked q·kᵀ written with baddbmm, GPT-2's Conv1D): the product's operands
_ADD_MATMUL = {torch.baddbmm, torch.Tensor.baddbmm, torch.addmm, torch.Tensor.addmm, torch.addbmm,
               torch.Tensor.addbmm}
_MUL = {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.multiply}
_MUL_INPLACE = {torch.Tensor.mul_, torch.Tensor.__imul__}
_DIV = {torch.div, torch.true_divide, torch.Tensor.div, torch.Tensor.__truediv__, torch.Tensor.true_divide,
        torch.divide}
_DIV_INPLACE = {torch.Tensor.div_, torch.Tensor.__itruediv__}
_RSQRT = {torch.rsqrt, torch.Tensor.rsqrt}
_POW = {torch.pow, torch.Tensor.pow, torch.Tensor.__pow__}
_LAYER_NORM = {F.layer_norm, torch.layer_norm}
_RMS_NORM = {F.rms_norm, torch.rms_norm}
_LINEAR = {F.linear}
_CONV = {F.conv1d, F.conv2d, F.conv3d}
# elementwise nonlinearities that get the identity rule (ReLU's f(x)/x is its gradient already)
_ELEMENTWISE = {F.gelu, F.silu, F.mish, F.elu, F.selu, F.celu, F.softplus, F.hardswish, F.sigmoid, F.tanh,
                torch.sigmoid, torch.Tensor.sigmoid, torch.tanh, torch.Tensor.tanh, torch.selu, torch.celu,
                torch.nn.functional.logsigmoid}
# calls through which a softmax output stays the same probabilities (or a mixture of them)
_CARRY = {F.dropout, torch.dropout, torch.Tensor.to, torch.Tensor.type_as, torch.Tensor.float, torch.Tensor.half,
          torch.Tensor.bfloat16, torch.Tensor.double, torch.Tensor.contiguous, torch.transpose,
          torch.Tensor.transpose, torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.permute,
          torch.permute, torch.Tensor.__getitem__, torch.Tensor.unsqueeze, torch.Tensor.squeeze,
          torch.Tensor.expand, torch.Tensor.flatten, torch.add, torch.Tensor.add, torch.Tensor.__add__,
          torch.Tensor.__radd__, torch.sub, torch.Tensor.sub, torch.Tensor.__sub__, torch.Tensor.__rsub__,
          torch.Tensor.masked_fill, torch.Tensor.__iadd__, torch.Tensor.add_}


class _Softmax:
    """One softmax over the last dimension: whether a product consumed it."""

    __slots__ = ("consumed", "shape")

    def __init__(self, shape: tuple):
        self.consumed = False
        self.shape = shape


class LRPRules(TorchFunctionMode):
    """The torch-function mode that applies AttnLRP's (or CP-LRP's) rules to one forward pass.

    Internal: :func:`lrp_gradient` enters it around the model's forward pass and leaves it
    before the backward pass.

    Args:
        cp: CP-LRP (attention probabilities constant) instead of AttnLRP.
        gamma: the γ of the γ-rule on linear and convolution layers, or None for the plain
            gradient.
        name: the model's name, for the messages.
    """

    def __init__(self, *, cp: bool, gamma: float | None, name: str = "the model"):
        super().__init__()
        self.cp = cp
        self.gamma = gamma
        self.name = name
        self.attention_ops = 0
        self.softmaxes: list[_Softmax] = []
        self.carried: dict[int, tuple[weakref.ref, tuple[_Softmax, ...]]] = {}
        self.normalisers: dict[int, weakref.ref] = {}

    # -- bookkeeping of softmax outputs and normalisers -------------------------------------
    def _carries(self, t: Any) -> tuple[_Softmax, ...]:
        if not self.carried or not isinstance(t, torch.Tensor):
            return ()
        entry = self.carried.get(id(t))
        if entry is None:
            return ()
        if entry[0]() is not t:
            del self.carried[id(t)]
            return ()
        return entry[1]

    def _carry(self, out: Any, sources: tuple[_Softmax, ...]) -> None:
        if sources and isinstance(out, torch.Tensor):
            self.carried[id(out)] = (weakref.ref(out), sources)

    def _is_normaliser(self, t: Any) -> bool:
        if not self.normalisers or not isinstance(t, torch.Tensor):
            return False
        ref = self.normalisers.get(id(t))
        return ref is not None and ref() is t

    # -- the mode ---------------------------------------------------------------------------
    def __torch_function__(self, func: Callable, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _has_param(args, kwargs):
            args, kwargs = _detach_params(args, kwargs)
        if func is _SDPA:
            return self._sdpa(args, kwargs)
        if func is _MHA:
            return self._mha(args, kwargs)
        if func in _SOFTMAX:
            out = func(*args, **kwargs)
            self._note_softmax(args, kwargs, out)
            return out
        if func in _MATMUL or func in _RMATMUL:
            if len(args) >= 2:
                a, b = (args[1], args[0]) if func in _RMATMUL else (args[0], args[1])
                a, b = self._product([a, b])
                return torch.matmul(a, b, **kwargs) if func in _RMATMUL else func(a, b, *args[2:], **kwargs)
            return func(*args, **kwargs)
        if func is torch.einsum:
            return self._einsum(args, kwargs)
        if func in _ADD_MATMUL and len(args) >= 3:
            m1, m2 = self._product([args[1], args[2]])
            return func(args[0], m1, m2, *args[3:], **kwargs)
        if func in _MUL:
            if len(args) >= 2 and _active(args[0]) and _active(args[1]):
                a, b = args[0], args[1]
                sources = self._carries(a) + self._carries(b)
                if self._is_normaliser(a) or self._is_normaliser(b):  # x · rsqrt(var): identity rule
                    a = a.detach() if self._is_normaliser(a) else a
                    b = b.detach() if self._is_normaliser(b) else b
                    out = func(a, b, *args[2:], **kwargs)
                else:
                    out = func(_share(a, 0.5), _share(b, 0.5), *args[2:], **kwargs)
                self._carry(out, sources)
                return out
            out = func(*args, **kwargs)
            self._carry(out, sum((self._carries(t) for t in args[:2]), ()))
            return out
        if func in _MUL_INPLACE and len(args) >= 2 and _active(args[0]) and _active(args[1]):
            raise VitvizError(f"{self.name}: an in-place product of two activations (Tensor.mul_) has no "
                              f"LRP rule here; use method='chefer', or write the product out of place")
        if func in _DIV or func in _DIV_INPLACE:
            if len(args) >= 2 and _active(args[1]):  # x / norm(x): the normaliser is a constant
                args = (args[0], args[1].detach(), *args[2:])
            out = func(*args, **kwargs)
            self._carry(out, self._carries(args[0]))
            return out
        if func in _RSQRT:
            out = func(*args, **kwargs)
            if _active(out):
                self.normalisers[id(out)] = weakref.ref(out)
            return out
        if func in _POW and len(args) >= 2 and _active(args[0]) and isinstance(args[1], (int, float)):
            if args[1] < 0:  # x · var^(-1/2): a normaliser, constant where it multiplies
                out = func(*args, **kwargs)
                self.normalisers[id(out)] = weakref.ref(out)
                return out
            # x³ in a written-out GELU (GPT-2's gelu_new): an elementwise nonlinearity, identity rule
            return _IdentityRule.apply(args[0], func, tuple(args[1:]), kwargs)
        if func is F.normalize:
            return self._normalize(args, kwargs)
        if func in _LAYER_NORM:
            return self._layer_norm(func, args, kwargs)
        if func in _RMS_NORM:
            return self._rms_norm(args, kwargs)
        if func in _ELEMENTWISE:
            if args and _active(args[0]):
                # computed out of place (inplace=True, e.g. nn.SiLU(inplace=True), would overwrite the
                # input the rule divides by); the caller uses the returned tensor
                rest = tuple(False if isinstance(v, bool) else v for v in args[1:])
                kw = {k: v for k, v in kwargs.items() if k != "inplace"}
                return _IdentityRule.apply(args[0], func, rest, kw)
            return func(*args, **kwargs)
        if func in _LINEAR:
            a = dict(zip(("input", "weight", "bias"), args))
            a.update(kwargs)
            return self._linear(a["input"], a["weight"], a.get("bias"))
        if func in _CONV:
            return self._conv(func, args, kwargs)
        if self.carried and func in _CARRY:
            out = func(*args, **kwargs)
            self._carry(out, sum((self._carries(t) for t in args[:2]), ()))
            return out
        return func(*args, **kwargs)

    # -- softmax and products ---------------------------------------------------------------
    def _note_softmax(self, args: tuple, kwargs: dict, out: Any) -> None:
        if not isinstance(out, torch.Tensor) or out.dim() < 3 or not out.is_floating_point():
            return
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        if not isinstance(dim, int) or dim % out.dim() != out.dim() - 1:
            return  # not normalised over the last dimension: not attention over keys
        record = _Softmax(tuple(out.shape))
        self.softmaxes.append(record)
        self._carry(out, (record,))

    def _product(self, operands: list) -> list:
        """The operands of a product with the rules applied: CP-LRP detaches attention
        probabilities; otherwise each of ``n`` activation operands gets ``1/n`` of the gradient."""
        carried = [self._carries(t) for t in operands]
        if any(carried):
            self.attention_ops += 1
            for sources in carried:
                for s in sources:
                    s.consumed = True
            for key in [k for k, (_, src) in self.carried.items() if any(s.consumed for s in src)]:
                del self.carried[key]  # read once
            if self.cp:
                operands = [t.detach() if c and isinstance(t, torch.Tensor) else t
                            for t, c in zip(operands, carried)]
        n = sum(_active(t) for t in operands)
        if n >= 2:
            operands = [_share(t, 1.0 / n) for t in operands]
        return operands

    def _einsum(self, args: tuple, kwargs: dict):
        listed = len(args) == 2 and isinstance(args[1], (list, tuple))
        operands = list(args[1] if listed else args[1:])
        operands = self._product(operands)
        return torch.einsum(args[0], operands, **kwargs) if listed else torch.einsum(args[0], *operands, **kwargs)

    # -- attention --------------------------------------------------------------------------
    def attend(self, q, k, v, *, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
               scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
        """``F.scaled_dot_product_attention`` with the rules: AttnLRP scales the gradients of
        ``q``, ``k`` (uniform rule at ``q·kᵀ`` and at ``A·v``) and ``v`` (at ``A·v``), and the
        fused kernel runs forward and backward (softmax's rule is its plain gradient); CP-LRP
        gives ``q`` and ``k`` no gradient (``A`` constant)."""
        self.attention_ops += 1
        if self.cp:
            q, k = q.detach(), k.detach()
        else:
            both = _active(q) and _active(k)
            scores = _active(q) or _active(k)
            half_av = 0.5 if (scores and _active(v)) else 1.0  # A·v: A and v share the relevance
            q = _share(q, half_av * (0.5 if both else 1.0))
            k = _share(k, half_av * (0.5 if both else 1.0))
            v = _share(v, half_av)
        kw: dict[str, Any] = {"attn_mask": attn_mask, "dropout_p": dropout_p, "is_causal": is_causal, "scale": scale}
        if enable_gqa:
            kw["enable_gqa"] = True
        return _SDPA(q, k, v, **kw)

    def _sdpa(self, args: tuple, kwargs: dict):
        a = dict(zip(_SDPA_ARGS, args))
        a.update(kwargs)
        q, k, v = a.pop("query"), a.pop("key"), a.pop("value")
        return self.attend(q, k, v, **a)

    def _mha(self, args: tuple, kwargs: dict):
        """``F.multi_head_attention_forward`` written out from its definition, with the rules."""
        bound = _MHA_SIGNATURE.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        unsupported = [n for n in ("bias_k", "bias_v", "static_k", "static_v") if a[n] is not None]
        if a["add_zero_attn"]:
            unsupported.append("add_zero_attn")
        if unsupported:
            raise VitvizError(f"{self.name}: nn.MultiheadAttention with {', '.join(unsupported)} is not supported "
                              "by the LRP methods; use method='chefer'")
        query, key, value = a["query"], a["key"], a["value"]
        batched = query.dim() == 3
        if not batched:  # [L, E] -> [L, 1, E]
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        length, batch, embed = query.shape
        source = key.shape[0]
        heads = int(a["num_heads"])
        d = embed // heads
        if a["use_separate_proj_weight"]:
            wq, wk, wv = a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"]
        else:
            wq, wk, wv = a["in_proj_weight"].chunk(3)
        bias = a["in_proj_bias"]
        bq, bk, bv = (None, None, None) if bias is None else bias.chunk(3)
        q = self._linear(query, wq, bq)  # [L, B, E]
        k = self._linear(key, wk, bk)  # [S, B, E]
        v = self._linear(value, wv, bv)

        def heads_first(t, n):  # [n, B, E] -> [B, H, n, d]
            return t.reshape(n, batch, heads, d).permute(1, 2, 0, 3)

        q, k, v = heads_first(q, length), heads_first(k, source), heads_first(v, source)
        mask = _mha_mask(a["attn_mask"], a["key_padding_mask"], batch, heads, length, source, q.dtype)
        is_causal = bool(a["is_causal"]) and mask is None
        dropout = float(a["dropout_p"]) if a["training"] else 0.0
        out = self.attend(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal)  # [B, H, L, d]
        out = out.permute(2, 0, 1, 3).reshape(length, batch, embed)
        out = self._linear(out, a["out_proj_weight"], a["out_proj_bias"])  # [L, B, E]
        weights = None
        if a["need_weights"]:  # returned as the caller asked; not part of the explained graph
            with torch.no_grad():
                weights = sdpa_probabilities(q, k, attn_mask=mask, is_causal=is_causal)  # [B, H, L, S]
                if a["average_attn_weights"]:
                    weights = weights.mean(dim=1)
        if not batched:
            out = out.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        return out, weights

    # -- normalisation, nonlinearities, linear maps -----------------------------------------
    def _layer_norm(self, func, args: tuple, kwargs: dict):
        names = ("input", "normalized_shape", "weight", "bias", "eps")
        a = dict(zip(names, args))
        a.update(kwargs)
        x = a["input"]
        if not _active(x):
            return func(*args, **kwargs)
        shape = a["normalized_shape"]
        shape = [shape] if isinstance(shape, int) else list(shape)
        return _LayerNormRule.apply(x, shape, a.get("weight"), a.get("bias"), float(a.get("eps", 1e-5)))

    def _rms_norm(self, args: tuple, kwargs: dict):
        a = dict(zip(("input", "normalized_shape", "weight", "eps"), args))
        a.update(kwargs)
        x = a["input"]
        if not _active(x):
            return F.rms_norm(*args, **kwargs)
        shape = a["normalized_shape"]
        shape = [shape] if isinstance(shape, int) else list(shape)
        return _RMSNormRule.apply(x, shape, a.get("weight"), a.get("eps"))

    def _normalize(self, args: tuple, kwargs: dict):
        a = dict(zip(("input", "p", "dim", "eps"), args))
        a.update(kwargs)
        x = a["input"]
        if not _active(x) or a.get("out") is not None:
            return F.normalize(*args, **kwargs)
        p, dim, eps = a.get("p", 2.0), a.get("dim", 1), a.get("eps", 1e-12)
        norm = torch.linalg.vector_norm(x.detach(), ord=p, dim=dim, keepdim=True).clamp_min(eps)
        return x / norm  # the norm a constant: identity rule for normalisation

    def _linear(self, x, weight, bias=None):
        if _active(weight):  # a product of two activations
            x, weight = self._product([x, weight])
            return F.linear(x, weight, bias)
        if self.gamma is not None and _active(x):
            return _GammaRule.apply(x, F.linear, weight, bias, (), float(self.gamma))
        return F.linear(x, weight, bias)

    def _conv(self, func, args: tuple, kwargs: dict):
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        a = dict(zip(names, args))
        a.update(kwargs)
        x, weight = a.get("input"), a.get("weight")
        if self.gamma is None or not _active(x) or _active(weight):
            return func(*args, **kwargs)
        rest = (a.get("stride", 1), a.get("padding", 0), a.get("dilation", 1), a.get("groups", 1))
        return _GammaRule.apply(x, func, weight, a.get("bias"), rest, float(self.gamma))

    # -- after the pass ---------------------------------------------------------------------
    def check(self) -> None:
        """Refuse a pass in which no attention op got a rule, or a softmax over keys that never
        multiplied values through a product the mode handles."""
        left = [s for s in self.softmaxes if not s.consumed]
        if left:
            raise VitvizError(
                f"{self.name}: {len(left)} softmax output(s) over the last dimension (shape "
                f"{list(left[0].shape)}) did not reach a product the LRP rules handle (matmul, bmm, einsum, "
                "elementwise product), so attention ran without its rule; use method='chefer'")
        if self.attention_ops == 0:
            raise VitvizError(
                f"{self.name}: no attention op ran where the LRP rules could see it (F.scaled_dot_product_"
                "attention, nn.MultiheadAttention, or a softmax multiplied with values); a compiled model or an "
                "external attention kernel hides it: explain the uncompiled model, or use method='chefer'")


def _mha_mask(attn_mask, key_padding_mask, batch: int, heads: int, length: int, source: int,
              dtype: torch.dtype) -> torch.Tensor | None:
    """``nn.MultiheadAttention``'s masks as one float mask ``[B, H, L, S]`` added to the logits
    (its boolean masks mark the positions *not* attended), or None."""
    if attn_mask is None and key_padding_mask is None:
        return None
    mask = torch.zeros(batch, heads, length, source, dtype=dtype, device=(
        attn_mask if attn_mask is not None else key_padding_mask).device)
    if attn_mask is not None:
        m = attn_mask.reshape(-1, length, source)
        m = m if m.shape[0] == 1 else m.reshape(batch, heads, length, source)
        if m.dtype == torch.bool:
            mask = mask.masked_fill(m, float("-inf"))
        else:
            mask = mask + m.to(dtype)
    if key_padding_mask is not None:
        kp = key_padding_mask.reshape(batch, 1, 1, source)
        if kp.dtype == torch.bool:
            mask = mask.masked_fill(kp, float("-inf"))
        else:
            mask = mask + kp.to(dtype)
    return mask


def lrp_gradient(run: Callable[[torch.Tensor], Any], x: torch.Tensor,
                 score: Callable[[Any], torch.Tensor], *, method: str, gamma: float | None = None,
                 name: str = "the model") -> tuple[torch.Tensor, Any]:
    """One forward pass of ``run(x)`` under the rules, one backward pass of ``score(output)``.

    Args:
        run: the forward pass (``model(x)``, or a tower's encoder and a logit).
        x: the input batch.
        score: ``score(output)`` -> a scalar (the sum of the explained per-sample scores).
        method: ``"attnlrp"`` or ``"cp-lrp"``.
        gamma: the γ-rule's γ on linear and convolution layers, or None (plain gradient).
        name: the model's name, for the messages.

    Returns:
        ``(grad, output)``: ``∂score/∂x`` under the rules (``x ⊙ grad`` is the relevance,
        same shape as ``x``) and the model's output (detached).

    Raises:
        VitvizError: an unknown method, a bad ``gamma``, an attention op without a rule, or
            a model construct the rules do not support.
    """
    if method not in LRP_METHODS:
        raise VitvizError(f"unknown LRP method {method!r}; use one of {', '.join(LRP_METHODS)}")
    if gamma is not None and (isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or gamma < 0):
        raise VitvizError(f"gamma must be a number >= 0 (the γ-rule on linear layers) or None, got {gamma!r}")
    rules = LRPRules(cp=method == "cp-lrp", gamma=gamma, name=name)
    xg = x.detach().requires_grad_(True)
    with torch.enable_grad():
        with rules:
            output = run(xg)
            s = score(output)
        rules.check()
        if not s.requires_grad:
            raise VitvizError(f"{name}: the explained score does not depend on the input, so there is no "
                              "relevance to propagate")
        (grad,) = torch.autograd.grad(s, xg)
    return grad, output


def patch_sums(pixels: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Pixel relevance ``[B, H, W]`` summed within each cell of a ``gh x gw`` grid: row ``i``
    belongs to cell ``i·gh // H`` (the patches when ``H`` is a multiple of ``gh``), so the map
    and the pixels have equal sums.

    Shape:
        ``[B, H, W]`` -> ``[B, gh, gw]``
    """
    b, h, w = pixels.shape
    gh, gw = grid
    rows = torch.nn.functional.one_hot(torch.arange(h, device=pixels.device) * gh // h, gh).to(pixels.dtype)  # [H, gh]
    cols = torch.nn.functional.one_hot(torch.arange(w, device=pixels.device) * gw // w, gw).to(pixels.dtype)  # [W, gw]
    return rows.T @ pixels @ cols  # [B, gh, gw]
