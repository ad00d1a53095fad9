"""vitviz.models._preprocess: golden values, invariants, and equivalence with timm and transformers."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import timm.data
import torch
import transformers
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as tvF  # what transformers 5 uses

import vitviz
from vitviz.errors import ImageError
from vitviz.models._preprocess import Preprocess, PreprocessError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# image sizes (h, w): landscape, portrait, downscale, exact, extreme aspect
SHAPES = [(50, 77), (101, 67), (300, 200), (64, 64), (33, 97)]


def _photo(h: int, w: int, seed: int = 0) -> Image.Image:
    """Smooth gradients plus noise: every resampling filter gives different values on it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], -1) + rng.normal(0, 30, (h, w, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


# --------------------------------------------------------------------------------------------
# golden values by hand
# --------------------------------------------------------------------------------------------

def test_normalisation_golden_values():
    a = np.array([[[0, 51, 255], [255, 102, 0]]], np.uint8)  # [1, 2, 3]
    pre = Preprocess(size=(1, 2), mean=(0.5, 0.2, 0.0), std=(0.5, 0.1, 1.0))
    x = pre(a)
    assert x.shape == (1, 3, 1, 2) and x.dtype == torch.float32
    expected = torch.tensor([[[[-1.0, 1.0]], [[0.0, 2.0]], [[1.0, 0.0]]]])  # (v/255 - m) / s
    torch.testing.assert_close(x, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("width, crop_offset, first_col", [
    (6, "round", 1), (6, "floor", 1),   # (6-4)/2 = 1
    (7, "round", 2), (7, "floor", 1),   # 1.5: torchvision rounds (to even: 2), transformers floors
    (9, "round", 2), (9, "floor", 2),   # 2.5: Python rounds half to even: 2
])
def test_centre_crop_offsets(width, crop_offset, first_col):
    cols = np.arange(width, dtype=np.uint8) * 10
    a = np.repeat(np.repeat(cols[None, :, None], 4, 0), 3, 2)  # [4, width, 3]: value = 10 * column
    pre = Preprocess(size=(4, 4), resize_mode="shortest", crop_pct=1.0, crop_offset=crop_offset,
                     interpolation="nearest")
    view = pre.view(a)  # the shorter side is already 4: no resize, only the crop
    np.testing.assert_array_equal(view[0, :, 0], cols[first_col:first_col + 4])


def test_shortest_side_scale_size_is_timms_floor_of_size_over_crop_pct():
    # 64 / 0.9 = 71.1 -> 71; the longer side 71 * 120 / 80 = 106.5 -> 106 (torchvision truncates)
    pre = Preprocess(size=(64, 64), resize_mode="shortest", crop_pct=0.9, interpolation="nearest")
    assert pre._scale_size() == 71
    seen = []
    orig = Image.Image.resize

    def spy(self, size, *args, **kwargs):
        seen.append(size)
        return orig(self, size, *args, **kwargs)

    Image.Image.resize = spy
    try:
        assert pre.view(np.zeros((80, 120, 3), np.uint8)).shape == (64, 64, 3)
    finally:
        Image.Image.resize = orig
    assert seen == [(106, 71)]  # PIL takes (width, height)


def test_squash_keeps_the_whole_image():
    a = np.zeros((40, 80, 3), np.uint8)
    a[:, :40] = 255  # left half white
    view = Preprocess(size=(20, 20), resize_mode="squash", interpolation="nearest").view(a)
    assert (view[:, :10] == 255).all() and (view[:, 10:] == 0).all()


def test_border_mode_pads_with_the_mean_colour():
    pre = Preprocess(size=(8, 8), resize_mode="border", crop_pct=1.0, interpolation="nearest",
                     mean=(0.2, 0.4, 0.6))
    view = pre.view(np.full((4, 8, 3), 9, np.uint8))  # 8 wide: rows 2..5 hold the image
    assert (view[2:6] == 9).all()
    assert (view[:2] == (51, 102, 153)).all() and (view[6:] == (51, 102, 153)).all()


# --------------------------------------------------------------------------------------------
# invariants
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["shortest", "squash", "border"])
@pytest.mark.parametrize("size", [(64, 96), (96, 64), (32, 32)])
def test_output_shapes_and_view_matches_the_tensor(mode, size):
    pre = Preprocess(size=size, resize_mode=mode, crop_pct=0.9)
    for h, w in SHAPES + [(1, 1)]:
        im = _photo(h, w)
        x = pre(im)  # [1, 3, H, W]
        view = pre.view(im)  # [H, W, 3]
        assert x.shape == (1, 3, *size) and x.dtype == torch.float32
        assert view.shape == (*size, 3) and view.dtype == np.uint8
        # the view is exactly what the tensor holds, before normalisation
        back = x[0] * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
        torch.testing.assert_close(back, torch.from_numpy(view).permute(2, 0, 1) / 255.0,
                                   atol=1e-6, rtol=0)


def test_batch_equals_one_by_one_with_mixed_sources(tmp_path):
    p = tmp_path / "a.png"
    _photo(50, 77, 1).save(p)
    sources = [p, _photo(101, 67, 2), np.asarray(_photo(33, 97, 3))]
    pre = Preprocess(size=(32, 48), resize_mode="shortest", crop_pct=0.875)
    xb = pre.batch(sources)  # [3, 3, 32, 48]
    assert xb.shape == (3, 3, 32, 48)
    torch.testing.assert_close(xb, torch.cat([pre(s) for s in sources]), atol=0, rtol=0)
    with pytest.raises(PreprocessError, match="at least one image"):
        pre.batch([])


def test_every_input_kind_gives_the_same_tensor(tmp_path):
    im = _photo(40, 60)
    p = tmp_path / "x.png"
    im.save(p)
    pre = Preprocess(size=(32, 32))
    ref = pre(im)
    for source in (p, str(p), np.asarray(im), np.asarray(im) / 255.0):
        torch.testing.assert_close(pre(source), ref, atol=0, rtol=0)


def test_bad_image_error_names_the_file(tmp_path):
    p = tmp_path / "broken.jpg"
    p.write_text("not a jpeg")
    with pytest.raises(ImageError, match="broken.jpg.*not an image"):
        Preprocess(size=(32, 32))(p)


@pytest.mark.parametrize("kwargs, words", [
    (dict(resize_mode="crop"), "resize_mode"),
    (dict(interpolation="cubic"), "interpolation"),
    (dict(size=(0, 32)), "positive"),
    (dict(size=(1, 2, 3)), "size"),
    (dict(mean=(0.5, 0.5)), "mean"),
    (dict(std=(1, 0, 1)), "std"),
    (dict(crop_pct=0), "crop_pct"),
    (dict(crop_offset="ceil"), "crop_offset"),
])
def test_invalid_settings_raise(kwargs, words):
    with pytest.raises(PreprocessError, match=words):
        Preprocess(**kwargs)


def test_interpolation_accepts_pil_codes_and_torchvision_modes():
    assert Preprocess(interpolation=Image.Resampling.BICUBIC).interpolation == "bicubic"
    assert Preprocess(interpolation=2).interpolation == "bilinear"
    assert Preprocess(interpolation=InterpolationMode.LANCZOS).interpolation == "lanczos"
    assert Preprocess(interpolation="BOX").interpolation == "box"


# --------------------------------------------------------------------------------------------
# equivalence with timm: bit-exact (timm resizes PIL images with PIL, as vitviz does)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
@pytest.mark.parametrize("input_size", [(64, 64), (64, 96), (96, 64)])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "lanczos", "nearest"])
@pytest.mark.parametrize("crop_pct", [0.875, 0.9, 1.0])
def test_equals_timm_create_transform(crop_mode, input_size, interpolation, crop_pct):
    cfg = dict(input_size=(3, *input_size), interpolation=interpolation, mean=MEAN, std=STD,
               crop_pct=crop_pct, crop_mode=crop_mode)
    theirs = timm.data.create_transform(**cfg)
    ours = Preprocess.from_timm(cfg)
    for h, w in SHAPES:
        im = _photo(h, w)
        assert torch.equal(ours(im)[0], theirs(im)), (h, w)


@pytest.fixture(scope="module")
def tiny_timm_224():
    return timm.create_model("vit_base_patch16_clip_224.openai", pretrained=False, depth=1,
                             embed_dim=32, num_heads=2, num_classes=5)


def test_from_timm_model_equals_timm(tiny_timm_224):
    cfg = timm.data.resolve_model_data_config(tiny_timm_224)
    assert cfg["crop_pct"] == 0.9 and cfg["mean"] != MEAN  # CLIP statistics: a non-default config
    ours = Preprocess.from_timm(tiny_timm_224)
    assert ours.size == (224, 224) and ours.interpolation == "bicubic" and ours.mean == cfg["mean"]
    theirs = timm.data.create_transform(**cfg)
    for h, w in [(300, 200), (160, 250)]:
        im = _photo(h, w)
        assert torch.equal(ours(im)[0], theirs(im))


def test_from_timm_uses_the_size_the_model_was_built_at():
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=(32, 48),
                          patch_size=8, depth=1, embed_dim=32, num_heads=2)
    # timm's data config still states the pretrained 224 px: the model could not run on it
    assert timm.data.resolve_model_data_config(m)["input_size"] == (3, 224, 224)
    ours = Preprocess.from_timm(m)
    assert ours.size == (32, 48)
    cfg = timm.data.resolve_data_config(args={"input_size": (3, 32, 48)}, model=m)
    theirs = timm.data.create_transform(**cfg)
    im = _photo(101, 67)
    x = ours(im)
    assert torch.equal(x[0], theirs(im))
    assert m(x).shape == (1, m.num_classes)  # the model accepts it


def test_wrap_gives_a_timm_model_timms_preprocessing(tiny_timm_224):
    m = vitviz.wrap(tiny_timm_224)
    theirs = timm.data.create_transform(**timm.data.resolve_model_data_config(tiny_timm_224))
    im = _photo(230, 260)
    assert torch.equal(m.preprocess(im)[0], theirs(im))


# --------------------------------------------------------------------------------------------
# equivalence with transformers
# --------------------------------------------------------------------------------------------

HF_SETTINGS = [
    dict(size={"height": 64, "width": 96}),
    dict(size={"height": 32, "width": 32}, resample=Image.Resampling.BICUBIC),
    dict(size={"shortest_edge": 72}, do_center_crop=True, crop_size={"height": 64, "width": 64},
         image_mean=[0.48, 0.45, 0.4], image_std=[0.26, 0.26, 0.27], resample=3),
    dict(size={"height": 80, "width": 80}, do_center_crop=True, crop_size={"height": 63, "width": 64}),
]


def _hf(processor, im) -> torch.Tensor:
    return processor(im, return_tensors="pt")["pixel_values"][0]  # [3, H, W]


@pytest.mark.parametrize("settings", HF_SETTINGS)
def test_equals_transformers_pil_processor(settings):
    # ViTImageProcessorPil resizes with Pillow like vitviz: equal to float32 rounding
    # (transformers rescales in float64 and normalises in float32 with numpy)
    proc = transformers.ViTImageProcessorPil(**settings)
    ours = Preprocess.from_hf_processor(proc)
    for h, w in SHAPES:
        im = _photo(h, w)
        torch.testing.assert_close(ours(im)[0], _hf(proc, im), atol=1e-6, rtol=0)


@pytest.mark.parametrize("settings", HF_SETTINGS)
def test_equals_transformers_default_processor_within_one_grey_level(settings):
    """transformers 5's ViTImageProcessor resizes the uint8 tensor with torchvision.transforms.v2
    (torch's native uint8 antialiased kernel on the CPU), whose fixed-point rounding differs
    from Pillow's by one grey level on some pixels. The test bounds the difference by one
    level, and shows that it is the only one: resizing with torchvision v2 and letting vitviz
    crop and normalise reproduces transformers' output to float rounding."""
    proc = transformers.ViTImageProcessor(**settings)
    assert proc.backend == "torchvision"
    ours = Preprocess.from_hf_processor(proc)
    one_level = 1.0 / (255.0 * min(ours.std))
    interp = InterpolationMode(ours.interpolation)
    worst = 0.0
    for h, w in SHAPES:
        im = _photo(h, w)
        theirs = _hf(proc, im)
        diff = (ours(im)[0] - theirs).abs().max().item()
        assert diff <= one_level + 1e-5
        worst = max(worst, diff)
        # the source of the difference: resize the uint8 tensor as transformers does, then
        # let vitviz crop and normalise it; the result equals transformers' to float rounding
        t = torch.from_numpy(np.array(im)).permute(2, 0, 1)  # [3, h, w] uint8
        new_hw = ours._resized(im).size[::-1]
        resized = tvF.resize(t, list(new_hw), interpolation=interp, antialias=True)  # [3, h', w']
        re_ours = ours.normalize(np.asarray(ours._cropped(Image.fromarray(
            resized.permute(1, 2, 0).numpy()))))  # [3, H, W]
        torch.testing.assert_close(re_ours, theirs, atol=1e-5, rtol=0)
    assert worst > 0  # the one-level difference is real for these images (else the test is moot)


def test_from_hf_processor_dict_like_preprocessor_config_json():
    d = {"do_resize": True, "size": {"height": 48, "width": 48}, "resample": 2,
         "do_rescale": True, "rescale_factor": 0.00392156862745098, "do_normalize": True,
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
         "image_processor_type": "ViTImageProcessor"}
    pre = Preprocess.from_hf_processor(d)
    assert (pre.size, pre.resize_mode, pre.interpolation, pre.mean) == (
        (48, 48), "squash", "bilinear", (0.5, 0.5, 0.5))
    im = _photo(50, 77)
    torch.testing.assert_close(pre(im)[0], _hf(transformers.ViTImageProcessorPil(**d), im),
                               atol=1e-6, rtol=0)
    # old configs store a plain int: square without a crop, the shortest edge with one
    assert Preprocess.from_hf_processor({"size": 40}).size == (40, 40)
    clip_like = Preprocess.from_hf_processor({"size": 40, "do_center_crop": True, "crop_size": 32})
    assert (clip_like.resize_mode, clip_like.resize_size, clip_like.size) == ("shortest", 40, (32, 32))


def test_from_hf_processor_folds_other_rescale_factors_into_mean_and_std():
    settings = dict(size={"height": 32, "width": 32}, do_rescale=False,
                    image_mean=[123.675, 116.28, 103.53], image_std=[58.395, 57.12, 57.375])
    proc = transformers.ViTImageProcessorPil(**settings)
    pre = Preprocess.from_hf_processor(proc)
    torch.testing.assert_close(torch.tensor(pre.mean), torch.tensor(MEAN), atol=1e-9, rtol=0)
    im = _photo(40, 70)
    torch.testing.assert_close(pre(im)[0], _hf(proc, im), atol=1e-5, rtol=0)
    off = Preprocess.from_hf_processor(dict(size={"height": 8, "width": 8}, do_normalize=False))
    assert off.mean == (0.0, 0.0, 0.0) and off.std == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("settings, words", [
    (dict(size={"shortest_edge": 64}), "without a centre crop"),
    (dict(size={"height": 32, "width": 32}, do_resize=False), "does not resize"),
    (dict(size={"shortest_edge": 32, "longest_edge": 64}, do_center_crop=True,
          crop_size={"height": 32, "width": 32}), "varies"),
])
def test_from_hf_processor_refuses_image_dependent_sizes(settings, words):
    with pytest.raises(PreprocessError, match=words):
        Preprocess.from_hf_processor(settings)


def test_from_hf_config_vit_defaults_equal_vit_image_processor():
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64)
    pre = Preprocess.from_hf_config(cfg)
    assert (pre.size, pre.resize_mode, pre.interpolation, pre.mean, pre.std) == (
        (32, 32), "squash", "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    proc = transformers.ViTImageProcessorPil(size={"height": 32, "width": 32})
    im = _photo(101, 67)
    torch.testing.assert_close(pre(im)[0], _hf(proc, im), atol=1e-6, rtol=0)


def test_from_hf_config_reads_the_model_types_processor_class():
    # DeiT at its default 224 px: transformers' DeiT processor resizes to 256 and crops 224, bicubic
    pre = Preprocess.from_hf_config(transformers.DeiTConfig())
    proc = transformers.DeiTImageProcessorPil()
    assert (pre.size, pre.resize_size, pre.interpolation) == ((224, 224), (256, 256), "bicubic")
    im = _photo(240, 300)
    torch.testing.assert_close(pre(im)[0], _hf(proc, im), atol=1e-6, rtol=0)
    # at another size the statistics and filter stay, the image is resized straight to the size
    small = Preprocess.from_hf_config(transformers.DeiTConfig(image_size=48))
    assert (small.size, small.resize_mode, small.resize_size, small.interpolation) == (
        (48, 48), "squash", None, "bicubic")


def test_from_hf_config_encoder_decoder_and_unknown_types():
    enc = transformers.ViTConfig(image_size=48, patch_size=16, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64)
    dec = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2)
    ved = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    assert Preprocess.from_hf_config(ved).size == (48, 48)
    unknown = transformers.PretrainedConfig(image_size=40)  # no model type: ViT's defaults
    pre = Preprocess.from_hf_config(unknown)
    assert (pre.size, pre.mean, pre.interpolation) == ((40, 40), (0.5, 0.5, 0.5), "bilinear")
    with pytest.raises(PreprocessError, match="image_size"):
        Preprocess.from_hf_config(transformers.PretrainedConfig())
