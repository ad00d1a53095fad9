"""Heatmaps over images with OpenCV, and the scale rules every renderer shares.

Scale: a map is drawn through a colour map after ``(value - vmin) / (vmax - vmin)``,
clipped to ``[0, 1]``. ``norm`` says where ``vmin, vmax`` come from:

- ``"image"``: each map's own minimum and maximum (min-max per image, the default);
- ``"batch"``: the minimum and maximum over every map of the run, so that the same value
  has the same colour in every image;
- ``"none"``: the raw values on a fixed ``[0, 1]`` scale (attention probabilities), clipped.

A constant map (``vmin == vmax``) is drawn flat in the colour map's lowest colour, never
divided by zero; :func:`map_scales` reports it in its notes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
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


def colormap_lut(cmap: str = "jet") -> np.ndarray:
    """The RGB table that :func:`colorize` uses for ``cmap``.

    Args:
        cmap: a colour map name :func:`colorize` accepts.

    Returns:
        ``[256, 3]`` uint8.
    """
    lut: np.ndarray = colorize(np.linspace(0.0, 1.0, 256, dtype=np.float32)[None], cmap)[0]
    return lut


def mpl_colormap(cmap: str = "jet") -> ListedColormap:
    """A matplotlib colour map with exactly the colours of :func:`colorize` (for colour bars)."""
    from matplotlib.colors import ListedColormap

    return ListedColormap(colormap_lut(cmap).astype(np.float64) / 255.0, name=f"vitviz-{cmap}")


def colorize(unit_map: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """Colour a ``[0, 1]`` map with an OpenCV or matplotlib colour map.

    Args:
        unit_map: ``[H, W]`` float values in ``[0, 1]`` (clipped).
        cmap: an OpenCV colour map name (``"jet"``, ``"viridis"``, ...) or any matplotlib one.

    Returns:
        ``[H, W, 3]`` uint8 RGB.

    Raises:
        RenderError: an unknown colour map.
    """
    import cv2

    u8 = np.clip(np.rint(np.asarray(unit_map, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
    if cmap in _CV2_MAPS and hasattr(cv2, _CV2_MAPS[cmap]):
        bgr = cv2.applyColorMap(u8, getattr(cv2, _CV2_MAPS[cmap]))
        rgb: np.ndarray = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        return rgb
    import matplotlib

    try:
        lut = matplotlib.colormaps[cmap](np.arange(256))[:, :3]  # [256, 3] in [0, 1]
    except KeyError:
        raise RenderError(f"unknown colormap {cmap!r}; try one of {', '.join(_CV2_MAPS)}") from None
    coloured: np.ndarray = (lut[u8] * 255.0 + 0.5).astype(np.uint8)
    return coloured


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


def overlay(image: ImageLike, heatmap: MapLike, *, cmap: str = "jet", alpha: float = 0.5, vmin: float | None = None,
            vmax: float | None = None) -> np.ndarray:
    """Draw a patch-grid heatmap over an image.

    The map is scaled to ``[0, 1]`` by ``(h - vmin) / (vmax - vmin)`` (clipped), upsampled
    to the image size with bicubic interpolation, coloured, and blended:
    ``out = (1 - alpha) * image + alpha * colour``. Without ``vmin`` / ``vmax`` the map's own
    minimum / maximum are used (min-max per image); pass the same ``vmin, vmax`` to several
    calls (e.g. from :func:`map_scales` with ``norm="batch"``) to give equal values equal
    colours in every image. A constant map is drawn flat in the colour map's lowest colour.

    Args:
        image: ``HxWx3`` uint8 RGB array or PIL image (the image the model saw, e.g.
            ``model.preprocessor.view(path)``; enlarge it first with :func:`display_image`).
        heatmap: ``[gh, gw]`` map (tensor or array), any scale.
        cmap: OpenCV colormap name (``"jet"``, ``"inferno"``, ...) or any matplotlib name.
        alpha: weight of the heatmap; ``alpha=0`` returns the image unchanged.
        vmin, vmax: the values drawn in the lowest and highest colour (default: the map's
            own minimum and maximum).

    Returns:
        ``HxWx3`` uint8 RGB array.

    Raises:
        RenderError: ``alpha`` outside ``[0, 1]``, a malformed image or map, or an unknown
            colour map.

    Example:
        >>> vis = vitviz.overlay(img, vitviz.rollout(rec.attentions)[0], alpha=0.5)
        >>> same = vitviz.overlay(img, heat, vmin=0.0, vmax=0.05)   # a fixed scale
    """
    import cv2

    if not 0.0 <= alpha <= 1.0:
        raise RenderError(f"alpha must be in [0, 1], got {alpha}")
    img = as_rgb_uint8(image)
    unit = scale_map(heatmap, vmin, vmax)  # [gh, gw] in [0, 1]
    if alpha == 0.0:
        return np.array(img)  # a copy
    h, w = img.shape[:2]
    up = np.clip(cv2.resize(unit, (w, h), interpolation=cv2.INTER_CUBIC), 0.0, 1.0)  # [H, W]
    colour = colorize(up, cmap).astype(np.float32)  # [H, W, 3]
    out = (1.0 - alpha) * img.astype(np.float32) + alpha * colour
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def overlay_region(image: ImageLike, heatmap: MapLike, box: Sequence[float], *, cmap: str = "jet",
                   alpha: float = 0.5) -> np.ndarray:
    """Draw a patch-grid heatmap over the part of a full-resolution image the model saw.

    ``box`` is the model's view on ``image`` (:meth:`vitviz.models.Preprocess.region`): the
    map is min-max scaled, upsampled bicubically to the box's size in the image's own pixels,
    coloured and blended inside the box as :func:`overlay` does; pixels the model never saw
    (cut off by the centre crop) stay as they are. Parts of the box outside the image (padding)
    are dropped.

    Args:
        image: ``HxWx3`` uint8 RGB array or PIL image, the original picture.
        heatmap: ``[gh, gw]`` map (tensor or array), any scale.
        box: ``(left, top, right, bottom)`` in ``image`` pixels (floats allowed).
        cmap, alpha: as :func:`overlay`.

    Returns:
        ``HxWx3`` uint8 RGB array of ``image``'s size.

    Raises:
        RenderError: ``alpha`` outside ``[0, 1]``, a malformed box, image or map.

    Example:
        >>> pre = m.preprocessor
        >>> vis = overlay_region(load_image("cat.jpg"), heat[0], pre.region("cat.jpg"))
    """
    import cv2

    from ..errors import RenderError

    if not 0.0 <= alpha <= 1.0:
        raise RenderError(f"alpha must be in [0, 1], got {alpha}")
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
    up = np.clip(cv2.resize(unit, (bw, bh), interpolation=cv2.INTER_CUBIC), 0.0, 1.0)  # [bh, bw]
    # the part of the box inside the image
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x0 + bw, w), min(y0 + bh, h)
    out: np.ndarray = img.copy()
    if ix1 <= ix0 or iy1 <= iy0:
        return out
    colour = colorize(up[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0], cmap).astype(np.float32)  # [h', w', 3]
    patch = img[iy0:iy1, ix0:ix1].astype(np.float32)
    out[iy0:iy1, ix0:ix1] = np.clip(np.rint((1.0 - alpha) * patch + alpha * colour), 0, 255).astype(np.uint8)
    return out
