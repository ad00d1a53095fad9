"""Speed and memory of vitviz analyses as ratios to the plain fused forward pass.

Every number is measured in the same process run as its floor (the model's own forward
with fused attention, under ``torch.no_grad``), so ratios compare like with like on
whatever machine runs this. Random weights; nothing is downloaded. Two reference rows show
what any capture must pay before vitviz computes anything: "capture only" (the probabilities
computed at every layer's attention op, ``out = A @ v``, no analysis) and "forward+backward
(capture only)" (a captured forward pass plus one backward pass, the floor of the gradient
methods).

    python -m benchmarks.run                       # ViT-S/16 and ViT-B/16, 224 and 384 px, batch 1 and 8
    python -m benchmarks.run --models s16 --sizes 224 --batches 1 --reps 3
    python -m benchmarks.run --quick               # tiny model, seconds (what the test runs)
    python -m benchmarks.run --models '' --flow    # attention flow only, and OR-tools vs SciPy
    python -m benchmarks.run --device cuda --dtype bfloat16 --memory   # on a GPU

Every run first prints the machine (CPU model, cores, torch threads; the GPU, CUDA version and
TF32 setting on ``--device cuda``), the versions (python, torch, timm, vitviz) and the load
average; it ends with the load average again and the CPU time other processes took during
the run, so a table made on a busy machine says so. Every row gives the median of ``--reps``
interleaved repetitions after one warm-up call, and the range of the per-rep ratios.

Timing is wall-clock around each call; on ``--device cuda`` the GPU is synchronised
(``torch.cuda.synchronize``) before the clock starts and before it stops, so a time includes
the kernels the call queued, not only their launch.

Peak memory (``--memory``): on the CPU, the peak resident set size of a fresh child process
that loads the model and runs one measured call, so each figure includes the model and the
libraries; on CUDA, ``torch.cuda.max_memory_allocated`` around one call in this process (reset
with ``torch.cuda.reset_peak_memory_stats`` before it), model and input included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

import vitviz
from vitviz.analyze import RolloutStream, all_layer_maps, cls_maps, rollout
from vitviz.errors import VitvizError
from vitviz.explain import relevance

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class BenchmarkError(VitvizError):
    """A benchmark that cannot run as asked. :func:`main` prints it as one line on stderr and
    exits with status 2, as a ``vitviz`` command given bad arguments (docs/reference/exit-status.md)."""


def check_device(device: str) -> None:
    """Refuse ``--device cuda`` where torch sees no CUDA GPU, saying why and what to do."""
    if device == "cuda" and not torch.cuda.is_available():
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
        raise BenchmarkError(f"--device cuda: no CUDA GPU is available (torch {torch.__version__}, {built}, "
                             f"torch.cuda.is_available() is False); run on a machine with an NVIDIA GPU and its "
                             f"driver, or use --device cpu")
    if device not in ("cpu", "cuda"):
        raise BenchmarkError(f"--device must be cpu or cuda, got {device!r}")


def _sync(device: str) -> Callable[[], None]:
    """What makes a timing include the work a call queued: ``torch.cuda.synchronize`` on CUDA."""
    if device == "cuda":
        return torch.cuda.synchronize
    return lambda: None


# video models (transformers, random weights, the base configs of the papers: 12 layers, 12 heads,
# width 768, 16 px patches) by name: (config class, model class, extra config); the clip length is --frames
VIDEO_MODELS = {
    "videomae-b16": ("VideoMAEConfig", "VideoMAEForVideoClassification", dict(patch_size=16, tubelet_size=2)),
    "vivit-b16": ("VivitConfig", "VivitForVideoClassification", dict(tubelet_size=[2, 16, 16])),
    "timesformer-b16": ("TimesformerConfig", "TimesformerForVideoClassification", dict(patch_size=16)),
}
FRAMES = 16  # the clip length of the video models (--frames)


def _build(model: str, size: int, device: str = "cpu", dtype: str = "float32"):
    if model in VIDEO_MODELS:
        import transformers

        config_class, model_class, extra = VIDEO_MODELS[model]
        config = getattr(transformers, config_class)(image_size=size, num_frames=FRAMES, hidden_size=768,
                                                     num_hidden_layers=12, num_attention_heads=12,
                                                     intermediate_size=3072, num_labels=400, **extra)
        torch.manual_seed(0)
        m = vitviz.wrap(getattr(transformers, model_class)(config).to(device))
    else:
        m = vitviz.load_model(model, pretrained=False, image_size=size, device=device)
    if DTYPES[dtype] != torch.float32:
        m.to(DTYPES[dtype])
    return m


def _input(batch: int, size: int, device: str = "cpu", dtype: str = "float32", video: bool = False) -> torch.Tensor:
    shape = (batch, FRAMES, 3, size, size) if video else (batch, 3, size, size)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device, DTYPES[dtype])


def _timed(calls: dict[str, Callable[[], object]], reps: int, runs: dict | None = None,
           sync: Callable[[], None] = lambda: None, failed: dict | None = None) -> dict[str, float]:
    """Median wall time in seconds of every call after one warm-up call each. The calls are
    interleaved (rep by rep), so a machine that speeds up or slows down during the run
    shifts every method alike instead of biasing the ratios to whichever ran first. Every
    rep's time goes into ``runs`` (name -> list) when given. ``sync`` runs before the clock
    starts and before it stops (``torch.cuda.synchronize`` on a GPU). With ``failed`` (a dict),
    a call whose warm-up raises is left out and its error recorded there (name -> one line),
    so that one method that does not run (e.g. out of GPU memory) does not lose the others."""
    calls = dict(calls)
    for name, fn in list(calls.items()):
        if failed is None:
            fn()
            continue
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - reported in the table, the other methods go on
            failed[name] = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
            del calls[name]
    sync()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(reps):
        for name, fn in calls.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    if runs is not None:
        runs.update(times)
    return {name: statistics.median(ts) for name, ts in times.items()}


class _Discard:
    """A stream that needs every layer's probabilities and keeps nothing."""

    def reset(self):
        pass

    def update(self, attn, *, layer, num_layers, layout):
        pass

    def result(self, layout):
        return None


def methods(m, x) -> dict[str, Callable[[], object]]:
    """Name -> a zero-argument call doing that analysis end to end on batch ``x``."""

    def floor():
        with torch.no_grad():
            return m(x)

    def capture_kept():  # every layer kept, no analysis (works on hierarchical models too)
        with torch.no_grad(), vitviz.capture(m) as rec:
            m(x)
        return rec

    def stage_maps():  # every layer kept, then the CLS-row (no CLS: mean patch row) maps of every layer of
        # every stage, as `vitviz cls` on a hierarchical model (Swin's windows read as windows)
        with torch.no_grad(), vitviz.capture(m) as rec:
            m(x)
        return [all_layer_maps(s) for s in rec.stages]

    def stage_tensors():  # every layer kept, then each stage's dense [L, B, H, N, N] (windows stitched)
        with torch.no_grad(), vitviz.capture(m) as rec:
            m(x)
        return [s.tensor for s in rec.stages]

    def first_thing_users_write():  # every layer kept, then rollout of rec.attentions
        with torch.no_grad(), vitviz.capture(m) as rec:
            m(x)
        return rollout(rec.attentions)

    def rollout_stored():
        with torch.no_grad(), vitviz.capture(m) as rec:
            m(x)
        return rollout(rec.attentions, discard_ratio=0.9)

    def streaming(discard_ratio):
        def run():
            stream = RolloutStream(discard_ratio=discard_ratio)
            with torch.no_grad(), vitviz.capture(m, keep="none", streams={"r": stream}) as rec:
                m(x)
            return rec.stream("r")
        return run

    def capture_only():  # the floor of every capture that needs full maps: A computed at every
        # layer's attention op (out = A @ v), nothing kept
        with torch.no_grad(), vitviz.capture(m, keep="none", streams={"none": _Discard()}):
            return m(x)

    def forward_backward():  # the floor of every gradient method: the same, forward + backward
        with vitviz.capture(m, keep="none"):
            xx = x.detach().requires_grad_(True)
            return torch.autograd.grad(m(xx).amax(-1).sum(), [xx])

    def cls_last_layer():  # only the last layer is kept
        with torch.no_grad(), vitviz.capture(m, keep=[-1]) as rec:
            m(x)
        return cls_maps(rec.attentions, layer=-1)

    def cls_rows_only():  # the last layer, only the CLS row of A formed (rows-only capture)
        with torch.no_grad(), vitviz.capture(m, keep=[-1], rows="cls") as rec:
            m(x)
        return cls_maps(rec.attentions, layer=-1)

    def relevance_chefer():
        return relevance(m, x)  # one forward + one backward

    def lrp(method):
        def run():
            return relevance(m, x, method=method)  # one forward + one backward under the rules
        return run

    def grad_rollout():
        return relevance(m, x, method="grad_rollout", discard_ratio=0.9)

    # rollout rows use discard_ratio 0.9 (the popular script's setting) unless "no discard"
    return {"forward (floor)": floor, "capture only (A at every layer)": capture_only,
            "capture (every layer kept)": capture_kept,
            "capture + CLS maps of every stage's layers": stage_maps, "capture + dense stage tensors": stage_tensors,
            "capture + rollout (stored, no discard)": first_thing_users_write,
            "capture + rollout (stored, discard 0.9)": rollout_stored, "rollout (streaming)": streaming(0.9),
            "rollout (streaming, no discard)": streaming(0.0),
            "cls maps (last layer kept)": cls_last_layer, "cls maps (rows='cls', last layer)": cls_rows_only,
            "forward+backward (capture only)": forward_backward, "relevance (chefer)": relevance_chefer,
            "relevance (attnlrp)": lrp("attnlrp"), "relevance (cp-lrp)": lrp("cp-lrp"),
            "grad rollout": grad_rollout}


def bench(model: str, size: int, batch: int, reps: int, only: tuple = (), device: str = "cpu",
          dtype: str = "float32", cuda_memory: bool = False) -> list[dict]:
    """Every method (or those whose names start with one of ``only``) against the floor.

    With ``cuda_memory`` (``device="cuda"``), each row also gets ``peak_mb`` (the largest
    ``torch.cuda.max_memory_allocated`` during one call, model and input included) and
    ``call_mb`` (how far the call raised it above what was allocated before)."""
    m = _build(model, size, device, dtype)
    x = _input(batch, size, device, dtype, video=model in VIDEO_MODELS)
    calls = {name: fn for name, fn in methods(m, x).items()
             if name == "forward (floor)" or not only or name.startswith(only)}
    runs: dict = {}
    failed: dict = {}
    seconds = _timed(calls, reps, runs, sync=_sync(device), failed=failed)
    if "forward (floor)" in failed:
        raise BenchmarkError(f"{model} at {size} px, batch {batch}, {device} {dtype}: the plain forward pass "
                             f"failed ({failed['forward (floor)']}); nothing to compare with")
    floor = seconds["forward (floor)"]
    rows = []
    for name in calls:
        base = dict(model=model, size=size, batch=batch, device=device, dtype=dtype, method=name)
        if name in failed:
            rows.append(dict(base, error=failed[name]))
            continue
        t = seconds[name]
        per_rep = [a / b for a, b in zip(runs[name], runs["forward (floor)"])]  # same rep, same load
        row = dict(base, seconds=t, ratio=t / floor, ratio_low=min(per_rep), ratio_high=max(per_rep),
                   reps=len(per_rep))
        if cuda_memory:
            row["peak_mb"], row["call_mb"] = _cuda_peak(calls[name])
        rows.append(row)
    return rows


def call_overhead(model: str, reps: int, device: str = "cpu", dtype: str = "float32", size: int = 32,
                  only: tuple = ("capture (every layer kept)", "capture only", "cls maps", "rollout (streaming, no")
                  ) -> list[dict]:
    """The capture's own cost per attention call, in microseconds: each method minus the fused
    forward, divided by the attention calls of the pass, on a ``size`` px input at batch 1 (at 32 px
    a ViT-B/16 runs 5 tokens, so the kernels cost next to nothing and what is left is the Python
    and bookkeeping work per call, what bounds capture on a GPU at small batches)."""
    m = _build(model, size, device, dtype)
    x = _input(1, size, device, dtype, video=model in VIDEO_MODELS)
    with torch.no_grad(), vitviz.capture(m) as rec:
        m(x)
    calls_per_pass = sum(int(st.tensor.shape[0]) for st in rec.stages) if rec.stages else 0
    if calls_per_pass == 0:
        raise BenchmarkError(f"{model}: no attention layer was captured; nothing to divide by")
    calls = {name: fn for name, fn in methods(m, x).items() if name == "forward (floor)" or name.startswith(only)}
    failed: dict = {}
    seconds = _timed(calls, max(reps, 20), sync=_sync(device), failed=failed)
    floor = seconds["forward (floor)"]
    return [dict(model=model, size=size, batch=1, device=device, dtype=dtype, method=f"per attention call: {name}",
                 seconds=t, us_per_call=1e6 * (t - floor) / calls_per_pass, calls_per_pass=calls_per_pass)
            for name, t in seconds.items() if name != "forward (floor)"]


def _cuda_peak(fn: Callable[[], object]) -> tuple[float, float]:
    """Peak CUDA memory (MB) allocated during one call of ``fn`` (what was allocated before
    included), and how far the call raised it above that."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return peak / 2 ** 20, (peak - before) / 2 ** 20


def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_peak() -> None:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _child_peak(model: str, size: int, batch: int, method: str, dtype: str = "float32") -> tuple[float, float]:
    """Peak RSS (MB) of a fresh process during one call of ``method`` (model, input and
    libraries included), and how far the call raised RSS above what it was before (MB).

    Uses VmHWM, reset just before the call: ``ru_maxrss`` would not do, as Linux keeps it
    across exec, so a child inherits its parent's high-water mark."""
    code = (f"import sys, torch; sys.path.insert(0, {os.getcwd()!r});"
            f"torch.set_num_threads({torch.get_num_threads()});"
            f"from benchmarks.run import _build, _input, methods, _reset_peak, _status_mb;"
            f"import benchmarks.run; benchmarks.run.FRAMES = {FRAMES};"
            f"m = _build({model!r}, {size}, 'cpu', {dtype!r});"
            f"x = _input({batch}, {size}, 'cpu', {dtype!r}, video={model in VIDEO_MODELS});"
            f"call = methods(m, x)[{method!r}];"
            f"before = _status_mb('VmRSS'); _reset_peak(); call();"
            f"peak = _status_mb('VmHWM'); print(peak, peak - before)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak, extra = out.stdout.strip().splitlines()[-1].split()
    return float(peak), float(extra)


def gallery_throughput(model: str, size: int, n: int, reps: int = 3, batch_size: int = 16, device: str = "cpu",
                       dtype: str = "float32") -> dict:
    """Gallery images/s (decode, capture, maps, PNGs, manifest, page) vs plain batched inference
    on ``n`` generated 500x375 JPEGs (benchmarks.gallery_throughput.measure_throughput)."""
    import tempfile

    import numpy as np
    from PIL import Image

    from benchmarks.gallery_throughput import measure_throughput

    m = _build(model, size, device, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        src = os.path.join(tmp, "src")
        os.makedirs(src)
        for i in range(n):
            arr = (rng.random((375, 500, 3)) * 255).astype(np.uint8)
            Image.fromarray(arr).save(os.path.join(src, f"img{i:04d}.jpg"), quality=90)
        r = measure_throughput(m, src, os.path.join(tmp, "out"), methods="rollout,cls",
                               batch_size=batch_size, reps=reps)
    flat = {k: v for k, v in r.items() if not isinstance(v, dict)}
    flat.update({f"cpu_ms_per_image_{k}": v for k, v in r["cpu_ms_per_image"].items()})
    return dict(model=model, size=size, device=device, dtype=dtype, method="gallery", **flat)


def flow_seconds(reps: int, layers: int = 12, heads: int = 12, grid: int = 14) -> list[dict]:
    """Seconds per image of exact attention flow, by default at the ViT-B/16, 224 px size
    (12 layers, 12 heads, 197 tokens), on synthetic attention: spread out like an untrained
    model's, and peaked like a trained model's (70% of every row on three sink tokens)."""
    g = torch.Generator().manual_seed(0)
    n = grid * grid + 1
    spread = torch.softmax(torch.randn(layers, 1, heads, n, n, generator=g), -1)
    peaked = torch.softmax(torch.randn(layers, 1, heads, n, n, generator=g) * 2, -1) * 0.3
    peaked[..., [0, 5, n // 2]] += 0.7 / 3
    layout = vitviz.TokenLayout(num_prefix=1, grid=(grid, grid))
    rows = []
    for name, att in (("spread", spread), ("peaked", peaked)):
        maps = vitviz.AttentionMaps(att, layout)
        t = _timed({"flow": lambda maps=maps: vitviz.attention_flow(maps)}, max(1, reps))["flow"]
        rows.append(dict(model=f"L{layers}", size=n, batch=1, method=f"flow ({name} attention)", seconds=t))
    rows.extend(flow_solver_seconds(vitviz.AttentionMaps(peaked, layout), reps=max(1, reps)))
    return rows


def flow_solver_seconds(maps, reps: int, max_sinks: int = 20) -> list[dict]:
    """The exact max-flow step of attention flow with OR-tools (what vitviz ships) and with
    SciPy's Dinic (benchmarks/flow_solvers.py), on the sinks that the certificates leave to it
    (up to ``max_sinks`` of them, evenly spread), interleaved rep by rep, median seconds per
    sink. Both return every value within 1e-9; "one int32 round" is SciPy's single solve,
    whose guaranteed precision is only ``arcs / 2**30``."""
    import numpy as np

    from vitviz.analyze import query_weights
    from vitviz.analyze.flow import flow_matrices, integer_graph, layered_max_flow

    try:
        import scipy  # noqa: F401

        from benchmarks.flow_solvers import _layered_arcs, scipy_exact_values, scipy_max_flow
    except ImportError:
        print("# scipy is not installed: the OR-tools / SciPy comparison is skipped", flush=True)
        return []
    caps = flow_matrices(maps)  # [1, L, N, N]
    source = query_weights(maps.layout, "auto", dtype=caps.dtype)[None]  # [1, N]
    stats = {}
    layered_max_flow(caps, source, stats=stats)
    todo = (~stats["certified"][0]).nonzero()[:, 0].numpy()  # sinks left to the exact step
    if todo.size == 0:  # all certified (tiny graphs): compare the solvers on every sink
        todo = np.arange(caps.shape[-1])
    sinks = todo[np.linspace(0, todo.size - 1, min(max_sinks, todo.size)).astype(int)]
    c, s = caps[0].numpy(), source[0].numpy()  # [L, N, N], [N]

    def ortools():
        graph, bottom, scale, node_s, node_t = integer_graph(c, s, 1e-9)
        out = []
        for j in sinks:
            graph.set_arcs_capacity(bottom, np.floor(c[0, :, j] * scale).astype(np.int64))
            graph.solve(node_s, node_t)
            out.append(graph.optimal_flow() / scale)
        return np.array(out)

    def scipy_one_round():
        tails, heads, cap, bottom, node_s, node_t, nodes = _layered_arcs(c, s)
        out = []
        for j in sinks:
            cap[bottom] = c[0, :, j]
            out.append(scipy_max_flow(tails, heads, cap, node_s, node_t, nodes, tol=float("inf")))
        return np.array(out)

    calls = {"OR-tools push-relabel (int64, exact)": ortools,
             "SciPy Dinic (int32 rounds, exact)": lambda: scipy_exact_values(c, s, sinks),
             "SciPy Dinic (one int32 round)": scipy_one_round}
    exact, light, one = (fn() for fn in calls.values())
    gaps = {"SciPy Dinic (int32 rounds, exact)": float(np.abs(light - exact).max()),
            "SciPy Dinic (one int32 round)": float(np.abs(one - exact).max())}
    seconds = _timed(calls, reps)
    n = caps.shape[-1]
    return [dict(model=f"L{caps.shape[1]}", size=n, batch=1, method=f"flow exact step: {name}",
                 seconds=t / len(sinks), sinks_timed=int(len(sinks)), sinks_left=int(todo.size),
                 max_abs_diff_to_ortools=gaps.get(name, 0.0))
            for name, t in seconds.items()]


def _cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str = "cpu", dtype: str = "float32") -> dict:
    """What a reader needs to compare a table with their own run: machine, versions, settings."""
    import timm

    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    info = dict(cpu=_cpu_model(), arch=platform.machine(), cores=cores, usable_cores=usable,
                torch_threads=torch.get_num_threads(), python=platform.python_version(), torch=torch.__version__,
                timm=timm.__version__, vitviz=vitviz.__version__, device=device, dtype=dtype)
    if device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                    tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32),
                    tf32_cudnn=bool(torch.backends.cudnn.allow_tf32))
    return info


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):  # Windows
        return None


def _busy_cpu_seconds() -> float | None:
    """CPU seconds every process of the machine has used since boot (/proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in (fields[1:9] + ["0"] * 8)[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and its reaped children (memory probes, decode workers)."""
    import resource

    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


class LoadMeter:
    """Was the machine busy? The load average before and after, and the CPU time that other
    processes took while the benchmark ran (all CPU time of the machine, from /proc/stat, less
    this process's and its children's), as an average number of cores."""

    def __init__(self):
        self.before = _loadavg()
        self._wall, self._all, self._own = time.perf_counter(), _busy_cpu_seconds(), _own_cpu_seconds()

    def finish(self) -> dict:
        wall = time.perf_counter() - self._wall
        after = _busy_cpu_seconds()
        others = None
        if self._all is not None and after is not None and wall > 0:
            others = max(0.0, (after - self._all) - (_own_cpu_seconds() - self._own)) / wall
        cores = os.cpu_count() or 1
        # the CPU time other processes took during the run decides; the load average (which still
        # carries a run that just ended, this one's own included) only where /proc/stat is missing
        if others is not None:
            busy = others > 0.25
        else:
            busy = self.before is not None and self.before[0] > 0.5
        return dict(load_before=self.before, load_after=_loadavg(), wall_s=round(wall, 1),
                    other_cores=None if others is None else round(others, 2), cores=cores, busy=busy)


def _header(info: dict, reps: int, load: list[float] | None) -> list[str]:
    gpu = ""
    if info["device"] == "cuda":
        gpu = (f"; GPU {info['gpu']}, CUDA {info['cuda']}, TF32 matmul {'on' if info['tf32_matmul'] else 'off'}")
    return [f"# machine: {info['cpu']} ({info['arch']}), {info['cores']} cores ({info['usable_cores']} usable), "
            f"torch threads {info['torch_threads']}{gpu}",
            f"# versions: python {info['python']}, torch {info['torch']}, timm {info['timm']}, vitviz {info['vitviz']}",
            f"# device {info['device']}, dtype {info['dtype']}; each row: median of {reps} interleaved reps after "
            f"one warm-up call, (low-high) = range of the per-rep ratios",
            f"# load average before: {' '.join(map(str, load)) if load else 'n/a'} (1, 5, 15 min)"]


def _footer(load: dict) -> str:
    after = " ".join(map(str, load["load_after"])) if load["load_after"] else "n/a"
    others = ("other processes: n/a" if load["other_cores"] is None else
              f"other processes used {load['other_cores']:.2f} of {load['cores']} cores on average during the run")
    verdict = "BUSY: the numbers are noisy, rerun on a quiet machine" if load["busy"] else "quiet"
    return f"# load average after: {after} (1, 5, 15 min); {others} ({load['wall_s']:.0f} s): {verdict}"


def main(argv=None) -> list[dict]:
    """Run the benchmark (the command line); returns the rows. A run that cannot happen as asked
    (``--device cuda`` without a GPU) prints one line on stderr and exits with status 2."""
    try:
        return _main(argv)
    except BenchmarkError as e:
        print(f"benchmarks.run: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _main(argv=None) -> list[dict]:
    global FRAMES
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="s16,b16",
                   help="vitviz model names, or the video models " + ", ".join(VIDEO_MODELS) + " (clips of --frames)")
    p.add_argument("--frames", type=int, default=FRAMES, metavar="T", help="input frames of the video models' clips")
    p.add_argument("--sizes", default="224,384")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where the model runs (cuda: synchronised timing, CUDA peak memory with --memory)")
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="the model's and the input's dtype")
    p.add_argument("--methods", default="", metavar="NAMES",
                   help="comma-separated beginnings of method names to run (default: all)")
    p.add_argument("--memory", action="store_true",
                   help="also measure peak memory (CPU: child processes; CUDA: in this process)")
    p.add_argument("--quick", action="store_true", help="tiny model, for the test suite")
    p.add_argument("--gallery", type=int, default=0, metavar="N",
                   help="also measure gallery images/s against plain batched inference on N generated images")
    p.add_argument("--threads", type=int, default=0, metavar="T", help="torch threads (default: torch's)")
    p.add_argument("--gallery-batch", type=int, default=16, metavar="B")
    p.add_argument("--call-overhead", action="store_true",
                   help="also measure the capture's cost per attention call (microseconds) on a 32 px input at "
                        "batch 1, where the kernels cost next to nothing")
    p.add_argument("--flow", action="store_true",
                   help="also time attention flow at the ViT-B/16 224 px size (spread and peaked attention), "
                        "and its exact max-flow step with OR-tools against SciPy's Dinic (needs scipy; CPU)")
    p.add_argument("--flow-reps", type=int, default=None, metavar="R",
                   help="repetitions of the flow timings (default: min(--reps, 3))")
    p.add_argument("--json", metavar="FILE",
                   help='write {"machine": ..., "load": ..., "rows": [...]} as JSON')
    a = p.parse_args(argv)
    check_device(a.device)
    FRAMES = a.frames
    if a.quick:
        a.models, a.sizes, a.batches, a.reps = "ti16", "64", "2", 1
        a.gallery, a.gallery_batch = a.gallery and 8, 4
    if a.threads:
        torch.set_num_threads(a.threads)
    meter = LoadMeter()
    info = machine(a.device, a.dtype)
    for line in _header(info, a.reps, meter.before):
        print(line, flush=True)
    rows = []
    models = [m for m in a.models.split(",") if m]  # --models '' times nothing but --flow
    for model in models:
        for size in map(int, a.sizes.split(",")):
            for batch in map(int, a.batches.split(",")):
                only = tuple(n.strip() for n in a.methods.split(",") if n.strip())
                for r in bench(model, size, batch, a.reps, only, a.device, a.dtype,
                               cuda_memory=a.memory and a.device == "cuda"):
                    head = f"{model:>5} {size:>4}px b{batch:<2} {r['method']:<38}"
                    rows.append(r)
                    if "error" in r:
                        print(f"{head} failed: {r['error']}", flush=True)
                        continue
                    if a.memory and a.device == "cpu":
                        r["peak_mb"], r["call_mb"] = _child_peak(model, size, batch, r["method"], a.dtype)
                    mem = (f"  peak {r['peak_mb']:.0f} MB (call +{r['call_mb']:.0f} MB)"
                           if "peak_mb" in r else "")
                    print(f"{head} {r['seconds'] * 1000:9.1f} ms  {r['ratio']:5.2f}x "
                          f"({r['ratio_low']:.2f}-{r['ratio_high']:.2f}){mem}", flush=True)
    if a.gallery:
        for model in models:
            size = int(a.sizes.split(",")[0])
            g = gallery_throughput(model, size, a.gallery, reps=max(1, a.reps), batch_size=a.gallery_batch,
                                   device=a.device, dtype=a.dtype)
            rows.append(g)
            low, high = g["ratio_decode_forward_range"]
            print(f"{model:>5} {size:>4}px gallery rollout,cls: {g['gallery']:.2f} img/s vs plain batched "
                  f"inference {g['forward']:.2f} img/s = {g['ratio_forward']:.2f}x "
                  f"(vs decode+forward {g['ratio_decode_forward']:.2f}x, {low:.2f}-{high:.2f}); "
                  f"CPU ms per image: gallery "
                  f"{g['cpu_ms_per_image_gallery']:.0f}, decode+forward {g['cpu_ms_per_image_decode_forward']:.0f}"
                  + ("" if g["render_share"] is None else f", rendering {g['cpu_ms_per_image_render']:.0f} "
                     f"({100 * g['render_share']:.0f}% of the gallery's)"), flush=True)
    if a.call_overhead:
        for model in models:
            for r in call_overhead(model, a.reps, a.device, a.dtype):
                rows.append(r)
                print(f"{model:>5}   32px b1  {r['method']:<52} {r['us_per_call']:8.1f} us "
                      f"({r['calls_per_pass']} calls per pass)", flush=True)
    if a.flow:
        size = dict(layers=3, heads=2, grid=4) if a.quick else {}
        for r in flow_seconds(min(a.reps, 3) if a.flow_reps is None else a.flow_reps, **size):
            rows.append(r)
            if "sinks_timed" in r:
                print(f"{r['model']:>5} {r['size']:>4} tokens {r['method']:<52} {r['seconds'] * 1000:7.1f} ms "
                      f"per sink ({r['sinks_left']} sinks left = {r['seconds'] * r['sinks_left']:.2f} s per "
                      f"image; max |diff| to OR-tools {r['max_abs_diff_to_ortools']:.1e})", flush=True)
                continue
            print(f"{r['model']:>5} {r['size']:>4} tokens {r['method']:<26} {r['seconds']:7.2f} s per image",
                  flush=True)
    load = meter.finish()
    print(_footer(load), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(machine=info, load=load, rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
