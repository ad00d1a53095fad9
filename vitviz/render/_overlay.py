"""Heatmaps over images with OpenCV, and the scale rules every renderer shares.

Scale: a map is drawn through a colour map after ``(value - vmin) / (vmax - vmin)``,
clipped to ``[0, 1]``. ``norm`` says where ``vmin, vmax`` come from:

- ``"image"``: each map's own minimum and maximum (min-max per image, the default);
- ``"batch"``: the minimum and maximum over every map of the run, so that the same value
  has the same colour in every image;
- ``"none"``: the raw values on a fixed ``[0, 1]`` scale (attention probabilities), clipped.

A constant map (``vmin == vmax``) is drawn flat (every value at the bottom of the scale),
never divided by zero; :func:`map_scales` reports it in its notes.

Look: the default colour map is the perceptually uniform ``"inferno"`` (:data:`DEFAULT_CMAP`),
the opacity grows with the scaled value (``alpha=None``, see :func:`opacity`) and maps are
drawn as their patch blocks (``smooth=False``); ``cmap="jet", alpha=0.5, smooth=True`` is the
classic look of earlier versions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import RenderError

if TYPE_CHECKING:
    from matplotlib.colors import ListedColormap

_CV2_MAPS = {
    "jet": "COLORMAP_JET", "viridis": "COLORMAP_VIRIDIS", "inferno": "COLORMAP_INFERNO",
    "magma": "COLORMAP_MAGMA", "plasma": "COLORMAP_PLASMA", "turbo": "COLORMAP_TURBO",
    "hot": "COLORMAP_HOT", "bone": "COLORMAP_BONE", "cool": "COLORMAP_COOL",
    "parula": "COLORMAP_PARULA", "rainbow": "COLORMAP_RAINBOW", "cividis": "COLORMAP_CIVIDIS",
}

# what the renderers take: a path, PIL image, HxWx3 uint8 array or [3, H, W] tensor; a map: an
# [h, w] torch.Tensor or numpy array
ImageLike = Any
MapLike = Any

NORMS = ("image", "batch", "none")
MIN_OVERLAY_SIDE = 256  # overlays are shown at least this large on their short side (pixels)
SIZE_RANGE = (16, 8192)  # allowed explicit overlay sizes (short side, pixels)

# The default look. "inferno" is one of matplotlib's perceptually uniform colour maps (lightness
# rises monotonically, readable in grey and by colour-blind readers): S. van der Walt and N. Smith,
# "A better default colormap for matplotlib", SciPy 2015. Its brightest colour is the peak, so the
# maximum of a map never looks like a hole (jet's dark red does over blue).
DEFAULT_CMAP = "inferno"
# alpha=None: the opacity grows with the scaled value u, a = ALPHA_MAX * u ** ALPHA_GAMMA. u = 0
# leaves the image exactly as it is; the exponent keeps the low half of the scale light
# (u = 0.25: a = 0.1) so the image stays readable; ALPHA_MAX < 1 keeps a trace of the image
# under the peak.
DEFAULT_ALPHA: float | None = None
ALPHA_MAX = 0.8
ALPHA_GAMMA = 1.5


def as_rgb_uint8(image: ImageLike) -> np.ndarray:
    """An ``HxWx3`` uint8 RGB array from an RGB array or a PIL image."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL.Image
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise RenderError(
            f"image must be an HxWx3 uint8 RGB array or a PIL image, got {arr.dtype} {arr.shape}; "
            "convert it with vitviz.models.load_image(...) first"
        )
    return arr


def as_map(heatmap: MapLike) -> np.ndarray:
    """A finite 2-D float32 array from a ``[gh, gw]`` tensor or array.

    Leading size-1 axes (batch, head) and a trailing size-1 axis are dropped; a ``1x1`` grid (LeViT or
    EfficientViT at small inputs) stays ``[1, 1]``.

    Args:
        heatmap: ``[gh, gw]``, ``[1, ..., gh, gw]`` or ``[gh, gw, 1]`` tensor or array.

    Returns:
        ``[gh, gw]`` float32.

    Raises:
        RenderError: not 2-D after dropping those axes, or NaN / infinite values.
    """
    if hasattr(heatmap, "detach"):  # torch.Tensor
        heatmap = heatmap.detach().float().cpu().numpy()
    h = np.asarray(heatmap, dtype=np.float32)
    while h.ndim > 2 and h.shape[0] == 1:  # leading batch / head axes of size 1
        h = h[0]
    while h.ndim > 2 and h.shape[-1] == 1:  # a trailing channel axis of size 1
        h = h[..., 0]
    if h.ndim != 2:  # a 1x1 grid stays [1, 1]: squeezing it would leave a 0-D value
        raise RenderError(f"heatmap must be 2-D [gh, gw], got shape {np.shape(heatmap)}")
    if not np.isfinite(h).all():
        raise RenderError("heatmap contains NaN or infinite values")
    return h


def scale_map(heatmap: MapLike, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """``(h - vmin) / (vmax - vmin)`` clipped to ``[0, 1]`` as float32; a missing bound is the
    map's own minimum / maximum; ``vmin == vmax`` gives zeros (a flat map).

    Args:
        heatmap: ``[gh, gw]`` map (tensor or array).
        vmin: the value drawn as 0 (default: the map's minimum).
        vmax: the value drawn as 1 (default: the map's maximum).

    Returns:
        ``[gh, gw]`` float32 in ``[0, 1]``.

    Raises:
        RenderError: non-finite bounds, ``vmin > vmax``, or a map that is not 2-D.
    """
    h = as_map(heatmap)
    lo = float(h.min()) if vmin is None else float(vmin)
    hi = float(h.max()) if vmax is None else float(vmax)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise RenderError(f"vmin and vmax must be finite numbers, got {vmin}, {vmax}")
    if hi < lo:
        raise RenderError(f"vmin must not exceed vmax, got vmin={lo:g} > vmax={hi:g}")
    if hi == lo:
        return np.zeros_like(h)
    return np.clip((h - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def normalize_map(heatmap: MapLike) -> np.ndarray:
    """Min-max scale a 2-D map to ``[0, 1]``.

    Args:
        heatmap: ``[gh, gw]`` map (tensor or array).

    Returns:
        ``[gh, gw]`` float32 in ``[0, 1]`` (a constant map becomes zeros).

    Raises:
        RenderError: the map is not 2-D or holds NaN or infinite values.
    """
    return scale_map(heatmap)


@dataclass(frozen=True)
class Scale:
    """The colour scale of one map: values ``vmin .. vmax`` span the colour map.

    ``norm`` is the rule it came from; ``flat`` is True for a constant map (drawn in the lowest
    colour).
    """

    vmin: float
    vmax: float
    norm: str = "image"

    @property
    def flat(self) -> bool:
        return self.vmax <= self.vmin

    def describe(self) -> str:
        """A short text for a colour-bar label.

        Returns:
            What the scale spans (``"min-max of this map"``, ``"one scale for all images"``,
            ``"raw values"``).
        """
        return {"image": "min-max of this map", "batch": "one scale for all images",
                "none": "raw values"}[self.norm]


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise RenderError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    return norm


def map_scales(maps: Sequence[Any], norm: str = "image") -> tuple[list[Scale], list[str]]:
    """The colour scale of every map under a ``norm`` rule, and notes for the user.

    Args:
        maps: ``K`` maps, each ``[..., gh, gw]`` (tensor or array); with ``norm="image"`` one
            scale per map; ``"batch"``: one scale over all of them; ``"none"``: ``[0, 1]``.
        norm: ``"image"``, ``"batch"`` or ``"none"``.

    Returns:
        ``(scales, notes)``: one :class:`Scale` per map, and sentences about constant maps,
        a batch of one map (nothing shared) or values clipped by ``"none"``.

    Raises:
        RenderError: an unknown norm, or empty or non-finite maps.

    Example:
        >>> scales, notes = map_scales([m1, m2], "batch")
        >>> vitviz.overlay(img1, m1, vmin=scales[0].vmin, vmax=scales[0].vmax)
    """
    check_norm(norm)
    arrs = []
    for m in maps:
        a = m.detach().float().cpu().numpy() if hasattr(m, "detach") else np.asarray(m, dtype=np.float32)
        if a.size == 0 or not np.isfinite(a).all():
            raise RenderError("maps must be non-empty and finite to be drawn")
        arrs.append(a)
    notes: list[str] = []
    if norm == "image":
        scales = [Scale(float(a.min()), float(a.max()), "image") for a in arrs]
    elif norm == "batch":
        lo = min((float(a.min()) for a in arrs), default=0.0)
        hi = max((float(a.max()) for a in arrs), default=1.0)
        scales = [Scale(lo, hi, "batch") for _ in arrs]
        if len(arrs) == 1:
            notes.append("--norm batch with a single image: nothing is shared, the scale is that "
                         "image's own minimum and maximum")
    else:
        scales = [Scale(0.0, 1.0, "none") for _ in arrs]
        out = sum(bool((a < 0).any() or (a > 1).any()) for a in arrs)
        if out:
            notes.append(f"--norm none: {out} map(s) have values outside [0, 1]; they are clipped")
    flat = sum(1 for a, s in zip(arrs, scales) if float(a.min()) == float(a.max()) and s.norm == "image")
    if norm == "batch" and scales and scales[0].flat:
        flat = len(arrs)
    if flat:
        notes.append(f"{flat} map(s) are constant: drawn flat (no scale to show)")
    return scales, notes


def colormap_lut(cmap: str = DEFAULT_CMAP) -> np.ndarray:
    """The RGB table that :func:`colorize` uses for ``cmap``.

    Args:
        cmap: a colour map name :func:`colorize` accepts.

    Returns:
        ``[256, 3]`` uint8.
    """
    lut: np.ndarray = colorize(np.linspace(0.0, 1.0, 256, dtype=np.float32)[None], cmap)[0]
    return lut


def mpl_colormap(cmap: str = DEFAULT_CMAP) -> ListedColormap:
    """A matplotlib colour map with exactly the colours of :func:`colorize` (for colour bars)."""
    from matplotlib.colors import ListedColormap

    return ListedColormap(colormap_lut(cmap).astype(np.float64) / 255.0, name=f"vitviz-{cmap}")


def colorize(unit_map: np.ndarray, cmap: str = DEFAULT_CMAP) -> np.ndarray:
    """Colour a ``[0, 1]`` map with an OpenCV or matplotlib colour map.

    The map is rounded to 256 levels, ``rint(255 * u)``, and each level takes its colour from
    the colour map's table (made once per colour map).

    Args:
        unit_map: ``[H, W]`` float values in ``[0, 1]`` (clipped).
        cmap: an OpenCV colour map name (``"jet"``, ``"viridis"``, ...) or any matplotlib one.

    Returns:
        ``[H, W, 3]`` uint8 RGB.

    Raises:
        RenderError: an unknown colour map.
    """
    u8 = np.clip(np.rint(np.asarray(unit_map, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
    coloured: np.ndarray = _colour_table(cmap)[u8]
    return coloured


@lru_cache(maxsize=32)
def _colour_table(cmap: str) -> np.ndarray:
    """``[256, 3]`` uint8 RGB, read-only: the colour of each level of ``cmap`` (OpenCV's
    ``applyColorMap`` of the levels for OpenCV's maps, matplotlib's table otherwise)."""
    import cv2

    levels = np.arange(256, dtype=np.uint8)[None]  # [1, 256]
    if cmap in _CV2_MAPS and hasattr(cv2, _CV2_MAPS[cmap]):
        bgr = cv2.applyColorMap(levels, getattr(cv2, _CV2_MAPS[cmap]))  # [1, 256, 3]
        table: np.ndarray = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)[0]
    else:
        import matplotlib

        try:
            rgb = matplotlib.colormaps[cmap](np.arange(256))[:, :3]  # [256, 3] in [0, 1]
        except KeyError:
            raise RenderError(f"unknown colormap {cmap!r}; try one of {', '.join(_CV2_MAPS)}") from None
        table = (rgb * 255.0 + 0.5).astype(np.uint8)
    table.flags.writeable = False
    return table


def check_size(size: int | None) -> int | None:
    if size is not None and not SIZE_RANGE[0] <= int(size) <= SIZE_RANGE[1]:
        raise RenderError(f"size must be in {SIZE_RANGE[0]}..{SIZE_RANGE[1]} pixels, got {size}")
    return size


def display_image(image: ImageLike, size: int | None = None, min_side: int = MIN_OVERLAY_SIDE) -> np.ndarray:
    """The image at the size it is shown at.

    With ``size``: resized so that its short side is ``size`` pixels. Without: an image whose
    short side is at most half of ``min_side`` is enlarged by the smallest whole factor that
    reaches it (nearest neighbour: every input pixel becomes a clean block, e.g. 64 px -> 256 px,
    96 px -> 288 px); one between half and ``min_side`` is resized to exactly ``min_side``
    (bicubic, e.g. 224 px -> 256 px); larger images are returned unchanged.

    Args:
        image: ``HxWx3`` uint8 RGB image (or what :func:`vitviz.overlay` takes).
        size: the short side to show it at, in pixels; None for the rule above.
        min_side: the smallest short side shown without ``size``.

    Returns:
        ``[H', W', 3]`` uint8 RGB.

    Raises:
        RenderError: a malformed image or a size out of range.

    Shape:
        ``[H, W, 3]`` -> ``[H', W', 3]``
    """
    import cv2

    img = as_rgb_uint8(image)
    h, w = img.shape[:2]
    short = min(h, w)
    if size is None:
        if short >= min_side:
            return img
        if 2 * short > min_side:
            size = min_side
        else:
            k = math.ceil(min_side / short)
            return np.repeat(np.repeat(img, k, axis=0), k, axis=1)
    check_size(size)
    s = int(size) / short
    if s == 1.0:
        return img
    if s > 1 and abs(s - round(s)) < 1e-9:
        k = round(s)
        return np.repeat(np.repeat(img, k, axis=0), k, axis=1)
    new = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(img, new, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)


def upsample_map(unit: np.ndarray, height: int, width: int, *, smooth: bool = False) -> np.ndarray:
    """A ``[gh, gw]`` map resized to ``height x width`` pixels.

    ``smooth=False`` draws each patch as a block of constant value (nearest neighbour): pixel
    ``x`` takes column ``floor((x + 0.5) * gw / width)``, so the edge between blocks ``k - 1``
    and ``k`` lands on the pixel nearest to ``k * width / gw`` when the size is not a multiple
    of the grid. ``smooth=True`` interpolates bicubically (values clipped to the input's range
    when the input is in ``[0, 1]``).

    Args:
        unit: ``[gh, gw]`` float map.
        height, width: the output size in pixels.
        smooth: interpolate instead of drawing patch blocks.

    Returns:
        ``[height, width]`` float32.
    """
    u = np.asarray(unit, dtype=np.float32)
    gh, gw = u.shape
    if smooth:
        import cv2

        return np.clip(cv2.resize(u, (width, height), interpolation=cv2.INTER_CUBIC), 0.0, 1.0)
    out: np.ndarray = u.reshape(-1)[_block_cells(height, width, gh, gw)]  # [height, width]
    return out


def check_alpha(alpha: float | None) -> float | None:
    """``alpha`` if it is None (value-scaled opacity) or a number in ``[0, 1]``."""
    if alpha is not None and not (isinstance(alpha, (int, float)) and 0.0 <= float(alpha) <= 1.0):
        raise RenderError(f"alpha must be a number in [0, 1] or None (opacity grows with the value), got {alpha!r}")
    return alpha


def opacity(unit: np.ndarray, alpha: float | None = None) -> np.ndarray | float:
    """The overlay's opacity for values ``unit`` in ``[0, 1]``.

    ``alpha=None``: ``ALPHA_MAX * unit ** ALPHA_GAMMA``, so a value at the bottom of the scale
    leaves the image exactly as it is and the peak covers it most; a number: that constant.

    Args:
        unit: ``[H, W]`` values in ``[0, 1]``.
        alpha: None, or a constant opacity in ``[0, 1]``.

    Returns:
        ``[H, W]`` float32 opacity, or the constant.
    """
    if alpha is not None:
        return float(alpha)
    a: np.ndarray = (ALPHA_MAX * np.power(np.clip(unit, 0.0, 1.0), ALPHA_GAMMA)).astype(np.float32)
    return a


def blend(image: np.ndarray, unit: np.ndarray, cmap: str, alpha: float | None) -> np.ndarray:
    """``(1 - a) * image + a * colour(unit)`` with ``a`` from :func:`opacity`, as uint8.

    Args:
        image: ``[H, W, 3]`` uint8 RGB.
        unit: ``[H, W]`` values in ``[0, 1]`` at the image's size.
        cmap: colour map name (:func:`colorize`).
        alpha: None (value-scaled opacity) or a constant.

    Returns:
        ``[H, W, 3]`` uint8 RGB.
    """
    a = opacity(unit, alpha)
    if not isinstance(a, float):
        a = a[..., None]  # [H, W, 1]
    # (1 - a) * image + a * colour computed in place, in the same float32 operations as the
    # formula (so the same pixels) without its temporaries: about half the time, which matters
    # to the gallery, where blending is most of the drawing
    out = colorize(unit, cmap).astype(np.float32)  # [H, W, 3]
    out *= a
    base = image.astype(np.float32)
    base *= 1.0 - a
    out += base
    np.rint(out, out=out)
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)


def _block_cells(height: int, width: int, gh: int, gw: int) -> np.ndarray:
    """``[height, width]`` int64: the patch (``row * gw + col``) under each pixel when a
    ``[gh, gw]`` map is drawn as blocks (the rule of :func:`upsample_map`)."""
    rows = np.minimum(((np.arange(height) + 0.5) * gh / height).astype(np.int64), gh - 1)  # [height]
    cols = np.minimum(((np.arange(width) + 0.5) * gw / width).astype(np.int64), gw - 1)  # [width]
    cells: np.ndarray = rows[:, None] * gw + cols[None, :]
    return cells


def _table_offsets(height: int, width: int, gh: int, gw: int) -> np.ndarray:
    """``[height, width, 3]`` int32, read-only: where each pixel's channel starts in the
    ``[gh * gw, 3, 256]`` table of :func:`_blend_table` (add the pixel's value to look it up).
    Kept for sizes up to 1024 x 1024 pixels (12 MB each, the last 8 sizes), made anew above."""
    if height * width <= 1 << 20:
        return _kept_offsets(height, width, gh, gw)
    return _offsets(height, width, gh, gw)


def _offsets(height: int, width: int, gh: int, gw: int) -> np.ndarray:
    cells = _block_cells(height, width, gh, gw).astype(np.int32)
    offsets: np.ndarray = (cells[..., None] * 3 + np.arange(3, dtype=np.int32)) * 256  # [height, width, 3]
    offsets.flags.writeable = False
    return offsets


_kept_offsets = lru_cache(maxsize=8)(_offsets)


_LEVELS = np.arange(256, dtype=np.float32)  # every uint8 value of an image channel


def _blend_table(unit: np.ndarray, cmap: str, alpha: float | None) -> np.ndarray:
    """``[gh * gw * 3 * 256]`` uint8: what :func:`blend` gives for every patch, channel and
    image value (patch ``p``, channel ``c``, value ``v`` at ``(p * 3 + c) * 256 + v``).

    Each entry is computed in the float32 operations of :func:`blend`, ``rint(colour * a +
    v * (1 - a))``, so looking pixels up in the table gives blend's pixels bit for bit, at the
    cost of one table per map instead of arithmetic on every pixel.
    """
    a = opacity(unit, alpha)  # [gh, gw] float32, or a constant
    colour = colorize(unit, cmap).astype(np.float32)  # [gh, gw, 3]
    if isinstance(a, float):  # as blend: colour * a with a float32 a, the image times a Python float 1 - a
        weight, keep = np.float32(a), np.float32(1.0 - a)
        table = _LEVELS * keep + colour[..., None] * weight  # [gh, gw, 3, 256]
    else:
        a4 = a[..., None, None]  # [gh, gw, 1, 1]
        table = _LEVELS * (1.0 - a4) + colour[..., None] * a4  # [gh, gw, 3, 256]
    np.rint(table, out=table)
    np.clip(table, 0, 255, out=table)
    flat: np.ndarray = table.astype(np.uint8).reshape(-1)
    return flat


def overlay(image: ImageLike, heatmap: MapLike, *, cmap: str = DEFAULT_CMAP, alpha: float | None = DEFAULT_ALPHA,
            vmin: float | None = None, vmax: float | None = None, smooth: bool = False) -> np.ndarray:
    """Draw a patch-grid heatmap over an image.

    The map is scaled to ``u = (h - vmin) / (vmax - vmin)`` in ``[0, 1]`` (clipped), drawn at
    the image size as patch blocks (``smooth=True``: bicubic interpolation), coloured, and
    blended: ``out = (1 - a) * image + a * colour(u)``. By default (``alpha=None``) the opacity
    grows with the value, ``a = 0.8 * u ** 1.5``: the lowest value leaves the image as it is and
    the peak changes it most, whatever the colours under it. A number gives a constant blend
    (``cmap="jet", alpha=0.5, smooth=True`` is the classic look). Without ``vmin`` / ``vmax`` the
    map's own minimum / maximum are used (min-max per image); pass the same ``vmin, vmax`` to
    several calls (e.g. from :func:`map_scales` with ``norm="batch"``) to give equal values equal
    colours in every image. A constant map has ``u = 0`` everywhere: the image unchanged by
    default, the colour map's lowest colour with a constant ``alpha``.

    Args:
        image: ``HxWx3`` uint8 RGB array or PIL image (the image the model saw, e.g.
            ``model.preprocessor.view(path)``; enlarge it first with :func:`display_image`).
        heatmap: ``[gh, gw]`` map (tensor or array), any scale.
        cmap: OpenCV colormap name (``"inferno"``, ``"jet"``, ...) or any matplotlib name; the
            default is the perceptually uniform ``"inferno"``.
        alpha: None for opacity that grows with the value (the default), or a constant weight
            of the colour in ``[0, 1]``; ``alpha=0`` returns the image unchanged.
        vmin, vmax: the values drawn in the lowest and highest colour (default: the map's
            own minimum and maximum).
        smooth: interpolate the map bicubically instead of drawing its patches as blocks.

    Returns:
        ``HxWx3`` uint8 RGB array.

    Raises:
        RenderError: ``alpha`` outside ``[0, 1]``, a malformed image or map, or an unknown
            colour map.

    Example:
        >>> vis = vitviz.overlay(img, vitviz.rollout(rec.attentions)[0])
        >>> classic = vitviz.overlay(img, heat, cmap="jet", alpha=0.5, smooth=True)
        >>> same = vitviz.overlay(img, heat, vmin=0.0, vmax=0.05)   # a fixed scale
    """
    check_alpha(alpha)
    img = as_rgb_uint8(image)
    unit = scale_map(heatmap, vmin, vmax)  # [gh, gw] in [0, 1]
    if alpha == 0.0:
        return np.array(img)  # a copy
    h, w = img.shape[:2]
    gh, gw = unit.shape
    if not smooth and gh * gw * 256 <= h * w:
        # patch blocks over more pixels than the table has entries: blend's pixels looked up
        # per patch, channel and image value (the same bits; about half the time at 256 px)
        looked_up: np.ndarray = _blend_table(unit, cmap, alpha).take(_table_offsets(h, w, gh, gw) + img)
        return looked_up  # [H, W, 3]
    up = upsample_map(unit, h, w, smooth=smooth)  # [H, W]
    return blend(img, up, cmap, alpha)


def overlay_region(image: ImageLike, heatmap: MapLike, box: Sequence[float], *, cmap: str = DEFAULT_CMAP,
                   alpha: float | None = DEFAULT_ALPHA, smooth: bool = False) -> np.ndarray:
    """Draw a patch-grid heatmap over the part of a full-resolution image the model saw.

    ``box`` is the model's view on ``image`` (:meth:`vitviz.models.Preprocess.region`): the
    map is min-max scaled, drawn at the box's size in the image's own pixels (patch blocks, or
    bicubic with ``smooth=True``), coloured and blended inside the box as :func:`overlay` does;
    pixels the model never saw (cut off by the centre crop) stay as they are. Parts of the box
    outside the image (padding) are dropped.

    Args:
        image: ``HxWx3`` uint8 RGB array or PIL image, the original picture.
        heatmap: ``[gh, gw]`` map (tensor or array), any scale.
        box: ``(left, top, right, bottom)`` in ``image`` pixels (floats allowed).
        cmap, alpha, smooth: as :func:`overlay`.

    Returns:
        ``HxWx3`` uint8 RGB array of ``image``'s size.

    Raises:
        RenderError: ``alpha`` outside ``[0, 1]``, a malformed box, image or map.

    Example:
        >>> pre = m.preprocessor
        >>> vis = overlay_region(load_image("cat.jpg"), heat[0], pre.region("cat.jpg"))
    """
    check_alpha(alpha)
    img = as_rgb_uint8(image)
    h, w = img.shape[:2]
    try:
        left, top, right, bottom = (float(v) for v in box)
    except (TypeError, ValueError):
        raise RenderError(f"box must be four numbers (left, top, right, bottom), got {box!r}") from None
    if not (right > left and bottom > top) or not all(np.isfinite((left, top, right, bottom))):
        raise RenderError(f"box must be finite with right > left and bottom > top, got {box!r}; "
                          "use model.preprocessor.region(image)")
    x0, y0 = int(round(left)), int(round(top))
    bw, bh = max(int(round(right)) - x0, 1), max(int(round(bottom)) - y0, 1)
    unit = normalize_map(heatmap)  # [gh, gw] in [0, 1]
    up = upsample_map(unit, bh, bw, smooth=smooth)  # [bh, bw]
    # the part of the box inside the image
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x0 + bw, w), min(y0 + bh, h)
    out: np.ndarray = img.copy()
    if ix1 <= ix0 or iy1 <= iy0 or alpha == 0.0:
        return out
    out[iy0:iy1, ix0:ix1] = blend(img[iy0:iy1, ix0:ix1], up[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0], cmap, alpha)
    return out
