"""Video files in a gallery (issue 28): a video model maps each clip (a strip thumbnail, the
animation in the large view, the raw maps); bad files and, for an image model, video files are
skipped with their reason."""


import helpers
import numpy as np
import pytest
import torch
from helpers import decode_all
from PIL import Image

import vitviz
from vitviz.gallery import build_gallery

FRAMES, TUBELET = 4, 2


@pytest.fixture(scope="module")
def video_model():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.VideoMAEConfig(image_size=32, patch_size=8, num_frames=FRAMES, tubelet_size=TUBELET, hidden_size=32,
                            num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3)
    return vitviz.wrap(tf.VideoMAEForVideoClassification(cfg).eval())


def write_video(path, n, *, fourcc="mp4v", size=(48, 40)):
    """A real video: a red square moving right, ``n`` frames at 10 fps."""
    w, h = size
    frames = []
    for i in range(n):
        f = np.full((h, w, 3), 40, np.uint8)
        f[10:20, 2 * i:2 * i + 10] = (230, 30, 30)  # RGB red
        frames.append(f)
    return helpers.write_video(path, frames, fourcc=fourcc)


def test_video_model_gallery_items(video_model, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_video(src / "clip.mp4", 20)
    data = write_video(tmp_path / "long.avi", 20, fourcc="MJPG").read_bytes()
    (src / "truncated.avi").write_bytes(data[:int(len(data) * 0.7)])
    Image.new("RGB", (32, 32), (200, 10, 10)).save(src / "still.png")
    out = tmp_path / "gallery"
    result = build_gallery(src, video_model, out, methods="rollout,cls", workers=0, progress=False)
    recs = {r["key"]: r for r in result.records}
    assert result.exit_code == 1
    assert recs["clip.mp4"]["status"] == "done"
    assert recs["still.png"]["status"] == "skipped" and "is a still image (PNG)" in recs["still.png"]["reason"]
    assert recs["truncated.avi"]["status"] == "skipped" and "truncated" in recs["truncated.avi"]["reason"]

    outputs = recs["clip.mp4"]["outputs"]
    # the raw rollout equals vitviz.rollout on the clip sampled by the rule (frames 0, 5, 10, 15 of 20)
    frames = decode_all(src / "clip.mp4")
    x = torch.stack([video_model.preprocessor(frames[i])[0] for i in (0, 5, 10, 15)])[None]
    with vitviz.capture(video_model) as rec:
        video_model(x)
    ref = vitviz.rollout(rec.attentions)[0].numpy()  # [2, 4, 4]
    np.testing.assert_allclose(np.load(out / outputs["rollout"]["npy"]), ref, rtol=1e-5, atol=1e-7)
    assert np.load(out / outputs["cls"]["npy"]).shape == (2, FRAMES // TUBELET, 4, 4)  # heads, frames, gh, gw
    for m in ("rollout", "cls"):
        with Image.open(out / outputs[m]["overlay"]) as im:  # the strip thumbnail
            assert [im.size[1], im.size[0]] == outputs[m]["size"]
        with Image.open(out / outputs[m]["animation"]) as im:
            assert im.format == "WEBP" and im.n_frames == FRAMES
        assert outputs[m]["names"] == ["frames 0, 5", "frames 10, 15"]
    with Image.open(out / recs["clip.mp4"]["image"]) as im:
        assert im.size[0] > im.size[1] >= 256  # two positions side by side
    page = (out / "index.html").read_text()
    assert f'src="{outputs["rollout"]["animation"]}"' in page  # the large view shows the animation
    assert "is a still image (PNG)" in page


def test_image_model_gallery_skips_videos(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_video(src / "clip.mp4", 8)
    Image.new("RGB", (64, 64), (10, 200, 10)).save(src / "green.png")
    model = vitviz.load_model("shapes-vit")
    result = build_gallery(src, model, tmp_path / "g", methods="rollout", workers=0, progress=False)
    recs = {r["key"]: r for r in result.records}
    assert recs["green.png"]["status"] == "done"
    assert recs["clip.mp4"]["status"] == "skipped"
    assert "is a video (MP4), not an image, and the model takes still images" in recs["clip.mp4"]["reason"]
    assert result.exit_code == 1


def test_video_item_in_a_real_browser(video_model, tmp_path):
    """The page opened from file:// in headless Chromium: the clip's card shows its strip, and its
    large view plays the animations (loaded, at most at their own size)."""
    from helpers import headless_chromium
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    src = tmp_path / "src"
    src.mkdir()
    write_video(src / "clip.mp4", 20)
    out = tmp_path / "gallery"
    result = build_gallery(src, video_model, out, methods="rollout,cls", workers=0, progress=False)
    outputs = result.records[0]["outputs"]
    shown = ("return Array.from(document.querySelectorAll(arguments[0])).filter(i => i.offsetParent !== null)"
             ".map(i => [i.getAttribute('src'), i.complete, i.naturalWidth, i.getBoundingClientRect().width]);")
    with headless_chromium("1280,1600") as d:
        d.get((out / "index.html").resolve().as_uri())
        wait = WebDriverWait(d, 20)
        wait.until(lambda drv: drv.execute_script("return document.readyState") == "complete")
        d.find_element(By.CSS_SELECTOR, '.tabs button[data-name="rollout"]').click()
        wait.until(lambda drv: all(c and w > 0 for _, c, w, _ in drv.execute_script(shown, "#grid img")))
        assert [s[0] for s in d.execute_script(shown, "#grid img")] == [outputs["rollout"]["overlay"]]  # the strip
        d.find_element(By.CSS_SELECTOR, "#grid .card").click()
        wait.until(lambda drv: drv.find_element(By.ID, "viewer").is_displayed())
        wait.until(lambda drv: all(c and w > 0 for _, c, w, _ in drv.execute_script(shown, "#viewer-body img")))
        big = d.execute_script(shown, "#viewer-body img")
        for m in ("rollout", "cls"):
            assert outputs[m]["animation"] in [s[0] for s in big]
        for src_, _, natural, width in big:
            assert 0 < width <= natural + 0.5, src_
        assert not [e for e in d.get_log("browser") if e.get("level") in ("SEVERE", "ERROR")]
