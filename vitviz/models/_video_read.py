"""Reading video clips for video models (VideoMAE, ViViT, TimeSformer) with OpenCV.

A clip is sampled the way the model's processor samples one:

* by default ``num_frames`` frames spread evenly over the whole video, frame
  ``i * total // num_frames`` for ``i = 0 .. num_frames - 1`` (transformers'
  ``video_utils.default_sample_indices_fn``, which ``BaseVideoProcessor.sample_frames`` in
  ``transformers/video_processing_utils.py`` calls; it refuses ``num_frames > total`` as we do);
* with a stride ``S``: ``num_frames`` frames ``S`` apart, a segment of ``(num_frames - 1) * S + 1``
  frames centred in the video (the single-clip form of VideoMAE's Kinetics evaluation, which takes
  ``num_frames`` frames ``frame_sample_rate`` apart from a segment of the video).

Frames are counted by decoding, never taken from ``CAP_PROP_FRAME_COUNT`` alone: one pass
grabs (decodes) every frame and keeps the sampled ones. The header's count only plans that
pass; when it is missing or differs from what decodes, the frames are sampled over the decoded
count (a second pass reads them). OpenCV's and FFmpeg's own log lines are kept off stderr while a
video is read (:func:`_quiet_opencv`): the error is vitviz's one line. The rules for bad files, each a one-line
:class:`~vitviz.errors.VideoError` naming the file and the fix:

======================================  =========================================================
file                                    rule
======================================  =========================================================
missing, a folder, empty (0 bytes)      refused, as for images
a still image (PNG, JPEG, ...)          refused: a video model takes a clip (OpenCV would read
                                        it as a video of one frame)
named ``.mp4`` (``.avi``, ...) but its  refused before OpenCV: not a video (its first bytes are
content is no known video format        no container's signature)
an MP4 / MOV without its whole index    truncated: the ``moov`` box is missing or cut off (read
                                        from the top-level boxes; OpenCV's ``mp4v`` writer puts
                                        it at the end, so a cut file loses it)
OpenCV cannot open it                   a video container: a codec this OpenCV build lacks, or
                                        corrupt; anything else: not a video
opens, but no frame decodes             an unsupported codec (its FOURCC is named)
truncated                               fewer frames decode than the header states, by more than
                                        one frame (containers without a frame index state
                                        ``duration * fps``, which may be one frame over)
too few frames                          fewer decodable frames than ``num_frames`` (than
                                        ``(num_frames - 1) * S + 1`` with a stride ``S``); the
                                        message says how many it has and what would fit
======================================  =========================================================
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._util.files import VIDEO_SUFFIXES, usable_file  # the suffixes of video files (the content decides the rest)
from ..errors import VideoError


def video_kind(head: bytes, name: str = "") -> str | None:
    """The video container a file's first bytes (or, failing them, its suffix) name.

    Args:
        head: the file's first 12 bytes or more.
        name: the file name (its suffix is the fallback).

    Returns:
        ``"MP4"``, ``"MOV"``, ``"AVI"``, ``"Matroska/WebM"``, ``"MPEG"``, ``"FLV"``, ``"Ogg"``, the
        suffix in capitals for another known video suffix, or None.

    Example:
        >>> video_kind(b"\\x00\\x00\\x00\\x1cftypisom")
        'MP4'
    """
    if len(head) >= 12 and head[4:8] == b"ftyp":
        return "MOV" if head[8:10] == b"qt" else "MP4"
    if len(head) >= 8 and head[4:8] in (b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"):
        return "MOV"  # QuickTime files older than the ftyp box
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "AVI"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "Matroska/WebM"
    if head[:4] in (b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3"):
        return "MPEG"
    if head[:3] == b"FLV":
        return "FLV"
    if head[:4] == b"OggS":
        return "Ogg"
    ext = os.path.splitext(name)[1].lower()
    return ext[1:].upper() if ext in VIDEO_SUFFIXES else None


# the container a suffix promises, where vitviz knows its signature (a mismatch is refused before
# OpenCV, whose FFmpeg would otherwise guess by the suffix and log its own errors)
_SUFFIX_KIND = {".mp4": ("MP4", "MOV"), ".m4v": ("MP4", "MOV"), ".mov": ("MP4", "MOV"), ".3gp": ("MP4", "MOV"),
                ".avi": ("AVI",), ".mkv": ("Matroska/WebM",), ".webm": ("Matroska/WebM",), ".flv": ("FLV",),
                ".ogv": ("Ogg",), ".mpg": ("MPEG",), ".mpeg": ("MPEG",)}
# top-level boxes of an ISO base media file (MP4 / MOV): ISO/IEC 14496-12 and QuickTime
_ISO_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"uuid", b"styp", b"sidx", b"moof",
              b"mfra", b"meta", b"pdin", b"prft", b"emsg"}


def _iso_index(name: str) -> str | None:
    """Why an MP4 / MOV file cannot be played, from its top-level boxes (None: it can be tried).

    Every box starts with a 4-byte big-endian size and a 4-byte type (size 1: a 64-bit size follows;
    0: to the end of the file). The index (``moov``) must be there whole; OpenCV's own ``mp4v``
    writer puts it at the end, so a file cut short loses it."""
    import struct

    size = os.path.getsize(name)
    pos = 0
    seen = []
    with open(name, "rb") as fh:
        while pos + 8 <= size:
            fh.seek(pos)
            n, kind = struct.unpack(">I4s", fh.read(8))
            if n == 1:
                if pos + 16 > size:
                    break
                n = struct.unpack(">Q", fh.read(8))[0]
            elif n == 0:
                n = size - pos
            if n < 8:
                return f"its box at byte {pos} is malformed"
            if pos + n > size:
                if kind == b"moov":
                    return "its index (the moov box) is cut off"
                break  # the last box runs past the end: cut short (decoding says how much is missing)
            seen.append(kind)
            pos += n
    if b"moov" not in seen:
        return "its index (the moov box) is missing: the file was cut short or not finished"
    return None


def is_video_file(path: Any) -> bool:
    """Whether ``path`` is a file whose content (or suffix) says it is a video.

    Args:
        path: a file path.

    Returns:
        True for an existing file that :func:`video_kind` names; False otherwise (folders,
        missing files, images, other objects).
    """
    if not isinstance(path, (str, os.PathLike)):
        return False
    name = os.fspath(path)
    if isinstance(name, bytes) or not os.path.isfile(name):
        return False
    try:
        with open(name, "rb") as fh:
            head = fh.read(16)
    except OSError:
        return os.path.splitext(name)[1].lower() in VIDEO_SUFFIXES
    return video_kind(head, name) is not None


def sample_indices(total: int, num_frames: int, stride: int | None = None, *, name: str = "the video") -> np.ndarray:
    """The source frames a clip of ``num_frames`` takes from a video of ``total`` frames.

    Without ``stride``: ``i * total // num_frames`` (evenly over the whole video, transformers'
    ``default_sample_indices_fn``). With ``stride`` ``S``: ``start + i * S`` where the segment of
    ``(num_frames - 1) * S + 1`` frames is centred, ``start = (total - segment) // 2``.

    Args:
        total: the decodable frames of the video.
        num_frames: frames the clip needs (the model's input frames).
        stride: frames between two sampled frames, or None for even spacing.
        name: the file, for the error message.

    Returns:
        ``[num_frames]`` int64 indices, increasing.

    Raises:
        VideoError: fewer frames than the clip needs (the message says how many it has, how many
            are needed and what would fit).
        ValueError: ``num_frames`` or ``stride`` below 1.

    Example:
        >>> sample_indices(10, 4).tolist()
        [0, 2, 5, 7]
        >>> sample_indices(10, 4, stride=2).tolist()
        [1, 3, 5, 7]
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if stride is None:
        if total < num_frames:
            raise VideoError(name, f"has {total} decodable frame(s) but the model takes clips of {num_frames} "
                                   f"frames; give a video of at least {num_frames} frames")
        return np.arange(num_frames, dtype=np.int64) * total // num_frames
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    span = (num_frames - 1) * stride + 1
    if total < span:
        fits = (total - 1) // (num_frames - 1) if num_frames > 1 and total >= num_frames else 0
        fix = (f"use --frame-stride {fits} or less (the largest that fits), or leave it out to spread the "
               f"{num_frames} frames over the whole video" if fits else
               f"give a video of at least {num_frames} frames")
        raise VideoError(name, f"has {total} decodable frame(s) but {num_frames} frames {stride} apart need "
                               f"{span}; {fix}")
    start = (total - span) // 2
    return start + np.arange(num_frames, dtype=np.int64) * stride


@dataclass
class Clip:
    """The frames sampled from a video file.

    Attributes:
        frames: ``[F, H, W, 3]`` uint8 RGB, at the file's own size.
        indices: ``[F]`` the source frame of each (0-based, in decoding order).
        fps: the file's frame rate, or None when it states none.
        total: the frames that decode.
        source: the file.
    """

    frames: np.ndarray
    indices: np.ndarray
    fps: float | None
    total: int
    source: str


_QUIET_LOCK = threading.Lock()
_QUIET = [0, -1]  # [readers inside the block, the saved stderr descriptor]


@contextlib.contextmanager
def _quiet_opencv() -> Iterator[Any]:
    """OpenCV and its FFmpeg silent for the block: a bad file gets vitviz's one-line error, not their
    log lines. OpenCV's own log level is set to silent and restored; FFmpeg's lines (``[mov,mp4 @
    0x...] moov atom not found``, decoder complaints) are written by C code straight to file
    descriptor 2, and the level OpenCV gives FFmpeg is read once per process
    (``OPENCV_FFMPEG_LOGLEVEL`` at its first video), so descriptor 2 points at the null device for
    the block and is restored after it (shared by threads reading at the same time)."""
    import sys

    import cv2

    before = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    with _QUIET_LOCK:
        if _QUIET[0] == 0:
            try:
                sys.stderr.flush()
                null = os.open(os.devnull, os.O_WRONLY)
                try:
                    _QUIET[1] = os.dup(2)
                    os.dup2(null, 2)
                finally:
                    os.close(null)
            except OSError:  # no descriptor 2 to redirect (an embedded interpreter): stay as it is
                _QUIET[1] = -1
        _QUIET[0] += 1
    try:
        yield cv2
    finally:
        with _QUIET_LOCK:
            _QUIET[0] -= 1
            if _QUIET[0] == 0 and _QUIET[1] >= 0:
                os.dup2(_QUIET[1], 2)
                os.close(_QUIET[1])
                _QUIET[1] = -1
        cv2.utils.logging.setLogLevel(before)


def _check_file(name: str) -> bytes:
    """The first bytes of a file that exists, is a file, is not empty and is not a still image."""
    usable_file(name, VideoError, "video", example="")
    try:
        with open(name, "rb") as fh:
            head = fh.read(16)
    except OSError as e:
        raise VideoError(name, f"cannot be read ({e.strerror or e}); check its permissions") from e
    content = video_kind(head)  # by the bytes alone
    if content is None:
        still = _still_image_format(name)
        if still is not None:
            raise VideoError(name, f"is a still image ({still}), not a video: a video model takes a clip of "
                                   "frames; pass a video file (.mp4, .avi, ...), or use an image model for images")
        expected = _SUFFIX_KIND.get(os.path.splitext(name)[1].lower())
        if expected is not None:
            raise VideoError(name, f"is named like a video ({expected[0]}) but its content is in no video format "
                                   "vitviz knows: it is not a video, or its start is corrupt; re-create or "
                                   "re-download it")
    if content in ("MP4", "MOV"):
        why = _iso_index(name)
        if why is not None:
            raise VideoError(name, f"is a truncated or corrupt {content} video: {why}; re-create or re-download "
                                   "it (a download or a recording that stopped early)")
    return head


def _still_image_format(name: str) -> str | None:
    """Pillow's format name when the file is a single-frame image (animated GIF / WebP are clips)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(name) as im:
            if getattr(im, "n_frames", 1) > 1:
                return None
            return str(im.format or "image")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None


def _fourcc(cv2: Any, cap: Any) -> str:
    """The codec's four-character code, as OpenCV reports it."""
    code = int(cap.get(cv2.CAP_PROP_FOURCC))
    text = "".join(chr((code >> (8 * i)) & 0xFF) for i in range(4))
    return text if text.isprintable() and text.strip() else "unknown"


def _open(cv2: Any, name: str, head: bytes) -> Any:
    cap = cv2.VideoCapture(name)
    if cap.isOpened():
        return cap
    cap.release()
    kind = video_kind(head)  # by content
    if kind is not None:
        raise VideoError(name, f"is a video ({kind}) that OpenCV cannot open: its codec is not one this OpenCV "
                               "build decodes, or the file is corrupt; re-encode it, or re-create or "
                               "re-download it "
                               f"(ffmpeg -i {os.path.basename(name)} -c:v libx264 fixed.mp4)")
    raise VideoError(name, "not a video OpenCV can read; check that it is really a video (.mp4, .avi, .mkv, "
                           "...), or re-encode it (ffmpeg -i FILE -c:v libx264 out.mp4)")


def _stated_count(cv2: Any, cap: Any) -> int | None:
    """The frame count the container states (None when it states none: streams, still images)."""
    n = cap.get(cv2.CAP_PROP_FRAME_COUNT)
    return int(n) if math.isfinite(n) and 0 < n < 2**31 else None


def _decode(cv2: Any, name: str, head: bytes, plan_for: Any, stop: int | None = None) -> tuple[Any, dict, int, Any]:
    """One decoding pass: ``(plan, {index: RGB frame} of the planned ones, frames decoded,
    (stated count, fps, fourcc))``. ``plan_for(stated count or None)`` gives the frames to keep
    (or None); ``stop``: the pass ends after that many frames."""
    cap = _open(cv2, name, head)
    try:
        stated = _stated_count(cv2, cap)
        fps = float(cap.get(cv2.CAP_PROP_FPS))
        fourcc = _fourcc(cv2, cap)
        plan = plan_for(stated)
        wanted = set(plan.tolist()) if plan is not None else set()
        got: dict[int, np.ndarray] = {}
        n = 0
        while (stop is None or n < stop) and cap.grab():  # grab() decodes; retrieve() only converts
            if n in wanted:
                ok, bgr = cap.retrieve()
                if not ok or bgr is None:
                    break
                got[n] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)  # [H, W, 3] uint8
            n += 1
    finally:
        cap.release()
    return plan, got, n, (stated, fps if math.isfinite(fps) and fps > 0 else None, fourcc)


def read_video(path: Any, num_frames: int, *, stride: int | None = None) -> Clip:
    """Decode a video file and sample a clip the way the model's processor does.

    Args:
        path: the video file.
        num_frames: frames the clip needs (``VisionModel.num_frames``).
        stride: frames between sampled frames (a centred segment), or None to spread them over
            the whole video (see :func:`sample_indices`).

    Returns:
        A :class:`Clip`: ``frames [num_frames, H, W, 3]`` uint8 RGB, their source indices, fps.

    Raises:
        VideoError: a file that cannot be used (see the module's table); the message names it.

    Example:
        >>> clip = read_video("clip.mp4", 16)
        >>> clip.frames.shape, clip.indices[:3]
        ((16, 240, 320, 3), array([0, 5, 11]))
    """
    name = os.fspath(path)
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    head = _check_file(name)
    fix = f"(ffmpeg -i {os.path.basename(name)} -c:v libx264 fixed.mp4)"

    def from_header(stated: int | None) -> np.ndarray | None:
        if stated is None:
            return None
        try:
            return sample_indices(stated, num_frames, stride, name=name)
        except VideoError:
            return None  # the header may undercount: decide on the decoded frames

    with _quiet_opencv() as cv2:
        plan, got, total, (stated, fps, fourcc) = _decode(cv2, name, head, from_header)
        if total == 0:
            raise VideoError(name, f"OpenCV opens it but decodes no frame: its codec ({fourcc}) is not supported "
                                   f"by this OpenCV build, or the data is corrupt; re-encode it {fix}")
        if stated is not None and total < stated - 1:
            raise VideoError(name, f"is truncated or corrupt: its header states {stated} frames but decoding "
                                   f"stops after {total}; re-create or re-download it, or re-encode what "
                                   f"decodes {fix}")
        if plan is None or total != stated or len(got) != len(plan):
            plan = sample_indices(total, num_frames, stride, name=name)  # over the frames that decode
            _, got, _, _ = _decode(cv2, name, head, lambda _: plan, stop=int(plan[-1]) + 1)
            if len(got) != len(plan):
                raise VideoError(name, f"decoded {total} frames once but frames "
                                       f"{sorted(set(plan.tolist()) - set(got))} not again; the file is "
                                       f"corrupt; re-encode it {fix}")
    frames = np.stack([got[int(i)] for i in plan])  # [F, H, W, 3] uint8
    return Clip(frames=frames, indices=plan, fps=fps, total=total, source=name)


def clip_input(preprocessor: Any, frames: np.ndarray) -> tuple[np.ndarray, Any]:
    """Each frame through an image :class:`~vitviz.models.Preprocess`, as the video processors of
    transformers resize, crop and normalise every frame alike.

    Args:
        preprocessor: the model's :class:`~vitviz.models.Preprocess`.
        frames: ``[F, H, W, 3]`` uint8 RGB.

    Returns:
        ``(views, x)``: ``views [F, h, w, 3]`` uint8, each frame as the model sees it (for drawing),
        and ``x [F, 3, h, w]`` float32, the clip the model takes (batch it as ``x[None]``).
    """
    import torch

    views = np.stack([preprocessor.view(f) for f in frames])  # [F, h, w, 3] uint8
    x = torch.stack([preprocessor.normalize(v) for v in views])  # [F, 3, h, w]
    return views, x


__all__ = ["Clip", "read_video", "sample_indices", "clip_input", "video_kind", "is_video_file", "VIDEO_SUFFIXES"]
