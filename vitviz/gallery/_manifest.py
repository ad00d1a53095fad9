"""The gallery's bookkeeping: ``manifest.jsonl``, shard journals and ``gallery.json``.

While a run works, each finished batch appends its records (one JSON object per line) to
the run's journal with a single ``write`` call on a file opened in append mode, so a killed
process leaves whole lines (a torn last line, possible only on power loss, is ignored when
read back). At the end of a run the manifest is rewritten, through a temporary file and a
rename, in gallery order (sorted by key), so an interrupted and resumed run and an
uninterrupted one leave the same file.

An unsharded run journals into ``manifest.jsonl`` itself; shard ``K`` of ``N`` journals into
``manifest-K-of-N.jsonl`` and, once done, writes ``shard-K-of-N.json``. Merging reads every
journal and writes the combined ``manifest.jsonl`` and ``index.html``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from .._util.files import atomic_write_bytes
from ..errors import VitvizError

MANIFEST = "manifest.jsonl"
CONFIG = "gallery.json"
FORMAT = "vitviz-gallery"
VERSION = 1
_JOURNAL = re.compile(r"^manifest-(\d+)-of-(\d+)\.jsonl$")
_STATUS_RANK = {"done": 2, "failed": 1, "skipped": 0}


def journal_name(shard: tuple[int, int] | None) -> str:
    return MANIFEST if shard is None else f"manifest-{shard[0]}-of-{shard[1]}.jsonl"


def marker_name(shard: tuple[int, int]) -> str:
    return f"shard-{shard[0]}-of-{shard[1]}.json"


def dumps(record: dict) -> str:
    """One manifest line (UTF-8, no ASCII escaping, compact, newline-terminated)."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"


def read_records(path) -> list[dict]:
    """The records of a manifest or journal; unparsable lines (a torn tail) are dropped."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(rec, dict) and isinstance(rec.get("key"), str):
            out.append(rec)
    return out


def journals(out_dir) -> list[Path]:
    """``manifest.jsonl`` and every shard journal in ``out_dir``, oldest first."""
    out_dir = Path(out_dir)
    found = [p for p in out_dir.iterdir() if p.name == MANIFEST or _JOURNAL.match(p.name)] \
        if out_dir.is_dir() else []
    return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name))


def combine(records: Iterable[dict]) -> list[dict]:
    """One record per key, sorted by key: ``done`` beats ``failed`` beats ``skipped``; among
    equals the later record wins (journals are read oldest first)."""
    best: dict[str, dict] = {}
    for rec in records:
        old = best.get(rec["key"])
        if old is None or _STATUS_RANK.get(rec.get("status"), -1) >= _STATUS_RANK.get(old.get("status"), -1):
            best[rec["key"]] = rec
    return [best[k] for k in sorted(best)]


def all_records(out_dir) -> list[dict]:
    """The combined records of every journal in ``out_dir``."""
    recs: list[dict] = []
    for p in journals(out_dir):
        recs.extend(read_records(p))
    return combine(recs)


def write_manifest(path, records: Iterable[dict]) -> Path:
    """Write records as JSON lines, atomically."""
    return atomic_write_bytes(path, "".join(dumps(r) for r in records).encode("utf-8"))


class Journal:
    """Append-only record log of one run (whole lines per ``write`` call).

    Opening replaces the file, atomically, by ``initial`` (the records an earlier run
    finished and this run keeps), then appends.
    """

    def __init__(self, path, initial: Iterable[dict] = ()):
        self.path = Path(path)
        write_manifest(self.path, initial)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def append(self, records: Iterable[dict]) -> None:
        data = "".join(dumps(r) for r in records).encode("utf-8")
        view = memoryview(data)
        while view:  # a regular file takes it in one call; loop for the rare short write
            n = os.write(self._fd, view)
            view = view[n:]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_config(out_dir) -> dict | None:
    path = Path(out_dir) / CONFIG
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VitvizError(f"{path} is not valid JSON ({e}); delete it to start the gallery anew") from e
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise VitvizError(f"{path} is not a vitviz gallery description; use another --out folder")
    return cfg


# settings that change the content of the outputs: a resumed run or a shard must match them
_MUST_MATCH = ("model", "weights", "methods", "options", "input_size", "cmap", "alpha", "smooth", "norm")


def check_or_write_config(out_dir, config: dict) -> None:
    """Write ``gallery.json`` for a new gallery, or check that it matches the existing one.

    Raises:
        VitvizError: the folder holds a gallery made with other settings (the message names
            them and the fix).
    """
    # through JSON once, so that tuples and lists (and int/str keys) compare as they are stored
    config = json.loads(json.dumps({"format": FORMAT, "version": VERSION, **config}))
    old = read_config(out_dir)
    if old is None:
        atomic_write_bytes(Path(out_dir) / CONFIG,
                           (json.dumps(config, ensure_ascii=False, indent=1) + "\n").encode("utf-8"))
        return
    diff = [k for k in _MUST_MATCH if old.get(k) != config.get(k)]
    if diff:
        shown = "; ".join(f"{k}: {old.get(k)!r} there, {config.get(k)!r} now" for k in diff)
        raise VitvizError(
            f"{out_dir} holds a gallery made with other settings ({shown}); resume it with the "
            "same settings, or write the new gallery to another --out folder")
