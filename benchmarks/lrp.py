"""Speed and peak memory of the LRP methods against Chefer's relevance (issue 27).

``vitviz.relevance(m, x, method=...)`` for ``chefer``, ``attnlrp`` and ``cp-lrp`` on timm's
ViT-B/16 (random weights, nothing downloaded), timed in interleaved repetitions after one
warm-up call each; every row gives the median time, its ratio to chefer's median and the range
of the per-repetition ratios (each repetition times every method once, in turn). Peak memory:
the peak resident set size during one call (``VmHWM``, reset before the call) in a fresh child
process per method that loads the model first, so each figure includes the model and the
libraries; the growth over the RSS before the call is what the method itself needs (``--memory``;
Linux).

    python -m benchmarks.lrp                          # ViT-B/16, 224 px, batch 8, 5 reps
    python -m benchmarks.lrp --model vit_tiny_patch16_224 --batch 2 --reps 3 --memory
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

METHODS = ("chefer", "attnlrp", "cp-lrp")


def _setup(model_name: str, size: int, batch: int):
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, img_size=size).eval()
    x = torch.randn(batch, 3, size, size)
    return model, x


def _status_mib(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process in MiB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child(model_name: str, size: int, batch: int, method: str) -> None:
    """One call in this (fresh) process; prints the resident set size before it and its peak
    during the call, in MiB, as JSON. (``ru_maxrss`` is not used: a forked child inherits its
    parent's; the peak ``VmHWM`` is reset through ``/proc/self/clear_refs`` before the call.)"""
    import vitviz

    model, x = _setup(model_name, size, batch)
    before = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current RSS
    vitviz.relevance(model, x, method=method, target=0)
    peak = _status_mib("VmHWM")
    print(json.dumps({"method": method, "peak_mib": peak, "before_mib": before}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--memory", action="store_true", help="also the peak RSS of one call per method (child processes)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args.model, args.size, args.batch, args.child)
        return 0
    import torch

    import vitviz

    print(f"{args.model}, {args.size} px, batch {args.batch}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}")
    model, x = _setup(args.model, args.size, args.batch)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for m in METHODS if args.reps else ():  # warm-up
        vitviz.relevance(model, x, method=m, target=0)
    for _ in range(args.reps):
        for m in METHODS:
            t0 = time.perf_counter()
            vitviz.relevance(model, x, method=m, target=0)
            times[m].append(time.perf_counter() - t0)
    base = statistics.median(times["chefer"]) if args.reps else 0.0
    if args.reps:
        print("| method | median s | ratio to chefer | per-rep ratio range |")
        print("|---|---|---|---|")
    for m in METHODS if args.reps else ():
        ratios = [t / c for t, c in zip(times[m], times["chefer"])]
        print(f"| {m} | {statistics.median(times[m]):.3f} | {statistics.median(times[m]) / base:.2f} | "
              f"{min(ratios):.2f}–{max(ratios):.2f} |")
    if args.memory:
        del model, x
        print("| method | peak RSS MiB during the call | RSS before the call | growth |")
        print("|---|---|---|---|")
        for m in METHODS:
            out = subprocess.run([sys.executable, "-m", "benchmarks.lrp", "--model", args.model, "--size",
                                  str(args.size), "--batch", str(args.batch), "--child", m],
                                 capture_output=True, text=True, check=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            print(f"| {m} | {row['peak_mib']:.0f} | {row['before_mib']:.0f} | "
                  f"{row['peak_mib'] - row['before_mib']:.0f} |")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
