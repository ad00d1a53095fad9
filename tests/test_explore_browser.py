"""The explorer page in a real headless Chromium, opened from file:// (no server, no network).

Starts Chromium as tests/test_gallery_browser.py does (skipped without chromium, chromedriver
and selenium on a developer's machine; a failure in CI), with the performance log on so that
every request the page makes is seen. The heat canvas holds one pixel per patch, so its pixels,
mapped back through the page's colour table, are the shown map.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import headless_chromium

import vitviz
from vitviz.explorer._view import render_explore
from vitviz.models import Preprocess

SEED = 3_000_001  # a held-out scene (outside the training seeds) that shapes-vit names right


@pytest.fixture(scope="module")
def browser():
    with headless_chromium("1200,900", performance_log=True) as driver:
        yield driver


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """The shapes-vit page of a held-out scene and a non-square page of a random tiny model."""
    import timm

    from vitviz.zoo.scenes import classification_scene

    root = tmp_path_factory.mktemp("explore")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        scene = classification_scene(SEED)
        shapes = vitviz.explore(vitviz.load_model("shapes-vit"), scene.image, title="scene <1>.png")
        torch.manual_seed(0)
        module = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=(32, 48), patch_size=8,
                                   embed_dim=32, depth=3, num_heads=2, num_classes=4, reg_tokens=2).eval()
        tiny = vitviz.wrap(module, preprocess=Preprocess(size=(32, 48), resize_mode="squash", crop_pct=1.0))
        wide = vitviz.explore(tiny, np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
        # the same page with the per-head rows of layer 1 left out
        wide = vitviz.Explorer(wide.data, render_explore(wide.data, max_bytes=len(wide.html) - 1))
        module = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                   embed_dim=32, depth=2, num_heads=2, num_classes=0, class_token=False,
                                   global_pool="avg").eval()
        plain = vitviz.explore(vitviz.wrap(module, preprocess=Preprocess(size=32, resize_mode="squash")),
                               np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
        # a checkerboard of 3 px squares: sharp edges inside every 8 px patch of shapes-vit's 64 px view
        yy, xx = np.mgrid[0:64, 0:64]
        checker = np.repeat(((yy // 3 + xx // 3) % 2 * 200 + 28).astype(np.uint8)[..., None], 3, axis=-1)
        checker = vitviz.explore(vitviz.load_model("shapes-vit"), checker, title="checkerboard")
    finally:
        torch.set_num_threads(before)
    return {"shapes": (shapes.save(root / "shapes.html"), scene, shapes),
            "wide": (wide.save(root / "wide.html"), None, wide),
            "plain": (plain.save(root / "plain.html"), None, plain),
            "checker": (checker.save(root / "checker.html"), None, checker)}


def _open(d, path):
    from selenium.webdriver.support.ui import WebDriverWait

    d.get_log("performance")  # drop what came before
    d.get_log("browser")
    d.get(path.resolve().as_uri())
    WebDriverWait(d, 30).until(lambda drv: drv.execute_script(
        "return document.readyState === 'complete' && !!document.getElementById('stage').dataset.drawn"))


def _outside_requests(d, page_url: str) -> list[str]:
    """Requests other than the page itself and its data: URLs: every one made for the page's
    document, and any network (http, https, ws, ftp) request at all."""
    urls = []
    for entry in d.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            url, doc = msg["params"]["request"]["url"], msg["params"].get("documentURL", "")
            if url == page_url or url.startswith("data:"):
                continue
            if doc == page_url or url.split(":", 1)[0] in ("http", "https", "ws", "wss", "ftp"):
                urls.append(url)
    return urls


def _errors(d) -> list[dict]:
    return [e for e in d.get_log("browser") if e.get("level") in ("SEVERE", "ERROR", "WARNING")]


def _shown_map(d) -> np.ndarray:
    """The heat canvas ``[gh, gw]`` as values in [0, 1]: each pixel's nearest colour of the page's table."""
    gw, gh, pixels = d.execute_script(
        "var c = document.getElementById('heat');"
        "return [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)];")
    lut = np.array(json.loads(d.execute_script("return document.getElementById('vv-meta').textContent"))["lut"],
                   dtype=float).reshape(256, 3)
    rgba = np.array(pixels, dtype=float).reshape(gh, gw, 4)
    assert (rgba[..., 3] == 255).all()
    dist = ((rgba[..., None, :3] - lut[None, None]) ** 2).sum(-1)  # [gh, gw, 256]
    assert dist.min(-1).max() == 0  # every pixel is a colour of the table
    return dist.argmin(-1) / 255.0


def _click_patch(d, row: int, col: int, gh: int, gw: int) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    stage = d.find_element(By.ID, "stage")
    w, h = stage.size["width"], stage.size["height"]
    # offsets from the element's centre (Selenium 4)
    dx = int((col + 0.5) * w / gw - w / 2)
    dy = int((row + 0.5) * h / gh - h / 2)
    ActionChains(d).move_to_element_with_offset(stage, dx, dy).click().perform()


def _set_layer(d, layer: int) -> None:
    d.execute_script("var e = document.getElementById('layer'); e.value = arguments[0];"
                     "e.dispatchEvent(new Event('input', {bubbles: true}));", str(layer))


def test_shapes_page_loads_offline_and_answers_clicks_and_layers(pages, browser):
    from selenium.webdriver.common.by import By

    path, scene, page = pages["shapes"]
    d = browser
    _open(d, path)
    assert d.title == "scene <1>.png · vitviz explorer"
    assert d.find_element(By.ID, "title").text == "scene <1>.png"
    assert d.execute_script("return document.querySelectorAll('#title *').length") == 0  # text, not markup
    assert _outside_requests(d, path.resolve().as_uri()) == []
    gh, gw = page.data.grid
    assert d.execute_script("var c = document.getElementById('heat'); return [c.height, c.width]") == [gh, gw]
    top = d.find_elements(By.CSS_SELECTOR, "#top5-list li")
    assert len(top) == 5 and top[0].text.startswith(scene.label_name)

    # the CLS row of the last layer (the page's first view) highlights the shape
    assert d.find_element(By.ID, "status").text.startswith("CLS · layer 3 ·")  # layers from 0, as layer=
    shown = _shown_map(d)
    cover = scene.mask.reshape(gh, 8, gw, 8).mean(axis=(1, 3))  # [gh, gw] share of each patch in the mask
    inside = cover >= 0.5
    assert inside.any()
    assert shown[inside].mean() > 3 * shown[~inside].mean()
    assert cover.flat[shown.argmax()] > 0  # the strongest patch touches the shape
    # ... and it is the map of the data, to 8 bits
    expect = page.data.attention[-1].mean(0)[0, 1:].reshape(gh, gw)
    expect = (expect - expect.min()) / (expect.max() - expect.min())
    assert np.abs(shown - expect).max() <= 2.5 / 255

    # two different patches: two different maps (in the first layer: in later ones this trained
    # model's patches all look at the shape); the marker follows
    _set_layer(d, 0)
    assert "layer 0 ·" in d.find_element(By.ID, "status").text
    assert d.find_element(By.ID, "layer-num").text == "0 of 0–3"
    assert d.execute_script("var e = document.getElementById('layer'); return [e.min, e.max, e.value]") \
        == ["0", "3", "0"]
    assert [o.text for o in d.find_elements(By.CSS_SELECTOR, "#head option")][2:] == [f"head {h}" for h in range(4)]
    _click_patch(d, 1, 2, gh, gw)
    assert d.find_element(By.ID, "status").text.startswith("patch (row 1, col 2) · layer 0")
    first = _shown_map(d)
    _click_patch(d, 6, 5, gh, gw)
    assert d.find_element(By.ID, "status").text.startswith("patch (row 6, col 5) · layer 0")
    second = _shown_map(d)
    assert np.abs(first - second).max() > 0.2
    assert d.execute_script("return document.getElementById('stage').dataset.query") == str(1 + 6 * gw + 5)
    row = page.data.attention[0].mean(0)[1 + 6 * gw + 5, 1:].reshape(gh, gw)
    assert np.abs(second - (row - row.min()) / (row.max() - row.min())).max() <= 2.5 / 255

    # another layer: another map
    _set_layer(d, 2)
    assert "layer 2 ·" in d.find_element(By.ID, "status").text
    assert np.abs(_shown_map(d) - second).max() > 0.2

    # one head; the rollout; the relevance; the CLS token again
    from selenium.webdriver.support.ui import Select

    Select(d.find_element(By.ID, "head")).select_by_value("2")
    assert "head 2" in d.find_element(By.ID, "status").text
    d.find_element(By.CSS_SELECTOR, "input[name=mode][value=rollout]").click()
    assert "rollout of layers 0–2" in d.find_element(By.ID, "status").text
    roll = page.data.rollout[2][1 + 6 * gw + 5, 1:].reshape(gh, gw)
    assert np.abs(_shown_map(d) - (roll - roll.min()) / (roll.max() - roll.min())).max() <= 2.5 / 255
    d.find_element(By.CSS_SELECTOR, "input[name=mode][value=relevance]").click()
    assert "relevance of “" + scene.label_name + "”" in d.find_element(By.ID, "status").text
    d.find_element(By.ID, "tok-0").click()
    rel = page.data.relevance[0, 1:].reshape(gh, gw)
    assert np.abs(_shown_map(d) - (rel - rel.min()) / (rel.max() - rel.min())).max() <= 2.5 / 255

    # the prefix share per layer: the CLS row's mass on the prefix tokens, mean over heads
    shares = d.execute_script("return Array.from(document.querySelectorAll('#share-svg rect.bar'))"
                              ".map(r => +r.dataset.share)")
    want = vitviz.prefix_attention_share(vitviz.AttentionMaps(torch.from_numpy(page.data.attention[:, None]),
                                                              vitviz.TokenLayout(1, (gh, gw))), queries="cls")
    np.testing.assert_allclose(shares, want[:, 0].mean(-1).numpy(), rtol=1e-5, atol=1e-6)
    assert _errors(d) == []


def test_non_square_page_with_register_tokens(pages, browser):
    from selenium.webdriver.common.by import By

    path, _, page = pages["wide"]
    d = browser
    _open(d, path)
    assert d.execute_script("var c = document.getElementById('heat'); return [c.height, c.width]") == [4, 6]
    w, h = (d.find_element(By.ID, "stage").size[k] for k in ("width", "height"))
    assert abs(w / h - 1.5) < 0.02
    assert [b.text for b in d.find_elements(By.CSS_SELECTOR, "#tokens button")] == ["CLS", "reg 0", "reg 1"]
    _click_patch(d, 3, 5, 4, 6)  # the last patch of a 4x6 grid
    assert d.find_element(By.ID, "status").text.startswith("patch (row 3, col 5)")
    assert d.execute_script("return document.getElementById('stage').dataset.query") == str(3 + 3 * 6 + 5)
    shown = _shown_map(d)
    row = page.data.attention[-1].mean(0)[3 + 23, 3:].reshape(4, 6)
    assert np.abs(shown - (row - row.min()) / (row.max() - row.min())).max() <= 2.5 / 255
    d.find_element(By.ID, "tok-2").click()
    assert d.find_element(By.ID, "status").text.startswith("reg 1 ·")
    assert d.find_element(By.ID, "marker").get_attribute("hidden") is not None

    # layer 0 has no per-head rows here: the page says so; a head chosen elsewhere falls back to the mean
    assert "layer 0 were left out" in d.find_element(By.ID, "notes").text
    from selenium.webdriver.support.ui import Select

    Select(d.find_element(By.ID, "head")).select_by_value("1")
    assert d.find_element(By.ID, "status").text == "reg 1 · layer 2 · head 1"
    row = page.data.attention[-1][1][2, 3:].reshape(4, 6)
    assert np.abs(_shown_map(d) - (row - row.min()) / (row.max() - row.min())).max() <= 2.5 / 255
    _set_layer(d, 0)
    assert d.find_element(By.ID, "status").text == "reg 1 · layer 0 · mean over 2 heads"
    assert d.execute_script("return document.querySelector('#head option[value=\"1\"]').disabled")

    # follow the mouse: hovering a patch selects it
    from selenium.webdriver.common.action_chains import ActionChains

    d.find_element(By.ID, "hover").click()
    stage = d.find_element(By.ID, "stage")
    w, h = stage.size["width"], stage.size["height"]
    ActionChains(d).move_to_element_with_offset(stage, int(-w / 2 + 0.5 * w / 6), int(-h / 2 + 0.5 * h / 4)).perform()
    assert d.find_element(By.ID, "status").text.startswith("patch (row 0, col 0)")
    assert _outside_requests(d, path.resolve().as_uri()) == []
    assert _errors(d) == []


def test_gallery_large_view_links_the_explorer_page(tmp_path, browser):
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from vitviz.gallery import build_gallery
    from vitviz.zoo.scenes import classification_scene

    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(classification_scene(SEED).image).save(src / "a b#.png")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build_gallery(src, vitviz.load_model("shapes-vit"), tmp_path / "g", methods="rollout", workers=0,
                      progress=False, explore=True)
    finally:
        torch.set_num_threads(before)
    d = browser
    d.get((tmp_path / "g" / "index.html").resolve().as_uri())
    wait = WebDriverWait(d, 20)
    wait.until(lambda drv: drv.execute_script("return document.readyState") == "complete")
    d.find_element(By.CSS_SELECTOR, "#grid .card").click()
    link = d.find_element(By.CSS_SELECTOR, "#viewer-body .explore a")
    wait.until(lambda drv: link.is_displayed())
    target = (tmp_path / "g" / "explore" / "a_b.html").resolve().as_uri()
    assert link.get_attribute("href") == target
    _open(d, tmp_path / "g" / "explore" / "a_b.html")
    assert d.find_element(By.ID, "title").text == "a b#.png"
    assert _errors(d) == []


def test_page_of_a_model_without_prefix_tokens_or_classifier(pages, browser):
    from selenium.webdriver.common.by import By

    path, _, page = pages["plain"]
    d = browser
    _open(d, path)
    assert d.find_element(By.ID, "status").text.startswith("patch (row 2, col 2) · layer 1")  # the middle patch
    assert d.find_element(By.ID, "share-text").text == "no prefix tokens"
    assert not d.find_element(By.ID, "top5").is_displayed()
    assert d.find_element(By.CSS_SELECTOR, "input[name=mode][value=relevance]").get_attribute("disabled")
    row = page.data.attention[-1].mean(0)[2 * 4 + 2].reshape(4, 4)
    assert np.abs(_shown_map(d) - (row - row.min()) / (row.max() - row.min())).max() <= 2.5 / 255
    assert _errors(d) == []


# ---------------------------------------------------------------------------------------------
# the picture: vitviz.overlay's look, a readable image, an axis on the chart, the window's width
# ---------------------------------------------------------------------------------------------

def _view_pixels(d) -> np.ndarray:
    """The shown picture ``[H, W, 3]`` uint8: the view canvas, at the image's own pixels."""
    h, w, px = d.execute_script(
        "var c = document.getElementById('view');"
        "return [c.height, c.width, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)];")
    rgba = np.array(px, dtype=np.uint8).reshape(h, w, 4)
    assert (rgba[..., 3] == 255).all()
    return rgba[..., :3]


def _set_opacity(d, percent: int, constant: bool = False) -> None:
    d.execute_script("var e = document.getElementById('alpha'), c = document.getElementById('const-alpha');"
                     "e.value = arguments[0]; c.checked = arguments[1];"
                     "e.dispatchEvent(new Event('input', {bubbles: true}));"
                     "c.dispatchEvent(new Event('change', {bubbles: true}));", str(percent), constant)


def test_the_picture_is_vitviz_overlay_of_the_shown_row(pages, browser):
    """Equivalence with the Python renderer: the page's picture is vitviz.overlay (default colour
    map, value-scaled opacity, patch blocks) of the row it shows, and the classic constant blend
    with the box ticked; golden: the row's smallest patch leaves the image exactly as it is."""
    from vitviz.render import ALPHA_GAMMA, ALPHA_MAX, DEFAULT_CMAP, colormap_lut

    path, _, page = pages["shapes"]
    d = browser
    _open(d, path)
    meta = json.loads(d.execute_script("return document.getElementById('vv-meta').textContent"))
    assert meta["cmap"] == DEFAULT_CMAP and (meta["alpha_max"], meta["alpha_gamma"]) == (ALPHA_MAX, ALPHA_GAMMA)
    np.testing.assert_array_equal(np.array(meta["lut"]).reshape(256, 3), colormap_lut(DEFAULT_CMAP))
    assert d.execute_script("return document.getElementById('alpha').value") == str(round(100 * ALPHA_MAX))
    gh, gw = page.data.grid
    row = page.data.attention[-1].mean(0)[0, 1:].reshape(gh, gw)  # the first view: CLS, last layer
    image = page.data.image
    shown = _view_pixels(d).astype(int)
    want = vitviz.overlay(image, row).astype(int)  # the default look
    # the page scales the 8-bit row: its colour index may be one step off the float row's
    assert np.abs(shown - want).max() <= 3 and np.abs(shown - want).mean() < 0.2
    # the lowest patch leaves the image as it is; the peak is the top colour at ALPHA_MAX
    k = np.unravel_index(row.argmin(), row.shape)
    s = image.shape[0] // gh  # 8 px patches of the 64 px view
    block = (slice(k[0] * s, (k[0] + 1) * s), slice(k[1] * s, (k[1] + 1) * s))
    np.testing.assert_array_equal(shown[block], image[block])
    k = np.unravel_index(row.argmax(), row.shape)
    block = (slice(k[0] * s, (k[0] + 1) * s), slice(k[1] * s, (k[1] + 1) * s))
    top = (1 - ALPHA_MAX) * image[block] + ALPHA_MAX * colormap_lut(DEFAULT_CMAP)[255]
    assert np.abs(shown[block] - top).max() <= 0.5 + 1e-6
    # the classic constant blend, and no overlay at all
    _set_opacity(d, 50, constant=True)
    shown = _view_pixels(d).astype(int)
    assert np.abs(shown - vitviz.overlay(image, row, alpha=0.5).astype(int)).max() <= 3
    _set_opacity(d, 0)
    np.testing.assert_array_equal(_view_pixels(d), image)
    assert _errors(d) == []


def _stage_gray(d) -> np.ndarray:
    """A screenshot of the image area, grey levels ``[h, w]`` float (the 1 px border cut off)."""
    import io

    from PIL import Image
    from selenium.webdriver.common.by import By

    png = d.find_element(By.ID, "stage").screenshot_as_png
    return np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=float)[1:-1, 1:-1]


def _edge_share(on: np.ndarray, off: np.ndarray, gh: int, gw: int) -> float:
    """The share of the image's edge contrast (summed gradient magnitude) kept by the overlay,
    inside the patches: pixels within 15 % of a patch's size of its border are left out, so the
    overlay's own block edges do not count as image edges."""
    h, w = off.shape
    fy, fx = (np.arange(h) + 0.5) * gh / h, (np.arange(w) + 0.5) * gw / w
    inner = (np.abs(fy - np.rint(fy)) > 0.15)[:, None] & (np.abs(fx - np.rint(fx)) > 0.15)[None, :]
    inner = inner[:-1, :-1]

    def grad(a):
        return np.abs(np.diff(a, axis=0))[:, :-1] + np.abs(np.diff(a, axis=1))[:-1, :]

    return float(grad(on)[inner].sum() / grad(off)[inner].sum())


def test_the_image_stays_readable_under_the_default_overlay(pages, browser):
    """A headless screenshot of a checkerboard (3 px squares: sharp edges inside every 8 px
    patch) under shapes-vit's default view. Inside a patch the overlay adds a constant colour, so
    the image's edges keep (1 - a) of their contrast: the share kept is the mean of 1 - a over
    the image. Threshold: at least 60 % kept on average. The default opacity (a = 0.8 u^1.5)
    leaves most of an attention map's patches nearly untouched and passes; the old look, a
    constant 60 % overlay, keeps 40 % everywhere and fails, so the check can fail."""
    path, _, page = pages["checker"]
    d = browser
    _open(d, path)
    gh, gw = page.data.grid
    on = _stage_gray(d)
    assert on.shape[0] >= 500  # shown large: the 64 px view fills the window's height
    _set_opacity(d, 0)
    off = _stage_gray(d)
    assert np.abs(np.diff(off, axis=1)).max() > 100  # the edges are there to be seen
    kept = _edge_share(on, off, gh, gw)
    assert kept >= 0.6, kept
    _set_opacity(d, 60, constant=True)  # the old explorer: the same 60 % everywhere
    old = _edge_share(_stage_gray(d), off, gh, gw)
    assert old < 0.6 and abs(old - 0.4) < 0.02, old
    assert _errors(d) == []


def test_prefix_share_chart_has_an_axis_and_a_marker_that_is_not_a_bar(pages, browser):
    from selenium.webdriver.common.by import By

    path, _, page = pages["shapes"]
    d = browser
    _open(d, path)
    chart = d.execute_script("""
        var svg = document.getElementById('share-svg');
        function box(e) { var b = e.getBBox(); return [b.x, b.y, b.width, b.height]; }
        return {bars: Array.from(svg.querySelectorAll('rect.bar')).map(r => [+r.dataset.layer, +r.dataset.share, box(r),
                                                                           r.classList.contains('cur')]),
                ticks: Array.from(svg.querySelectorAll('text.ytick')).map(t => [t.textContent, box(t)]),
                xticks: Array.from(svg.querySelectorAll('text.xtick')).map(t => t.textContent),
                axis: box(svg.querySelector('.axis')), caret: box(svg.querySelector('.caret')),
                rects: svg.querySelectorAll('rect').length};""")
    num_layers = page.data.attention.shape[0]
    assert [b[0] for b in chart["bars"]] == list(range(num_layers))
    assert chart["xticks"] == [str(i) for i in range(num_layers)]  # layers numbered from 0
    assert [b[0] for b in chart["bars"] if b[3]] == [num_layers - 1]  # the current layer
    # the y axis: 0 at the baseline, its top at least the largest share, tick labels in percent
    labels = [t[0] for t in chart["ticks"]]
    assert labels[0] == "0%" and all(t.endswith("%") for t in labels)
    top = float(labels[-1][:-1]) / 100
    assert max(b[1] for b in chart["bars"]) <= top
    x, y, w, h = chart["axis"]
    baseline, height = y + h, h
    for _, share, (_, by, _, bh), _ in chart["bars"]:  # each bar's height is its share of the axis
        assert abs(by + bh - baseline) < 0.01 and abs(bh - height * share / top) < 0.01
    zero = next(t[1] for t in chart["ticks"] if t[0] == "0%")
    assert abs(zero[1] + zero[3] / 2 - baseline) < 6  # the 0 label sits at the baseline
    # the marker is a caret under the axis, not a shape over the data
    assert chart["caret"][1] > baseline
    assert chart["rects"] == num_layers  # no other rectangle (the old full-height background)
    _set_layer(d, 1)
    assert "layer 1 (▲)" in d.find_element(By.ID, "share-text").text
    caret = d.execute_script("var b = document.querySelector('#share-svg .caret').getBBox(); return b.x + b.width / 2;")
    _, _, (bx, _, bw, _), _ = chart["bars"][1]
    assert abs(caret - (bx + bw / 2)) < 0.01  # under layer 1's bar
    assert _errors(d) == []


def test_layout_uses_the_width(pages, browser):
    """Wide window: the image larger than the old fixed 512 px, the panels beside it; narrow
    window: the panels under the image, which takes the width."""
    from selenium.webdriver.support.ui import WebDriverWait

    path, _, _ = pages["shapes"]
    d = browser
    _open(d, path)
    try:
        for size in ((1600, 1000), (700, 900)):
            d.set_window_size(*size)
            # the resize reaches the page a little later; then read the layout in one go
            WebDriverWait(d, 10).until(lambda drv, w=size[0]: drv.execute_script("return window.innerWidth") == w)
            stage, panel, inner = d.execute_script(
                "function r(e) { var b = e.getBoundingClientRect(); return {x: b.x, y: b.y, width: b.width, "
                "height: b.height}; }"
                "return [r(document.getElementById('stage')), r(document.querySelector('.panel')),"
                "        [window.innerWidth, window.innerHeight]];")
            if size[0] > 1000:
                assert stage["width"] > 512 and stage["height"] <= inner[1]
                assert panel["x"] >= stage["x"] + stage["width"] and panel["y"] < stage["y"] + 50
            else:
                assert stage["width"] >= inner[0] - 60 and panel["y"] >= stage["y"] + stage["height"]
            assert abs(stage["width"] - stage["height"]) <= 1  # the 64x64 view keeps its shape
    finally:
        d.set_window_size(1200, 900)
