"""Gallery throughput against plain batched inference of the same model on the same images.

For the speed benchmark (``benchmarks/``): every number is measured in the same process,
interleaved repetition by repetition, so that the ratios compare like with like on a busy
machine too.
"""

from __future__ import annotations

import os
import shutil
import statistics
import threading
import time
from pathlib import Path


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the DataLoader workers)."""
    try:
        import resource
    except ImportError:  # Windows: this process only
        return time.process_time()
    a = resource.getrusage(resource.RUSAGE_SELF)
    b = resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


class ThreadCPU:
    """CPU seconds used by this process's threads whose names start with ``prefix`` (the gallery's
    render threads are ``vitviz-render_<i>``), read from /proc/self/task/<tid>/stat every
    ``interval`` seconds while active (a thread's last figure is kept after it ends; at most
    ``interval`` of its time can be missed). Linux only: ``seconds`` is None elsewhere."""

    def __init__(self, prefix: str = "vitviz-render", interval: float = 0.02):
        self.prefix, self.interval = prefix, interval
        self.seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.supported = os.path.isdir("/proc/self/task")

    def _read(self) -> None:
        for t in threading.enumerate():
            if not t.name.startswith(self.prefix) or t.native_id is None:
                continue
            try:
                with open(f"/proc/self/task/{t.native_id}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            self.seen[t.native_id] = max(self.seen.get(t.native_id, 0.0),
                                         (int(fields[11]) + int(fields[12])) / self._tick)  # utime + stime

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._read()

    def __enter__(self) -> ThreadCPU:
        if self.supported:
            self._thread = threading.Thread(target=self._loop, name="benchmark-thread-cpu", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.supported:
            self._stop.set()
            self._thread.join()

    @property
    def seconds(self) -> float | None:
        return sum(self.seen.values()) if self.supported else None


def _timed(fn) -> tuple[float, float]:
    """``(images/second, CPU seconds per image)`` of ``fn() -> number of images``."""
    c, t = _cpu_seconds(), time.perf_counter()
    n = fn()
    wall, cpu = time.perf_counter() - t, _cpu_seconds() - c
    return n / wall, cpu / max(n, 1)


def measure_throughput(model, src, out_dir, *, methods="rollout,cls", batch_size: int = 16,
                       workers: int | None = None, limit: int | None = None, reps: int = 3,
                       **gallery_kwargs) -> dict:
    """Images/second of :func:`build_gallery` and of plain batched inference, and their ratios.

    Plain batched inference is measured two ways, each at torch's thread setting and at the
    gallery's (the better counts): ``forward``, the model's own forward pass (fused attention,
    ``torch.no_grad``) over the preprocessed images held in memory; and ``decode+forward``,
    the same DataLoader workers decoding the files feeding that forward pass. The gallery
    runs end to end (decode, capture, maps, PNG/``.npy``, manifest, HTML) into a fresh folder
    each repetition. Medians over ``reps`` interleaved repetitions.

    Args:
        model: a :class:`vitviz.VisionModel`.
        src: the images (as :func:`build_gallery` takes them).
        out_dir: scratch folder for the gallery (deleted and rewritten each repetition).
        methods, batch_size, workers, limit, **gallery_kwargs: as :func:`build_gallery`.
        reps: repetitions.

    Returns:
        ``{"images", "gallery", "forward", "decode_forward"`` (images/second),
        ``"ratio_forward", "ratio_decode_forward"`` (gallery / plain, of the medians),
        ``"ratio_forward_range", "ratio_decode_forward_range"`` (lowest and highest ratio of one
        repetition's gallery to the same repetition's plain run), ``"cpu_ms_per_image"``
        (``{"gallery", "forward", "decode_forward", "render"}``: CPU time of this process, its
        threads and its decoding workers; ``render`` is the gallery's render threads alone),
        ``"render_share"`` (the render threads' share of the gallery's CPU time; None where
        /proc is missing), ``"threads"}``.

    Example:
        >>> measure_throughput(vitviz.load_model("b16", pretrained=False), "photos/", "/tmp/g")
        {'images': 64, 'gallery': 2.31, 'forward': 2.61, 'ratio_forward': 0.886, ...}
    """
    import torch

    from vitviz.batch import default_workers, iter_batches
    from vitviz.gallery import build_gallery, list_sources

    out_dir = Path(out_dir)
    sources = list_sources(src, exclude=out_dir)[:limit] if limit else list_sources(src, exclude=out_dir)
    workers = default_workers() if workers is None else workers
    pre = model.preprocessor
    paths = [s.path for s in sources]
    xs = torch.stack([pre.normalize(pre.view(p)) for p in paths]).to(model.device, model.dtype)  # [N, 3, H, W]
    default_threads = torch.get_num_threads()
    gallery_threads = int(gallery_kwargs.get("threads") or default_threads)  # what build_gallery uses

    def forward() -> int:
        with torch.no_grad():
            for i in range(0, len(xs), batch_size):
                model(xs[i:i + batch_size])
        return len(xs)

    def decode_forward() -> int:
        n = 0
        with torch.no_grad():
            for b in iter_batches(pre, paths, batch_size=batch_size, workers=workers):
                if b["x"] is not None:
                    model(b["x"].to(model.device, model.dtype))
                    n += len(b["index"])
        return n

    render_cpu: list[float] = []

    def gallery() -> int:
        shutil.rmtree(out_dir, ignore_errors=True)
        with ThreadCPU() as meter:
            r = build_gallery(sources, model, out_dir, methods=methods, batch_size=batch_size,
                              workers=workers, progress=False, **gallery_kwargs)
        if meter.seconds is not None:
            render_cpu.append(meter.seconds / max(r.processed, 1))
        return r.processed

    runs: dict[str, list] = {"gallery": []}
    thread_counts = sorted({default_threads, gallery_threads})
    try:
        forward()  # warm-up
        for _ in range(max(1, reps)):
            for t in thread_counts:
                torch.set_num_threads(t)
                runs.setdefault(f"forward@{t}", []).append(_timed(forward))
                runs.setdefault(f"decode_forward@{t}", []).append(_timed(decode_forward))
            torch.set_num_threads(default_threads)
            runs["gallery"].append(_timed(gallery))
    finally:
        torch.set_num_threads(default_threads)
    med = {k: (statistics.median(r for r, _ in v), statistics.median(c for _, c in v)) for k, v in runs.items()}

    def best(kind: str) -> tuple[float, float]:
        return max((v for k, v in med.items() if k.split("@")[0] == kind), key=lambda v: v[0])

    g, f, d = med["gallery"], best("forward"), best("decode_forward")
    render = statistics.median(render_cpu) if render_cpu else None  # CPU seconds per image

    def per_rep(kind: str) -> list[float]:  # each repetition's gallery / best plain rate of that repetition
        plain = [max(v[i][0] for k, v in runs.items() if k.split("@")[0] == kind) for i in range(len(runs["gallery"]))]
        return [run[0] / p for run, p in zip(runs["gallery"], plain)]

    return {"images": len(paths), "gallery": g[0], "forward": f[0], "decode_forward": d[0],
            "ratio_forward": g[0] / f[0], "ratio_decode_forward": g[0] / d[0],
            "ratio_forward_range": (min(per_rep("forward")), max(per_rep("forward"))),
            "ratio_decode_forward_range": (min(per_rep("decode_forward")), max(per_rep("decode_forward"))),
            "cpu_ms_per_image": {"gallery": 1000 * g[1], "forward": 1000 * f[1], "decode_forward": 1000 * d[1],
                                 "render": None if render is None else 1000 * render},
            "render_share": None if render is None else render / g[1],
            "threads": {"default": default_threads, "gallery": gallery_threads}}
