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

from ._overlay import ImageLike
from .figures import _numpy, map_grid, new_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def randomization_grid(results: Mapping[str, Any], image: ImageLike | None = None, *, index: int = 0, cmap: str = "jet",
                       alpha: float = 0.5, tile: int | None = None, ax: Axes | None = None) -> tuple[Figure, Axes]:
    """One row per method, one column per randomisation step, for input ``index``.

    Args:
        results: ``{method: Randomization}`` with the same steps.
        image: ``HxWx3`` uint8 image the model saw (or ``None``).
        index: which input of the batch.

    Returns:
        ``(fig, ax)``
    """
    names = list(results)
    if not names:
        raise ValueError("no randomization results to draw")
    steps = results[names[0]].steps
    maps = np.stack([_numpy(results[n].maps[:, index]) for n in names])  # [methods, S+1, gh, gw]
    return map_grid(maps, image, row_labels=names, col_labels=steps, cmap=cmap, alpha=alpha, tile=tile,
                    title="maps as the model is re-initialised from the top (cascade)", ax=ax)


def curves_figure(report: Any, *, width_px: int = 1500, height_px: int = 420) -> tuple[Figure, Any]:
    """Mean curves per method: token deletion, token insertion, ROAD MoRF (solid) and LeRF (dashed).

    Returns:
        ``(fig, axes)`` with 2 or 3 axes (ROAD only when the report has it).
    """
    panels = [("token deletion (MoRF)", {n: c.deletion for n, c in report.tokens.items()}),
              ("token insertion (MoRF)", {n: c.insertion for n, c in report.tokens.items()})]
    if report.road:
        panels.append(("ROAD: MoRF solid, LeRF dashed", {n: c.morf for n, c in report.road.items()}))
    fig = new_figure(width_px, height_px)
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
