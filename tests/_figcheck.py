"""Read a matplotlib figure back: the texts it really draws, their boxes, the panel sizes.

Used by the readability tests; independent of vitviz's own layout code (it records what the
Agg renderer is asked to draw, then asks each text for its box).
"""

from __future__ import annotations

import re


def drawn_texts(fig) -> list:
    """``(text, bbox)`` of every non-empty text the figure draws (ticks outside the view,
    hidden axes and switched-off axes draw nothing and are not listed).

    Every ``Text`` whose ``draw`` runs is recorded, multi-line texts (wrapped titles) included:
    the renderer is told which Text a line belongs to only for single-line texts."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    renderer = canvas.get_renderer()
    seen = {}
    original = Text.draw

    def record(self, renderer_):
        if self.get_visible() and str(self.get_text()).strip():
            seen[id(self)] = self
        return original(self, renderer_)

    Text.draw = record
    try:
        fig.draw(renderer)
    finally:
        Text.draw = original
    return [(t.get_text(), t.get_window_extent(renderer)) for t in seen.values()]


def overlapping_labels(fig, tol: float = 1.0) -> list:
    """Pairs of drawn texts whose boxes overlap by more than ``tol`` pixels in both directions."""
    boxes = drawn_texts(fig)
    bad = []
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            (ta, a), (tb, b) = boxes[i], boxes[j]
            dx = min(a.x1, b.x1) - max(a.x0, b.x0)
            dy = min(a.y1, b.y1) - max(a.y0, b.y0)
            if dx > tol and dy > tol:
                bad.append((ta, tb))
    return bad


def texts_inside_figure(fig, tol: float = 2.0) -> list:
    """Drawn texts that stick out of the figure canvas (cut off when saved without bbox)."""
    w, h = fig.bbox.width, fig.bbox.height
    return [t for t, b in drawn_texts(fig) if b.x0 < -tol or b.y0 < -tol or b.x1 > w + tol or b.y1 > h + tol]


_MOSAIC = re.compile(r"vitviz-mosaic-(\d+)x(\d+)")


def panel_sizes(fig) -> list:
    """``(width, height)`` in pixels of every panel drawn as an image (a mosaic counts as its
    rows x cols tiles, read from the image's gid)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    out = []
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        for im in ax.images:
            box = im.get_window_extent(renderer)
            m = _MOSAIC.fullmatch(im.get_gid() or "")
            rows, cols = (int(m.group(1)), int(m.group(2))) if m else (1, 1)
            out.append((box.width / cols, box.height / rows))
    return out
