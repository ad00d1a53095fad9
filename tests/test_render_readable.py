"""Figures a person can read and a paper can print (issue 19).

Golden values of the scale rules (vmin / vmax, norm image|batch|none, constant maps), the
display size of overlays, figures read back before saving (no two labels overlap, every panel at
least PANEL_IN inches at the dpi), valid PDF / SVG / JPEG files that keep their text, and the
command line's output options and errors.
"""

import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from _figcheck import drawn_texts, overlapping_labels, panel_sizes, texts_inside_figure
from PIL import Image

import vitviz
from vitviz.errors import RenderError, VitvizError
from vitviz.render import figures as F
from vitviz.render._caption_strip import caption_strip
from vitviz.render._overlay import colormap_lut, display_image, map_scales, scale_map
from vitviz.render.output import OutputOptions

IMAGE = np.zeros((64, 64, 3), dtype=np.uint8)
IMAGE[:, :32] = (200, 40, 40)
IMAGE[20:44, 40:60] = (40, 40, 200)
WIDE = np.full((70, 90, 3), 120, dtype=np.uint8)


def rand(seed, *shape):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- scale: golden values


def test_overlay_vmin_vmax_golden_gray():
    heat = np.full((4, 4), 1.0, dtype=np.float32)
    # (1 - 0) / (2 - 0) = 0.5 -> gray level rint(127.5) = 128, alpha 1: the colour alone
    out = vitviz.overlay(IMAGE, heat, cmap="gray", alpha=1.0, vmin=0.0, vmax=2.0)
    assert out.dtype == np.uint8 and out.shape == IMAGE.shape
    assert (out == 128).all()
    # alpha 0.5 over black: rint(0.5 * 128) = 64
    black = np.zeros_like(IMAGE)
    assert (vitviz.overlay(black, heat, cmap="gray", alpha=0.5, vmin=0.0, vmax=2.0) == 64).all()
    # clipped outside [vmin, vmax]
    assert (vitviz.overlay(IMAGE, heat, cmap="gray", alpha=1.0, vmin=2.0, vmax=3.0) == 0).all()
    assert (vitviz.overlay(IMAGE, heat, cmap="gray", alpha=1.0, vmin=-1.0, vmax=0.5) == 255).all()


def test_overlay_is_backward_compatible():
    heat = rand(0, 5, 5)
    old = vitviz.overlay(IMAGE, heat)  # per-image min-max, as before
    assert np.array_equal(old, vitviz.overlay(IMAGE, heat, vmin=float(heat.min()), vmax=float(heat.max())))
    assert np.array_equal(vitviz.overlay(IMAGE, heat, alpha=0.0), IMAGE)  # alpha=0: the image
    assert np.array_equal(vitviz.overlay(IMAGE, heat, alpha=0.0, vmin=0, vmax=9), IMAGE)
    from vitviz.render import normalize_map

    golden = np.array([[0.0, 0.5], [0.25, 1.0]], dtype=np.float32)  # (h - 1) / (5 - 1)
    assert np.array_equal(normalize_map(np.array([[1.0, 3.0], [2.0, 5.0]])), golden)
    assert np.array_equal(scale_map(np.array([[1.0, 3.0], [2.0, 5.0]]), 1.0, 5.0), golden)


def test_constant_map_is_flat_not_nan():
    flat = np.full((4, 4), 0.37, dtype=np.float32)
    out = vitviz.overlay(IMAGE, flat, cmap="gray", alpha=1.0)
    assert (out == 0).all()  # the lowest colour, no division by zero
    assert (vitviz.overlay(IMAGE, flat, cmap="jet", alpha=1.0) == colormap_lut("jet")[0]).all()
    assert np.array_equal(vitviz.overlay(IMAGE, flat), IMAGE)  # default opacity: the bottom leaves the image
    scales, notes = map_scales([flat, rand(1, 4, 4)], "image")
    assert scales[0].flat and not scales[1].flat
    assert any("constant" in n for n in notes)
    fig, ax = F.panels(IMAGE, {"flat": flat, "rollout": rand(2, 4, 4)})
    assert [t.get_text() for t in ax.get_xticklabels()][1] == "flat (constant map)"


def test_bad_scales_are_typed_errors():
    heat = rand(3, 4, 4)
    with pytest.raises(RenderError, match="vmin must not exceed vmax"):
        vitviz.overlay(IMAGE, heat, vmin=1.0, vmax=0.0)
    with pytest.raises(RenderError, match="NaN"):
        vitviz.overlay(IMAGE, np.full((2, 2), np.nan))
    with pytest.raises(RenderError, match="norm must be one of"):
        map_scales([heat], "global")
    with pytest.raises(ValueError):  # RenderError is a ValueError too: old handlers still work
        vitviz.overlay(IMAGE, heat, alpha=2.0)
    assert issubclass(RenderError, VitvizError)


def test_map_scales_golden():
    a = np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32)
    b = np.array([[2.0, 3.0], [4.0, 2.5]], dtype=np.float32)
    img, _ = map_scales([a, b], "image")
    assert [(s.vmin, s.vmax) for s in img] == [(0.0, 1.0), (2.0, 4.0)]
    bat, notes = map_scales([a, b], "batch")
    assert [(s.vmin, s.vmax) for s in bat] == [(0.0, 4.0), (0.0, 4.0)] and notes == []
    none, notes = map_scales([a, b], "none")
    assert [(s.vmin, s.vmax) for s in none] == [(0.0, 1.0), (0.0, 1.0)]
    assert any("clipped" in n for n in notes)  # b lies outside [0, 1]
    one, notes = map_scales([b], "batch")
    assert (one[0].vmin, one[0].vmax) == (2.0, 4.0) and any("nothing is shared" in n for n in notes)


def test_batch_norm_same_value_same_colour_in_two_images():
    """One region of value 0.3 in two maps of different ranges: the same colour with a shared
    scale, different colours with per-image scales."""
    a = np.linspace(0.0, 0.6, 64, dtype=np.float32).reshape(8, 8)
    b = np.linspace(0.1, 1.0, 64, dtype=np.float32).reshape(8, 8)
    a[:4, :4] = b[:4, :4] = 0.3  # bicubic support of the quadrant's centre: all 0.3
    a[-1, 0] = 0.0  # the run's scale: 0 (min of a) .. 1 (max of b)
    img_a, img_b = IMAGE, np.full_like(IMAGE, 255)
    scales, _ = map_scales([a, b], "batch")
    assert (scales[0].vmin, scales[0].vmax) == (0.0, 1.0)
    oa = vitviz.overlay(img_a, a, alpha=1.0, vmin=scales[0].vmin, vmax=scales[0].vmax)
    ob = vitviz.overlay(img_b, b, alpha=1.0, vmin=scales[1].vmin, vmax=scales[1].vmax)
    y = x = 16  # the centre of the top-left quadrant of the 64 px image (patch 1.5, 1.5)
    assert np.array_equal(oa[y, x], ob[y, x])
    assert np.array_equal(oa[y, x], colormap_lut()[76])  # rint(0.3 * 255), the default colour map
    pa, pb = vitviz.overlay(img_a, a, alpha=1.0), vitviz.overlay(img_b, b, alpha=1.0)  # per image
    assert not np.array_equal(pa[y, x], pb[y, x])


# ---------------------------------------------------------------- display size


def test_display_image_sizes():
    big = display_image(IMAGE)
    assert big.shape == (256, 256, 3)
    assert np.array_equal(big[::4, ::4], IMAGE) and np.array_equal(big[3::4, 3::4], IMAGE)  # 4x4 blocks
    assert display_image(np.zeros((96, 96, 3), np.uint8)).shape == (288, 288, 3)  # 3x reaches 256
    assert display_image(np.zeros((224, 224, 3), np.uint8)).shape == (256, 256, 3)  # over half: exactly 256
    assert display_image(np.zeros((200, 300, 3), np.uint8)).shape == (256, 384, 3)
    photo = np.zeros((300, 400, 3), np.uint8)
    assert display_image(photo) is photo or np.array_equal(display_image(photo), photo)
    assert display_image(photo, size=150).shape == (150, 200, 3)
    assert display_image(WIDE, size=140).shape == (140, 180, 3)
    for bad in (0, 5, 100000):
        with pytest.raises(RenderError, match="size must be in"):
            display_image(IMAGE, size=bad)


# ---------------------------------------------------------------- figures read back


LONG = "a title long enough to run into the next panel if nothing wrapped it"


def figures_to_check(dpi):
    m = rand(4, 3, 4, 3, 3)
    yield "map_grid", F.map_grid(m, IMAGE, row_labels=[f"layer {i}" for i in range(3)],
                                 col_labels=[f"head {h} {LONG}" for h in range(4)], title=LONG * 2,
                                 colorbar=True, dpi=dpi)[0]
    yield "map_grid no image", F.map_grid(m, row_labels=["a", "b", "c"], col_labels=list("wxyz"),
                                          norm="batch", colorbar=True, dpi=dpi)[0]
    yield "panels", F.panels(IMAGE, [(LONG, rand(5, 4, 4)), ("attention flow", rand(6, 4, 4)),
                                     ("x", rand(7, 4, 4))], colorbar=True, dpi=dpi)[0]
    yield "panels wide", F.panels(WIDE, {"rollout": rand(8, 4, 5)}, norm="none", colorbar=True, dpi=dpi)[0]
    words = ["a", "yellow", "triangle", "below", "an", "extraordinarily-long-hyphenated-word", "circle"]
    yield "caption_strip", caption_strip(IMAGE, rand(9, len(words), 4, 4), words, title=LONG * 3,
                                         colorbar=True, dpi=dpi)[0]
    e = torch.nn.functional.normalize(torch.randn(16, 8), dim=-1)
    yield "pos_similarity_grid", F.pos_similarity_grid((e @ e.T).reshape(16, 4, 4), title=LONG, dpi=dpi)[0]
    yield "distance_plot", F.distance_plot(rand(10, 12, 12) * 100, dpi=dpi)[0]
    yield "heatmap", F.heatmap(rand(11, 12, 12), label="entropy (nats) of every head", title=LONG, dpi=dpi)[0]
    masks = rand(12, 6, 4, 4) > 0.5
    yield "mask_contours", F.mask_contours(IMAGE, masks, labels=[f"head {h}" for h in range(6)],
                                           title=LONG, dpi=dpi)[0]
    yield "overlay_figure", F.overlay_figure(display_image(IMAGE), rand(13, 4, 4), label="rollout",
                                             title=LONG, dpi=dpi)[0]


@pytest.mark.parametrize("dpi", [100, 200])
def test_no_two_labels_overlap_and_panels_are_large(dpi):
    for name, fig in figures_to_check(dpi):
        texts = drawn_texts(fig)
        assert len(texts) >= 1, name
        assert overlapping_labels(fig) == [], name
        assert texts_inside_figure(fig) == [], name
        sizes = panel_sizes(fig)
        if name not in ("distance_plot", "heatmap"):
            assert sizes, name
        for w, h in sizes:
            assert max(w, h) >= 0.98 * F.PANEL_IN * dpi, (name, w, h)


def test_the_checker_sees_overlaps():
    """The overlap test can fail: two labels drawn at the same place are reported."""
    fig = F.new_figure(300, 200)
    ax = fig.add_subplot(1, 1, 1)
    ax.text(0.5, 0.5, "rollout")
    ax.text(0.52, 0.5, "attention flow")
    assert len(overlapping_labels(fig)) == 1
    # the old flow panels: 64 px tiles, titles as ticks 68 px apart
    fig = F.new_figure(221, 98)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(np.zeros((64, 200, 3), np.uint8))
    ax.set_xticks([32, 100, 168], ["image", "rollout", "attention flow"], fontsize=9)
    assert overlapping_labels(fig)


def test_titles_are_wrapped_to_their_panel():
    fig, ax = F.panels(IMAGE, {LONG: rand(14, 4, 4)})
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[1].replace("\n", " ") == LONG and "\n" in labels[1]


# ---------------------------------------------------------------- files


def test_pdf_svg_jpg_are_valid_and_keep_their_text(tmp_path):
    import pypdf

    fig, _ = F.panels(IMAGE, {"rollout": rand(15, 4, 4), "attention flow": rand(16, 4, 4)}, colorbar=True)
    pdf = F.save_figure(fig, tmp_path / "fig.png", format="pdf")
    assert pdf.name == "fig.pdf"
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
    reader = pypdf.PdfReader(str(pdf))
    assert len(reader.pages) == 1
    text = reader.pages[0].extract_text()
    assert "rollout" in text and "attention flow" in text
    svg = F.save_figure(fig, tmp_path / "fig.svg")
    root = ET.parse(svg).getroot()  # well-formed XML
    assert root.tag.endswith("svg")
    words = " ".join("".join(e.itertext()) for e in root.iter() if e.tag.endswith("text"))
    assert "rollout" in words and "attention flow" in words
    jpg = F.save_figure(fig, tmp_path / "fig", format="jpg")
    assert jpg.name == "fig.jpg" and Image.open(jpg).format == "JPEG"
    png = F.save_figure(fig, tmp_path / "fig", dpi=200)
    small = F.save_figure(fig, tmp_path / "fig100.png")
    assert Image.open(png).size[0] == pytest.approx(2 * Image.open(small).size[0], rel=0.03)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.jpg", "fig.pdf", "fig.png", "fig.svg",
                                                          "fig100.png"]
    with pytest.raises(RenderError, match="unknown figure format"):
        F.save_figure(fig, tmp_path / "fig.gif")
    with pytest.raises(RenderError, match="dpi must be in"):
        F.save_figure(fig, tmp_path / "fig.png", dpi=5)


def test_output_options_check_their_values():
    assert OutputOptions().overlay_ext == "png" and OutputOptions(format="jpeg").overlay_ext == "jpg"
    assert OutputOptions(format="pdf").overlay_ext == "png"  # overlays stay raster
    for kwargs, needle in [({"format": "tiff"}, "format"), ({"dpi": 1000}, "dpi"), ({"size": 1}, "size"),
                           ({"norm": "global"}, "norm"), ({"alpha": -1}, "alpha")]:
        with pytest.raises(RenderError, match=needle):
            OutputOptions(**kwargs)
