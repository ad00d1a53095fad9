"""Randomisation sanity checks: map-similarity metrics (golden values, definitions) and
``vitviz.evaluate.randomization`` (order, determinism, restoration) on tiny random models."""

import math

import pytest
import torch
from helpers import inputs, tiny_hf, tiny_timm

import vitviz
from vitviz.errors import LayoutError, VitvizError
from vitviz.evaluate.metrics import average_ranks, spearman, ssim, topk_overlap
from vitviz.evaluate.sanity import randomization, randomization_layers


def trained_like(model):
    """Move every parameter off its init value (LayerNorms start at exactly 1 and 0, so that
    re-initialising them would change nothing)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def rollout_of(model, x):
    with torch.no_grad(), vitviz.capture(model) as rec:
        model(x)
    return vitviz.rollout(rec.attentions)


# ---- map-similarity metrics ----------------------------------------------------------------------

def test_average_ranks_ties_and_spearman_golden():
    assert average_ranks(torch.tensor([[3.0, 1.0, 3.0, 2.0]])).tolist() == [[3.5, 1.0, 3.5, 2.0]]
    a = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    b = torch.tensor([[[1.0, 3.0], [2.0, 4.0]]])
    # 1 - 6 sum d^2 / (n (n^2 - 1)) = 1 - 6 * 2 / 60
    assert spearman(a, b).item() == pytest.approx(0.8, abs=1e-6)
    assert spearman(a, a.exp() * 7).item() == pytest.approx(1.0)
    assert spearman(a, -a).item() == pytest.approx(-1.0)
    assert math.isnan(spearman(a, torch.ones_like(a)).item())


def test_spearman_with_ties_equals_pearson_of_average_ranks():
    # [1, 1, 2, 3] -> ranks [1.5, 1.5, 3, 4]; [4, 3, 3, 1] -> ranks [4, 2.5, 2.5, 1]
    ra, rb = torch.tensor([1.5, 1.5, 3, 4]), torch.tensor([4, 2.5, 2.5, 1])
    want = torch.corrcoef(torch.stack([ra, rb]))[0, 1].item()
    got = spearman(torch.tensor([[[1.0, 1.0], [2.0, 3.0]]]), torch.tensor([[[4.0, 3.0], [3.0, 1.0]]]))
    assert got.item() == pytest.approx(want, abs=1e-6)


def test_ssim_golden_with_a_one_patch_window():
    a = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    b = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
    c1 = 0.01 ** 2  # one-patch window: no variance, SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    want = (1 + 1 + c1 / (1 + c1) + 1) / 4
    assert ssim(a, b, window=1).item() == pytest.approx(want, abs=1e-6)
    assert ssim(a, a).item() == pytest.approx(1.0, abs=1e-6)


def _ssim_by_definition(a, b, window, sigma):
    a = (a - a.min()) / (a.max() - a.min())
    b = (b - b.min()) / (b.max() - b.min())
    h, w = a.shape
    kh, kw = min(window, h), min(window, w)
    g = lambda k: torch.exp(-(torch.arange(k) - (k - 1) / 2) ** 2 / (2 * sigma ** 2))  # noqa: E731
    wgt = g(kh)[:, None] * g(kw)[None, :]
    wgt = wgt / wgt.sum()
    vals = []
    for i in range(h - kh + 1):
        for j in range(w - kw + 1):
            pa, pb = a[i:i + kh, j:j + kw], b[i:i + kh, j:j + kw]
            ma, mb = (wgt * pa).sum(), (wgt * pb).sum()
            va, vb = (wgt * (pa - ma) ** 2).sum(), (wgt * (pb - mb) ** 2).sum()
            cv = (wgt * (pa - ma) * (pb - mb)).sum()
            vals.append(((2 * ma * mb + 1e-4) * (2 * cv + 9e-4)) / ((ma ** 2 + mb ** 2 + 1e-4) * (va + vb + 9e-4)))
    return torch.stack(vals).mean()


def test_ssim_equals_its_definition_on_random_maps():
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(2, 9, 7, generator=g).double(), torch.rand(2, 9, 7, generator=g).double()
    got = ssim(a, b, window=5, sigma=1.5)
    for i in range(2):
        assert got[i].item() == pytest.approx(_ssim_by_definition(a[i], b[i], 5, 1.5).item(), abs=1e-5)


def test_topk_overlap_golden_and_range():
    a = torch.tensor([[[4.0, 3.0], [2.0, 1.0]]])
    b = torch.tensor([[[4.0, 1.0], [3.0, 2.0]]])
    assert topk_overlap(a, b, 1).item() == 1.0
    assert topk_overlap(a, b, 2).item() == 0.5  # {0, 1} vs {0, 2}
    assert topk_overlap(a, b, 4).item() == 1.0
    with pytest.raises(ValueError, match="1 <= k <= 4"):
        topk_overlap(a, b, 5)
    with pytest.raises(LayoutError):
        spearman(a, torch.zeros(1, 3, 3))


# ---- randomization ------------------------------------------------------------------------------

def test_layers_top_down_for_timm_and_transformers():
    m = tiny_timm()
    steps = randomization_layers(m)
    assert [n for n, _ in steps] == ["head", "block 1", "block 0", "embeddings"]
    assert steps[0][1][0] is m.head and any(x is m.norm for x in steps[0][1])
    assert steps[1][1] == [m.blocks[1]]
    rest = {id(p) for p in steps[-1][1]}
    assert id(m.cls_token) in rest and id(m.pos_embed) in rest and id(m.patch_embed.proj.weight) in rest
    # every parameter belongs to exactly one step
    ids = [id(p) for _, items in steps for it in items
           for p in ([it] if isinstance(it, torch.nn.Parameter) else it.parameters())]
    assert sorted(ids) == sorted(id(p) for p in m.parameters())
    hf = tiny_hf()
    names = [n for n, _ in randomization_layers(hf)]
    assert names == ["head", "block 1", "block 0", "embeddings"]
    assert randomization_layers(hf)[0][1][0] is hf.classifier


def test_zero_steps_gives_the_trained_maps_and_correlation_one():
    m = vitviz.wrap(tiny_timm())
    x = inputs()
    r = randomization(m, x, "rollout", num_steps=0)
    assert r.steps == ["trained"]
    assert torch.equal(r.maps[0], rollout_of(m, x))
    assert torch.allclose(r.spearman, torch.ones(1, 3)) and torch.allclose(r.ssim, torch.ones(1, 3))
    assert torch.equal(r.topk, torch.ones(1, 3))


def _changed(model, trained):
    return {n for n, p in model.named_parameters() if not torch.equal(p, trained[n])}


@pytest.mark.parametrize("mode", ["cascade", "independent"])
def test_order_of_steps_and_what_each_changes(mode):
    m = vitviz.wrap(trained_like(tiny_timm()))
    trained = {n: p.detach().clone() for n, p in m.module.named_parameters()}
    seen = []

    def probe(model, x, target):  # records which parameters differ from the trained ones
        seen.append(_changed(model.module, trained))
        return rollout_of(model, x)

    r = randomization(m, inputs(), probe, mode=mode)
    groups = {"head": {"head.weight", "head.bias", "norm.weight", "norm.bias"}}
    for i in (1, 0):
        groups[f"block {i}"] = {n for n in trained if n.startswith(f"blocks.{i}.")}
    groups["embeddings"] = set(trained) - set().union(*groups.values())
    assert r.steps == ["trained", "head", "block 1", "block 0", "embeddings"]
    assert seen[0] == set()
    acc = set()
    for s, name in enumerate(r.steps[1:], start=1):
        acc |= groups[name]
        want = acc if mode == "cascade" else groups[name]
        assert seen[s] == want, (s, name)


def test_parameters_bit_equal_afterwards_also_after_an_exception():
    m = vitviz.wrap(tiny_timm())
    before = {k: v.clone() for k, v in m.module.state_dict().items()}
    randomization(m, inputs(), "relevance")
    after = m.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    calls = []

    def broken(model, x, target):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return rollout_of(model, x)

    with pytest.raises(RuntimeError, match="boom"):
        randomization(m, inputs(), broken)
    after = m.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not m.module.training


def test_deterministic_and_cascade_step_one_equals_independent_step_one():
    m = vitviz.wrap(tiny_timm())
    x = inputs()
    a = randomization(m, x, "relevance", seed=5)
    b = randomization(m, x, "relevance", seed=5)
    c = randomization(m, x, "relevance", seed=5, mode="independent")
    assert torch.equal(a.maps, b.maps)
    assert torch.equal(a.maps[:2], c.maps[:2])  # the head step is the same re-initialisation
    assert not torch.equal(a.maps[-1], c.maps[-1])


def test_rollout_ignores_the_head_relevance_does_not():
    m = vitviz.wrap(tiny_timm())
    x = inputs()
    roll = randomization(m, x, "rollout", num_steps=1)
    assert torch.equal(roll.maps[1], roll.maps[0])  # attention does not depend on the classifier head
    rel = randomization(m, x, "relevance", num_steps=1)
    assert not torch.allclose(rel.maps[1], rel.maps[0])
    assert rel.target is not None and torch.equal(rel.target, m(x).argmax(-1))


def test_batched_equals_one_by_one():
    m = vitviz.wrap(tiny_timm())
    x = inputs(4)
    full = randomization(m, x, "grad_rollout", batch_size=4, num_steps=2)
    small = randomization(m, x, "grad_rollout", batch_size=1, num_steps=2)
    assert torch.allclose(full.maps, small.maps, atol=1e-6)
    one = randomization(m, x[2:3], "grad_rollout", num_steps=2)
    assert torch.allclose(full.maps[:, 2:3], one.maps, atol=1e-6)
    assert torch.allclose(full.spearman[:, 2:3], one.spearman, atol=1e-5)


def test_transformers_model_runs_and_is_restored():
    hf = tiny_hf()
    m = vitviz.wrap(hf)
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    r = randomization(m, inputs(2), "rollout")
    assert r.maps.shape == (5, 2, 4, 4)
    assert torch.allclose(r.spearman[0], torch.ones(2))
    assert r.spearman[-1].abs().mean() < 0.9  # fully random weights: maps moved
    assert all(torch.equal(before[k], v) for k, v in hf.state_dict().items())


def test_baselines_do_not_change():
    m = vitviz.wrap(tiny_timm())
    for name in ("random", "centre"):
        r = randomization(m, inputs(2), name)
        assert torch.equal(r.maps[0], r.maps[-1])


def test_bad_input():
    m = vitviz.wrap(tiny_timm())
    with pytest.raises(VitvizError, match="unknown map method 'rolout'.*rollout"):
        randomization(m, inputs(), "rolout")
    with pytest.raises(LayoutError, match="32x32"):
        randomization(m, torch.randn(1, 3, 48, 48), "rollout")
    with pytest.raises(VitvizError, match="mode"):
        randomization(m, inputs(), "rollout", mode="sideways")
    with pytest.raises(VitvizError, match="top_k must be in 1..16"):
        randomization(m, inputs(), "rollout", num_steps=0, top_k=17)
    with pytest.raises(VitvizError, match="num_steps must be in 0..4"):
        randomization(m, inputs(), "rollout", num_steps=9)
    headless = vitviz.wrap(tiny_timm(num_classes=0))
    with pytest.raises(VitvizError, match="score_fn"):
        randomization(headless, inputs(), "relevance")
    r = randomization(headless, inputs(), "rollout")  # attention maps need no classifier
    assert r.steps[1] == "final norm"
