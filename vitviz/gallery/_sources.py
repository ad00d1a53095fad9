"""What a gallery is made of: the list of input images, their keys, names and shards.

Every input gets a **key**, its POSIX path relative to the gallery's root (the folder given,
or the common folder of the files a list file or glob names). Keys identify an image in the
manifest, fix the order of the gallery (sorted by key) and decide its shard, so the same
command run twice, resumed, or split into shards always sees the same images in the same
order with the same output names.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from .._util.files import VIDEO_SUFFIXES, unique_stems
from ..errors import VitvizError

# formats Pillow reads out of the box; files with other extensions in a folder are not images
# (label files, notes, .DS_Store) and are left out of a folder listing without comment
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".bmp", ".dib", ".gif", ".tif", ".tiff",
    ".webp", ".ppm", ".pgm", ".pbm", ".pnm", ".pfm", ".tga", ".ico", ".qoi", ".avif", ".jp2",
    ".j2k", ".jpx", ".psd", ".sgi", ".pcx",
})
# video files are items too: a video model maps each clip, an image model reports it as skipped
VIDEO_EXTENSIONS = frozenset(VIDEO_SUFFIXES)
# a SRC file with one of these extensions holds one image path per line
LIST_EXTENSIONS = (".txt", ".lst", ".list")
_GLOB_CHARS = set("*?[")

SourceLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class Source:
    """One input image of a gallery.

    Attributes:
        key: POSIX path relative to the gallery root; unique, the sort and shard key.
        path: the path to read (as the user gave it, joined with the folder or list file).
    """

    key: str
    path: str


class SourceError(VitvizError):
    """SRC names nothing usable: no such path, an empty folder, an unknown file kind."""


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _walk_folder(folder: str, exclude: str | None) -> list[str]:
    """Image and video files under ``folder`` (recursive, hidden files and folders left out), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        keep = []
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if _is_hidden(d) or (exclude is not None and os.path.abspath(full) == exclude):
                continue
            keep.append(d)
        dirnames[:] = sorted(keep)
        for f in filenames:
            if not _is_hidden(f) and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS:
                found.append(os.path.join(dirpath, f))
    return found


def _read_list_file(path: str) -> list[str]:
    """Paths from a list file: one per line; blank lines and ``#`` comments are skipped;
    relative paths are relative to the list file's folder."""
    base = os.path.dirname(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise SourceError(f"{path}: a list file must be UTF-8 text with one image path per line "
                          f"({e})") from e
    out = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        out.append(line if os.path.isabs(line) else os.path.join(base, line))
    return out


def _expand(src: str, exclude: str | None) -> tuple[list[str], str | None]:
    """The files one SRC names, and its folder when it is a folder."""
    if os.path.isdir(src):
        return _walk_folder(src, exclude), src
    if os.path.isfile(src):
        ext = os.path.splitext(src)[1].lower()
        if ext in LIST_EXTENSIONS:
            return _read_list_file(src), None
        if ext in IMAGE_EXTENSIONS or ext in VIDEO_EXTENSIONS:
            return [src], None
        raise SourceError(
            f"{src}: not a folder, an image or a list file ({', '.join(LIST_EXTENSIONS)}); "
            "give a folder of images, a text file with one image path per line, or a glob "
            "such as 'photos/**/*.jpg' (quoted)")
    if _GLOB_CHARS & set(src):
        return sorted(p for p in glob.glob(src, recursive=True) if os.path.isfile(p)), None
    where = "" if os.path.isabs(src) else f" (relative paths start at {os.getcwd()})"
    raise SourceError(f"{src}: no such file or folder{where}; check the path")


def list_sources(src: SourceLike | Sequence[SourceLike], *,
                 exclude: SourceLike | None = None) -> list[Source]:
    """The images of a gallery, sorted by key.

    Args:
        src: a folder (searched recursively for image files), a list file (``.txt``,
            ``.lst``, ``.list``: one path per line, relative to the list file), a glob
            pattern (``"photos/**/*.jpg"``), an image file, or a sequence of these.
        exclude: a folder left out of folder listings (the gallery's own output folder).

    Returns:
        One :class:`Source` per distinct input, sorted by key. Paths named by a list file
        that do not exist are kept: the gallery reports them as skipped.

    Raises:
        SourceError: a SRC that does not exist, or nothing found at all.

    Example:
        >>> [s.key for s in list_sources("photos")]
        ['cats/a.jpg', 'cats/b.png', 'dog.jpg']
    """
    srcs = [src] if isinstance(src, (str, os.PathLike)) else list(src)
    if not srcs:
        raise SourceError("no SRC given; name a folder, a list file or a glob")
    excl = os.path.abspath(os.fspath(exclude)) if exclude is not None else None
    paths: list[str] = []
    folders: list[str | None] = []
    for s in srcs:
        found, folder = _expand(os.fspath(s), excl)
        paths.extend(found)
        folders.append(folder)
    if not paths:
        what = ", ".join(os.fspath(s) for s in srcs)
        raise SourceError(f"no images found in {what} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}, "
                          "recursively in folders); check the path or the glob")
    absolute = [os.path.abspath(p) for p in paths]
    if len(srcs) == 1 and folders[0] is not None:
        root = os.path.abspath(folders[0])
    else:
        root = os.path.commonpath([os.path.dirname(a) for a in absolute])
    seen: dict[str, Source] = {}
    for p, a in zip(paths, absolute):
        key = Path(os.path.relpath(a, root)).as_posix()
        if key not in seen:  # the same file named twice is one image
            seen[key] = Source(key, p)
    return [seen[k] for k in sorted(seen)]


def output_names(sources: Sequence[Source]) -> list[str]:
    """Safe, unique output stems (``sub/cat.jpg`` -> ``sub_cat``) for sources sorted by key.

    Derived from the whole key, so ``a/cat.jpg`` and ``b/cat.jpg`` stay apart; no path
    separators, no traversal, Unicode letters kept (see :func:`vitviz._util.files.safe_stem`);
    collisions get ``-2``, ``-3``, ... in key order.

    Args:
        sources: the gallery's images, sorted by ``key`` (what :func:`list_sources` returns).

    Returns:
        One stem per source, in the same order: the key with ``/`` turned into ``_``, its
        extension dropped, unsafe characters replaced, at most 120 characters before a suffix;
        unique without regard to case (``Cat`` and ``cat`` become ``Cat`` and ``cat-2``).
    """
    return unique_stems([s.key.replace("/", "_") for s in sources])


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"K/N"`` -> ``(K, N)`` with ``1 <= K <= N``; ``None`` stays ``None``.

    Args:
        text: the ``--shard`` value: ``"K/N"`` (e.g. ``"2/8"``), a ``(K, N)`` tuple (checked
            the same way), or None (no sharding).

    Returns:
        ``(K, N)`` as ints, K the 1-based shard and N the number of shards; None for None.

    Raises:
        VitvizError: anything else, with the expected form: not two integers separated by
            ``/``, or not ``1 <= K <= N``.
    """
    if text is None:
        return None
    if isinstance(text, tuple):
        k, n = text
    else:
        parts = str(text).split("/")
        try:
            k, n = (int(p) for p in parts)
        except ValueError:
            raise VitvizError(f"--shard must look like K/N (e.g. 2/8: the second of eight shards), "
                              f"got {text!r}") from None
    if not (n >= 1 and 1 <= k <= n):
        raise VitvizError(f"--shard K/N needs 1 <= K <= N, got {k}/{n}; with a Slurm array "
                          f"--array=1-{max(n, 1)} use --shard $SLURM_ARRAY_TASK_ID/{max(n, 1)}")
    return int(k), int(n)


def shard_of(key: str, num_shards: int) -> int:
    """The shard (1..N) an image belongs to: a hash of its key, so the split depends on
    nothing but the key (not on the order, the machine or the other files).

    Args:
        key: the image's :attr:`Source.key` (POSIX path relative to the gallery root).
        num_shards: ``N``, at least 1.

    Returns:
        The shard number in ``[1, N]``: the first 8 bytes of the SHA-1 of the UTF-8 key, as a
        big-endian integer, modulo ``N``, plus 1.

    Raises:
        ZeroDivisionError: ``num_shards == 0`` (:func:`parse_shard` never gives it).
    """
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % num_shards + 1
