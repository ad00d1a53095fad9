"""The gallery page in a real headless Chromium, opened from file:// (no server, no network).

Needs Debian's `chromium` and `chromium-driver` and the `selenium` package. Skipped when they
are missing on a developer's machine; in CI (CI set in the environment) a missing browser is
a failure, so the page is always tested there.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import headless_chromium
from PIL import Image

ODD = "<img src=x onerror=alert(1)> & \"quotes\" 'n' #?%.png"


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """A 13-image gallery (one unreadable) in pages of 5."""
    from vitviz.gallery import build_gallery
    from vitviz.models import load_model

    root = tmp_path_factory.mktemp("browser")
    src = root / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(11):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(src / f"img{i:02d}.png")
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(src / ODD)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = load_model("ti16", pretrained=False, image_size=64)
        result = build_gallery(src, model, root / "g", methods="rollout,cls", batch_size=8, workers=0,
                               progress=False, page_size=5)
    finally:
        torch.set_num_threads(before)
    assert len(result.records) == 13 and len(result.skipped) == 1
    return root / "g", result


@pytest.fixture(scope="module")
def browser():
    with headless_chromium("1280,2400") as driver:
        yield driver


def _errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e.get("level") in ("SEVERE", "ERROR")]


def _images_loaded(driver, css: str) -> list:
    """(src, naturalWidth) of the images matching css that are displayed."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]))"
        ".filter(i => i.offsetParent !== null).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth]);",
        css)


def test_page_loads_from_file_url_counts_and_opens_the_view(gallery, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    out, result = gallery
    d = browser
    d.get((out / "index.html").resolve().as_uri())
    wait = WebDriverWait(d, 20)
    wait.until(lambda drv: drv.execute_script("return document.readyState") == "complete")
    assert d.title.startswith("vitviz gallery")

    # the right count: 13 images in all, 5 cards on page 1 of 3
    assert d.find_element(By.ID, "count").text == "13"
    assert "1 skipped" in d.find_element(By.ID, "summary").text
    cards = d.find_elements(By.CSS_SELECTOR, "#grid .card")
    assert len(cards) == 5
    assert d.find_element(By.ID, "where").text == "page 1 of 3, images 1–5"

    # the file name with markup in it is text, not markup: only the page's own script exists
    names = [e.text for e in d.find_elements(By.CSS_SELECTOR, "#grid .card .name")]
    assert ODD in names
    assert d.execute_script("return document.scripts.length") == 1
    assert d.execute_script("return document.querySelectorAll('#grid img:not(.t)').length") == 0

    # the input thumbnails show; the rollout tab swaps them for the overlays
    wait.until(lambda drv: all(c and w > 0 for _, c, w in _images_loaded(drv, "#grid img")))
    shown = _images_loaded(d, "#grid img")
    assert len(shown) == 4 and all(src.startswith("images/") for src, _, _ in shown)  # 1 card is skipped
    d.find_element(By.CSS_SELECTOR, '.tabs button[data-name="rollout"]').click()
    wait.until(lambda drv: all(c and w > 0 for _, c, w in _images_loaded(drv, "#grid img")))
    shown = _images_loaded(d, "#grid img")
    assert len(shown) == 4 and all(src.startswith("rollout/") for src, _, _ in shown)

    # a click opens the larger view of that image with every method; Escape closes it
    viewer = d.find_element(By.ID, "viewer")
    assert not viewer.is_displayed()
    target = next(c for c in cards if "done" in c.get_attribute("class"))
    key = target.find_element(By.CSS_SELECTOR, ".name").text
    target.click()
    wait.until(lambda drv: viewer.is_displayed())
    assert d.find_element(By.CSS_SELECTOR, "#viewer-body h2").text == key
    wait.until(lambda drv: len(_images_loaded(drv, "#viewer-body img")) == 3
               and all(c and w > 0 for _, c, w in _images_loaded(drv, "#viewer-body img")))
    big = d.execute_script("return document.querySelector('#viewer-body img').getBoundingClientRect().width")
    thumb = d.execute_script("return document.querySelector('#grid img.t1').getBoundingClientRect().width")
    assert big > thumb  # larger than the thumbnail
    # the input, the rollout overlay and the grid of heads: at least 256 px, shown at most at
    # their own size (never enlarged), no list of names under the grid (its labels are in it)
    sizes = d.execute_script(
        "return Array.from(document.querySelectorAll('#viewer-body img')).map(i => "
        "[i.getAttribute('src'), i.naturalWidth, i.naturalHeight, i.getBoundingClientRect().width, "
        "i.getBoundingClientRect().height]);")
    assert [s[0].split("/")[0] for s in sizes] == ["images", "rollout", "cls"]
    for src, nw, nh, w, h in sizes:
        assert min(nw, nh) >= 256, src
        assert 0 < w <= nw + 0.5 and 0 < h <= nh + 0.5, (src, nw, w)
        assert abs(w / h - nw / nh) < 0.02, src  # not stretched
    assert [s[3] for s in sizes[:2]] == [256, 256]  # room to spare: at their own size exactly
    assert d.find_elements(By.CSS_SELECTOR, "#viewer-body .names") == []
    d.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    wait.until(lambda drv: not viewer.is_displayed())

    # the skipped image shows its reason in its view
    skipped = next(c for c in cards if "skipped" in c.get_attribute("class"))
    skipped.click()
    wait.until(lambda drv: viewer.is_displayed())
    assert "truncated" in d.find_element(By.CSS_SELECTOR, "#viewer-body .why").text
    d.find_element(By.ID, "close").click()
    wait.until(lambda drv: not viewer.is_displayed())

    # paging: the last page holds the remaining 3 images and keeps the chosen tab
    d.find_element(By.CSS_SELECTOR, '.pager a[rel="next"]').click()
    wait.until(lambda drv: drv.execute_script("return document.body.dataset.page") == "2")
    d.find_element(By.CSS_SELECTOR, '.pager a[href="index-3.html"]').click()
    wait.until(lambda drv: drv.execute_script("return document.body.dataset.page") == "3")
    assert len(d.find_elements(By.CSS_SELECTOR, "#grid .card")) == 3
    assert d.execute_script("return document.body.dataset.tab") == "1"

    assert _errors(d) == []
