"""`vitviz cls / flow / posembed / heads`: files written, equal to the library's own results,
exit statuses and one-line errors. Tiny random timm models, 64 px images."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitviz
from vitviz.cli import main

SAMPLES = sorted((Path(__file__).resolve().parent.parent / "vitviz" / "assets").glob("*.png"))
TINY = ["--model", "ti16", "--random", "--image-size", "64"]  # ViT-Ti/16: 12 layers, 3 heads, 4x4 patches


def png(path) -> np.ndarray:
    arr = np.asarray(Image.open(path).convert("RGB"))
    assert arr.shape[0] >= 60 and arr.shape[1] >= 60
    assert arr.std() > 10, f"{path} is blank"
    return arr


def reference(seed=0, name="ti16", size=64):
    """The same random model the command builds (same seed), its attention on SAMPLES[0]."""
    torch.manual_seed(seed)
    m = vitviz.load_model(name, pretrained=False, image_size=size)
    x = m.preprocess(SAMPLES[0])
    with torch.no_grad(), vitviz.capture(m) as rec:
        m(x)
    return m, rec.attentions


def test_cls_grid_npy_and_masks(tmp_path, capsys):
    torch.manual_seed(0)
    code = main(["cls", str(SAMPLES[0]), str(SAMPLES[1]), *TINY, "--mask", "0.6", "--out", str(tmp_path)])
    assert code == 0
    maps = np.load(tmp_path / f"{SAMPLES[0].stem}_cls.npy")
    assert maps.shape == (12, 3, 4, 4)
    _, attn = reference(0)
    from vitviz.analyze.cls import all_layer_maps

    assert np.allclose(maps, all_layer_maps(attn)[:, 0].numpy(), atol=1e-6)
    a = png(tmp_path / f"{SAMPLES[0].stem}_cls.png")
    b = png(tmp_path / f"{SAMPLES[1].stem}_cls.png")
    assert a.shape != b.shape or np.abs(a.astype(int) - b).mean() > 1
    png(tmp_path / f"{SAMPLES[0].stem}_mask.png")
    out = capsys.readouterr()
    assert f"{SAMPLES[0].stem}_cls.png" in out.out and "2 done, 0 skipped" in out.err
    assert not list(tmp_path.glob(".*tmp"))


def test_cls_one_layer_and_a_patch_query(tmp_path):
    torch.manual_seed(0)
    code = main(["cls", str(SAMPLES[0]), *TINY, "--layer", "-2", "--query", "1,2", "--out", str(tmp_path)])
    assert code == 0
    maps = np.load(tmp_path / f"{SAMPLES[0].stem}_cls.npy")
    _, attn = reference(0)
    from vitviz.analyze.query import query_maps

    assert maps.shape == (1, 3, 4, 4)
    assert np.allclose(maps[0], query_maps(attn, (1, 2), layer=-2)[0].numpy(), atol=1e-6)


def test_cls_bad_arguments_exit_2_one_line(tmp_path, capsys):
    for args in (["--layer", "12"], ["--query", "dist"], ["--query", "1,x"], ["--mask", "0"]):
        code = main(["cls", str(SAMPLES[0]), *TINY, *args, "--out", str(tmp_path / "bad")])
        err = capsys.readouterr().err
        assert code == 2, args
        assert err.strip().count("\n") == 0 or err.count("vitviz: error") == 1, err
        assert "vitviz: error" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def test_cls_skips_unreadable_images(tmp_path, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    code = main(["cls", str(broken), str(SAMPLES[0]), *TINY, "--out", str(tmp_path / "out")])
    assert code == 1
    err = capsys.readouterr().err
    assert f"skipped {broken}" in err and "1 done, 1 skipped" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{SAMPLES[0].stem}_cls.npy",
                                                                      f"{SAMPLES[0].stem}_cls.png"]


def test_distillation_query_on_a_distilled_model(tmp_path):
    code = main(["cls", str(SAMPLES[0]), "--model", "deit-ti-distilled", "--random", "--image-size", "64",
                 "--query", "cls+dist", "--layer", "-1", "--out", str(tmp_path)])
    assert code == 0
    assert np.load(tmp_path / f"{SAMPLES[0].stem}_cls.npy").shape == (1, 3, 4, 4)


def test_flow_files_equal_the_library(tmp_path, capsys):
    torch.manual_seed(0)
    code = main(["flow", str(SAMPLES[0]), *TINY, "--bare", "--out", str(tmp_path)])
    assert code == 0
    heat = np.load(tmp_path / f"{SAMPLES[0].stem}_flow.npy")
    _, attn = reference(0)
    from vitviz.analyze.flow import attention_flow

    assert heat.shape == (4, 4)
    assert np.allclose(heat, attention_flow(attn)[0].numpy(), atol=1e-6)
    assert heat.min() >= 0 and heat.sum() <= 1 + 1e-6
    assert png(tmp_path / f"{SAMPLES[0].stem}_flow.png").shape == (256, 256, 3)  # 64 px shown at 4x
    png(tmp_path / f"{SAMPLES[0].stem}_flow_panels.png")
    assert f"{SAMPLES[0].stem}_flow.png" in capsys.readouterr().out


def test_posembed_figure_and_values(tmp_path, capsys):
    torch.manual_seed(1)
    assert main(["posembed", *TINY, "--out", str(tmp_path)]) == 0
    sim = np.load(tmp_path / "ti16_posembed.npy")
    torch.manual_seed(1)
    m = vitviz.load_model("ti16", pretrained=False, image_size=64)
    from vitviz.models._pos_params import pos_similarity

    assert sim.shape == (16, 4, 4)
    assert np.allclose(sim, pos_similarity(m).numpy(), atol=1e-6)
    png(tmp_path / "ti16_posembed.png")
    assert "ti16_posembed.png" in capsys.readouterr().out
    assert main(["posembed", *TINY, "--grid", "6x5", "--out", str(tmp_path / "g")]) == 0
    assert np.load(tmp_path / "g" / "ti16_posembed.npy").shape == (30, 6, 5)
    assert main(["posembed", *TINY, "--grid", "six", "--out", str(tmp_path / "h")]) == 2


def test_heads_json_figures_and_mean(tmp_path):
    code = main(["heads", str(SAMPLES[0]), str(SAMPLES[1]), "--model", "deit-ti-distilled", "--random",
                 "--image-size", "64", "--out", str(tmp_path)])
    assert code == 0
    data = json.loads((tmp_path / f"{SAMPLES[0].stem}_heads.json").read_text())
    dist = np.array(data["mean_attention_distance"])
    ent = np.array(data["entropy_nats"])
    share = np.array(data["prefix_attention_share"])
    assert dist.shape == ent.shape == share.shape == (12, 3)
    assert data["distance_unit"] == "pixels"
    assert (dist > 0).all() and (dist <= 48 * 2 ** 0.5 + 1e-6).all()  # patch centres span 48 px
    assert (ent > 0).all() and (ent <= np.log(18) + 1e-6).all()  # 2 prefix + 16 patches
    assert ((share >= 0) & (share <= 1)).all()
    png(tmp_path / f"{SAMPLES[0].stem}_heads.png")
    mean = json.loads((tmp_path / "heads_mean.json").read_text())
    other = json.loads((tmp_path / f"{SAMPLES[1].stem}_heads.json").read_text())
    assert np.allclose(mean["entropy_nats"], (ent + np.array(other["entropy_nats"])) / 2, atol=1e-6)
    png(tmp_path / "heads_mean.png")


def test_help_shows_examples(capsys):
    for name in ("cls", "flow", "posembed", "heads"):
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "example:" in out and f"vitviz {name}" in out


def test_cls_per_stage_of_a_hierarchical_model(tmp_path, capsys):
    """PiT runs 7x7, 4x4 and 2x2 token grids (CLS kept): one figure and .npy per stage."""
    torch.manual_seed(0)
    pit = ["--model", "pit_ti_224", "--random", "--image-size", "64"]
    assert main(["cls", str(SAMPLES[0]), *pit, "--mask", "0.6", "--out", str(tmp_path)]) == 0
    stem = SAMPLES[0].stem
    torch.manual_seed(0)
    m = vitviz.load_model("pit_ti_224", pretrained=False, image_size=64)
    with torch.no_grad(), vitviz.capture(m) as rec:
        m(m.preprocess(SAMPLES[0]))
    from vitviz.analyze.cls import all_layer_maps

    stages = rec.stages
    assert [s.layout.grid for s in stages] == [(7, 7), (4, 4), (2, 2)]
    for k, s in enumerate(stages):
        maps = np.load(tmp_path / f"{stem}_stage{k}_cls.npy")
        assert maps.shape == (s.num_layers, s.num_heads, *s.layout.grid)
        assert np.allclose(maps, all_layer_maps(s)[:, 0].numpy(), atol=1e-6)
        png(tmp_path / f"{stem}_stage{k}_cls.png")
    png(tmp_path / f"{stem}_mask.png")
    # rollout chains layers over one token set: one line saying why, exit status 2
    capsys.readouterr()
    assert main(["rollout", str(SAMPLES[0]), *pit, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "within a stage" in err and "vitviz cls" in err and "Traceback" not in err
