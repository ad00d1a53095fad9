"""Single overlays carry a title and a colour bar by default; --bare writes the plain pixels
(issue 30). Layers are numbered from 0 in the titles, as `layer=` of the API."""

from pathlib import Path

import numpy as np
import pytest
from _figcheck import drawn_texts, overlapping_labels
from PIL import Image

import vitviz
from vitviz.cli import main
from vitviz.render import figures as F
from vitviz.render import output as output_module
from vitviz.render._overlay import display_image

SAMPLES = sorted((Path(__file__).resolve().parent.parent / "vitviz" / "assets").glob("*.png"))
TRIANGLE = next(s for s in SAMPLES if "triangle" in s.name)
VIT = ["--model", "shapes-vit"]  # 4 layers, 8x8 patches


@pytest.fixture
def saved(monkeypatch):
    seen = {}
    original = output_module.save_figure

    def spy(fig, path, *, dpi=F.DPI, format=None):
        seen[Path(path).stem] = fig
        return original(fig, path, dpi=dpi, format=format)

    monkeypatch.setattr(output_module, "save_figure", spy)
    return seen


def texts(fig) -> str:
    return " | ".join(t for t, _ in drawn_texts(fig))


@pytest.mark.parametrize("cmd, args, first, second", [
    ("rollout", [], "rollout · shapes-vit · layers 0–3 · 8×8 patches", "predicted: triangle (p="),
    ("relevance", ["--class", "triangle"], "relevance (chefer) · shapes-vit · layers 0–3 · 8×8 patches",
     "explained: triangle (class 2, p="),
    ("flow", [], "attention flow · shapes-vit · layers 0–3 · 8×8 patches", ""),  # flow: no class
])
def test_title_and_colour_bar_by_default(cmd, args, first, second, tmp_path, saved, capsys):
    assert main([cmd, str(TRIANGLE), *VIT, *args, "--out", str(tmp_path)]) == 0, capsys.readouterr().err
    suffix = {"rollout": "rollout", "relevance": "relevance", "flow": "flow"}[cmd]
    fig = saved[f"{TRIANGLE.stem}_{suffix}"]
    words = " ".join(texts(fig).split())  # lines joined: the title is wrapped to the figure
    assert first in words and second in words, words
    assert len(fig.axes) == 2  # the overlay and its colour bar
    assert overlapping_labels(fig) == []
    w, h = Image.open(tmp_path / f"{TRIANGLE.stem}_{suffix}.png").size
    assert w > 256 * 1.2 and h > 256  # the bar beside and the title above the 256 px overlay


def test_bare_writes_the_plain_overlay(tmp_path, saved):
    assert main(["rollout", str(TRIANGLE), *VIT, "--bare", "--out", str(tmp_path)]) == 0
    assert f"{TRIANGLE.stem}_rollout" not in saved  # no figure
    heat = np.load(tmp_path / f"{TRIANGLE.stem}_rollout.npy")
    got = np.asarray(Image.open(tmp_path / f"{TRIANGLE.stem}_rollout.png").convert("RGB"))
    view = display_image(vitviz.load_model("shapes-vit").preprocessor.view(vitviz.load_image(TRIANGLE)))
    np.testing.assert_array_equal(got, vitviz.overlay(view, heat))
    classic = tmp_path / "classic"
    assert main(["rollout", str(TRIANGLE), *VIT, "--bare", "--cmap", "jet", "--alpha", "0.5", "--smooth",
                 "--out", str(classic)]) == 0
    got = np.asarray(Image.open(classic / f"{TRIANGLE.stem}_rollout.png").convert("RGB"))
    np.testing.assert_array_equal(got, vitviz.overlay(view, heat, cmap="jet", alpha=0.5, smooth=True))


def test_grid_figures_lose_their_colour_bar_with_bare(tmp_path, saved):
    assert main(["cls", str(TRIANGLE), *VIT, "--out", str(tmp_path / "a")]) == 0
    with_bar = len(saved[f"{TRIANGLE.stem}_cls"].axes)
    assert main(["cls", str(TRIANGLE), *VIT, "--bare", "--out", str(tmp_path / "b")]) == 0
    assert len(saved[f"{TRIANGLE.stem}_cls"].axes) == with_bar - 1
    assert "layer 0" in texts(saved[f"{TRIANGLE.stem}_cls"]) and "layer 4" not in texts(saved[f"{TRIANGLE.stem}_cls"])


@pytest.mark.parametrize("bad", ["1.5", "-0.1"])
def test_bad_alpha_is_one_line(bad, tmp_path, capsys):
    code = main(["rollout", str(TRIANGLE), *VIT, "--alpha", bad, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "--alpha must be in [0, 1]" in err and len(err.strip().splitlines()) == 1


def test_demo_captions_have_no_literal_backticks():
    from vitviz.zoo.demo import _page

    page = _page([("files", "made with `vitviz demo`", [("a.png", "a.png", "run `vitviz rollout a.png` <b>")])])
    assert "`" not in page
    assert "<code>vitviz rollout a.png</code>" in page and "<code>vitviz demo</code>" in page
    assert "&lt;b&gt;" in page  # still escaped
    odd = _page([("t", "", [("n", "f", "one ` alone")])])
    assert "one ` alone" in odd  # an unpaired backtick is kept as written
