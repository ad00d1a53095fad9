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
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import _manifest as mf
from ._page import GalleryResult, finish, merge_gallery
from ._plan import plan_run
from ._run import per_image, run_methods
from ._run import top5 as top5_of
from ._sources import Source


def _record(source: Source, name: str, status: str, reason: str | None = None, *,
            top5=None, caption=None, image=None, outputs=None) -> dict:
    """A manifest line; the key order is fixed so equal runs give equal bytes."""
    return {"key": source.key, "source": source.path, "name": name, "status": status,
            "reason": reason, "prediction": top5[0] if top5 else None, "top5": top5 or None,
            "caption": caption, "image": image, "outputs": outputs or {}}


def _not_finite(maps: dict[str, np.ndarray]) -> str | None:
    """The reason an item failed when some method's maps hold NaN or infinite values, else None."""
    bad = [m for m, a in maps.items() if not np.isfinite(a).all()]
    return f"method {', '.join(bad)} gave NaN or infinite values" if bad else None


# --------------------------------------------------------------------------------------------
# rendering (render threads)
# --------------------------------------------------------------------------------------------

def _render_batch(out_dir: Path, jobs: list[dict], cmap: str, alpha: float | None, norm: str = "image",
                  smooth: bool = False) -> list[dict]:
    from ._draw import render_image

    records = []
    for job in jobs:
        src, name = job["source"], job["name"]
        bad = _not_finite(job["maps"])
        caption = next((t for t in job["texts"].values() if t), None)
        if bad:
            records.append(_record(src, name, "failed", bad, top5=job["top5"], caption=caption))
            continue
        try:
            image, outputs = render_image(out_dir, name, job["view"], job["maps"], job["names"],
                                          cmap=cmap, alpha=alpha, smooth=smooth, norm=norm)
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
# the run
# --------------------------------------------------------------------------------------------

def build_gallery(
    src: str | os.PathLike[str] | Sequence[Any],
    model,
    out_dir,
    *,
    methods: str | Sequence[str] = ("rollout", "cls"),
    options: dict | None = None,
    batch_size: int = 16,
    workers: int | None = None,
    limit: int | None = None,
    shard: str | tuple[int, int] | None = None,
    page_size: int = 100,
    cmap: str = "inferno",
    alpha: float | None = None,
    smooth: bool = False,
    norm: str = "image",
    title: str | None = None,
    model_id: str | None = None,
    progress: bool = True,
    render_threads: int = 2,
    threads: int | None = None,
    on_record: Callable[[dict], None] | None = None,
    explore: bool = False,
) -> GalleryResult:
    """Maps for every image of a folder, list file or glob, and a static page to browse them.

    Writes into ``out_dir``: ``images/<name>.jpg`` (the input as the model saw it),
    ``<method>/<name>.jpg`` (overlay, at least 256 px on its short side; several maps as a
    labelled grid of 256 px tiles) and
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
        cmap, alpha, smooth: how maps are drawn, as :func:`vitviz.overlay` (default: inferno,
            opacity that grows with the value, patch blocks).
        norm: ``"image"`` (each map min-max scaled on its own) or ``"none"`` (raw values on a
            fixed ``[0, 1]`` scale: equal values have equal colours in every image). ``"batch"``
            is refused: the gallery renders while it runs, before the run's range is known.
        title: page title (default ``"vitviz gallery: <model_id>"``).
        model_id: the model name stored in ``gallery.json`` (default ``model.name``).
        progress: show a tqdm progress bar with images/second (where stderr is a terminal or
            a notebook runs the code; never escape sequences in a log).
        render_threads: threads rendering and encoding while the model runs (each batch is
            split between them). OpenCV's own threads are set to 1 during the run and
            restored afterwards, so that they do not compete with the model.
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

    from .._util.progress import progress_bar
    from ..models import VisionModel, wrap

    t0 = time.perf_counter()
    vm = model if isinstance(model, VisionModel) else wrap(model)
    plan = plan_run(src, vm, out_dir, methods=methods, options=options, batch_size=batch_size,
                    workers=workers, limit=limit, shard=shard, page_size=page_size, cmap=cmap,
                    alpha=alpha, smooth=smooth, norm=norm, title=title, model_id=model_id)
    out_dir, pairs, kept, todo, shard = plan.out_dir, plan.pairs, plan.kept, plan.todo, plan.shard
    journal_path = plan.journal_path

    new: dict[str, dict] = {}
    journal = mf.Journal(journal_path, initial=[kept[s.key] for s, _ in pairs if s.key in kept])
    bar = progress_bar(total=len(pairs), initial=len(kept), unit="img", desc="gallery",
                       enabled=progress, mininterval=0.5)
    threads_before = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(max(1, int(threads)))
        if todo:
            _process(vm, todo, plan.methods, out_dir, journal, new, bar, batch_size=batch_size,
                     workers=plan.workers, cmap=cmap, alpha=alpha, smooth=smooth, norm=norm,
                     render_threads=render_threads,
                     on_record=on_record)
    except BaseException:
        bar.close()
        journal.close()
        if shard is None:  # leave a manifest and a page for what is done so far
            finish(out_dir, pairs, kept, new, plan.config, page_size, journal_path)
        raise
    finally:
        torch.set_num_threads(threads_before)
    bar.close()
    journal.close()
    records = [kept.get(s.key) or new[s.key] for s, _ in pairs if s.key in kept or s.key in new]
    if explore:
        from ._explorer_pages import add_explorer_pages

        add_explorer_pages(vm, out_dir, records, progress=progress)
        if shard is not None:  # unsharded runs rewrite the manifest in _finish
            mf.write_manifest(journal_path, records)
    result = GalleryResult(out_dir, records, processed=len(new), shard=shard)
    if shard is None:
        result.index = finish(out_dir, pairs, kept, new, plan.config, page_size, journal_path)
    else:
        mf.write_manifest(out_dir / mf.marker_name(shard), [{
            "key": f"shard {shard[0]}/{shard[1]}", "images": len(pairs),
            "done": len(result.done), "skipped": len(result.skipped), "failed": len(result.failed)}])
        if all((out_dir / mf.marker_name((k, shard[1]))).is_file() for k in range(1, shard[1] + 1)):
            result.index = merge_gallery(out_dir, page_size=page_size).index
    result.seconds = time.perf_counter() - t0
    return result



def _process(vm, todo, chosen, out_dir, journal, new, bar, *, batch_size, workers, cmap, alpha,
             render_threads, on_record, norm="image", smooth=False) -> None:
    """Decode, run and render ``todo``; journal each batch's records as it completes."""
    from concurrent.futures import ThreadPoolExecutor

    from ..batch import iter_batches

    if vm.is_video:
        _process_clips(vm, todo, chosen, out_dir, journal, new, bar, cmap=cmap, alpha=alpha, smooth=smooth,
                       norm=norm, on_record=on_record)
        return

    import cv2

    device = vm.device
    it = iter_batches(vm.preprocessor, [s.path for s, _ in todo], batch_size=batch_size, workers=workers,
                      pin_memory=device.type == "cuda")
    batch = next(it, None)  # start the worker processes before any thread exists (fork safety)
    pool = ThreadPoolExecutor(max_workers=max(1, render_threads), thread_name_prefix="vitviz-render")
    pending: deque = deque()
    # the render threads already run beside the model: OpenCV's own worker threads (which wait
    # actively) would only compete with it for the cores; restored when the run ends
    cv_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)

    def commit(records: list[dict]) -> None:
        _commit(records, journal, new, bar, on_record)

    def drain(keep: int) -> None:
        while len(pending) > keep:
            futs, skipped = pending.popleft()
            commit(skipped + [r for f in futs for r in f.result()])

    try:
        while batch is not None:
            skipped = [_record(todo[i][0], todo[i][1], "skipped", reason) for i, reason in batch["failures"]]
            futs = []
            if batch["index"]:
                x = batch["x"].to(device=device, dtype=vm.dtype, non_blocking=True)  # [B, 3, H, W]
                output, results = run_methods(vm, x, chosen)
                top5 = top5_of(vm, output)
                b = x.shape[0]
                split = {name: per_image(m, results[name], b) for name, m in
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
                # in one part per thread: the batch's images spread over the threads (the last
                # batch, which nothing overlaps, takes 1 / render_threads of the time)
                size = -(-len(jobs) // max(1, render_threads))  # ceil: contiguous parts keep the order
                futs = [pool.submit(_render_batch, out_dir, jobs[k:k + size], cmap, alpha, norm, smooth)
                        for k in range(0, len(jobs), size)]
            pending.append((futs, skipped))
            drain(keep=max(1, render_threads))
            batch = next(it, None)
        drain(keep=0)
    except BaseException:
        # finish what the threads have started (their files are whole either way) and journal it
        for futs, skipped in list(pending):
            try:
                records = skipped + [r for f in futs for r in f.result()]
            except Exception:  # noqa: BLE001 - the original error is the one to report
                continue
            journal.append(records)
            for r in records:
                new[r["key"]] = r
        pending.clear()
        raise
    finally:
        pool.shutdown(wait=True)
        cv2.setNumThreads(cv_threads)
        del it


def _process_clips(vm, todo, chosen, out_dir, journal, new, bar, *, cmap, alpha, smooth, norm, on_record) -> None:
    """A video model's gallery: each video file read and sampled (:func:`vitviz.models.read_video`),
    run as one clip and rendered (:func:`._draw.render_clip`: a strip thumbnail, the animation for the
    large view, the raw maps); a file that cannot be used (a still image, a truncated video, too few
    frames, ...) is recorded as skipped with its one-line reason."""
    from ..batch import playback_fps
    from ..errors import ImageError
    from ..models import clip_input, read_video
    from ._draw import render_clip

    for s, n in todo:
        try:
            clip = read_video(s.path, vm.num_frames)
            views, x = clip_input(vm.preprocessor, clip.frames)  # [T, h, w, 3], [T, 3, h, w]
        except ImageError as e:
            records = [_record(s, n, "skipped", e.reason)]
        else:
            x = x[None].to(device=vm.device, dtype=vm.dtype)  # [1, T, 3, h, w]
            output, results = run_methods(vm, x, chosen)
            top5 = top5_of(vm, output)
            maps = {m.name: per_image(m, results[m.name], 1, frames=True)[0][0] for m, _ in chosen}
            bad = _not_finite(maps)
            if bad:
                records = [_record(s, n, "failed", bad, top5=top5[0] if top5 else None)]
            else:
                fps = playback_fps(clip.fps, clip.total, len(clip.indices), None)
                image, outputs = render_clip(out_dir, n, views, maps, tubelet=vm.tubelet,
                                             indices=clip.indices.tolist(), fps=fps, cmap=cmap, alpha=alpha,
                                             smooth=smooth, norm=norm)
                records = [_record(s, n, "done", top5=top5[0] if top5 else None, image=image, outputs=outputs)]
        _commit(records, journal, new, bar, on_record)


def _commit(records: list[dict], journal, new: dict, bar, on_record) -> None:
    """Records of finished items: into the journal and ``new`` (by key), the progress bar and
    ``on_record``."""
    journal.append(records)
    for r in records:
        new[r["key"]] = r
    bar.update(len(records))
    if on_record is not None:
        for r in records:
            on_record(r)
