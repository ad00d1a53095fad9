"""timm capture: equal to a from-weights recomputation whichever path the model runs (fused SDPA or
eager), no flag switched, nothing left behind, layouts from the model."""

import pytest
import timm
import torch
from helpers import AttentionLayerCount, SdpaCalls, hook_state, torch_function_modes

import vitviz
from vitviz.errors import CaptureError


def tiny(name, **kw):
    torch.manual_seed(0)
    args = dict(pretrained=False, depth=2, num_heads=2, embed_dim=32, num_classes=5)
    args.update(kw)
    return timm.create_model(name, **args).eval()


def recompute(model, x):
    """softmax(q k^T * scale) from each block's weights at that block's real input: [L, B, H, N, N]."""
    inputs = []
    handles = [blk.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for blk in model.blocks]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    out = []
    for blk, h in zip(model.blocks, inputs):
        attn = blk.attn
        B, N, C = h.shape
        qkv = attn.qkv(blk.norm1(h)).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        out.append(torch.softmax((q @ k.transpose(-2, -1)) * attn.scale, dim=-1))
    return torch.stack(out)


CASES = [
    # name, overrides, expected num_prefix, input hw, expected grid
    ("vit_tiny_patch16_224", dict(img_size=64), 1, (64, 64), (4, 4)),
    ("deit_tiny_distilled_patch16_224", dict(img_size=64), 2, (64, 64), (4, 4)),
    ("vit_small_patch14_reg4_dinov2", dict(img_size=56), 5, (56, 56), (4, 4)),
    ("vit_tiny_patch16_224", dict(img_size=(48, 80)), 1, (48, 80), (3, 5)),
    ("vit_tiny_patch16_224", dict(img_size=64, dynamic_img_size=True), 1, (48, 96), (3, 6)),
    ("vit_tiny_patch16_224", dict(img_size=64, class_token=False, global_pool="avg"), 0, (64, 64), (4, 4)),
    # FlexiViT: its position embedding holds only the patch positions (no_embed_class)
    ("flexivit_small", dict(img_size=48), 1, (48, 48), (3, 3)),
]


@pytest.mark.parametrize("name,kw,prefix,hw,grid", CASES)
def test_capture_equals_recomputation_and_output_unchanged(name, kw, prefix, hw, grid):
    model = tiny(name, **kw)
    assert all(b.attn.fused_attn for b in model.blocks)  # the fused path is what normally runs
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        ref_out = model(x)
    before = hook_state(model)
    modes = {}
    with vitviz.capture(model) as rec:
        assert all(b.attn.fused_attn for b in model.blocks)  # nothing switched: SDPA is read at the op
        # the capture's mode sees the whole forward pass (not only the modules the adapters know),
        # so that no attention op can go unseen (rec.complete)
        spies = [model.blocks[0].attn.register_forward_pre_hook(
                     lambda *_: modes.__setitem__("attn", torch_function_modes())),
                 model.blocks[0].mlp.register_forward_pre_hook(
                     lambda *_: modes.__setitem__("mlp", torch_function_modes()))]
        with torch.no_grad():
            out = model(x)
        for h in spies:
            h.remove()
    assert modes == {"attn": 1, "mlp": 1}
    assert torch_function_modes() == 0
    assert rec.complete and rec.skipped == [] and rec.unaccounted == []
    assert hook_state(model) == before
    assert torch.allclose(out, ref_out, atol=1e-5)
    maps = rec.attentions
    assert maps.layout.num_prefix == prefix and maps.layout.grid == grid
    assert maps.layout.has_cls == (prefix > 0)
    n = prefix + grid[0] * grid[1]
    assert maps.tensor.shape == (2, 2, 2, n, n)
    assert maps.tensor.dtype == torch.float32
    assert torch.allclose(maps.tensor.sum(-1), torch.ones(2, 2, 2, n), atol=1e-5)
    assert torch.allclose(maps.tensor, recompute(model, x), atol=1e-6)
    assert vitviz.rollout(maps).shape == (2, *grid)
    assert rec.cross is None
    # the model's own eager path (softmax, then @ v) gives the same maps
    for b in model.blocks:
        b.attn.fused_attn = False
    with vitviz.capture(model) as eager, torch.no_grad():
        assert torch.allclose(model(x), ref_out, atol=1e-5)
    assert torch.allclose(eager.attentions.tensor, maps.tensor, atol=1e-6)


@pytest.mark.parametrize("name", ["eva02_tiny_patch14_224", "beit_base_patch16_224"])
def test_eva_and_beit_equal_the_probabilities_of_their_sdpa_calls(name):
    """EVA02 (RoPE on q and k) and BEiT (relative-position bias as SDPA's float mask), fused
    attention left on: every layer equals softmax(q kᵀ·scale + mask) recomputed in the test from
    the q, k and mask the model passed to SDPA (helpers.AttentionLayerCount, float64)."""
    model = tiny(name, img_size=56 if "patch14" in name else 64)
    if name.startswith("beit"):  # the tables start near zero: a bias that matters
        torch.manual_seed(3)
        for b in model.blocks:
            torch.nn.init.normal_(b.attn.relative_position_bias_table)
    assert all(b.attn.fused_attn for b in model.blocks)
    x = torch.randn(2, 3, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(1))
    ropes = []
    hooks = [b.attn.register_forward_pre_hook(lambda m, a, kw: ropes.append(kw.get("rope")), with_kwargs=True)
             for b in model.blocks]
    try:
        with torch.no_grad(), AttentionLayerCount(model, keep=True) as count, SdpaCalls() as sdpa:
            ref = model(x)
    finally:
        for h in hooks:
            h.remove()
    assert len(sdpa.calls) == len(count.layers) == 2
    if name.startswith("eva"):  # the position information is RoPE applied to q and k
        assert all(r is not None for r in ropes) and all(c["attn_mask"] is None for c in sdpa.calls)
    else:  # the relative-position bias is the mask
        assert all(c["attn_mask"] is not None and c["attn_mask"].abs().max() > 0.1 for c in sdpa.calls)
    with vitviz.capture(model) as rec, torch.no_grad():
        out = model(x)
    assert all(b.attn.fused_attn for b in model.blocks)  # nothing switched
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert rec.complete and rec.skipped == []
    t = rec.attentions.tensor
    assert t.shape[:3] == (2, 2, 2)
    assert rec.attentions.layout == vitviz.TokenLayout(1, tuple(model.patch_embed.grid_size))
    assert [name for name, _ in count.layers] == ["blocks.0.attn", "blocks.1.attn"]
    for layer, (want,) in enumerate(count.references):  # [B, H, N, N] float64
        torch.testing.assert_close(t[layer].double(), want, rtol=1e-5, atol=1e-6)


def test_batched_equals_one_by_one():
    model = tiny("deit_tiny_distilled_patch16_224", img_size=64)
    x = torch.randn(3, 3, 64, 64)
    with vitviz.capture(model) as rec, torch.no_grad():
        model(x)
    batched = rec.attentions.tensor
    for i in range(3):
        with vitviz.capture(model) as rec1, torch.no_grad():
            model(x[i:i + 1])
        assert torch.allclose(rec1.attentions.tensor[:, 0], batched[:, i], atol=1e-6)


def test_hooks_and_mode_removed_and_flags_untouched_after_exception():
    model = tiny("vit_tiny_patch16_224", img_size=64)
    model.blocks[1].attn.fused_attn = False  # a per-instance setting that must survive as it was
    before = hook_state(model)
    with pytest.raises(RuntimeError, match="boom"):
        with vitviz.capture(model):
            model(torch.randn(1, 3, 64, 64))
            raise RuntimeError("boom")
    assert hook_state(model) == before and torch_function_modes() == 0
    assert [b.attn.fused_attn for b in model.blocks] == [True, False]


def test_gradients_flow_and_training_mode_is_kept():
    model = tiny("vit_tiny_patch16_224", img_size=64)
    vm = vitviz.wrap(model)
    x = torch.randn(1, 3, 64, 64)
    with vitviz.capture(vm) as rec:
        vm(x).sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None
    assert not rec.attentions.tensor.requires_grad


def test_last_pass_is_reported():
    model = tiny("vit_tiny_patch16_224", img_size=64, dynamic_img_size=True)
    with vitviz.capture(model) as rec, torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
        model(torch.randn(2, 3, 32, 48))
    assert len(rec.passes) == 2
    assert rec.attentions.tensor.shape[1] == 2
    assert rec.attentions.layout.grid == (2, 3)


def test_empty_capture_is_an_error():
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    with pytest.raises(CaptureError, match="no attention call was seen"):
        with vitviz.capture(cnn), torch.no_grad():
            cnn(torch.randn(1, 3, 8, 8))
    with vitviz.capture(cnn) as rec:  # nothing ran: nothing to report
        pass
    assert rec.attentions is None


def test_model_outputs_equal_fused_path_in_float64():
    # fused and eager paths are the same function: in float64 they agree to ~1e-12
    model = tiny("vit_tiny_patch16_224", img_size=64).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        with vitviz.capture(model) as rec:
            out = model(x)
    assert torch.allclose(out, ref, atol=1e-10)
    assert rec.attentions.tensor.dtype == torch.float32


def test_an_error_inside_an_attention_module_leaves_no_mode():
    model = tiny("vit_tiny_patch16_224", img_size=64)
    before = hook_state(model)

    def boom(*_):
        raise RuntimeError("inside the attention")

    h = model.blocks[1].attn.proj.register_forward_pre_hook(boom)  # after SDPA ran, inside the site
    with pytest.raises(RuntimeError, match="inside the attention"):
        with vitviz.capture(model), torch.no_grad():
            model(torch.randn(1, 3, 64, 64))
    h.remove()
    assert torch_function_modes() == 0 and hook_state(model) == before
