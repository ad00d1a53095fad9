"""Attention-mass masks as in DINO (Caron et al. 2021, "Emerging Properties in
Self-Supervised Vision Transformers", Fig. 3 and ``visualize_attention.py``).

For each map (typically one head's CLS attention over the patches), keep the smallest set
of patches that holds a fraction ``t`` of the map's mass: sort the patches by value, largest
first, and keep a patch while the mass of the strictly larger ones is below ``t``. This is
DINO's ``cumsum(sorted ascending) > 1 - t`` rule.
"""

from __future__ import annotations

import torch


def mass_masks(maps: torch.Tensor, fraction: float = 0.6) -> torch.Tensor:
    """Per-map mask of the smallest set of patches holding ``fraction`` of the mass.

    Args:
        maps: ``[..., gh, gw]`` non-negative maps (e.g. :func:`vitviz.cls_maps` ``[B, H, gh, gw]``);
            each map is normalised by its own sum.
        fraction: ``t`` in ``(0, 1]``; DINO uses 0.6.

    Returns:
        ``[..., gh, gw]`` bool. A map with no mass gives an empty mask. Ties are broken by
        patch order (the first of equal values is kept first).

    Raises:
        ValueError: ``fraction`` outside ``(0, 1]``, maps that are not ``[..., gh, gw]``, or
            negative values.

    Example:
        >>> mass_masks(torch.tensor([[0.5, 0.3], [0.2, 0.0]]), 0.7)
        tensor([[ True,  True],
                [False, False]])
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if maps.dim() < 2:
        raise ValueError(f"maps must be [..., gh, gw], got shape {tuple(maps.shape)}")
    if bool((maps < 0).any()):
        raise ValueError("attention-mass masks need non-negative maps")
    shape = maps.shape
    flat = maps.reshape(-1, shape[-2] * shape[-1]).double()  # [M, P]
    total = flat.sum(-1, keepdim=True)  # [M, 1]
    values, order = flat.sort(dim=-1, descending=True, stable=True)  # [M, P]
    before = values.cumsum(-1) - values  # [M, P] mass of the strictly larger patches
    # a relative tolerance (float32 precision) keeps a set that reaches t exactly, e.g.
    # 0.5 + 0.3 of a map summing to 1 for t = 0.8, minimal despite rounding in the inputs
    keep_sorted = (before < fraction * total * (1 - 1e-6)) & (values > 0)  # [M, P]
    keep = torch.zeros_like(keep_sorted)
    keep.scatter_(-1, order, keep_sorted)
    return keep.reshape(shape)


def mask_mass(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of each map's mass inside its mask.

    Shape:
        maps ``[..., gh, gw]``, masks ``[..., gh, gw]`` bool -> ``[...]``
    """
    m = maps.double()
    total = m.sum((-2, -1))
    inside = (m * masks).sum((-2, -1))
    return (inside / total.clamp_min(1e-300)).float()
