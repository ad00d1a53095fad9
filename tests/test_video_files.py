"""Video files through a video model (issue 28): read with OpenCV, sampled as transformers' video
processors sample, written as .npy / MP4 / WebP / frame strip, and bad files refused one line each.

The clips are real MP4s written by ``cv2.VideoWriter`` in the test (a square moving right, so the
frames differ); the model is a tiny random VideoMAE saved to a folder with its image processor and
loaded by the CLI with ``--model DIR``. References are computed here: the frames read with a plain
``cv2.VideoCapture`` loop, the sampling rule written out, and the maps from ``vitviz.rollout`` /
``vitviz.cls_maps`` / ``vitviz.relevance`` on that clip tensor.
"""

import io
import os
import re
from pathlib import Path

import cv2
import helpers
import numpy as np
import pytest
import torch
from _figcheck import overlapping_labels
from helpers import decode_all
from PIL import Image

import vitviz
from vitviz.cli import main
from vitviz.errors import RenderError, VideoError
from vitviz.models import read_video, sample_indices
from vitviz.render import clip_overlays, clip_strip, display_image, frame_label

FRAMES, TUBELET, GRID = 4, 2, (4, 4)  # the tiny model: 4 input frames, tubelets of 2, 32 px / 8 px patches


# --------------------------------------------------------------------------------------------
# fixtures: a tiny VideoMAE in a folder, real video files
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.VideoMAEConfig(image_size=32, patch_size=8, num_frames=FRAMES, tubelet_size=TUBELET, hidden_size=32,
                            num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3)
    d = tmp_path_factory.mktemp("videomae")
    tf.VideoMAEForVideoClassification(cfg).eval().save_pretrained(d)
    # shortest edge then a centre crop, as VideoMAE checkpoints (224 / 224) at this size
    tf.VideoMAEImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def vm(model_dir):
    return vitviz.load_model(str(model_dir))


def moving_square(n, size=(64, 48)):
    """``n`` RGB frames ``[H, W, 3]``: a red square moving right over a grey-blue background."""
    w, h = size
    out = []
    for i in range(n):
        f = np.zeros((h, w, 3), np.uint8)
        f[..., 2] = 90 + 5 * i
        f[..., 1] = 40
        x = (3 * i) % (w - 12)
        f[14:26, x:x + 12] = (230, 30, 30)
        out.append(f)
    return out


def write_video(path, n, *, fourcc="mp4v", fps=10.0, size=(64, 48)):
    return helpers.write_video(path, moving_square(n, size), fourcc=fourcc, fps=fps)


def reference_clip(vm, path, indices):
    """``(views [T, 32, 32, 3], x [1, T, 3, 32, 32])`` of the given source frames, each through the
    model's image preprocessing."""
    frames = decode_all(path)
    views = np.stack([vm.preprocessor.view(frames[i]) for i in indices])
    x = torch.stack([vm.preprocessor(frames[i])[0] for i in indices])[None]
    return views, x


def run_cli(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------------------------
# sampling: golden indices
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("total, n, stride, expected", [
    (10, 4, None, [0, 2, 5, 7]),  # i * 10 // 4
    (4, 4, None, [0, 1, 2, 3]),
    (300, 16, None, [0, 18, 37, 56, 75, 93, 112, 131, 150, 168, 187, 206, 225, 243, 262, 281]),  # 18.75 apart
    (10, 4, 2, [1, 3, 5, 7]),  # a segment of 7 frames, centred: starts at (10 - 7) // 2 = 1
    (20, 4, 3, [5, 8, 11, 14]),  # segment 10, start 5
    (7, 4, 2, [0, 2, 4, 6]),  # the segment is the whole video
    (100, 16, 4, list(range(19, 80, 4))),  # segment 61, start 19
])
def test_sample_indices_golden(total, n, stride, expected):
    assert sample_indices(total, n, stride).tolist() == expected


@pytest.mark.parametrize("total, n", [(10, 4), (300, 16), (17, 16), (16, 16), (1000, 8)])
def test_even_sampling_is_transformers_default(total, n):
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn

    ref = default_sample_indices_fn(VideoMetadata(total_num_frames=total, fps=30.0), num_frames=n)
    assert sample_indices(total, n).tolist() == list(ref)


def test_too_few_frames_say_how_many_and_what_fits():
    with pytest.raises(VideoError, match=r"has 3 decodable frame\(s\) but the model takes clips of 4 frames"):
        sample_indices(3, 4, name="c.mp4")
    with pytest.raises(VideoError, match=r"4 frames 7 apart need 22; use --frame-stride 6 or less") as e:
        sample_indices(20, 4, 7, name="c.mp4")
    assert "\n" not in str(e.value) and str(e.value).startswith("c.mp4: ")


# --------------------------------------------------------------------------------------------
# reading real files
# --------------------------------------------------------------------------------------------

def test_read_video_samples_the_decoded_frames(tmp_path):
    path = write_video(tmp_path / "c.mp4", 20)
    frames = decode_all(path)
    assert len(frames) == 20
    clip = read_video(path, 4)
    assert clip.indices.tolist() == [0, 5, 10, 15] and clip.total == 20 and clip.fps == pytest.approx(10.0)
    for k, i in enumerate(clip.indices):
        np.testing.assert_array_equal(clip.frames[k], frames[i])
    clip = read_video(path, 4, stride=3)
    assert clip.indices.tolist() == [5, 8, 11, 14]
    np.testing.assert_array_equal(clip.frames[1], frames[8])
    # the frames differ (the square moves): a test of order could not pass by accident
    assert not np.array_equal(clip.frames[0], clip.frames[1])


def test_frame_preprocessing_matches_transformers_processor(vm, tmp_path):
    """Each frame through vitviz's Preprocess equals VideoMAEImageProcessor on the clip (to one
    uint8 level of rounding in the resize)."""
    import transformers as tf

    path = write_video(tmp_path / "c.mp4", 20)
    clip = read_video(path, 4)
    _, x = reference_clip(vm, path, clip.indices)
    proc = tf.VideoMAEImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    ref = proc(list(clip.frames), return_tensors="pt").pixel_values  # [1, T, 3, 32, 32]
    assert ref.shape == x.shape
    diff = (ref - x).abs()
    assert diff.max() <= 1.01 / 127.5 and diff.mean() < 1e-3


# --------------------------------------------------------------------------------------------
# the CLI on a real MP4: every output opened and checked
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stride, indices", [(None, [0, 5, 10, 15]), (3, [5, 8, 11, 14])])
def test_rollout_cli_writes_npy_mp4_webp_strip(vm, model_dir, tmp_path, capsys, stride, indices):
    clip = write_video(tmp_path / "clip.mp4", 20)
    out = tmp_path / "out"
    args = ["rollout", str(clip), "--model", str(model_dir), "--out", str(out)]
    if stride:
        args += ["--frame-stride", str(stride)]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    written = [line.split(" -> ")[1].split("  [")[0] for line in stdout.splitlines()]
    assert [Path(p).name for p in written] == ["clip_rollout.npy", "clip_rollout.mp4", "clip_rollout.webp",
                                               "clip_rollout.png"]
    # .npy: [frames, gh, gw] float32, equal to vitviz.rollout on the clip sampled by the rule above
    maps = np.load(out / "clip_rollout.npy")
    assert maps.shape == (FRAMES // TUBELET, *GRID) and maps.dtype == np.float32
    views, x = reference_clip(vm, clip, indices)
    with vitviz.capture(vm) as rec:
        vm(x)
    ref = vitviz.rollout(rec.attentions)[0]  # [frames, gh, gw]
    np.testing.assert_allclose(maps, ref.numpy(), rtol=1e-5, atol=1e-7)
    # MP4: one frame per input frame, at the overlay size (32 px enlarged x8 to 256 px)
    cap = cv2.VideoCapture(str(out / "clip_rollout.mp4"))
    assert cap.isOpened()
    assert int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) == 256 and int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)) == 256
    cap.release()
    assert len(decode_all(out / "clip_rollout.mp4")) == FRAMES
    # WebP: animated, looping, one frame per input frame
    with Image.open(out / "clip_rollout.webp") as im:
        assert im.format == "WEBP" and im.n_frames == FRAMES and im.size == (256, 256)
        assert im.info.get("loop") == 0
    # the strip: opens, one panel per temporal position, within 3:1
    with Image.open(out / "clip_rollout.png") as im:
        w, h = im.size
    assert w <= 3 * h


def test_overlay_frame_i_uses_the_map_of_its_tubelet(vm, model_dir, tmp_path, capsys):
    clip = write_video(tmp_path / "clip.mp4", 20)
    out = tmp_path / "out"
    assert run_cli(["rollout", str(clip), "--model", str(model_dir), "--out", str(out)], capsys)[0] == 0
    maps = np.load(out / "clip_rollout.npy")  # [2, 4, 4]
    views, _ = reference_clip(vm, clip, [0, 5, 10, 15])
    lo, hi = float(maps.min()), float(maps.max())  # one scale for the whole clip

    def expected(i, t):
        return vitviz.overlay(display_image(views[i]), maps[t], vmin=lo, vmax=hi)

    with Image.open(out / "clip_rollout.webp") as im:
        webp = []
        for k in range(im.n_frames):
            im.seek(k)
            webp.append(np.asarray(im.convert("RGB")))
    mp4 = decode_all(out / "clip_rollout.mp4")
    for i in range(FRAMES):
        own, other = expected(i, i // TUBELET), expected(i, 1 - i // TUBELET)
        assert not np.array_equal(own, other)  # the two maps draw differently: the check can fail
        np.testing.assert_array_equal(webp[i], own)  # lossless WebP: exactly vitviz.overlay's pixels
        err_own = np.abs(mp4[i].astype(float) - own).mean()
        err_other = np.abs(mp4[i].astype(float) - other).mean()
        assert err_own < err_other and err_own < 6.0  # lossy MP4: nearest to its own tubelet's overlay


def test_cls_and_relevance_cli(vm, model_dir, tmp_path, capsys):
    clip = write_video(tmp_path / "clip.mp4", 12)
    out = tmp_path / "out"
    indices = sample_indices(12, FRAMES).tolist()  # [0, 3, 6, 9]
    _, x = reference_clip(vm, clip, indices)

    code, stdout, err = run_cli(["cls", str(clip), "--model", str(model_dir), "--out", str(out)], capsys)
    assert code == 0, err
    cls = np.load(out / "clip_cls.npy")
    with vitviz.capture(vm) as rec:
        vm(x)
    ref = vitviz.cls_maps(rec.attentions, layer=-1)[0]  # [H, frames, gh, gw]; VideoMAE: mean of the patch rows
    assert cls.shape == (2, FRAMES // TUBELET, *GRID)
    np.testing.assert_allclose(cls, ref.numpy(), rtol=1e-5, atol=1e-7)
    with Image.open(out / "clip_cls.webp") as im:
        assert im.n_frames == FRAMES
    with Image.open(out / "clip_cls.png") as im:
        assert im.size[0] <= 3 * im.size[1]
    code, _, err = run_cli(["cls", str(clip), "--model", str(model_dir), "--out", str(out), "--layer", "0"], capsys)
    with vitviz.capture(vm) as rec:
        vm(x)
    np.testing.assert_allclose(np.load(out / "clip_cls.npy"), vitviz.cls_maps(rec.attentions, layer=0)[0].numpy(),
                               rtol=1e-5, atol=1e-7)

    code, stdout, err = run_cli(["relevance", str(clip), "--model", str(model_dir), "--out", str(out),
                                 "--class", "1"], capsys)
    assert code == 0, err
    rel = np.load(out / "clip_relevance.npy")
    ref = vitviz.relevance(vm, x, target=1)[0]  # [frames, gh, gw]
    assert rel.shape == (FRAMES // TUBELET, *GRID)
    np.testing.assert_allclose(rel, ref.detach().numpy(), rtol=1e-4, atol=1e-7)
    assert "explained: class 1" in stdout
    for ext in ("mp4", "webp", "png"):
        assert (out / f"clip_relevance.{ext}").stat().st_size > 0


# --------------------------------------------------------------------------------------------
# bad input: one line each, the good file of the batch still written
# --------------------------------------------------------------------------------------------

def _truncated_avi(tmp_path):
    """An MJPG AVI cut at 70% of its bytes: its header still says 20 frames, 13 or so decode."""
    full = write_video(tmp_path / "full.avi", 20, fourcc="MJPG")
    data = full.read_bytes()
    path = tmp_path / "truncated.avi"
    path.write_bytes(data[:int(len(data) * 0.7)])
    return path


def _cut_mp4(tmp_path):
    """An MP4 cut short: OpenCV's mp4v writer puts the index (moov) at the end, so it is lost."""
    data = write_video(tmp_path / "whole.mp4", 20).read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[:len(data) // 2])
    return path


def _unknown_codec(tmp_path):
    """An AVI whose codec FOURCC names no decoder."""
    data = write_video(tmp_path / "mjpg.avi", 20, fourcc="MJPG").read_bytes()
    assert data.count(b"MJPG") >= 1
    path = tmp_path / "codec.avi"
    path.write_bytes(data.replace(b"MJPG", b"ZZZZ"))
    return path


BAD = {
    "unreadable": (lambda p: (p / "junk.mp4").write_bytes(b"not a video at all " * 20) and p / "junk.mp4",
                   r"is named like a video \(MP4\) but its content is in no video format vitviz knows"),
    "empty": (lambda p: (p / "empty.mp4").write_bytes(b"") or p / "empty.mp4", r"the file is empty \(0 bytes\)"),
    "truncated": (_truncated_avi, r"is truncated or corrupt: its header states 20 frames but decoding stops after"),
    "cut_mp4": (_cut_mp4, r"is a truncated or corrupt MP4 video: its index \(the moov box\) is (missing|cut off)"),
    "codec": (_unknown_codec, r"is a video \(AVI\) that OpenCV cannot open: its codec is not one this OpenCV"),
    "too_few": (lambda p: write_video(p / "short.mp4", 3),
                r"has 3 decodable frame\(s\) but the model takes clips of 4 frames; give a video of at least 4"),
    "still_image": (lambda p: Image.fromarray(moving_square(1)[0]).save(p / "still.png") or p / "still.png",
                    r"is a still image \(PNG\), not a video: a video model takes a clip"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_video_is_one_line_and_the_good_one_is_written(kind, model_dir, tmp_path, capfd):
    make, message = BAD[kind]
    bad = make(tmp_path)
    good = write_video(tmp_path / "good.mp4", 8)
    out = tmp_path / "out"
    code = main(["rollout", str(bad), str(good), "--model", str(model_dir), "--out", str(out)])
    os.write(2, b"stderr is back\n")  # the descriptor silenced while OpenCV read is restored
    stdout, err = capfd.readouterr()
    assert code == 1 and "stderr is back" in err
    lines = [ln for ln in err.splitlines() if str(bad) in ln]
    assert len(lines) == 1, err  # one line names the file
    assert lines[0].startswith(f"vitviz: skipped {bad}: ") and re.search(message, lines[0]), lines[0]
    assert "Traceback" not in err
    # OpenCV and its FFmpeg kept quiet: their lines start "[mov,mp4,... @ 0x...]", "[ERROR:0@...]"
    assert not [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("[")], err
    assert "1 done, 1 skipped" in err
    assert sorted(p.name for p in out.iterdir()) == ["good_rollout.mp4", "good_rollout.npy", "good_rollout.png",
                                                     "good_rollout.webp"]


def test_truncated_avi_really_decodes_fewer_frames(tmp_path):
    """The truncated fixture is what it says: the header promises 20 frames, fewer decode."""
    path = _truncated_avi(tmp_path)
    cap = cv2.VideoCapture(str(path))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 20
    cap.release()
    assert 0 < len(decode_all(path)) < 19


def test_video_to_an_image_model_is_one_line(tmp_path, capsys):
    clip = write_video(tmp_path / "clip.mp4", 8)
    code, _, err = run_cli(["rollout", str(clip), "--model", "shapes-vit", "--out", str(tmp_path / "o")], capsys)
    assert code == 1
    (line,) = [ln for ln in err.splitlines() if "clip.mp4" in ln]
    assert "is a video (MP4), not an image, and the model takes still images" in line
    assert "VideoMAE, ViViT, TimeSformer" in line
    code, _, err = run_cli(["rollout", str(clip), "--model", "shapes-vit", "--frame-stride", "2"], capsys)
    assert code == 2 and "--frame-stride applies to video models" in err


def test_video_options_checked(model_dir, tmp_path, capsys):
    clip = write_video(tmp_path / "clip.mp4", 8)
    for extra, msg in [(["--frame-stride", "0"], "--frame-stride must be at least 1"),
                       (["--on-original"], "--on-original applies to images"),
                       (["--layer", "5"], "layer 5 is out of range for 2 layers")]:
        cmd = "cls" if "--layer" in extra else "rollout"
        code, _, err = run_cli([cmd, str(clip), "--model", str(model_dir), "--out", str(tmp_path / "o"), *extra],
                               capsys)
        assert code == 2 and msg in err and len(err.strip().splitlines()[-1:]) == 1, err


# --------------------------------------------------------------------------------------------
# drawing
# --------------------------------------------------------------------------------------------

def test_clip_strip_labels_frames_and_wraps_within_3_to_1():
    rng = np.random.default_rng(0)
    views = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    maps = rng.random((8, 4, 4)).astype(np.float32)
    fig, _ = clip_strip(views, maps, tubelet=2, title="rollout")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    w, h = Image.open(buf).size
    assert w <= 3 * h  # 8 panels wrap into bands
    labels = sorted(t.get_text() for ax in fig.axes for t in ax.get_xticklabels() if t.get_text())
    assert labels == sorted(f"frames {2 * t}–{2 * t + 1}" for t in range(8))
    assert overlapping_labels(fig) == []


def test_frame_labels_and_mismatch_errors():
    assert frame_label([4]) == "frame 4"
    assert frame_label([0, 1]) == "frames 0–1"
    assert frame_label([0, 5]) == "frames 0, 5"
    views = np.zeros((4, 8, 8, 3), np.uint8)
    with pytest.raises(RenderError, match="4 input frames do not match 3 maps of tubelets of 2"):
        clip_overlays(views, np.zeros((3, 2, 2)), tubelet=2)
    frames = clip_overlays(views, np.arange(8.0).reshape(2, 2, 2), tubelet=2)
    assert frames.shape == (4, 256, 256, 3)
    np.testing.assert_array_equal(frames[0], frames[1])  # one tubelet, one map
    assert not np.array_equal(frames[1], frames[2])


def test_gif_animation_loops_with_every_frame(tmp_path):
    from vitviz.render import encode_animation

    frames = np.stack([np.full((16, 16, 3), 40 * i, np.uint8) for i in range(5)])
    with Image.open(io.BytesIO(encode_animation(frames, fps=10, fmt="gif"))) as im:
        assert im.format == "GIF" and im.n_frames == 5 and im.info.get("loop") == 0
        assert im.info.get("duration") == 100  # ms per frame at 10 fps
    with pytest.raises(RenderError, match="animation format must be one of webp, gif"):
        encode_animation(frames, fmt="apng")


# --------------------------------------------------------------------------------------------
# ViViT and TimeSformer through the CLI, with their own image processors
# --------------------------------------------------------------------------------------------

def _family_dir(tmp_path, family):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(image_size=32, num_frames=FRAMES, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, num_labels=3)
    if family == "vivit":  # ViViT's processor rescales to [-1, 1] (offset) with mean 0.5, std 0.5
        model = tf.VivitForVideoClassification(tf.VivitConfig(tubelet_size=[2, 8, 8], **common))
        proc = tf.VivitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:  # TimeSformer checkpoints ship VideoMAE's processor
        model = tf.TimesformerForVideoClassification(tf.TimesformerConfig(patch_size=8, **common))
        proc = tf.VideoMAEImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    d = tmp_path / family
    model.eval().save_pretrained(d)
    proc.save_pretrained(d)
    return d, proc


@pytest.mark.parametrize("family, frames", [("vivit", 2), ("timesformer", 4)])
def test_vivit_and_timesformer_through_the_cli(family, frames, tmp_path, capsys):
    d, proc = _family_dir(tmp_path, family)
    vm = vitviz.load_model(str(d))
    clip = write_video(tmp_path / "clip.mp4", 20)
    indices = [0, 5, 10, 15]  # 4 of 20 frames, evenly spaced (test_sample_indices_golden)
    views, x = reference_clip(vm, clip, indices)
    # the frames go through the model's own processor's steps (to one uint8 level of the resize)
    ref = proc([decode_all(clip)[i] for i in indices], return_tensors="pt").pixel_values
    std = 0.5 * 127.5 / 255 if family == "vivit" else 0.225  # one uint8 level in the processor's units
    assert ref.shape == x.shape and (ref - x).abs().max() <= 1.01 / 255 / std
    for command, compute in (("rollout", lambda: None), ("relevance", lambda: vitviz.relevance(vm, x, target=1)[0])):
        out = tmp_path / command
        args = [command, str(clip), "--model", str(d), "--out", str(out)]
        if command == "relevance":
            args += ["--class", "1"]
        code, _, err = run_cli(args, capsys)
        assert code == 0, err
        maps = np.load(out / f"clip_{command}.npy")
        assert maps.shape == (frames, *GRID)
        if command == "rollout":
            with vitviz.capture(vm) as rec:
                vm(x)
            want = vitviz.rollout(rec.attentions)[0]
        else:
            want = compute()
        np.testing.assert_allclose(maps, want.numpy(), rtol=1e-4, atol=1e-6)
        assert len(decode_all(out / f"clip_{command}.mp4")) == FRAMES
        with Image.open(out / f"clip_{command}.webp") as im:
            assert im.n_frames == FRAMES


def test_cls_query_of_a_late_frame_through_the_cli(vm, model_dir, tmp_path, capsys):
    clip = write_video(tmp_path / "clip.mp4", 12)
    out = tmp_path / "out"
    _, x = reference_clip(vm, clip, sample_indices(12, FRAMES).tolist())
    code, _, err = run_cli(["cls", str(clip), "--model", str(model_dir), "--out", str(out), "--query", "1,0,3"],
                           capsys)
    assert code == 0, err
    with vitviz.capture(vm) as rec:
        vm(x)
    want = vitviz.query_maps(rec.attentions, (1, 0, 3))[0]  # [H, frames, gh, gw]
    np.testing.assert_allclose(np.load(out / "clip_cls.npy"), want.numpy(), rtol=1e-5, atol=1e-7)
    # a clip's patch needs its frame; an image's patch has none
    code, _, err = run_cli(["cls", str(clip), "--model", str(model_dir), "--out", str(out), "--query", "0,3"], capsys)
    errors = [line for line in err.splitlines() if "error" in line]  # (transformers' loading bar aside)
    assert code != 0 and len(errors) == 1 and "(frame, row, col)" in errors[0]
    code, _, err = run_cli(["cls", "vitviz/assets/shapes-triangle.png", "--model", "shapes-vit", "--out", str(out),
                            "--query", "1,0,3"], capsys)
    errors = [line for line in err.splitlines() if "error" in line]
    assert code != 0 and len(errors) == 1 and "(row, col)" in errors[0]
