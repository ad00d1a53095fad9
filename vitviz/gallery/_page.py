"""The gallery's outputs as a whole: the result of a run, the manifest in gallery order, the
HTML pages, and the merge of a sharded gallery."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import VitvizError
from . import _manifest as mf


@dataclass
class GalleryResult:
    """What a gallery run (or merge) left in ``out_dir``.

    Attributes:
        out_dir: the gallery folder.
        records: the manifest records of this run's images, in gallery order.
        processed: images worked on by this run (the rest were already done).
        seconds: wall time of this run.
        index: ``index.html`` when this run wrote it (unsharded runs, merges, the last shard).
        shard: ``(K, N)`` for a shard run.
    """

    out_dir: Path
    records: list[dict] = field(default_factory=list)
    processed: int = 0
    seconds: float = 0.0
    index: Path | None = None
    shard: tuple[int, int] | None = None

    def _with(self, status: str) -> list[dict]:
        return [r for r in self.records if r.get("status") == status]

    @property
    def done(self) -> list[dict]:
        return self._with("done")

    @property
    def skipped(self) -> list[dict]:
        """Unreadable inputs, each with its ``reason``."""
        return self._with("skipped")

    @property
    def failed(self) -> list[dict]:
        """Images read but not rendered (e.g. a map with NaN values), each with its ``reason``."""
        return self._with("failed")

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """0 when every image is done, 1 when any was skipped or failed."""
        return 1 if (self.skipped or self.failed) else 0

    def summary(self) -> str:
        """One line for the user: how many images ended in each status, and how fast.

        Returns:
            ``"D done, S skipped, F failed in T s"`` over :attr:`records`, followed by
            ``" (P processed, R images/s)"`` when this run worked on any image (``P`` is
            :attr:`processed`, ``R`` :attr:`images_per_second`), e.g.
            ``"98 done, 2 skipped, 0 failed in 12.3 s (40 processed, 3.3 images/s)"``.
        """
        s = (f"{len(self.done)} done, {len(self.skipped)} skipped, {len(self.failed)} failed "
             f"in {self.seconds:.1f} s")
        if self.processed:
            s += f" ({self.processed} processed, {self.images_per_second:.1f} images/s)"
        return s



def finish(out_dir: Path, pairs, kept, new, config, page_size, journal_path) -> Path:
    """Rewrite the manifest in gallery order and write the HTML pages (unsharded runs)."""
    records = [kept.get(s.key) or new.get(s.key) for s, _ in pairs]
    records = [r for r in records if r is not None]
    mf.write_manifest(journal_path, records)
    return write_index(out_dir, records, config, page_size)


def write_index(out_dir: Path, records: list[dict], config: dict, page_size: int) -> Path:
    from ..render.html import write_gallery_html

    title = config.get("title") or f"vitviz gallery: {config.get('model')}"
    return write_gallery_html(out_dir, records, methods=config.get("methods") or [], title=title,
                              model=config.get("model"), page_size=page_size)


def merge_gallery(out_dir, *, page_size: int = 100) -> GalleryResult:
    """Combine the journals of a sharded gallery into ``manifest.jsonl`` and ``index.html``.

    Args:
        out_dir: a gallery folder written by :func:`build_gallery` (with ``shard=`` or not).
        page_size: images per HTML page.

    Returns:
        :class:`GalleryResult` over every image of the gallery.

    Raises:
        VitvizError: ``out_dir`` is not a gallery.

    Example:
        >>> # after `vitviz gallery photos --out g --shard K/4` for K = 1..4
        >>> merge_gallery("g").index
        PosixPath('g/index.html')
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    config = mf.read_config(out_dir)
    if config is None:
        raise VitvizError(f"{out_dir} is not a vitviz gallery (no {mf.CONFIG}); give the --out "
                          "folder of `vitviz gallery` runs")
    records = mf.all_records(out_dir)
    mf.write_manifest(out_dir / mf.MANIFEST, records)
    result = GalleryResult(out_dir, records)
    result.index = write_index(out_dir, records, config, page_size)
    result.seconds = time.perf_counter() - t0
    return result
