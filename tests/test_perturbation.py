"""Token deletion / insertion and ROAD: equivalence with from-weights forwards, definitions on
hand-built images, invariants, batched against one by one."""

import numpy as np
import pytest
import torch
import transformers
from helpers import inputs, tiny_hf, tiny_timm

import vitviz
from vitviz.errors import LayoutError, VitvizError
from vitviz.evaluate.perturbation import (
    forward_kept_tokens,
    linear_impute,
    noisy_linear_impute,
    road,
    token_curves,
    token_site,
)


def maps_of(b=3, seed=2):
    return torch.rand(b, 4, 4, generator=torch.Generator().manual_seed(seed))


def timm_tokens(model, x, keep):
    """timm ViT from its parts, the patch tokens gathered after _pos_embed."""
    h = model._pos_embed(model.patch_embed(x))  # [B, P+G, D]
    p = model.num_prefix_tokens
    idx = torch.cat([torch.arange(p).expand(x.shape[0], p), keep + p], 1)
    h = h.gather(1, idx[:, :, None].expand(-1, -1, h.shape[-1]))
    return model.forward_head(model.norm(model.blocks(model.norm_pre(h))))


def hf_prefix_only(model, x):
    h = model.vit.embeddings(x)[:, :1]  # CLS with its position embedding
    for layer in model.vit.layers:  # one token attends to itself only: attention output = its value
        att = layer.attention
        y = layer.layernorm_before(h)
        h = h + att.o_proj(att.v_proj(y))
        h = h + layer.mlp(layer.layernorm_after(h))
    return model.classifier(model.vit.layernorm(h)[:, 0])


# ---- token selection ----------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [{}, {"name": "deit_tiny_distilled_patch16_224"},
                                {"global_pool": "avg", "class_token": False, "fc_norm": False}])
def test_kept_tokens_all_and_none_and_a_subset_timm(kw):
    model = tiny_timm(**kw)
    x = inputs()
    with torch.no_grad():
        full = model(x)
        all_kept = forward_kept_tokens(model, x, torch.arange(16).expand(3, 16))
        assert torch.allclose(all_kept, full, atol=1e-6)
        if model.num_prefix_tokens:
            none = forward_kept_tokens(model, x, torch.zeros(3, 0, dtype=torch.long))
            assert torch.allclose(none, timm_tokens(model, x, torch.zeros(3, 0, dtype=torch.long)), atol=1e-6)
        keep = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(i))[:5].sort().values
                            for i in range(3)])
        assert torch.allclose(forward_kept_tokens(model, x, keep), timm_tokens(model, x, keep), atol=1e-6)
    assert "patch_drop" in token_site(model)[1]
    assert not any(m._forward_hooks for m in model.modules())  # the hook is gone


def test_kept_tokens_transformers():
    model = tiny_hf()
    x = inputs(2)
    with torch.no_grad():
        full = model(x).logits
        out = forward_kept_tokens(model, x, torch.arange(16).expand(2, 16))
        assert torch.allclose(out.logits, full, atol=1e-5)
        none = forward_kept_tokens(model, x, torch.zeros(2, 0, dtype=torch.long)).logits
        assert torch.allclose(none, hf_prefix_only(model, x), atol=1e-5)
    assert "embeddings" in token_site(model)[1]


def test_token_curves_end_points():
    model = tiny_timm()
    x = inputs()
    c = token_curves(model, x, maps_of(), steps=4)
    with torch.no_grad():
        p_full = model(x).softmax(-1)
        p_none = timm_tokens(model, x, torch.zeros(3, 0, dtype=torch.long)).softmax(-1)
    t = p_full.argmax(-1)
    assert torch.equal(c.target, t)
    idx = torch.arange(3)
    assert torch.allclose(c.deletion[:, 0], p_full[idx, t], atol=1e-6)
    assert torch.allclose(c.deletion[:, -1], p_none[idx, t], atol=1e-6)
    assert torch.allclose(c.insertion[:, 0], p_none[idx, t], atol=1e-6)
    assert torch.allclose(c.insertion[:, -1], p_full[idx, t], atol=1e-6)


def test_token_curves_middle_point_equals_the_manual_forward():
    model = tiny_timm()
    x, maps = inputs(), maps_of()
    c = token_curves(model, x, maps, steps=4)  # step 1: 4 tokens
    order = vitviz.evaluate.patch_order(maps)
    with torch.no_grad():
        kept = timm_tokens(model, x, order[:, 4:].sort(1).values).softmax(-1)
        shown = timm_tokens(model, x, order[:, :4].sort(1).values).softmax(-1)
    idx = torch.arange(3)
    assert torch.allclose(c.deletion[:, 1], kept[idx, c.target], atol=1e-6)
    assert torch.allclose(c.insertion[:, 1], shown[idx, c.target], atol=1e-6)


def test_token_curves_batched_equals_one_by_one_and_lerf_is_reversed_insertion():
    model = tiny_timm()
    x, maps = inputs(4), maps_of(4)
    full = token_curves(model, x, maps, batch_size=128)
    tiny = token_curves(model, x, maps, batch_size=3)
    assert torch.allclose(full.deletion, tiny.deletion, atol=1e-6)
    for i in range(4):
        one = token_curves(model, x[i:i + 1], maps[i:i + 1])
        assert torch.allclose(one.deletion, full.deletion[i:i + 1], atol=1e-6)
        assert torch.allclose(one.insertion, full.insertion[i:i + 1], atol=1e-6)
    lerf = token_curves(model, x, maps, order="lerf", insertion=False)
    # without a substrate, deleting the least relevant first keeps the most relevant: insertion, reversed
    assert torch.allclose(lerf.deletion, full.insertion.flip(-1), atol=1e-6)
    assert lerf.insertion is None


def _forward_log(model):
    """Record (sequence length at the blocks, attn_mask given) of every forward pass of a timm ViT."""
    log = []

    def pre(mod, args, kwargs):
        log.append([None, kwargs.get("attn_mask") is not None])

    def tokens(mod, args, out):
        log[-1][0] = out.shape[1]

    handles = [model.register_forward_pre_hook(pre, with_kwargs=True), model.norm_pre.register_forward_hook(tokens)]
    return log, handles


@pytest.mark.parametrize("kw", [{}, {"name": "deit_tiny_distilled_patch16_224"}, {"reg_tokens": 2}])
def test_token_curves_padded_batches_equal_every_sequence_alone(kw):
    """Sequences of different lengths share a forward pass, padded and masked; every point equals
    the model run on that sequence alone, built from the model's parts (timm_tokens, no mask)."""
    model = tiny_timm(real_head=True, **kw)
    x, maps = inputs(3), maps_of(3, seed=5)
    log, handles = _forward_log(model)
    try:
        c = token_curves(model, x, maps, batch_size=16)  # 17 points, both curves: 102 sequences
    finally:
        for h in handles:
            h.remove()
    p = model.num_prefix_tokens
    assert any(masked for _, masked in log[1:])  # padded passes happened (log[0]: the target pass)
    lengths = {n for n, _ in log[1:]}
    assert len(log) - 1 < 17 and len(lengths) < 17  # fewer passes than lengths (every length from p to p + 16)
    order = vitviz.evaluate.patch_order(maps)  # [3, 16]
    with torch.no_grad():
        for s in range(17):
            for i in range(3):
                gone = timm_tokens(model, x[i:i + 1], order[i:i + 1, s:].sort(1).values).softmax(-1)
                shown = timm_tokens(model, x[i:i + 1], order[i:i + 1, :s].sort(1).values).softmax(-1)
                t = c.target[i]
                assert c.deletion[i, s] == pytest.approx(float(gone[0, t]), abs=2e-6)
                assert c.insertion[i, s] == pytest.approx(float(shown[0, t]), abs=2e-6)
    assert p >= 1 and not any(m._forward_hooks for m in model.modules())


def test_token_curves_pad_only_where_the_padding_stays_invisible():
    """Average pooling would read padded tokens: there every pass holds one sequence length."""
    model = tiny_timm(real_head=True, global_pool="avg")
    x, maps = inputs(2), maps_of(2)
    log, handles = _forward_log(model)
    try:
        c = token_curves(model, x, maps, steps=4, batch_size=16)
    finally:
        for h in handles:
            h.remove()
    assert not any(masked for _, masked in log)
    order = vitviz.evaluate.patch_order(maps)
    with torch.no_grad():
        mid = timm_tokens(model, x, order[:, 4:].sort(1).values).softmax(-1)
    assert torch.allclose(c.deletion[:, 1], mid[torch.arange(2), c.target], atol=1e-6)


def test_chunks_golden():
    from vitviz.evaluate.perturbation import _chunks

    # longest first; a batch stops at batch_size rows or when padding would exceed 1.25x its tokens
    assert _chunks([5, 9, 9, 8, 2], 10, 1.0) == [[1, 2], [3], [0], [4]]
    assert _chunks([5, 9, 9, 8, 2], 10, 1.25) == [[1, 2, 3, 0], [4]]  # 4*9=36 <= 1.25*31; then 5*9=45 > 1.25*33
    assert _chunks([5, 9, 9, 8, 2], 2, 1.25) == [[1, 2], [3, 0], [4]]  # 2*8=16 <= 1.25*13
    assert _chunks([], 4, 1.25) == []


def test_token_curves_score_fn_and_no_classifier():
    headless = tiny_timm(num_classes=0)
    x = inputs(2)
    with pytest.raises(VitvizError, match="score_fn"):
        token_curves(headless, x, maps_of(2))
    c = token_curves(headless, x, maps_of(2), steps=2, score_fn=lambda out: out.norm(dim=-1))
    with torch.no_grad():
        assert torch.allclose(c.deletion[:, 0], headless(x).norm(dim=-1), atol=1e-5)
    assert c.target is None
    hf_base = transformers.ViTModel(tiny_hf().config).eval()
    with pytest.raises(VitvizError, match="score_fn"):
        token_curves(vitviz.wrap(hf_base), x, maps_of(2))


def test_token_curves_bad_input():
    model = vitviz.wrap(tiny_timm())
    x = inputs(2)
    with pytest.raises(LayoutError, match=r"expected maps \[2, 4, 4\]"):
        token_curves(model, x, torch.rand(2, 3, 3))
    with pytest.raises(LayoutError, match="32x32"):
        token_curves(model, torch.randn(2, 3, 48, 48), torch.rand(2, 6, 6))
    with pytest.raises(VitvizError, match="steps must be in 1..16"):
        token_curves(model, x, maps_of(2), steps=17)
    with pytest.raises(VitvizError, match="order"):
        token_curves(model, x, maps_of(2), order="middle")
    with pytest.raises(LayoutError, match="outside 0..15"):
        forward_kept_tokens(model, x, torch.full((2, 1), 16))
    with pytest.raises(VitvizError, match="timm VisionTransformer"):
        token_site(torch.nn.Sequential(torch.nn.Linear(2, 2)))


# ---- ROAD ---------------------------------------------------------------------------------------

W = {(-1, -1): 1 / 12, (-1, 0): 1 / 6, (-1, 1): 1 / 12, (0, -1): 1 / 6, (0, 1): 1 / 6,
     (1, -1): 1 / 12, (1, 0): 1 / 6, (1, 1): 1 / 12}


def impute_by_definition(img, rem):
    """Solve x_i = sum_j w_ij x_j / sum_j w_ij (in-image neighbours) for the removed pixels, densely."""
    h, w = img.shape
    unknown = [(i, j) for i in range(h) for j in range(w) if rem[i, j]]
    at = {p: n for n, p in enumerate(unknown)}
    a = np.zeros((len(unknown), len(unknown)))
    b = np.zeros(len(unknown))
    for n, (i, j) in enumerate(unknown):
        for (di, dj), wt in W.items():
            y, x = i + di, j + dj
            if 0 <= y < h and 0 <= x < w:
                a[n, n] += wt
                if rem[y, x]:
                    a[n, at[(y, x)]] -= wt
                else:
                    b[n] += wt * img[y, x]
    out = img.copy()
    for n, v in enumerate(np.linalg.solve(a, b)):
        out[unknown[n]] = v
    return out


def test_road_imputation_hand_built_4x4():
    img = np.arange(16, dtype=np.float64).reshape(4, 4) ** 1.5
    rem = np.zeros((4, 4), bool)
    rem[1, 1] = True  # one interior pixel: the weighted mean of its 8 neighbours
    x = torch.from_numpy(img)[None, None].expand(1, 3, 4, 4).clone()
    got = linear_impute(x, torch.from_numpy(rem)[None], tol=1e-12)
    want = sum(wt * img[1 + di, 1 + dj] for (di, dj), wt in W.items())  # weights sum to 1 inside
    assert got[0, 0, 1, 1].item() == pytest.approx(want, abs=1e-9)
    assert torch.equal(got[0, :, ~torch.from_numpy(rem)], x[0, :, ~torch.from_numpy(rem)])
    # a corner pixel: 3 neighbours, weights 1/6, 1/6, 1/12 renormalised
    rem2 = np.zeros((4, 4), bool)
    rem2[0, 0] = True
    got2 = linear_impute(x, torch.from_numpy(rem2)[None], tol=1e-12)
    want2 = (img[0, 1] / 6 + img[1, 0] / 6 + img[1, 1] / 12) / (5 / 12)
    assert got2[0, 1, 0, 0].item() == pytest.approx(want2, abs=1e-9)
    # a coupled block of removed pixels, against the dense solve of the definition
    rem3 = np.zeros((4, 4), bool)
    rem3[1:3, 1:4] = True
    rem3[0, 0] = True
    got3 = linear_impute(x, torch.from_numpy(rem3)[None], tol=1e-12)
    assert np.allclose(got3[0, 2].numpy(), impute_by_definition(img, rem3), atol=1e-8)


def test_road_imputation_random_masks_larger_images():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 16, 16, generator=g, dtype=torch.float64)
    rem = torch.rand(3, 16, 16, generator=g) < torch.tensor([0.2, 0.6, 0.95])[:, None, None]
    got = linear_impute(x, rem, tol=1e-12)
    for b in range(3):
        for c in range(2):
            want = impute_by_definition(x[b, c].numpy(), rem[b].numpy())
            assert np.allclose(got[b, c].numpy(), want, atol=1e-7)
    assert torch.equal(linear_impute(x, torch.ones(3, 16, 16, dtype=torch.bool)), torch.zeros_like(x))


def test_noisy_imputation_noise_only_on_removed_pixels_and_seeded():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    rem = torch.zeros(2, 8, 8, dtype=torch.bool)
    rem[:, 2:5, 3:6] = True
    a = noisy_linear_impute(x, rem, noise=0.1, generator=torch.Generator().manual_seed(4))
    b = noisy_linear_impute(x, rem, noise=0.1, generator=torch.Generator().manual_seed(4))
    plain = linear_impute(x, rem)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :, ~rem[0]], x[:, :, ~rem[0]])
    d = (a - plain)[:, :, rem[0]]
    assert 0.05 < d.std().item() < 0.2


def test_road_curves_end_points_batched_and_consistency():
    model = tiny_timm()
    x, maps = inputs(3), maps_of(3)
    r = road(model, x, maps, steps=4, noise=0.0)
    with torch.no_grad():
        p = model(x).softmax(-1)
        p_all = model(torch.zeros_like(x)).softmax(-1)  # everything removed: imputed as 0
    idx = torch.arange(3)
    assert torch.allclose(r.morf[:, 0], p[idx, r.target], atol=1e-6)
    assert torch.allclose(r.lerf[:, 0], p[idx, r.target], atol=1e-6)
    assert torch.allclose(r.morf[:, -1], p_all[idx, r.target], atol=1e-5)
    assert r.counts == [0, 4, 8, 12, 16]
    # one step by hand: the top 4 patches removed and imputed
    order = vitviz.evaluate.patch_order(maps)
    rem = torch.zeros(3, 16, dtype=torch.bool)
    rem.scatter_(1, order[:, :4], True)
    rem = rem.reshape(3, 4, 4).repeat_interleave(8, 1).repeat_interleave(8, 2)
    with torch.no_grad():
        want = model(linear_impute(x, rem)).softmax(-1)[idx, r.target]
    assert torch.allclose(r.morf[:, 1], want, atol=1e-4)
    one = road(model, x[1:2], maps[1:2], steps=4, noise=0.0, batch_size=2)
    assert torch.allclose(one.morf, r.morf[1:2], atol=1e-5) and torch.allclose(one.lerf, r.lerf[1:2], atol=1e-5)
    assert torch.allclose(r.gap, r.lerf_auc - r.morf_auc)
    with pytest.raises(LayoutError):
        road(model, x, torch.rand(3, 2, 2))
    with pytest.raises(VitvizError, match="score_fn"):
        road(tiny_timm(num_classes=0), x, maps)
