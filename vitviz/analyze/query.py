"""Attention read from a chosen query: the CLS token, the distillation token, a patch, ...

"What does this patch look at?" is one row of an attention matrix. This module turns a
query description into weights over the ``N`` query rows and reads the weighted rows out
as patch maps. The same weights are the sources of :func:`vitviz.analyze.flow.attention_flow`.

Query descriptions (``query=``):

* ``"auto"``: the CLS token when the layout has one, else the mean of the patch rows
  (what :func:`vitviz.rollout` and :func:`vitviz.cls_maps` use).
* ``"cls"``: token 0 (needs a CLS token).
* ``"dist"``: token 1, the distillation token of DeiT distilled models (needs
  ``num_prefix >= 2``; in register models token 1 is the first register).
* ``"cls+dist"``: the mean of tokens 0 and 1 (DeiT distilled models classify with the
  mean of both heads).
* ``"patches"``: the mean of the patch rows.
* ``"prefix"``: the mean of the prefix rows (CLS, distillation and register tokens).
* an ``int``: that token index (negative counts from the end).
* ``(row, col)``: the patch at that grid position (negative counts from the end).
* a 1-D tensor of ``N`` non-negative weights: normalised to sum to 1.
"""

from __future__ import annotations

import torch

from ..types import AttentionMaps
from ._tokens import Query, check_layer, fuse_heads, row_weights
from ._tokens import query_weights as query_weights  # where the module docstring points


def query_maps(attn: AttentionMaps, query: Query = "auto", *, layer: int = -1,
               head_fusion: str | None = None) -> torch.Tensor:
    """Attention of a chosen query over the patches at one layer, per head.

    The query rows are combined with :func:`query_weights` (a single row for a token or a
    patch; the mean of several rows for ``"cls+dist"`` or ``"patches"``); the keys are the
    patch tokens only (prefix tokens dropped), not rescaled.

    Args:
        attn: :class:`AttentionMaps` ``[L, B, H, N, N]`` (or ``[L, B, H, R, N]`` of a rows-only
            capture that holds the query's rows).
        query: ``(row, col)`` of a patch, a token index, or a name (see :func:`query_weights`).
        layer: layer index (negative counts from the end).
        head_fusion: ``None`` keeps the heads; ``"mean"``, ``"max"`` or ``"min"`` fuses them.

    Returns:
        ``[B, H, gh, gw]`` float32 (``[B, gh, gw]`` with ``head_fusion``).

    Shape:
        attn.tensor: ``[L, B, H, N, N]`` -> ``[B, H, gh, gw]``

    Example:
        >>> what = vitviz.query_maps(rec.attentions, query=(3, 7))  # the patch in row 3, column 7
        >>> what.shape
        torch.Size([1, 12, 14, 14])
    """
    index = check_layer(attn.num_layers, layer)
    w = row_weights(attn.layout, attn.rows, query, device=attn.device)  # [Nq] float32 (Nq = R rows held)
    rows = attn.weighted_rows(w, index)  # [B, H, Nk] (window layers read from their windows)
    keys = attn.keys  # the key grid (coarser than the queries' where keys are reduced)
    maps = keys.patch_map(rows[..., keys.patches])  # [B, H, gh, gw] ([B, H, frames, gh, gw] for a video)
    if head_fusion is not None:
        maps = _fuse(maps, head_fusion)  # [B, gh, gw]
    return maps


def _fuse(maps: torch.Tensor, head_fusion: str) -> torch.Tensor:
    """Fuse the head dim of ``[B, H, gh, gw]`` (or ``[B, H, frames, gh, gw]``) maps (same rule as
    :func:`fuse_heads`)."""
    b, h, *shape = maps.shape
    return fuse_heads(maps.reshape(b, h, -1, 1), head_fusion).reshape(b, *shape)  # [B, gh, gw]
