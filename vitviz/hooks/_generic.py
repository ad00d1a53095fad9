"""Attention written by hand: pytorch_pretrained_vit, ``nn.Softmax`` modules, ``(out, attn)`` returns.

Three adapters, tried in this order after the library-specific ones:

- ``pytorch_pretrained_vit`` (priority 40): ``MultiHeadedSelfAttention`` of the
  pytorch_pretrained_vit package computes ``scores = self.drop(F.softmax(q k^T / sqrt(d)))``;
  the *input* of ``drop`` is the post-softmax attention ``[B, H, N, N]``, the tensor that the
  forward pass goes on to multiply with ``v`` (``scores``, which it also keeps, is the same
  tensor after dropout: equal in eval mode).
- ``softmax_module`` (priority 50): an ``nn.Softmax`` over the last dim inside an attention
  module, as in lucidrains' vit-pytorch (``self.attend = nn.Softmax(dim=-1)``). The
  softmax's output is the attention, ``[B, H, Q, K]`` (``[B, Q, K]`` gets a head dim).
- ``tuple_output`` (priority 60): a hand-written module whose class name contains
  "attention" or "attn" and whose forward returns ``(output, attention)``, as in many course
  and tutorial ViTs. Only the deepest such modules are hooked, and a call is recorded only when
  its second output is a 3-D or 4-D float tensor of probabilities (non-negative, rows summing
  to 1): a module returning ``(output, cached keys)`` is not mistaken for attention.

Roles: pytorch_pretrained_vit is IMAGE; the other two are AUTO (square: IMAGE, else CROSS).
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import nn

from ._registry import AUTO, IMAGE, Adapter, Emit, Site, register_adapter

_LIBRARY_PREFIXES = ("torch.", "timm.", "transformers.")


def _add_head_dim(attn: torch.Tensor) -> torch.Tensor:
    """``[B, Q, K]`` -> ``[B, 1, Q, K]``; ``[B, H, Q, K]`` unchanged."""
    return attn.unsqueeze(1) if attn.dim() == 3 else attn


# --------------------------------------------------------------------------------------------
# pytorch_pretrained_vit
# --------------------------------------------------------------------------------------------

def _is_ppv_attention(m: nn.Module) -> bool:
    cls = type(m)
    return (cls.__module__.split(".")[0] == "pytorch_pretrained_vit"
            and cls.__name__ == "MultiHeadedSelfAttention"
            and isinstance(getattr(m, "drop", None), nn.Module))


@register_adapter
class PytorchPretrainedViTAdapter(Adapter):
    """``pytorch_pretrained_vit.transformer.MultiHeadedSelfAttention``: the input of ``drop``."""

    name = "pytorch_pretrained_vit"
    priority = 40

    def find(self, root, is_free):
        return [Site(n, m, IMAGE, self) for n, m in root.named_modules()
                if _is_ppv_attention(m) and is_free(n)]

    def attach(self, sites: list[Site], emit: Emit, stack: ExitStack) -> None:
        for site in sites:
            def pre_hook(_mod, args, _site=site):
                emit(_site, args[0], None)  # [B, H, N, N] post-softmax, pre-dropout

            handle = site.module.drop.register_forward_pre_hook(pre_hook)
            stack.callback(handle.remove)


# --------------------------------------------------------------------------------------------
# nn.Softmax inside an attention module
# --------------------------------------------------------------------------------------------

def _looks_like_attention_name(text: str) -> bool:
    text = text.lower()
    return "attn" in text or "attention" in text or "attend" in text


def _softmax_sites(root: nn.Module) -> list[tuple[str, nn.Softmax]]:
    """``nn.Softmax`` modules whose parent class or whose own dotted name says attention."""
    out = []
    for parent_name, parent in root.named_modules():
        parent_is_attention = _looks_like_attention_name(type(parent).__name__)
        for leaf, child in parent.named_children():
            if not isinstance(child, nn.Softmax):
                continue
            name = f"{parent_name}.{leaf}" if parent_name else leaf
            if parent_is_attention or _looks_like_attention_name(name):
                out.append((name, child))
    return out


@register_adapter
class SoftmaxModuleAdapter(Adapter):
    """``nn.Softmax(dim=-1)`` modules of attention modules: their output is the attention."""

    name = "softmax_module"
    priority = 50

    def find(self, root, is_free):
        seen: set[int] = set()
        sites = []
        for n, m in _softmax_sites(root):
            if id(m) not in seen and is_free(n):  # a shared module is hooked once
                seen.add(id(m))
                sites.append(Site(n, m, AUTO, self))
        return sites

    def attach(self, sites: list[Site], emit: Emit, stack: ExitStack) -> None:
        for site in sites:
            def hook(mod, _args, output, _site=site):
                if not isinstance(output, torch.Tensor) or output.dim() not in (3, 4):
                    return
                if mod.dim is None or mod.dim % output.dim() != output.dim() - 1:
                    return  # not normalised over the keys: not an attention matrix
                emit(_site, _add_head_dim(output), None)  # [B, H, Q, K]

            handle = site.module.register_forward_hook(hook)
            stack.callback(handle.remove)


# --------------------------------------------------------------------------------------------
# modules returning (output, attention)
# --------------------------------------------------------------------------------------------

def _is_tuple_candidate(m: nn.Module) -> bool:
    cls = type(m)
    lowered = cls.__name__.lower()
    if "attention" not in lowered and "attn" not in lowered:
        return False
    module = cls.__module__ + "."
    return not module.startswith(_LIBRARY_PREFIXES)


def _is_probability(attn: torch.Tensor) -> bool:
    """Non-negative with rows summing to 1 (to float tolerance): attention, not a cache."""
    with torch.no_grad():
        a = attn.detach().float()  # [B, (H,) Q, K]
        rows = a.sum(dim=-1)  # [B, (H,) Q]
        return bool((a.min() >= 0) & ((rows - 1).abs().max() <= 1e-3))


@register_adapter
class TupleOutputAdapter(Adapter):
    """Hand-written attention modules whose forward returns ``(output, attention)``."""

    name = "tuple_output"
    priority = 60

    def find(self, root, is_free):
        candidates = [(n, m) for n, m in root.named_modules() if _is_tuple_candidate(m)]
        deepest = []
        for n, m in candidates:
            prefix = n + "." if n else ""
            if not any(o != n and o.startswith(prefix) for o, _ in candidates):
                deepest.append((n, m))
        return [Site(n, m, AUTO, self) for n, m in deepest if is_free(n)]

    def attach(self, sites: list[Site], emit: Emit, stack: ExitStack) -> None:
        for site in sites:
            def hook(_mod, _args, output, _site=site):
                if not isinstance(output, (tuple, list)) or len(output) < 2:
                    return
                attn = output[1]
                if (not isinstance(attn, torch.Tensor) or not attn.is_floating_point()
                        or attn.dim() not in (3, 4) or not _is_probability(attn)):
                    return
                emit(_site, _add_head_dim(attn), None)  # [B, H, Q, K]

            handle = site.module.register_forward_hook(hook)
            stack.callback(handle.remove)
