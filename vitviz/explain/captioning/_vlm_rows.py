"""The rows of a decoder-only language model's attention that a caption needs, read at the op.

A vision-language model's language model attends from every position to every earlier one
(``[L, B, H, S, S]`` over a sequence of several hundred image tokens and the text). A caption
needs only the rows of the ``T`` positions that chose the generated tokens, at the ``Ni``
image-token keys. :class:`RowsReader` is a ``TorchFunctionMode`` active during the one
teacher-forced forward: inside each attention module of the language model it answers

- ``F.scaled_dot_product_attention``: the model's own fused kernel computes the output, and
  the probabilities of the ``T`` rows only are computed from the exact q, k, mask and scale
  the model passed (``softmax(q_rows kᵀ·scale + mask_rows)``, by
  :func:`vitviz.attention.sdpa_probabilities`; ``is_causal`` becomes the explicit
  top-left-aligned mask of those rows), then kept at the image keys: ``[B, H, T, Ni]``;
- an explicit softmax over the last dimension (transformers' ``eager`` path): the model
  computes the full rows anyway; they are sliced right after, so no ``[H, S, S]`` tensor
  outlives its layer.

Memory: ``L·H·T·Ni`` floats are kept, plus one ``[B, H, T, S]`` temporary per layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ...attention import sdpa_probabilities
from ...errors import CaptureError

_SDPA = F.scaled_dot_product_attention
_SOFTMAX = {torch.softmax, torch.Tensor.softmax, F.softmax, torch.special.softmax}
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class RowsReader(TorchFunctionMode):
    """Keep the attention of some query rows over some key columns in every attention layer.

    Args:
        layers: the language model's attention modules, in the order they run (one layer each).
        rows: ``[T]`` query positions to keep (long).
        cols: ``[Ni]`` key positions to keep (long).

    Use as ``reader.attach()``, ``with reader: model(...)``, ``reader.detach()`` (in a
    ``finally``); then :meth:`result`. The rows are read without a graph (``torch.no_grad``).
    """

    def __init__(self, layers: list[nn.Module], rows: torch.Tensor, cols: torch.Tensor, grad: bool = False):
        super().__init__()
        self.layers = list(layers)
        self.index = {id(m): i for i, m in enumerate(self.layers)}
        self.rows = rows
        self.cols = cols
        self.current: int | None = None
        self.kept: list[torch.Tensor | None] = [None] * len(self.layers)
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        # grad=True: per layer, what its attention's gradient is read from (see relevance())
        self.grad = grad
        self.saved: list[dict[str, Any] | None] = [None] * len(self.layers)

    # -- which layer runs ---------------------------------------------------------------------
    def attach(self) -> None:
        """Forward pre- and post-hooks on the layers: which one is running (removed by :meth:`detach`)."""
        for m in self.layers:
            self.handles.append(m.register_forward_pre_hook(self._enter))
            self.handles.append(m.register_forward_hook(self._leave, always_call=True))

    def detach(self) -> None:
        """Remove the hooks of :meth:`attach`."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.current = None

    def _enter(self, module: nn.Module, _args: Any) -> None:
        self.current = self.index[id(module)]

    def _leave(self, _module: nn.Module, _args: Any, _out: Any) -> None:
        self.current = None

    # -- the mode -----------------------------------------------------------------------------
    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if self.current is None:
            return func(*args, **kwargs)
        if func is _SDPA:
            out = func(*args, **kwargs)  # the model's own kernel
            self._keep(self._sdpa_rows(args, kwargs))
            if self.grad and out.requires_grad:
                a = dict(zip(_SDPA_ARGS, args))
                a.update(kwargs)
                self.saved[self.current] = dict(out=out, args=a)  # q, k, v: kept by autograd anyway
            return out
        if func in _SOFTMAX:
            out = func(*args, **kwargs)
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            if isinstance(out, torch.Tensor) and out.dim() == 4 and isinstance(dim, int) and dim % 4 == 3:
                self._keep(out.detach()[:, :, self.rows.to(out.device)])  # [B, H, T, S]
                if self.grad and out.requires_grad:
                    self.saved[self.current] = dict(attn=out)  # kept by autograd anyway (A @ v)
            return out
        return func(*args, **kwargs)

    def _sdpa_rows(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        """``[B, H, T, S]`` probabilities of the kept rows of one SDPA call, by its definition."""
        a = dict(zip(_SDPA_ARGS, args))
        a.update(kwargs)
        q, k = a["query"], a["key"]
        rows = self.rows.to(q.device)
        mask = a.get("attn_mask")
        length, source = q.shape[-2], k.shape[-2]
        if mask is not None and mask.shape[-2] == length:
            mask = mask[..., rows, :]  # [..., T, S]
        if a.get("is_causal", False):
            # top-left aligned, as SDPA defines it: row i keeps keys j <= i
            keep = torch.arange(source, device=q.device)[None, :] <= rows[:, None]  # [T, S]
            mask = keep if mask is None else (mask & keep if mask.dtype == torch.bool
                                              else mask.masked_fill(~keep, float("-inf")))
        with torch.no_grad():
            probs: torch.Tensor = sdpa_probabilities(q.detach()[..., rows, :], k.detach(), attn_mask=mask,
                                                     scale=a.get("scale"),
                                                     enable_gqa=bool(a.get("enable_gqa", False)))  # [B, H, T, S]
        return probs

    def _keep(self, probs: torch.Tensor) -> None:
        i = self.current
        if i is None:
            return
        if self.kept[i] is not None:
            raise CaptureError(
                f"the language model's attention layer {i} ({type(self.layers[i]).__name__}) ran two attention "
                "ops in one call; vitviz reads one softmax or scaled_dot_product_attention per layer")
        self.kept[i] = probs[..., self.cols.to(probs.device)].float()  # [B, H, T, Ni]

    def result(self) -> torch.Tensor:
        """``[L, B, H, T, Ni]`` float32: every layer's kept rows at the kept keys.

        Raises:
            CaptureError: a layer ran without an attention op vitviz can see (an external kernel).
        """
        missing = [i for i, t in enumerate(self.kept) if t is None]
        if missing:
            raise CaptureError(
                f"{len(missing)} of {len(self.kept)} language-model attention layers ran no attention op vitviz "
                f"can see (first: layer {missing[0]}, {type(self.layers[missing[0]]).__name__}); run the model "
                "with torch's own attention: model.set_attn_implementation('sdpa') (or 'eager')")
        return torch.stack([t for t in self.kept if t is not None])  # [L, B, H, T, Ni]

    # -- gradient-weighted relevance ------------------------------------------------------------
    def _grad_weighted(self, i: int, d: torch.Tensor) -> torch.Tensor:
        """``Ā = mean_h[(∇A ⊙ A)⁺]`` ``[B, S, S]`` of layer ``i`` from the gradient ``d`` of what was
        saved: the probabilities themselves (eager), or an SDPA output (``∇A = dOut·vᵀ``, ``A``
        recomputed from the saved q and k)."""
        saved = self.saved[i]
        if saved is None:
            raise CaptureError(f"layer {i} of the language model kept nothing to read its gradient from")
        if "attn" in saved:
            attn: torch.Tensor = saved["attn"].detach()  # [B, H, S, S]
            return (d.float() * attn.float()).clamp(min=0).mean(dim=1)
        a = saved["args"]
        q, k, v = a["query"].detach(), a["key"].detach(), a["value"].detach()
        gqa = bool(a.get("enable_gqa", False))
        attn = sdpa_probabilities(q, k, attn_mask=a.get("attn_mask"), is_causal=bool(a.get("is_causal", False)),
                                  scale=a.get("scale"), enable_gqa=gqa)  # [B, H, S, S]
        if gqa and v.shape[-3] != q.shape[-3]:
            v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
        grad = torch.matmul(d.detach(), v.transpose(-2, -1))  # [B, H, S, S]
        return (grad.float() * attn.float()).clamp(min=0).mean(dim=1)

    def relevance(self, logits: torch.Tensor, targets: list[int]) -> torch.Tensor:
        """Gradient-weighted relevance of the kept key columns for the logit of each kept row.

        Chefer, Gur & Wolf 2021 (ICCV), the self-attention rule (Eq. 5-6) over the language
        model's whole sequence: ``R = I``, per layer ``R += Ā·R`` with ``Ā = mean_h[(∇A ⊙ A)⁺]``
        and ``∇A`` the gradient of the explained logit. Only row ``p`` of the final ``R`` is
        needed, so it is computed as a vector chain from the last layer down,
        ``r = e_pᵀ (I + Ā_L) … (I + Ā_1)`` (``O(L·S²)``; the ``[S, S]`` matrix is never formed).
        One backward pass per token, through the graph of the teacher-forced forward; only the
        gradients with respect to the layers' attention (or their SDPA outputs) are computed.

        Args:
            logits: ``[1, S, V]`` of the teacher-forced forward (with its graph).
            targets: the token chosen at each kept row.

        Returns:
            ``[T, Ni]`` float32: row ``t`` over the kept columns.

        Raises:
            CaptureError: a layer ran without an autograd graph.
        """
        missing = [i for i, s in enumerate(self.saved) if s is None]
        if missing:
            raise CaptureError(
                f"{len(missing)} of {len(self.saved)} language-model attention layers ran without an autograd "
                "graph, so their gradients cannot be read; relevance needs the model's parameters to require "
                "grad (do not freeze them, or pass relevance=False)")
        graph = [s["attn"] if s is not None and "attn" in s else s["out"] for s in self.saved if s is not None]
        rows = []
        for pos, tok in zip(self.rows.tolist(), targets):
            grads = torch.autograd.grad(logits[0, pos, tok], graph, retain_graph=True, allow_unused=True)
            r = torch.zeros(graph[0].shape[-2], dtype=torch.float32, device=logits.device)  # [S]
            r[pos] = 1.0
            for i in reversed(range(len(graph))):
                if grads[i] is not None:
                    r = r + r @ self._grad_weighted(i, grads[i])[0]  # [S]
            rows.append(r[self.cols.to(r.device)])
        return torch.stack(rows) if rows else logits.new_zeros(0, len(self.cols))  # [T, Ni]
