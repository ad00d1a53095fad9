"""The gallery's `text` method (--texts): one map per text per image, equal to vitviz.explain_text."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import vitviz
from vitviz.cli import main
from vitviz.errors import VitvizError
from vitviz.gallery import build_gallery, list_methods

ASSETS = Path(__file__).resolve().parent.parent / "vitviz" / "assets"
TEXTS = ["a yellow triangle", "a red circle"]


@pytest.fixture()
def folder(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for p in ASSETS.glob("*.png"):
        shutil.copy(p, d / p.name)
    return d


def test_text_method_maps_equal_explain_text(folder, tmp_path):
    assert "text" in list_methods()
    torch.manual_seed(0)
    m = vitviz.load_model("shapes-clip", pretrained=False)
    r = build_gallery(folder, m, tmp_path / "g", methods="text",
                      options={"text": {"texts": TEXTS, "method": "legrad"}}, batch_size=2, workers=0,
                      progress=False)
    assert r.exit_code == 0 and len(r.done) == 2
    for rec in r.done:
        out = rec["outputs"]["text"]
        assert [n.rsplit(" (", 1)[0] for n in out["names"]] == TEXTS
        expected = vitviz.explain_text(m, m.preprocess(folder / rec["key"]), TEXTS, method="legrad")
        np.testing.assert_allclose(np.load(tmp_path / "g" / out["npy"]), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_text_method_needs_texts(folder, tmp_path, capsys):
    m = vitviz.load_model("shapes-clip", pretrained=False)
    with pytest.raises(VitvizError, match="--texts"):
        build_gallery(folder, m, tmp_path / "g", methods="text", workers=0, progress=False)
    assert main(["gallery", str(folder), "--model", "shapes-clip", "--random", "--methods", "text",
                 "--out", str(tmp_path / "c")]) == 2
    assert "--texts" in capsys.readouterr().err


def test_text_gallery_cli(folder, tmp_path):
    code = main(["gallery", str(folder), "--model", "shapes-clip", "--random", "--methods", "text",
                 "--texts", *TEXTS, "--out", str(tmp_path / "c"), "--workers", "0", "--no-progress"])
    assert code == 0
    assert len(list((tmp_path / "c" / "text").glob("*.npy"))) == 2
