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

from dataclasses import dataclass

import torch


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


def stitch(windows: torch.Tensor, scheme: WindowScheme) -> torch.Tensor:
    """Scatter window attention into a block-sparse matrix over the whole grid.

    Args:
        windows: ``[B * nW, heads, T, T]`` probabilities (``T = wh * ww``), windows of one image
            consecutive, in row-major window order (as ``window_partition`` cuts them).
        scheme: the block's :class:`WindowScheme`.

    Returns:
        ``[B, heads, H*W, H*W]`` in the dtype of ``windows``: entry ``[b, h, i, j]`` is the
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
    out = windows.new_zeros(b, heads, n * n)
    out[..., flat] = src  # every (query, key) pair of a window appears once
    return out.view(b, heads, n, n)


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
