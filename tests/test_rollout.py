"""Rollout and CLS maps: hand-computed golden values, an independent reference, batching."""

import numpy as np
import pytest
import torch

import vitviz
from vitviz import AttentionMaps, TokenLayout
from vitviz.analyze import discard_smallest, rollout_matrix, token_map


def maps(layers, layout):
    """[L][H][N][N] nested lists (one sample) -> AttentionMaps [L, 1, H, N, N]."""
    return AttentionMaps(torch.tensor(layers, dtype=torch.float32).unsqueeze(1), layout)


ONE_PATCH = TokenLayout(num_prefix=1, grid=(1, 1))


def test_single_layer_golden():
    # A = [[.2, .8], [.6, .4]] -> 0.5A + 0.5I = [[.6, .4], [.3, .7]] (rows already sum to 1)
    out = vitviz.rollout(maps([[[[0.2, 0.8], [0.6, 0.4]]]], ONE_PATCH))
    assert out.shape == (1, 1, 1)
    assert out.item() == pytest.approx(0.4, abs=1e-7)


def test_layer_order_is_last_times_first():
    # Â1 = [[.5, .5], [0, 1]], Â2 = [[1, 0], [.5, .5]]
    # R = Â2 Â1 = [[.5, .5], [.25, .75]] -> 0.5 ; the wrong order Â1 Â2 would give 0.25
    a1 = [[[0.0, 1.0], [0.0, 1.0]]]
    a2 = [[[1.0, 0.0], [1.0, 0.0]]]
    assert vitviz.rollout(maps([a1, a2], ONE_PATCH)).item() == pytest.approx(0.5, abs=1e-7)
    assert vitviz.rollout(maps([a2, a1], ONE_PATCH)).item() == pytest.approx(0.25, abs=1e-7)
    # start_layer=1 keeps only Â2: its CLS row over the patch is 0
    assert vitviz.rollout(maps([a1, a2], ONE_PATCH), start_layer=1).item() == pytest.approx(0.0)
    assert vitviz.rollout(maps([a1, a2], ONE_PATCH), start_layer=-1).item() == pytest.approx(0.0)


def test_head_fusion_golden():
    h1 = [[0.2, 0.8], [0.6, 0.4]]
    h2 = [[0.6, 0.4], [0.2, 0.8]]
    layout = ONE_PATCH
    # mean: [[.4, .6], [.4, .6]] -> [[.7, .3], [.2, .8]] -> 0.3
    assert vitviz.rollout(maps([[h1, h2]], layout), head_fusion="mean").item() == pytest.approx(0.3)
    # max: [[.6, .8], [.6, .8]] -> 0.5A+0.5I = [[.8, .4], [.3, .9]] -> rows / [1.2, 1.2] -> 1/3
    assert vitviz.rollout(maps([[h1, h2]], layout), head_fusion="max").item() == pytest.approx(0.4 / 1.2)
    # min: [[.2, .4], [.2, .4]] -> [[.6, .2], [.1, .7]] -> row 0 / 0.8 -> 0.25
    assert vitviz.rollout(maps([[h1, h2]], layout), head_fusion="min").item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="head_fusion"):
        vitviz.rollout(maps([[h1, h2]], layout), head_fusion="median")


def test_discard_keeps_cls_to_cls_golden():
    # 1 CLS + 2 patches; ratio 0.34 -> k = int(9 * 0.34) = 3 smallest: (0,0)=.1, (2,0)=.2, (2,1)=.2.
    # CLS->CLS is kept, so only (2,0) and (2,1) become 0.
    a = [[0.1, 0.5, 0.4], [0.3, 0.3, 0.4], [0.2, 0.2, 0.6]]
    fused = discard_smallest(torch.tensor([a]), 0.34)
    expect = torch.tensor([[[0.1, 0.5, 0.4], [0.3, 0.3, 0.4], [0.0, 0.0, 0.6]]])
    assert torch.equal(fused, expect)
    layout = TokenLayout(num_prefix=1, grid=(1, 2))
    # 0.5A + 0.5I row 0 = [.55, .25, .2] (sum 1) -> map [.25, .2]
    out = vitviz.rollout(maps([[a]], layout), discard_ratio=0.34)
    assert torch.allclose(out, torch.tensor([[[0.25, 0.2]]]), atol=1e-7)
    # had CLS->CLS been zeroed, row 0 would be [.5, .25, .2]/.95
    assert not torch.allclose(out, torch.tensor([[[0.25 / 0.95, 0.2 / 0.95]]]), atol=1e-4)


def test_discard_without_cls_zeroes_all_k():
    a = torch.tensor([[[0.1, 0.9], [0.5, 0.5]]])
    out = discard_smallest(a, 0.25, keep_first=False)  # k = 1: the 0.1 goes
    assert torch.equal(out, torch.tensor([[[0.0, 0.9], [0.5, 0.5]]]))
    assert torch.equal(discard_smallest(a, 0.25, keep_first=True), a)  # the only candidate is CLS->CLS


def test_prefix_tokens_dropped_and_grid_shape():
    # CLS + distillation token + 2x3 patches; identity-like attention keeps CLS row = its attention row
    n = 8
    layout = TokenLayout(num_prefix=2, grid=(2, 3))
    a = torch.zeros(1, 1, 1, n, n)
    a[..., 0, :] = torch.arange(1.0, n + 1) / torch.arange(1.0, n + 1).sum()
    a[..., 1:, :] = torch.eye(n)[1:]
    out = vitviz.rollout(AttentionMaps(a, layout))
    row = 0.5 * a[0, 0, 0, 0] + 0.5 * torch.eye(n)[0]
    assert out.shape == (1, 2, 3)
    assert torch.allclose(out[0].flatten(), row[2:])


def test_no_cls_uses_mean_of_patch_rows():
    layout = TokenLayout(num_prefix=0, grid=(1, 2))
    a = [[[0.2, 0.8], [0.6, 0.4]]]
    # Â = [[.6, .4], [.3, .7]] -> column means [.45, .55]
    out = vitviz.rollout(maps([a], layout))
    assert torch.allclose(out, torch.tensor([[[0.45, 0.55]]]))
    assert vitviz.cls_maps(maps([a], layout)).flatten().tolist() == pytest.approx([0.4, 0.6])


def reference_rollout(att: np.ndarray, num_prefix, fusion, ratio, has_cls=True):
    """Straight loops over one sample, written from the DESIGN text. att: [L, H, N, N]."""
    n = att.shape[-1]
    r = np.eye(n)
    for layer in att:
        a = {"mean": layer.mean(0), "max": layer.max(0), "min": layer.min(0)}[fusion].astype(np.float64)
        k = int(n * n * ratio)
        if k:
            order = np.argsort(a.flatten(), kind="stable")[:k]
            flat = a.flatten()
            for i in order:
                if has_cls and i == 0:
                    continue
                flat[i] = 0.0
            a = flat.reshape(n, n)
        a = 0.5 * a + 0.5 * np.eye(n)
        a = a / a.sum(-1, keepdims=True)
        r = a @ r
    return r[0, num_prefix:]


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.9])
def test_batched_equals_reference_one_by_one(fusion, ratio):
    g = torch.Generator().manual_seed(0)
    layout = TokenLayout(num_prefix=2, grid=(3, 4))
    n = layout.num_tokens
    att = torch.softmax(torch.randn(3, 4, 2, n, n, generator=g) * 3, dim=-1)  # [L, B, H, N, N]
    batched = vitviz.rollout(AttentionMaps(att, layout), head_fusion=fusion, discard_ratio=ratio)
    for b in range(4):
        single = vitviz.rollout(AttentionMaps(att[:, b:b + 1], layout), head_fusion=fusion,
                                discard_ratio=ratio)
        assert torch.allclose(batched[b], single[0], atol=1e-6)
        ref = reference_rollout(att[:, b].double().numpy(), 2, fusion, ratio)
        assert np.allclose(batched[b].flatten().numpy(), ref, atol=1e-5)


def test_rows_of_rollout_product_sum_to_one():
    layout = TokenLayout(num_prefix=1, grid=(2, 2))
    att = torch.softmax(torch.randn(4, 2, 3, 5, 5), dim=-1)
    from vitviz.analyze import rollout_matrix
    r = rollout_matrix(AttentionMaps(att, layout), discard_ratio=0.5)
    assert torch.allclose(r.sum(-1), torch.ones(2, 5), atol=1e-5)


def test_half_precision_input_accumulates_in_float32():
    layout = TokenLayout(num_prefix=1, grid=(3, 3))
    att = torch.softmax(torch.randn(6, 2, 3, 10, 10), dim=-1)
    full = vitviz.rollout(AttentionMaps(att, layout))
    half = vitviz.rollout(AttentionMaps(att.to(torch.bfloat16), layout))
    assert half.dtype == torch.float32
    assert torch.allclose(full, half, atol=1e-2)


def test_cls_maps_golden():
    layout = TokenLayout(num_prefix=1, grid=(1, 2))
    h1 = [[0.2, 0.3, 0.5], [1, 0, 0], [1, 0, 0]]
    h2 = [[0.6, 0.1, 0.3], [1, 0, 0], [1, 0, 0]]
    m = maps([[h1, h2], [h2, h1]], layout)
    out = vitviz.cls_maps(m)  # last layer: heads (h2, h1)
    assert out.shape == (1, 2, 1, 2)
    assert torch.allclose(out[0, :, 0], torch.tensor([[0.1, 0.3], [0.3, 0.5]]))
    assert torch.allclose(vitviz.cls_maps(m, layer=0)[0, 0, 0], torch.tensor([0.3, 0.5]))
    with pytest.raises(ValueError, match="out of range"):
        vitviz.cls_maps(m, layer=2)


def test_bad_discard_ratio():
    with pytest.raises(ValueError, match="discard_ratio"):
        vitviz.rollout(maps([[[[0.5, 0.5], [0.5, 0.5]]]], ONE_PATCH), discard_ratio=1.0)


@pytest.mark.parametrize("ratio,start", [(0.0, 0), (0.9, 0), (0.5, 2), (0.5, -2)])
def test_stream_equals_stored(ratio, start):
    from vitviz.analyze._rollout import RolloutStream

    layout = TokenLayout(num_prefix=1, grid=(3, 3))
    att = torch.softmax(torch.randn(5, 3, 2, 10, 10) * 2, dim=-1)
    stored = vitviz.rollout(AttentionMaps(att, layout), discard_ratio=ratio, start_layer=start)
    s = RolloutStream(discard_ratio=ratio, start_layer=start)
    for depth in (5, None):  # the depth known as the layers run, or only at the end
        s.reset()
        for i, layer in enumerate(att):
            s.update(layer, layer=i, num_layers=depth, layout=layout)
        # the stream keeps the layer matrices and pushes the row down as rollout() does: bit-equal;
        # the full product R = Â_L … Â_start associates the same matrices the other way round
        assert torch.equal(s.result(layout), stored)
        full = token_map(rollout_matrix(AttentionMaps(att, layout), discard_ratio=ratio, start_layer=start), layout)
        torch.testing.assert_close(s.result(layout), full, rtol=1e-5, atol=1e-7)
    s.reset()
    with pytest.raises(ValueError, match="no layer"):
        s.result(layout)
