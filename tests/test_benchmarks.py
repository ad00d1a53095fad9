"""The benchmark script runs (reduced: a tiny model) so it cannot rot. No timing is asserted."""

import pytest

from benchmarks.run import main


def test_quick_benchmark_runs_every_method(tmp_path):
    rows = main(["--quick", "--memory", "--gallery", "8", "--flow", "--json", str(tmp_path / "rows.json")])
    methods = {r["method"] for r in rows}
    assert {"forward (floor)", "rollout (stored)", "rollout (streaming)", "relevance (chefer)"} <= methods
    gallery = [r for r in rows if r["method"] == "gallery"]
    assert len(gallery) == 1 and gallery[0]["gallery"] > 0 and gallery[0]["ratio_forward"] > 0
    flow = [r for r in rows if r["method"].startswith("flow")]
    assert len(flow) == 5 and all(r["seconds"] > 0 for r in flow)
    solvers = {r["method"]: r for r in flow if r["method"].startswith("flow exact step")}
    assert len(solvers) == 3
    exact = [r for name, r in solvers.items() if "exact" in name.split(": ")[1]]
    assert len(exact) == 2 and all(r["max_abs_diff_to_ortools"] <= 1e-9 for r in exact)
    for r in rows:
        if r["method"] == "gallery" or r in flow:
            continue
        assert r["seconds"] > 0 and r["ratio"] > 0 and r["peak_mb"] > 0
        if r["method"] == "forward (floor)":
            assert r["ratio"] == 1.0
    assert (tmp_path / "rows.json").stat().st_size > 0


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
