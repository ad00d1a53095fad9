"""Per-head statistics: entropy, mean attention distance and prefix share on hand cases,
an independent loop reference, and batching."""

import math

import numpy as np
import pytest
import torch

from vitviz import AttentionMaps, LayoutError, TokenLayout
from vitviz.analyze.stats import attention_entropy, mean_attention_distance, patch_distances, prefix_attention_share

CLS_1x3 = TokenLayout(num_prefix=1, grid=(1, 3))  # CLS + 3 patches in a row


def one(rows, layout=CLS_1x3):
    """[N][N] rows of one layer, one sample, one head -> AttentionMaps [1, 1, 1, N, N]."""
    return AttentionMaps(torch.tensor(rows, dtype=torch.float64)[None, None, None], layout)


def test_entropy_hand_cases():
    uniform = [[0.25] * 4] * 4
    assert attention_entropy(one(uniform)).item() == pytest.approx(math.log(4))
    assert attention_entropy(one(uniform), normalized=True).item() == pytest.approx(1.0)
    onehot = [[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]]
    assert attention_entropy(one(onehot)).item() == pytest.approx(0.0)
    mixed = [[0.5, 0.5, 0, 0], [1.0, 0, 0, 0], [0.25] * 4, [0, 0, 0.5, 0.5]]
    # rows: log 2, 0, log 4 = 2 log 2, log 2 -> mean over all 4 rows: 4 log 2 / 4 = log 2
    assert attention_entropy(one(mixed)).item() == pytest.approx(math.log(2))
    assert attention_entropy(one(mixed), queries="cls").item() == pytest.approx(math.log(2))
    # patch rows only: (0 + 2 log 2 + log 2) / 3 = log 2; prefix rows only: log 2
    assert attention_entropy(one(mixed), queries="patches").item() == pytest.approx(math.log(2))
    skewed = [[0.5, 0.5, 0, 0], [1.0, 0, 0, 0], [1.0, 0, 0, 0], [0.25] * 4]
    assert attention_entropy(one(skewed), queries="patches").item() == pytest.approx(math.log(4) / 3)


def test_distance_hand_cases():
    # patch 0 (query token 1) attends to patch 2 (token 3): distance 2 patches = 32 px at p=16
    rows = [[1.0, 0, 0, 0], [0, 0, 0, 1.0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]]
    m = one(rows)
    # queries: patch 0 -> 2, patch 1 -> itself 0, patch 2 -> itself 0: mean 2/3
    assert mean_attention_distance(m).item() == pytest.approx(2 / 3)
    assert mean_attention_distance(m, patch_size=16).item() == pytest.approx(32 / 3)
    assert mean_attention_distance(m, patch_size=(8, 16)).item() == pytest.approx(32 / 3)  # along a row


def test_distance_excludes_prefix_tokens_and_renormalises():
    # patch 0 puts 0.5 on CLS, 0.25 on itself, 0.25 on patch 1 (distance 1)
    rows = [[1.0, 0, 0, 0], [0.5, 0.25, 0.25, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]]
    m = one(rows)
    assert mean_attention_distance(m).item() == pytest.approx((0.25 / 0.5) / 3)
    assert mean_attention_distance(m, renormalize=False).item() == pytest.approx(0.25 / 3)


def test_patch_distances_on_a_grid():
    d = patch_distances((2, 3), patch_size=(10, 20), dtype=torch.float64)
    # patch 0 at (0, 0), patch 5 at (1, 2): sqrt(10^2 + 40^2)
    assert d[0, 5].item() == pytest.approx(math.hypot(10, 40))
    assert torch.allclose(d, d.T) and (d.diagonal() == 0).all()


def reference_distance(att, grid, p, patch):
    """Loops over queries and keys for one layer/sample/head. att [N, N]."""
    gh, gw = grid
    total = 0.0
    for q in range(gh * gw):
        row = att[p + q, p:]
        row = row / row.sum()
        acc = 0.0
        for k in range(gh * gw):
            dy = (q // gw - k // gw) * patch
            dx = (q % gw - k % gw) * patch
            acc += row[k] * math.hypot(dy, dx)
        total += acc
    return total / (gh * gw)


def test_distance_matches_loops_and_batched_equals_one_by_one():
    g = torch.Generator().manual_seed(0)
    layout = TokenLayout(num_prefix=2, grid=(3, 4))
    att = torch.softmax(torch.randn(2, 3, 2, 14, 14, generator=g) * 2, -1)
    m = AttentionMaps(att, layout)
    d = mean_attention_distance(m, patch_size=16)
    e = attention_entropy(m)
    s = prefix_attention_share(m)
    assert d.shape == e.shape == s.shape == (2, 3, 2)
    for b in range(3):
        single = AttentionMaps(att[:, b:b + 1], layout)
        assert torch.allclose(mean_attention_distance(single, patch_size=16)[:, 0], d[:, b])
        assert torch.allclose(attention_entropy(single)[:, 0], e[:, b])
        assert torch.allclose(prefix_attention_share(single)[:, 0], s[:, b])
        for layer in range(2):
            for h in range(2):
                ref = reference_distance(att[layer, b, h].double().numpy(), (3, 4), 2, 16)
                assert d[layer, b, h].item() == pytest.approx(ref, rel=1e-5)


def test_prefix_share_hand_cases():
    rows = [[1.0, 0, 0, 0], [0.5, 0.25, 0.25, 0], [0.1, 0, 0.9, 0], [0.0, 0, 0, 1.0]]
    m = one(rows)
    assert prefix_attention_share(m).item() == pytest.approx(0.6 / 3)
    assert prefix_attention_share(m, queries="all").item() == pytest.approx(1.6 / 4)
    assert prefix_attention_share(m, per_token=True).shape == (1, 1, 1, 1)
    # two prefix tokens (CLS + register): per token
    layout = TokenLayout(num_prefix=2, grid=(1, 2))
    rows = [[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0.2, 0.6, 0.2, 0], [0.4, 0.0, 0, 0.6]]
    per = prefix_attention_share(one(rows, layout), per_token=True).flatten().tolist()
    assert per == pytest.approx([0.3, 0.3])
    # no prefix tokens: nothing goes to them
    plain = TokenLayout(num_prefix=0, grid=(1, 2))
    assert prefix_attention_share(one([[0.5, 0.5], [0.5, 0.5]], plain)).item() == 0.0


def test_query_sets_need_their_tokens():
    plain = one([[0.5, 0.5], [0.5, 0.5]], TokenLayout(num_prefix=0, grid=(1, 2)))
    with pytest.raises(LayoutError):
        attention_entropy(plain, queries="cls")
    with pytest.raises(ValueError, match="queries"):
        attention_entropy(plain, queries="rows")


def test_float32_outputs_from_half_inputs():
    att = torch.softmax(torch.randn(2, 1, 2, 4, 4), -1)
    m16 = AttentionMaps(att.to(torch.bfloat16), CLS_1x3)
    for fn in (attention_entropy, mean_attention_distance, prefix_attention_share):
        out = fn(m16)
        assert out.dtype == torch.float32
        assert np.allclose(out.numpy(), fn(AttentionMaps(att, CLS_1x3)).numpy(), atol=2e-2)
