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
        out: a tensor of the result's shape and dtype to compute into (no autograd): the
            logits are written there and normalised in place, with no temporary ``[..., L, S]``.

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


# bytes of probabilities computed at once by sdpa_fused_heads: a chunk stays in the CPU's cache
_CHUNK_BYTES = 1 << 20


def sdpa_fused_heads(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, fusion: str,
                     attn_mask=None, is_causal: bool = False, scale: float | None = None,
                     enable_gqa: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA's output and its head-fused probabilities, computed a few heads at a time.

    Each chunk of ``softmax(q kᵀ·scale + mask)`` (about 1 MB) is computed in place in a scratch
    tensor, multiplied with its values into the output, and folded into the head fusion
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
                part = probs.sum(dim=0, dtype=torch.float32)  # [L, S]
                acc.copy_(part) if h0 == 0 else acc.add_(part)
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


class AttentionOps(TorchFunctionMode):
    """The torch-function mode of one capture. Internal: :func:`vitviz.capture` enters it.

    Args:
        recorder: the capture's internal recorder. ``site_for(module, queries, keys)`` gives the
            site and role of a call of ``queries`` over ``keys`` tokens run by ``module`` (the
            innermost module of the model on the stack, or None), or None for a call the capture
            ignores; ``needs(role, site)`` says
            whether the next layer of that role needs its probabilities; ``skip(role)`` counts
            a layer left to the fused kernel; ``record(site, role, attn, graph=)`` records one;
            ``wants_gradient(role)`` and ``record_from_output(...)`` serve gradient streams
            from a fused call's output.
        modules: ``id(module) -> module`` of the model, to find the module running a call.
    """

    def __init__(self, recorder: Any, modules: dict[int, torch.nn.Module]):
        super().__init__()
        self.recorder = recorder
        self.modules = modules
        # id(tensor) -> (weak ref of that tensor, weak ref of the softmax output it carries)
        self.softmax_outputs: dict[int, tuple[weakref.ref, weakref.ref]] = {}

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
        if func in _PASS_THROUGH:
            out = func(*args, **kwargs)
            if args and isinstance(args[0], torch.Tensor) and id(args[0]) in self.softmax_outputs:
                self._carry(args[0], out)
            return out
        if func in _MATMUL:
            if self.softmax_outputs and args and isinstance(args[0], torch.Tensor):
                self._consume(args[0])
            return func(*args, **kwargs)
        if func is torch.einsum:
            if self.softmax_outputs:
                operands = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
                for t in operands:
                    if isinstance(t, torch.Tensor) and id(t) in self.softmax_outputs:
                        self._consume(t)
                        break
            return func(*args, **kwargs)
        if func is _MHA:
            return self._mha(args, kwargs)
        return func(*args, **kwargs)

    # -- F.scaled_dot_product_attention ----------------------------------------------------
    def _sdpa(self, args: tuple, kwargs: dict):
        a = _sdpa_arguments(args, kwargs)
        q, k, v = a["query"], a["key"], a["value"]
        if (not all(isinstance(t, torch.Tensor) for t in (q, k, v)) or q.dim() not in (3, 4)
                or q.is_nested):
            return _SDPA(*args, **kwargs)
        rec = self.recorder
        found = rec.site_for(self.enclosing_module(), q.shape[-2], k.shape[-2])
        if found is None:
            return _SDPA(*args, **kwargs)
        site, role = found
        if not rec.needs(role, site):
            out = _SDPA(*args, **kwargs)  # the model's own fused kernel
            if a["dropout_p"] == 0 and out.requires_grad and rec.wants_gradient(role):
                # gradients without materialising A in the forward pass: out = A·v, so
                # d/dA = dOut·vᵀ, with A recomputed from q and k when the gradient arrives
                heads = q.shape[-3] if q.dim() == 4 else 1
                rec.record_from_output(site, role, out, _attention_grad(v, a["enable_gqa"] and q.dim() == 4, heads),
                                       lambda: sdpa_probabilities(
                                           q.detach(), k.detach(), attn_mask=a["attn_mask"], is_causal=a["is_causal"],
                                           scale=a["scale"], enable_gqa=a["enable_gqa"]),
                                       num_keys=k.shape[-2])
            else:
                rec.skip(role)
            return out
        fusion = rec.fused_heads(role, q)
        if fusion is not None and q.dim() == 4 and a["dropout_p"] == 0:
            out, fused = sdpa_fused_heads(q, k, v, fusion=fusion, attn_mask=a["attn_mask"],
                                          is_causal=a["is_causal"], scale=a["scale"],
                                          enable_gqa=a["enable_gqa"])
            rec.record(site, role, fused)  # [B, 1, L, S]: streams only, nothing kept
            return out
        buffer = None
        if q.dim() == 4 and q.dtype == torch.float32 and not (
                torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)):
            buffer = rec.buffer(role, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]), q.device)
        probs = sdpa_probabilities(q, k, attn_mask=a["attn_mask"], is_causal=a["is_causal"],
                                   scale=a["scale"], enable_gqa=a["enable_gqa"], out=buffer)  # [B, (Hq,) L, S]
        heads = q.shape[-3] if q.dim() == 4 else 1
        out = _sdpa_output(probs, v, a["dropout_p"], a["enable_gqa"] and q.dim() == 4, heads)
        rec.record(site, role, probs)
        return out

    # -- explicit softmax multiplied with values -------------------------------------------
    def _note_softmax(self, args: tuple, kwargs: dict, out) -> None:
        if not isinstance(out, torch.Tensor) or out.dim() not in (3, 4) or not out.is_floating_point():
            return
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        if not isinstance(dim, int) or dim % out.dim() != out.dim() - 1:
            return  # not normalised over the last dimension: not attention over keys
        self._carry(out, out, source=out)

    def _carry(self, tensor: torch.Tensor, out, source: torch.Tensor | None = None) -> None:
        """Remember that ``out`` carries the softmax output that ``tensor`` carries (or ``source``)."""
        if not isinstance(out, torch.Tensor):
            return
        if source is None:
            ref, src = self.softmax_outputs[id(tensor)]
            if ref() is not tensor or src() is None:
                return
            source = src()
        self.softmax_outputs[id(out)] = (weakref.ref(out), weakref.ref(source))

    def _consume(self, operand: torch.Tensor) -> None:
        """``operand`` is multiplied with values: if it carries a softmax output, that is attention."""
        entry = self.softmax_outputs.get(id(operand))
        if entry is None:
            return
        ref, src = entry
        source = src()
        if ref() is not operand or source is None:
            self.softmax_outputs.pop(id(operand), None)
            return
        # forget every tensor carrying this softmax output: it is recorded once
        for key in [k for k, (_, s) in self.softmax_outputs.items() if s() is source or s() is None]:
            del self.softmax_outputs[key]
        found = self.recorder.site_for(self.enclosing_module(), source.shape[-2], source.shape[-1])
        if found is not None:
            self.recorder.record(*found, source)

    # -- F.multi_head_attention_forward ----------------------------------------------------
    def _mha(self, args: tuple, kwargs: dict):
        bound = _MHA_SIGNATURE.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        need_weights, average = bool(a["need_weights"]), bool(a["average_attn_weights"])
        rec = self.recorder
        found = rec.site_for(self.enclosing_module(), a["query"].shape[0], a["key"].shape[0],
                             same_tokens=a["query"] is a["key"])
        if found is not None and not rec.needs(found[1], found[0]) and not rec.wants_gradient(found[1]):
            rec.skip(found[1])
            return _MHA(*args, **kwargs)  # a layer nothing needs: as the caller asked
        a["need_weights"], a["average_attn_weights"] = True, False
        out, weights = _MHA(*bound.args, **bound.kwargs)
        if weights is not None and found is not None:
            graph = _mha_weights_view_base(weights) if weights.requires_grad else None
            per_head = weights.unsqueeze(0) if weights.dim() == 3 else weights  # [B, H, Q, K]
            self.recorder.record(*found, per_head, graph=graph)
        if not need_weights:
            return out, None
        if average and weights is not None:
            return out, weights.mean(dim=-3)  # [B, Q, K], as torch averages the heads
        return out, weights

    def forget(self) -> None:
        """Drop the softmax outputs remembered so far (a new forward pass, or the end)."""
        self.softmax_outputs.clear()
