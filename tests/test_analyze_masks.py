"""DINO attention-mass masks: hand cases, DINO's own formulation, batching."""

import numpy as np
import pytest
import torch

from vitviz.analyze.masks import mask_mass, mass_masks


def grid(values, shape=(2, 2)):
    return torch.tensor(values, dtype=torch.float32).reshape(shape)


@pytest.mark.parametrize("t,expect", [
    (0.5, [1, 0, 0, 0]),    # 0.5 alone holds half the mass
    (0.51, [1, 1, 0, 0]),
    (0.8, [1, 1, 0, 0]),    # 0.5 + 0.3 = 0.8 exactly: the third patch is not needed
    (0.81, [1, 1, 1, 0]),
    (1.0, [1, 1, 1, 0]),    # zero-mass patches never join
    (0.1, [1, 0, 0, 0]),
])
def test_hand_cases(t, expect):
    m = grid([0.5, 0.3, 0.2, 0.0])
    assert mass_masks(m, t).flatten().int().tolist() == expect


def test_scale_and_order_do_not_matter():
    m = grid([2.0, 10.0, 0.0, 8.0])  # mass 20: 10 is 50%, 10 + 8 is 90%
    assert mass_masks(m, 0.6).flatten().tolist() == [False, True, False, True]
    assert mass_masks(m * 7, 0.6).flatten().tolist() == [False, True, False, True]


def test_ties_keep_the_first_and_empty_maps():
    assert mass_masks(grid([0.25, 0.25, 0.25, 0.25]), 0.5).flatten().tolist() == [True, True, False, False]
    assert not mass_masks(torch.zeros(3, 3), 0.6).any()


def dino_reference(attn: np.ndarray, threshold: float) -> np.ndarray:
    """DINO's visualize_attention.py for one head: sort ascending, cumsum > 1 - t, unsort."""
    idx = np.argsort(attn, kind="stable")
    val = attn[idx] / attn.sum()
    keep_sorted = np.cumsum(val) > 1 - threshold
    out = np.zeros_like(keep_sorted)
    out[idx] = keep_sorted
    return out


def test_equals_dino_formulation_and_batched_equals_one_by_one():
    g = torch.Generator().manual_seed(0)
    maps = torch.softmax(torch.randn(3, 4, 5, 6, generator=g) * 2, -1)  # [B, H, gh, gw], no ties
    for t in (0.3, 0.6, 0.9):
        batched = mass_masks(maps, t)
        assert batched.shape == maps.shape and batched.dtype == torch.bool
        for b in range(3):
            for h in range(4):
                ref = dino_reference(maps[b, h].flatten().double().numpy(), t)
                assert np.array_equal(batched[b, h].flatten().numpy(), ref)
                assert torch.equal(mass_masks(maps[b, h], t), batched[b, h])
        assert (mask_mass(maps, batched) >= t - 1e-6).all()


def test_smallest_set():
    # removing the smallest kept patch drops the mass below t
    g = torch.Generator().manual_seed(1)
    m = torch.rand(50, 4, 4, generator=g)
    mk = mass_masks(m, 0.7)
    for i in range(50):
        kept = m[i][mk[i]]
        assert kept.sum() >= 0.7 * m[i].sum() - 1e-5
        assert kept.sum() - kept.min() < 0.7 * m[i].sum()


def test_bad_arguments():
    with pytest.raises(ValueError, match="fraction"):
        mass_masks(torch.rand(2, 2), 0.0)
    with pytest.raises(ValueError, match="fraction"):
        mass_masks(torch.rand(2, 2), 1.5)
    with pytest.raises(ValueError, match="non-negative"):
        mass_masks(-torch.rand(2, 2), 0.5)
    with pytest.raises(ValueError, match="gh, gw"):
        mass_masks(torch.rand(4), 0.5)
