"""Overlays on the user's own picture: the model's view mapped back onto the original image.

Golden boxes computed by hand, the box checked against the real preprocessing (resampling
the box of the original gives the model's view), and the renderer checked against
:func:`vitviz.overlay` on the same pixels.
"""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitviz.cli import main
from vitviz.errors import RenderError
from vitviz.models import Preprocess
from vitviz.render import overlay, overlay_region

SAMPLES = sorted((Path(__file__).resolve().parent.parent / "vitviz" / "assets").glob("*.png"))


def test_region_golden_boxes():
    # timm eval: shorter side 400 -> floor(224 / 0.875) = 256 (x0.64), long side 600 -> 384;
    # crop 224 at round((384 - 224) / 2) = 80, round((256 - 224) / 2) = 16; back: / 0.64
    pre = Preprocess(size=224, resize_mode="shortest", crop_pct=0.875)
    assert pre.region((600, 400)) == (125.0, 25.0, 475.0, 375.0)
    assert pre.region((400, 600)) == (25.0, 125.0, 375.0, 475.0)
    # squash: the whole image, whatever its shape
    assert Preprocess(size=(32, 48)).region((100, 30)) == (0.0, 0.0, 100.0, 30.0)
    # border: longer side 448 -> 224 (x0.5), 224 -> 112, padded by 56 above and below: the box
    # reaches 112 original pixels outside the image at the top and the bottom
    assert Preprocess(size=224, resize_mode="border").region((448, 224)) == (0.0, -112.0, 448.0, 336.0)
    # transformers' floor offset: (35 - 32) // 2 = 1 instead of round(1.5) = 2
    pre = Preprocess(size=32, resize_mode="shortest", resize_size=32, crop_offset="floor")
    assert pre.region((35, 32)) == (1.0, 0.0, 33.0, 32.0)
    assert pre.region(Image.new("RGB", (35, 32))) == (1.0, 0.0, 33.0, 32.0)  # from an image too


@pytest.mark.parametrize("pre", [
    Preprocess(size=224, resize_mode="shortest", crop_pct=0.875),
    Preprocess(size=224, resize_mode="shortest", crop_pct=0.9, interpolation="bilinear"),
    Preprocess(size=(96, 128), resize_mode="shortest", crop_pct=1.0),
    Preprocess(size=64, resize_mode="squash", crop_pct=0.8, crop_offset="floor"),
], ids=["timm-0.875", "timm-0.9", "non-square", "squash-crop"])
@pytest.mark.parametrize("wh", [(301, 207), (180, 260)])
def test_region_is_what_the_model_sees(pre, wh):
    """Resampling the box of the original straight to the input size gives the model's view
    (up to resampling differences): the box is where the view comes from."""
    w, h = wh
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    smooth = np.stack([127 + 120 * np.sin(xx / 23.0), 127 + 120 * np.cos(yy / 17.0),
                       127 + 120 * np.sin((xx + yy) / 31.0)], -1).astype(np.uint8)  # [h, w, 3]
    img = Image.fromarray(smooth)
    box = pre.region(img)
    ch, cw = pre.size
    direct = np.asarray(img.resize((cw, ch), Image.BICUBIC, box=box), dtype=np.float32)
    view = pre.view(img).astype(np.float32)
    assert np.abs(direct - view).mean() < 1.5
    # a box shifted by 3 % of its size is clearly worse: the test can tell boxes apart
    dx = 0.03 * (box[2] - box[0])
    shifted = (box[0] + dx, box[1], box[2] + dx, box[3])
    if shifted[2] <= w:
        off = np.asarray(img.resize((cw, ch), Image.BICUBIC, box=shifted), dtype=np.float32)
        assert np.abs(off - view).mean() > 3 * np.abs(direct - view).mean()


def test_overlay_region_equals_overlay_inside_and_keeps_the_rest():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    heat = rng.random((4, 5)).astype(np.float32)
    out = overlay_region(img, heat, (10, 5, 60, 45), alpha=0.6)
    assert out.shape == img.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[5:45, 10:60], overlay(img[5:45, 10:60], heat, alpha=0.6))
    mask = np.ones(img.shape[:2], bool)
    mask[5:45, 10:60] = False
    np.testing.assert_array_equal(out[mask], img[mask])  # never seen by the model: untouched
    np.testing.assert_array_equal(overlay_region(img, heat, (10, 5, 60, 45), alpha=0.0), img)


def test_overlay_region_box_beyond_the_image():
    """Padding: the box reaches outside; only its part inside the image is drawn, and that part
    is the matching slice of the map drawn over the whole box."""
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    heat = rng.random((6, 6)).astype(np.float32)
    out = overlay_region(img, heat, (0, -20, 50, 60))  # box 50 x 80, image rows 20..60 of it
    canvas = np.zeros((80, 50, 3), np.uint8)
    canvas[20:60] = img
    np.testing.assert_array_equal(out, overlay(canvas, heat)[20:60])
    np.testing.assert_array_equal(overlay_region(img, heat, (60, 0, 90, 40)), img)  # fully outside


@pytest.mark.parametrize("box", [(10, 10, 10, 20), (0, 0, float("nan"), 5), "box", (1, 2, 3)])
def test_overlay_region_bad_box(box):
    with pytest.raises(RenderError, match="box"):
        overlay_region(np.zeros((8, 8, 3), np.uint8), np.ones((2, 2)), box)
    with pytest.raises(RenderError, match="alpha"):
        overlay_region(np.zeros((8, 8, 3), np.uint8), np.ones((2, 2)), (0, 0, 4, 4), alpha=2)


def test_cli_on_original_writes_the_full_picture(tmp_path):
    src = tmp_path / "wide.png"
    Image.open(SAMPLES[0]).convert("RGB").resize((360, 240)).save(src)  # 3:2, timm crops its sides
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weights = tmp_path / "ti16-64.safetensors"
    save_file(timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=3).state_dict(), str(weights))
    base = ["rollout", str(src), "--model", "ti16", "--weights", str(weights), "--bare"]
    assert main(base + ["--out", str(tmp_path / "view")]) == 0
    assert main(base + ["--on-original", "--out", str(tmp_path / "orig")]) == 0
    view_png = np.asarray(Image.open(tmp_path / "view" / "wide_rollout.png"))
    orig_png = np.asarray(Image.open(tmp_path / "orig" / "wide_rollout.png"))
    # the model view is shown at >= 256 px (64 px input: x4); the original at its own size
    assert view_png.shape == (256, 256, 3) and orig_png.shape == (240, 360, 3)
    heat_view = np.load(tmp_path / "view" / "wide_rollout.npy")
    heat = np.load(tmp_path / "orig" / "wide_rollout.npy")
    np.testing.assert_array_equal(heat, heat_view)  # the map is the same; only the drawing differs
    # the overlay is exactly overlay_region with the model's own region
    from vitviz.models import load_model

    pre = load_model("ti16", weights=str(weights)).preprocessor
    original = np.asarray(Image.open(src).convert("RGB"))
    left, top, right, bottom = pre.region((360, 240))
    # crop_pct 0.9 of a 3:2 picture: the sides and a thin band at the top and bottom were cut off
    assert 0 < top < bottom < 240 and 0 < left < right < 360 and left > 3 * top
    np.testing.assert_array_equal(orig_png, overlay_region(original, heat, (left, top, right, bottom)))
    np.testing.assert_array_equal(orig_png[:, :int(left)], original[:, :int(left)])
    np.testing.assert_array_equal(orig_png[:int(top)], original[:int(top)])
    assert np.abs(orig_png[int(top) + 1:int(bottom) - 1, int(left) + 1:int(right) - 1].astype(int)
                  - original[int(top) + 1:int(bottom) - 1, int(left) + 1:int(right) - 1]).mean() > 10
