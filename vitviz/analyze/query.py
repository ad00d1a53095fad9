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

from ..errors import LayoutError
from ..types import AttentionMaps, TokenLayout
from .rollout import fuse_heads

QUERY_NAMES = ("auto", "cls", "dist", "cls+dist", "patches", "prefix")

Query = str | int | tuple[int, int] | torch.Tensor


def check_layer(num_layers: int, layer: int) -> int:
    """The non-negative index of ``layer`` (negative counts from the end), or ValueError."""
    if not -num_layers <= layer < num_layers:
        raise ValueError(f"layer {layer} is out of range for {num_layers} layers "
                         f"(use 0..{num_layers - 1} or -{num_layers}..-1)")
    return layer % num_layers


def query_weights(layout: TokenLayout, query: Query = "auto", *, dtype: torch.dtype = torch.float32,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Weights over the ``N`` query tokens that a query description stands for.

    Args:
        layout: the :class:`TokenLayout` of the sequence.
        query: see the module docstring (``"auto"``, ``"cls"``, ``"dist"``, ``"cls+dist"``,
            ``"patches"``, ``"prefix"``, a token index, ``(row, col)`` of a patch, or weights).
        dtype, device: of the returned tensor.

    Returns:
        ``[N]`` non-negative weights summing to 1.

    Raises:
        LayoutError: the layout has no such token (e.g. ``"cls"`` without a CLS token).
        ValueError: an unknown query description.

    Example:
        >>> query_weights(TokenLayout(num_prefix=2, grid=(2, 2)), "cls+dist")
        tensor([0.5000, 0.5000, 0.0000, 0.0000, 0.0000, 0.0000])
    """
    n, p = layout.num_tokens, layout.num_prefix
    w = torch.zeros(n, dtype=dtype, device=device)  # [N]
    if isinstance(query, torch.Tensor):
        q = query.to(dtype=dtype, device=device).flatten()
        if q.numel() != n or bool((q < 0).any()) or not bool(q.sum() > 0) or not bool(torch.isfinite(q).all()):
            raise ValueError(f"query weights must be {n} finite non-negative numbers with a positive sum "
                             f"(one per token of {layout}), got shape {tuple(query.shape)}")
        return q / q.sum()
    if isinstance(query, bool):  # bool is an int; refuse it explicitly
        raise ValueError(f"unknown query {query!r}")
    if isinstance(query, int):
        if not -n <= query < n:
            raise LayoutError(f"query token {query} is out of range for {n} tokens ({layout})")
        w[query % n] = 1.0
        return w
    if isinstance(query, (tuple, list)):
        if len(query) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in query):
            raise ValueError(f"a patch query is (row, col) of two ints, got {query!r}")
        gh, gw = layout.grid
        row, col = query
        if not (-gh <= row < gh and -gw <= col < gw):
            raise LayoutError(f"patch ({row}, {col}) is outside the {gh}x{gw} patch grid")
        w[p + (row % gh) * gw + (col % gw)] = 1.0
        return w
    if query == "auto":
        query = "cls" if layout.has_cls else "patches"
    if query == "cls":
        if not layout.has_cls:
            raise LayoutError(f"{layout} has no CLS token; use query='patches' (mean of the patch rows)")
        w[0] = 1.0
    elif query in ("dist", "cls+dist"):
        if not layout.has_cls or p < 2:
            raise LayoutError(f"query {query!r} needs a CLS token and a distillation token "
                              f"(num_prefix >= 2, e.g. DeiT distilled models), but the layout is {layout}")
        if query == "dist":
            w[1] = 1.0
        else:
            w[0] = w[1] = 0.5
    elif query == "patches":
        w[layout.patches] = 1.0 / layout.num_patches
    elif query == "prefix":
        if p == 0:
            raise LayoutError(f"{layout} has no prefix tokens; use query='patches'")
        w[:p] = 1.0 / p
    else:
        raise ValueError(f"unknown query {query!r}; use one of {', '.join(QUERY_NAMES)}, a token index, "
                         "(row, col) of a patch, or a tensor of per-token weights")
    return w


def query_maps(attn: AttentionMaps, query: Query = "auto", *, layer: int = -1,
               head_fusion: str | None = None) -> torch.Tensor:
    """Attention of a chosen query over the patches at one layer, per head.

    The query rows are combined with :func:`query_weights` (a single row for a token or a
    patch; the mean of several rows for ``"cls+dist"`` or ``"patches"``); the keys are the
    patch tokens only (prefix tokens dropped), not rescaled.

    Args:
        attn: :class:`AttentionMaps` ``[L, B, H, N, N]``.
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
    a = attn.tensor[check_layer(attn.num_layers, layer)].float()  # [B, H, Nq, Nk]
    w = query_weights(attn.layout, query, dtype=a.dtype, device=a.device)  # [Nq]
    rows = torch.einsum("q,bhqk->bhk", w, a)  # [B, H, Nk]
    keys = attn.keys  # the key grid (coarser than the queries' where keys are reduced)
    maps = rows[..., keys.patches].reshape(*rows.shape[:2], *keys.grid)  # [B, H, gh, gw]
    if head_fusion is not None:
        maps = _fuse(maps, head_fusion)  # [B, gh, gw]
    return maps


def _fuse(maps: torch.Tensor, head_fusion: str) -> torch.Tensor:
    """Fuse the head dim of ``[B, H, gh, gw]`` maps (same rule as :func:`fuse_heads`)."""
    b, h, gh, gw = maps.shape
    return fuse_heads(maps.reshape(b, h, gh * gw, 1), head_fusion).reshape(b, gh, gw)  # [B, gh, gw]
