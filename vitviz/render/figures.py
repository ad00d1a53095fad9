"""Figures with matplotlib: grids of maps over the image, panels, position similarity,
attention distance, entropy, mask contours.

Every function takes ``ax=`` (draws into that axes) or makes its own figure, and returns
``(fig, ax)``. Figures are built with :class:`matplotlib.figure.Figure` and the Agg canvas:
no pyplot state, no window, never ``plt.show()``. Grids of maps are drawn as one mosaic
image in one axes (fast, and it composes with ``ax=``).

Example:
    >>> fig, ax = map_grid(maps, image=view, row_labels=[f"layer {l}" for l in range(12)])
    >>> save_figure(fig, "cls_grid.png")
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from .overlay import as_rgb_uint8, colorize, normalize_map, overlay

_DPI = 100


def new_figure(width_px: float, height_px: float, dpi: int = _DPI):
    """An empty matplotlib Figure of about ``width_px x height_px`` pixels on the Agg canvas (no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(width_px, 50) / dpi, max(height_px, 50) / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _fig_ax(ax, width_px: float, height_px: float):
    if ax is not None:
        return ax.figure, ax
    fig = new_figure(width_px, height_px)
    return fig, fig.add_subplot(1, 1, 1)


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    """Resize an RGB image so that its longer side is ``size`` pixels."""
    import cv2

    h, w = img.shape[:2]
    s = size / max(h, w)
    if abs(s - 1.0) < 1e-6:
        return img
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    return cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=interp)


def _tile(heat: np.ndarray, image: Optional[np.ndarray], size: tuple[int, int], cmap: str,
          alpha: float) -> np.ndarray:
    """One ``size`` (h, w) RGB tile: the map over the image, or the coloured map alone."""
    import cv2

    if image is not None:
        return overlay(image, heat, cmap=cmap, alpha=alpha)
    unit = normalize_map(heat)  # [gh, gw] in [0, 1]
    up = cv2.resize(unit, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
    return colorize(up, cmap)


def _mosaic(tiles: Sequence[Sequence[np.ndarray]], gap: int, fill) -> np.ndarray:
    """Lay out ``rows x cols`` equally sized tiles with ``gap`` pixels between them."""
    rows, cols = len(tiles), len(tiles[0])
    th, tw = tiles[0][0].shape[:2]
    extra = tiles[0][0].shape[2:]
    out = np.full((rows * th + (rows - 1) * gap, cols * tw + (cols - 1) * gap) + extra, fill,
                  dtype=tiles[0][0].dtype)
    for r in range(rows):
        for c in range(cols):
            y, x = r * (th + gap), c * (tw + gap)
            out[y:y + th, x:x + tw] = tiles[r][c]
    return out


def _label_tiles(ax, rows: int, cols: int, th: int, tw: int, gap: int, row_labels, col_labels,
                 top: bool = False) -> None:
    xs = [c * (tw + gap) + (tw - 1) / 2 for c in range(cols)]
    ys = [r * (th + gap) + (th - 1) / 2 for r in range(rows)]
    fontsize = max(5, min(9, int(800 / max(rows, cols, 1) / 8)))
    if col_labels is not None:
        ax.set_xticks(xs, [str(c) for c in col_labels], fontsize=fontsize)
        if top:
            ax.xaxis.tick_top()
    else:
        ax.set_xticks([])
    if row_labels is not None:
        ax.set_yticks(ys, [str(r) for r in row_labels], fontsize=fontsize)
    else:
        ax.set_yticks([])
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)


def map_grid(maps, image=None, *, row_labels: Optional[Sequence] = None,
             col_labels: Optional[Sequence] = None, cmap: str = "jet", alpha: float = 0.5,
             tile: Optional[int] = None, title: Optional[str] = None, ax=None):
    """A ``rows x cols`` grid of maps, each over the image (e.g. layers x heads of CLS maps).

    Args:
        maps: ``[rows, cols, gh, gw]`` (tensor or array; ``[cols, gh, gw]`` is one row).
        image: ``HxWx3`` uint8 RGB image the model saw, or ``None`` for the coloured maps alone.
        row_labels, col_labels: tick labels (e.g. ``"layer 3"``, ``"head 7"``).
        cmap, alpha: as :func:`vitviz.overlay`; every map is min-max scaled on its own.
        tile: tile size in pixels (default: fits the grid in about 1600 px).
        title: axes title.
        ax: matplotlib axes to draw into.

    Returns:
        ``(fig, ax)``
    """
    m = _numpy(maps)
    if m.ndim == 3:
        m = m[None]
    if m.ndim != 4:
        raise ValueError(f"maps must be [rows, cols, gh, gw], got shape {m.shape}")
    rows, cols, gh, gw = m.shape
    if tile is None:
        tile = int(np.clip(1600 // max(rows, cols), 32, 224))
    img = _resize(as_rgb_uint8(image), tile) if image is not None else None
    if img is not None:
        size = img.shape[:2]
    else:
        s = tile / max(gh, gw)
        size = (max(1, round(gh * s)), max(1, round(gw * s)))
    tiles = [[_tile(m[r, c], img, size, cmap, alpha) for c in range(cols)] for r in range(rows)]
    gap = max(2, size[0] // 24)
    mosaic = _mosaic(tiles, gap, 255)
    fig, ax = _fig_ax(ax, mosaic.shape[1] + 160, mosaic.shape[0] + 120)
    ax.imshow(mosaic, interpolation="nearest")
    _label_tiles(ax, rows, cols, size[0], size[1], gap, row_labels, col_labels)
    if title:
        ax.set_title(title)
    return fig, ax


def panels(image, maps: Union[Mapping[str, object], Sequence], *, cmap: str = "jet", alpha: float = 0.5,
           tile: Optional[int] = None, show_image: bool = True, ax=None):
    """The image and several maps over it, side by side (e.g. rollout, relevance, flow).

    Args:
        image: ``HxWx3`` uint8 RGB image.
        maps: ``{title: [gh, gw] map}`` or a sequence of ``(title, map)``.
        show_image: put the plain image first.
        tile: panel size in pixels (default: the image's longer side, at most 320).

    Returns:
        ``(fig, ax)``
    """
    items = list(maps.items()) if isinstance(maps, Mapping) else list(maps)
    img = as_rgb_uint8(image)
    tile = tile or int(min(320, max(img.shape[:2])))
    small = _resize(img, tile)
    tiles = ([small] if show_image else []) + [overlay(small, _numpy(mp), cmap=cmap, alpha=alpha)
                                               for _, mp in items]
    titles = (["image"] if show_image else []) + [str(t) for t, _ in items]
    gap = max(4, tile // 24)
    mosaic = _mosaic([tiles], gap, 255)
    fig, ax = _fig_ax(ax, mosaic.shape[1] + 40, mosaic.shape[0] + 80)
    ax.imshow(mosaic, interpolation="nearest")
    _label_tiles(ax, 1, len(tiles), small.shape[0], small.shape[1], gap, None, titles, top=True)
    return fig, ax


def pos_similarity_grid(sim, *, cmap: str = "viridis", colorbar: bool = True,
                        title: Optional[str] = "Position embedding similarity", ax=None):
    """The ViT paper's figure: for each patch, a small grid of its cosine similarity with all.

    Args:
        sim: ``[gh*gw, gh, gw]`` from :func:`vitviz.pos_similarity`.
        cmap: colour map; the scale is fixed to ``[-1, 1]``.
        colorbar: add a colour bar labelled "cosine similarity".

    Returns:
        ``(fig, ax)``
    """
    s = _numpy(sim).astype(np.float32)
    if s.ndim != 3 or s.shape[0] != s.shape[1] * s.shape[2]:
        raise ValueError(f"sim must be [gh*gw, gh, gw], got shape {s.shape}")
    _, gh, gw = s.shape
    tiles = [[s[r * gw + c] for c in range(gw)] for r in range(gh)]
    gap = 1
    mosaic = _mosaic(tiles, gap, np.nan)
    scale = max(1, 600 // max(mosaic.shape))
    fig, ax = _fig_ax(ax, mosaic.shape[1] * scale + 220, mosaic.shape[0] * scale + 120)
    import matplotlib

    cm = matplotlib.colormaps[cmap].with_extremes(bad="white")
    im = ax.imshow(np.ma.masked_invalid(mosaic), cmap=cm, vmin=-1.0, vmax=1.0, interpolation="nearest")
    step_r = max(1, gh // 8)
    step_c = max(1, gw // 8)
    _label_tiles(ax, gh, gw, gh, gw, gap, None, None)
    ax.set_xticks([c * (gw + gap) + (gw - 1) / 2 for c in range(0, gw, step_c)],
                  [str(c + 1) for c in range(0, gw, step_c)], fontsize=7)
    ax.set_yticks([r * (gh + gap) + (gh - 1) / 2 for r in range(0, gh, step_r)],
                  [str(r + 1) for r in range(0, gh, step_r)], fontsize=7)
    ax.set_xlabel("Input patch column")
    ax.set_ylabel("Input patch row")
    if title:
        ax.set_title(title)
    if colorbar:
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="Cosine similarity")
    return fig, ax


def distance_plot(distance, *, unit: str = "pixels", title: Optional[str] = "Mean attention distance",
                  ax=None):
    """Mean attention distance of every head against the layer (the ViT paper's Fig. 7 right).

    Args:
        distance: ``[L, H]`` (e.g. :func:`~vitviz.analyze.stats.mean_attention_distance` averaged
            over the batch).
        unit: axis label unit (``"pixels"`` or ``"patches"``).

    Returns:
        ``(fig, ax)``
    """
    d = _numpy(distance)
    if d.ndim != 2:
        raise ValueError(f"distance must be [L, H], got shape {d.shape}")
    num_layers, num_heads = d.shape
    fig, ax = _fig_ax(ax, 640, 440)
    import matplotlib

    colors = matplotlib.colormaps["tab10" if num_heads <= 10 else "tab20"](np.arange(num_heads) % 20)
    for h in range(num_heads):
        ax.scatter(np.arange(num_layers), d[:, h], s=14, color=colors[h], label=f"head {h}")
    ax.set_xlabel("Network depth (layer)")
    ax.set_ylabel(f"Mean attention distance ({unit})")
    ax.set_xticks(np.arange(num_layers))
    top = float(np.nanmax(d)) if d.size and np.isfinite(d).any() else 1.0
    ax.set_ylim(0, max(top * 1.08, 1e-6))
    ax.grid(alpha=0.3)
    if num_heads <= 16:
        ax.legend(fontsize=6, ncol=2, loc="lower right", frameon=False)
    if title:
        ax.set_title(title)
    return fig, ax


def heatmap(values, *, label: str = "", title: Optional[str] = None, cmap: str = "magma",
            annotate: Optional[bool] = None, xlabel: str = "head", ylabel: str = "layer",
            vmin: Optional[float] = None, vmax: Optional[float] = None, ax=None):
    """A layers x heads heat map with a colour bar (entropy, prefix share, ...).

    Args:
        values: ``[L, H]``.
        label: colour-bar label.
        annotate: write the values in the cells (default: when the grid is at most 16 x 16).

    Returns:
        ``(fig, ax)``
    """
    v = _numpy(values).astype(np.float64)
    if v.ndim != 2:
        raise ValueError(f"values must be [L, H], got shape {v.shape}")
    rows, cols = v.shape
    fig, ax = _fig_ax(ax, 120 + 42 * cols, 100 + 32 * rows)
    im = ax.imshow(v, cmap=cmap, aspect="auto", interpolation="nearest", vmin=vmin, vmax=vmax)
    ax.set_xticks(np.arange(cols))
    ax.set_yticks(np.arange(rows))
    ax.tick_params(labelsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if annotate is None:
        annotate = rows <= 16 and cols <= 16
    if annotate:
        for r in range(rows):
            for c in range(cols):
                red, green, blue, _ = im.cmap(im.norm(v[r, c]))
                light = 0.299 * red + 0.587 * green + 0.114 * blue > 0.5  # text readable on the cell
                ax.text(c, r, f"{v[r, c]:.2f}", ha="center", va="center", fontsize=6,
                        color="black" if light else "white")
    fig.colorbar(im, ax=ax, label=label)
    if title:
        ax.set_title(title)
    return fig, ax


def entropy_heatmap(entropy, *, normalized: bool = False, title: Optional[str] = "Attention entropy",
                    ax=None):
    """Attention entropy per layer and head (from :func:`~vitviz.analyze.stats.attention_entropy`).

    Returns:
        ``(fig, ax)``
    """
    return heatmap(entropy, label="entropy / log N" if normalized else "entropy (nats)", title=title,
                   cmap="viridis", ax=ax)


def mask_contours(image, masks, *, labels: Optional[Sequence] = None, fill: float = 0.25,
                  title: Optional[str] = None, ax=None):
    """Contours of patch masks on the image (DINO's attention-mass masks, one colour each).

    Args:
        image: ``HxWx3`` uint8 RGB image the model saw.
        masks: ``[gh, gw]`` or ``[K, gh, gw]`` bool masks (e.g. :func:`~vitviz.analyze.masks.mass_masks`).
        labels: legend entries, one per mask (e.g. ``"head 3"``).
        fill: opacity of the filled masks (0 draws contours only).

    Returns:
        ``(fig, ax)``
    """
    import cv2
    import matplotlib
    from matplotlib.lines import Line2D

    img = as_rgb_uint8(image)
    mk = _numpy(masks).astype(bool)
    if mk.ndim == 2:
        mk = mk[None]
    if mk.ndim != 3:
        raise ValueError(f"masks must be [gh, gw] or [K, gh, gw], got shape {mk.shape}")
    h, w = img.shape[:2]
    fig, ax = _fig_ax(ax, w * max(1, 480 // max(h, w)) + 200, h * max(1, 480 // max(h, w)) + 80)
    ax.imshow(img)
    colors = matplotlib.colormaps["tab10" if mk.shape[0] <= 10 else "tab20"](np.arange(mk.shape[0]) % 20)
    handles = []
    for k in range(mk.shape[0]):
        up = cv2.resize(mk[k].astype(np.float32), (w, h), interpolation=cv2.INTER_NEAREST)
        if up.max() > 0:
            if fill > 0:
                ax.contourf(up, levels=[0.5, 1.5], colors=[colors[k]], alpha=fill)
            ax.contour(up, levels=[0.5], colors=[colors[k]], linewidths=1.5)
        if labels is not None:
            handles.append(Line2D([0], [0], color=colors[k], lw=2, label=str(labels[k])))
    if handles:
        ax.legend(handles=handles, fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)
    return fig, ax


def figure_png(fig, *, dpi: int = _DPI) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def save_figure(fig, path, *, dpi: int = _DPI) -> Path:
    """Save a figure as PNG atomically (temporary name, then rename).

    Returns:
        The path written.
    """
    from .._io import atomic_write_bytes

    return atomic_write_bytes(path, figure_png(fig, dpi=dpi))
