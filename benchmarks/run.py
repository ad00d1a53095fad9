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

Peak memory is the peak resident set size of a fresh child process that loads the model
and runs one measured call, so each figure includes the model and the libraries.
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
from vitviz.analyze import RolloutStream, cls_maps, rollout
from vitviz.explain import relevance


def _build(model: str, size: int):
    return vitviz.load_model(model, pretrained=False, image_size=size, device="cpu")


def _timed(calls: dict[str, Callable[[], object]], reps: int, runs: dict | None = None) -> dict[str, float]:
    """Median wall time in seconds of every call after one warm-up call each. The calls are
    interleaved (rep by rep), so a machine that speeds up or slows down during the run
    shifts every method alike instead of biasing the ratios to whichever ran first. Every
    rep's time goes into ``runs`` (name -> list) when given."""
    for fn in calls.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(reps):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
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

    def relevance_chefer():
        return relevance(m, x)  # one forward + one backward

    def grad_rollout():
        return relevance(m, x, method="grad_rollout", discard_ratio=0.9)

    # rollout rows use discard_ratio 0.9 (the popular script's setting) unless "no discard"
    return {"forward (floor)": floor, "capture only (A at every layer)": capture_only,
            "capture + rollout (stored, no discard)": first_thing_users_write,
            "rollout (stored)": rollout_stored, "rollout (streaming)": streaming(0.9),
            "rollout (streaming, no discard)": streaming(0.0),
            "cls maps (last layer kept)": cls_last_layer,
            "forward+backward (capture only)": forward_backward, "relevance (chefer)": relevance_chefer,
            "grad rollout": grad_rollout}


def bench(model: str, size: int, batch: int, reps: int, only: tuple = ()) -> list[dict]:
    """Every method (or those whose names start with one of ``only``) against the floor."""
    m = _build(model, size)
    x = torch.randn(batch, 3, size, size)
    calls = {name: fn for name, fn in methods(m, x).items()
             if name == "forward (floor)" or not only or name.startswith(only)}
    runs: dict = {}
    seconds = _timed(calls, reps, runs)
    floor = seconds["forward (floor)"]
    rows = []
    for name, t in seconds.items():
        per_rep = [a / b for a, b in zip(runs[name], runs["forward (floor)"])]  # same rep, same load
        rows.append(dict(model=model, size=size, batch=batch, method=name, seconds=t, ratio=t / floor,
                         ratio_low=min(per_rep), ratio_high=max(per_rep)))
    return rows


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


def _child_peak(model: str, size: int, batch: int, method: str) -> tuple[float, float]:
    """Peak RSS (MB) of a fresh process during one call of ``method`` (model, input and
    libraries included), and how far the call raised RSS above what it was before (MB).

    Uses VmHWM, reset just before the call: ``ru_maxrss`` would not do, as Linux keeps it
    across exec, so a child inherits its parent's high-water mark."""
    code = (f"import sys, torch; sys.path.insert(0, {os.getcwd()!r});"
            f"from benchmarks.run import _build, methods, _reset_peak, _status_mb;"
            f"m = _build({model!r}, {size}); x = torch.randn({batch}, 3, {size}, {size});"
            f"call = methods(m, x)[{method!r}];"
            f"before = _status_mb('VmRSS'); _reset_peak(); call();"
            f"peak = _status_mb('VmHWM'); print(peak, peak - before)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak, extra = out.stdout.strip().splitlines()[-1].split()
    return float(peak), float(extra)


def gallery_throughput(model: str, size: int, n: int, reps: int = 3, batch_size: int = 16) -> dict:
    """Gallery images/s (decode, capture, maps, PNGs, manifest, page) vs plain batched inference
    on ``n`` generated 500x375 JPEGs (benchmarks.gallery_throughput.measure_throughput)."""
    import tempfile

    import numpy as np
    from PIL import Image

    from benchmarks.gallery_throughput import measure_throughput

    m = _build(model, size)
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        src = os.path.join(tmp, "src")
        os.makedirs(src)
        for i in range(n):
            arr = (rng.random((375, 500, 3)) * 255).astype(np.uint8)
            Image.fromarray(arr).save(os.path.join(src, f"img{i:04d}.jpg"), quality=90)
        r = measure_throughput(m, src, os.path.join(tmp, "out"), methods="rollout,cls",
                               batch_size=batch_size, reps=reps)
    return dict(model=model, size=size, method="gallery", **{k: v for k, v in r.items()
                                                              if not isinstance(v, dict)})


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

    from vitviz.analyze.flow import flow_matrices, integer_graph, layered_max_flow
    from vitviz.analyze.query import query_weights

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


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="s16,b16")
    p.add_argument("--sizes", default="224,384")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--methods", default="", metavar="NAMES",
                   help="comma-separated beginnings of method names to run (default: all)")
    p.add_argument("--memory", action="store_true", help="also measure peak memory (child processes)")
    p.add_argument("--quick", action="store_true", help="tiny model, for the test suite")
    p.add_argument("--gallery", type=int, default=0, metavar="N",
                   help="also measure gallery images/s against plain batched inference on N generated images")
    p.add_argument("--threads", type=int, default=0, metavar="T", help="torch threads (default: torch's)")
    p.add_argument("--gallery-batch", type=int, default=16, metavar="B")
    p.add_argument("--flow", action="store_true",
                   help="also time attention flow at the ViT-B/16 224 px size (spread and peaked attention), "
                        "and its exact max-flow step with OR-tools against SciPy's Dinic (needs scipy)")
    p.add_argument("--flow-reps", type=int, default=None, metavar="R",
                   help="repetitions of the flow timings (default: min(--reps, 3))")
    p.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    a = p.parse_args(argv)
    if a.quick:
        a.models, a.sizes, a.batches, a.reps = "ti16", "64", "2", 1
        a.gallery, a.gallery_batch = a.gallery and 8, 4
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    rows = []
    models = [m for m in a.models.split(",") if m]  # --models '' times nothing but --flow
    for model in models:
        for size in map(int, a.sizes.split(",")):
            for batch in map(int, a.batches.split(",")):
                only = tuple(n.strip() for n in a.methods.split(",") if n.strip())
                for r in bench(model, size, batch, a.reps, only):
                    if a.memory:
                        r["peak_mb"], r["call_mb"] = _child_peak(model, size, batch, r["method"])
                    rows.append(r)
                    mem = (f"  peak {r['peak_mb']:.0f} MB (call +{r['call_mb']:.0f} MB)"
                           if "peak_mb" in r else "")
                    print(f"{model:>5} {size:>4}px b{batch:<2} {r['method']:<38} "
                          f"{r['seconds'] * 1000:9.1f} ms  {r['ratio']:5.2f}x "
                          f"({r['ratio_low']:.2f}-{r['ratio_high']:.2f}){mem}", flush=True)
    if a.gallery:
        for model in models:
            size = int(a.sizes.split(",")[0])
            g = gallery_throughput(model, size, a.gallery, reps=max(1, min(a.reps, 3)), batch_size=a.gallery_batch)
            rows.append(g)
            print(f"{model:>5} {size:>4}px gallery rollout,cls: {g['gallery']:.2f} img/s vs plain batched "
                  f"inference {g['forward']:.2f} img/s = {g['ratio_forward']:.2f}x "
                  f"(vs decode+forward {g['ratio_decode_forward']:.2f}x)", flush=True)
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
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
