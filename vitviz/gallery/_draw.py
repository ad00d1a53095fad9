"""Per-image outputs of a gallery: the input view, one overlay PNG and one ``.npy`` per method.

Runs in the gallery's render threads (OpenCV and NumPy release the GIL for the heavy parts),
so rendering and PNG encoding of one batch overlap the model's work on the next.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .._util.files import atomic_write_bytes, save_npy, save_png

_BAND = 16  # height of the label band under each tile of a multi-map grid, in pixels
# longer side of each tile of a multi-map grid (heads, words): the maps hold gh x gw values,
# so smaller tiles lose nothing of them and keep the grid cheap to draw and encode
TILE_MAX = 112


def _jpeg(rgb: np.ndarray, quality: int = 92) -> bytes:
    """JPEG bytes of an RGB image, without chroma subsampling (thin coloured details survive)."""
    import cv2

    params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    if hasattr(cv2, "IMWRITE_JPEG_SAMPLING_FACTOR"):  # OpenCV >= 4.5.5
        params += [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise OSError("OpenCV could not encode a JPEG")
    return buf.tobytes()


def _ascii_label(text: str, width_px: int) -> str:
    """OpenCV's Hershey fonts draw ASCII only: other characters become '?'; cut to fit."""
    s = "".join(c if 32 <= ord(c) < 127 else "?" for c in str(text))
    max_chars = max(1, width_px // 7)
    return s if len(s) <= max_chars else s[:max_chars - 1] + "~"


def tile(images: Sequence[np.ndarray], names: Sequence[str] | None = None) -> np.ndarray:
    """A grid of equally sized ``HxWx3`` uint8 tiles, ``ceil(sqrt(K))`` columns, each with a
    white label band under it when ``names`` are given.

    Shape:
        images: K x ``[H, W, 3]`` -> ``[rows * (H + band), cols * W, 3]``
    """
    import cv2

    k = len(images)
    h, w = images[0].shape[:2]
    cols = math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    band = _BAND if names is not None else 0
    out = np.full((rows * (h + band), cols * w, 3), 255, np.uint8)  # [rows*(H+band), cols*W, 3]
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        y, x = r * (h + band), c * w
        out[y:y + h, x:x + w] = im
        if names is not None:
            cv2.putText(out, _ascii_label(names[i], w), (x + 3, y + h + band - 4),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def _tile_view(view: np.ndarray) -> np.ndarray:
    """The view shrunk (area interpolation) so that its longer side is at most ``TILE_MAX``."""
    import cv2

    h, w = view.shape[:2]
    scale = TILE_MAX / max(h, w)
    if scale >= 1.0:
        return view
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(view, size, interpolation=cv2.INTER_AREA)  # [h', w', 3]


def render_image(out_dir: Path, name: str, view: np.ndarray, maps: dict, names: dict,
                 *, cmap: str, alpha: float, norm: str = "image") -> tuple[str, dict]:
    """Write the outputs of one image and describe them.

    One map: ``vitviz.overlay`` of it over the view, at the view's size. Several maps (heads,
    words): a grid of overlays over the view shrunk to at most ``TILE_MAX`` pixels, each tile
    labelled with its name. The raw maps go to ``.npy`` unchanged.

    Args:
        out_dir: the gallery folder.
        name: the image's safe output stem.
        view: ``[H, W, 3]`` uint8, the image as the model saw it.
        maps: method -> ``[gh, gw]`` or ``[K, gh, gw]`` float32 array (all finite).
        names: method -> the ``K`` map names (multi-map methods) or ``None``.
        cmap, alpha: as :func:`vitviz.overlay`.
        norm: ``"image"`` (each map min-max scaled on its own) or ``"none"`` (raw values on
            ``[0, 1]``, the same scale in every image).

    Returns:
        ``(input image path, {method: {"png", "npy", "shape"[, "names"]}})``, paths relative
        to ``out_dir`` with ``/`` separators.
    """
    from ..render import overlay

    lo, hi = (0.0, 1.0) if norm == "none" else (None, None)
    image_rel = f"images/{name}.jpg"
    atomic_write_bytes(out_dir / image_rel, _jpeg(view))
    outputs = {}
    for method, m in maps.items():
        png_rel, npy_rel = f"{method}/{name}.png", f"{method}/{name}.npy"
        save_npy(out_dir / npy_rel, m)
        if m.ndim == 2:
            picture = overlay(view, m, cmap=cmap, alpha=alpha, vmin=lo, vmax=hi)  # [H, W, 3]
        elif m.shape[0] == 0:  # no maps for this image (e.g. an empty caption): the image alone
            picture = view
        else:
            small = _tile_view(view)  # [h, w, 3] with max(h, w) <= TILE_MAX
            tiles = [overlay(small, m[j], cmap=cmap, alpha=alpha, vmin=lo, vmax=hi) for j in range(m.shape[0])]
            picture = tile(tiles, names.get(method))
        save_png(out_dir / png_rel, picture)
        entry = {"png": png_rel, "npy": npy_rel, "shape": list(m.shape)}
        if names.get(method) is not None:
            entry["names"] = [str(s) for s in names[method]]
        outputs[method] = entry
    return image_rel, outputs
