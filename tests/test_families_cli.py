"""Every family the README lists, end to end from the command line: `vitviz cls` (one figure and
one ``.npy`` per stage of token grids) and `vitviz rollout` (a map, or its one-line reason with
exit status 2), on the smallest timm variant with random weights at a small input size.

Each family's outcome is written down: the exit status, the ``.npy`` shape of every stage
(``[layers, heads, gh, gw]``, the grid being the keys' grid: the patch grid coarsened by the
stage's stride, or the reduced key grid of PVT-style attention), the rollout map's grid or the
words of its refusal. A family that falls from maps to a refusal, loses a stage or a layer, fails.

The images go through the model's own preprocessing (``m.preprocess(path)``): timm models
without a ``patch_embed`` (MaxViT, LeViT, MobileViT, EfficientFormer, DaViT, FastViT, CoAtNet,
Twins) read timm's data config too, checked here against ``timm.data.create_transform``.

Since issue 24 the stages include ConViT's GPSA, Twins-SVT's locally-grouped attention, LeViT's
subsampling attention, MViTv2's transitions, CoAtNet's stages and EfficientViT-MSRA's ``v @ Aᵀ``
(each checked against its own probabilities in tests/test_capture_accounting.py).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import timm
import timm.data
import torch
from PIL import Image

import vitviz
from vitviz.cli import main

IMG = Path(__file__).resolve().parent.parent / "vitviz" / "assets" / "shapes-circle-square.png"
STEM = IMG.stem
FAST = ["--dpi", "50"]  # the figures' content does not change with the dpi; drawing them is faster
HIER = "one set of tokens"  # rollout's refusal on models whose layers run on several token grids


@dataclass(frozen=True)
class Family:
    family: str
    model: str
    size: int | None  # --image-size (None: the model's own)
    stages: tuple  # .npy shape of each stage, [layers, heads, gh, gw]; one entry: a single grid
    rollout: tuple | str  # the rollout map's [gh, gw], or words of its exit-2 refusal
    cls_exit: int = 0
    cls_error: str = ""  # words of the one-line error when cls_exit != 0


FAMILIES = [
    # one token grid: ViT-style models; grid = size / patch (32 px / 16, 28 px / 14)
    Family("ViT", "vit_tiny_patch16_224", 32, ((12, 3, 2, 2),), (2, 2)),
    Family("DeiT (distilled)", "deit_tiny_distilled_patch16_224", 32, ((12, 3, 2, 2),), (2, 2)),
    Family("DeiT3", "deit3_small_patch16_224", 32, ((12, 6, 2, 2),), (2, 2)),
    Family("BEiT", "beit_base_patch16_224", 32, ((12, 12, 2, 2),), (2, 2)),
    Family("EVA02", "eva02_tiny_patch14_224", 28, ((12, 3, 2, 2),), (2, 2)),
    Family("DINOv2 (+registers)", "vit_small_patch14_reg4_dinov2", 28, ((12, 6, 2, 2),), (2, 2)),
    Family("FlexiViT", "flexivit_small", 32, ((12, 6, 2, 2),), (2, 2)),
    # TNT: the 12 outer (patch) layers; the inner attention, among the pixels of a patch, is in
    # rec.skipped and does not stop rollout over the outer layers
    Family("TNT", "tnt_s_patch16_224", 32, ((12, 6, 2, 2),), (2, 2)),
    # EfficientFormer: its one attention block, on the 7x7 grid of 224 px (its only size)
    Family("EfficientFormer", "efficientformer_l1", None, ((1, 8, 7, 7),), (7, 7)),
    # VOLO: its 14 self-attention layers on the 4x4 grid (stride 16); the outlook attention of the
    # stride-8 stage is in rec.skipped; rollout chains the self-attention layers, as in Python
    Family("VOLO", "volo_d1_224", 64, ((14, 12, 4, 4),), (4, 4)),
    Family("SAM (ViTDet)", "samvit_base_patch16_224", 64, ((12, 12, 4, 4),), (4, 4)),
    # FastViT: attention in its last stage only (stride 32)
    Family("FastViT", "fastvit_sa12", 64, ((2, 16, 2, 2),), (2, 2)),
    # windows stitched per stage: grids 64/4, /8, /16, /32; (layers per stage, heads per stage)
    Family("Swin", "swin_tiny_patch4_window7_224", 64,
           ((2, 3, 16, 16), (2, 6, 8, 8), (6, 12, 4, 4), (2, 24, 2, 2)), HIER),
    Family("Swinv2", "swinv2_tiny_window8_256", 64,
           ((2, 3, 16, 16), (2, 6, 8, 8), (6, 12, 4, 4), (2, 24, 2, 2)), HIER),
    Family("TinyViT", "tiny_vit_5m_224", 64, ((2, 4, 8, 8), (6, 5, 4, 4), (2, 10, 2, 2)), HIER),
    # DaViT: the spatial window layers (its channel attention is not over tokens)
    Family("DaViT", "davit_tiny", 64, ((1, 3, 16, 16), (1, 6, 8, 8), (3, 12, 4, 4), (1, 24, 2, 2)), HIER),
    # MaxViT: block and grid attention, two layers per block
    Family("MaxViT", "maxvit_nano_rw_256", 64, ((2, 2, 16, 16), (4, 4, 8, 8), (6, 8, 4, 4), (2, 16, 2, 2)), HIER),
    Family("MobileViT", "mobilevit_xxs", 64, ((2, 4, 8, 8), (4, 4, 4, 4), (3, 4, 2, 2)), HIER),
    # PiT: CLS kept in every stage; grids (64 - 16) / 8 + 1 = 7, then pooled
    Family("PiT", "pit_ti_224", 64, ((2, 2, 7, 7), (6, 4, 4, 4), (4, 8, 2, 2)), HIER),
    # the subsampling layers (queries 4x4 / 2x2 over keys 8x8 / 4x4)
    Family("LeViT", "levit_128s", 128,
           ((2, 4, 8, 8), (1, 8, 8, 8), (3, 6, 4, 4), (1, 16, 4, 4), (4, 8, 2, 2)), HIER),
    # NextViT: keys reduced to 2x2 in every stage
    Family("NextViT", "nextvit_small", 64, ((1, 6, 2, 2), (2, 12, 2, 2), (1, 24, 2, 2)), HIER),
    # the stage transitions (pooled queries)
    Family("MViTv2", "mvitv2_tiny", 64,
           ((1, 1, 4, 4), (1, 2, 8, 8), (1, 2, 4, 4), (1, 4, 8, 8), (4, 4, 4, 4), (1, 8, 4, 4), (1, 8, 2, 2)),
           HIER),
    # keys on the reduced grid (sr ratios 8, 4, 2, 1 at strides 4, 8, 16, 32: 2x2 at 64 px)
    Family("PVT v2", "pvt_v2_b0", 64, ((2, 1, 2, 2), (2, 2, 2, 2), (2, 5, 2, 2), (2, 8, 2, 2)), HIER),
    Family("Twins-PCPVT", "twins_pcpvt_small", 64, ((3, 1, 2, 2), (4, 2, 2, 2), (6, 5, 2, 2), (3, 8, 2, 2)),
           HIER),
    # locally-grouped (window) and global sub-sampled layers alternate
    Family("Twins-SVT", "twins_svt_small", 64,
           ((1, 2, 16, 16), (1, 2, 2, 2), (1, 4, 8, 8), (1, 4, 2, 2), (5, 8, 4, 4), (5, 8, 2, 2), (4, 16, 2, 2)),
           HIER),
    Family("CoAtNet", "coatnet_pico_rw_224", 64, ((1, 4, 4, 4), (4, 8, 4, 4), (1, 8, 2, 2), (1, 16, 2, 2)), HIER),
    # 10 GPSA layers (before the CLS token joins), 2 MHSA layers
    Family("ConViT", "convit_tiny", 64, ((10, 4, 4, 4), (2, 4, 4, 4)), HIER),
    # attention applied as v @ Aᵀ; 224 px (at 64 px its last grid is 1x1)
    Family("EfficientViT-MSRA", "efficientvit_m0", None, ((1, 4, 14, 14), (2, 4, 7, 7), (3, 4, 4, 4)), HIER),
]


def _args(f: Family) -> list[str]:
    return ["--model", f.model, "--random", *(["--image-size", str(f.size)] if f.size else []), *FAST]


def _names(f: Family) -> list[str]:
    if len(f.stages) == 1:
        return [f"{STEM}_cls"]
    return [f"{STEM}_stage{k}_cls" for k in range(len(f.stages))]


@pytest.mark.parametrize("f", FAMILIES, ids=[f.model for f in FAMILIES])
def test_cls_writes_one_figure_and_map_per_stage(f, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["cls", str(IMG), *_args(f), "--out", str(out)])
    std = capsys.readouterr()
    assert code == f.cls_exit, std.err
    if f.cls_exit:
        assert f.cls_error in std.err and std.err.count("vitviz: error") == 1 and "Traceback" not in std.err
        return
    names = _names(f)
    assert sorted(p.name for p in out.iterdir()) == sorted(n + ext for n in names for ext in (".npy", ".png"))
    shapes = []
    for n in names:
        maps = np.load(out / f"{n}.npy")  # [layers, heads, gh, gw]
        shapes.append(maps.shape)
        # CLS (or mean patch) rows of attention: probabilities, at most 1 over the patches
        assert np.isfinite(maps).all() and maps.min() >= 0
        assert maps.sum(axis=(-2, -1)).max() <= 1 + 1e-4
        png = Image.open(out / f"{n}.png")
        assert min(png.size) > 50
        # every file written is reported
        assert f"{IMG} -> {out / (n + '.npy')}" in std.out and f"{IMG} -> {out / (n + '.png')}" in std.out
    assert tuple(shapes) == f.stages


# rollout on every family with one token grid (a map, or a refusal of its own); on the models
# whose layers run on several grids it is one check (rollout chains layers over one set of tokens),
# made here on windows (Swin), pooling with a CLS token (PiT) and reduced keys (PVT v2), and in
# every stage count above
ROLLOUT = [f for f in FAMILIES if len(f.stages) == 1 or f.family in ("Swin", "PiT", "PVT v2")]


@pytest.mark.parametrize("f", ROLLOUT, ids=[f.model for f in ROLLOUT])
def test_rollout_map_or_its_one_line_reason(f, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["rollout", str(IMG), *_args(f), "--out", str(out)])
    std = capsys.readouterr()
    if isinstance(f.rollout, str):
        assert code == 2, std.err
        said = [line for line in std.err.splitlines() if line.startswith("vitviz:")]  # not the progress bar
        assert len(said) == 1 and said[0].startswith("vitviz: error: ") and f.rollout in said[0], std.err
        assert "Traceback" not in std.err
        assert not out.exists() or not any(out.iterdir())
        return
    assert code == 0, std.err
    heat = np.load(out / f"{STEM}_rollout.npy")
    assert heat.shape == f.rollout and np.isfinite(heat).all() and heat.min() >= 0
    assert sorted(p.name for p in out.iterdir()) == [f"{STEM}_rollout.npy", f"{STEM}_rollout.png"]


# ---------------------------------------------------------------------------------------------
# preprocessing of timm models without a patch_embed: timm's own data config
# ---------------------------------------------------------------------------------------------

NO_PATCH_EMBED = ["maxvit_nano_rw_256", "levit_128s", "mobilevit_xxs", "fastvit_sa12", "coatnet_pico_rw_224"]


@pytest.mark.parametrize("name", NO_PATCH_EMBED)
def test_preprocess_equals_timms_transform_without_patch_embed(name):
    m = vitviz.load_model(name, pretrained=False)
    assert not hasattr(m.module, "patch_embed")
    ref = timm.data.create_transform(**timm.data.resolve_data_config(model=m.module))  # independent reference
    x = m.preprocess(IMG)
    expected = ref(Image.open(IMG).convert("RGB")).unsqueeze(0)  # [1, 3, H, W]
    assert x.shape == expected.shape
    assert torch.equal(x, expected)


@pytest.mark.parametrize("name,size", [("maxvit_nano_rw_256", 64),  # records its img_size
                                       ("mobilevit_xxs", 64),  # takes img_size, records none
                                       ("davit_tiny", 64)])  # no img_size: runs at any multiple of 32
def test_image_size_sets_the_input_of_models_without_patch_embed(name, size):
    m = vitviz.load_model(name, pretrained=False, image_size=size)
    x = m.preprocess(IMG)
    assert x.shape == (1, 3, size, size)
    cfg = timm.data.resolve_data_config(model=m.module)
    cfg["input_size"] = (3, size, size)  # timm's own transform at the asked size
    assert torch.equal(x, timm.data.create_transform(**cfg)(Image.open(IMG).convert("RGB")).unsqueeze(0))
    with torch.no_grad():
        assert torch.isfinite(m(x)).all()


def test_image_size_a_model_cannot_run_at_is_refused(tmp_path, capsys):
    """EfficientFormer's attention biases are built for 7x7 tokens (224 px): another size is one
    line with the reason and exit status 2, not a shape error from inside the model."""
    code = main(["cls", str(IMG), "--model", "efficientformer_l1", "--random", "--image-size", "64",
                 "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "does not run at --image-size 64" in err and "224x224" in err and "omit --image-size" in err
    with pytest.raises(vitviz.VitvizError, match="does not run at --image-size 64"):
        vitviz.load_model("efficientformer_l1", pretrained=False, image_size=64)


# ---------------------------------------------------------------------------------------------
# the `vitviz` process itself: a smoke test
# ---------------------------------------------------------------------------------------------

def _vitviz(*args, cwd):
    exe = Path(sys.executable).with_name("vitviz")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_console_script_cls_on_maxvit_writes_every_stage(tmp_path):
    """The issue's own command: it said "the model has no preprocessing configuration"."""
    out = tmp_path / "maps"
    r = _vitviz("cls", str(IMG), "--model", "maxvit_tiny_tf_224", "--random", "--image-size", "64",
                "--out", str(out), *FAST, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(f"{STEM}_stage{k}_cls{ext}" for k in range(4) for ext in (".npy", ".png"))
    assert [np.load(out / f"{STEM}_stage{k}_cls.npy").shape[-2:] for k in range(4)] == [
        (16, 16), (8, 8), (4, 4), (2, 2)]
    assert all(str(out / name) in r.stdout for name in written)


def test_console_script_rollout_on_a_hierarchical_model_is_one_line(tmp_path):
    r = _vitviz("rollout", str(IMG), "--model", "pvt_v2_b0", "--random", "--image-size", "64",
                "--out", str(tmp_path / "maps"), cwd=tmp_path)
    assert r.returncode == 2
    said = [line for line in r.stderr.splitlines() if line.startswith("vitviz:")]  # not the progress bar
    assert len(said) == 1 and said[0].startswith("vitviz: error: ") and HIER in said[0], r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "maps").exists()
