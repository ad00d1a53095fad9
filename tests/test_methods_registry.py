"""One registry of map methods: a method registered once is listed by `vitviz methods` and used by
the gallery, the sanity checks and benchmark-maps (from Python and from the command line), with
the values a hand computation from the captured attention gives; every built-in method is listed
and accepted wherever its needs allow."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import vitviz
from vitviz.cli import main
from vitviz.errors import VitvizError
from vitviz.evaluate.sanity import randomization, sanity_check
from vitviz.explain import compute_maps, get_method, list_methods, register_method, unregister_method
from vitviz.zoo.benchmark import classifier_methods

SAMPLES = sorted((Path(__file__).resolve().parent.parent / "vitviz" / "assets").glob("*.png"))
BUILTINS = {"rollout", "cls", "relevance", "grad_rollout", "flow", "caption", "text", "random", "centre"}
TOY = "last_layer_mean"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # two cores shared by several jobs
    yield
    torch.set_num_threads(before)


@pytest.fixture
def toy():
    """A method registered once, for the test; removed afterwards (also when the test fails)."""
    @register_method(TOY, description="test: the CLS row of one layer, heads averaged", layer=-1)
    def _toy(inp, *, layer):
        attn = inp.attentions  # [L, B, H, N, N]
        a = attn.tensor[layer].mean(1)  # [B, N, N]
        return a[:, 0, attn.layout.patches].reshape(a.shape[0], *attn.layout.grid)  # [B, gh, gw]

    yield get_method(TOY)
    assert unregister_method(TOY)
    assert TOY not in list_methods()


@pytest.fixture(scope="module")
def vit():
    return vitviz.load_model("shapes-vit")


@pytest.fixture(scope="module")
def x(vit):
    return torch.cat([vit.preprocess(str(p)) for p in SAMPLES])  # [2, 3, 64, 64]


def by_hand(model, x, layer=-1):
    """The toy's maps from the captured attention, head by head: ``[B, gh, gw]``."""
    with torch.no_grad(), vitviz.capture(model) as rec:
        model(x)
    t, layout = rec.attentions.tensor, rec.attentions.layout  # [L, B, H, N, N]
    p = layout.num_prefix
    heads = [t[layer, :, h, 0, p:p + layout.num_patches] for h in range(t.shape[2])]  # H x [B, gh*gw]
    return (sum(heads) / len(heads)).reshape(x.shape[0], *layout.grid)


def _folder(tmp_path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for p in SAMPLES:
        shutil.copy(p, src / p.name)
    return src


# ---- the toy method, registered once, everywhere -------------------------------------------------

def test_vitviz_methods_lists_the_toy(toy, capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["name", "needs", "streams", "maps", "options"]
    row = next(line for line in lines if line.startswith(TOY + " "))
    assert row.split()[1:5] == ["attention", "no", "map", "layer=-1"]
    assert row.endswith("test: the CLS row of one layer, heads averaged")
    assert main(["methods", "--json"]) == 0
    rows = {r["name"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert rows[TOY] == {"name": TOY, "needs": ["attention"], "streams": False, "maps": "map",
                         "options": {"layer": -1}, "extra": None,
                         "description": "test: the CLS row of one layer, heads averaged"}
    assert main(["gallery", "--list-methods"]) == 0
    assert any(line.startswith(TOY) for line in capsys.readouterr().out.splitlines())


def test_compute_maps_equals_the_hand_computation(toy, vit, x):
    torch.testing.assert_close(compute_maps(vit, x, TOY), by_hand(vit, x), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(compute_maps(vit, x, TOY, layer=0), by_hand(vit, x, layer=0), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(by_hand(vit, x, layer=0), by_hand(vit, x))  # the option matters
    # the same quantity through the built-in cls method, its heads averaged
    torch.testing.assert_close(compute_maps(vit, x, "cls", one_map=True), by_hand(vit, x), rtol=1e-5, atol=1e-7)
    with pytest.raises(VitvizError, match="no option"):
        compute_maps(vit, x, TOY, discard_ratio=0.5)


def test_gallery_from_the_command_line_and_from_python(toy, vit, tmp_path):
    src = _folder(tmp_path)
    code = main(["gallery", str(src), "--model", "shapes-vit", "--methods", f"{TOY},rollout",
                 "--out", str(tmp_path / "cli"), "--workers", "0", "--no-progress"])
    assert code == 0
    records = [json.loads(line) for line in (tmp_path / "cli" / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == len(SAMPLES) and all(r["status"] == "done" for r in records)
    for r in records:
        want = by_hand(vit, vit.preprocess(str(src / r["key"])))[0]
        np.testing.assert_allclose(np.load(tmp_path / "cli" / r["outputs"][TOY]["npy"]), want, rtol=1e-5, atol=1e-7)
    res = vitviz.build_gallery(src, vit, tmp_path / "py", methods=[TOY], options={TOY: {"layer": 0}},
                               workers=0, progress=False)
    assert res.exit_code == 0 and len(res.done) == len(SAMPLES)
    for r in res.done:
        want = by_hand(vit, vit.preprocess(str(src / r["key"])), layer=0)[0]
        np.testing.assert_allclose(np.load(tmp_path / "py" / r["outputs"][TOY]["npy"]), want, rtol=1e-5, atol=1e-7)


def test_sanity_from_python(toy, vit, x):
    r = randomization(vit, x, TOY)
    assert r.method == TOY and r.steps[:2] == ["trained", "head"]
    torch.testing.assert_close(r.maps[0], by_hand(vit, x), rtol=1e-5, atol=1e-7)
    assert torch.equal(r.maps[1], r.maps[0])  # attention does not read the classifier head
    assert not torch.allclose(r.maps[-1], r.maps[0])  # every layer random: the map moved
    # every step equals the hand computation on the re-initialised model (same seeds, same steps)
    probe = randomization(vit, x, lambda model, xb, target: by_hand(model, xb))
    torch.testing.assert_close(r.maps, probe.maps, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(r.spearman, probe.spearman, rtol=1e-4, atol=1e-5)
    rep = sanity_check(vit, x, [TOY, "centre"], steps=2, road_images=0)
    rows = rep.rows()
    assert rows[TOY]["rand_head"] == 1.0 and rows[TOY]["rand_all"] == float(r.spearman[-1].mean())
    curves = vitviz.evaluate.token_curves(vit, x, by_hand(vit, x), steps=2)
    assert np.isclose(rows[TOY]["tok_del"], float(curves.deletion_auc.mean()), atol=1e-6)


def test_sanity_from_the_command_line(toy, vit, x, tmp_path, capsys):
    code = main(["sanity", *map(str, SAMPLES), "--model", "shapes-vit", "--methods", TOY, "--steps", "2",
                 "--road-images", "0", "--markdown", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith(f"| {TOY} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    r = randomization(vit, x, TOY)
    assert cells[1:3] == ["1.000", f"{float(r.spearman[-1].mean()):.3f}"]  # head random, all random
    assert (tmp_path / "sanity_table.md").read_text().count(f"| {TOY} |") == 1


def test_benchmark_maps_from_python_and_the_command_line(toy, vit, x, capsys):
    maps, _ = classifier_methods(vit, x, flow=False)
    torch.testing.assert_close(maps[TOY], by_hand(vit, x), rtol=1e-5, atol=1e-7)
    assert list(maps)[-1] == TOY  # after the standard rows
    only, _ = classifier_methods(vit, x, methods=[TOY, "centre"])
    assert list(only) == ["baseline: centre prior", TOY]
    code = main(["benchmark-maps", "--model", "shapes-vit", "--num-images", "2", "--batch-size", "2",
                 "--steps", "1", "--no-deletion", "--methods", TOY, "--markdown"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"| {TOY} |" in out and "| rollout |" not in out


# ---- every built-in method: listed, and accepted where its needs allow ----------------------------

def test_every_builtin_is_listed_with_what_it_needs(capsys):
    assert BUILTINS <= set(list_methods())
    assert main(["methods", "--json"]) == 0
    rows = {r["name"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert BUILTINS <= set(rows)
    needs = {n: rows[n]["needs"] for n in BUILTINS}
    assert needs == {"rollout": ["attention"], "cls": ["attention"], "flow": ["attention"],
                     "relevance": ["grad"], "grad_rollout": ["grad"], "caption": ["model"],
                     "text": ["model", "texts"], "random": ["none"], "centre": ["none"]}
    assert {n for n in BUILTINS if rows[n]["streams"]} == {"rollout", "cls", "relevance", "grad_rollout"}
    assert {n for n in BUILTINS if rows[n]["maps"] == "list"} == {"caption", "text"}
    assert rows["flow"]["extra"] == "flow" and rows["random"]["options"] == {"seed": 0}


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_sanity_and_benchmark_accept_every_builtin_with_one_map_per_image(name, vit, x, capsys, tmp_path):
    method = get_method(name)
    if method.single_map:
        r = randomization(vit, x[:1], name, num_steps=0)
        assert r.maps.shape == (1, 1, 8, 8) and torch.isfinite(r.maps).all()
        torch.testing.assert_close(r.maps[0], compute_maps(vit, x[:1], name, one_map=True))
        maps, _ = classifier_methods(vit, x[:1], methods=[name])
        assert maps and all(m.shape == (1, 8, 8) for m in maps.values())
    else:  # per-word / per-text maps: the gallery's only, refused with the one typed error
        with pytest.raises(VitvizError, match="varying number of maps per image"):
            randomization(vit, x[:1], name, num_steps=0)
        with pytest.raises(VitvizError, match="varying number of maps per image"):
            classifier_methods(vit, x[:1], methods=[name])
        code = main(["sanity", str(SAMPLES[0]), "--model", "shapes-vit", "--methods", name, "--out", str(tmp_path)])
        err = capsys.readouterr().err
        assert code == 2 and name in err and len(err.strip().splitlines()) == 1


def test_gallery_accepts_every_builtin(vit, tmp_path):
    src = _folder(tmp_path)
    classifier = sorted(n for n in BUILTINS if get_method(n).needs != "model")
    r = vitviz.build_gallery(src, vit, tmp_path / "vit", methods=classifier, workers=0, progress=False, limit=1)
    assert r.exit_code == 0 and len(r.done) == 1 and set(r.done[0]["outputs"]) == set(classifier)
    for name in classifier:
        saved = np.load(tmp_path / "vit" / r.done[0]["outputs"][name]["npy"])
        want = compute_maps(vit, vit.preprocess(str(src / r.done[0]["key"])), name)[0]
        np.testing.assert_allclose(saved, want, rtol=1e-4, atol=1e-6)
    cap = vitviz.build_gallery(src, vitviz.load_model("shapes-captioner"), tmp_path / "cap", methods="caption",
                               workers=0, progress=False, limit=1)
    assert cap.exit_code == 0 and cap.done[0]["caption"]
    text = vitviz.build_gallery(src, vitviz.load_model("shapes-clip"), tmp_path / "text", methods="text",
                                options={"text": {"texts": ["a red circle"]}}, workers=0, progress=False, limit=1)
    assert text.exit_code == 0 and text.done[0]["outputs"]["text"]["names"][0].startswith("a red circle")
