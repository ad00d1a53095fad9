"""vitviz.models._image: every odd or broken image is either read correctly or reported by name.

All files are written to tmp_path by Pillow in the test itself.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile

from vitviz.errors import ImageError, VitvizError
from vitviz.models._image import load_image, to_rgb_array

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _noise(h=24, w=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _error(source) -> ImageError:
    with pytest.raises(ImageError) as info:
        load_image(source)
    return info.value


# --------------------------------------------------------------------------------------------
# ordinary inputs
# --------------------------------------------------------------------------------------------

def test_png_roundtrip_is_exact_for_path_str_pathlike_and_file_object(tmp_path):
    a = _noise()
    p = tmp_path / "noise.png"
    Image.fromarray(a).save(p)
    for source in (p, str(p), open(p, "rb")):
        out = load_image(source)
        assert out.mode == "RGB" and out.size == (32, 24)
        np.testing.assert_array_equal(np.asarray(out), a)


def test_pil_input_is_converted_without_touching_the_callers_image():
    a = _noise()
    rgba = Image.fromarray(np.dstack([a, np.full(a.shape[:2], 255, np.uint8)]))
    out = load_image(rgba)
    assert rgba.mode == "RGBA" and out is not rgba
    np.testing.assert_array_equal(np.asarray(out), a)
    rgb = Image.fromarray(a)
    assert load_image(rgb) is not rgb  # a copy: the caller's image is never shared


def test_to_rgb_array_is_a_writable_contiguous_uint8_copy(tmp_path):
    a = _noise()
    arr = to_rgb_array(a)
    assert arr.shape == (24, 32, 3) and arr.dtype == np.uint8 and arr.flags.c_contiguous
    arr[0, 0] = 0  # writable (np.asarray of a PIL image is read-only)
    gray = to_rgb_array(np.full((3, 5), 7, np.uint8))
    assert gray.shape == (3, 5, 3) and (gray == 7).all()


def test_tiny_1x1_image(tmp_path):
    p = tmp_path / "one.png"
    Image.new("RGB", (1, 1), (10, 20, 30)).save(p)
    np.testing.assert_array_equal(to_rgb_array(p), [[[10, 20, 30]]])


def test_huge_but_allowed_image_loads(tmp_path):
    # 6000x4000 = 24 Mpx: a phone photo, below Pillow's default limit of ~89 Mpx
    p = tmp_path / "huge.png"
    Image.new("L", (6000, 4000), 77).save(p)
    out = load_image(p)
    assert out.size == (6000, 4000) and out.getpixel((5999, 3999)) == (77, 77, 77)


# --------------------------------------------------------------------------------------------
# modes
# --------------------------------------------------------------------------------------------

def test_grayscale_L_is_replicated_to_three_channels(tmp_path):
    g = np.arange(256, dtype=np.uint8).reshape(16, 16)
    p = tmp_path / "gray.png"
    Image.fromarray(g).save(p)
    out = to_rgb_array(p)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], g)


def test_mode_1_bilevel(tmp_path):
    im = Image.new("1", (4, 2), 0)
    im.putpixel((1, 0), 1)
    p = tmp_path / "bits.png"
    im.save(p)
    out = to_rgb_array(p)
    assert tuple(out[0, 1]) == WHITE and tuple(out[0, 0]) == (0, 0, 0)


def test_rgba_is_composited_over_white(tmp_path):
    a = np.zeros((1, 3, 4), np.uint8)
    a[0, 0] = (*RED, 255)     # opaque red stays red
    a[0, 1] = (*RED, 0)       # fully transparent: white, not red
    a[0, 2] = (0, 0, 0, 128)  # half-transparent black over white: 255 * (1 - 128/255) = 127
    p = tmp_path / "rgba.png"
    Image.fromarray(a).save(p)
    out = to_rgb_array(p)
    assert tuple(out[0, 0]) == RED
    assert tuple(out[0, 1]) == WHITE
    assert np.abs(out[0, 2].astype(int) - 127).max() <= 1


def test_LA_is_composited_over_white(tmp_path):
    la = np.zeros((1, 2, 2), np.uint8)
    la[0, 0] = (50, 255)
    la[0, 1] = (50, 0)
    p = tmp_path / "la.png"
    Image.merge("LA", [Image.fromarray(la[..., 0]), Image.fromarray(la[..., 1])]).save(p)
    assert Image.open(p).mode == "LA"
    out = to_rgb_array(p)
    assert tuple(out[0, 0]) == (50, 50, 50) and tuple(out[0, 1]) == WHITE


def _palette_image(transparent: bool) -> Image.Image:
    im = Image.new("P", (2, 1), 0)
    im.putpalette(list(GREEN) + list(RED) + [0] * (256 * 3 - 6))
    im.putpixel((0, 0), 1)  # red; pixel (1, 0) keeps index 0 (green)
    if transparent:
        im.info["transparency"] = 0
    return im


def test_palette_without_transparency(tmp_path):
    p = tmp_path / "pal.png"
    _palette_image(False).save(p)
    assert Image.open(p).mode == "P"
    out = to_rgb_array(p)
    assert tuple(out[0, 0]) == RED and tuple(out[0, 1]) == GREEN


@pytest.mark.parametrize("ext", ["png", "gif"])
def test_palette_with_transparency_is_white_where_transparent(tmp_path, ext):
    p = tmp_path / f"pal_t.{ext}"
    _palette_image(True).save(p, transparency=0)
    with Image.open(p) as im:
        assert im.mode == "P" and "transparency" in im.info
    out = to_rgb_array(p)
    assert tuple(out[0, 0]) == RED
    assert tuple(out[0, 1]) == WHITE  # index 0 is green but transparent


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    im = Image.new("CMYK", (8, 8), (255, 0, 0, 0))  # pure cyan
    im.paste((0, 0, 0, 255), (4, 0, 8, 8))          # pure black on the right half
    im.save(p, quality=95)
    assert Image.open(p).mode == "CMYK"
    out = to_rgb_array(p).astype(int)
    assert np.abs(out[4, 1] - (0, 255, 255)).max() <= 3
    assert np.abs(out[4, 6] - (0, 0, 0)).max() <= 3


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    vals = np.array([[0, 257, 32768, 65535, 65535 // 2, 1000]], np.uint16)
    p = tmp_path / "deep.png"
    Image.fromarray(vals).save(p)
    with Image.open(p) as im:
        assert im.mode == "I;16"
        # the pitfall this guards against: Pillow's own conversion clips at 255
        assert np.asarray(im.convert("RGB"))[0, 2, 0] == 255
    out = to_rgb_array(p)
    # round(v * 255 / 65535), by hand: 0, 1, 127.502 -> 128, 255, 127.498 -> 127, 3.89 -> 4
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255, 127, 4])
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 0] == out[..., 2]).all()


def test_16bit_big_endian_and_uint16_arrays_scale_the_same_way():
    vals = np.array([[0, 257, 32768, 65535]], np.uint16)
    im_b = Image.fromarray(vals.astype(">u2"))
    assert im_b.mode == "I;16B"
    expected = [0, 1, 128, 255]
    np.testing.assert_array_equal(to_rgb_array(im_b)[0, :, 0], expected)
    np.testing.assert_array_equal(to_rgb_array(vals)[0, :, 0], expected)
    np.testing.assert_array_equal(to_rgb_array(vals.astype(">u2"))[0, :, 0], expected)


def test_mode_I_holding_16bit_values_and_wider_values():
    im16 = Image.fromarray(np.array([[0, 65535, 32768]], np.int32))
    assert im16.mode == "I"
    np.testing.assert_array_equal(to_rgb_array(im16)[0, :, 0], [0, 255, 128])
    # values beyond 16 bits: the image's own range is stretched to 0..255
    wide = Image.fromarray(np.array([[-100, 0, 100]], np.int32))
    np.testing.assert_array_equal(to_rgb_array(wide)[0, :, 0], [0, 128, 255])  # 127.5 -> 128


def test_mode_F_float_image(tmp_path):
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    assert unit.mode == "F"
    np.testing.assert_array_equal(to_rgb_array(unit)[0, :, 0], [0, 128, 255])  # 127.5 -> 128
    p = tmp_path / "depth.tif"
    Image.fromarray(np.array([[2.0, 4.0, 6.0]], np.float32)).save(p)
    np.testing.assert_array_equal(to_rgb_array(p)[0, :, 0], [0, 128, 255])


@pytest.mark.parametrize("orientation, size, top_left, bottom_right", [
    # stored: 40 wide x 20 tall, left half red, right half blue
    (1, (40, 20), RED, BLUE),   # upright already
    (3, (40, 20), BLUE, RED),   # rotated 180 degrees
    (6, (20, 40), RED, BLUE),   # rotate 90 clockwise: the left half goes to the top
    (8, (20, 40), BLUE, RED),   # rotate 90 counter-clockwise: the left half goes to the bottom
])
def test_exif_orientation_is_applied(tmp_path, orientation, size, top_left, bottom_right):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = RED
    a[:, 20:] = BLUE
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = tmp_path / f"rot{orientation}.jpg"
    Image.fromarray(a).save(p, exif=exif, quality=95)
    out = load_image(p)
    assert out.size == size
    arr = np.asarray(out).astype(int)
    assert np.abs(arr[2, 2] - top_left).max() <= 8
    assert np.abs(arr[-3, -3] - bottom_right).max() <= 8
    # a PIL image opened by the user gets the same treatment
    assert load_image(Image.open(p)).size == size


# --------------------------------------------------------------------------------------------
# arrays
# --------------------------------------------------------------------------------------------

def test_arrays_gray_rgb_rgba_bool_and_single_channel():
    a = _noise(4, 5)
    np.testing.assert_array_equal(to_rgb_array(a), a)
    g = a[..., 0]
    np.testing.assert_array_equal(to_rgb_array(g), np.dstack([g, g, g]))
    np.testing.assert_array_equal(to_rgb_array(g[..., None]), np.dstack([g, g, g]))
    rgba = np.dstack([a, np.zeros((4, 5), np.uint8)])  # fully transparent
    assert (to_rgb_array(rgba) == 255).all()
    b = np.array([[True, False]])
    np.testing.assert_array_equal(to_rgb_array(b)[0, :, 0], [255, 0])


def test_float_arrays_in_unit_range_are_scaled_and_rounded():
    f = np.array([[[0.0, 0.5, 1.0], [0.2, 0.002, 0.998]]], np.float32)
    np.testing.assert_array_equal(to_rgb_array(f), [[[0, 128, 255], [51, 1, 254]]])


@pytest.mark.parametrize("arr, words", [
    (np.array([[[0.0, 2.0, 255.0]]]), ["[0, 1]", "divide by 255"]),
    (np.array([[[0.0, np.nan, 1.0]]]), ["NaN"]),
    (np.zeros((4, 4, 3), np.int64), ["int64", "astype(np.uint8)"]),
    (np.zeros((3, 8, 9), np.uint8), ["channel-first", "transpose(1, 2, 0)"]),
    (np.zeros((8, 9, 2), np.uint8), ["HxWx3"]),
    (np.zeros((2, 8, 9, 3), np.uint8), ["HxWx3"]),
    (np.zeros((0, 9, 3), np.uint8), ["empty"]),
])
def test_bad_arrays_raise_clear_errors(arr, words):
    err = _error(arr)
    assert str(arr.dtype) in str(err) and str(tuple(arr.shape)) in str(err)
    for w in words:
        assert w in str(err)


def test_unsupported_source_type():
    err = _error(12345)
    assert "int" in str(err) and "file path" in str(err)


# --------------------------------------------------------------------------------------------
# broken files: reported by name, with the cause and the fix
# --------------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    p = tmp_path / "nope.jpg"
    err = _error(p)
    assert err.source == str(p) and str(p) in str(err) and "no such file" in str(err)
    assert isinstance(err, VitvizError) and err.exit_code == 2


def test_directory(tmp_path):
    d = tmp_path / "photos.jpg"
    d.mkdir()
    err = _error(d)
    assert str(d) in str(err) and "is a directory" in str(err) and "gallery" in str(err)


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    err = _error(p)
    assert str(p) in str(err) and "empty (0 bytes)" in str(err)


def test_text_file_named_png(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("shopping list: milk, eggs\n")
    err = _error(p)
    assert str(p) in str(err)
    assert "not an image" in str(err) and "shopping" in str(err)  # shows what the file holds


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("keep", [0.3, 0.8])
def test_truncated_files(tmp_path, fmt, keep):
    full = io.BytesIO()
    Image.fromarray(_noise(64, 64)).save(full, fmt)
    data = full.getvalue()
    p = tmp_path / f"cut.{fmt.lower()}"
    p.write_bytes(data[: int(len(data) * keep)])
    # opening the header alone succeeds: only a full decode finds the damage
    with Image.open(p) as im:
        assert im.size == (64, 64)
    err = _error(p)
    assert str(p) in str(err) and "truncated" in str(err) and fmt in str(err)
    assert "re-download" in str(err)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # the global was not touched


def test_truncated_file_opened_by_the_user_is_reported_by_name(tmp_path):
    full = io.BytesIO()
    Image.fromarray(_noise(64, 64)).save(full, "JPEG")
    p = tmp_path / "lazy.jpg"
    p.write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    with Image.open(p) as im:  # lazily decoded: the damage is not seen yet
        with pytest.raises(ImageError) as info:
            load_image(im)
    assert "lazy.jpg" in str(info.value) and "truncated" in str(info.value)


def test_file_cut_inside_its_header_is_reported_as_truncated(tmp_path):
    full = io.BytesIO()
    Image.fromarray(_noise()).save(full, "JPEG")
    p = tmp_path / "stub.jpg"
    p.write_bytes(full.getvalue()[:20])
    err = _error(p)
    assert str(p) in str(err) and "JPEG" in str(err) and "truncated" in str(err)


def test_truncated_image_loads_when_the_user_allows_it(tmp_path, monkeypatch):
    full = io.BytesIO()
    Image.fromarray(_noise(64, 64)).save(full, "JPEG")
    p = tmp_path / "cut.jpg"
    p.write_bytes(full.getvalue()[: len(full.getvalue()) * 8 // 10])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    assert load_image(p).size == (64, 64)


@pytest.mark.parametrize("side", [40, 50])  # 1600 px: Pillow warns; 2500 px > 2 x limit: Pillow raises
def test_decompression_bomb_is_refused_with_size_and_fix(tmp_path, monkeypatch, side):
    p = tmp_path / "bomb.png"
    Image.new("RGB", (side, side)).save(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    filters_before = list(warnings.filters)
    err = _error(p)
    assert str(p) in str(err) and str(side * side) in str(err)
    assert "decompression bomb" in str(err) and "MAX_IMAGE_PIXELS" in str(err)
    assert list(warnings.filters) == filters_before  # no global warning filter left behind
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the documented way to allow it
    assert load_image(p).size == (side, side)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root reads files whatever their permissions")
def test_unreadable_file(tmp_path):
    p = tmp_path / "secret.png"
    Image.new("RGB", (2, 2)).save(p)
    p.chmod(0)
    try:
        err = _error(p)
    finally:
        p.chmod(0o600)
    assert str(p) in str(err) and "permission" in str(err).lower()
