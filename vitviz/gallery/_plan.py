"""What a gallery run will do: its checked settings, the images still to do, and the resume
bookkeeping (finished images whose files exist are kept; temporary files of a killed run go)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import VitvizError
from . import _manifest as mf
from ._sources import Source, list_sources, output_names, parse_shard, shard_of

if TYPE_CHECKING:  # the registry (vitviz.explain) loads when a run is planned
    from ..explain import Method

_TMP = re.compile(r"^\.(?P<final>.+)\.[A-Za-z0-9_]{8}\.tmp$")  # _io.atomic_write_bytes' temp names


def _files_exist(out_dir: Path, rec: dict, methods: Sequence[str]) -> bool:
    outs = rec.get("outputs") or {}
    if rec.get("image") is None or set(outs) != set(methods):
        return False
    paths = [rec["image"]] + [p for o in outs.values() for p in (o.get("overlay"), o.get("npy"))]
    return all(isinstance(p, str) and (out_dir / p).is_file() for p in paths)


def _clean_temps(folder: Path, finals: set[str]) -> None:
    """Remove temporary files a killed run left for the outputs this run will write."""
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return
    for e in entries:
        m = _TMP.match(e.name)
        if m and m.group("final") in finals:
            try:
                os.unlink(e.path)
            except FileNotFoundError:
                pass


def weights_fingerprint(module) -> str:
    """A short hash of a model's parameter names, shapes and first values: tells a resumed
    run whether it has the same weights as the run it continues.

    Every ``state_dict`` entry (parameters and buffers, in order) adds its name, shape and
    dtype, and for floating-point tensors its first 64 values as float32; later values are
    not read, so two models that differ only past them get the same fingerprint.

    Args:
        module: the ``nn.Module`` (e.g. ``VisionModel.module``), on any device.

    Returns:
        The first 16 hex digits of the SHA-1 of those bytes.
    """
    import hashlib

    h = hashlib.sha1()
    for name, t in module.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        if t.is_floating_point() and t.numel():
            h.update(t.detach().reshape(-1)[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Plan:
    """A gallery run's checked settings and work.

    Attributes:
        out_dir: the gallery folder (created).
        methods: ``(method, options)`` pairs, options checked.
        workers: decoding processes.
        shard: ``(K, N)`` or None.
        config: what ``gallery.json`` holds (a resumed run must match it).
        pairs: ``(source, output name)`` of every image of this run (this shard), in order.
        kept: records of finished images whose files exist, by key (not redone).
        todo: the ``(source, name)`` pairs still to do.
        journal_path: the manifest this run appends to.
    """

    out_dir: Path
    methods: list[tuple[Method, dict[str, Any]]]
    workers: int
    shard: tuple[int, int] | None
    config: dict[str, Any]
    pairs: list[tuple[Source, str]] = field(default_factory=list)
    kept: dict[str, dict[str, Any]] = field(default_factory=dict)
    todo: list[tuple[Source, str]] = field(default_factory=list)
    journal_path: Path = Path()


def plan_run(src: Any, vm: Any, out_dir: Any, *, methods: Any, options: dict[str, Any] | None,
             batch_size: int, workers: int | None, limit: int | None, shard: Any, page_size: int,
             cmap: str, alpha: float | None, norm: str, title: str | None, model_id: str | None,
             smooth: bool = False) -> Plan:
    """Check the arguments of :func:`build_gallery`, list the images, check or write the
    gallery's settings and sort the images into finished (kept) and to do; temporary files
    that a killed run left for the outputs to redo are removed.

    Raises:
        VitvizError: as :func:`build_gallery`.
    """
    from ..batch import default_workers
    from ..explain import get_method

    out_dir = Path(out_dir)
    names_wanted = [s.strip() for s in methods.split(",")] if isinstance(methods, str) else list(methods)
    names_wanted = [n for n in names_wanted if n]
    if not names_wanted:
        raise VitvizError("no gallery method given; use e.g. methods='rollout,cls'")
    if len(set(names_wanted)) != len(names_wanted):
        raise VitvizError(f"a gallery method is named twice in {','.join(names_wanted)}")
    opts = dict(options or {})
    for k in opts:
        if k not in names_wanted:
            raise VitvizError(f"options given for {k!r}, which is not among the methods {', '.join(names_wanted)}")
    chosen = [(get_method(n), None) for n in names_wanted]
    for m, _ in chosen:
        m.check_installed()  # a missing optional package fails now, not on every batch
    chosen = [(m, m.options(opts.get(m.name))) for m, _ in chosen]
    if batch_size < 1:
        raise VitvizError(f"batch_size must be at least 1, got {batch_size}")
    workers = default_workers() if workers is None else int(workers)
    if workers < 0:
        raise VitvizError(f"workers must be 0 (decode in this process) or more, got {workers}")
    if limit is not None and limit < 1:
        raise VitvizError(f"limit must be at least 1, got {limit}")
    if page_size < 1:
        raise VitvizError(f"page_size must be at least 1, got {page_size}")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise VitvizError(f"alpha must be in [0, 1] or None (opacity that grows with the value), got {alpha}")
    if norm not in ("image", "none"):
        raise VitvizError(f"the gallery's norm is 'image' or 'none', got {norm!r}; it renders each "
                          "batch while the next one runs, before the whole run's range is known: "
                          "'none' gives every image the same fixed [0, 1] scale")
    shard = parse_shard(shard)
    pre = vm.preprocessor
    if pre is None:
        raise VitvizError(f"{vm.name} has no preprocessing configuration; give one with "
                          "vitviz.wrap(module, preprocess=vitviz.Preprocess(size=(H, W)))")

    # -- what to do ----------------------------------------------------------------------------
    if isinstance(src, (list, tuple)) and src and all(isinstance(s, Source) for s in src):
        sources = sorted(src, key=lambda s: s.key)
    else:
        sources = list_sources(src, exclude=out_dir)
    if limit is not None:
        sources = sources[:limit]
    names = output_names(sources)
    pairs = list(zip(sources, names))
    if shard is not None:
        pairs = [(s, n) for s, n in pairs if shard_of(s.key, shard[1]) == shard[0]]

    out_dir.mkdir(parents=True, exist_ok=True)
    method_names = [m.name for m, _ in chosen]
    config = {"model": model_id or vm.name, "weights": weights_fingerprint(vm.module),
              "methods": method_names, "options": {m.name: o for m, o in chosen},
              "input_size": list(vm.input_size) if vm.input_size else None,
              "cmap": cmap, "alpha": alpha, "title": title}
    if smooth:  # as norm: only when set, so the description of a default gallery stays as it was
        config["smooth"] = True
    if norm != "image":  # galleries written before the option had per-image scales: still resumable
        config["norm"] = norm
    mf.check_or_write_config(out_dir, config)

    existing = {r["key"]: r for r in mf.all_records(out_dir)}
    kept: dict[str, dict] = {}
    todo: list[tuple[Source, str]] = []
    for s, n in pairs:
        r = existing.get(s.key)
        if r is not None and r.get("status") == "done" and r.get("name") == n \
                and _files_exist(out_dir, r, method_names):
            kept[s.key] = r
        else:
            todo.append((s, n))
    for folder in ["images"] + method_names:
        ext = {"images": (".jpg",)}.get(folder, (".jpg", ".npy"))
        _clean_temps(out_dir / folder, {n + e for _, n in todo for e in ext})
    journal_path = out_dir / mf.journal_name(shard)
    own = {"manifest.jsonl", "gallery.json"} if shard is None else set()
    _clean_temps(out_dir, {journal_path.name} | own)
    if shard is not None:
        try:
            (out_dir / mf.marker_name(shard)).unlink()
        except FileNotFoundError:
            pass


    return Plan(out_dir, chosen, workers, shard, config, pairs, kept, todo, journal_path)
