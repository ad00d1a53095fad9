"""The benchmark script runs (reduced: a tiny model) so it cannot rot. No timing is asserted."""

from benchmarks.run import main


def test_quick_benchmark_runs_every_method(tmp_path):
    rows = main(["--quick", "--memory", "--gallery", "8", "--flow", "--json", str(tmp_path / "rows.json")])
    methods = {r["method"] for r in rows}
    assert {"forward (floor)", "rollout (stored)", "rollout (streaming)", "relevance (chefer)"} <= methods
    gallery = [r for r in rows if r["method"] == "gallery"]
    assert len(gallery) == 1 and gallery[0]["gallery"] > 0 and gallery[0]["ratio_forward"] > 0
    flow = [r for r in rows if r["method"].startswith("flow")]
    assert len(flow) == 2 and all(r["seconds"] > 0 for r in flow)
    for r in rows:
        if r["method"] == "gallery" or r in flow:
            continue
        assert r["seconds"] > 0 and r["ratio"] > 0 and r["peak_mb"] > 0
        if r["method"] == "forward (floor)":
            assert r["ratio"] == 1.0
    assert (tmp_path / "rows.json").stat().st_size > 0
