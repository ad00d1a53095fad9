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
    finally:
        torch.set_num_threads(before)
    return {"shapes": (shapes.save(root / "shapes.html"), scene, shapes),
            "wide": (wide.save(root / "wide.html"), None, wide),
            "plain": (plain.save(root / "plain.html"), None, plain)}


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
    assert d.find_element(By.ID, "status").text.startswith("CLS · layer 4 ·")
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
    _set_layer(d, 1)
    assert "layer 1 ·" in d.find_element(By.ID, "status").text
    _click_patch(d, 1, 2, gh, gw)
    assert d.find_element(By.ID, "status").text.startswith("patch (row 2, col 3) · layer 1")
    first = _shown_map(d)
    _click_patch(d, 6, 5, gh, gw)
    assert d.find_element(By.ID, "status").text.startswith("patch (row 7, col 6) · layer 1")
    second = _shown_map(d)
    assert np.abs(first - second).max() > 0.2
    assert d.execute_script("return document.getElementById('stage').dataset.query") == str(1 + 6 * gw + 5)
    row = page.data.attention[0].mean(0)[1 + 6 * gw + 5, 1:].reshape(gh, gw)
    assert np.abs(second - (row - row.min()) / (row.max() - row.min())).max() <= 2.5 / 255

    # another layer: another map
    _set_layer(d, 3)
    assert "layer 3 ·" in d.find_element(By.ID, "status").text
    assert np.abs(_shown_map(d) - second).max() > 0.2

    # one head; the rollout; the relevance; the CLS token again
    from selenium.webdriver.support.ui import Select

    Select(d.find_element(By.ID, "head")).select_by_value("2")
    assert "head 3" in d.find_element(By.ID, "status").text
    d.find_element(By.CSS_SELECTOR, "input[name=mode][value=rollout]").click()
    assert "rollout of layers 1–3" in d.find_element(By.ID, "status").text
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
    assert [b.text for b in d.find_elements(By.CSS_SELECTOR, "#tokens button")] == ["CLS", "reg 1", "reg 2"]
    _click_patch(d, 3, 5, 4, 6)  # the last patch of a 4x6 grid
    assert d.find_element(By.ID, "status").text.startswith("patch (row 4, col 6)")
    assert d.execute_script("return document.getElementById('stage').dataset.query") == str(3 + 3 * 6 + 5)
    shown = _shown_map(d)
    row = page.data.attention[-1].mean(0)[3 + 23, 3:].reshape(4, 6)
    assert np.abs(shown - (row - row.min()) / (row.max() - row.min())).max() <= 2.5 / 255
    d.find_element(By.ID, "tok-2").click()
    assert d.find_element(By.ID, "status").text.startswith("reg 2 ·")
    assert d.find_element(By.ID, "marker").get_attribute("hidden") is not None

    # layer 1 has no per-head rows here: the page says so; a head chosen elsewhere falls back to the mean
    assert "layer 1 were left out" in d.find_element(By.ID, "notes").text
    from selenium.webdriver.support.ui import Select

    Select(d.find_element(By.ID, "head")).select_by_value("1")
    assert d.find_element(By.ID, "status").text == "reg 2 · layer 3 · head 2"
    row = page.data.attention[-1][1][2, 3:].reshape(4, 6)
    assert np.abs(_shown_map(d) - (row - row.min()) / (row.max() - row.min())).max() <= 2.5 / 255
    _set_layer(d, 1)
    assert d.find_element(By.ID, "status").text == "reg 2 · layer 1 · mean over 2 heads"
    assert d.execute_script("return document.querySelector('#head option[value=\"1\"]').disabled")

    # follow the mouse: hovering a patch selects it
    from selenium.webdriver.common.action_chains import ActionChains

    d.find_element(By.ID, "hover").click()
    stage = d.find_element(By.ID, "stage")
    w, h = stage.size["width"], stage.size["height"]
    ActionChains(d).move_to_element_with_offset(stage, int(-w / 2 + 0.5 * w / 6), int(-h / 2 + 0.5 * h / 4)).perform()
    assert d.find_element(By.ID, "status").text.startswith("patch (row 1, col 1)")
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
    assert d.find_element(By.ID, "status").text.startswith("patch (row 3, col 3) · layer 2")  # the middle patch
    assert d.find_element(By.ID, "share-text").text == "no prefix tokens"
    assert not d.find_element(By.ID, "top5").is_displayed()
    assert d.find_element(By.CSS_SELECTOR, "input[name=mode][value=relevance]").get_attribute("disabled")
    row = page.data.attention[-1].mean(0)[2 * 4 + 2].reshape(4, 4)
    assert np.abs(_shown_map(d) - (row - row.min()) / (row.max() - row.min())).max() <= 2.5 / 255
    assert _errors(d) == []
