"""Every attention architecture: each layer on its own token grid, or a clear refusal.

Exactness is checked against probabilities computed without vitviz: timm's non-fused path (the
input of ``attn_drop`` is the post-softmax attention), transformers' eager ``output_attentions``,
the softmax recomputed in the test from the module's own q and k (CaiT's class attention), and,
with fused attention left as the model has it, each attention op's own probabilities
(helpers.AttentionLayerCount: a softmax's output, or softmax(q kᵀ·scale + mask) from the q, k and
mask the model passed to SDPA: SAM, and ten more families in which every op is matched to a
recorded or skipped layer). Window attention is checked against a brute-force scatter of each
window's rows, written here independently of vitviz (an index grid pushed through the library's own
shift, pad and partition), for both orders of shift and pad. Each family of the sweep has its
outcome written down (maps with these grids, or a refusal with this reason).
"""

import copy
import re
from collections import Counter
from dataclasses import dataclass, field

import pytest
import timm
import torch
import transformers
from helpers import AttentionLayerCount, DispatchShapes, SdpaCalls, hook_state, torch_function_modes

import vitviz
from vitviz.analyze import RolloutStream, all_layer_maps
from vitviz.attention import WindowScheme, stitch
from vitviz.attention import _windows as windows_module
from vitviz.attention._windows import WindowedAttentionMaps, WindowedLayer
from vitviz.errors import CaptureError, LayoutError, VitvizError


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():  # forward passes only in this file
        yield


# -- window stitching ------------------------------------------------------------------------

def brute_stitch(windows, grid, window, shift, pad_first):
    """Scatter every window entry by looping: token ids pushed through roll / pad / partition."""
    h, w = grid
    wh, ww = window
    hp, wp = -(-h // wh) * wh, -(-w // ww) * ww
    ids = torch.arange(h * w, dtype=torch.float64).view(1, h, w, 1)
    if pad_first:  # transformers: pad, then roll the padded grid
        x = torch.nn.functional.pad(ids, (0, 0, 0, wp - w, 0, hp - h), value=-1)
        x = torch.roll(x, (-shift[0], -shift[1]), (1, 2))
    else:  # timm: roll, then pad
        x = torch.roll(ids, (-shift[0], -shift[1]), (1, 2))
        x = torch.nn.functional.pad(x, (0, 0, 0, wp - w, 0, hp - h), value=-1)
    x = x.view(1, hp // wh, wh, wp // ww, ww).permute(0, 1, 3, 2, 4).reshape(-1, wh * ww)
    nw = x.shape[0]
    b = windows.shape[0] // nw
    out = torch.zeros(b, windows.shape[1], h * w, h * w, dtype=windows.dtype)
    for s in range(b):
        for k in range(nw):  # window k's rows and columns go to its tokens; padding (-1) is dropped
            real = x[k] >= 0  # [T]
            ids = x[k][real].long()
            out[s][:, ids[:, None], ids[None, :]] = windows[s * nw + k][:, real][:, :, real]
    return out


@pytest.mark.parametrize("grid,window,shift,pad_first", [
    ((4, 4), (2, 2), (0, 0), False), ((5, 7), (2, 3), (1, 1), False), ((5, 7), (2, 3), (1, 1), True),
    ((6, 6), (3, 3), (1, 2), True), ((3, 3), (3, 3), (0, 0), True), ((7, 5), (4, 4), (2, 2), False)])
def test_stitch_equals_brute_force_scatter(grid, window, shift, pad_first):
    scheme = WindowScheme(grid, window, shift, pad_first)
    t = window[0] * window[1]
    windows = torch.rand(2 * scheme.num_windows, 3, t, t, generator=torch.Generator().manual_seed(0))
    assert torch.equal(stitch(windows, scheme), brute_stitch(windows, grid, window, shift, pad_first))


def test_stitch_golden_2x2_windows():
    # a 2x4 grid in two 2x2 windows, no shift: tokens 0,1,4,5 | 2,3,6,7
    windows = torch.arange(32, dtype=torch.float32).view(2, 1, 4, 4)
    out = stitch(windows, WindowScheme((2, 4), (2, 2)))[0, 0]
    assert out[0, 0] == 0 and out[0, 1] == 1 and out[0, 4] == 2 and out[5, 5] == 15
    assert out[2, 2] == 16 and out[7, 7] == 31 and out[0, 2] == 0  # different windows: zero
    assert out.count_nonzero() == 2 * 16 - 1  # every entry of both windows (one of them is 0)


# -- stage layouts ---------------------------------------------------------------------------

@pytest.mark.parametrize("hw,n,prefix,grid", [
    ((64, 64), 50, 1, (7, 7)), ((64, 64), 17, 1, (4, 4)), ((240, 160), 151, 1, (15, 10)),
    ((240, 160), 41, 1, (8, 5)), ((224, 224), 3136, 0, (56, 56)), ((96, 64), 6, 0, (3, 2))])
def test_stage_layout_golden(hw, n, prefix, grid):
    vm = vitviz.VisionModel(torch.nn.Identity(), num_prefix=prefix)
    layout = vm.stage_layout(hw, n)
    assert layout.grid == grid and layout.num_prefix == prefix


def test_stage_layout_refuses_a_subset_of_the_patches():
    # 16 patches of 8 px on a 32 px input; 9 tokens tile 3x3 but are no whole-factor stage of 4x4
    vm = vitviz.VisionModel(torch.nn.Identity(), num_prefix=0, patch_size=8)
    with pytest.raises(LayoutError, match="subset of the patches"):
        vm.stage_layout((32, 32), 9)
    assert vm.stage_layout((32, 32), 4).grid == (2, 2)  # a stage coarser by 2 is fine


# -- timm: reference probabilities from the non-fused path -----------------------------------

def timm_reference(model, x):
    """Each attention module's post-softmax probabilities, from timm's non-fused path."""
    seen, hooks = [], []
    for m in model.modules():
        if hasattr(m, "fused_attn") and hasattr(m, "attn_drop"):
            m.fused_attn = False
            hooks.append(m.attn_drop.register_forward_hook(lambda mod, a, o: seen.append(a[0].clone())))
    try:
        out = model(x)
    finally:
        for h in hooks:
            h.remove()
        for m in model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = True
    return out, seen


def timm_model(name, **kw):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kw).eval()


def test_timm_swin_windows_stitched_exactly():
    model = timm_model("swin_tiny_patch4_window7_224", img_size=56, depths=(2, 2), embed_dim=16,
                       num_heads=(1, 2), window_size=4)
    x = torch.randn(2, 3, 56, 56)
    out_ref, ref = timm_reference(model, x)
    before = hook_state(model)
    with vitviz.capture(model) as rec:
        out = model(x)
    assert hook_state(model) == before and torch_function_modes() == 0
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    stages = rec.stages
    assert [s.layers for s in stages] == [(0, 1), (2, 3)]
    assert [s.layout.grid for s in stages] == [(14, 14), (7, 7)] and all(s.layout.num_prefix == 0 for s in stages)
    blocks = [b for st in model.layers for b in st.blocks]
    grids = [(14, 14), (14, 14), (7, 7), (7, 7)]
    for i, (block, grid) in enumerate(zip(blocks, grids)):
        expect = brute_stitch(ref[i].double(), grid, block.window_size, block.shift_size, pad_first=False)
        got = stages[i // 2].tensor[i % 2]
        torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-6)
    assert blocks[1].shift_size != (0, 0)  # the shifted block is among those checked
    # 14 is not a multiple of 4: windows hold padding, whose share of a row is dropped
    sums = stages[0].tensor.sum(-1)
    assert sums.max() <= 1 + 1e-5 and sums.min() < 0.999
    assert vitviz.rollout(stages[1]).shape == (2, 7, 7)
    assert vitviz.cls_maps(stages[0]).shape == (2, 1, 14, 14)
    with pytest.raises(CaptureError, match="rec.stages"):
        _ = rec.attentions


def _maps_read(stage):
    """Every CLS-row / query map of a stage: each patch's row of every layer, the mean of the patch
    rows at every layer (all_layer_maps) and the one-line repr."""
    gh, gw = stage.layout.grid
    rows = [vitviz.query_maps(stage, (r, c), layer=i) for i in range(stage.num_layers)
            for r in range(gh) for c in range(gw)]
    return torch.stack(rows), all_layer_maps(stage), repr(stage)


def _windowed_families():
    timm_swin = timm_model("swin_tiny_patch4_window7_224", img_size=56, depths=(2, 2), embed_dim=16,
                           num_heads=(1, 2), window_size=4)  # 14x14 and 7x7 grids padded to whole windows
    torch.manual_seed(0)
    hf_swin = transformers.SwinModel(transformers.SwinConfig(
        image_size=40, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=4)).eval()
    maxvit = timm_model("maxvit_tiny_tf_224", img_size=64, depths=(1, 1, 1, 1))  # window and dilated grid
    sam = timm_model("samvit_base_patch16", img_size=64, depth=4, embed_dim=32, num_heads=2,
                     global_attn_indexes=(1, 3), window_size=3)  # window and global layers in one stage
    return [("timm swin", timm_swin, 56), ("transformers swin", hf_swin, 40), ("maxvit", maxvit, 64),
            ("sam", sam, 64)]


@pytest.mark.parametrize("case", range(4), ids=["timm-swin", "transformers-swin", "maxvit", "sam"])
def test_window_layers_are_kept_as_windows_and_read_without_the_dense_matrix(case, monkeypatch):
    """A kept window layer is stored as its windows ([B * nW, H, T, T], a 1/nW of the block-sparse
    [N, N]): capturing, listing the stages, their repr and every CLS-row and query map form no
    [N, N] tensor of a windowed grid; the maps equal those of the dense matrices, and the dense
    tensor, stitched when first read, equals the stitch of the records (which the tests above check
    against brute-force scatters of the model's own probabilities)."""
    name, model, size = _windowed_families()[case]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    stitched = []
    real = windows_module.stitch
    monkeypatch.setattr(windows_module, "stitch",
                        lambda w, scheme, out=None: stitched.append(scheme) or real(w, scheme, out))
    with DispatchShapes() as spy:
        with vitviz.capture(model) as rec:
            model(x)
        stages = rec.stages
        read = [_maps_read(s) for s in stages]
    assert stitched == []  # nothing was stitched
    windowed = [s for s in stages if any(isinstance(p, WindowedLayer) for p in s.parts)]
    assert windowed and all(isinstance(s, WindowedAttentionMaps) for s in windowed)
    if "swin" in name:  # no [.., N, N] tensor of a windowed grid at all (Swin has no conv feature maps to confuse)
        grids = {s.layout.num_tokens for s in windowed}
        assert not [sh for sh in spy.shapes if len(sh) >= 3 and sh[-1] == sh[-2] and sh[-1] in grids]
    for s in windowed:
        for p in s.parts:
            if isinstance(p, WindowedLayer):
                t = p.scheme.window[0] * p.scheme.window[1]
                assert p.windows.shape == (2 * p.scheme.num_windows, s.num_heads, t, t)
    flat = [t for s in stages for t in s.tensor]
    assert len(stitched) == sum(isinstance(p, WindowedLayer) for s in windowed for p in s.parts)  # once each
    assert all(s.tensor is s.tensor for s in stages)  # then kept
    records = [t for _, _, t, _ in rec.passes[-1].records]  # stitched (the form the tests above check)
    assert len(flat) == len(records)
    for got, want in zip(flat, records):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for s, (rows, means, text) in zip(stages, read):
        dense = vitviz.AttentionMaps(s.tensor.clone(), s.layout, layers=s.layers)
        torch.testing.assert_close(rows, _maps_read(dense)[0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(means, all_layer_maps(dense), rtol=1e-5, atol=1e-7)
        assert text.replace(", windows kept", "") == repr(dense), name


def test_window_layers_read_by_a_stream_or_a_gradient_are_stitched_as_they_run():
    """Streams and gradients read the dense matrix during the pass, so such layers are not kept as
    windows; the streamed rollout of a windowed stage equals the rollout of its stored layers."""
    model = timm_model("swin_tiny_patch4_window7_224", img_size=56, depths=(2,), embed_dim=16,
                       num_heads=(1,), window_size=4)
    x = torch.randn(2, 3, 56, 56)
    with vitviz.capture(model) as rec:
        model(x)
    (stage,) = rec.stages
    assert isinstance(stage, WindowedAttentionMaps)
    want = vitviz.rollout(stage)
    with torch.enable_grad(), vitviz.capture(model, grad=True) as rec_g:
        model(x).sum().backward()
    (stage_g,) = rec_g.stages
    assert not isinstance(stage_g, WindowedAttentionMaps) and stage_g.tensor.shape[-1] == 196
    torch.testing.assert_close(stage_g.tensor, stage.tensor, rtol=1e-5, atol=1e-6)
    assert rec_g.attention_grads.tensor.shape == stage.tensor.shape
    with vitviz.capture(model, keep="none", streams={"r": RolloutStream()}) as rec_s:
        model(x)
    assert not rec_s.passes[-1].entries  # nothing kept
    torch.testing.assert_close(rec_s.stream("r"), want, rtol=1e-5, atol=1e-6)


def test_timm_pvt_reduced_keys_exact():
    model = timm_model("pvt_v2_b0", depths=(1, 1, 1, 1))
    x = torch.randn(1, 3, 64, 64)
    _, ref = timm_reference(model, x)
    with vitviz.capture(model) as rec:
        model(x)
    stages = rec.stages
    assert [(s.layout.grid, s.keys.grid) for s in stages] == [((16, 16), (2, 2)), ((8, 8), (2, 2)),
                                                              ((4, 4), (2, 2)), ((2, 2), (2, 2))]
    assert [s.square for s in stages] == [False, False, False, True]
    for s, r in zip(stages, ref):
        torch.testing.assert_close(s.tensor[0], r, rtol=1e-5, atol=1e-6)
    assert vitviz.cls_maps(stages[0]).shape == (1, 1, 2, 2)  # over the key grid
    with pytest.raises(LayoutError, match="reduced"):
        vitviz.rollout(stages[0])


def test_timm_pit_stages_keep_the_class_token():
    model = timm_model("pit_ti_224", img_size=64)
    x = torch.randn(2, 3, 64, 64)
    _, ref = timm_reference(model, x)
    with vitviz.capture(model) as rec:
        model(x)
    stages = rec.stages
    assert [(s.layout.num_prefix, s.layout.grid) for s in stages] == [(1, (7, 7)), (1, (4, 4)), (1, (2, 2))]
    flat = [t for s in stages for t in s.tensor]
    assert len(flat) == len(ref)
    for got, want in zip(flat, ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    one = vitviz.rollout(stages[1])
    assert one.shape == (2, 4, 4)
    # batched equals one by one
    with vitviz.capture(model) as rec1:
        model(x[1:])
    torch.testing.assert_close(vitviz.rollout(rec1.stages[1])[0], one[1], rtol=1e-5, atol=1e-6)


def test_timm_sam_windowed_and_global_layers_exact():
    """SAM (ViTDet): windowed layers (3x3 windows over the 4x4 grid, padded to 6x6) next to global
    layers, its decomposed relative-position bias passed to SDPA as the float mask, fused attention
    as the model has it. Every layer equals softmax(q kᵀ·scale + bias) recomputed here from the q, k
    and mask of the model's own SDPA call (helpers.AttentionLayerCount), each window scattered onto
    the grid by brute force."""
    model = timm_model("samvit_base_patch16", img_size=64, depth=4, embed_dim=32, num_heads=2,
                       global_attn_indexes=(1, 3), window_size=3)
    torch.manual_seed(3)
    for blk in model.blocks:  # SAM starts its relative-position tables at zero: give the bias values
        torch.nn.init.normal_(blk.attn.rel_pos_h)
        torch.nn.init.normal_(blk.attn.rel_pos_w)
    assert all(b.attn.fused_attn for b in model.blocks)  # the fused path, as the model runs it
    assert [b.window_size for b in model.blocks] == [3, 0, 3, 0]  # windowed, global, windowed, global
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with AttentionLayerCount(model, keep=True) as count, SdpaCalls() as sdpa:
        ref_out = model(x)
    assert len(sdpa.calls) == 4 and all(c["attn_mask"] is not None and c["attn_mask"].abs().max() > 0.1
                                        for c in sdpa.calls)  # the bias is in the mask, and not zero
    before = hook_state(model)
    with vitviz.capture(model) as rec:
        out = model(x)
    assert hook_state(model) == before and torch_function_modes() == 0
    assert all(b.attn.fused_attn for b in model.blocks)  # nothing switched
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert rec.complete and rec.skipped == []
    (stage,) = rec.stages  # windowed and global layers, all over the 4x4 grid
    assert stage.layout == vitviz.TokenLayout(0, (4, 4)) and stage.num_layers == 4 and stage.num_heads == 2
    assert [name for name, _ in count.layers] == [f"blocks.{i}.attn" for i in range(4)]
    for i, (block, (ref,)) in enumerate(zip(model.blocks, count.references)):
        ref = ref.reshape(-1, 2, *ref.shape[-2:])  # SAM folds the heads into SDPA's batch: [B*nW, H, T, T]
        if block.window_size:
            assert ref.shape == (2 * 4, 2, 9, 9)  # 2 images x 4 windows
            want = brute_stitch(ref, (4, 4), (3, 3), (0, 0), pad_first=False)
        else:
            want = ref
        torch.testing.assert_close(stage.tensor[i].double(), want, rtol=1e-5, atol=1e-6)
    a = stage.tensor[0, 0, :, 0]  # [H, N]: token (0, 0) sees only its own window's real tokens
    assert a[:, [3, 7, 11, 12, 13, 14, 15]].sum() == 0
    torch.testing.assert_close(a[:, [0, 1, 2, 4, 5, 6, 8, 9, 10]].sum(-1), torch.ones(2))  # no padding there
    r = stage.tensor[0, 0, :, 3]  # token (0, 3): its window holds 6 padding tokens, whose share is dropped
    assert (r[:, [3, 7, 11]].sum(-1) < 0.999).all() and r[:, [0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, 15]].sum() == 0
    torch.testing.assert_close(stage.tensor[1].sum(-1), torch.ones(2, 2, 16))  # a global layer


# -- transformers: eager output_attentions ---------------------------------------------------

def test_attention_pool_head_is_read_as_pool():
    model = timm_model("vit_base_patch16_siglip_224", img_size=32, depth=1, embed_dim=32, num_heads=2)
    x = torch.randn(2, 3, 32, 32)
    seen = []
    hook = model.attn_pool.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with vitviz.capture(model) as rec:
        model(x)
    hook.remove()
    pool = rec.pool  # the latent query of the MAP head over the 2x2 patches (no CLS)
    assert tuple(pool.tensor.shape) == (1, 2, 2, 1, 4) and pool.layout == vitviz.TokenLayout(0, (2, 2))
    # by hand from the head's weights: softmax(q kᵀ / sqrt(d)) of the latent over the tokens
    ap, tokens = model.attn_pool, seen[0]
    b, n, c = tokens.shape
    heads, d = ap.num_heads, c // ap.num_heads
    q = ap.q_norm(ap.q(ap.latent.expand(b, -1, -1)).reshape(b, -1, heads, d).transpose(1, 2))
    k = ap.k_norm(ap.kv(tokens).reshape(b, n, 2, heads, d).permute(2, 0, 3, 1, 4)[0])
    expect = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, dim=-1)
    torch.testing.assert_close(pool.tensor[0], expect, rtol=1e-5, atol=1e-6)
    assert rec.attentions.num_layers == 1  # the block's self-attention stays the image attention


def test_timm_maxvit_block_and_grid_attention_on_the_grid():
    from timm.models.maxxvit import grid_partition, window_partition

    model = timm_model("maxvit_tiny_tf_224", img_size=64, depths=(1, 1, 1, 1))
    x = torch.randn(1, 3, 64, 64)
    _, ref = timm_reference(model, x)
    with vitviz.capture(model) as rec:
        model(x)
    flat = [(s, i) for s in rec.stages for i in range(s.num_layers)]
    blocks = [m for m in model.modules() if type(m).__name__ == "PartitionAttentionCl"]
    assert len(flat) == len(ref) == len(blocks) == 8
    kinds = set()
    for (stage, i), r, block in zip(flat, ref, blocks):
        gh, gw = stage.layout.grid
        # the library's own partition of an index grid: which token each window row is
        ids = torch.arange(gh * gw, dtype=torch.float64).view(1, gh, gw, 1)
        part = window_partition if block.partition_block else grid_partition
        index = part(ids, block.partition_size).reshape(r.shape[0], -1).long()  # [nW, T]
        expect = torch.zeros(1, r.shape[1], gh * gw, gh * gw, dtype=torch.float64)
        for k in range(r.shape[0]):
            expect[0][:, index[k][:, None], index[k][None, :]] = r[k].double()
        torch.testing.assert_close(stage.tensor[i].double(), expect, rtol=1e-5, atol=1e-6)
        kinds.add(block.partition_block)
    assert kinds == {True, False}  # both block and grid attention were checked


def test_timm_mobilevit_unfolded_sequences_on_the_grid():
    model = timm_model("mobilevit_xxs")
    x = torch.randn(1, 3, 64, 64)
    _, ref = timm_reference(model, x)
    with vitviz.capture(model) as rec:
        model(x)
    flat = [(s, i) for s in rec.stages for i in range(s.num_layers)]
    assert len(flat) == len(ref) == 9
    for (stage, i), r in zip(flat, ref):
        gh, gw = stage.layout.grid
        # MobileViT's own unfold ([B, C, H, W] -> [B * P, N, C]) applied to an index grid
        ph, pw = 2, 2
        ids = torch.arange(gh * gw, dtype=torch.float64).view(1, 1, gh, gw)
        u = ids.reshape(gh // ph, ph, gw // pw, pw).transpose(1, 2)
        index = u.reshape(1, 1, (gh // ph) * (gw // pw), ph * pw).transpose(1, 3).reshape(ph * pw, -1).long()
        expect = torch.zeros(1, r.shape[1], gh * gw, gh * gw, dtype=torch.float64)
        for k in range(r.shape[0]):
            expect[0][:, index[k][:, None], index[k][None, :]] = r[k].double()
        torch.testing.assert_close(stage.tensor[i].double(), expect, rtol=1e-5, atol=1e-6)


def test_transformers_swin_windows_equal_eager_attentions():
    torch.manual_seed(0)
    cfg = transformers.SwinConfig(image_size=40, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[1, 2],
                                  window_size=4)
    model = transformers.SwinModel(cfg).eval()
    x = torch.randn(2, 3, 40, 40)
    layers = [b for st in model.encoder.layers for b in st.blocks]
    # eager weights of every block (output_attentions returns only each stage's last block)
    model.set_attn_implementation("eager")
    eager = []
    hooks = [b.attention.register_forward_hook(lambda m, a, o: eager.append(o[1])) for b in layers]
    stage_last = model(x, output_attentions=True).attentions
    for h in hooks:
        h.remove()
    assert torch.equal(stage_last[0], eager[1]) and torch.equal(stage_last[1], eager[3])
    model.set_attn_implementation("sdpa")
    with vitviz.capture(model) as rec:
        model(x)
    stages = rec.stages
    assert [s.layout.grid for s in stages] == [(10, 10), (5, 5)]
    grids = [(10, 10), (10, 10), (5, 5), (5, 5)]
    for i, (layer, grid) in enumerate(zip(layers, grids)):
        window, shift = layer.window_size, layer.shift_size
        expect = brute_stitch(eager[i].double(), grid, (window, window), (shift, shift), pad_first=True)
        torch.testing.assert_close(stages[i // 2].tensor[i % 2].double(), expect, rtol=1e-5, atol=1e-6)
    assert layers[1].shift_size > 0


def test_transformers_swinv2_windows_equal_eager_attentions():
    """transformers' Swinv2 (scaled cosine attention, continuous relative-position bias; eager is
    its only implementation): every block's stitched windows equal the block's own eager attention
    probabilities (output_attentions), scattered by brute force (pad, then shift)."""
    torch.manual_seed(0)
    cfg = transformers.Swinv2Config(image_size=40, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[1, 2],
                                    window_size=4)
    model = transformers.Swinv2Model(cfg).eval()
    impl = model.config._attn_implementation
    x = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    layers = [b for st in model.encoder.layers for b in st.blocks]
    ref = copy.deepcopy(model)  # transformers' own probabilities, from a copy (its hooks stay there)
    eager = []
    ref_layers = [b for st in ref.encoder.layers for b in st.blocks]
    hooks = [b.attention.register_forward_hook(lambda m, a, o: eager.append(o[1])) for b in ref_layers]
    ref_out = ref(x, output_attentions=True)
    for h in hooks:
        h.remove()
    assert len(eager) == 4 and torch.equal(ref_out.attentions[0], eager[1])
    before = hook_state(model)
    with vitviz.capture(model) as rec:
        out = model(x)
    assert hook_state(model) == before and model.config._attn_implementation == impl
    torch.testing.assert_close(out.last_hidden_state, ref_out.last_hidden_state, rtol=1e-5, atol=1e-6)
    assert rec.complete and rec.skipped == []
    stages = rec.stages
    assert [(s.layout.grid, s.layers, s.num_heads) for s in stages] == [((10, 10), (0, 1), 1), ((5, 5), (2, 3), 2)]
    grids = [(10, 10), (10, 10), (5, 5), (5, 5)]
    for i, (layer, grid) in enumerate(zip(layers, grids)):
        window, shift = layer.window_size, layer.shift_size
        expect = brute_stitch(eager[i].double(), grid, (window, window), (shift, shift), pad_first=True)
        torch.testing.assert_close(stages[i // 2].tensor[i % 2].double(), expect, rtol=1e-5, atol=1e-6)
    assert [b.shift_size for b in layers] == [0, 2, 0, 2]  # shifted blocks, and padded grids (10, 5), checked


# transformers models whose keys are reduced to a coarser grid: (build, stages). Weights 10x
# transformers' default init: with std 0.02 the attention is uniform to 1e-2
HIERARCHICAL = {
    "pvt-v1": (lambda: transformers.PvtModel(transformers.PvtConfig(
        image_size=64, num_encoder_blocks=4, depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 48, 64],
        num_attention_heads=[1, 2, 2, 4], sequence_reduction_ratios=[8, 4, 2, 1], patch_sizes=[4, 2, 2, 2],
        strides=[4, 2, 2, 2], mlp_ratios=[2, 2, 2, 2], initializer_range=0.2)),
        # the class token joins in the last stage
        [((16, 16), 0, (2, 2), 1), ((8, 8), 0, (2, 2), 2), ((4, 4), 0, (2, 2), 2), ((2, 2), 1, None, 4)]),
    "segformer": (lambda: transformers.SegformerModel(transformers.SegformerConfig(
        num_encoder_blocks=4, depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 48, 64], num_attention_heads=[1, 2, 2, 4],
        sr_ratios=[8, 4, 2, 1], decoder_hidden_size=32, initializer_range=0.2)),
        [((16, 16), 0, (2, 2), 1), ((8, 8), 0, (2, 2), 2), ((4, 4), 0, (2, 2), 2), ((2, 2), 0, None, 4)]),
}


@pytest.mark.parametrize("case", list(HIERARCHICAL))
def test_transformers_reduced_keys_equal_eager_attentions(case):
    """PVT v1 and Segformer (keys sequence-reduced to 2x2): each stage's layer equals transformers'
    eager output_attentions of a copy with the same weights (the model itself stays on its own
    implementation: SDPA for Segformer, eager for PVT v1)."""
    build, expect = HIERARCHICAL[case]
    torch.manual_seed(0)
    model = build().eval()
    impl = model.config._attn_implementation
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    ref_out = ref(x, output_attentions=True)
    before = hook_state(model)
    with vitviz.capture(model) as rec:
        out = model(x)
    assert hook_state(model) == before and model.config._attn_implementation == impl
    torch.testing.assert_close(out.last_hidden_state, ref_out.last_hidden_state, rtol=1e-5, atol=1e-5)
    assert rec.complete and rec.skipped == []
    stages = rec.stages
    assert [(s.layout.grid, s.layout.num_prefix, None if s.square else s.keys.grid, s.num_heads)
            for s in stages] == expect
    assert len(ref_out.attentions) == len(stages) == 4
    for s, want in zip(stages, ref_out.attentions):
        assert s.num_layers == 1 and (want - 1 / want.shape[-1]).abs().max() > 0.1  # far from uniform
        torch.testing.assert_close(s.tensor[0], want, rtol=1e-5, atol=1e-6)


# -- refusals and the promise: maps or a VitvizError -----------------------------------------

REFUSED = [
    ("xcit_nano_12_p16_224", dict(img_size=32), "cross-covariance"),
    ("cait_xxs24_224", dict(img_size=32, depth=1), "talking-heads"),
    ("hiera_tiny_224", dict(img_size=64), "mask units"),
    ("efficientvit_b0", dict(), "linear attention"),
    ("coat_lite_tiny", dict(img_size=64), "factorised"),
    ("edgenext_xx_small", dict(), "cross-covariance"),
    ("mobilevitv2_050", dict(), "separable self-attention"),
]


@pytest.mark.parametrize("name,kw,reason", REFUSED, ids=[r[0] for r in REFUSED])
def test_attention_not_over_tokens_is_refused_with_the_reason(name, kw, reason):
    model = timm_model(name, **kw)
    size = kw.get("img_size", 64)
    x = torch.randn(1, 3, size, size)
    before = hook_state(model)
    with pytest.raises(CaptureError, match=reason):
        with vitviz.capture(model) as rec:
            model(x)
        _ = rec.attentions
    assert hook_state(model) == before and torch_function_modes() == 0


def test_sequences_vitviz_cannot_place_are_refused():
    torch.manual_seed(0)
    model = transformers.MobileViTModel(transformers.MobileViTConfig(image_size=64)).eval()
    before = hook_state(model)
    with vitviz.capture(model) as rec:
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(CaptureError, match="windows or groups of tokens per image"):
        _ = rec.attentions
    with pytest.raises(CaptureError, match="could not be placed"):
        _ = rec.stages
    assert hook_state(model) == before


def test_cait_class_attention_exact_as_pool():
    """CaiT's class attention (the CLS query over CLS + patches, fused attention as the model has
    it) is rec.pool, each layer equal to softmax(q kᵀ·scale) recomputed here from the module's own
    q and k projections at its input; its talking-heads self-attention is skipped with the reason."""
    model = timm_model("cait_xxs24_224", img_size=32, depth=1)
    class_attn = [blk.attn for blk in model.blocks_token_only]
    assert len(class_attn) == 2 and all(a.fused_attn for a in class_attn)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    seen = {}
    hooks = [a.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0]))
             for i, a in enumerate(class_attn)]
    try:
        with vitviz.capture(model) as rec:
            model(x)
    finally:
        for h in hooks:
            h.remove()
    assert all(a.fused_attn for a in class_attn)  # nothing switched
    pool = rec.pool  # two class-attention layers: the CLS query over CLS + 2x2 patches
    assert tuple(pool.tensor.shape) == (2, 2, 4, 1, 5) and pool.layout == vitviz.TokenLayout(1, (2, 2))
    for i, m in enumerate(class_attn):
        t = seen[i].double()  # [B, N, C]: CLS, then the patches
        b, n, c = t.shape
        heads, d = m.num_heads, c // m.num_heads
        q = torch.nn.functional.linear(t[:, 0], m.q.weight.double(), None if m.q.bias is None else m.q.bias.double())
        k = torch.nn.functional.linear(t, m.k.weight.double(), None if m.k.bias is None else m.k.bias.double())
        q = q.reshape(b, heads, 1, d)  # [B, H, 1, d]
        k = k.reshape(b, n, heads, d).transpose(1, 2)  # [B, H, N, d]
        want = ((q @ k.transpose(-2, -1)) * d ** -0.5).softmax(-1)  # [B, H, 1, N]
        assert want.std() > 1e-3  # not uniform: the comparison can fail
        torch.testing.assert_close(pool.tensor[i].double(), want, rtol=1e-5, atol=1e-6)
    assert [(name, what) for name, what, _ in rec.skipped] == [("blocks.0.attn", "talking-heads attention")]
    assert all(why for _, _, why in rec.skipped) and rec.complete


SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def test_mae_visible_patches_placed_on_the_full_grid():
    torch.manual_seed(0)
    mae = transformers.ViTMAEModel(transformers.ViTMAEConfig(image_size=32, patch_size=8, mask_ratio=0.5,
                                                             **SMALL)).eval()
    x = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(3))
    mae.set_attn_implementation("eager")
    eager = mae(x, noise=noise, output_attentions=True)
    mae.set_attn_implementation("sdpa")
    with vitviz.capture(mae) as rec:
        mae(x, noise=noise)
    a = rec.attentions
    assert a.layout == vitviz.TokenLayout(1, (4, 4)) and tuple(a.tensor.shape) == (2, 2, 2, 17, 17)
    # by hand: sequence token i > 0 is patch ids_keep[i - 1], ids_keep = argsort(ids_restore)[:, :8]
    keep = eager.ids_restore.argsort(1)[:, :8]
    masked = eager.mask.bool()  # [B, 16], True = masked
    for b in range(2):
        tokens = [0] + [1 + int(i) for i in keep[b]]
        for layer in range(2):
            torch.testing.assert_close(a.tensor[layer, b][:, tokens][:, :, tokens], eager.attentions[layer][b],
                                       rtol=1e-5, atol=1e-6)
        gone = [1 + i for i in range(16) if masked[b, i]]
        assert a.tensor[:, b][..., gone, :].abs().sum() == 0 and a.tensor[:, b][..., gone].abs().sum() == 0
    maps = vitviz.rollout(a)  # masked patches blank
    assert (maps.flatten(1)[masked] == 0).all() and (maps.flatten(1)[~masked] > 0).all()


def test_yolos_detection_tokens_after_the_patches():
    torch.manual_seed(0)
    yolos = transformers.YolosModel(transformers.YolosConfig(image_size=[32, 32], patch_size=8,
                                                             num_detection_tokens=5, **SMALL)).eval()
    x = torch.randn(1, 3, 32, 48)  # non-square: a 4x6 grid
    yolos.set_attn_implementation("eager")
    eager = yolos(x, output_attentions=True).attentions
    yolos.set_attn_implementation("sdpa")
    with vitviz.capture(yolos) as rec:
        yolos(x)
    a = rec.attentions
    assert a.layout == vitviz.TokenLayout(1, (4, 6), num_suffix=5) and a.layout.num_tokens == 30
    torch.testing.assert_close(a.tensor, torch.stack(eager), rtol=1e-5, atol=1e-6)
    # a query map per detection token: its row over the patches (prefix and suffix keys dropped)
    det = a.layout.patches.stop + 2
    m = vitviz.query_maps(a, det)
    torch.testing.assert_close(m[0, :, 1, 2], a.tensor[-1, 0, :, det, 1 + 1 * 6 + 2])
    assert vitviz.rollout(a).shape == (1, 4, 6)


# -- every family: its written-down outcome ------------------------------------------------------

@dataclass
class Outcome:
    """What one small model of a family gives, written down: a change fails the sweep.

    ``layers``: the attention layers its forward pass runs (counted by helpers.AttentionLayerCount);
    ``stages``: ``(layers, query grid, prefix tokens, key grid or None, heads)`` per stage, in order;
    ``refused``: instead, a regex of the VitvizError raised by the capture or by ``rec.stages``;
    ``pool``: ``(layers, heads)`` of ``rec.pool``; ``skipped``: ``{what: layers}`` of ``rec.skipped``.
    """

    layers: int
    stages: list = field(default_factory=list)
    refused: str | None = None
    pool: tuple | None = None
    skipped: dict = field(default_factory=dict)


SWIN2 = dict(img_size=64, depths=(2, 2), embed_dim=16, num_heads=(1, 2), window_size=4)

SWEEP = [  # (timm name, kwargs, input size, outcome)
    ("vit_tiny_patch16_224", dict(img_size=32, depth=1), 32, Outcome(1, [(1, (2, 2), 1, None, 3)])),
    ("swinv2_tiny_window8_256", SWIN2, 64, Outcome(4, [(2, (16, 16), 0, None, 1), (2, (8, 8), 0, None, 2)])),
    # every image layer unplaced: branch 0's 1 + 10x10 tokens are read as 101 tokens without a prefix
    # (its class tokens sit in a ParameterList), branch 1 runs on the image resized to 112 px
    ("crossvit_tiny_240", dict(img_size=120), 120,
     Outcome(21, refused="could not be placed on the image grid",
             skipped={"image attention": 15, "pooling attention": 6})),
    ("twins_pcpvt_small", dict(img_size=64), 64,
     Outcome(16, [(3, (16, 16), 0, (2, 2), 1), (4, (8, 8), 0, (2, 2), 2), (6, (4, 4), 0, (2, 2), 5),
                  (3, (2, 2), 0, None, 8)])),
    ("levit_128s", dict(img_size=64), 64,
     Outcome(11, [(2, (4, 4), 0, None, 4), (1, (2, 2), 0, (4, 4), 8), (3, (2, 2), 0, None, 6),
                  (1, (1, 1), 0, (2, 2), 16), (4, (1, 1), 0, None, 8)])),
    ("tnt_s_patch16_224", dict(img_size=32), 32,
     Outcome(24, [(12, (2, 2), 1, None, 6)], skipped={"inner attention": 12})),
    ("efficientformer_l1", dict(), 224, Outcome(1, [(1, (7, 7), 0, None, 8)])),
    ("tiny_vit_5m_224", dict(), 224,
     Outcome(10, [(2, (28, 28), 0, None, 4), (6, (14, 14), 0, None, 5), (2, (7, 7), 0, None, 10)])),
    ("davit_tiny", dict(), 64,
     Outcome(12, [(1, (16, 16), 0, None, 3), (1, (8, 8), 0, None, 6), (3, (4, 4), 0, None, 12),
                  (1, (2, 2), 0, None, 24)], skipped={"channel attention": 6})),
    ("mvitv2_tiny", dict(img_size=64), 64,
     Outcome(10, [(1, (16, 16), 0, (4, 4), 1), (1, (8, 8), 0, None, 2), (1, (8, 8), 0, (4, 4), 2),
                  (1, (4, 4), 0, (8, 8), 4), (4, (4, 4), 0, None, 4), (1, (2, 2), 0, (4, 4), 8),
                  (1, (2, 2), 0, None, 8)])),
    ("volo_d1_224", dict(img_size=64), 64,
     Outcome(20, [(14, (4, 4), 0, None, 12)], pool=(2, 12), skipped={"outlook attention": 4})),
    ("nextvit_small", dict(), 64,
     Outcome(4, [(1, (8, 8), 0, (2, 2), 6), (2, (4, 4), 0, (2, 2), 12), (1, (2, 2), 0, None, 24)])),
    # the T8 variant has no attention stage at all (the SA variants do): an empty capture is an error
    ("fastvit_t8", dict(), 64, Outcome(0, refused="no attention call was seen")),
]


def stage_summary(stages):
    return [(s.num_layers, s.layout.grid, s.layout.num_prefix, None if s.square else s.keys.grid, s.num_heads)
            for s in stages]


@pytest.mark.parametrize("name,kw,size,expect", SWEEP, ids=[s[0] for s in SWEEP])
def test_every_family_gives_its_written_down_outcome(name, kw, size, expect):
    """Maps with these layer counts and grids, or a refusal with this reason: a family that falls
    from maps to a refusal (or the reverse), or whose grids, pool or skipped layers change, fails."""
    model = timm_model(name, **kw)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    with AttentionLayerCount(model) as count:
        ref = model(x)
    assert len(count.layers) == expect.layers, count.layers
    before = hook_state(model)
    rec = error = None
    try:
        with vitviz.capture(model) as rec:
            out = model(x)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        stages = rec.stages
    except VitvizError as e:
        error = e
    assert hook_state(model) == before and torch_function_modes() == 0
    if expect.refused is not None:
        assert error is not None, f"{name} gave maps where the refusal {expect.refused!r} is written down"
        assert re.search(expect.refused, str(error)) and "Traceback" not in str(error), str(error)
        captured = 0
    else:
        assert error is None, f"{name} fell from maps to a refusal: {error}"
        assert stage_summary(stages) == expect.stages
        for s in stages:  # every stage gives per-layer maps on its grid, rows of probabilities
            maps = vitviz.cls_maps(s)
            assert maps.shape[-2:] == s.keys.grid and torch.isfinite(maps).all()
            assert s.tensor.sum(-1).max() <= 1 + 1e-4
        captured = sum(s.num_layers for s in stages)
    if expect.layers == 0:  # nothing ran: the capture itself refused
        return
    pool = rec.pool
    assert (None if pool is None else (pool.num_layers, pool.tensor.shape[2])) == expect.pool
    assert Counter(what for _, what, _ in rec.skipped) == Counter(expect.skipped)
    assert all(why for _, _, why in rec.skipped)
    # every attention layer read or skipped with its reason
    assert rec.complete and rec.unaccounted == []
    assert captured + (0 if pool is None else pool.num_layers) + len(rec.skipped) == expect.layers


# -- ten more families: every attention op against its own probabilities ----------------------

def block_grid(nhwc: bool):
    """The token grid of a window block from its input: ``[B, H, W, C]`` or ``[B, C, H, W]``."""
    return (lambda t: tuple(t.shape[1:3])) if nhwc else (lambda t: tuple(t.shape[2:4]))


EXPLICIT = [  # (name, kwargs, size, window blocks' input layout: None, "nhwc" or "nchw")
    ("levit_128s", dict(img_size=64), 64, None),
    ("tnt_s_patch16_224", dict(img_size=32), 32, None),
    ("efficientformer_l1", dict(), 224, None),
    ("mvitv2_tiny", dict(img_size=64), 64, None),
    ("twins_pcpvt_small", dict(img_size=64), 64, None),
    ("volo_d1_224", dict(img_size=64), 64, None),
    ("nextvit_small", dict(), 64, None),
    ("tiny_vit_5m_224", dict(), 224, "nhwc"),
    ("davit_tiny", dict(), 64, "nchw"),
    ("swinv2_tiny_window8_256", SWIN2, 64, "nhwc"),
]
OUTCOMES = {name: expect for name, _, _, expect in SWEEP}


def pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[-1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


@pytest.mark.parametrize("name,kw,size,windows", EXPLICIT, ids=[e[0] for e in EXPLICIT])
def test_every_attention_op_equals_its_own_probabilities(name, kw, size, windows):
    """Fused attention left as the model has it. Every attention layer the forward pass runs
    (helpers.AttentionLayerCount: each SDPA call and each softmax over the last dimension, in the
    module call running it) is, in order, either a recorded layer of that module equal to the
    probabilities of that op (a softmax's own output, or softmax(q kᵀ·scale + mask) recomputed from
    SDPA's own arguments), window layers after a brute-force scatter with the block's own window,
    shift and grid (its input), or in rec.skipped with its reason; and the count is the written-down
    one."""
    model = timm_model(name, **kw)
    fused = {n: m.fused_attn for n, m in model.named_modules() if hasattr(m, "fused_attn")}
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    grids: dict[str, list] = {}  # window block name -> the grid of each of its calls
    hooks = []
    if windows:
        read = block_grid(windows == "nhwc")
        for n, m in model.named_modules():
            if getattr(m, "window_size", None) and hasattr(m, "attn"):
                hooks.append(m.register_forward_pre_hook(
                    lambda mod, args, n=n: grids.setdefault(n, []).append(read(args[0]))))
    try:
        with AttentionLayerCount(model, keep=True) as count:
            ref_out = model(x)
    finally:
        for h in hooks:
            h.remove()
    with vitviz.capture(model) as rec:
        out = model(x)
    assert {n: m.fused_attn for n, m in model.named_modules() if hasattr(m, "fused_attn")} == fused
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    expect = OUTCOMES[name]
    assert len(count.layers) == expect.layers  # the count, written down
    assert Counter(what for _, what, _ in rec.skipped) == Counter(expect.skipped)
    assert all(why for _, _, why in rec.skipped) and rec.complete and rec.unaccounted == []

    p = rec.passes[-1]
    records = iter(p.records)
    skipped = Counter(n for n, _, _ in rec.skipped)
    calls = Counter()
    matched = 0
    for (module, _), refs in zip(count.layers, count.references):
        call = calls[module]
        calls[module] += 1
        if skipped[module]:  # left out, with its reason
            skipped[module] -= 1
            continue
        _, site, got, _ = next(records)  # the next recorded layer is this module's call
        assert site.name == module, (site.name, module)
        (ref,) = refs
        parent = module.rsplit(".", 1)[0]
        if windows and parent in grids:
            block = model.get_submodule(parent)
            window, shift = pair(block.window_size), pair(getattr(block, "shift_size", 0))
            want = brute_stitch(ref, grids[parent][call], window, shift, pad_first=False)
        else:
            want = ref
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
        matched += 1
    assert next(records, None) is None and not +skipped  # every record and every skipped layer matched
    assert matched + len(rec.skipped) == len(count.layers)
    if windows:  # window layers were among those compared
        assert sum(len(v) for v in grids.values()) > 0
