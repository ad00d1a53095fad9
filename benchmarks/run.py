"""Speed and memory of vitviz analyses as ratios to the plain fused forward pass.

Every number is measured in the same process run as its floor (the model's own forward
with fused attention, under ``torch.no_grad``), so ratios compare like with like on
whatever machine runs this. Random weights; nothing is downloaded.

    python -m benchmarks.run                       # ViT-S/16 and ViT-B/16, 224 and 384 px, batch 1 and 8
    python -m benchmarks.run --models s16 --sizes 224 --batches 1 --reps 3
    python -m benchmarks.run --quick               # tiny model, seconds (what the test runs)

Peak memory is the peak resident set size of a fresh child process that loads the model
and runs one measured call, so each figure includes the model and the libraries.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

import vitviz
from vitviz.analyze import rollout


def _build(model: str, size: int):
    return vitviz.load_model(model, pretrained=False, image_size=size, device="cpu")


def _timed(fn: Callable[[], object], reps: int) -> float:
    """Median wall time in seconds of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def methods(m, x) -> dict[str, Callable[[], object]]:
    """Name -> a zero-argument call doing that analysis end to end on batch ``x``."""

    def floor():
        with torch.no_grad():
            return m(x)

    def rollout_stored():
        with torch.no_grad(), vitviz.capture(m) as rec:
            m(x)
        return rollout(rec.attentions, discard_ratio=0.9)

    out = {"forward (floor)": floor, "capture+rollout": rollout_stored}
    return out


def bench(model: str, size: int, batch: int, reps: int) -> list[dict]:
    m = _build(model, size)
    x = torch.randn(batch, 3, size, size)
    rows = []
    calls = methods(m, x)
    floor = _timed(calls["forward (floor)"], reps)
    for name, fn in calls.items():
        t = floor if name == "forward (floor)" else _timed(fn, reps)
        rows.append(dict(model=model, size=size, batch=batch, method=name, seconds=t, ratio=t / floor))
    return rows


def _child_peak(model: str, size: int, batch: int, method: str) -> float:
    """Peak RSS (MB) of a fresh process running one call of ``method``."""
    code = (f"import sys, resource, torch; sys.path.insert(0, {os.getcwd()!r});"
            f"from benchmarks.run import _build, methods;"
            f"m = _build({model!r}, {size}); x = torch.randn({batch}, 3, {size}, {size});"
            f"methods(m, x)[{method!r}]();"
            f"print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="s16,b16")
    p.add_argument("--sizes", default="224,384")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--memory", action="store_true", help="also measure peak memory (child processes)")
    p.add_argument("--quick", action="store_true", help="tiny model, for the test suite")
    p.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    a = p.parse_args(argv)
    if a.quick:
        a.models, a.sizes, a.batches, a.reps = "ti16", "64", "1,2", 1
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    rows = []
    for model in a.models.split(","):
        for size in map(int, a.sizes.split(",")):
            for batch in map(int, a.batches.split(",")):
                for r in bench(model, size, batch, a.reps):
                    if a.memory:
                        r["peak_mb"] = _child_peak(model, size, batch, r["method"])
                    rows.append(r)
                    mem = f"  peak {r['peak_mb']:.0f} MB" if "peak_mb" in r else ""
                    print(f"{model:>5} {size:>4}px b{batch:<2} {r['method']:<22} "
                          f"{r['seconds'] * 1000:9.1f} ms  {r['ratio']:5.2f}x{mem}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
