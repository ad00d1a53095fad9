"""The `vitviz` command: outputs, exit statuses and one-line errors."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitviz.cli.main import main

SAMPLES = sorted((Path(__file__).resolve().parent.parent / "vitviz" / "assets").glob("*.png"))


@pytest.fixture
def no_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torchhub"))


def test_rollout_writes_png_and_npy(tmp_path, capsys):
    code = main(["rollout", str(SAMPLES[0]), "--model", "ti16", "--random", "--image-size", "96",
                 "--discard-ratio", "0.9", "--out", str(tmp_path)])
    assert code == 0
    stem = SAMPLES[0].stem
    heat = np.load(tmp_path / f"{stem}_rollout.npy")
    assert heat.shape == (6, 6) and np.isfinite(heat).all() and heat.min() >= 0
    png = np.asarray(Image.open(tmp_path / f"{stem}_rollout.png"))
    assert png.shape == (288, 288, 3)  # the 96 px input shown at 3x: the smallest whole factor reaching 256 px
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left
    assert f"{stem}_rollout.png" in capsys.readouterr().out


def test_bad_images_are_skipped_and_reported(tmp_path, capsys):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    out = tmp_path / "out"
    code = main(["rollout", str(SAMPLES[0]), str(empty), str(text), str(tmp_path / "missing.jpg"),
                 "--model", "ti16", "--random", "--image-size", "64", "--out", str(out)])
    assert code == 1
    err = capsys.readouterr().err
    for name in ("empty.jpg", "notes.png", "missing.jpg"):
        assert f"skipped {tmp_path / name}" in err
    assert "1 done, 3 skipped" in err
    assert sorted(p.name for p in out.iterdir()) == [f"{SAMPLES[0].stem}_rollout.npy",
                                                     f"{SAMPLES[0].stem}_rollout.png"]


def test_unknown_model_exit_2_one_line(capsys, tmp_path):
    code = main(["rollout", str(SAMPLES[0]), "--model", "b61", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "b16" in err and "Traceback" not in err


def test_missing_weights_exit_2_names_the_fixes(capsys, tmp_path, no_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    code = main(["rollout", str(SAMPLES[0]), "--model", "b16", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "vit_base_patch16_224" in err and "--weights FILE" in err and "--random" in err


def test_debug_shows_the_traceback(no_cache, tmp_path):
    from vitviz.errors import WeightsNotFoundError

    with pytest.raises(WeightsNotFoundError):
        main(["--debug", "rollout", str(SAMPLES[0]), "--model", "b16", "--out", str(tmp_path)])
    with pytest.raises(WeightsNotFoundError):
        main(["rollout", str(SAMPLES[0]), "--model", "b16", "--out", str(tmp_path), "--debug"])


def test_refused_pickle_checkpoint_exit_2(tmp_path, capsys):
    bad = tmp_path / "whole_model.pth"
    torch.save(torch.nn.Linear(2, 2), bad)  # a pickled module, not a state dict
    code = main(["rollout", str(SAMPLES[0]), "--model", "ti16", "--weights", str(bad),
                 "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "whole_model.pth" in err and "Traceback" not in err


@pytest.mark.parametrize("args,needle", [
    (["--discard-ratio", "1.5"], "--discard-ratio"),
    (["--alpha", "2"], "--alpha"),
])
def test_bad_arguments_exit_2(args, needle, capsys, tmp_path):
    code = main(["rollout", str(SAMPLES[0]), "--model", "ti16", "--random", "--out", str(tmp_path)] + args)
    assert code == 2 and needle in capsys.readouterr().err


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["rollout", "x.jpg"])  # --model missing
    assert e.value.code == 2


def test_models_lists_aliases_and_cache_state(capsys, no_cache):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "b16" in out and "vit_base_patch16_224" in out and "not cached" in out


def test_help_is_fast_and_imports_no_torch():
    code = ("import sys, vitviz.cli.main as c\n"
            "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'timm', 'transformers', 'cv2') if m in sys.modules]\n"
            "print('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in out.stdout
    assert "vitviz rollout cat.jpg --model b16" in out.stdout  # the worked example


def test_console_script_demo(tmp_path):
    exe = Path(sys.executable).with_name("vitviz")
    out = subprocess.run([str(exe), "demo", "--out", str(tmp_path / "demo")], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert len(list((tmp_path / "demo").glob("*_rollout.png"))) == len(SAMPLES)
