"""The bottom of ``vitviz.analyze``: token and head helpers every analyzer shares.

Which query rows a description stands for (:func:`query_weights`), how heads are fused
(:func:`fuse_heads`), and the checks of layer indices and rollout options. Nothing here
imports another analyzer, so the analyzers import one way: from here up.
"""

from __future__ import annotations

import torch

from ..errors import LayoutError
from ..types import TokenLayout

HEAD_FUSIONS = ("mean", "max", "min")


def check_options(head_fusion: str = "mean", discard_ratio: float = 0.0) -> None:
    """Check the options of rollout-style analyzers.

    Args:
        head_fusion: ``"mean"``, ``"max"`` or ``"min"``.
        discard_ratio: the share of smallest entries to zero, in ``[0, 1)``.

    Raises:
        ValueError: an unknown head fusion or a discard ratio outside ``[0, 1)``.
    """
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {', '.join(HEAD_FUSIONS)}, got {head_fusion!r}")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")


def fuse_heads(attn: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """Fuse the head dimension of ``[..., H, Q, K]`` attention into ``[..., Q, K]``.

    Args:
        attn: attention with heads in dim ``-3``.
        head_fusion: ``"mean"``, ``"max"`` or ``"min"``.

    Returns:
        ``[..., Q, K]``: the mean, maximum or minimum over the heads.

    Raises:
        ValueError: an unknown ``head_fusion``.
    """
    if head_fusion == "mean":
        return attn.mean(dim=-3)
    if head_fusion == "max":
        return attn.amax(dim=-3)
    if head_fusion == "min":
        return attn.amin(dim=-3)
    check_options(head_fusion)  # raises: an unknown name
    raise AssertionError("unreachable: check_options raised")


QUERY_NAMES = ("auto", "cls", "dist", "cls+dist", "patches", "prefix")


def row_weights(layout: TokenLayout, rows: tuple[int, ...] | None, query: Query = "auto", *,
                dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """:func:`query_weights` over the query rows an attention tensor holds.

    Args:
        layout: the :class:`TokenLayout` of the sequence.
        rows: the token indices of the rows held (``AttentionMaps.rows``), or None for every row.
        query: as :func:`query_weights`.
        dtype, device: of the returned tensor.

    Returns:
        ``[R]`` weights over the held rows (``[N]`` when ``rows`` is None), summing to 1.

    Raises:
        LayoutError: the query needs a row that is not held (a rows-only capture of other tokens).

    Example:
        >>> row_weights(TokenLayout(num_prefix=1, grid=(2, 2)), (0,), "cls")
        tensor([1.])
    """
    w = query_weights(layout, query)  # [N] on the CPU: checked without a device sync
    if rows is not None:
        held = w[list(rows)]  # [R]
        if float(w.sum() - held.sum()) > 1e-6:
            needed = [int(i) for i in w.nonzero().flatten()]
            raise LayoutError(f"query {query!r} reads the rows of tokens {needed[:8]}"
                              + ("..." if len(needed) > 8 else "") + f", but only the rows of tokens {list(rows)} "
                              "were captured (vitviz.capture(..., rows=...)); capture those rows too, or every row")
        w = held
    return w.to(dtype=dtype, device=device)


Query = str | int | tuple[int, int] | torch.Tensor


def check_layer(num_layers: int, layer: int) -> int:
    """The non-negative index of a layer.

    Args:
        num_layers: how many layers there are.
        layer: the index, negative counting from the end.

    Returns:
        ``layer`` in ``0 .. num_layers - 1``.

    Raises:
        ValueError: ``layer`` is outside ``-num_layers .. num_layers - 1``.
    """
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
        size = 3 if layout.is_video else 2
        if len(query) != size or not all(isinstance(v, int) and not isinstance(v, bool) for v in query):
            what = "(frame, row, col) of three ints (frame: the temporal token position)" if layout.is_video \
                else "(row, col) of two ints"
            raise ValueError(f"a patch query of {layout} is {what}, got {query!r}")
        where = [int(v) for v in query]
        frame, row, col = where if layout.is_video else [0, *where]
        w[layout.patch_index(row, col, frame)] = 1.0
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
