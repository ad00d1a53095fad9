"""The benchmark script runs (reduced: a tiny model) so it cannot rot. No timing is asserted."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vitviz
from benchmarks.run import main

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_runs_every_method(tmp_path, capsys):
    import timm

    rows = main(["--quick", "--memory", "--gallery", "8", "--flow", "--call-overhead", "--json",
                 str(tmp_path / "rows.json")])
    out = capsys.readouterr().out.splitlines()
    # what a reader needs to compare the numbers with theirs: machine, versions, load, before the rows
    machine = next(line for line in out if line.startswith("# machine: "))
    assert f"{os.cpu_count()} cores" in machine and f"torch threads {torch.get_num_threads()}" in machine
    assert platform.machine() in machine
    versions = next(line for line in out if line.startswith("# versions: "))
    for name, v in (("python", platform.python_version()), ("torch", torch.__version__),
                    ("timm", timm.__version__), ("vitviz", vitviz.__version__)):
        assert f"{name} {v}" in versions
    assert any(line.startswith("# device cpu, dtype float32; each row: median of 1 interleaved reps") for line in out)
    before = out.index(next(line for line in out if line.startswith("# load average before: ")))
    after = out.index(next(line for line in out if line.startswith("# load average after: ")))
    assert before < out.index(next(line for line in out if "forward (floor)" in line)) < after == len(out) - 1
    assert "other processes used" in out[after] and out[after].endswith(("quiet", "rerun on a quiet machine"))
    doc = json.loads((tmp_path / "rows.json").read_text())
    assert doc["rows"] == json.loads(json.dumps(rows))
    assert doc["machine"]["torch"] == torch.__version__ and doc["machine"]["cores"] == os.cpu_count()
    assert doc["machine"]["device"] == "cpu" and doc["machine"]["dtype"] == "float32"
    load = doc["load"]
    assert len(load["load_before"]) == 3 and len(load["load_after"]) == 3
    assert load["other_cores"] >= 0 and isinstance(load["busy"], bool) and load["wall_s"] > 0
    methods = {r["method"] for r in rows}
    assert {"forward (floor)", "capture (every layer kept)", "capture + rollout (stored, discard 0.9)",
            "rollout (streaming)", "relevance (chefer)", "relevance (attnlrp)", "relevance (cp-lrp)",
            "cls maps (rows='cls', last layer)"} <= methods
    gallery = [r for r in rows if r["method"] == "gallery"]
    assert len(gallery) == 1 and gallery[0]["gallery"] > 0 and gallery[0]["ratio_forward"] > 0
    low, high = gallery[0]["ratio_decode_forward_range"]  # the per-repetition ratios around the median's
    assert 0 < low <= high
    if os.path.isdir("/proc/self/task"):  # the render threads' CPU time, read from /proc
        assert 0 < gallery[0]["render_share"] < 1 and gallery[0]["cpu_ms_per_image_render"] > 0
        assert "% of the gallery's)" in next(line for line in out if "gallery rollout,cls" in line)
    per_call = [r for r in rows if r["method"].startswith("per attention call: ")]
    assert {r["method"] for r in per_call} == {"per attention call: capture (every layer kept)",
                                               "per attention call: capture only (A at every layer)",
                                               "per attention call: cls maps (last layer kept)",
                                               "per attention call: cls maps (rows='cls', last layer)",
                                               "per attention call: rollout (streaming, no discard)"}
    assert all(r["calls_per_pass"] == 12 and r["seconds"] > 0 for r in per_call)  # ti16: 12 blocks
    flow = [r for r in rows if r["method"].startswith("flow")]
    assert len(flow) == 5 and all(r["seconds"] > 0 for r in flow)
    solvers = {r["method"]: r for r in flow if r["method"].startswith("flow exact step")}
    assert len(solvers) == 3
    exact = [r for name, r in solvers.items() if "exact" in name.split(": ")[1]]
    assert len(exact) == 2 and all(r["max_abs_diff_to_ortools"] <= 1e-9 for r in exact)
    for r in rows:
        if r["method"] == "gallery" or r in flow or r in per_call:
            continue
        assert r["seconds"] > 0 and r["ratio"] > 0 and r["peak_mb"] > 0
        assert r["ratio_low"] <= r["ratio_high"] and r["reps"] == 1 and r["device"] == "cpu"
        if r["method"] == "forward (floor)":
            assert r["ratio"] == 1.0


def test_cuda_without_a_gpu_is_one_line_and_status_2():
    """--device cuda where torch sees no GPU: one line on stderr, exit status 2, nothing timed.
    CUDA_VISIBLE_DEVICES= hides any GPU, so this holds on a GPU machine too."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-m", "benchmarks.run", "--device", "cuda", "--quick"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert lines[0].startswith("benchmarks.run: error: --device cuda: no CUDA GPU is available")
    assert "use --device cpu" in lines[0]


def test_cuda_refusal_in_process(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        main(["--device", "cuda", "--quick"])
    assert e.value.code == 2
    err = capsys.readouterr()
    assert err.out == "" and len(err.err.strip().splitlines()) == 1 and "--device cuda" in err.err


def test_timed_synchronises_around_every_call_and_isolates_failures():
    """The clock of every rep sits between two syncs (on CUDA: torch.cuda.synchronize), so a time
    includes the work a call queued; a method that fails is reported, the others are timed."""
    from benchmarks.run import _timed

    log = []

    def call(name):
        def fn():
            log.append(name)
        return fn

    def broken():
        raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")

    runs, failed = {}, {}
    med = _timed({"a": call("a"), "bad": broken, "b": call("b")}, 3, runs, sync=lambda: log.append("sync"),
                 failed=failed)
    assert set(med) == {"a", "b"} and len(runs["a"]) == len(runs["b"]) == 3
    assert failed == {"bad": "RuntimeError: CUDA out of memory. Tried to allocate 2 GiB"}
    timed = log[log.index("sync"):]  # after the warm-ups: sync, call, sync per rep and method
    assert timed[1:] == ["sync", "a", "sync", "sync", "b", "sync"] * 3


def test_load_meter_counts_other_processes_only():
    """CPU time this process burns is not counted as other processes' load."""
    from benchmarks.run import LoadMeter, _busy_cpu_seconds, _own_cpu_seconds

    if _busy_cpu_seconds() is None:
        pytest.skip("no /proc/stat")
    meter = LoadMeter()
    own0, all0 = _own_cpu_seconds(), _busy_cpu_seconds()
    x = 0
    while _own_cpu_seconds() - own0 < 0.3:  # burn 0.3 s of this process's CPU
        x += 1
    assert _busy_cpu_seconds() - all0 >= _own_cpu_seconds() - own0 - 0.05  # the machine saw it (jiffies)
    load = meter.finish()
    assert 0 <= load["other_cores"] <= os.cpu_count()


def test_scipy_solver_refines_below_its_int32_resolution():
    """Golden values on a tiny graph: S -> a (1), a -> T (3e-11), a -> b (0.5), S -> b (0.25),
    b -> T (0.6). Max flow = min cut {a -> T, b -> T} = 0.6 + 3e-11 (b receives 0.75, passes
    0.6). One int32 round floors 3e-11 * 2**30 to 0; the refinement rounds find it."""
    import numpy as np

    from benchmarks.flow_solvers import scipy_max_flow

    s, a, b, t = 0, 1, 2, 3
    tails, heads = np.array([s, a, s, b, a]), np.array([a, t, b, t, b])
    cap = np.array([1.0, 3e-11, 0.25, 0.6, 0.5])
    stats = {}
    exact = scipy_max_flow(tails, heads, cap, s, t, 4, tol=1e-14, stats=stats)
    assert exact == pytest.approx(0.6 + 3e-11, abs=1e-14) and stats["rounds"] >= 2
    one = scipy_max_flow(tails, heads, cap, s, t, 4, tol=float("inf"), stats=stats)
    assert stats["rounds"] == 1 and 0.6 - 5 * 1.25 / (2 ** 30 - 1) <= one <= 0.6  # arcs / scale below


def test_scipy_solver_equals_vitviz_exact_max_flow():
    """Equivalence with the solver vitviz ships, on random layered graphs with peaked columns."""
    import numpy as np
    import torch

    from benchmarks.flow_solvers import scipy_exact_values
    from vitviz.analyze.flow import layered_max_flow

    g = torch.Generator().manual_seed(3)
    caps = torch.softmax(torch.randn(2, 4, 9, 9, generator=g, dtype=torch.float64) * 3, -1)
    source = torch.rand(2, 9, generator=g, dtype=torch.float64)
    want = layered_max_flow(caps, source, exact_only=True)  # [2, 9]
    for i in range(2):
        got = scipy_exact_values(caps[i].numpy(), source[i].numpy(), range(9))
        assert np.allclose(got, want[i].numpy(), atol=2e-9, rtol=0)


def test_thread_cpu_counts_the_named_threads_only():
    import threading
    import time

    from benchmarks.gallery_throughput import ThreadCPU

    if not os.path.isdir("/proc/self/task"):
        pytest.skip("no /proc")

    def burn():
        t = time.thread_time()
        while time.thread_time() - t < 0.3:
            pass

    with ThreadCPU(prefix="vitviz-render") as meter:
        for name in ("vitviz-render_0", "other"):
            th = threading.Thread(target=burn, name=name)
            th.start()
            th.join()
    assert 0.2 <= meter.seconds <= 0.45  # the render thread's 0.3 s, not the other's (0.02 s ticks)
