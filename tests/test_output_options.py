"""Every figure each command writes, opened: for the bundled models and a tiny timm model.

The figures are read back before saving (no two text labels overlap, every panel at least
PANEL_IN inches at the dpi), the files after (sizes, valid PDF / SVG naming their text);
`--norm batch` gives equal values equal colours in two images; bad output options are one
line and exit status 2.
"""

import unittest.mock
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from _figcheck import overlapping_labels, panel_sizes
from PIL import Image

import vitviz
from vitviz.cli import main
from vitviz.render import figures as F
from vitviz.render import output as output_module
from vitviz.render._overlay import display_image

SAMPLES = sorted((Path(__file__).resolve().parent.parent / "vitviz" / "assets").glob("*.png"))
TINY = ["--model", "ti16", "--random", "--image-size", "64"]  # 12 layers, 3 heads, 4x4 patches
VIT = ["--model", "shapes-vit"]


@pytest.fixture
def figures(monkeypatch):
    """Every figure the commands save, with the dpi and format it is saved at."""
    seen = []
    original = output_module.save_figure

    def spy(fig, path, *, dpi=F.DPI, format=None):
        seen.append((Path(path).stem, fig, dpi))
        return original(fig, path, dpi=dpi, format=format)

    monkeypatch.setattr(output_module, "save_figure", spy)
    return seen


def check_figures(seen, expected_stems):
    assert sorted(s for s, _, _ in seen) == sorted(expected_stems)
    for stem, fig, dpi in seen:
        assert overlapping_labels(fig) == [], stem
        sizes = panel_sizes(fig)
        for w, h in sizes:
            assert max(w, h) >= 0.98 * F.PANEL_IN * dpi, (stem, w, h)


def check_files(out: Path, fmt: str, dpi: int, min_overlay: int = 256):
    """Open every file written: overlays raster and large enough, figures valid in ``fmt``."""
    files = [p for p in out.iterdir() if p.suffix not in (".npy", ".json")]
    assert files and not list(out.glob(".*tmp"))
    for p in files:
        overlay = p.stem.endswith(("_rollout", "_relevance", "_grad_rollout", "_flow"))
        if overlay:
            assert p.suffix == (".jpg" if fmt == "jpg" else ".png"), p
            img = Image.open(p)
            assert min(img.size) >= min_overlay, (p, img.size)
            assert np.asarray(img.convert("RGB")).std() > 5, p
        else:
            assert p.suffix == f".{fmt}", p
            check_figure_file(p, fmt, dpi)
    return files


def check_figure_file(p: Path, fmt: str, dpi: int):
    data = p.read_bytes()
    if fmt == "pdf":
        import pypdf

        assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
        reader = pypdf.PdfReader(str(p))
        text = reader.pages[0].extract_text()
        box = reader.pages[0].mediabox
        assert min(float(box.width), float(box.height)) >= 0.98 * F.PANEL_IN * 72, p  # points
        assert len(text.strip()) > 0, p
        return text
    if fmt == "svg":
        root = ET.fromstring(data)
        assert root.tag.endswith("svg")
        words = " ".join("".join(e.itertext()) for e in root.iter() if e.tag.endswith("text"))
        assert words.strip(), p
        width = float(root.get("width").rstrip("pt"))
        assert width >= 0.98 * F.PANEL_IN * 72, p
        return words
    img = Image.open(p)
    assert min(img.size) >= 0.98 * F.PANEL_IN * dpi, (p, img.size)
    return None


def run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out


def test_bundled_classifier_every_command_pdf(tmp_path, figures, capsys):
    out = tmp_path / "o"
    a, b = str(SAMPLES[0]), str(SAMPLES[1])
    common = ["--out", str(out), "--format", "pdf"]
    for args in (["rollout", a, b, *VIT, "--colorbar"], ["relevance", a, *VIT],
                 ["cls", a, *VIT, "--mask", "0.6", "--colorbar"], ["flow", a, *VIT, "--colorbar"],
                 ["posembed", *VIT], ["heads", a, b, *VIT]):
        code, _ = run([*args, *common], capsys)
        assert code == 0, args
    sa, sb = SAMPLES[0].stem, SAMPLES[1].stem
    # single overlays are figures by default (title, colour bar): read back like every other figure
    check_figures(figures, [f"{sa}_rollout", f"{sb}_rollout", f"{sa}_relevance", f"{sa}_cls", f"{sa}_mask",
                            f"{sa}_flow_panels", f"{sa}_flow", "shapes-vit_posembed", f"{sa}_heads", f"{sb}_heads",
                            "heads_mean"])
    check_files(out, "pdf", 100)
    import pypdf

    text = pypdf.PdfReader(str(out / f"{sa}_flow_panels.pdf")).pages[0].extract_text()
    assert "rollout" in text and "attention flow" in text
    grid = pypdf.PdfReader(str(out / f"{sa}_cls.pdf")).pages[0].extract_text()
    assert "layer 3" in grid and "head 3" in grid


def test_tiny_timm_model_every_command_svg(tmp_path, figures, capsys):
    out = tmp_path / "o"
    a = str(SAMPLES[0])
    common = ["--out", str(out), "--format", "svg", "--dpi", "150"]
    for args in (["rollout", a, *TINY], ["relevance", a, *TINY, "--class", "3"], ["cls", a, *TINY],
                 ["flow", a, *TINY, "--norm", "none"], ["posembed", *TINY], ["heads", a, *TINY]):
        torch.manual_seed(0)
        code, _ = run([*args, *common], capsys)
        assert code == 0, args
    sa = SAMPLES[0].stem
    check_figures(figures, [f"{sa}_rollout", f"{sa}_relevance", f"{sa}_cls", f"{sa}_flow", f"{sa}_flow_panels",
                            "ti16_posembed", f"{sa}_heads"])
    check_files(out, "svg", 150)
    root = ET.parse(out / f"{sa}_cls.svg").getroot()
    words = " ".join("".join(e.itertext()) for e in root.iter() if e.tag.endswith("text"))
    assert "layer 11" in words and "head 2" in words


def test_bundled_captioner_strip(tmp_path, figures, capsys):
    out = tmp_path / "o"
    code, res = run(["caption", str(SAMPLES[0]), str(SAMPLES[1]), "--model", "shapes-captioner",
                     "--out", str(out), "--norm", "batch", "--colorbar", "--dpi", "120"], capsys)
    assert code == 0, res.err
    check_figures(figures, [f"{s.stem}_caption" for s in SAMPLES[:2]])
    check_files(out, "png", 120)
    # one scale for both strips: the colour bar states the same values
    labels = {tuple(fig.axes[-1].get_yticks()) for _, fig, _ in figures}
    assert len(labels) == 1


def test_norm_batch_same_value_same_colour_across_images(tmp_path, capsys):
    """The overlays of a --norm batch run equal vitviz.overlay with the run's min and max."""
    out = tmp_path / "o"
    code, _ = run(["rollout", str(SAMPLES[0]), str(SAMPLES[1]), *VIT, "--norm", "batch", "--alpha", "1",
                   "--bare", "--out", str(out)], capsys)
    assert code == 0
    model = vitviz.load_model("shapes-vit")
    heats = [np.load(out / f"{s.stem}_rollout.npy") for s in SAMPLES[:2]]
    lo, hi = min(h.min() for h in heats), max(h.max() for h in heats)
    assert heats[0].max() != heats[1].max()  # two different ranges: a shared scale changes something
    for s, h in zip(SAMPLES[:2], heats):
        view = display_image(model.preprocessor.view(vitviz.load_image(s)))
        expected = vitviz.overlay(view, h, alpha=1.0, vmin=lo, vmax=hi)
        got = np.asarray(Image.open(out / f"{s.stem}_rollout.png").convert("RGB"))
        assert np.array_equal(got, expected)
        own = vitviz.overlay(view, h, alpha=1.0)  # per-image scale: another picture
        assert not np.array_equal(got, own)


def test_norm_batch_single_image_says_nothing_is_shared(tmp_path, capsys):
    code, res = run(["rollout", str(SAMPLES[0]), *VIT, "--norm", "batch", "--out", str(tmp_path)], capsys)
    assert code == 0 and "nothing is shared" in res.err


def test_size_and_jpg_overlays(tmp_path, capsys):
    code, _ = run(["rollout", str(SAMPLES[0]), *VIT, "--size", "100", "--format", "jpg", "--bare", "--out",
                   str(tmp_path)], capsys)
    assert code == 0
    img = Image.open(tmp_path / f"{SAMPLES[0].stem}_rollout.jpg")
    assert img.format == "JPEG" and img.size == (100, 100)


def test_constant_map_is_drawn_flat_with_a_note(tmp_path):
    from vitviz.batch import map_files
    from vitviz.render.output import OutputOptions

    model = vitviz.load_model("shapes-vit")
    opts = OutputOptions(bare=True)
    outcomes = map_files(model, [SAMPLES[0]], tmp_path, lambda x: (torch.full((x.shape[0], 8, 8), 0.25), None),
                         suffix="const", output=opts, progress=False)
    assert outcomes[0].ok and any("constant" in n for n in opts.notes)
    pic = np.asarray(Image.open(tmp_path / f"{SAMPLES[0].stem}_const.png").convert("RGB"))
    assert pic.shape == (256, 256, 3)
    # flat: every value at the bottom of the scale, which the default opacity leaves as the image
    view = display_image(model.preprocessor.view(vitviz.load_image(SAMPLES[0])))
    np.testing.assert_array_equal(pic, view)


@pytest.mark.parametrize("extra, needle", [
    (["--format", "gif"], "--format must be one of png, jpg, pdf, svg"),
    (["--dpi", "10"], "--dpi must be in 50..600"),
    (["--dpi", "5000"], "--dpi must be in 50..600"),
    (["--size", "4"], "--size must be in"),
    (["--norm", "global"], "--norm must be one of image, batch, none"),
])
def test_bad_output_options_exit_2_one_line(extra, needle, tmp_path, capsys):
    for cmd in (["rollout", str(SAMPLES[0]), *VIT], ["cls", str(SAMPLES[0]), *VIT]):
        code, res = run([*cmd, *extra, "--out", str(tmp_path)], capsys)
        assert code == 2 and needle in res.err and len(res.err.strip().splitlines()) == 1, res.err
    if extra[0] in ("--format", "--dpi"):  # figure-only commands take these two
        code, res = run(["posembed", *VIT, *extra, "--out", str(tmp_path)], capsys)
        assert code == 2 and needle in res.err and len(res.err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())  # nothing written


def test_gallery_norm_none_is_one_fixed_scale(tmp_path, capsys):
    import shutil

    from vitviz.errors import VitvizError

    src = tmp_path / "src"
    src.mkdir()
    for s in SAMPLES[:2]:
        shutil.copy(s, src / s.name)
    model = vitviz.load_model("shapes-vit")
    out = tmp_path / "g"
    res = vitviz.build_gallery(src, model, out, methods=["rollout"], norm="none", cmap="jet", alpha=1.0,
                               workers=0, progress=False)
    assert res.exit_code == 0
    for s in SAMPLES[:2]:
        heat = np.load(out / "rollout" / f"{s.stem}.npy")
        view = vitviz.render.display_image(model.preprocessor.view(vitviz.load_image(s)))  # as the gallery shows it
        got = np.asarray(Image.open(out / "rollout" / f"{s.stem}.jpg").convert("RGB")).astype(int)  # JPEG
        assert np.abs(got - vitviz.overlay(view, heat, cmap="jet", alpha=1.0, vmin=0.0, vmax=1.0)).mean() < 2
        assert np.abs(got - vitviz.overlay(view, heat, cmap="jet", alpha=1.0)).mean() > 20  # not min-max per image
    with pytest.raises(VitvizError, match="norm"):  # resuming with another scale is refused
        vitviz.build_gallery(src, model, out, methods=["rollout"], cmap="jet", alpha=1.0, workers=0,
                             progress=False)
    with pytest.raises(VitvizError, match="'image' or 'none'"):
        vitviz.build_gallery(src, model, tmp_path / "g2", methods=["rollout"], norm="batch", workers=0,
                             progress=False)
    code, res = run(["gallery", str(src), *VIT, "--out", str(tmp_path / "g3"), "--norm", "batch"], capsys)
    assert code == 2 and "--norm must be image or none" in res.err and len(res.err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# no option dropped silently: --on-original with --colorbar / --size
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cmd", ["rollout", "relevance"])
def test_on_original_refuses_the_size_it_cannot_honour(cmd, tmp_path, capsys):
    code, res = run([cmd, str(SAMPLES[0]), *VIT, "--on-original", "--size", "300", "--out", str(tmp_path)],
                    capsys)
    assert code == 2 and "--size does not apply to --on-original" in res.err, res.err
    assert len(res.err.strip().splitlines()) == 1, res.err
    assert not any(tmp_path.iterdir())  # refused before any work


@pytest.mark.parametrize("cmd", ["rollout", "relevance"])
def test_on_original_draws_the_colour_bar(cmd, tmp_path, capsys):
    """--on-original: the photo at its own size with a bar beside it (wider than the photo) by default
    and with the old --colorbar, where --on-original --bare writes exactly the photo's size."""
    plain, barred, old = tmp_path / "plain", tmp_path / "barred", tmp_path / "old"
    assert run([cmd, str(SAMPLES[0]), *VIT, "--on-original", "--bare", "--out", str(plain)], capsys)[0] == 0
    assert run([cmd, str(SAMPLES[0]), *VIT, "--on-original", "--out", str(barred)], capsys)[0] == 0
    assert run([cmd, str(SAMPLES[0]), *VIT, "--on-original", "--colorbar", "--out", str(old)], capsys)[0] == 0
    (p,) = sorted(plain.glob("*.png"))
    (b,) = sorted(barred.glob("*.png"))
    (o,) = sorted(old.glob("*.png"))
    photo = Image.open(SAMPLES[0]).size
    assert Image.open(p).size == photo
    assert Image.open(b).size[0] > Image.open(p).size[0] * 1.05  # the bar is drawn, not dropped
    assert Image.open(o).size == Image.open(b).size  # --colorbar is the default now


def test_original_overlay_with_a_colour_bar(tmp_path):
    """OutputOptions.save_original_overlay: the photo at its own size, coloured exactly as
    overlay_region colours it, next to a colour bar of the map's own range."""
    from vitviz.render import overlay_region
    from vitviz.render.output import OutputOptions

    rng = np.random.default_rng(0)
    photo = rng.integers(0, 255, (300, 420, 3), dtype=np.uint8)
    heat = rng.random((4, 4)).astype(np.float32)
    box = (60.0, 0.0, 360.0, 300.0)  # a centre crop
    plain = OutputOptions(bare=True).save_original_overlay(tmp_path / "plain", photo, heat, box)
    assert plain.name == "plain.png"
    np.testing.assert_array_equal(np.asarray(Image.open(plain).convert("RGB")), overlay_region(photo, heat, box))

    seen = []
    original = output_module.save_figure

    def spy(fig, path, *, dpi=F.DPI, format=None):
        seen.append(fig)
        return original(fig, path, dpi=dpi, format=format)

    with unittest.mock.patch.object(output_module, "save_figure", spy):
        barred = OutputOptions(colorbar=True).save_original_overlay(tmp_path / "bar", photo, heat, box,
                                                                   label="rollout")
    assert barred.name == "bar.png" and len(seen) == 1
    fig = seen[0]
    image_axes = [ax for ax in fig.axes if ax.images and ax.images[0].get_array().ndim == 3]
    (shown,) = [ax.images[0].get_array() for ax in image_axes]
    np.testing.assert_array_equal(np.asarray(shown)[:300, :420], overlay_region(photo, heat, box))
    (bar,) = [ax for ax in fig.axes if ax not in image_axes]  # the colour bar: the map's own min..max
    lo, hi = bar.get_ylim()
    assert lo == pytest.approx(float(heat.min()), abs=1e-6) and hi == pytest.approx(float(heat.max()), abs=1e-6)
    assert "rollout" in bar.get_ylabel()
    assert Image.open(barred).size[0] > 420  # the picture and the bar beside it
