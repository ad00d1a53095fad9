"""The time axis of a token layout (issue 28): golden indices and maps on tiny layouts, the
inverse, the (frame, row, col) query and the spatial distance of a video layout."""

from __future__ import annotations

import pytest
import torch

import vitviz
from vitviz import AttentionMaps, TokenLayout
from vitviz.analyze import query_weights
from vitviz.analyze.stats import mean_attention_distance
from vitviz.errors import LayoutError

# 2 temporal positions of a 2x3 grid: 12 patch tokens
TIME_MAJOR = TokenLayout(num_prefix=1, grid=(2, 3), frames=2, tubelet=2)
SPACE_MAJOR = TokenLayout(num_prefix=1, grid=(2, 3), frames=2, time_major=False)


def test_counts_and_repr():
    assert TIME_MAJOR.num_patches == 12 and TIME_MAJOR.num_tokens == 13
    assert TIME_MAJOR.map_shape == (2, 2, 3) and TIME_MAJOR.is_video
    assert repr(TIME_MAJOR) == "TokenLayout(num_prefix=1, grid=(2, 3), has_cls=True, frames=2, tubelet=2)"
    assert repr(SPACE_MAJOR).endswith("frames=2, tubelet=1, time_major=False)")
    image = TokenLayout(num_prefix=1, grid=(2, 3))
    assert not image.is_video and image.map_shape == (2, 3) and "frames" not in repr(image)
    # one temporal position of a 2-frame tubelet is still a video layout: its maps keep the time axis
    assert TokenLayout(num_prefix=0, grid=(2, 2), tubelet=2).map_shape == (1, 2, 2)


@pytest.mark.parametrize("bad", [dict(frames=0), dict(tubelet=-1), dict(frames=1.5), dict(frames=True)])
def test_bad_time_fields_are_refused(bad):
    with pytest.raises(LayoutError, match="positive int"):
        TokenLayout(num_prefix=0, grid=(2, 2), **bad)


def test_patch_map_golden_time_major():
    # token order (frame, row, col): value k is token 1 + k
    m = TIME_MAJOR.patch_map(torch.arange(12.0))
    assert m.shape == (2, 2, 3)
    assert m[0].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert m[1].tolist() == [[6, 7, 8], [9, 10, 11]]


def test_patch_map_golden_space_major():
    # TimeSformer's order (row, col, frame): value k at row k // 6, col (k // 2) % 3, frame k % 2
    m = SPACE_MAJOR.patch_map(torch.arange(12.0))
    assert m[0].tolist() == [[0, 2, 4], [6, 8, 10]]
    assert m[1].tolist() == [[1, 3, 5], [7, 9, 11]]


@pytest.mark.parametrize("layout", [TIME_MAJOR, SPACE_MAJOR], ids=["time-major", "space-major"])
def test_patch_values_inverts_patch_map_and_patch_index_agrees(layout):
    v = torch.randn(4, 12)
    assert torch.equal(layout.patch_values(layout.patch_map(v)), v)
    m = layout.patch_map(torch.arange(12.0))
    for t in range(2):
        for r in range(2):
            for c in range(3):
                assert layout.patch_index(r, c, t) == 1 + int(m[t, r, c])
    assert layout.patch_index(-1, -1, -1) == layout.patch_index(1, 2, 1)
    with pytest.raises(LayoutError, match=r"patch \(2, 0, 0\) is outside the 2x2x3"):
        layout.patch_index(0, 0, 2)


def test_check_tokens_names_the_time_axis():
    with pytest.raises(LayoutError, match=r"1 prefix \+ 2x2x3 patches = 13"):
        TIME_MAJOR.check_tokens(7)


def _maps(layout: TokenLayout, seed: int = 0) -> AttentionMaps:
    g = torch.Generator().manual_seed(seed)
    n = layout.num_tokens
    return AttentionMaps(torch.softmax(torch.randn(2, 1, 2, n, n, generator=g), -1), layout)


@pytest.mark.parametrize("layout", [TIME_MAJOR, SPACE_MAJOR], ids=["time-major", "space-major"])
def test_analyses_return_frames_in_the_models_order(layout):
    maps = _maps(layout)
    a = maps.tensor
    # the CLS row of the last layer, read by hand at each (frame, row, col)
    cls = vitviz.cls_maps(maps)  # [B, H, frames, gh, gw]
    assert cls.shape == (1, 2, 2, 2, 3)
    for t in range(2):
        for r in range(2):
            for c in range(3):
                assert cls[0, 1, t, r, c] == a[-1, 0, 1, 0, layout.patch_index(r, c, t)]
    # a late-frame query reads that token's row
    q = vitviz.query_maps(maps, (1, 0, 2))
    row = a[-1, 0, :, layout.patch_index(0, 2, 1)]  # [H, N]
    assert torch.equal(layout.patch_values(q[0]), row[:, 1:])
    # rollout: the CLS row of the product, laid out the same way
    r = vitviz.rollout(maps)
    eye = torch.eye(layout.num_tokens)
    prod = (0.5 * a[1, 0].mean(0) + 0.5 * eye) @ (0.5 * a[0, 0].mean(0) + 0.5 * eye)
    assert r.shape == (1, 2, 2, 3)
    torch.testing.assert_close(layout.patch_values(r[0]), prod[0, 1:])


def test_query_of_a_video_layout_needs_the_frame():
    with pytest.raises(ValueError, match=r"\(frame, row, col\)"):
        query_weights(TIME_MAJOR, (0, 1))
    w = query_weights(TIME_MAJOR, (1, 1, 2))
    assert int(w.argmax()) == 1 + 6 + 3 + 2 and float(w.sum()) == 1.0


def test_mean_attention_distance_of_a_video_is_spatial():
    # token (t, r, c) puts all its weight on the patch (1 - t, r, (c + 1) % 3): the other frame,
    # one column over (wrapping), so the spatial distance is 1 (or 2 when it wraps) whatever the frames
    layout = TokenLayout(num_prefix=0, grid=(2, 3), frames=2, tubelet=2)
    a = torch.zeros(1, 1, 1, 12, 12)
    want = []
    for t in range(2):
        for r in range(2):
            for c in range(3):
                a[0, 0, 0, layout.patch_index(r, c, t), layout.patch_index(r, (c + 1) % 3, 1 - t)] = 1.0
                want.append(1.0 if c < 2 else 2.0)
    d = mean_attention_distance(AttentionMaps(a, layout))
    assert d.shape == (1, 1, 1)
    torch.testing.assert_close(d[0, 0, 0], torch.tensor(sum(want) / len(want)))


def _tiny(family: str):
    import transformers  # a core dependency of vitviz

    common = dict(image_size=32, num_frames=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=64)
    if family == "videomae":
        return transformers.VideoMAEModel(transformers.VideoMAEConfig(patch_size=8, tubelet_size=2, **common))
    if family == "vivit":
        return transformers.VivitModel(transformers.VivitConfig(tubelet_size=[2, 8, 8], **common))
    return transformers.TimesformerModel(transformers.TimesformerConfig(patch_size=8, **common))


@pytest.mark.parametrize("family, want", [
    ("videomae", TokenLayout(num_prefix=0, grid=(4, 4), frames=2, tubelet=2)),
    ("vivit", TokenLayout(num_prefix=1, grid=(4, 4), frames=2, tubelet=2)),
    ("timesformer", TokenLayout(num_prefix=1, grid=(4, 4), frames=4, tubelet=1, time_major=False)),
])
def test_video_models_state_their_layout(family, want):
    vm = vitviz.wrap(_tiny(family))
    assert vm.is_video and vm.num_frames == 4
    assert vm.layout == want
    # a longer clip: more temporal positions, the same grid and order
    assert vm.layout_at((32, 32), frames=8).frames == 8 // want.tubelet
    if want.tubelet > 1:
        with pytest.raises(LayoutError, match="does not split into tubelets of 2 frames"):
            vm.layout_at((32, 32), frames=3)


def test_image_only_views_refuse_a_video_model_with_the_reason():
    vm = vitviz.wrap(_tiny("vivit"))
    with pytest.raises(LayoutError, match="video model: its position embeddings run over the frames"):
        vitviz.pos_similarity(vm)
    with pytest.raises(vitviz.VitvizError, match="video model and the explorer shows one image"):
        vitviz.explore(vm, torch.rand(1, 4, 3, 32, 32))


def test_query_maps_fuse_heads_over_a_clip():
    maps = _maps(TIME_MAJOR, seed=3)
    per_head = vitviz.query_maps(maps, (1, 1, 2))  # [B, H, frames, gh, gw]
    assert torch.equal(vitviz.query_maps(maps, (1, 1, 2), head_fusion="mean"), per_head.mean(1))
    assert torch.equal(vitviz.query_maps(maps, (1, 1, 2), head_fusion="max"), per_head.amax(1))


def test_preprocess_refuses_a_tensor_of_the_wrong_rank():
    image_model = vitviz.load_model("shapes-vit")
    with pytest.raises(LayoutError, match="takes images .* 5-D tensor .* needs a video model"):
        image_model.preprocess(torch.rand(1, 4, 3, 64, 64))
    video = vitviz.wrap(_tiny("videomae"))
    assert video.preprocess(torch.rand(4, 3, 32, 32)).shape == (1, 4, 3, 32, 32)
    with pytest.raises(LayoutError, match=r"takes clips \[T, C, H, W\]"):
        video.preprocess(torch.rand(3, 32, 32))
