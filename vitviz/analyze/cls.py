"""CLS-row attention maps: what the CLS token attends to, per head."""

from __future__ import annotations

import torch

from ..types import AttentionMaps
from ._tokens import Query, check_layer, row_weights
from .query import query_maps


def cls_maps(attn: AttentionMaps, *, layer: int = -1, query: Query = "auto") -> torch.Tensor:
    """Per-head attention of the CLS token over the patches at one layer.

    Models without a CLS token get the mean attention of the patch rows. ``query`` picks
    another row: ``"dist"`` (distillation token), ``"cls+dist"`` (their mean),
    ``"patches"`` (mean of the patch rows), a token index or ``(row, col)`` of a patch;
    see :func:`vitviz.analyze.query.query_weights`.

    Args:
        attn: :class:`AttentionMaps` ``[L, B, H, N, N]``, or ``[L, B, H, R, N]`` from
            ``vitviz.capture(m, rows="cls")`` (the rows of some tokens only).
        layer: layer index (negative counts from the end).
        query: which query row(s) to read (default: CLS, else the mean of the patch rows).

    Returns:
        ``[B, H, gh, gw]`` float32, prefix tokens dropped, not rescaled.

    Example:
        >>> vitviz.cls_maps(rec.attentions, layer=-1).shape
        torch.Size([1, 12, 14, 14])
    """
    check_layer(attn.num_layers, layer)
    return query_maps(attn, query, layer=layer)  # [B, H, gh, gw]


def all_layer_maps(attn: AttentionMaps, *, query: Query = "auto") -> torch.Tensor:
    """:func:`cls_maps` of every layer at once.

    Args:
        attn: ``[L, B, H, N, N]`` attention (keys may be reduced: the maps are over the key grid).
        query: which query rows to read (see :func:`vitviz.analyze.query_weights`); ``"auto"``
            is the CLS row, or the mean of the patch rows for a model without CLS.

    Returns:
        ``[L, B, H, gh, gw]`` float32.
    """
    w = row_weights(attn.layout, attn.rows, query, device=attn.device)  # [Nq] float32 (Nq = R rows held)
    keys = attn.keys  # the key grid (coarser than the queries' where keys are reduced)
    rows = attn.weighted_rows(w)[..., keys.patches]  # [L, B, H, P]
    return keys.patch_map(rows)  # [L, B, H, gh, gw] ([L, B, H, frames, gh, gw] for a video)
