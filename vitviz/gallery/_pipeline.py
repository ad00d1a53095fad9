"""The gallery pipeline: decode in worker processes, run the model in batches, render in threads.

::

    DataLoader workers           main thread                      render threads
    load + preprocess  ──batch──► forward under capture ──maps──►  overlays, PNG/JPEG/.npy
    (bad files become            methods -> maps [B, ...]          (atomic writes)
     "skipped" records)          top-5, journal records  ◄─records─┘

While the threads render batch ``i`` the model already runs batch ``i + 1``; at most
``render_threads + 1`` batches wait, so memory stays bounded.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from ..errors import ImageError, VitvizError
from . import _manifest as mf
from ._methods import Method, MethodInput, MethodResult, classifier_logits, get_method
from ._sources import Source, list_sources, output_names, parse_shard, shard_of

_TMP = re.compile(r"^\.(?P<final>.+)\.[A-Za-z0-9_]{8}\.tmp$")  # _io.atomic_write_bytes' temp names


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------

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
    index: Optional[Path] = None
    shard: Optional[tuple[int, int]] = None

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
        s = (f"{len(self.done)} done, {len(self.skipped)} skipped, {len(self.failed)} failed "
             f"in {self.seconds:.1f} s")
        if self.processed:
            s += f" ({self.processed} processed, {self.images_per_second:.1f} images/s)"
        return s


# --------------------------------------------------------------------------------------------
# decoding (runs in DataLoader workers)
# --------------------------------------------------------------------------------------------

def _prepare(pre, path: str):
    """``(view [H, W, 3] uint8, x [3, H, W] float32)`` for one file."""
    if hasattr(pre, "view") and hasattr(pre, "normalize"):
        view = pre.view(path)  # [H, W, 3] uint8: resized and cropped, as the model sees it
        return view, pre.normalize(view)  # [3, H, W]
    # a user-supplied callable without a view(): draw over the image resized to the input size
    from ..models import load_image

    img = load_image(path)
    x = pre(img)  # [1, 3, H, W]
    x = x[0] if x.dim() == 4 else x
    view = np.asarray(img.resize((int(x.shape[-1]), int(x.shape[-2]))), dtype=np.uint8)
    return view, x


class _ImageSet:
    """Map-style dataset of file paths -> ``(index, x, view, None)`` or ``(index, None, None, reason)``."""

    def __init__(self, paths: Sequence[str], preprocessor):
        self.paths = list(paths)
        self.pre = preprocessor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        import torch

        try:
            view, x = _prepare(self.pre, self.paths[i])
            return i, x, torch.from_numpy(np.ascontiguousarray(view)), None
        except ImageError as e:
            return i, None, None, e.reason
        except Exception as e:  # noqa: BLE001 - any decoder failure is this file's problem, not the run's
            return i, None, None, f"could not be read ({type(e).__name__}: {e})"


def _collate(items):
    """Stack the readable images; keep the unreadable ones as ``(index, reason)``."""
    import torch

    ok = [it for it in items if it[3] is None]
    batch = {"index": [it[0] for it in ok], "x": None, "views": None,
             "failures": [(it[0], it[3]) for it in items if it[3] is not None]}
    if ok:
        batch["x"] = torch.stack([it[1] for it in ok])  # [B, 3, H, W]
        batch["views"] = torch.stack([it[2] for it in ok])  # [B, H, W, 3] uint8
    return batch


# --------------------------------------------------------------------------------------------
# model and methods (main thread)
# --------------------------------------------------------------------------------------------

def _per_image(method: Method, res: MethodResult, b: int) -> tuple[list[np.ndarray], list]:
    """Split a method's batch result into ``b`` float32 arrays ``[gh, gw]`` / ``[K, gh, gw]``."""
    import torch

    maps = res.maps
    if isinstance(maps, torch.Tensor):
        arr = maps.detach().float().cpu().numpy()  # [B, gh, gw] or [B, K, gh, gw]
        per = list(arr) if arr.ndim in (3, 4) and arr.shape[0] == b else None
    elif isinstance(maps, (list, tuple)) and len(maps) == b:
        per = [m.detach().float().cpu().numpy() if isinstance(m, torch.Tensor)
               else np.asarray(m, dtype=np.float32) for m in maps]
    else:
        per = None
    if per is None or any(m.ndim not in (2, 3) or min(m.shape[-2:]) < 1 for m in per):
        shape = getattr(maps, "shape", None) or f"{type(maps).__name__} of {len(maps) if hasattr(maps, '__len__') else '?'}"
        raise VitvizError(f"gallery method {method.name!r} returned maps {shape} for a batch of {b}; "
                          "expected [B, gh, gw], [B, K, gh, gw] or B arrays [K, gh, gw]")
    names = list(res.names) if res.names is not None else [None] * b
    texts = list(res.texts) if res.texts is not None else [None] * b
    if len(names) != b or len(texts) != b:
        raise VitvizError(f"gallery method {method.name!r} returned {len(names)} name lists / "
                          f"{len(texts)} texts for a batch of {b}")
    return [np.ascontiguousarray(m, dtype=np.float32) for m in per], list(zip(names, texts))


# use streaming analyses inside the capture when every shared method has one; tests switch it
# off to compare both paths
USE_STREAMS = True


def _forward(model, x):
    """``model(x)``; a model that cannot be called so gets a typed error with the way out."""
    try:
        return model(x)
    except VitvizError:
        raise
    except (TypeError, ValueError) as e:  # a model that needs other inputs (a captioner's ids)
        raise VitvizError(
            f"{model.name} could not run on a batch of shape {tuple(x.shape)} ({type(e).__name__}: {e}); "
            "attention methods (rollout, cls, relevance, ...) call the model as model(images): "
            "for a captioning model use --methods caption") from e


def _run_methods(model, x, methods: list[tuple[Method, dict]]):
    """Run the shared forward pass (if any method needs it) and every method on one batch.

    Attention methods share one captured forward pass without gradients. With a grad method,
    the forward pass runs with gradients and one backward pass of every image's
    predicted-class logit follows (only the attention gradients are computed, no parameter
    gradients). When every shared method streams, the capture keeps no layer. Captioning-style methods
    run the model themselves.

    Returns:
        ``(model output or None, {method: MethodResult})``
    """
    import torch

    from ..explain import backward_through_attention
    from ..hooks import capture

    results: dict[str, MethodResult] = {}
    output = None
    shared = [(m, o) for m, o in methods if m.needs in ("attention", "grad")]
    grad = any(m.needs == "grad" for m, _ in shared)
    streams: dict = {}
    if shared and USE_STREAMS:
        made = {m.name: (m.stream(model, **o) if m.stream is not None else None) for m, o in shared}
        if all(s is not None for s in made.values()):
            streams = made
    kw = {"keep": "none", "streams": streams} if streams else {}
    if grad:
        xg = x.detach().requires_grad_(True)  # the graph exists even when the parameters are frozen
        with torch.enable_grad(), capture(model, grad=True, **kw) as rec:
            output = _forward(model, xg)
            logits = classifier_logits(output)
            if logits is None:
                raise VitvizError(f"{', '.join(m.name for m, _ in shared if m.needs == 'grad')} explain "
                                  "the predicted class and need classifier logits [B, classes]; "
                                  "this model's output is not a classifier's")
            target = logits.detach().argmax(dim=-1)  # [B]
            score = logits.gather(1, target[:, None]).sum()  # each sample's own predicted logit
            backward_through_attention(score, xg, rec, model.name)  # hooks store or stream dA
    elif shared:
        target = None
        with torch.no_grad(), capture(model, **kw) as rec:
            output = _forward(model, x)
    if shared:
        with torch.no_grad():
            for m, o in shared:
                streamed = rec.stream(m.name) if streams else None
                results[m.name] = m(MethodInput(model, x, rec, output, streamed=streamed, target=target), **o)
    for m, o in methods:
        if m.needs == "model":
            with torch.no_grad():
                results[m.name] = m(MethodInput(model, x, None, None), **o)
    return output, results


def _top5(model, output) -> Optional[list[list[dict]]]:
    logits = classifier_logits(output)
    if logits is None:
        return None
    p = logits.detach().float().softmax(-1)  # [B, C]
    vals, idx = p.topk(min(5, p.shape[-1]), dim=-1)  # [B, k]
    labels = getattr(model, "labels", None)
    out = []
    for vs, cs in zip(vals.cpu().tolist(), idx.cpu().tolist()):
        out.append([{"index": int(c), "label": str(labels[c]) if labels and c < len(labels) else None,
                     "prob": round(float(v), 4)} for v, c in zip(vs, cs)])
    return out


def _record(source: Source, name: str, status: str, reason: Optional[str] = None, *,
            top5=None, caption=None, image=None, outputs=None) -> dict:
    """A manifest line; the key order is fixed so equal runs give equal bytes."""
    return {"key": source.key, "source": source.path, "name": name, "status": status,
            "reason": reason, "prediction": top5[0] if top5 else None, "top5": top5 or None,
            "caption": caption, "image": image, "outputs": outputs or {}}


# --------------------------------------------------------------------------------------------
# rendering (render threads)
# --------------------------------------------------------------------------------------------

def _render_batch(out_dir: Path, jobs: list[dict], cmap: str, alpha: float, norm: str = "image") -> list[dict]:
    from ._render import render_image

    records = []
    for job in jobs:
        src, name = job["source"], job["name"]
        bad = [m for m, a in job["maps"].items() if not np.isfinite(a).all()]
        caption = next((t for t in job["texts"].values() if t), None)
        if bad:
            records.append(_record(src, name, "failed",
                                   f"method {', '.join(bad)} gave NaN or infinite values",
                                   top5=job["top5"], caption=caption))
            continue
        try:
            image, outputs = render_image(out_dir, name, job["view"], job["maps"], job["names"],
                                          cmap=cmap, alpha=alpha, norm=norm)
        except OSError:
            raise  # disk full, permissions: the run cannot go on
        except Exception as e:  # noqa: BLE001 - one image's rendering problem, reported for it
            records.append(_record(src, name, "failed", f"rendering failed ({type(e).__name__}: {e})",
                                   top5=job["top5"], caption=caption))
            continue
        records.append(_record(src, name, "done", top5=job["top5"], caption=caption, image=image,
                               outputs=outputs))
    return records


# --------------------------------------------------------------------------------------------
# resume helpers
# --------------------------------------------------------------------------------------------

def _files_exist(out_dir: Path, rec: dict, methods: Sequence[str]) -> bool:
    outs = rec.get("outputs") or {}
    if rec.get("image") is None or set(outs) != set(methods):
        return False
    paths = [rec["image"]] + [p for o in outs.values() for p in (o.get("png"), o.get("npy"))]
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
    run whether it has the same weights as the run it continues."""
    import hashlib

    h = hashlib.sha1()
    for name, t in module.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        if t.is_floating_point() and t.numel():
            h.update(t.detach().reshape(-1)[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _default_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 2) - 1))


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------

def build_gallery(
    src: Union[str, "os.PathLike[str]", Sequence[Any]],
    model,
    out_dir,
    *,
    methods: Union[str, Sequence[str]] = ("rollout", "cls"),
    options: Optional[dict] = None,
    batch_size: int = 16,
    workers: Optional[int] = None,
    limit: Optional[int] = None,
    shard: Union[str, tuple[int, int], None] = None,
    page_size: int = 100,
    cmap: str = "jet",
    alpha: float = 0.5,
    norm: str = "image",
    title: Optional[str] = None,
    model_id: Optional[str] = None,
    progress: bool = True,
    render_threads: int = 2,
    threads: Optional[int] = None,
    on_record: Optional[Callable[[dict], None]] = None,
    explore: bool = False,
) -> GalleryResult:
    """Maps for every image of a folder, list file or glob, and a static page to browse them.

    Writes into ``out_dir``: ``images/<name>.jpg`` (the input as the model saw it),
    ``<method>/<name>.png`` (overlay; several maps as a labelled grid) and
    ``<method>/<name>.npy`` (raw maps ``[gh, gw]`` or ``[K, gh, gw]``), ``manifest.jsonl``
    (one record per image: source, status, reason, prediction, top-5, caption, outputs),
    ``gallery.json`` (the settings) and ``index.html`` (+ ``index-2.html`` ... pages).

    Every file is written whole (temporary name, then rename). Running the same call again
    resumes: images whose record says done and whose files exist are skipped. Unreadable
    images are recorded as skipped with the reason and the run goes on.

    Args:
        src: a folder (recursive), a list file, a glob, an image file, or a sequence of these
            (see :func:`list_sources`), or a list of :class:`Source`.
        model: a :class:`vitviz.VisionModel` (or a torch module, wrapped).
        out_dir: the gallery folder (created).
        methods: method names (see :func:`list_methods`) or one comma-separated string.
        options: per-method options, e.g. ``{"rollout": {"discard_ratio": 0.9}}``.
        batch_size: images per forward pass.
        workers: decoding processes (0 decodes in this process); default ``min(4, CPUs - 1)``.
        limit: only the first ``limit`` images (in gallery order).
        shard: ``"K/N"`` or ``(K, N)``: only this shard's images (split by a hash of each
            key); the last shard to finish merges the index, or call :func:`merge_gallery`.
        page_size: images per HTML page.
        cmap, alpha: overlay colour map and heatmap weight (as :func:`vitviz.overlay`).
        norm: ``"image"`` (each map min-max scaled on its own) or ``"none"`` (raw values on a
            fixed ``[0, 1]`` scale: equal values have equal colours in every image). ``"batch"``
            is refused: the gallery renders while it runs, before the run's range is known.
        title: page title (default ``"vitviz gallery: <model_id>"``).
        model_id: the model name stored in ``gallery.json`` (default ``model.name``).
        progress: show a tqdm progress bar with images/second.
        render_threads: threads rendering and encoding while the model runs.
        threads: torch intra-op threads for the model during the run (restored afterwards).
            Default: torch's current setting. Decoding and rendering take a few percent of
            the CPU time of a ViT's forward pass, so sharing the cores with them costs far
            less than leaving cores to them: on 2 cores with 1 worker, ViT-B/16 ran the
            gallery at 0.51x plain inference with 1 torch thread and 0.87x with 2.
        on_record: called with each new manifest record (in the main thread).
        explore: also write each image's explorer page (:func:`vitviz.explore`) as
            ``explore/<name>.html``, linked from the large view.

    Returns:
        :class:`GalleryResult`; ``.exit_code`` is 1 when anything was skipped or failed.

    Raises:
        VitvizError: bad arguments, a SRC with no images, an ``out_dir`` holding a gallery
            made with other settings, an unknown method.

    Example:
        >>> m = vitviz.load_model("b16")
        >>> r = build_gallery("photos/", m, "gallery/", methods="rollout,cls", batch_size=32)
        >>> r.summary()
        '998 done, 2 skipped, 0 failed in 61.0 s (1000 processed, 16.4 images/s)'
    """
    import torch
    from tqdm.auto import tqdm

    from ..models import VisionModel, wrap

    t0 = time.perf_counter()
    vm = model if isinstance(model, VisionModel) else wrap(model)
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
    workers = _default_workers() if workers is None else int(workers)
    if workers < 0:
        raise VitvizError(f"workers must be 0 (decode in this process) or more, got {workers}")
    if limit is not None and limit < 1:
        raise VitvizError(f"limit must be at least 1, got {limit}")
    if page_size < 1:
        raise VitvizError(f"page_size must be at least 1, got {page_size}")
    if not 0.0 <= alpha <= 1.0:
        raise VitvizError(f"alpha must be in [0, 1], got {alpha}")
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
        ext = {"images": (".jpg",)}.get(folder, (".png", ".npy"))
        _clean_temps(out_dir / folder, {n + e for _, n in todo for e in ext})
    journal_path = out_dir / mf.journal_name(shard)
    own = {"manifest.jsonl", "gallery.json"} if shard is None else set()
    _clean_temps(out_dir, {journal_path.name} | own)
    if shard is not None:
        try:
            (out_dir / mf.marker_name(shard)).unlink()
        except FileNotFoundError:
            pass

    new: dict[str, dict] = {}
    journal = mf.Journal(journal_path, initial=[kept[s.key] for s, _ in pairs if s.key in kept])
    bar = tqdm(total=len(pairs), initial=len(kept), unit="img", desc="gallery",
               disable=not progress, mininterval=0.5, file=sys.stderr)
    threads_before = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(max(1, int(threads)))
        if todo:
            _process(vm, todo, chosen, out_dir, journal, new, bar, batch_size=batch_size,
                     workers=workers, cmap=cmap, alpha=alpha, norm=norm, render_threads=render_threads,
                     on_record=on_record)
    except BaseException:
        bar.close()
        journal.close()
        if shard is None:  # leave a manifest and a page for what is done so far
            _finish(out_dir, pairs, kept, new, config, page_size, journal_path, write_index=True)
        raise
    finally:
        torch.set_num_threads(threads_before)
    bar.close()
    journal.close()
    records = [kept.get(s.key) or new[s.key] for s, _ in pairs if s.key in kept or s.key in new]
    if explore:
        from ._explore import add_explorer_pages

        add_explorer_pages(vm, out_dir, records, progress=progress)
        if shard is not None:  # unsharded runs rewrite the manifest in _finish
            mf.write_manifest(journal_path, records)
    result = GalleryResult(out_dir, records, processed=len(new), shard=shard)
    if shard is None:
        result.index = _finish(out_dir, pairs, kept, new, config, page_size, journal_path,
                               write_index=True)
    else:
        mf.write_manifest(out_dir / mf.marker_name(shard), [{
            "key": f"shard {shard[0]}/{shard[1]}", "images": len(pairs),
            "done": len(result.done), "skipped": len(result.skipped), "failed": len(result.failed)}])
        if all((out_dir / mf.marker_name((k, shard[1]))).is_file() for k in range(1, shard[1] + 1)):
            result.index = merge_gallery(out_dir, page_size=page_size).index
    result.seconds = time.perf_counter() - t0
    return result


def _finish(out_dir: Path, pairs, kept, new, config, page_size, journal_path, write_index) -> Path:
    """Rewrite the manifest in gallery order and write the HTML pages (unsharded runs)."""
    records = [kept.get(s.key) or new.get(s.key) for s, _ in pairs]
    records = [r for r in records if r is not None]
    mf.write_manifest(journal_path, records)
    return _write_index(out_dir, records, config, page_size)


def _write_index(out_dir: Path, records: list[dict], config: dict, page_size: int) -> Path:
    from ..render.html import write_gallery_html

    title = config.get("title") or f"vitviz gallery: {config.get('model')}"
    return write_gallery_html(out_dir, records, methods=config.get("methods") or [], title=title,
                              model=config.get("model"), page_size=page_size)


def _process(vm, todo, chosen, out_dir, journal, new, bar, *, batch_size, workers, cmap, alpha,
             render_threads, on_record, norm="image") -> None:
    """Decode, run and render ``todo``; journal each batch's records as it completes."""
    from concurrent.futures import ThreadPoolExecutor

    from torch.utils.data import DataLoader

    device = vm.device
    loader = DataLoader(_ImageSet([s.path for s, _ in todo], vm.preprocessor), batch_size=batch_size,
                        shuffle=False, num_workers=workers, collate_fn=_collate,
                        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)
    it = iter(loader)  # start the worker processes before any thread exists (fork safety)
    pool = ThreadPoolExecutor(max_workers=max(1, render_threads), thread_name_prefix="vitviz-render")
    pending: deque = deque()

    def commit(records: list[dict]) -> None:
        journal.append(records)
        for r in records:
            new[r["key"]] = r
        bar.update(len(records))
        if on_record is not None:
            for r in records:
                on_record(r)

    def drain(keep: int) -> None:
        while len(pending) > keep:
            fut, skipped = pending.popleft()
            commit(skipped + (fut.result() if fut is not None else []))

    try:
        for batch in it:
            skipped = [_record(todo[i][0], todo[i][1], "skipped", reason) for i, reason in batch["failures"]]
            fut = None
            if batch["index"]:
                x = batch["x"].to(device=device, dtype=vm.dtype, non_blocking=True)  # [B, 3, H, W]
                output, results = _run_methods(vm, x, chosen)
                top5 = _top5(vm, output)
                b = x.shape[0]
                split = {name: _per_image(m, results[name], b) for name, m in
                         ((m.name, m) for m, _ in chosen)}
                views = batch["views"].numpy()  # [B, H, W, 3] uint8
                del output, results, x
                jobs = []
                for j, i in enumerate(batch["index"]):
                    s, n = todo[i]
                    jobs.append({"source": s, "name": n, "view": views[j],
                                 "maps": {k: v[0][j] for k, v in split.items()},
                                 "names": {k: v[1][j][0] for k, v in split.items()},
                                 "texts": {k: v[1][j][1] for k, v in split.items()},
                                 "top5": top5[j] if top5 else None})
                fut = pool.submit(_render_batch, out_dir, jobs, cmap, alpha, norm)
            pending.append((fut, skipped))
            drain(keep=max(1, render_threads))
        drain(keep=0)
    except BaseException:
        # finish what the threads have started (their files are whole either way) and journal it
        for fut, skipped in list(pending):
            try:
                records = skipped + (fut.result() if fut is not None else [])
            except Exception:  # noqa: BLE001 - the original error is the one to report
                continue
            journal.append(records)
            for r in records:
                new[r["key"]] = r
        pending.clear()
        raise
    finally:
        pool.shutdown(wait=True)
        del it


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
    result.index = _write_index(out_dir, records, config, page_size)
    result.seconds = time.perf_counter() - t0
    return result
