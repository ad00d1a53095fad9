"""Drawing a video model's maps over its clip: overlay frames, an MP4, a looping animation and
a frame strip.

A video map is ``[frames, gh, gw]``: one map per temporal token position, each covering
``tubelet`` input frames. Input frame ``i`` is drawn with map ``i // tubelet`` (the map of its
tubelet), every frame on the same colour scale, so that frames compare. The overlay is
:func:`vitviz.overlay`'s, the same look as image overlays.

Files are written whole (temporary name, then rename: :mod:`vitviz._util.files`).
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import RenderError
from ._overlay import DEFAULT_ALPHA, DEFAULT_CMAP, display_image, overlay
from .figures import _DPI, map_grid

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DEFAULT_FPS = 8.0  # playback rate of a clip whose file states no frame rate
ANIMATION_FORMATS = ("webp", "gif")


def _clip_maps(maps: Any, frames: int, tubelet: int) -> np.ndarray:
    """``maps`` as ``[P, gh, gw]`` float32, checked against ``frames`` input frames of ``tubelet``."""
    m = maps.detach().float().cpu().numpy() if hasattr(maps, "detach") else np.asarray(maps, dtype=np.float32)
    if m.ndim != 3:
        raise RenderError(f"a clip's maps must be [frames, gh, gw], got shape {m.shape}")
    if tubelet < 1 or frames != m.shape[0] * tubelet:
        raise RenderError(f"{frames} input frames do not match {m.shape[0]} maps of tubelets of {tubelet} frames "
                          f"(input frame i takes map i // tubelet)")
    if not np.isfinite(m).all():
        raise RenderError("the clip's maps contain NaN or infinite values")
    return m


def clip_overlays(views: Any, maps: Any, *, tubelet: int = 1, cmap: str = DEFAULT_CMAP,
                  alpha: float | None = DEFAULT_ALPHA, smooth: bool = False, size: int | None = None,
                  vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Every input frame with the map of its tubelet over it, on one colour scale.

    Frame ``i`` is ``vitviz.overlay(display_image(views[i], size), maps[i // tubelet], vmin=vmin,
    vmax=vmax)``; without ``vmin`` / ``vmax`` the scale is the minimum and maximum of the whole
    clip's maps (one scale for all frames, never one per frame).

    Args:
        views: ``[T, H, W, 3]`` uint8 RGB, the frames as the model saw them.
        maps: ``[T // tubelet, gh, gw]`` (tensor or array).
        tubelet: input frames per map.
        cmap, alpha, smooth: as :func:`vitviz.overlay`.
        size: short side of the frames drawn (None: :func:`display_image`'s rule, at least 256 px).
        vmin, vmax: the scale (default: the clip's own range).

    Returns:
        ``[T, H', W', 3]`` uint8 RGB.

    Raises:
        RenderError: the frames and maps do not match, or malformed maps.

    Example:
        >>> frames = clip_overlays(views, vitviz.rollout(rec.attentions)[0], tubelet=2)
    """
    v = np.asarray(views)
    if v.ndim != 4 or v.shape[-1] != 3 or v.dtype != np.uint8:
        raise RenderError(f"views must be [T, H, W, 3] uint8, got shape {v.shape} {v.dtype}")
    m = _clip_maps(maps, v.shape[0], tubelet)  # [P, gh, gw]
    lo = float(m.min()) if vmin is None else float(vmin)
    hi = float(m.max()) if vmax is None else float(vmax)
    return np.stack([overlay(display_image(v[i], size), m[i // tubelet], cmap=cmap, alpha=alpha, vmin=lo, vmax=hi,
                             smooth=smooth) for i in range(v.shape[0])])  # [T, H', W', 3]


def _playable(fps: float | None) -> float:
    return float(fps) if fps is not None and np.isfinite(fps) and fps > 0 else DEFAULT_FPS


def encode_mp4(frames: np.ndarray, fps: float | None = None) -> bytes:
    """MP4 bytes (OpenCV's ``cv2.VideoWriter``, FOURCC ``mp4v``) of ``[T, H, W, 3]`` uint8 RGB frames.

    Args:
        frames: the frames, all of one size.
        fps: playback rate (None: :data:`DEFAULT_FPS`).

    Returns:
        The file's bytes.

    Raises:
        RenderError: OpenCV cannot write an MP4 here (no ``mp4v`` encoder), or malformed frames.
    """
    import cv2

    f = np.asarray(frames)
    if f.ndim != 4 or f.shape[-1] != 3 or f.dtype != np.uint8 or f.shape[0] == 0:
        raise RenderError(f"frames must be [T, H, W, 3] uint8 with T >= 1, got shape {f.shape} {f.dtype}")
    h, w = f.shape[1:3]
    with tempfile.TemporaryDirectory(prefix="vitviz-video-") as tmp:
        path = os.path.join(tmp, "clip.mp4")  # the suffix picks the container
        writer = cv2.VideoWriter(path, cv2.VideoWriter.fourcc(*"mp4v"), _playable(fps), (w, h))
        try:
            if not writer.isOpened():
                raise RenderError("OpenCV cannot write MP4 (mp4v) video on this machine; install an "
                                  "opencv-python build with FFmpeg (pip install opencv-python-headless)")
            for frame in f:
                writer.write(cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2BGR))
        finally:
            writer.release()
        return Path(path).read_bytes()


def encode_animation(frames: np.ndarray, fps: float | None = None, fmt: str = "webp") -> bytes:
    """A looping animated WebP (lossless: the frames exactly) or GIF (256 colours) of the frames.

    Args:
        frames: ``[T, H, W, 3]`` uint8 RGB.
        fps: playback rate (None: :data:`DEFAULT_FPS`).
        fmt: ``"webp"`` or ``"gif"``.

    Returns:
        The file's bytes.

    Raises:
        RenderError: an unknown format or malformed frames.
    """
    from PIL import Image

    if fmt not in ANIMATION_FORMATS:
        raise RenderError(f"animation format must be one of {', '.join(ANIMATION_FORMATS)}, got {fmt!r}")
    f = np.asarray(frames)
    if f.ndim != 4 or f.shape[-1] != 3 or f.dtype != np.uint8 or f.shape[0] == 0:
        raise RenderError(f"frames must be [T, H, W, 3] uint8 with T >= 1, got shape {f.shape} {f.dtype}")
    ims = [Image.fromarray(np.ascontiguousarray(x)) for x in f]
    buf = io.BytesIO()
    duration = max(20, round(1000.0 / _playable(fps)))  # ms per frame (browsers play GIFs at 20 ms at most)
    extra: dict[str, Any] = {"lossless": True, "method": 4} if fmt == "webp" else {"optimize": False}
    ims[0].save(buf, format=fmt.upper(), save_all=True, append_images=ims[1:], loop=0, duration=duration, **extra)
    return buf.getvalue()


def save_clip_video(path: str | Path, frames: np.ndarray, fps: float | None = None) -> Path:
    """Write :func:`encode_mp4` to ``path`` (suffix ``.mp4``), atomically.

    Args:
        path: the file; its suffix is set to ``.mp4``.
        frames: ``[T, H, W, 3]`` uint8 RGB.
        fps: playback rate.

    Returns:
        The path written.
    """
    from .._util.files import atomic_write_bytes

    return atomic_write_bytes(Path(path).with_suffix(".mp4"), encode_mp4(frames, fps))


def save_clip_animation(path: str | Path, frames: np.ndarray, fps: float | None = None, fmt: str = "webp") -> Path:
    """Write :func:`encode_animation` to ``path`` (suffix ``.webp`` or ``.gif``), atomically.

    Args:
        path: the file; its suffix is set to the format's.
        frames: ``[T, H, W, 3]`` uint8 RGB.
        fps: playback rate.
        fmt: ``"webp"`` or ``"gif"``.

    Returns:
        The path written.
    """
    from .._util.files import atomic_write_bytes

    return atomic_write_bytes(Path(path).with_suffix(f".{fmt}"), encode_animation(frames, fps, fmt))


def frame_label(frames: Sequence[int]) -> str:
    """``"frame 4"``, ``"frames 0–1"`` (consecutive) or ``"frames 0, 5"`` for the input frames of a
    temporal position.

    Args:
        frames: the frame numbers, increasing.

    Returns:
        The label.
    """
    fs = [int(f) for f in frames]
    if len(fs) == 1:
        return f"frame {fs[0]}"
    if fs == list(range(fs[0], fs[0] + len(fs))):
        return f"frames {fs[0]}–{fs[-1]}"
    return "frames " + ", ".join(str(f) for f in fs)


def clip_strip(views: Any, maps: Any, *, tubelet: int = 1, indices: Sequence[int] | None = None,
               row_labels: Sequence[Any] | None = None, cmap: str = DEFAULT_CMAP,
               alpha: float | None = DEFAULT_ALPHA, smooth: bool = False, title: str | None = None,
               vmin: float | None = None, vmax: float | None = None, colorbar: bool = True,
               label: str = "attention", dpi: int = _DPI) -> tuple[Figure, Axes]:
    """One panel per temporal position, each map over the first frame of its tubelet, labelled
    with its frames; rows (e.g. heads) when ``maps`` is ``[rows, P, gh, gw]``.

    The layout is :func:`vitviz.render.figures.map_grid`'s: a strip of up to 6 panels stays one
    row, longer ones wrap into bands so that the figure stays within 3:1. One colour scale for
    the whole figure (the maps' range, or ``vmin`` / ``vmax``).

    Args:
        views: ``[T, H, W, 3]`` uint8 RGB, the frames as the model saw them.
        maps: ``[P, gh, gw]`` or ``[rows, P, gh, gw]`` with ``P = T // tubelet``.
        tubelet: input frames per temporal position.
        indices: the source frame of each input frame, for the labels (default ``0 .. T-1``).
        row_labels: one per row (e.g. ``"head 0"``).
        cmap, alpha, smooth: as :func:`vitviz.overlay`.
        title: the figure's title.
        vmin, vmax: the scale (default: the range of all maps).
        colorbar: a colour bar stating the scale; ``label`` names the quantity.
        dpi: figure resolution.

    Returns:
        ``(fig, ax)`` as :func:`map_grid`.

    Raises:
        RenderError: the frames and maps do not match.
    """
    v = np.asarray(views)
    m = maps.detach().float().cpu().numpy() if hasattr(maps, "detach") else np.asarray(maps, dtype=np.float32)
    grid = m if m.ndim == 4 else m[None]  # [rows, P, gh, gw]
    if v.ndim != 4:
        raise RenderError(f"views must be [T, H, W, 3], got shape {v.shape}")
    _clip_maps(grid[0], v.shape[0], tubelet)
    src = list(range(v.shape[0])) if indices is None else [int(i) for i in indices]
    if len(src) != v.shape[0]:
        raise RenderError(f"{len(src)} frame indices for {v.shape[0]} frames")
    p = grid.shape[1]
    labels = [frame_label(src[t * tubelet:(t + 1) * tubelet]) for t in range(p)]
    lo = float(grid.min()) if vmin is None else float(vmin)
    hi = float(grid.max()) if vmax is None else float(vmax)
    return map_grid(grid, v[::tubelet], row_labels=row_labels, col_labels=labels, cmap=cmap, alpha=alpha,
                    smooth=smooth, title=title, vmin=lo, vmax=hi, colorbar=colorbar, label=label, dpi=dpi)


__all__ = ["clip_overlays", "clip_strip", "encode_mp4", "encode_animation", "save_clip_video",
           "save_clip_animation", "frame_label", "DEFAULT_FPS", "ANIMATION_FORMATS"]
