"""Whole-file writes: write to a temporary name in the same folder, then rename.

An interrupted run therefore leaves either the old file, the new file, or nothing at the
final name, never half a file.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import unicodedata
from pathlib import Path

from ..errors import ImageError

_TMP_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_"  # tempfile's own alphabet (8 of them per name)


def _open_temp(folder: Path, name: str) -> tuple[int, str]:
    """Create ``.<name>.XXXXXXXX.tmp`` in ``folder`` exclusively, with mode ``0o666`` less the
    umask (as ``open()`` would create the file; ``tempfile.mkstemp`` makes it ``0o600`` whatever
    the umask, and the rename would keep that)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tag = "".join(secrets.choice(_TMP_CHARS) for _ in range(8))
        tmp = os.path.join(folder, f".{name}.{tag}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name for {name} in {folder}")


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``.

    The file gets the mode a plain ``open(path, "wb")`` would give it: ``0o666`` less the
    process umask (``0o644`` under the usual ``022``), so that a gallery written to a shared
    folder or served by a web server can be read by others.

    Args:
        path: where the file goes; its folder is created when missing.
        data: the whole content.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _open_temp(path.parent, path.name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def save_png(path, rgb) -> Path:
    """Save an ``HxWx3`` uint8 RGB array as PNG (atomically)."""
    import cv2
    import numpy as np

    arr = np.ascontiguousarray(rgb)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(arr, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"OpenCV could not encode {path} as PNG")
    return atomic_write_bytes(path, buf.tobytes())


def save_npy(path, array) -> Path:
    """Save an array as ``.npy`` (atomically)."""
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    return atomic_write_bytes(path, buf.getvalue())


# suffixes of video files (vitviz.models reads them for video models; the gallery lists them)
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp",
                  ".ogv", ".ts")

_UNSAFE = re.compile(r"[^\w.\-]+", re.UNICODE)


def safe_stem(name: str) -> str:
    """A file-name stem derived from any source name: no path separators, no traversal,
    no control characters; Unicode letters are kept."""
    stem = unicodedata.normalize("NFC", Path(str(name)).stem)
    stem = _UNSAFE.sub("_", stem).strip("._") or "image"
    return stem[:120]


def unique_stems(names) -> list[str]:
    """Safe stems for a list of source names, made unique by a numeric suffix."""
    used: set[str] = set()
    out = []
    for n in names:
        base = stem = safe_stem(n)
        i = 1
        while stem.lower() in used:
            i += 1
            stem = f"{base}-{i}"
        used.add(stem.lower())
        out.append(stem)
    return out


def usable_file(name: str, error: type[ImageError] = ImageError, what: str = "image",
                example: str = " (e.g. DIR/*.jpg)") -> int:
    """The size of ``name`` once it is known to be a file that exists and is not empty.

    Args:
        name: the path.
        error: the error raised (:class:`ImageError` or a subclass), as ``error(name, why)``.
        what: what the file should be, for the messages (``"image"``, ``"video"``).
        example: how to pass a folder's files, for the message.

    Returns:
        The file's size in bytes (at least 1).

    Raises:
        ImageError: (``error``) missing, a folder, unreadable or empty.
    """
    if not os.path.exists(name):
        where = "" if os.path.isabs(name) else f" (relative paths start at {os.getcwd()})"
        raise error(name, f"no such file; check the path{where}")
    if os.path.isdir(name):
        raise error(name, f"is a directory, not an {what} file; pass the {what} files inside it{example}, "
                          "or use `vitviz gallery DIR` for a whole folder")
    try:
        size = os.path.getsize(name)
    except OSError as e:
        raise error(name, f"cannot be read ({e.strerror or e}); check its permissions") from e
    if size == 0:
        raise error(name, "the file is empty (0 bytes): it was not written completely or the "
                          "download failed; re-create or re-download it")
    return size
