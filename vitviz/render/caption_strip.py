"""The caption as a strip of panels: the image, then one panel per word with its map.

Like the figures of Xu et al. 2015 ("Show, Attend and Tell"): every panel is the image the
model saw with the word's cross-attention map over it (:func:`vitviz.overlay`: each map is
min-max scaled on its own, upsampled bicubically, coloured and blended).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from .overlay import as_rgb_uint8, overlay


def caption_strip(
    image,
    grids,
    words: Sequence[str],
    *,
    title: Optional[str] = None,
    show_image: bool = True,
    max_cols: int = 6,
    panel_size: float = 2.2,
    cmap: str = "jet",
    alpha: float = 0.5,
    fontsize: int = 11,
    fig=None,
    axes=None,
):
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
        panel_size: width of a panel in inches.
        cmap, alpha: as :func:`vitviz.overlay`.
        fontsize: size of the words.
        fig: a matplotlib ``Figure`` to draw into (subplots are added to it).
        axes: matplotlib ``Axes`` to draw into, at least one per panel (extra ones are
            hidden); overrides ``fig``.

    Returns:
        ``(fig, axes)``: the figure and a flat ``np.ndarray`` of the panels' axes, image
        panel first. ``plt.show()`` is never called.

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
        raise ValueError(f"grids must be [W, gh, gw], got shape {maps.shape}")
    if len(maps) != len(words):
        raise ValueError(f"{len(maps)} maps for {len(words)} words; pass one map per word")
    if max_cols < 1:
        raise ValueError(f"max_cols must be >= 1, got {max_cols}")
    num = len(words) + int(show_image)
    num = max(num, 1)
    if axes is not None:
        axs = np.asarray(axes, dtype=object).ravel()
        if len(axs) < num:
            raise ValueError(f"{num} panels need {num} axes, got {len(axs)}")
        fig = axs[0].figure
    else:
        cols = min(num, max_cols)
        rows = math.ceil(num / cols)
        if fig is None:
            from matplotlib.figure import Figure  # no pyplot: no global figure state to leak

            fig = Figure(figsize=(cols * panel_size, rows * panel_size * img.shape[0] / img.shape[1]
                                  + 0.35 * rows + (0.4 if title else 0.0)),
                         layout="constrained")
        axs = np.asarray(fig.subplots(rows, cols, squeeze=False), dtype=object).ravel()
    panels = []
    if show_image or not words:
        panels.append((img, "" if words else "(no words)"))
    for m, w in zip(maps, words):
        panels.append((overlay(img, m, cmap=cmap, alpha=alpha), w))
    for ax, (picture, label) in zip(axs, panels):
        ax.imshow(picture)
        ax.set_title(label, fontsize=fontsize)
        ax.set_axis_off()
    for ax in axs[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=fontsize + 1)
    return fig, axs[:len(panels)]
