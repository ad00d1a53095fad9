"""`vitviz.capture`: read attention from a real forward pass, inside a ``with`` block."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from torch import nn

from ..errors import CaptureError
from ..models._vision_model import VisionModel, wrap
from ..types import AttentionMaps, CrossAttentionMaps
from ._registry import AUTO, CROSS, IMAGE, TEXT, Site, discover, named_attention_like


@dataclass
class Pass:
    """What one forward pass of the root module produced."""

    input_hw: Optional[tuple[int, int]] = None
    records: list[tuple[str, Site, torch.Tensor]] = field(default_factory=list)

    def of(self, role: str) -> list[torch.Tensor]:
        return [t for r, _, t in self.records if r == role]


def _input_hw(args: tuple, kwargs: dict) -> Optional[tuple[int, int]]:
    """Height and width of the first image-like tensor ([B, C, H, W]) among a call's inputs."""
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() == 4 and value.is_floating_point():
            return int(value.shape[-2]), int(value.shape[-1])
    return None


def _stack(tensors: list[torch.Tensor], what: str) -> torch.Tensor:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise CaptureError(
            f"{what} layers have different shapes {sorted(shapes)}; capture one model call per "
            "`with vitviz.capture(...)` block, or pass adapters= to select the attention modules"
        )
    return torch.stack(tensors)  # [L, B, H, Q, K]


class Recording:
    """What :func:`capture` read. Filled while the ``with`` block runs.

    Attributes:
        attentions: :class:`AttentionMaps` ``[L, B, H, N, N]`` of the image encoder in the
            last forward pass that ran it, or ``None``.
        cross: :class:`CrossAttentionMaps` ``[L, B, H, T, Ni]`` of the last pass with
            cross-attention, or ``None``.
        text: decoder self-attention ``[L, B, H, T, T]`` of the last pass with it, or ``None``.
        passes: every forward pass of the model, in order.
        sites: the attention modules that were hooked.
    """

    def __init__(self, model: VisionModel, sites: list[Site]):
        self.model = model
        self.sites = sites
        self.passes: list[Pass] = []

    # -- filled by hooks -------------------------------------------------------------------
    def _begin(self, hw: Optional[tuple[int, int]]) -> None:
        self.passes.append(Pass(input_hw=hw))

    def _emit(self, site: Site, attn: torch.Tensor, role: Optional[str] = None) -> None:
        role = role or site.role
        if role == AUTO:
            role = IMAGE if attn.shape[-1] == attn.shape[-2] else CROSS
        if not self.passes:  # a submodule was called directly
            self._begin(None)
        # [B, H, Q, K]; detached float32 copy-free view when already float32
        self.passes[-1].records.append((role, site, attn.detach().float()))

    # -- results ---------------------------------------------------------------------------
    def _last_with(self, role: str) -> Optional[Pass]:
        for p in reversed(self.passes):
            if p.of(role):
                return p
        return None

    @property
    def attentions(self) -> Optional[AttentionMaps]:
        p = self._last_with(IMAGE)
        if p is None:
            return None
        tensor = _stack(p.of(IMAGE), "image self-attention")  # [L, B, H, N, N]
        return AttentionMaps(tensor, self.model.layout_for(p.input_hw, tensor.shape[-1]))

    @property
    def cross(self) -> Optional[CrossAttentionMaps]:
        p = self._last_with(CROSS)
        if p is None:
            return None
        tensor = _stack(p.of(CROSS), "cross-attention")  # [L, B, H, T, Ni]
        return CrossAttentionMaps(tensor, self.model.layout_for(p.input_hw, tensor.shape[-1]))

    @property
    def text(self) -> Optional[torch.Tensor]:
        p = self._last_with(TEXT)
        return None if p is None else _stack(p.of(TEXT), "text self-attention")

    def __repr__(self) -> str:
        counts = [len(p.records) for p in self.passes]
        return f"Recording(sites={len(self.sites)}, passes={len(self.passes)}, records={counts})"


@contextmanager
def capture(model, *, adapters: Optional[list[str]] = None) -> Iterator[Recording]:
    """Capture attention probabilities from every forward pass run inside the block.

    Hooks and implementation switches (timm's ``fused_attn``, transformers' attention
    implementation, torch's MHA fast path) exist only inside the block; on exit, also after
    an exception, every hook is removed and every switch restored.

    Args:
        model: a :class:`VisionModel` or any ``torch.nn.Module`` (wrapped with :func:`wrap`).
        adapters: restrict to these adapter names (see ``vitviz.hooks.list_adapters()``).

    Returns:
        A :class:`Recording` (``rec.attentions``, ``rec.cross``).

    Raises:
        CaptureError: no attention module was found, or a forward pass ran and no attention
            was recorded.

    Example:
        >>> with vitviz.capture(m) as rec:
        ...     logits = m(x)
        >>> rec.attentions.tensor.shape  # [L, B, H, N, N]
        torch.Size([12, 1, 12, 197, 197])
    """
    vm = model if isinstance(model, VisionModel) else wrap(model)
    root: nn.Module = vm.module
    sites = discover(root, adapters)
    if not sites:
        seen = named_attention_like(root)
        raise CaptureError(
            f"no attention module that vitviz can read was found in {vm.name}"
            + (f" (attention-like modules: {', '.join(seen)})" if seen else "")
            + "; supported: timm ViTs, transformers models, torch.nn.MultiheadAttention, "
            "pytorch_pretrained_vit, and modules returning (output, attention) or using nn.Softmax"
        )
    rec = Recording(vm, sites)
    with ExitStack() as stack:
        def on_root(_module, args, kwargs):
            rec._begin(_input_hw(args, kwargs))

        handle = root.register_forward_pre_hook(on_root, with_kwargs=True)
        stack.callback(handle.remove)
        by_adapter: dict[int, list[Site]] = {}
        for s in sites:
            by_adapter.setdefault(id(s.adapter), []).append(s)
        for group in by_adapter.values():
            group[0].adapter.attach(group, rec._emit, stack)
        yield rec
    if rec.passes and not any(p.records for p in rec.passes):
        names = ", ".join(f"{s.name} ({s.adapter.name})" for s in sites[:6])
        raise CaptureError(
            f"the forward pass ran but none of the {len(sites)} hooked attention modules "
            f"reported attention ({names}); the model may use a fused attention path that no "
            "adapter could switch off: report it, or call vitviz.wrap with a model whose attention "
            "module returns (output, attention)"
        )
