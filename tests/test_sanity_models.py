"""The sanity checks on models that are not plain ViTs: Swin (several token grids, no token slot).

What the model's grids allow runs (CLS maps of the last stage, the baselines); rollout,
relevance, gradient rollout and flow, which chain the layers over one set of tokens, are left
out with a note each when they come from the defaults, and refused before any work when named.
Token curves need a token slot and are skipped with a note; randomisation (one step per block
of every stage) and ROAD (on the last stage's coarser grid) run. `vitviz sanity` does the same
and honours --format / --dpi.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import transformers

import vitviz
from vitviz.cli import main
from vitviz.errors import CaptureError, LayoutError, VitvizError
from vitviz.evaluate import sanity as sanity_mod
from vitviz.evaluate.perturbation import road, token_site
from vitviz.evaluate.sanity import randomization_layers, sanity_check

SAMPLES = sorted((Path(__file__).resolve().parent.parent / "vitviz" / "assets").glob("*.png"))
CHAINED = ("rollout", "relevance", "grad_rollout", "flow")  # need one set of tokens in every layer


def tiny_swin() -> torch.nn.Module:
    """timm's Swin-T architecture, shrunk: 64 px, two stages (grids 16x16 and 8x8), random weights."""
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64, depths=(2, 2),
                              embed_dim=16, num_heads=(1, 2), window_size=4, num_classes=5).eval()
    torch.nn.init.normal_(model.head.fc.weight)  # classes that differ
    return model


def _params(items) -> list[torch.nn.Parameter]:
    return [p for it in items for p in ([it] if isinstance(it, torch.nn.Parameter) else it.parameters())]


# ---- randomisation steps of a hierarchical model ----------------------------------------------------

def test_swin_steps_cover_every_stage_top_down_and_every_parameter_once():
    model = tiny_swin()
    steps = randomization_layers(model)
    assert [n for n, _ in steps] == ["head", "stage 1 block 1", "stage 1 block 0", "stage 0 block 1",
                                     "stage 0 block 0", "embeddings"]
    ids = [id(p) for _, items in steps for p in _params(items)]
    assert len(ids) == len(set(ids))  # no parameter in two steps
    assert set(ids) == {id(p) for p in model.parameters()}  # and none left out
    head = dict(steps)["head"]
    assert head[0] is model.head and model.norm in head and len(head) == 2  # not the patch-merging norm
    assert model.layers[1].blocks[1] in dict(steps)["stage 1 block 1"]
    assert model.layers[1].downsample in dict(steps)["stage 1 block 0"]  # patch merging with its stage


def test_transformers_swin_steps_and_a_plain_vit_unchanged():
    cfg = transformers.SwinConfig(image_size=64, embed_dim=16, depths=[1, 2], num_heads=[1, 1], window_size=4,
                                  num_labels=3)
    hf = transformers.SwinForImageClassification(cfg).eval()
    steps = randomization_layers(hf)
    assert [n for n, _ in steps] == ["head", "stage 1 block 1", "stage 1 block 0", "stage 0 block 0", "embeddings"]
    assert hf.swin.embeddings.norm not in dict(steps)["head"]  # the embeddings' norm is no final norm
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=3, img_size=32)
    assert [n for n, _ in randomization_layers(vit)] == ["head", "block 2", "block 1", "block 0", "embeddings"]


# ---- the checks on Swin -------------------------------------------------------------------------------

def test_swin_defaults_follow_its_grids_and_randomisation_and_road_run():
    model = tiny_swin()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    notes = []
    rep = sanity_check(model, x, steps=2, road_steps=4, on_note=notes.append)
    assert list(rep.randomization) == ["cls", "random", "centre"]
    assert set(rep.dropped) == set(CHAINED)
    for name in CHAINED:
        line = next(n for n in notes if n.startswith(f"{name} is skipped: "))
        assert "\n" not in line and ("one set of tokens" in line or "token grids" in line)
    assert rep.notes == notes and rep.table().notes == notes
    # no token slot: token curves skipped with a note, the rest runs
    assert rep.tokens == {}
    assert any(n.startswith("token deletion / insertion is skipped") for n in notes)
    r = rep.randomization["cls"]
    assert r.steps == ["trained"] + [n for n, _ in randomization_layers(model)]
    assert tuple(r.maps.shape) == (7, 2, 8, 8)  # CLS-style maps of the last stage: 8x8 at 64 px
    assert not torch.equal(r.maps[0], r.maps[-1])  # the map changes when the model is gone
    assert set(rep.road) == {"cls", "random", "centre"}
    rc = rep.road["cls"]
    assert rc.morf.shape == (2, 5) and rc.counts == [0, 16, 32, 48, 64]
    assert torch.isfinite(rc.morf).all() and torch.isfinite(rc.lerf).all()
    # the first point is the unperturbed image's probability of the predicted class
    with torch.no_grad():
        p = model(x).softmax(-1)
    assert torch.allclose(rc.morf[:, 0], p[torch.arange(2), rc.target], atol=1e-5)
    row = rep.rows()["cls"]
    assert {"rand_all", "road_morf", "road_lerf"} <= set(row) and "tok_del" not in row
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # restored bit for bit


def test_a_named_method_the_grids_refuse_fails_before_any_work(monkeypatch):
    model = tiny_swin()
    x = torch.randn(1, 3, 64, 64)

    def no_work(*a, **k):
        raise AssertionError("the randomisation ran before the refusal")

    monkeypatch.setattr(sanity_mod, "randomization", no_work)
    with pytest.raises(CaptureError, match="one set of tokens"):
        sanity_check(model, x, ["cls", "rollout"])


def test_road_takes_a_coarser_grid_only_when_asked():
    model = tiny_swin()
    x = torch.randn(2, 3, 64, 64)
    coarse = torch.rand(2, 2, 2)
    with pytest.raises(LayoutError, match="16x16 patch grid"):
        road(model, x, coarse)
    r = road(model, x, coarse, steps=2, coarse=True)
    assert r.counts == [0, 2, 4] and r.morf.shape == (2, 3)
    with pytest.raises(LayoutError, match="coarser grid"):
        road(model, x, torch.rand(2, 3, 3), coarse=True)  # 64 px is no multiple of 3


def test_transformers_models_without_a_token_slot_are_refused_with_the_reason():
    swin = transformers.SwinForImageClassification(transformers.SwinConfig(
        image_size=64, embed_dim=16, depths=[1, 1], num_heads=[1, 1], window_size=4, num_labels=3))
    beit = transformers.BeitForImageClassification(transformers.BeitConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=8, num_labels=3, use_relative_position_bias=True))
    with pytest.raises(VitvizError, match="Swin-like"):
        token_site(swin)
    with pytest.raises(VitvizError, match="BEiT-like"):
        token_site(beit)
    vit = transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=8, num_labels=3))
    assert "embeddings" in token_site(vit)[1]  # a plain ViT keeps its slot


# ---- the command ------------------------------------------------------------------------------------

def test_sanity_command_on_swin_notes_and_writes_pdf(tmp_path, capsys, monkeypatch):
    model = vitviz.wrap(tiny_swin())
    monkeypatch.setattr("vitviz.cli.commands.sanity.load", lambda args: model)
    out = tmp_path / "o"
    code = main(["sanity", str(SAMPLES[0]), "--model", "swin_tiny_patch4_window7_224", "--random",
                 "--steps", "2", "--road-steps", "2", "--format", "pdf", "--dpi", "60", "--out", str(out)])
    std = capsys.readouterr()
    assert code == 0, std.err
    notes = [line for line in std.err.splitlines() if line.startswith("vitviz: note: ")]
    for name in CHAINED:
        assert sum(line.startswith(f"vitviz: note: {name} is skipped: ") for line in notes) == 1
    assert any("token deletion / insertion is skipped" in line for line in notes)
    assert "Traceback" not in std.err and "vitviz: error" not in std.err
    table = std.out
    assert "cls" in table and "ROAD MoRF AUC" in table and "token deletion AUC" not in table
    assert "rollout" not in table.split("\n", 1)[1]  # no row for a method left out
    assert sorted(p.name for p in out.iterdir()) == ["sanity_curves.pdf", "sanity_randomization.pdf",
                                                     "sanity_table.md"]
    md = (out / "sanity_table.md").read_text()
    assert "| cls |" in md and all(f"- note: {name} is skipped: " in md for name in CHAINED)  # what was left out
    for name in ("sanity_curves.pdf", "sanity_randomization.pdf"):
        assert (out / name).read_bytes()[:5] == b"%PDF-"
        assert f"-> {out / name}" in std.err  # every written path reported


def test_sanity_command_format_and_dpi(tmp_path, capsys):
    out = tmp_path / "o"
    args = ["sanity", str(SAMPLES[0]), "--model", "shapes-vit", "--methods", "rollout,random", "--steps", "2",
            "--road-steps", "2", "--road-images", "1", "--out"]
    assert main([*args, str(out / "svg"), "--format", "svg", "--dpi", "50"]) == 0
    assert main([*args, str(out / "png"), "--dpi", "150"]) == 0
    capsys.readouterr()
    svg = sorted(p.name for p in (out / "svg").iterdir())
    assert svg == ["sanity_curves.svg", "sanity_randomization.svg", "sanity_table.md"]
    assert (out / "svg" / "sanity_curves.svg").read_text().lstrip().startswith("<?xml")
    from PIL import Image

    assert Image.open(out / "png" / "sanity_curves.png").size[0] >= 2000  # 1500 px at 100 dpi -> 2250 at 150
    for bad in (["--format", "bmp"], ["--dpi", "5"]):
        assert main([*args, str(out / "bad"), *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vitviz: error: ") and err.count("\n") == 1
    assert not (out / "bad").exists()


def test_sanity_command_named_method_the_grids_refuse_exit_2(tmp_path, capsys, monkeypatch):
    model = vitviz.wrap(tiny_swin())
    monkeypatch.setattr("vitviz.cli.commands.sanity.load", lambda args: model)

    def no_work(*a, **k):
        raise AssertionError("the randomisation ran before the refusal")

    monkeypatch.setattr(sanity_mod, "randomization", no_work)
    code = main(["sanity", str(SAMPLES[0]), "--model", "swin_tiny_patch4_window7_224", "--random",
                 "--methods", "cls,rollout", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("vitviz: error: ")]
    assert len(errors) == 1 and "one set of tokens" in errors[0] and "Traceback" not in err
    assert not (tmp_path / "o").exists()
