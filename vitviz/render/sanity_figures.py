"""Figures of the sanity checks: maps per randomisation step, and perturbation curves per method.

Both take the :class:`vitviz.evaluate.sanity.SanityReport` (or its parts), return ``(fig, axes)`` and
never call ``plt.show()``.

Example:
    >>> rep = vitviz.evaluate.sanity.sanity_check(m, x, ["rollout", "relevance"])
    >>> fig, _ = randomization_grid(rep.randomization, image=view, index=0)
    >>> fig, _ = curves_figure(rep)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import RenderError
from ._overlay import DEFAULT_ALPHA, DEFAULT_CMAP, ImageLike
from .figures import _DPI, _numpy, check_dpi, map_grid, new_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _on_one_grid(maps: list[np.ndarray]) -> np.ndarray:
    """``[methods, S+1, gh, gw]`` from per-method ``[S+1, gh_m, gw_m]`` maps: a map on a coarser
    grid (CLS maps of Swin's last stage next to a baseline on the patch grid) is enlarged to the
    finest grid by nearest neighbour, so that each of its cells stays one block of colour."""
    gh = max(m.shape[-2] for m in maps)
    gw = max(m.shape[-1] for m in maps)
    out = []
    for m in maps:
        rows = (np.arange(gh) * m.shape[-2]) // gh  # [gh] source row of each target row
        cols = (np.arange(gw) * m.shape[-1]) // gw
        out.append(m[:, rows][:, :, cols])  # [S+1, gh, gw]
    return np.stack(out)


def randomization_grid(results: Mapping[str, Any], image: ImageLike | None = None, *, index: int = 0,
                       cmap: str = DEFAULT_CMAP, alpha: float | None = DEFAULT_ALPHA, smooth: bool = False,
                       tile: int | None = None, dpi: int = _DPI,
                       ax: Axes | None = None) -> tuple[Figure, Axes]:
    """One row per method, one column per randomisation step, for input ``index``.

    Methods whose maps are on different grids (on Swin: CLS maps of the last stage, 2x2 at 64
    px, and the baselines on the 16x16 patch grid) are drawn on the finest of them, each cell
    of a coarser map as one block.

    Args:
        results: ``{method: Randomization}`` with the same steps.
        image: ``HxWx3`` uint8 image the model saw (or ``None``).
        index: which input of the batch.
        cmap, alpha, smooth: as :func:`vitviz.overlay`.
        tile: tile size in pixels (default: from ``dpi``).
        dpi: the resolution the figure is drawn and saved at.
        ax: matplotlib axes to draw into.

    Returns:
        ``(fig, ax)``

    Raises:
        RenderError: no results, or results with different steps.
    """
    names = list(results)
    if not names:
        raise RenderError("no randomization results to draw")
    steps = results[names[0]].steps
    if any(results[n].steps != steps for n in names):
        raise RenderError("the randomization results of a figure must have the same steps")
    maps = _on_one_grid([_numpy(results[n].maps[:, index]) for n in names])  # [methods, S+1, gh, gw]
    return map_grid(maps, image, row_labels=names, col_labels=steps, cmap=cmap, alpha=alpha, smooth=smooth,
                    tile=tile, title="maps as the model is re-initialised from the top (cascade)", dpi=dpi, ax=ax)


def curves_figure(report: Any, *, width_px: int = 1500, height_px: int = 420,
                  dpi: int = _DPI) -> tuple[Figure, Any]:
    """Mean curves per method: token deletion, token insertion, ROAD MoRF (solid) and LeRF (dashed).

    Args:
        report: a :class:`vitviz.evaluate.sanity.SanityReport` (its ``tokens`` and ``road``).
        width_px, height_px: the figure's size in pixels at 100 dpi (the size in inches stays
            the same at other ``dpi``); a figure of ROAD alone is ``width_px / 2.5`` wide.
        dpi: the resolution the figure is drawn and saved at.

    Returns:
        ``(fig, axes)`` with one axes per panel: token deletion and insertion when the report
        has token curves (not on models without a token slot), ROAD when it has ROAD curves.

    Raises:
        RenderError: the report has neither token nor ROAD curves.
    """
    check_dpi(dpi)
    panels = []
    if report.tokens:
        panels += [("token deletion (MoRF)", {n: c.deletion for n, c in report.tokens.items()}),
                   ("token insertion (MoRF)", {n: c.insertion for n, c in report.tokens.items()})]
    if report.road:
        panels.append(("ROAD: MoRF solid, LeRF dashed", {n: c.morf for n, c in report.road.items()}))
    if not panels:
        raise RenderError("the report has no curves to draw (no token curves and no ROAD)")
    wide = width_px if len(panels) > 1 else width_px / 2.5  # one panel (ROAD alone): narrower
    fig = new_figure(wide * dpi / _DPI, height_px * dpi / _DPI, dpi)
    axes = fig.subplots(1, len(panels))
    colours: dict[str, Any] = {}
    for ax, (title, curves) in zip(np.atleast_1d(axes), panels):
        for name, c in curves.items():
            if c is None:
                continue
            y = _numpy(c).mean(0)
            x = np.linspace(0, 1, len(y))
            line, = ax.plot(x, y, label=name, color=colours.get(name))
            colours[name] = line.get_color()
            if title.startswith("ROAD"):
                ax.plot(x, _numpy(report.road[name].lerf).mean(0), "--", color=line.get_color())
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("share of patches removed" if "insertion" not in title else "share of patches shown")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("score of the class")
    np.atleast_1d(axes)[-1].legend(fontsize=8, loc="best")
    return fig, axes


__all__ = ["randomization_grid", "curves_figure"]
