"""CLS-row attention maps: what the CLS token attends to, per head."""

from __future__ import annotations

import torch

from ..types import AttentionMaps
from .rollout import token_map


def cls_maps(attn: AttentionMaps, *, layer: int = -1) -> torch.Tensor:
    """Per-head attention of the CLS token over the patches at one layer.

    Models without a CLS token get the mean attention of the patch rows.

    Args:
        attn: :class:`AttentionMaps` ``[L, B, H, N, N]``.
        layer: layer index (negative counts from the end).

    Returns:
        ``[B, H, gh, gw]`` float32, prefix tokens dropped, not rescaled.

    Example:
        >>> vitviz.cls_maps(rec.attentions, layer=-1).shape
        torch.Size([1, 12, 14, 14])
    """
    num_layers = attn.num_layers
    if not -num_layers <= layer < num_layers:
        raise ValueError(f"layer {layer} is out of range for {num_layers} layers")
    return token_map(attn.tensor[layer].float(), attn.layout)  # [B, H, gh, gw]
