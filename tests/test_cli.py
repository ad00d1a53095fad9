"""The `vitviz` command: outputs, exit statuses and one-line errors."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitviz.cli import main

SAMPLES = sorted((Path(__file__).resolve().parent.parent / "vitviz" / "assets").glob("*.png"))


@pytest.fixture
def no_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torchhub"))


def test_rollout_writes_png_and_npy(tmp_path, capsys):
    code = main(["rollout", str(SAMPLES[0]), "--model", "ti16", "--random", "--image-size", "96",
                 "--discard-ratio", "0.9", "--bare", "--out", str(tmp_path)])
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
    # vitviz.cli re-exports main(), the function, under the module's name: import the module itself
    code = ("import importlib, sys\nc = importlib.import_module('vitviz.cli')\n"
            "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'timm', 'transformers', 'cv2') if m in sys.modules]\n"
            "print('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in out.stdout
    assert "vitviz rollout cat.jpg --model b16" in out.stdout  # the worked example
    assert "3 internal error" in out.stdout  # every exit status is documented


def test_console_script_demo(tmp_path):
    exe = Path(sys.executable).with_name("vitviz")
    out = subprocess.run([str(exe), "demo", "--out", str(tmp_path / "demo")], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert len(list((tmp_path / "demo").glob("*_rollout.png"))) == len(SAMPLES)


# ---------------------------------------------------------------------------------------------
# exit status 3, file modes, every path reported, model names in file names
# ---------------------------------------------------------------------------------------------

def test_unexpected_exception_is_exit_3_one_line(monkeypatch, capsys):
    """An error vitviz did not raise on purpose (a bug) is one line, exit status 3; --debug
    shows the traceback."""
    from vitviz.cli.commands import models as models_command

    def broken(args):
        return {}["missing"]  # a KeyError from inside a command

    monkeypatch.setattr(models_command, "run", broken)
    assert main(["models"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vitviz: error: KeyError") and "--debug" in err
    with pytest.raises(KeyError):
        main(["models", "--debug"])


@pytest.fixture
def umask():
    """Set the process umask for one test (restored after)."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writer_honours_the_umask(umask, mask, mode, tmp_path):
    from vitviz._util.files import atomic_write_bytes, save_npy

    umask(mask)
    a = atomic_write_bytes(tmp_path / "a.bin", b"x")
    b = save_npy(tmp_path / "sub" / "b.npy", np.zeros(2))
    c = atomic_write_bytes(tmp_path / "a.bin", b"again")  # replacing a file: the same rule
    for p in (a, b, c):
        assert stat.S_IMODE(p.stat().st_mode) == mode, p
    assert a.read_bytes() == b"again"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.bin", "b.npy", "sub"]  # no temporary left


def test_cli_files_honour_the_umask(umask, tmp_path, capsys):
    umask(0o022)
    out = tmp_path / "maps"
    assert main(["rollout", str(SAMPLES[0]), "--model", "shapes-vit", "--out", str(out)]) == 0
    files = sorted(out.iterdir())
    assert [p.name for p in files] == [f"{SAMPLES[0].stem}_rollout.npy", f"{SAMPLES[0].stem}_rollout.png"]
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}


def test_every_written_path_is_printed(tmp_path, capsys):
    out = tmp_path / "maps"
    assert main(["rollout", *map(str, SAMPLES), "--model", "shapes-vit", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    written = sorted(out.iterdir())
    assert len(written) == 2 * len(SAMPLES) and len(lines) == len(written)
    for src in SAMPLES:
        npy, png = out / f"{src.stem}_rollout.npy", out / f"{src.stem}_rollout.png"
        assert f"{src} -> {npy}" in lines
        # the image's last file carries the prediction, as before
        assert any(line.startswith(f"{src} -> {png}  [") for line in lines)


def test_name_with_model_keeps_two_models_apart(tmp_path, capsys):
    """Two models writing to one --out: with --name-with-model each file name carries the model
    (and its weights: --random), nothing is overwritten and no staging folder is left."""
    out = tmp_path / "maps"
    stem = SAMPLES[0].stem
    tiny = ["--model", "ti16", "--random", "--image-size", "32"]
    assert main(["rollout", str(SAMPLES[0]), "--model", "shapes-vit", "--out", str(out), "--name-with-model"]) == 0
    first = np.load(out / f"{stem}_shapes-vit_rollout.npy")
    assert main(["rollout", str(SAMPLES[0]), *tiny, "--out", str(out), "--name-with-model"]) == 0
    assert main(["cls", str(SAMPLES[0]), *tiny, "--out", str(out), "--name-with-model", "--dpi", "50"]) == 0
    assert main(["relevance", str(SAMPLES[0]), "--model", "shapes-vit", "--out", str(out),
                 "--name-with-model"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{stem}_{tag}_{what}{ext}" for tag, what in [("shapes-vit", "rollout"), ("ti16-random", "rollout"),
                                                        ("ti16-random", "cls"), ("shapes-vit", "relevance")]
        for ext in (".npy", ".png"))
    assert np.array_equal(np.load(out / f"{stem}_shapes-vit_rollout.npy"), first)
    assert np.load(out / f"{stem}_ti16-random_rollout.npy").shape == (2, 2)
    printed = capsys.readouterr().out
    assert f"-> {out / (stem + '_ti16-random_rollout.npy')}" in printed
    assert f"-> {out / (stem + '_shapes-vit_relevance.png')}" in printed
    # without the option the names stay as they were
    assert main(["rollout", str(SAMPLES[0]), "--model", "shapes-vit", "--out", str(tmp_path / "plain")]) == 0
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == [f"{stem}_rollout.npy", f"{stem}_rollout.png"]


def test_name_with_model_is_documented_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["rollout", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--name-with-model" in text and "<name>_<model>_<what>" in text


def test_name_with_model_on_a_single_explorer_page_is_refused(tmp_path, capsys):
    code = main(["explore", str(SAMPLES[0]), "--model", "shapes-vit", "--out", str(tmp_path / "p.html"),
                 "--name-with-model"])
    assert code == 2 and "--name-with-model" in capsys.readouterr().err
    assert not (tmp_path / "p.html").exists()
