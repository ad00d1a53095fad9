"""Faithfulness metrics: hand-computed cases, invariants, and equivalence with direct computations."""

import math

import pytest
import torch

from vitviz.errors import LayoutError
from vitviz.evaluate.faithfulness import deletion_insertion, gaussian_blur, substrate
from vitviz.evaluate.metrics import (
    centre_prior,
    curve_auc,
    energy_pointing,
    mask_auc,
    mask_iou,
    normalize_maps,
    patch_counts,
    patch_order,
    pointing_game,
    random_maps,
    step_counts,
    step_masks,
    word_grounding,
)


def _mask(h, w, *cells):
    m = torch.zeros(1, h, w, dtype=torch.bool)
    for y, x in cells:
        m[0, y, x] = True
    return m


def _upsample(maps, h, w):
    return torch.nn.functional.interpolate(maps[:, None].float(), size=(h, w), mode="nearest")[:, 0]


# ---- patch_counts -------------------------------------------------------------------------------

def test_patch_counts_hand_computed():
    m = torch.zeros(1, 4, 4, dtype=torch.bool)
    m[0, :2, :3] = True  # 6 pixels: 4 in patch (0,0), 2 in patch (0,1)
    inside, total = patch_counts(m, (2, 2))
    assert inside.tolist() == [[[4.0, 2.0], [0.0, 0.0]]]
    assert total.tolist() == [[4.0, 4.0], [4.0, 4.0]]


def test_patch_counts_match_nearest_upsampling_for_non_multiples():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(3, 13, 10, generator=g) > 0.6
    inside, total = patch_counts(masks, (3, 4))
    # each pixel belongs to the patch whose value nearest upsampling gives it
    ids = torch.arange(12, dtype=torch.float32).reshape(1, 3, 4)
    owner = _upsample(ids, 13, 10)[0].long()  # [13, 10]
    for b in range(3):
        want = torch.bincount(owner[masks[b]], minlength=12).float().reshape(3, 4)
        assert torch.equal(inside[b], want)
    assert torch.equal(total, torch.bincount(owner.flatten(), minlength=12).float().reshape(3, 4))


# ---- pointing game ------------------------------------------------------------------------------

def test_pointing_game_hit_and_miss():
    maps = torch.tensor([[[0.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [1.0, 0.0]]])
    mask = _mask(4, 4, (0, 3))  # one pixel in the top-right patch
    masks = mask.expand(2, 4, 4)
    assert pointing_game(maps, masks).tolist() == [1.0, 0.0]


def test_pointing_game_threshold_and_ties():
    mask = _mask(4, 4, (0, 3))  # top-right patch is 1/4 object
    top_right = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
    assert pointing_game(top_right, mask, threshold=0.2).item() == 1.0
    assert pointing_game(top_right, mask, threshold=0.25).item() == 0.0
    # ties: the top row ties, one of the two patches hits -> expected 0.5
    tie = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    assert pointing_game(tie, mask).item() == 0.5
    # a constant map: 1 of 4 patches hits
    assert pointing_game(torch.ones(1, 2, 2), mask).item() == 0.25


def test_pointing_game_equals_pixel_definition_on_random_cases():
    g = torch.Generator().manual_seed(1)
    maps = torch.rand(20, 4, 4, generator=g)
    masks = torch.rand(20, 16, 16, generator=g) > 0.9
    got = pointing_game(maps, masks)
    up = _upsample(maps, 16, 16)  # [B, 16, 16]
    for b in range(20):
        at_max = up[b] == up[b].max()
        assert got[b].item() == float(masks[b][at_max].any())  # a single maximal patch


def test_pointing_game_rejects_mismatched_batches():
    with pytest.raises(LayoutError):
        pointing_game(torch.rand(2, 2, 2), torch.zeros(3, 4, 4, dtype=torch.bool))


# ---- energy, IoU, AUC ---------------------------------------------------------------------------

def test_energy_pointing_hand_computed():
    maps = torch.tensor([[[3.0, 1.0], [0.0, 0.0]]])
    m = torch.zeros(1, 4, 4, dtype=torch.bool)
    m[0, :2, :2] = True  # the whole top-left patch
    m[0, 0, 2] = True  # one pixel of the top-right patch
    # upsampled mass: 4*3 + 4*1 = 16; on the object: 4*3 + 1*1 = 13
    assert energy_pointing(maps, m).item() == pytest.approx(13 / 16)
    with pytest.raises(ValueError):
        energy_pointing(-maps, m)


def test_mask_iou_hand_computed():
    maps = torch.tensor([[[1.0, 0.6], [0.0, 0.2]]])  # normalised: 1, .6, 0, .2
    m = torch.zeros(1, 4, 4, dtype=torch.bool)
    m[0, :2, :2] = True
    m[0, 2, 0] = True  # 5 object pixels
    # threshold .5 -> predicted: top row (8 pixels); intersection 4; union 8 + 5 - 4 = 9
    assert mask_iou(maps, m).item() == pytest.approx(4 / 9)
    # threshold .9 -> top-left patch only: IoU 4 / 5
    assert mask_iou(maps, m, threshold=0.9).item() == pytest.approx(4 / 5)
    # constant map predicts nothing
    assert mask_iou(torch.ones(1, 2, 2), m).item() == 0.0


def _auc_pixels(values, labels):
    """ROC AUC by brute force over all (positive, negative) pixel pairs."""
    pos, neg = values[labels], values[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    d = pos[:, None] - neg[None, :]
    return float(((d > 0).float() + 0.5 * (d == 0).float()).mean())


def test_mask_auc_hand_computed():
    maps = torch.tensor([[[2.0, 1.0], [1.0, 0.0]]])
    m = torch.zeros(1, 2, 2, dtype=torch.bool)
    m[0, 0, 0] = True
    m[0, 0, 1] = True
    # positives 2, 1; negatives 1, 0 -> pairs: (2>1)=1, (2>0)=1, (1=1)=.5, (1>0)=1 -> 3.5/4
    assert mask_auc(maps, m).item() == pytest.approx(3.5 / 4)
    assert math.isnan(mask_auc(maps, torch.zeros(1, 2, 2, dtype=torch.bool)).item())


def test_mask_auc_equals_brute_force_on_pixels():
    g = torch.Generator().manual_seed(2)
    maps = torch.randint(0, 4, (6, 3, 3), generator=g).float()  # many ties
    masks = torch.rand(6, 12, 9, generator=g) > 0.7
    got = mask_auc(maps, masks)
    up = _upsample(maps, 12, 9)
    for b in range(6):
        assert got[b].item() == pytest.approx(_auc_pixels(up[b].flatten(), masks[b].flatten()), abs=1e-6)


def test_mask_auc_in_chunks_equals_one_pass(monkeypatch):
    import vitviz.evaluate.metrics as metrics

    g = torch.Generator().manual_seed(4)
    maps = torch.rand(5, 3, 3, generator=g)
    masks = torch.rand(5, 9, 9, generator=g) > 0.6
    whole = mask_auc(maps, masks)
    monkeypatch.setattr(metrics, "_PAIRWISE_BUDGET", 1)  # one sample per chunk
    assert torch.allclose(mask_auc(maps, masks), whole)


def test_metrics_are_scale_invariant_and_batched_equals_one_by_one():
    g = torch.Generator().manual_seed(3)
    maps = torch.rand(5, 4, 4, generator=g)
    masks = torch.rand(5, 8, 8, generator=g) > 0.7
    for fn in (pointing_game, mask_iou, mask_auc, energy_pointing):
        batched = fn(maps, masks)
        single = torch.cat([fn(maps[i:i + 1], masks[i:i + 1]) for i in range(5)])
        assert torch.allclose(batched, single, equal_nan=True)
        assert torch.allclose(fn(maps * 7.0, masks), batched, atol=1e-6, equal_nan=True)


def test_normalize_maps():
    out = normalize_maps(torch.tensor([[[1.0, 3.0]], [[2.0, 2.0]]]))
    assert out.tolist() == [[[0.0, 1.0]], [[0.0, 0.0]]]


# ---- deletion / insertion helpers -------------------------------------------------------------

def test_patch_order_and_step_masks():
    maps = torch.tensor([[[0.1, 0.9], [0.5, 0.9]]])
    assert patch_order(maps).tolist() == [[1, 3, 2, 0]]  # ties keep index order
    assert step_counts(4, 2) == [0, 2, 4]
    sel = step_masks(maps, steps=2)
    assert sel.shape == (1, 3, 2, 2)
    assert sel[0, 0].sum() == 0 and sel[0, 2].all()
    assert sel[0, 1].tolist() == [[False, True], [False, True]]
    full = step_masks(maps)  # one patch per step
    assert full.shape == (1, 5, 2, 2)
    assert [int(full[0, s].sum()) for s in range(5)] == [0, 1, 2, 3, 4]
    # nested: each step keeps the previous selection
    assert (full[:, 1:] >= full[:, :-1]).all()


def test_curve_auc_hand_computed():
    assert curve_auc(torch.tensor([[1.0, 0.0]])).item() == pytest.approx(0.5)
    assert curve_auc(torch.tensor([[1.0, 1.0, 0.0]])).item() == pytest.approx(0.75)
    assert curve_auc(torch.ones(2, 7)).tolist() == [1.0, 1.0]


class _PatchClassifier(torch.nn.Module):
    """Two classes; the logit of class 1 is 10 x the mean input of the top-left 2x2 patch."""

    def forward(self, x):  # [B, 3, 4, 4]
        s = 10.0 * x[:, :, :2, :2].mean(dim=(1, 2, 3))  # [B]
        return torch.stack([torch.zeros_like(s), s], 1)  # [B, 2]


def test_deletion_insertion_on_a_known_model():
    model = _PatchClassifier()
    x = torch.ones(2, 3, 4, 4)
    good = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # points at the patch the model uses
    bad = torch.tensor([[0.0, 1.0], [1.0, 1.0]])  # puts it last
    curves = deletion_insertion(model, x, torch.stack([good, bad]), target=torch.tensor([1, 1]),
                                insertion_substrate="zero")
    p_on, p_off = 1 / (1 + math.exp(-10)), 0.5  # softmax of class 1 with the patch at 1 or 0
    assert curves.deletion.shape == (2, 5)
    assert torch.allclose(curves.deletion[0], torch.tensor([p_on, p_off, p_off, p_off, p_off]))
    assert torch.allclose(curves.deletion[1], torch.tensor([p_on, p_on, p_on, p_on, p_off]))
    assert torch.allclose(curves.insertion[0], torch.tensor([p_off, p_on, p_on, p_on, p_on]))
    assert curves.deletion_auc[0] < curves.deletion_auc[1]
    assert curves.insertion_auc[0] > curves.insertion_auc[1]
    # the batch size of the perturbed passes does not change anything
    again = deletion_insertion(model, x, torch.stack([good, bad]), target=torch.tensor([1, 1]),
                               insertion_substrate="zero", batch_size=3)
    assert torch.allclose(again.deletion, curves.deletion)
    assert torch.allclose(again.insertion, curves.insertion)
    # default target: the prediction on the clean input (class 1 here)
    assert deletion_insertion(model, x, torch.stack([good, bad]), steps=2).target.tolist() == [1, 1]


def test_deletion_insertion_checks_grid():
    with pytest.raises(LayoutError):
        deletion_insertion(_PatchClassifier(), torch.ones(1, 3, 4, 4), torch.ones(1, 3, 3))


def test_substrates():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    assert torch.equal(substrate(x, "zero"), torch.zeros_like(x))
    assert torch.allclose(substrate(x, "mean")[:, :, 0, 0], x.mean(dim=(-2, -1)))
    assert torch.equal(substrate(x, 1.5), torch.full_like(x, 1.5))
    # blur keeps constants and the mean of a symmetric signal
    c = torch.full((1, 3, 9, 9), 2.0)
    assert torch.allclose(gaussian_blur(c, 1.5), c)
    impulse = torch.zeros(1, 1, 9, 9)
    impulse[0, 0, 4, 4] = 1.0
    b = gaussian_blur(impulse, 1.0)
    assert b.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(b[0, 0], b[0, 0].T) and b[0, 0, 4, 4] == b.max()
    with pytest.raises(ValueError):
        substrate(x, "noise")


# ---- words and baselines --------------------------------------------------------------------------

def test_word_grounding():
    maps = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 0.0]]])
    obj = torch.zeros(4, 4, dtype=torch.bool)
    obj[:2, :2] = True
    out = word_grounding(maps, [obj, obj, None])
    assert out[:2].tolist() == [1.0, 0.0] and math.isnan(out[2].item())
    assert torch.nanmean(out).item() == 0.5
    with pytest.raises(LayoutError):
        word_grounding(maps, [obj])


def test_vitviz_metrics_namespace():
    import vitviz.evaluate as vm

    assert vm.pointing_game is pointing_game and vm.deletion_insertion is deletion_insertion
    assert all(callable(getattr(vm, n)) for n in vm.__all__)


def test_baselines():
    c = centre_prior((4, 6))
    assert c.shape == (4, 6)
    assert torch.allclose(c, c.flip(0)) and torch.allclose(c, c.flip(1))  # symmetric
    centre = torch.zeros(4, 6, dtype=torch.bool)
    centre[1:3, 2:4] = True
    assert torch.allclose(c[centre], c.max()) and c[~centre].max() < c.max()  # peaks in the middle
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(random_maps(3, (2, 2), generator=g1), random_maps(3, (2, 2), generator=g2))
