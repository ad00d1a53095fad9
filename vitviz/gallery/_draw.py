"""Per-image outputs of a gallery: the input view, one overlay picture and one ``.npy`` per method.

Everything is drawn at the size it is shown at, so the page's large view never enlarges a
picture: the view at least ``MIN_OVERLAY_SIDE`` (256) pixels on its short side
(:func:`vitviz.render.display_image`: a 64 px view becomes 256 px of clean 4x4 blocks), the
tiles of a multi-map grid (heads, words) exactly ``TILE_SIDE`` pixels on their short side, and
each tile's label drawn as text at that resolution (never scaled pixels). Pictures are JPEG
(quality ``JPEG_QUALITY``, no chroma subsampling, so thin coloured details and labels stay
sharp): several times faster to encode and smaller than PNG for overlays on photographs.

Runs in the gallery's render threads (OpenCV and NumPy release the GIL for the heavy parts),
so rendering and encoding of one batch overlap the model's work on the next.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .._util.files import atomic_write_bytes, save_npy

TILE_SIDE = 256  # short side of each tile of a multi-map grid, in pixels (the README's promise)
JPEG_QUALITY = 90  # pictures and the input view; 4:4:4, see _jpeg
GAP = 6  # white pixels between the tiles of a grid


def _jpeg(rgb: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes of an RGB image, without chroma subsampling (thin coloured details survive)."""
    import cv2

    params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    if hasattr(cv2, "IMWRITE_JPEG_SAMPLING_FACTOR"):  # OpenCV >= 4.5.5
        params += [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise OSError("OpenCV could not encode a JPEG")
    return buf.tobytes()


@lru_cache(maxsize=1)
def _font_file() -> str | None:
    """DejaVu Sans, which matplotlib ships (wide Unicode coverage), or None."""
    import os

    import matplotlib

    path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")
    return path if os.path.isfile(path) else None


def _font(px: int) -> Any:
    """A font ``px`` pixels high (a new object per call: FreeType faces are not shared between
    the render threads)."""
    from PIL import ImageFont

    path = _font_file()
    if path is not None:
        return ImageFont.truetype(path, px)
    return ImageFont.load_default(px)  # Pillow's own scalable font


@lru_cache(maxsize=1024)
def label_band(text: str, width: int, px: int) -> np.ndarray:
    """A white ``[band_height(px), width, 3]`` uint8 strip with ``text`` in black, ``px`` pixels
    high. Text wider than the strip is cut and ends in an ellipsis. Read-only, and drawn once
    per text and size (a gallery labels every image's heads alike).
    """
    from PIL import Image, ImageDraw

    font = _font(px)
    band = band_height(px)
    pad = max(3, px // 3)
    s = str(text)
    if font.getlength(s) > width - 2 * pad:
        while s and font.getlength(s + "…") > width - 2 * pad:
            s = s[:-1]
        s += "…"
    im = Image.new("RGB", (width, band), (255, 255, 255))
    ImageDraw.Draw(im).text((pad, band // 2), s, fill=(0, 0, 0), font=font, anchor="lm")
    pixels = np.array(im)
    pixels.flags.writeable = False
    return pixels


def label_px(tile_short: int) -> int:
    """Label text height for tiles ``tile_short`` pixels on their short side (15 px at 256)."""
    return max(11, round(tile_short * 0.06))


def band_height(px: int) -> int:
    """Height of the label band under a tile for text ``px`` pixels high."""
    return px + max(8, px // 2)


def tile(images: Sequence[np.ndarray], names: Sequence[str] | None = None) -> np.ndarray:
    """A near-square grid of equally sized ``HxWx3`` uint8 tiles, ``ceil(sqrt(K))`` columns,
    ``GAP`` white pixels apart, each with a white label band under it when ``names`` are given
    (text drawn at this resolution, see :func:`label_band`).

    Shape:
        images: K x ``[H, W, 3]`` -> ``[rows * (H + band + GAP) - GAP, cols * (W + GAP) - GAP, 3]``
    """
    k = len(images)
    h, w = images[0].shape[:2]
    cols = math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    px = label_px(min(h, w))
    band = band_height(px) if names is not None else 0
    out = np.full((rows * (h + band + GAP) - GAP, cols * (w + GAP) - GAP, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        y, x = r * (h + band + GAP), c * (w + GAP)
        out[y:y + h, x:x + w] = im
        if names is not None:
            out[y + h:y + h + band, x:x + w] = label_band(str(names[i]), w, px)
    return out


def _tile_view(view: np.ndarray) -> np.ndarray:
    """The view at ``TILE_SIDE`` pixels on its short side, in one resize from the model's view:
    whole-number enlargements repeat pixels (clean blocks), others are area (shrink) or bicubic."""
    from ..render import display_image

    return display_image(view, size=TILE_SIDE)  # [h, w, 3], min(h, w) == TILE_SIDE


def render_image(out_dir: Path, name: str, view: np.ndarray, maps: dict[str, np.ndarray],
                 names: dict[str, Sequence[str] | None], *, cmap: str | None = None, alpha: float | None = None,
                 smooth: bool = False, norm: str = "image") -> tuple[str, dict[str, dict[str, Any]]]:
    """Write the outputs of one image and describe them.

    The view is shown at least 256 px on its short side (:func:`vitviz.render.display_image`);
    the input is written at that size. One map: ``vitviz.overlay`` of it over that view. Several
    maps (heads, words): a near-square grid of overlays, each tile ``TILE_SIDE`` pixels on its
    short side with its name drawn under it. The raw maps go to ``.npy`` unchanged.

    Args:
        out_dir: the gallery folder.
        name: the image's safe output stem.
        view: ``[H, W, 3]`` uint8, the image as the model saw it.
        maps: method -> ``[gh, gw]`` or ``[K, gh, gw]`` float32 array (all finite).
        names: method -> the ``K`` map names (multi-map methods) or ``None``.
        cmap, alpha, smooth: as :func:`vitviz.overlay` (None: its defaults).
        norm: ``"image"`` (each map min-max scaled on its own) or ``"none"`` (raw values on
            ``[0, 1]``, the same scale in every image).

    Returns:
        ``(input image path, {method: {"overlay", "npy", "shape", "size"[, "names"]}})``, paths
        relative to ``out_dir`` with ``/`` separators; ``size`` is the picture's ``[height, width]``.
    """
    from ..render import display_image, overlay

    look: dict[str, Any] = {"alpha": alpha, "smooth": smooth}
    if cmap is not None:
        look["cmap"] = cmap
    lo, hi = (0.0, 1.0) if norm == "none" else (None, None)
    shown = display_image(view)  # [H', W', 3], short side >= 256
    image_rel = f"images/{name}.jpg"
    atomic_write_bytes(out_dir / image_rel, _jpeg(shown))
    small: np.ndarray | None = None
    outputs: dict[str, dict[str, Any]] = {}
    for method, m in maps.items():
        pic_rel, npy_rel = f"{method}/{name}.jpg", f"{method}/{name}.npy"
        save_npy(out_dir / npy_rel, m)
        if m.ndim == 2:
            picture = overlay(shown, m, vmin=lo, vmax=hi, **look)  # [H', W', 3]
        elif m.shape[0] == 0:  # no maps for this image (e.g. an empty caption): the image alone
            picture = shown
        else:
            if small is None:
                small = shown if min(shown.shape[:2]) == TILE_SIDE else _tile_view(view)  # [h, w, 3]
            tiles = [overlay(small, m[j], vmin=lo, vmax=hi, **look) for j in range(m.shape[0])]
            picture = tile(tiles, names.get(method))
        atomic_write_bytes(out_dir / pic_rel, _jpeg(picture))
        entry: dict[str, Any] = {"overlay": pic_rel, "npy": npy_rel, "shape": list(m.shape),
                                 "size": [int(picture.shape[0]), int(picture.shape[1])]}
        labels = names.get(method)
        if labels is not None:
            entry["names"] = [str(s) for s in labels]
        outputs[method] = entry
    return image_rel, outputs


def render_clip(out_dir: Path, name: str, views: np.ndarray, maps: dict[str, np.ndarray], *, tubelet: int,
                indices: Sequence[int], fps: float | None = None, cmap: str | None = None,
                alpha: float | None = None, smooth: bool = False,
                norm: str = "image") -> tuple[str, dict[str, dict[str, Any]]]:
    """Write the outputs of one video clip (a video model's gallery item) and describe them.

    The input picture is the strip of the clip: the first frame of each temporal position
    (tubelet), each ``TILE_SIDE`` pixels on its short side and labelled with its source frames.
    Per method: the same strip with the map of each position over it (the thumbnail), a looping
    lossless WebP of every input frame with the map of its tubelet (:func:`vitviz.render.clip_overlays`,
    shown in the large view) and the raw maps (``.npy``, ``[P, gh, gw]`` or ``[K, P, gh, gw]``).
    Maps with several per position (``[K, P, gh, gw]``: heads) are drawn as their mean. One
    colour scale per clip (``norm="none"``: ``[0, 1]``).

    Args:
        out_dir: the gallery folder.
        name: the clip's safe output stem.
        views: ``[T, H, W, 3]`` uint8, the frames as the model saw them.
        maps: method -> ``[P, gh, gw]`` or ``[K, P, gh, gw]`` float32 (``P = T // tubelet``).
        tubelet: input frames per temporal position.
        indices: the source frame of each input frame (the labels).
        fps: the animation's rate (None: :data:`vitviz.render.DEFAULT_FPS` of the writer).
        cmap, alpha, smooth: as :func:`vitviz.overlay` (None: its defaults).
        norm: ``"image"`` (min-max of the clip) or ``"none"``.

    Returns:
        ``(input strip path, {method: {"overlay", "animation", "npy", "shape", "size", "names"}})``,
        paths relative to ``out_dir``.
    """
    from ..render import clip_overlays, encode_animation, frame_label, overlay

    look: dict[str, Any] = {"alpha": alpha, "smooth": smooth}
    if cmap is not None:
        look["cmap"] = cmap
    p = views.shape[0] // tubelet
    labels = [frame_label(indices[t * tubelet:(t + 1) * tubelet]) for t in range(p)]
    firsts = [_tile_view(views[t * tubelet]) for t in range(p)]  # P x [h, w, 3]
    image_rel = f"images/{name}.jpg"
    atomic_write_bytes(out_dir / image_rel, _jpeg(tile(firsts, labels)))
    outputs: dict[str, dict[str, Any]] = {}
    for method, m in maps.items():
        pic_rel, anim_rel, npy_rel = f"{method}/{name}.jpg", f"{method}/{name}.webp", f"{method}/{name}.npy"
        save_npy(out_dir / npy_rel, m)
        movie = m if m.ndim == 3 else m.mean(0)  # [P, gh, gw]
        lo, hi = (0.0, 1.0) if norm == "none" else (float(movie.min()), float(movie.max()))
        picture = tile([overlay(firsts[t], movie[t], vmin=lo, vmax=hi, **look) for t in range(p)], labels)
        atomic_write_bytes(out_dir / pic_rel, _jpeg(picture))
        frames = clip_overlays(views, movie, tubelet=tubelet, vmin=lo, vmax=hi, **look)  # [T, H', W', 3]
        atomic_write_bytes(out_dir / anim_rel, encode_animation(frames, fps, "webp"))
        outputs[method] = {"overlay": pic_rel, "animation": anim_rel, "npy": npy_rel, "shape": list(m.shape),
                           "size": [int(picture.shape[0]), int(picture.shape[1])], "names": labels}
    return image_rel, outputs
