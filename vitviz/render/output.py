"""How the commands write what they draw: figure format and dpi, overlay size, scale rule.

One :class:`OutputOptions` carries the choices of ``--format``, ``--dpi``, ``--size``,
``--norm``, ``--colorbar``, ``--bare``, ``--cmap``, ``--alpha`` and ``--smooth``; its methods
write overlays and figures by those rules (atomically), and collect notes for the user
(constant maps, a batch of one). Figures go out as PNG, JPEG, PDF or SVG; overlays stay raster
(JPEG when the format is ``jpg``, else PNG).

A single overlay is a small figure by default: a title (what the caller says: model, method,
layers, class) with the map's grid size, and a colour bar that states the scale. ``bare=True``
writes the plain overlay pixels instead, for reuse in other figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._overlay import (
    DEFAULT_ALPHA,
    DEFAULT_CMAP,
    NORMS,
    MapLike,
    Scale,
    as_map,
    check_alpha,
    check_norm,
    check_size,
    display_image,
    map_scales,
    overlay,
)
from .figures import _DPI, check_dpi, check_format, overlay_figure, save_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass
class OutputOptions:
    """The output choices of a run.

    Args:
        format: figures: ``"png"``, ``"jpg"``, ``"pdf"`` or ``"svg"``.
        dpi: resolution figures are drawn and saved at (50..600).
        size: short side of overlays in pixels; None: the image the model saw, enlarged to at
            least 256 px when smaller (:func:`vitviz.render.display_image`).
        norm: ``"image"``, ``"batch"`` or ``"none"`` (see :mod:`vitviz.render._overlay`).
        colorbar: a colour bar that states the scale on overlays, panels and grids (the default).
        bare: write single overlays as the plain overlay pixels (no title, no colour bar).
        cmap, alpha, smooth: as :func:`vitviz.overlay` (default: ``"inferno"``, opacity that
            grows with the value, patch blocks).
    """

    format: str = "png"
    dpi: int = _DPI
    size: int | None = None
    norm: str = "image"
    colorbar: bool = True
    cmap: str = DEFAULT_CMAP
    alpha: float | None = DEFAULT_ALPHA
    smooth: bool = False
    bare: bool = False
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.format = check_format(self.format)
        self.dpi = check_dpi(self.dpi)
        check_size(self.size)
        check_norm(self.norm)
        check_alpha(self.alpha)

    @property
    def overlay_ext(self) -> str:
        """Overlays stay raster: ``jpg`` with ``format="jpg"``, else ``png``."""
        return "jpg" if self.format == "jpg" else "png"

    def note(self, text: str) -> None:
        """Keep a note for the command to print once (a repeated note is kept once).

        Args:
            text: the note.
        """
        if text not in self.notes:
            self.notes.append(text)

    def scales(self, maps: Sequence[Any]) -> list[Scale]:
        """The scale of each map of one method over the run, by :attr:`norm`.

        Args:
            maps: the method's maps, each ``[gh, gw]``.

        Returns:
            One :class:`Scale` per map; the notes about them (constant maps, ...) are kept in
            :attr:`notes`.
        """
        scales, notes = map_scales(maps, self.norm)
        for n in notes:
            self.note(n)
        return scales

    def overlay_title(self, title: str | None, heat: MapLike) -> str:
        """The title of a single overlay: ``title`` with the map's grid size (``"14×14 patches"``)
        at the end of its first line.

        Args:
            title: what the caller says (model, method, layers, class), or None.
            heat: the ``[gh, gw]`` map.

        Returns:
            The title text.
        """
        gh, gw = as_map(heat).shape
        grid = f"{gh}×{gw}\u00a0patches"  # a no-break space: wrapped titles keep "8×8 patches" on one line
        if not title:
            return grid
        first, _, rest = title.partition("\n")
        return f"{first} · {grid}" + (f"\n{rest}" if rest else "")

    def save_overlay(self, path: str | Path, view: np.ndarray, heat: MapLike, scale: Scale | None = None, *,
                     label: str = "", title: str | None = None) -> Path:
        """Write the overlay of a map over the image at the display size.

        By default a figure: ``title`` with the grid size over the overlay, and a colour bar
        (unless :attr:`colorbar` is off); with :attr:`bare`, the plain overlay pixels.

        Args:
            path: the file; its suffix is set to :attr:`overlay_ext`.
            view: ``HxWx3`` uint8 RGB image the model saw.
            heat: ``[gh, gw]`` map.
            scale: the map's scale (from :meth:`scales`), or None for its own range.
            label: what the colour bar measures.
            title: model, method, layers, class (the grid size is added).

        Returns:
            The path written.
        """
        from .._util.files import atomic_write_bytes

        path = Path(path).with_suffix(f".{self.overlay_ext}")
        big = display_image(view, self.size)  # [H', W', 3]
        lo, hi = (scale.vmin, scale.vmax) if scale is not None else (None, None)
        if not self.bare:
            fig, _ = overlay_figure(big, heat, cmap=self.cmap, alpha=self.alpha, smooth=self.smooth, vmin=lo,
                                    vmax=hi, norm=scale.norm if scale is not None else self.norm, label=label,
                                    title=self.overlay_title(title, heat), colorbar=self.colorbar, dpi=self.dpi)
            return save_figure(fig, path, dpi=self.dpi, format=self.overlay_ext)
        pic = overlay(big, heat, cmap=self.cmap, alpha=self.alpha, vmin=lo, vmax=hi, smooth=self.smooth)
        return atomic_write_bytes(path, encode_image(pic, self.overlay_ext))

    def save_original_overlay(self, path: str | Path, original: np.ndarray, heat: MapLike,
                              box: Sequence[float], *, label: str = "", title: str | None = None) -> Path:
        """Write the overlay of a map over the original picture at its own resolution
        (``--on-original``): a figure with title and colour bar as :meth:`save_overlay`, or the
        plain pixels with :attr:`bare`.

        The map is drawn on its own scale (:func:`vitviz.render.overlay_region` scales each
        map min-max), so the colour bar states the map's own range.

        Args:
            path: the file; its suffix is set to :attr:`overlay_ext`.
            original: ``HxWx3`` uint8 RGB picture at its own size.
            heat: ``[gh, gw]`` map.
            box: the model's view on ``original`` (:meth:`vitviz.models.Preprocess.region`).
            label: what the colour bar measures.
            title: model, method, layers, class (the grid size is added).

        Returns:
            The path written.
        """
        from .._util.files import atomic_write_bytes
        from ._overlay import overlay_region

        path = Path(path).with_suffix(f".{self.overlay_ext}")
        pic = overlay_region(original, heat, box, cmap=self.cmap, alpha=self.alpha, smooth=self.smooth)  # [H, W, 3]
        if not self.bare:
            h = as_map(heat)
            # the picture is already coloured: alpha=0 draws it as it is, next to the bar of
            # the colours overlay_region used (cmap over the map's min..max)
            fig, _ = overlay_figure(pic, h, cmap=self.cmap, alpha=0.0, vmin=float(h.min()),
                                    vmax=float(h.max()), label=label, title=self.overlay_title(title, h),
                                    colorbar=self.colorbar, dpi=self.dpi)
            return save_figure(fig, path, dpi=self.dpi, format=self.overlay_ext)
        return atomic_write_bytes(path, encode_image(pic, self.overlay_ext))

    def save_figure(self, fig: Figure, path: str | Path) -> Path:
        """Write a figure in :attr:`format` at :attr:`dpi`.

        Args:
            fig: the matplotlib figure.
            path: the file; its suffix is set to the format's.

        Returns:
            The path written.
        """
        return save_figure(fig, path, dpi=self.dpi, format=self.format)


def encode_image(rgb: np.ndarray, ext: str = "png") -> bytes:
    """PNG or JPEG bytes of an ``HxWx3`` uint8 RGB image."""
    import cv2

    arr = np.ascontiguousarray(rgb)
    params = [cv2.IMWRITE_JPEG_QUALITY, 92] if ext == "jpg" else []
    ok, buf = cv2.imencode(f".{ext}", cv2.cvtColor(arr, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise OSError(f"OpenCV could not encode the image as {ext}")
    return buf.tobytes()


__all__ = ["OutputOptions", "encode_image", "NORMS"]
