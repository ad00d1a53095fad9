"""``torch.nn.MultiheadAttention``, wherever it sits (nn.Transformer* layers, hand-written models).

Three things hide the attention probabilities of a torch MHA, and capture undoes each of them
for the duration of the ``with`` block only:

- ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` call their attention with
  ``need_weights=False``, and ``MultiheadAttention`` averages the heads unless
  ``average_attn_weights=False``. A forward pre-hook binds the call's arguments to the
  signature of ``forward`` (positional and keyword calls alike) and forces
  ``need_weights=True, average_attn_weights=False``. A forward hook reads the per-head
  weights ``output[1]`` (``[B, H, Q, K]`` whatever ``batch_first`` is) and hands the caller
  exactly what it asked for: ``(out, None)``, ``(out, head-averaged weights)`` or
  ``(out, per-head weights)``, so the module's outputs are unchanged by capture.
- In eval mode without grad, ``nn.TransformerEncoderLayer`` runs the fused kernel
  ``torch._transformer_encoder_layer_fwd``, which never calls ``MultiheadAttention.forward``
  (torch 2.14 also skips it when a hook sits on the layer, older versions do not), and
  ``nn.TransformerEncoder`` turns a batch with a key padding mask into a nested tensor before
  any layer runs, hooks or not. All of these are behind the process-wide switch
  ``torch.backends.mha.get_fastpath_enabled()``, which is turned off inside the block and
  restored to its previous value on exit.

Gradients (``capture(..., grad=True)``): the per-head weights that ``MultiheadAttention``
returns are not the tensor its output is computed from. ``F.multi_head_attention_forward``
multiplies ``V`` with the ``[B*H, Q, K]`` softmax (after dropout) and returns a *view*
``[B, H, Q, K]`` of it, which is a separate autograd node that no gradient of the output
ever reaches. The gradient hook therefore goes on the view's base (``weights._base``), the
tensor of the graph, whose gradient reshaped to ``[B, H, Q, K]`` is the gradient with
respect to the returned probabilities; the outputs stay bit-identical (no recomputation).

Roles: inside ``nn.TransformerDecoderLayer``, ``self_attn`` is the text self-attention (TEXT)
and ``multihead_attn`` the cross-attention over the encoder tokens (CROSS); inside
``nn.TransformerEncoderLayer`` it is IMAGE. A standalone MHA is decided per call: IMAGE when
``query is key`` (self-attention), CROSS otherwise.
"""

from __future__ import annotations

import inspect
from contextlib import ExitStack
from typing import Optional

import torch
from torch import nn

from ..errors import CaptureError
from ._registry import AUTO, CROSS, IMAGE, TEXT, Adapter, Emit, Site, register_adapter

_DECODER_ROLES = {"self_attn": TEXT, "multihead_attn": CROSS}


def _role_of(root: nn.Module, name: str) -> str:
    """The role of the MHA called ``name`` in ``root``, from its parent layer (AUTO if standalone)."""
    if "." in name:
        parent_name, leaf = name.rsplit(".", 1)
        parent = root.get_submodule(parent_name)
    else:
        parent, leaf = (root if name else None), name
    if isinstance(parent, nn.TransformerDecoderLayer) and leaf in _DECODER_ROLES:
        return _DECODER_ROLES[leaf]
    if isinstance(parent, nn.TransformerEncoderLayer) and leaf == "self_attn":
        return IMAGE
    return AUTO


def _forward_signature(module: nn.Module) -> inspect.Signature:
    """Signature of the module's ``forward`` without ``self``; it must take the two flags."""
    sig = inspect.signature(module.forward)
    missing = [p for p in ("query", "key", "need_weights", "average_attn_weights")
               if p not in sig.parameters]
    if missing:
        raise CaptureError(
            f"{type(module).__name__} subclasses nn.MultiheadAttention but its forward has no "
            f"parameter {', '.join(missing)} (expected the signature of "
            "nn.MultiheadAttention.forward); pass adapters= to vitviz.capture without 'torch_mha'"
        )
    return sig


def _computed_weights(weights: torch.Tensor) -> Optional[torch.Tensor]:
    """The tensor ``MultiheadAttention`` multiplied with ``V``, of which ``weights`` is a view.

    ``F.multi_head_attention_forward`` returns ``attn_output_weights.view(B, H, Q, K)`` (and
    ``.squeeze(0)`` of it for unbatched inputs), where ``attn_output_weights`` ``[B*H, Q, K]``
    is the operand of ``bmm(attn_output_weights, v)``. None when ``weights`` is not such a
    view (then the gradient is read from ``weights`` itself).
    """
    base = weights._base
    if (base is None or base.numel() != weights.numel()
            or base.data_ptr() != weights.data_ptr() or not base.is_contiguous()):
        return None
    return base  # [B*H, Q, K]


@register_adapter
class TorchMHAAdapter(Adapter):
    """Every ``nn.MultiheadAttention`` (and subclass) of the model."""

    name = "torch_mha"
    priority = 30

    def find(self, root, is_free):
        return [Site(n, m, _role_of(root, n), self) for n, m in root.named_modules()
                if isinstance(m, nn.MultiheadAttention) and is_free(n)]

    def attach(self, sites: list[Site], emit: Emit, stack: ExitStack) -> None:
        if not sites:
            return
        # process-wide switch: off inside the block, back to its previous value on exit
        old_fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        stack.callback(torch.backends.mha.set_fastpath_enabled, old_fastpath)
        for site in sites:
            self._hook(site, emit, stack)

    @staticmethod
    def _hook(site: Site, emit: Emit, stack: ExitStack) -> None:
        sig = _forward_signature(site.module)
        # (need_weights, average_attn_weights, role) of the calls in flight, pushed by the
        # pre-hook and popped by the forward hook (a list: safe if a module re-enters itself)
        calls: list[tuple[bool, bool, Optional[str]]] = []

        def pre_hook(_mod, args, kwargs):
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            role = None
            if site.role == AUTO:
                role = IMAGE if a["query"] is a["key"] else CROSS
            calls.append((bool(a["need_weights"]), bool(a["average_attn_weights"]), role))
            a["need_weights"] = True
            a["average_attn_weights"] = False
            return tuple(bound.args), dict(bound.kwargs)

        def hook(_mod, _args, output):
            if not calls:  # the pre-hook did not run for this call (cannot happen in torch)
                return None
            need_weights, average, role = calls.pop()
            out, weights = output[0], output[1]
            if weights is None:
                return None
            # gradients are read on the tensor the output was computed from (see module doc)
            graph = _computed_weights(weights) if weights.requires_grad else None
            extra = {} if graph is None else {"graph": graph}
            if weights.dim() == 3:  # unbatched input: [H, Q, K] -> [1, H, Q, K]
                emit(site, weights.unsqueeze(0), role, **extra)
            else:
                emit(site, weights, role, **extra)  # [B, H, Q, K]
            # give the caller what it asked for
            if not need_weights:
                return out, None
            if average:
                return out, weights.mean(dim=-3)  # [B, Q, K], as torch averages the heads
            return None

        h_pre = site.module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        stack.callback(h_pre.remove)
        h_post = site.module.register_forward_hook(hook)
        stack.callback(h_post.remove)
