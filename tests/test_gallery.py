"""vitviz.gallery: a folder in, maps + manifest + pages out; resumable, shardable, loses nothing.

Every image is made by Pillow in the test; the model is a seeded random ViT-Ti/16 at 64 px
(the same weights as `vitviz gallery --model ti16 --random --image-size 64 --seed 0`).
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitviz
from vitviz.cli import main
from vitviz.errors import VitvizError
from vitviz.gallery import (
    MethodResult,
    build_gallery,
    get_method,
    list_methods,
    list_sources,
    merge_gallery,
    output_names,
    parse_shard,
    register_method,
    shard_of,
    unregister_method,
)
from vitviz.gallery import _manifest as mf
from vitviz.render.html import render_pages

REPO = Path(__file__).resolve().parent.parent
MODEL_ID = "ti16 (random)"  # what the CLI stores for `--model ti16 --random`


# --------------------------------------------------------------------------------------------
# fixtures: a seeded model and a folder with every kind of good, odd and broken input
# --------------------------------------------------------------------------------------------

def _seeded_model():
    torch.manual_seed(0)  # as `vitviz gallery --seed 0` does before loading
    return vitviz.load_model("ti16", pretrained=False, image_size=64, device="cpu")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The test machine runs several jobs on two cores: one intra-op thread is several times
    faster than two threads that wait for each other (the results are the same)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return _seeded_model()


def _noise(h, w, seed, c=3):
    return np.random.default_rng(seed).integers(0, 256, (h, w, c) if c else (h, w), dtype=np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png() -> bytes:
    """A valid PNG header declaring 40000 x 40000 pixels: Pillow refuses it as a decompression
    bomb (more than twice Image.MAX_IMAGE_PIXELS) before reading any pixel."""
    ihdr = struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")


GOOD_NAMES = {  # key -> how it is made
    "rgb.png", "photo.jpg", "gray.png", "la.png", "rgba.png", "palette.png", "palette_alpha.png",
    "cmyk.jpg", "deep16.png", "rotated.jpg", "tiny.png", "bits.png", "wide.bmp", "float.tif",
    "sub/dir/cat.png", "sub_dir_cat.png", "CAT.png", "cat.png",
    "<script>alert(1)<\\script>.png", "a&b \"q\" 'x'.png", "50% #1?.png", "café ünï 猫.png",
}
BAD = {  # key -> words expected in the reason
    "empty.jpg": "empty",
    "notes.png": "not an image",
    "cut.png": "truncated",
    "cut.jpg": "truncated",
    "header_only.png": "truncated",
    "bomb.png": "decompression bomb",
    "nan.tif": "NaN",
}


def _make_folder(root: Path) -> Path:
    src = root / "src"
    (src / "sub" / "dir").mkdir(parents=True)
    (src / ".hidden").mkdir()
    Image.fromarray(_noise(40, 56, 1)).save(src / "rgb.png")
    Image.fromarray(_noise(80, 60, 2)).save(src / "photo.jpg", quality=92)
    Image.fromarray(_noise(30, 30, 3, c=0)).save(src / "gray.png")
    la = Image.merge("LA", [Image.fromarray(_noise(20, 24, 4, c=0)), Image.fromarray(_noise(20, 24, 5, c=0))])
    la.save(src / "la.png")
    Image.fromarray(_noise(33, 47, 6, c=4)).save(src / "rgba.png")
    Image.fromarray(_noise(32, 32, 7)).convert("P").save(src / "palette.png")
    pa = Image.fromarray(_noise(32, 32, 8)).convert("P")
    pa.info["transparency"] = 0
    pa.save(src / "palette_alpha.png", transparency=0)
    Image.fromarray(_noise(48, 40, 9)).convert("CMYK").save(src / "cmyk.jpg")
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).save(src / "deep16.png")
    rot = Image.fromarray(_noise(30, 50, 10))
    exif = rot.getexif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees clockwise to show upright
    rot.save(src / "rotated.jpg", exif=exif)
    Image.new("RGB", (1, 1), (200, 10, 10)).save(src / "tiny.png")
    Image.fromarray(_noise(16, 16, 11, c=0) > 127).save(src / "bits.png")
    Image.fromarray(_noise(50, 200, 12)).save(src / "wide.bmp")
    Image.fromarray(np.random.default_rng(13).random((20, 20), dtype=np.float32)).save(src / "float.tif")
    for i, key in enumerate(["sub/dir/cat.png", "sub_dir_cat.png", "CAT.png", "cat.png",
                             "<script>alert(1)<\\script>.png", "a&b \"q\" 'x'.png", "50% #1?.png",
                             "café ünï 猫.png"]):
        Image.fromarray(_noise(36, 36, 20 + i)).save(src / key)
    # broken inputs
    (src / "empty.jpg").write_bytes(b"")
    (src / "notes.png").write_text("these are notes, not an image")
    png = (src / "rgb.png").read_bytes()
    (src / "cut.png").write_bytes(png[: len(png) // 2])
    jpg = (src / "photo.jpg").read_bytes()
    (src / "cut.jpg").write_bytes(jpg[: len(jpg) // 2])
    (src / "header_only.png").write_bytes(png[:12])
    (src / "bomb.png").write_bytes(_bomb_png())
    nan = np.ones((8, 8), np.float32)
    nan[2, 3] = np.nan
    Image.fromarray(nan).save(src / "nan.tif")
    # left out of a folder listing: hidden files and folders, non-image extensions
    Image.fromarray(_noise(8, 8, 30)).save(src / ".hidden" / "secret.png")
    Image.fromarray(_noise(8, 8, 31)).save(src / ".dotfile.png")
    (src / "labels.csv").write_text("a,b\n")
    return src


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return _make_folder(tmp_path_factory.mktemp("gallery-src"))


@pytest.fixture(scope="module")
def reference(folder, model, tmp_path_factory):
    """One uninterrupted, unsharded run over the mixed folder."""
    out = tmp_path_factory.mktemp("reference") / "g"
    result = build_gallery(folder, model, out, methods="rollout,cls", batch_size=4, workers=2,
                           progress=False, model_id=MODEL_ID, page_size=10)
    return out, result


def _files(d: Path) -> set[str]:
    skip = ("manifest-", "shard-")
    return {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file() and not p.name.startswith(skip)}


def _strip_probs(records):
    out = []
    for r in records:
        r = json.loads(json.dumps(r))
        for t in (r.get("top5") or []) + ([r["prediction"]] if r.get("prediction") else []):
            t["prob"] = round(t["prob"], 2)
        out.append(r)
    return out


def assert_same_gallery(a: Path, b: Path) -> None:
    """Same files, same manifest, same maps and pictures.

    Tolerances: a resumed or sharded run batches the images differently, and a BLAS may
    block a matrix product differently for another batch size, so maps are compared to
    float32 rounding, pictures to one grey level and probabilities to 2 decimals.
    """
    assert _files(a) == _files(b)
    ra, rb = mf.read_records(a / "manifest.jsonl"), mf.read_records(b / "manifest.jsonl")
    assert [r["key"] for r in ra] == sorted(r["key"] for r in ra)
    assert _strip_probs(ra) == _strip_probs(rb)
    for rel in _files(a):
        pa, pb = a / rel, b / rel
        if rel.endswith(".npy"):
            np.testing.assert_allclose(np.load(pa), np.load(pb), rtol=1e-5, atol=1e-7)
        elif rel.endswith((".png", ".jpg")):
            ia, ib = np.asarray(Image.open(pa)).astype(int), np.asarray(Image.open(pb)).astype(int)
            assert ia.shape == ib.shape and np.abs(ia - ib).max() <= 1, rel
        elif rel.endswith(".html"):
            import re

            mask = re.compile(r"\d+\.\d%")
            assert mask.sub("%", pa.read_text()) == mask.sub("%", pb.read_text()), rel
        else:
            assert pa.read_bytes() == pb.read_bytes(), rel


def assert_whole(out: Path) -> None:
    """Every file at a final name decodes completely; no manifest line is torn."""
    for p in out.rglob("*"):
        if not p.is_file() or p.name.endswith(".tmp"):
            continue
        if p.suffix == ".npy":
            assert np.isfinite(np.load(p)).all()
        elif p.suffix in (".png", ".jpg"):
            with Image.open(p) as im:
                im.load()
        elif p.suffix == ".jsonl":
            data = p.read_text(encoding="utf-8")
            assert data == "" or data.endswith("\n")
            for line in data.splitlines():
                json.loads(line)


# --------------------------------------------------------------------------------------------
# sources, names, shards
# --------------------------------------------------------------------------------------------

def test_folder_listing_is_recursive_sorted_and_skips_hidden_and_non_images(folder):
    keys = [s.key for s in list_sources(folder)]
    assert keys == sorted(keys)
    assert set(keys) == GOOD_NAMES | set(BAD)
    assert not any(k.startswith(".") or "/." in k or k.endswith(".csv") for k in keys)


def test_list_file_glob_and_path_traversal(tmp_path):
    (tmp_path / "lists").mkdir()
    (tmp_path / "imgs").mkdir()
    for n in ("a.png", "b.png"):
        Image.fromarray(_noise(8, 8, 0)).save(tmp_path / "imgs" / n)
    lst = tmp_path / "lists" / "todo.txt"
    lst.write_text("# comment\n\n../imgs/a.png\n" + str(tmp_path / "imgs" / "b.png") + "\n../imgs/a.png\n"
                   "../imgs/missing.png\n../imgs\n")
    srcs = list_sources(lst)
    # the root is the common folder: keys never climb out of it, duplicates collapse
    assert [s.key for s in srcs] == ["imgs", "imgs/a.png", "imgs/b.png", "imgs/missing.png"]
    assert all(".." not in s.key for s in srcs)
    assert [s.key for s in list_sources(str(tmp_path / "imgs" / "*.png"))] == ["a.png", "b.png"]
    assert [s.key for s in list_sources([tmp_path / "imgs" / "b.png"])] == ["b.png"]
    with pytest.raises(VitvizError, match="no such file or folder"):
        list_sources(tmp_path / "nowhere")
    with pytest.raises(VitvizError, match="no images found"):
        list_sources(str(tmp_path / "imgs" / "*.gif"))
    (tmp_path / "x.doc").write_text("x")
    with pytest.raises(VitvizError, match="list file"):
        list_sources(tmp_path / "x.doc")


def test_output_names_are_safe_unique_and_keep_unicode():
    from vitviz.gallery import Source

    keys = ["../../etc/passwd.png", "a/b.png", "a_b.png", "A_B.png", "<i>&\"'.png", "café 猫.png", ".png"]
    names = output_names([Source(k, k) for k in keys])
    assert len(set(n.lower() for n in names)) == len(names)
    for n in names:
        assert n and "/" not in n and "\\" not in n and not n.startswith(".")
        assert not set(n) & set("<>&\"' #%?")
    assert names[1] == "a_b" and names[2] == "a_b-2" and names[3] == "A_B-3"
    assert names[5] == "café_猫"


def test_shards_partition_the_keys_deterministically():
    keys = [f"dir{i % 7}/img{i}.jpg" for i in range(500)]
    parts = {k: shard_of(k, 4) for k in keys}
    assert set(parts.values()) == {1, 2, 3, 4}
    assert all(60 < list(parts.values()).count(s) < 190 for s in (1, 2, 3, 4))  # balanced enough
    assert {k: shard_of(k, 4) for k in reversed(keys)} == parts  # order-independent
    assert all(shard_of(k, 1) == 1 for k in keys)
    assert parse_shard("2/4") == (2, 4) and parse_shard(None) is None
    for bad in ("0/4", "5/4", "2", "a/b", "1/0"):
        with pytest.raises(VitvizError, match="--shard"):
            parse_shard(bad)


def test_manifest_reader_drops_a_torn_line_and_combine_prefers_done(tmp_path):
    p = tmp_path / "manifest.jsonl"
    good = [{"key": "b", "status": "skipped"}, {"key": "a", "status": "done"}]
    p.write_bytes(b"".join(mf.dumps(r).encode() for r in good) + b'{"key": "c", "sta')
    assert mf.read_records(p) == good
    recs = mf.combine(good + [{"key": "b", "status": "done", "n": 1}, {"key": "a", "status": "skipped"}])
    assert recs == [{"key": "a", "status": "done"}, {"key": "b", "status": "done", "n": 1}]


# --------------------------------------------------------------------------------------------
# the methods registry
# --------------------------------------------------------------------------------------------

def test_registry_lists_builtins_and_names_close_ones():
    assert {"rollout", "cls"} <= set(list_methods())
    with pytest.raises(VitvizError, match="did you mean rollout"):
        get_method("rolout")
    with pytest.raises(VitvizError, match="no option"):
        get_method("rollout").options({"discard": 0.5})
    for bad in ("a,b", "../up", "with space", "images", ""):
        with pytest.raises(ValueError):
            register_method(bad)(lambda inp: None)


# --------------------------------------------------------------------------------------------
# one run over the mixed folder
# --------------------------------------------------------------------------------------------

def test_mixed_folder_good_done_bad_skipped_with_reasons(reference, folder):
    out, result = reference
    assert result.exit_code == 1
    status = {r["key"]: r["status"] for r in result.records}
    assert {k for k, s in status.items() if s == "done"} == GOOD_NAMES
    reasons = {r["key"]: r["reason"] for r in result.skipped}
    assert set(reasons) == set(BAD)
    for key, words in BAD.items():
        assert words.lower() in reasons[key].lower(), (key, reasons[key])
    assert not result.failed
    records = mf.read_records(out / "manifest.jsonl")
    assert records == result.records and [r["key"] for r in records] == sorted(status)
    for r in result.skipped:
        assert r["outputs"] == {} and r["image"] is None and not list(out.rglob(f"{r['name']}.*"))
    assert_whole(out)
    assert not list(out.rglob("*.tmp"))
    # every written file is inside the gallery folder and named by its safe stem
    for p in out.rglob("*"):
        assert p.resolve().is_relative_to(out.resolve())


def _decoded(rgb: np.ndarray) -> np.ndarray:
    """``rgb`` through the gallery's JPEG encoder and back (int)."""
    import io

    from vitviz.gallery._draw import _jpeg

    return np.asarray(Image.open(io.BytesIO(_jpeg(rgb)))).astype(int)


def test_outputs_equal_the_analyzers_one_image_at_a_time(reference, folder, model):
    """Equivalence with the source of truth: each image alone through capture + rollout / cls_maps,
    its overlay through vitviz.overlay, its top-5 from the logits."""
    from vitviz.gallery._draw import TILE_SIDE, tile
    from vitviz.render import display_image

    out, result = reference
    by_key = {r["key"]: r for r in result.done}
    for key in ("rgb.png", "rotated.jpg", "café ünï 猫.png", "deep16.png"):
        rec = by_key[key]
        x = model.preprocess(folder / key)  # [1, 3, 64, 64]
        with torch.no_grad(), vitviz.capture(model) as rec_:
            logits = model(x)
        roll = vitviz.rollout(rec_.attentions)[0].numpy()  # [4, 4]
        heads = vitviz.cls_maps(rec_.attentions)[0].numpy()  # [3, 4, 4]
        np.testing.assert_allclose(np.load(out / rec["outputs"]["rollout"]["npy"]), roll, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.load(out / rec["outputs"]["cls"]["npy"]), heads, rtol=1e-5, atol=1e-7)
        assert rec["outputs"]["cls"]["names"] == ["head 0", "head 1", "head 2"]
        view = model.preprocessor.view(folder / key)  # [64, 64, 3]
        shown = display_image(view)  # [256, 256, 3]: 4x4 blocks of the view
        assert shown.shape == (256, 256, 3) and (shown[::4, ::4] == view).all()
        # the pictures are JPEG: the decoded file is vitviz.overlay of the saved map, encoded
        # (quality 90, 4:4:4; these noise images are JPEG's worst case: a few grey levels off)
        heat = np.load(out / rec["outputs"]["rollout"]["npy"])
        pic = np.asarray(Image.open(out / rec["outputs"]["rollout"]["overlay"])).astype(int)
        assert rec["outputs"]["rollout"]["size"] == [256, 256] == list(pic.shape[:2])
        want = vitviz.overlay(shown, heat)
        np.testing.assert_array_equal(pic, _decoded(want))
        assert np.abs(pic - want).mean() < 4
        grid = np.asarray(Image.open(out / rec["outputs"]["cls"]["overlay"])).astype(int)
        tiles = [vitviz.overlay(shown, h) for h in np.load(out / rec["outputs"]["cls"]["npy"])]
        assert tiles[0].shape[:2] == (TILE_SIDE, TILE_SIDE)
        np.testing.assert_array_equal(grid, _decoded(tile(tiles, rec["outputs"]["cls"]["names"])))
        jpg = np.asarray(Image.open(out / rec["image"])).astype(int)  # JPEG of the view as shown
        assert jpg.shape == shown.shape
        if key == "deep16.png":  # a smooth gradient: JPEG keeps it within a few grey levels
            assert np.abs(jpg - shown).mean() < 3
        p = logits.softmax(-1)[0]
        top = p.topk(5)
        assert [t["index"] for t in rec["top5"]] == top.indices.tolist()
        np.testing.assert_allclose([t["prob"] for t in rec["top5"]], top.values.numpy(), atol=6e-5)
        assert rec["prediction"] == rec["top5"][0]


def _dark_run_median(gray: np.ndarray) -> float:
    """Median width of the horizontal runs of dark pixels (< 128): a text's stroke width."""
    dark = np.pad(gray < 128, ((0, 0), (1, 1)))
    d = np.diff(dark.astype(int), axis=1)
    starts, ends = np.nonzero(d == 1), np.nonzero(d == -1)
    return float(np.median(ends[1] - starts[1]))


def test_pictures_are_at_least_256_px_and_grid_labels_are_text_at_their_size(reference):
    """Every picture written (the input, each overlay, each grid) is at least 256 px on its short
    side; a grid's tiles are exactly TILE_SIDE px, GAP px apart, each with its name drawn under it
    at the picture's resolution: strokes about 1-2 px wide, as label_band draws them. The same
    text drawn at a quarter of the size and enlarged 4x (the 64 px tiles of before) has strokes
    of 4 px or more, so the check can fail."""
    import math

    from vitviz.gallery._draw import GAP, TILE_SIDE, band_height, label_band, label_px

    out, result = reference
    px = label_px(TILE_SIDE)
    band = band_height(px)
    for rec in result.done:
        for rel in [rec["image"]] + [o["overlay"] for o in rec["outputs"].values()]:
            with Image.open(out / rel) as im:
                assert min(im.size) >= 256, rel
        cls = rec["outputs"]["cls"]
        grid = np.asarray(Image.open(out / cls["overlay"]).convert("RGB")).astype(int)
        k = len(cls["names"])
        cols = math.ceil(math.sqrt(k))
        rows = math.ceil(k / cols)
        assert grid.shape[:2] == (rows * (TILE_SIDE + band + GAP) - GAP, cols * (TILE_SIDE + GAP) - GAP)
        assert cls["size"] == list(grid.shape[:2])
        for i, name in enumerate(cls["names"]):
            r, c = divmod(i, cols)
            y, x = r * (TILE_SIDE + band + GAP) + TILE_SIDE, c * (TILE_SIDE + GAP)
            got = grid[y:y + band, x:x + TILE_SIDE]
            assert np.abs(got - label_band(name, TILE_SIDE, px)).mean() < 3, name
            assert _dark_run_median(got.mean(-1)) <= 2.5
    small = label_band("head 0", TILE_SIDE // 4, px // 4).mean(-1)
    assert _dark_run_median(np.repeat(np.repeat(small, 4, 0), 4, 1)) >= 4


def test_look_options_reach_the_pictures_and_are_part_of_the_settings(model, tmp_path):
    """cmap / alpha / smooth are vitviz.overlay's: the classic look (jet, constant 0.5, smooth)
    gives its picture, is stored in gallery.json, and resuming with the default look is refused."""
    import io

    from vitviz.gallery._draw import _jpeg
    from vitviz.render import display_image

    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(_noise(40, 40, 70)).save(src / "a.png")
    out = tmp_path / "g"
    res = build_gallery(src, model, out, methods="rollout", cmap="jet", alpha=0.5, smooth=True, workers=0,
                        progress=False, model_id=MODEL_ID)
    rec = res.done[0]
    shown = display_image(model.preprocessor.view(src / "a.png"))
    heat = np.load(out / rec["outputs"]["rollout"]["npy"])
    pic = np.asarray(Image.open(out / rec["outputs"]["rollout"]["overlay"]))
    want = vitviz.overlay(shown, heat, cmap="jet", alpha=0.5, smooth=True)
    np.testing.assert_array_equal(pic, np.asarray(Image.open(io.BytesIO(_jpeg(want)))))
    assert not np.array_equal(want, vitviz.overlay(shown, heat, cmap="jet", alpha=0.5))  # smooth did something
    cfg = json.loads((out / "gallery.json").read_text())
    assert (cfg["cmap"], cfg["alpha"], cfg["smooth"]) == ("jet", 0.5, True)
    with pytest.raises(VitvizError, match="smooth"):
        build_gallery(src, model, out, methods="rollout", cmap="jet", alpha=0.5, workers=0, progress=False,
                      model_id=MODEL_ID)
    with pytest.raises(VitvizError, match="alpha must be in"):
        build_gallery(src, model, tmp_path / "g2", methods="rollout", alpha=1.5, progress=False)


def test_opencv_threads_are_one_during_the_run_and_restored_after(model, folder, tmp_path):
    """The render threads draw beside the model: OpenCV's own worker threads are off while the
    gallery runs (read in on_record, called as batches finish) and back as they were after it;
    the rendered images' records come in gallery order although each batch is split between the
    render threads (a batch's skipped images are recorded first)."""
    import cv2

    before = cv2.getNumThreads()
    cv2.setNumThreads(3)
    seen: list[tuple[int, str, str]] = []
    try:
        r = build_gallery(folder, model, tmp_path / "g", methods="rollout", batch_size=4, workers=0,
                          render_threads=2, progress=False, limit=8,
                          on_record=lambda rec: seen.append((cv2.getNumThreads(), rec["key"], rec["status"])))
        assert cv2.getNumThreads() == 3
    finally:
        cv2.setNumThreads(before)
    assert len(seen) == 8 and {n for n, _, _ in seen} == {1}
    done = [k for _, k, status in seen if status == "done"]
    assert len(done) >= 6 and done == [rec["key"] for rec in r.records if rec["status"] == "done"]


def test_html_pages_escape_every_name_and_are_paged(reference):
    out, result = reference
    pages = sorted(out.glob("index*.html"))
    assert [p.name for p in pages] == ["index-2.html", "index-3.html", "index.html"]  # 29 records, 10/page
    text = "".join(p.read_text(encoding="utf-8") for p in pages)
    assert "<script>alert" not in text and "&lt;script&gt;alert(1)&lt;\\script&gt;.png" in text
    assert "a&amp;b &quot;q&quot; &#x27;x&#x27;.png" in text
    assert text.count("<script>") == 3  # the page's own script, once per page
    assert "café ünï 猫.png" in text
    assert 'data-total="29"' in (out / "index.html").read_text()
    # no network: no http(s) reference anywhere
    assert "http://" not in text and "https://" not in text


def test_render_pages_pure_golden():
    recs = [{"key": "x<y>.png", "source": "s/x<y>.png", "status": "done", "image": "images/x_y.jpg",
             "prediction": {"index": 3, "label": "tabby & co", "prob": 0.5},
             "top5": [{"index": 3, "label": "tabby & co", "prob": 0.5}], "caption": None,
             "outputs": {"rollout": {"overlay": "rollout/x_y.jpg", "npy": "rollout/x_y.npy", "size": [256, 320]}}},
            {"key": "bad.png", "source": "bad.png", "status": "skipped", "reason": "<b>broken</b>",
             "outputs": {}}]
    (name, page), = render_pages(recs, methods=["rollout"], page_size=5)
    assert name == "index.html"
    assert page.count('class="card ') == 2
    assert '<span class="pred">tabby &amp; co (50.0%)</span>' in page
    assert '<span class="why">&lt;b&gt;broken&lt;/b&gt;</span>' in page
    assert 'src="rollout/x_y.jpg"' in page and "<b>broken" not in page
    # the large view shows the picture at its own size (never enlarged), no list of names under it
    assert '<img src="rollout/x_y.jpg" width="320" height="256"' in page and 'class="names"' not in page
    two = render_pages(recs * 3, methods=["rollout"], page_size=4)
    assert [n for n, _ in two] == ["index.html", "index-2.html"]
    assert 'href="index-2.html"' in two[0][1] and 'href="index.html"' in two[1][1]


# --------------------------------------------------------------------------------------------
# resume, interruption, shards
# --------------------------------------------------------------------------------------------

_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch, vitviz
    from vitviz.gallery import build_gallery
    src, out, at, how = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    if how == "cli":  # SIGTERM through the command line, at the at-th record
        import vitviz.cli.commands.gallery as g
        seen = []
        report = g._report_record
        def counting(rec, write):
            seen.append(rec)
            if len(seen) == at:
                os.kill(os.getpid(), signal.SIGTERM)
            report(rec, write)
        g._report_record = counting
        from vitviz.cli import main
        sys.exit(main(["gallery", src, "--model", "ti16", "--random", "--image-size", "64",
                       "--out", out, "--batch-size", "3", "--workers", "1", "--no-progress"]))
    torch.manual_seed(0)
    m = vitviz.load_model("ti16", pretrained=False, image_size=64, device="cpu")
    n = [0]
    def on_record(rec):
        n[0] += 1
        if n[0] == at:  # killed hard while the render threads write the next batches
            os.kill(os.getpid(), signal.SIGKILL)
    build_gallery(src, m, out, batch_size=3, workers=0, render_threads=2, progress=False,
                  model_id="ti16 (random)", on_record=on_record, page_size=10)
""")


def test_killed_run_leaves_whole_files_and_resumes_to_the_same_gallery(folder, model, reference, tmp_path):
    """SIGKILL mid-run (in a subprocess), and SIGTERM through the CLI: only whole files; the
    re-run finishes the rest and equals the uninterrupted run."""
    script = tmp_path / "kill.py"
    script.write_text(_KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    hard, soft = tmp_path / "hard", tmp_path / "soft"
    procs = [subprocess.Popen([sys.executable, str(script), str(folder), str(d), "7", how], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for d, how in ((hard, "api"), (soft, "cli"))]
    (_, err_hard), (_, err_soft) = [p.communicate(timeout=240) for p in procs]
    assert procs[0].returncode == -signal.SIGKILL, err_hard[-2000:]
    assert procs[1].returncode == 130, err_soft[-2000:]
    assert "interrupted" in err_soft

    # hard kill: whole files only (temporary files may remain; they never carry a final name)
    assert_whole(hard)
    journaled = mf.read_records(hard / "manifest.jsonl")
    assert 7 <= len(journaled) < 29
    # soft stop: the threads finished their files, the manifest and a page were written
    assert_whole(soft)
    assert not list(soft.rglob("*.tmp"))
    partial = mf.read_records(soft / "manifest.jsonl")
    assert 7 <= len(partial) < 29 and [r["key"] for r in partial] == sorted(r["key"] for r in partial)
    assert (soft / "index.html").is_file()

    for d, before in ((hard, journaled), (soft, partial)):
        result = build_gallery(folder, model, d, batch_size=5, workers=0, progress=False,
                               model_id=MODEL_ID, page_size=10)
        assert result.processed == 29 - sum(r["status"] == "done" for r in before)
        assert result.exit_code == 1
        assert not list(d.rglob("*.tmp"))
        assert_same_gallery(d, reference[0])
    # and once more: nothing left to do
    again = build_gallery(folder, model, hard, progress=False, model_id=MODEL_ID, page_size=10, workers=0)
    assert again.processed == len(again.skipped) == len(BAD)  # only the unreadable ones are retried


def test_shards_merged_equal_a_single_run(folder, model, reference, tmp_path):
    out = tmp_path / "sharded"
    results = [build_gallery(folder, model, out, shard=f"{k}/3", batch_size=4, workers=0,
                             progress=False, model_id=MODEL_ID, page_size=10) for k in (1, 2, 3)]
    keys = [{r["key"] for r in res.records} for res in results]
    assert sum(map(len, keys)) == 29 and set().union(*keys) == {r["key"] for r in reference[1].records}
    assert results[0].index is None and results[1].index is None
    assert results[2].index == out / "index.html"  # the last shard merged automatically
    assert_same_gallery(out, reference[0])
    (out / "index.html").unlink()
    (out / "manifest.jsonl").unlink()
    merged = merge_gallery(out, page_size=10)
    assert merged.exit_code == 1 and len(merged.records) == 29
    assert_same_gallery(out, reference[0])


def test_other_settings_in_the_same_folder_are_refused(folder, model, reference):
    with pytest.raises(VitvizError, match="other settings.*methods"):
        build_gallery(folder, model, reference[0], methods="rollout", progress=False, model_id=MODEL_ID)
    other = _seeded_model()
    torch.nn.init.normal_(other.module.head.weight)
    with pytest.raises(VitvizError, match="weights"):
        build_gallery(folder, other, reference[0], progress=False, model_id=MODEL_ID)


# --------------------------------------------------------------------------------------------
# methods written elsewhere plug in
# --------------------------------------------------------------------------------------------

def test_registered_methods_plug_in_several_maps_texts_and_failures(model, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        Image.fromarray(_noise(40, 40, 50 + i)).save(src / f"im{i}.png")

    @register_method("words", needs="model", description="test: a caption and one map per word")
    def _words(inp):
        b = inp.x.shape[0]
        maps = [torch.rand(j % 3 + 1, 4, 4) for j in range(b)]  # K varies per image
        return MethodResult(maps, names=[[f"w{k}" for k in range(len(m))] for m in maps],
                            texts=[f"a caption <{j}>" for j in range(b)])

    @register_method("nan_first", description="test: NaN for the first image of every batch")
    def _nan_first(inp):
        heat = vitviz.rollout(inp.attentions)  # [B, gh, gw]
        heat[0] = float("nan")
        return heat

    try:
        r = build_gallery(src, model, tmp_path / "g", methods="rollout,words", batch_size=2, workers=0,
                          progress=False)
        assert r.exit_code == 0 and len(r.done) == 5
        for rec in r.done:
            k = rec["outputs"]["words"]["shape"][0]
            assert rec["outputs"]["words"]["names"] == [f"w{i}" for i in range(k)]
            assert np.load(tmp_path / "g" / rec["outputs"]["words"]["npy"]).shape == (k, 4, 4)
            assert rec["caption"].startswith("a caption <")
        assert "a caption &lt;0&gt;" in (tmp_path / "g" / "index.html").read_text()
        bad = build_gallery(src, model, tmp_path / "n", methods="nan_first", batch_size=2, workers=0,
                            progress=False)
        assert bad.exit_code == 1
        assert [rec["key"] for rec in bad.failed] == ["im0.png", "im2.png", "im4.png"]
        assert all("NaN" in rec["reason"] for rec in bad.failed)
        assert not list((tmp_path / "n" / "nan_first").glob("im0.*"))
    finally:
        unregister_method("words")
        unregister_method("nan_first")


# --------------------------------------------------------------------------------------------
# 200 images, the command line, exit statuses
# --------------------------------------------------------------------------------------------

def test_cli_200_images_in_ci_time_then_resume_is_a_no_op(tmp_path, capsys):
    src = tmp_path / "many"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(200):
        a = np.zeros((48, 64, 3), np.uint8)
        a[..., i % 3] = 60
        y, x = rng.integers(0, 32), rng.integers(0, 48)
        a[y:y + 16, x:x + 16] = rng.integers(100, 256, 3)
        Image.fromarray(a).save(src / f"shape_{i:03d}.png")
    out = tmp_path / "g"
    t0 = time.perf_counter()
    code = main(["gallery", str(src), "--model", "ti16", "--random", "--image-size", "64", "--out", str(out),
                 "--batch-size", "32", "--workers", "2", "--no-progress"])
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert code == 0, err
    assert "200 done, 0 skipped, 0 failed" in err and "images/s" in err
    assert seconds < 90
    assert len(mf.read_records(out / "manifest.jsonl")) == 200
    assert len(list((out / "rollout").glob("*.jpg"))) == 200 and len(list((out / "cls").glob("*.npy"))) == 200
    assert len(list(out.glob("index*.html"))) == 2  # 100 per page
    code = main(["gallery", str(src), "--model", "ti16", "--random", "--image-size", "64", "--out", str(out),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0 and "200 done" in err and "processed" not in err


def test_cli_exit_statuses_and_messages(folder, tmp_path, capsys):
    out = tmp_path / "g"
    base = ["gallery", str(folder), "--model", "ti16", "--random", "--image-size", "64", "--workers", "0",
            "--no-progress"]
    assert main(base + ["--out", str(out), "--limit", "11"]) == 1  # the 11 first keys include bad files
    err = capsys.readouterr().err
    assert "skipped" in err and "bomb.png" in err and "cut.jpg" in err
    for args, words in [(["--out", str(out), "--shard", "0/3"], "--shard"),
                        (["--out", str(out), "--batch-size", "0"], "--batch-size"),
                        (["--out", str(out), "--methods", "rolout"], "did you mean rollout"),
                        (["--out", str(out), "--methods", "rollout"], "other settings"),
                        (["--out", str(out), "--discard-ratio", "1.5"], "--discard-ratio"),
                        ([], "--out DIR is required")]:
        assert main(base + args) == 2, args
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert main(["gallery", str(tmp_path / "nowhere"), "--model", "ti16", "--random", "--out", str(out)]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert main(["gallery", "--merge", str(tmp_path)]) == 2
    assert "not a vitviz gallery" in capsys.readouterr().err
    assert main(["gallery", "--merge", str(out)]) == 1
    assert main(["gallery", "--list-methods"]) == 0
    assert "rollout" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["gallery", str(folder), "--batch-size", "many"])
    assert e.value.code == 2


def test_importing_the_gallery_and_merging_need_no_torch():
    code = ("import sys; import vitviz.gallery, vitviz.render.html, vitviz.cli.commands.gallery; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "False"
