"""The caption as a strip of panels: the image, then one panel per word with its map.

Like the figures of Xu et al. 2015 ("Show, Attend and Tell"): every panel is the image the
model saw with the word's cross-attention map over it (:func:`vitviz.overlay`: by default each
map is min-max scaled on its own, drawn as its patch blocks, coloured and blended with opacity
that grows with the value). Panels are at
least :data:`vitviz.render.figures.PANEL_IN` inches wide at the saved dpi, the words and the
title are wrapped to their panel, and constrained layout keeps them apart.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import RenderError
from ._overlay import DEFAULT_ALPHA, DEFAULT_CMAP, ImageLike, MapLike, as_map, as_rgb_uint8, overlay
from .figures import _DPI, PANEL_IN, _fit, _tile_px, add_colorbar, check_dpi, figure_scales, wrap

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def caption_strip(
    image: ImageLike,
    grids: MapLike,
    words: Sequence[str],
    *,
    title: str | None = None,
    show_image: bool = True,
    max_cols: int = 6,
    panel_size: float = PANEL_IN,
    cmap: str = DEFAULT_CMAP,
    alpha: float | None = DEFAULT_ALPHA,
    smooth: bool = False,
    fontsize: int = 11,
    norm: str = "image",
    vmin: float | None = None,
    vmax: float | None = None,
    colorbar: bool = False,
    dpi: int = _DPI,
    fig: Figure | None = None,
    axes: Any = None,
) -> tuple[Figure, Any]:
    """Draw one panel per word: the image with that word's patch map over it.

    Args:
        image: ``HxWx3`` uint8 RGB array or PIL image: the image the model saw
            (``model.preprocessor.view(path)``, or ``Caption.image``).
        grids: ``[W, gh, gw]`` maps (tensor or array), one per word, any scale
            (e.g. ``vitviz.word_grids(cap, merge="mean")``).
        words: the ``W`` panel titles.
        title: a title over the strip (e.g. the caption).
        show_image: start with a panel of the plain image.
        max_cols: panels per row; longer captions wrap onto more rows.
        panel_size: width of a panel in inches (the image is drawn at ``panel_size * dpi``
            pixels, small images enlarged).
        cmap, alpha, smooth: as :func:`vitviz.overlay`.
        fontsize: size of the words.
        norm: ``"image"`` (each word's map min-max scaled on its own), ``"batch"`` (one scale
            for all words) or ``"none"`` (raw values on ``[0, 1]``).
        vmin, vmax: explicit scale (one value or one per word), e.g. shared by several images.
        colorbar: add a colour bar that states the scale.
        dpi: the resolution the figure is drawn and saved at.
        fig: a matplotlib ``Figure`` to draw into (subplots are added to it).
        axes: matplotlib ``Axes`` to draw into, at least one per panel (extra ones are
            hidden); overrides ``fig``.

    Returns:
        ``(fig, axes)``: the figure and a flat ``np.ndarray`` of the panels' axes, image
        panel first. ``plt.show()`` is never called.

    Raises:
        RenderError: maps that are not ``[W, gh, gw]``, not one map per word, a layout option
            out of range, or too few axes.

    Shape:
        grids: ``[W, gh, gw]``

    Example:
        >>> fig, axes = caption_strip(cap.image, vitviz.word_grids(cap, merge="mean"),
        ...                           [w.text for w in cap.words], title=cap.text)
        >>> fig.savefig("caption.png")
    """
    img = as_rgb_uint8(image)
    if hasattr(grids, "detach"):  # torch.Tensor
        grids = grids.detach().float().cpu().numpy()
    maps = np.asarray(grids, dtype=np.float32)
    if maps.ndim == 2 and len(words) == 1:
        maps = maps[None]
    if maps.ndim != 3 and not (maps.size == 0 and len(words) == 0):
        raise RenderError(f"grids must be [W, gh, gw], got shape {maps.shape}")
    if len(maps) != len(words):
        raise RenderError(f"{len(maps)} maps for {len(words)} words; pass one map per word")
    if max_cols < 1:
        raise RenderError(f"max_cols must be >= 1, got {max_cols}")
    if not 0.5 <= panel_size <= 20:
        raise RenderError(f"panel_size must be in 0.5..20 inches, got {panel_size}")
    check_dpi(dpi)
    scales = figure_scales([as_map(m) for m in maps], norm, vmin, vmax)
    img = _fit(img, _tile_px(None, dpi, img) if panel_size == PANEL_IN else int(round(panel_size * dpi)))
    panel_size = max(img.shape[:2]) / dpi  # [H', W', 3]: at least panel_size * dpi pixels
    num = len(words) + int(show_image)
    num = max(num, 1)
    if axes is not None:
        axs = np.asarray(axes, dtype=object).ravel()
        if len(axs) < num:
            raise RenderError(f"{num} panels need {num} axes, got {len(axs)}")
        fig = axs[0].figure
    else:
        cols = min(num, max_cols)
        rows = math.ceil(num / cols)
        if fig is None:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure  # no pyplot: no global figure state to leak

            width = cols * (panel_size + 0.2) + (1.3 if colorbar else 0.0)
            title_lines = wrap(title, width * dpi * 0.95, fontsize + 1, dpi).count("\n") + 1 if title else 0
            word_lines = max((wrap(w, panel_size * dpi, fontsize, dpi).count("\n") + 1 for w in words),
                             default=1)
            panel_h = panel_size * img.shape[0] / img.shape[1]
            fig = Figure(figsize=(width, rows * (panel_h + 0.25 + word_lines * fontsize * 1.5 / 72)
                                  + title_lines * (fontsize + 1) * 1.6 / 72 + 0.1),
                         dpi=dpi, layout="constrained")
            FigureCanvasAgg(fig)
        axs = np.asarray(fig.subplots(rows, cols, squeeze=False), dtype=object).ravel()
    panels = []
    if show_image or not words:
        panels.append((img, "" if words else "(no words)"))
    for m, w, s in zip(maps, words, scales):
        flat = float(m.min()) == float(m.max()) or s.flat
        panels.append((overlay(img, m, cmap=cmap, alpha=alpha, vmin=s.vmin, vmax=s.vmax, smooth=smooth),
                       f"{w} (constant map)" if flat else w))
    for ax, (picture, label) in zip(axs, panels):
        ax.imshow(picture, interpolation="nearest")
        width_px = panel_size * fig.dpi if axes is None else ax.bbox.width
        ax.set_title(wrap(label, width_px, fontsize, fig.dpi), fontsize=fontsize)
        ax.set_axis_off()
    for ax in axs[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(wrap(title, fig.bbox.width * 0.95, fontsize + 1, fig.dpi), fontsize=fontsize + 1)
    if colorbar and scales:
        add_colorbar(fig, list(axs[:len(panels)]), scales, cmap, label="cross-attention",
                     length_px=axs[0].bbox.height)
    return fig, axs[:len(panels)]
