"""The default overlay (issue 30): a perceptual colour map, opacity that grows with the value,
patch blocks; the classic look on request.

Golden values on tiny inputs (blocks, block edges, the constant blend written out by hand), the
invariants the issue asks for (the image untouched where the map is lowest; the peak the
brightest spot and the largest change, over saturated blue, red and yellow), and an
independent reference of the old look (OpenCV bicubic + jet at 0.5, written out here).
"""

import cv2
import numpy as np
import pytest

import vitviz
from vitviz.errors import RenderError
from vitviz.render import colormap_lut, overlay_region
from vitviz.render._overlay import ALPHA_GAMMA, ALPHA_MAX, DEFAULT_CMAP, upsample_map

SATURATED = {"blue": (0, 0, 255), "red": (255, 0, 0), "yellow": (255, 255, 0)}
PEAK = (3, 4)  # the map's maximum, in patches of an 8x8 grid over a 64 px image (8 px patches)


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Rec. 601 luma of ``[..., 3]`` RGB."""
    return rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def scene(colour) -> np.ndarray:
    """A mid-grey 64 px image with a saturated 40 px square under the peak (patch rows 1-5, columns 2-6)."""
    img = np.full((64, 64, 3), 128, np.uint8)
    img[8:48, 16:56] = colour
    return img


def peak_map() -> np.ndarray:
    """``[8, 8]``: a Gaussian around PEAK on a floor (the minimum, reached by the outer patches), so
    values from the minimum to the peak occur."""
    r, c = np.mgrid[0:8, 0:8]
    return np.maximum(np.exp(-((r - PEAK[0]) ** 2 + (c - PEAK[1]) ** 2) / 6.0), 0.1).astype(np.float32)


def peak_pixels() -> np.ndarray:
    mask = np.zeros((64, 64), bool)
    mask[PEAK[0] * 8:(PEAK[0] + 1) * 8, PEAK[1] * 8:(PEAK[1] + 1) * 8] = True
    return mask


@pytest.mark.parametrize("name", list(SATURATED))
@pytest.mark.parametrize("smooth", [False, True])
def test_peak_is_brightest_and_low_values_leave_the_image(name, smooth):
    img, heat = scene(SATURATED[name]), peak_map()
    out = vitviz.overlay(img, heat, smooth=smooth)
    unit = upsample_map((heat - heat.min()) / (heat.max() - heat.min()), 64, 64, smooth=smooth)  # [64, 64]
    # (a) where the map is at its minimum, the picture is the image
    low = unit <= 1e-6
    assert low.sum() > 100
    assert np.abs(out[low].astype(int) - img[low].astype(int)).max() <= 1
    # (b) the peak is the brightest spot of the overlay and the largest change to the image
    lum = luminance(out)
    change = np.abs(out.astype(int) - img.astype(int)).sum(-1)
    top = unit >= unit.max() - 1e-6
    # smooth: the interpolated peak is a hair below 1 (0.999) and its neighbours at 0.995 take the next
    # colour index (rint(u * 255) = 254 vs 255), whose distance to yellow differs by a level: 2 levels leeway
    tol = 2 if smooth else 0
    assert lum[top].min() >= lum.max() - tol - 1e-9, (name, lum[top].min(), lum.max())
    assert change[top].min() >= change.max() - tol, (name, change[top].min(), change.max())
    if not smooth:
        assert np.array_equal(top, peak_pixels())
    # brighter than the saturated patch it sits on (the peak never looks like a hole)
    assert lum[top].min() > luminance(np.array(SATURATED[name])) + 5


def test_the_old_look_fails_the_peak_test_on_blue():
    """The check can fail: jet at a constant 0.5 draws the peak over blue as dark purple, darker than
    the tint of lower values around it (issue 30's "hole")."""
    img, heat = scene(SATURATED["blue"]), peak_map()
    out = vitviz.overlay(img, heat, cmap="jet", alpha=0.5, smooth=True)
    lum = luminance(out)
    assert lum[peak_pixels()].max() < lum.max() - 50
    assert not np.array_equal(out[0, 0], img[0, 0])  # and it tints the whole image


def test_constant_blend_is_exactly_the_old_formula():
    """alpha=0.5: (1 - 0.5) * image + 0.5 * colour, rounded, with nearest blocks; with smooth=True the
    old overlay (bicubic + clip, written out here with OpenCV)."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    heat = np.array([[0.0, 1.0], [2.0, 4.0]], np.float32)  # scaled: 0, 0.25, 0.5, 1
    lut = colormap_lut("jet").astype(np.float64)  # [256, 3]
    unit = np.kron(np.array([[0.0, 0.25], [0.5, 1.0]]), np.ones((4, 4)))  # four 4x4 blocks
    colour = lut[np.rint(unit * 255).astype(int)]  # [8, 8, 3]
    expected = np.rint(0.5 * img + 0.5 * colour).astype(np.uint8)
    np.testing.assert_array_equal(vitviz.overlay(img, heat, cmap="jet", alpha=0.5), expected)

    def old_overlay(image, h):  # vitviz 0.x: min-max, bicubic, clip, OpenCV jet, constant blend
        u = (h - h.min()) / (h.max() - h.min())
        up = np.clip(cv2.resize(u.astype(np.float32), image.shape[1::-1], interpolation=cv2.INTER_CUBIC), 0, 1)
        u8 = np.clip(np.rint(up * 255.0), 0, 255).astype(np.uint8)
        col = cv2.cvtColor(cv2.applyColorMap(u8, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB).astype(np.float32)
        return np.clip(np.rint(0.5 * image.astype(np.float32) + 0.5 * col), 0, 255).astype(np.uint8)

    big = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    h = rng.random((6, 5)).astype(np.float32)
    np.testing.assert_array_equal(vitviz.overlay(big, h, cmap="jet", alpha=0.5, smooth=True), old_overlay(big, h))


@pytest.mark.parametrize("alpha", [None, 0.3, 0.77])
def test_blend_in_place_is_the_written_out_formula(alpha):
    """The blend works in place for speed; its pixels are those of the formula written out with
    temporaries, (1 - a) * image + a * colour in float32, rounded, for value-scaled and constant
    opacity (a rearranged formula, image + a * (colour - image), differs by one level on about
    0.1 % of pixels: this test fails on it)."""
    from vitviz.render._overlay import blend, colorize

    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    unit = rng.random((96, 128)).astype(np.float32)
    a = float(alpha) if alpha is not None else (ALPHA_MAX * unit ** ALPHA_GAMMA).astype(np.float32)[..., None]
    written = (1.0 - a) * img.astype(np.float32) + a * colorize(unit, "inferno").astype(np.float32)
    expected = np.clip(np.rint(written), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(blend(img, unit, "inferno", alpha), expected)


@pytest.mark.parametrize("cmap,alpha", [("inferno", None), ("inferno", 0.3), ("jet", 0.77), ("viridis", None),
                                        ("Greens", 0.1), ("magma", 1.0)])
def test_blocks_looked_up_in_a_table_are_the_written_out_formula(cmap, alpha, monkeypatch):
    """Patch blocks over more pixels than a [patches, 3, 256] table has entries are drawn by
    looking each pixel up in a per-patch table of blend's float32 arithmetic: the same bits as the
    formula written out per pixel, at grids and sizes whose block edges fall between pixels too."""
    import vitviz.render._overlay as ov
    from vitviz.render._overlay import colorize

    tables = []
    real = ov._blend_table
    monkeypatch.setattr(ov, "_blend_table", lambda *a: tables.append(1) or real(*a))
    rng = np.random.default_rng(4)
    sizes = [((256, 256), (14, 14)), ((97, 130), (3, 5)), ((300, 200), (7, 4)), ((64, 64), (1, 1)),
             ((1100, 1000), (14, 14))]  # the last above the sizes whose lookup offsets are kept
    for (h, w), (gh, gw) in sizes:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        heat = rng.random((gh, gw)).astype(np.float32) ** 2
        unit = (heat - heat.min()) / (heat.max() - heat.min()) if gh * gw > 1 else np.zeros_like(heat)
        rows = np.minimum(((np.arange(h) + 0.5) * gh / h).astype(int), gh - 1)
        cols = np.minimum(((np.arange(w) + 0.5) * gw / w).astype(int), gw - 1)
        up = unit[rows[:, None], cols[None, :]].astype(np.float32)  # [h, w] blocks, written out
        a = float(alpha) if alpha is not None else (ALPHA_MAX * up ** ALPHA_GAMMA).astype(np.float32)[..., None]
        written = (1.0 - a) * img.astype(np.float32) + a * colorize(up, cmap).astype(np.float32)
        expected = np.clip(np.rint(written), 0, 255).astype(np.uint8)
        before = len(tables)
        np.testing.assert_array_equal(vitviz.overlay(img, heat, cmap=cmap, alpha=alpha), expected)
        assert len(tables) == before + 1  # the table path drew it


def test_colorize_is_opencv_s_colour_map_and_matplotlib_s_table():
    """colorize looks levels up in a table made once per colour map: the same colours as OpenCV's
    applyColorMap of the whole map, and as matplotlib's table for its own maps."""
    import matplotlib

    from vitviz.render._overlay import _CV2_MAPS, colorize

    rng = np.random.default_rng(5)
    unit = rng.random((37, 53)).astype(np.float32) * 1.2 - 0.1  # values outside [0, 1] are clipped
    u8 = np.clip(np.rint(unit * 255), 0, 255).astype(np.uint8)
    names = [n for n, attr in _CV2_MAPS.items() if hasattr(cv2, attr)]
    assert "inferno" in names and "jet" in names
    for name in names:
        expected = cv2.cvtColor(cv2.applyColorMap(u8, getattr(cv2, _CV2_MAPS[name])), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(colorize(unit, name), expected, err_msg=name)
    for name in ("Greens", "coolwarm"):
        expected = (matplotlib.colormaps[name](np.arange(256))[:, :3][u8] * 255.0 + 0.5).astype(np.uint8)
        np.testing.assert_array_equal(colorize(unit, name), expected, err_msg=name)
    with pytest.raises(RenderError, match="unknown colormap"):
        colorize(unit, "no-such-map")


def test_default_opacity_golden():
    """alpha=None: a = ALPHA_MAX * u ** ALPHA_GAMMA per pixel; inferno by default."""
    assert DEFAULT_CMAP == "inferno"
    img = np.full((2, 2, 3), 100, np.uint8)
    heat = np.array([[0.0, 0.25], [0.5, 1.0]], np.float32)
    lut = colormap_lut("inferno").astype(np.float64)
    u = heat.reshape(-1)
    a = ALPHA_MAX * u ** ALPHA_GAMMA
    colour = lut[np.rint(u * 255).astype(int)]
    expected = np.rint((1 - a)[:, None] * 100 + a[:, None] * colour).astype(np.uint8).reshape(2, 2, 3)
    np.testing.assert_array_equal(vitviz.overlay(img, heat), expected)
    assert np.array_equal(vitviz.overlay(img, heat)[0, 0], img[0, 0])  # u = 0: the image


def test_nearest_blocks_and_smooth():
    img = np.zeros((8, 8, 3), np.uint8)
    heat = np.array([[0.0, 1.0], [0.3, 0.6]], np.float32)
    out = vitviz.overlay(img, heat, cmap="gray", alpha=1.0)
    for r in (0, 4):
        for c in (0, 4):
            block = out[r:r + 4, c:c + 4].reshape(-1, 3)
            assert (block == block[0]).all(), (r, c)  # four constant blocks
    assert len({tuple(out[r, c]) for r in (0, 4) for c in (0, 4)}) == 4
    smooth = vitviz.overlay(img, heat, cmap="gray", alpha=1.0, smooth=True)
    assert len(np.unique(smooth[:4, :4].reshape(-1, 3), axis=0)) > 1  # interpolated inside a block


def test_block_edges_land_on_the_nearest_pixel():
    """3 patches over 8 px: edges at 8/3 = 2.67 -> 3 and 16/3 = 5.33 -> 5; over 7 px at 2.33 -> 2, 4.67 -> 5."""
    row = np.array([[0.0, 1.0, 2.0]], np.float32)
    assert upsample_map(row, 1, 8)[0].tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert upsample_map(row, 1, 7)[0].tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert upsample_map(row.T, 8, 1)[:, 0].tolist() == [0, 0, 0, 1, 1, 2, 2, 2]


def test_overlay_region_uses_the_same_rules():
    rng = np.random.default_rng(1)
    photo = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    heat = rng.random((4, 4)).astype(np.float32)
    box = (10.0, 0.0, 50.0, 40.0)  # 40x40 px region: 10 px blocks
    full = overlay_region(photo, heat, box)
    np.testing.assert_array_equal(full[:, 10:50], vitviz.overlay(photo[:, 10:50], heat))
    np.testing.assert_array_equal(full[:, :10], photo[:, :10])
    classic = overlay_region(photo, heat, box, cmap="jet", alpha=0.5, smooth=True)
    np.testing.assert_array_equal(classic[:, 10:50],
                                  vitviz.overlay(photo[:, 10:50], heat, cmap="jet", alpha=0.5, smooth=True))


@pytest.mark.parametrize("alpha", [-0.1, 1.5, "0.5"])
def test_bad_alpha_is_a_render_error(alpha):
    with pytest.raises(RenderError, match="alpha"):
        vitviz.overlay(np.zeros((8, 8, 3), np.uint8), np.ones((2, 2)), alpha=alpha)
