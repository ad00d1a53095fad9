"""Window attention put back on the image's token grid.

Swin-style models (Liu et al. 2021, "Swin Transformer: Hierarchical Vision Transformer using
Shifted Windows") run self-attention inside non-overlapping ``wh x ww`` windows of an
``H x W`` token grid: the grid is cyclically shifted (every other block), padded to a multiple
of the window and cut into windows, and each window is a separate sequence of the batch
(``[B * nW, heads, wh*ww, wh*ww]``). :func:`stitch` scatters those rows into one block-sparse
``[B, heads, H*W, H*W]`` matrix over the grid in the image's own row-major order, with the
shift undone and padding tokens dropped (a query's attention to padding is lost, so its row
sums to less than 1 in windows that hold padding).

Libraries differ in one detail: timm shifts the grid and then pads it, transformers pads it
and then shifts the padded grid (``pad_first``). MaxViT (Tu et al. 2022) also attends over a
dilated grid (``dilated``): window ``(a, b)`` holds the tokens ``(i * H/gh + a, j * W/gw + b)``,
one from every ``H/gh x W/gw`` block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..types import AttentionMaps, TokenLayout


@dataclass(frozen=True)
class WindowScheme:
    """How one block cut its ``grid`` of tokens into windows.

    Attributes:
        grid: ``(H, W)`` tokens of the stage, before padding.
        window: ``(wh, ww)`` window size.
        shift: ``(sh, sw)`` cyclic shift (``torch.roll(x, -shift)`` before partitioning).
        pad_first: the grid is padded before it is shifted (transformers) instead of after
            (timm).
        dilated: MaxViT's grid attention: ``window`` tokens spread over the whole grid with
            stride ``H / window`` (the grid divides evenly; no shift or padding).
    """

    grid: tuple[int, int]
    window: tuple[int, int]
    shift: tuple[int, int] = (0, 0)
    pad_first: bool = False
    dilated: bool = False

    @property
    def padded(self) -> tuple[int, int]:
        (h, w), (wh, ww) = self.grid, self.window
        return -(-h // wh) * wh, -(-w // ww) * ww

    @property
    def num_windows(self) -> int:
        (hp, wp), (wh, ww) = self.padded, self.window
        return (hp // wh) * (wp // ww)  # dilated: the grid divides evenly, so the same count

    def token_index(self, device=None) -> torch.Tensor:
        """Where each window token sits on the grid.

        Args:
            device: where to make the index.

        Returns:
            ``[nW, wh*ww]`` long: the row-major grid index of each window token, -1 for padding.
        """
        (h, w), (wh, ww), (sh, sw) = self.grid, self.window, self.shift
        if self.dilated:  # window (a, b), token (i, j) at (i * h/wh + a, j * w/ww + b)
            sh_, sw_ = h // wh, w // ww  # windows per side = the stride between a window's tokens
            a = torch.arange(sh_, device=device).view(sh_, 1, 1, 1)
            b = torch.arange(sw_, device=device).view(1, sw_, 1, 1)
            r = torch.arange(wh, device=device).view(1, 1, wh, 1) * sh_ + a
            c = torch.arange(ww, device=device).view(1, 1, 1, ww) * sw_ + b
            return (r * w + c).reshape(self.num_windows, wh * ww)
        hp, wp = self.padded
        r = torch.arange(hp, device=device).view(hp // wh, 1, wh, 1)  # window row, -, row in window, -
        c = torch.arange(wp, device=device).view(1, wp // ww, 1, ww)
        # r, c: positions in the shifted, padded grid the windows were cut from
        if self.pad_first:  # shifted[r] = padded[(r + s) % Hp]; padding where that is outside H
            r, c = (r + sh) % hp, (c + sw) % wp
            inside = (r < h) & (c < w)
        else:  # shifted[r] = x[(r + s) % H] for r < H, padding beyond
            inside = (r < h) & (c < w)
            r, c = (r + sh) % h, (c + sw) % w
        index = torch.where(inside, r * w + c, torch.full_like(r * c, -1))  # [nWh, nWw, wh, ww]
        return index.reshape(self.num_windows, wh * ww)


def stitch(windows: torch.Tensor, scheme: WindowScheme, out: torch.Tensor | None = None) -> torch.Tensor:
    """Scatter window attention into a block-sparse matrix over the whole grid.

    Args:
        windows: ``[B * nW, heads, T, T]`` probabilities (``T = wh * ww``), windows of one image
            consecutive, in row-major window order (as ``window_partition`` cuts them).
        scheme: the block's :class:`WindowScheme`.
        out: a zero-filled ``[B, heads, H*W, H*W]`` tensor to write into (e.g. one layer of a
            stage's stack), or None for a new one.

    Returns:
        ``[B, heads, H*W, H*W]`` in the dtype of ``windows`` (``out`` when given): entry ``[b, h, i, j]`` is the
        attention of grid token ``i`` to grid token ``j``, zero where they are in different
        windows; padding tokens dropped.

    Raises:
        ValueError: the window attention's shape does not fit ``scheme``.
    """
    nw = scheme.num_windows
    bw, heads, t, t2 = windows.shape
    if t != t2 or t != scheme.window[0] * scheme.window[1] or bw % nw:
        raise ValueError(f"window attention of shape {tuple(windows.shape)} does not fit {scheme}")
    b = bw // nw
    n = scheme.grid[0] * scheme.grid[1]
    index = scheme.token_index(windows.device)  # [nW, T]
    valid = index >= 0
    safe = index.clamp_min(0)
    # flat position (query * n + key) of every window entry in the [n, n] matrix
    flat = (safe[:, :, None] * n + safe[:, None, :]).reshape(-1)  # [nW*T*T]
    keep = (valid[:, :, None] & valid[:, None, :]).reshape(-1)
    flat = flat[keep]
    src = windows.reshape(b, nw, heads, t * t).transpose(1, 2).reshape(b, heads, nw * t * t)[..., keep]
    if out is None:
        out = windows.new_zeros(b, heads, n, n)
    out.view(b, heads, n * n)[..., flat] = src  # every (query, key) pair of a window appears once
    return out


class Stitch:
    """The placer of a window layer: ``Stitch(scheme)(windows)`` is :func:`stitch`; the recorder
    tells it from other placers to keep a layer as its windows (:class:`WindowedLayer`)."""

    def __init__(self, scheme: WindowScheme):
        self.scheme = scheme

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        return stitch(windows, self.scheme)


@dataclass(frozen=True, eq=False)
class WindowedLayer:
    """One kept window-attention layer as the model computed it: ``[B * nW, H, T, T]`` and its
    scheme, a ``1 / nW`` of the dense ``[B, H, N, N]`` that :meth:`dense` stitches.

    Attributes:
        windows: ``[B * nW, H, T, T]`` float probabilities, windows of one image consecutive.
        scheme: the block's :class:`WindowScheme`.
    """

    windows: torch.Tensor
    scheme: WindowScheme

    @property
    def shape(self) -> torch.Size:
        """The dense shape ``[B, H, N, N]`` (``N`` tokens of the stage's grid)."""
        n = self.scheme.grid[0] * self.scheme.grid[1]
        return torch.Size((self.windows.shape[0] // self.scheme.num_windows, self.windows.shape[1], n, n))

    @property
    def device(self) -> torch.device:
        """Where the windows are."""
        return self.windows.device

    @property
    def dtype(self) -> torch.dtype:
        """The windows' dtype (the dense matrix's)."""
        return self.windows.dtype

    def dense(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The dense block-sparse matrix: :func:`stitch` of the windows.

        Args:
            out: a zero-filled ``[B, H, N, N]`` tensor to write into, or None for a new one.

        Returns:
            ``[B, H, N, N]``.
        """
        return stitch(self.windows, self.scheme, out)

    def weighted_rows(self, weights: torch.Tensor) -> torch.Tensor:
        """``sum_q weights[q] * A[b, h, q, :]`` of the dense matrix, read from the windows.

        Every grid token is one window's query and one window's key, so a window's rows, weighted
        by its tokens' weights, land on its own tokens' keys; padding rows and keys drop out.

        Args:
            weights: ``[N]`` weights of the grid's query tokens (row-major).

        Returns:
            ``[B, H, N]`` in the dtype of ``weights``.
        """
        b, heads, _, _ = self.shape
        nw, t = self.scheme.num_windows, self.windows.shape[-1]
        index = self.scheme.token_index(self.windows.device)  # [nW, T], -1 for padding
        w = torch.where(index >= 0, weights.to(self.windows.device)[index.clamp_min(0)], 0).to(weights.dtype)
        a = self.windows.view(b, nw, heads, t, t).to(weights.dtype)
        return self._on_grid(torch.einsum("wq,bwhqk->bhwk", w, a), index)  # each window's rows over its keys

    def row_sums(self) -> torch.Tensor:
        """The row sums of the dense matrix, read from the windows.

        Returns:
            ``[B, H, N]`` float32: each grid token's row summed over the real keys of its window
            (padding keys dropped, as :func:`stitch` drops them).
        """
        b, heads, _, _ = self.shape
        nw, t = self.scheme.num_windows, self.windows.shape[-1]
        index = self.scheme.token_index(self.windows.device)  # [nW, T]
        a = self.windows.detach().float().view(b, nw, heads, t, t)
        sums = (a * (index >= 0).view(1, nw, 1, 1, t)).sum(-1).transpose(1, 2)  # [B, H, nW, T] per query
        return self._on_grid(sums, index)

    def _on_grid(self, values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``[B, H, nW, T]`` values of the window tokens put on their grid tokens, ``[B, H, N]``
        (padding tokens dropped; every grid token is one window token, so nothing is summed)."""
        b, heads, n, _ = self.shape
        keep = (index >= 0).reshape(-1)
        out = values.new_zeros(b, heads, n)
        out[..., index.reshape(-1)[keep]] = values.reshape(b, heads, -1)[..., keep]
        return out

    def samples(self, start: int, stop: int) -> WindowedLayer:
        """The layer of images ``start`` to ``stop - 1``.

        Args:
            start, stop: the images, as a slice ``[start:stop]`` of the batch.

        Returns:
            A new :class:`WindowedLayer` (a view of the windows).
        """
        nw = self.scheme.num_windows
        return WindowedLayer(self.windows[start * nw:stop * nw], self.scheme)

    def to(self, *args: Any, **kwargs: Any) -> WindowedLayer:
        """The layer moved or cast, as ``torch.Tensor.to``.

        Args:
            *args: ``torch.Tensor.to``'s arguments (a device, a dtype).
            **kwargs: its keyword arguments.

        Returns:
            A new :class:`WindowedLayer` with the same scheme.
        """
        return WindowedLayer(self.windows.to(*args, **kwargs), self.scheme)


class WindowedAttentionMaps(AttentionMaps):
    """:class:`~vitviz.AttentionMaps` of a stage whose window layers are kept as their windows.

    The dense ``[L, B, H, N, N]`` :attr:`tensor` (block-sparse, ``nW`` times the memory of the
    windows) is stitched when it is first read, and then kept. CLS-row and query maps
    (:meth:`weighted_rows`) read the windows without it.

    Args:
        parts: per layer, a :class:`WindowedLayer` or a dense ``[B, H, N, N]`` tensor (a stage
            may mix window and global layers, as SAM's encoder does).
        layout: the stage's :class:`~vitviz.TokenLayout` (``N`` tokens).
        layers: the layers' indices among the model's image layers, or None.
    """

    def __init__(self, parts: Sequence[torch.Tensor | WindowedLayer], layout: TokenLayout,
                 layers: tuple[int, ...] | None = None):
        shapes = {tuple(p.shape) for p in parts}
        if not parts or len(shapes) != 1 or len(next(iter(shapes))) != 4:
            raise ValueError(f"the layers of a stage must share one [B, H, N, N] shape, got {sorted(shapes)}")
        layout.check_tokens(parts[0].shape[-1])
        self._parts = list(parts)
        self._dense: torch.Tensor | None = None
        self.layout, self.key_layout, self.rows = layout, None, None
        self.layers = None if layers is None else tuple(int(i) for i in layers)
        if self.layers is not None and len(self.layers) != len(self._parts):
            raise ValueError(f"{len(self.layers)} layer indices given for {len(self._parts)} layers")

    @property
    def parts(self) -> list[torch.Tensor | WindowedLayer]:
        """Per layer, a :class:`WindowedLayer` or a dense ``[B, H, N, N]`` tensor."""
        return list(self._parts)

    @property  # type: ignore[override]
    def tensor(self) -> torch.Tensor:
        """``[L, B, H, N, N]``, stitched at the first read."""
        if self._dense is None:
            first = self._parts[0]  # [L, B, H, N, N] below, each layer stitched in place
            stack = torch.zeros(len(self._parts), *first.shape, dtype=first.dtype, device=first.device)
            for layer, p in zip(stack, self._parts):
                if isinstance(p, WindowedLayer):
                    p.dense(out=layer)
                else:
                    layer.copy_(p)
            self._dense = stack
        return self._dense

    @property
    def num_layers(self) -> int:
        return len(self._parts)

    @property
    def device(self) -> torch.device:
        """Where the maps are."""
        return self._parts[0].device

    @property
    def batch_size(self) -> int:
        return self._parts[0].shape[0]

    @property
    def num_heads(self) -> int:
        return self._parts[0].shape[1]

    def weighted_rows(self, weights: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """As :meth:`vitviz.AttentionMaps.weighted_rows`, read from the windows (the dense tensor
        once it is formed).

        Args:
            weights: ``[N]`` weights of the grid's query tokens, on :attr:`device`.
            layer: one layer's index, or None for every layer.

        Returns:
            ``[B, H, N]`` for one layer, ``[L, B, H, N]`` for all.
        """
        if self._dense is not None:
            return super().weighted_rows(weights, layer)
        parts = self._parts if layer is None else [self._parts[layer]]
        rows = [p.weighted_rows(weights) if isinstance(p, WindowedLayer)
                else torch.einsum("q,bhqk->bhk", weights, p.to(weights.dtype)) for p in parts]
        return torch.stack(rows) if layer is None else rows[0]  # [L, B, H, N] or [B, H, N]

    def to(self, *args: Any, **kwargs: Any) -> WindowedAttentionMaps:
        """The same maps moved or cast (windows still windows), as ``torch.Tensor.to``.

        Args:
            *args: ``torch.Tensor.to``'s arguments (a device, a dtype).
            **kwargs: its keyword arguments.

        Returns:
            A new :class:`WindowedAttentionMaps`.
        """
        return WindowedAttentionMaps([p.to(*args, **kwargs) for p in self._parts], self.layout, self.layers)

    def samples(self, start: int, stop: int) -> WindowedAttentionMaps:
        """The maps of images ``start`` to ``stop - 1``, their windows still windows.

        Args:
            start, stop: the images, as a slice ``[start:stop]`` of the batch.

        Returns:
            A new :class:`WindowedAttentionMaps`.
        """
        if self._dense is not None:
            return WindowedAttentionMaps([t for t in self._dense[:, start:stop]], self.layout, self.layers)
        return WindowedAttentionMaps([p.samples(start, stop) if isinstance(p, WindowedLayer) else p[start:stop]
                                      for p in self._parts], self.layout, self.layers)

    def _summary(self) -> tuple[list[int], torch.Tensor, torch.dtype]:
        """As :class:`~vitviz.AttentionMaps`, with the row sums read from the windows (never stitched)."""
        if self._dense is not None:
            return super()._summary()
        first = self._parts[0]
        sums = torch.stack([p.row_sums() if isinstance(p, WindowedLayer) else p.detach().float().sum(-1)
                            for p in self._parts])  # [L, B, H, N]
        return [len(self._parts), *first.shape], sums, first.dtype

    def __repr__(self) -> str:
        """As :class:`~vitviz.AttentionMaps`; ``windows kept`` while the dense tensor is not formed."""
        text = super().__repr__()
        return text if self._dense is not None else text[:-1] + ", windows kept)"


def scatter_visible(attn: torch.Tensor, visible: torch.Tensor, num_prefix: int, num_patches: int) -> torch.Tensor:
    """Put attention over a subset of the patches (masked image modelling: ViT-MAE's encoder sees
    the prefix tokens and the visible patches) on the full token sequence.

    Args:
        attn: ``[B, H, n, n]`` over ``num_prefix`` prefix tokens and then ``visible.shape[1]``
            patches.
        visible: ``[B, V]`` long: the grid index (row-major) of each visible patch, in sequence
            order.

    Returns:
        ``[B, H, N, N]`` with ``N = num_prefix + num_patches``: rows and columns of masked
        patches are zero (their maps are blank).
    """
    b, heads, n, _ = attn.shape
    full = num_prefix + num_patches
    prefix = torch.arange(num_prefix, device=visible.device).expand(b, num_prefix)
    index = torch.cat([prefix, visible.to(torch.long) + num_prefix], dim=1)  # [B, n]
    flat = (index[:, :, None] * full + index[:, None, :]).reshape(b, 1, n * n).expand(b, heads, n * n)
    out = attn.new_zeros(b, heads, full * full)
    out.scatter_(2, flat, attn.reshape(b, heads, n * n))
    return out.view(b, heads, full, full)
