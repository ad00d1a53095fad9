"""Every attention layer a forward pass runs is in the Recording or in ``rec.skipped``.

The layers are counted here without vitviz (:class:`helpers.AttentionLayerCount`: a
torch-function mode of the test's own that notes every ``F.scaled_dot_product_attention`` call
and every softmax over the last dimension of a 3-D or larger tensor, in the innermost module
call running it; one layer per module call). For one small model of each family, the outcome
is written down: the layers counted, the stages (layers, query grid, prefix tokens, key grid,
heads) or the refusal of ``rec.stages`` with its reason, the pooling layers, and what is in
``rec.skipped``; then captured layers + skipped layers must equal the layers counted, with
``rec.complete``. A family that falls from maps to a refusal (or the reverse) fails here.

Each recorded layer is also compared with the probabilities the test computes itself for the
same call: a softmax's own output, or for an SDPA call ``softmax(q kᵀ·scale + mask)`` from the
call's own q and k (fused attention left as the model has it). Window attention is compared
after a brute-force scatter written here (Twins, EfficientViT-MSRA); ConViT's gated mixture is
recomputed from the module's own q, k, positional scores and gates.
"""

import warnings
from collections import Counter
from dataclasses import dataclass, field

import pytest
import timm
import torch
import transformers
from helpers import AttentionLayerCount, hook_state, torch_function_modes

import vitviz
from vitviz.errors import IncompleteCaptureWarning, LayoutError, UnplacedAttentionError


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():  # forward passes only in this file
        yield


def timm_model(name, size, **kw):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **kw).eval()
    return model, torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))


def hf_model(cls, config, shape):
    torch.manual_seed(0)
    return cls(config).eval(), torch.randn(*shape, generator=torch.Generator().manual_seed(1))


TINY_HF = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


@dataclass
class Family:
    """One small model of a family and its written-down outcome.

    ``stages``: ``(layers, query grid, prefix tokens, key grid or None, heads)`` per stage, in
    order; ``refused``: instead, ``rec.stages`` raises a VitvizError matching this; ``pool``:
    ``(layers, heads)`` of ``rec.pool``; ``skipped``: ``{what: layers}`` of ``rec.skipped``;
    ``windowed``: the layers are windows stitched on the grid (rows that hold padding sum to
    less than 1); ``own_reference``: the layers are compared here with the probabilities of their
    calls, else in the test named there (windows, ConViT's mixture).
    """

    name: str
    build: object = field(repr=False)
    layers: int
    stages: list = field(default_factory=list)
    refused: str | None = None
    pool: tuple | None = None
    skipped: dict = field(default_factory=dict)
    windowed: bool = False
    own_reference: str = ""


FAMILIES = [
    Family("timm-vit", lambda: timm_model("vit_tiny_patch16_224", 32, img_size=32, patch_size=8, depth=2,
                                          embed_dim=32, num_heads=2),
           layers=2, stages=[(2, (4, 4), 1, None, 2)]),
    Family("timm-deit-distilled", lambda: timm_model("deit_tiny_distilled_patch16_224", 32, img_size=32, patch_size=8,
                                                     depth=2, embed_dim=32, num_heads=2),
           layers=2, stages=[(2, (4, 4), 2, None, 2)]),
    # SigLIP's attention-pool (MAP) head: its latent query over the 2x2 patches is rec.pool
    Family("timm-siglip", lambda: timm_model("vit_base_patch16_siglip_224", 32, img_size=32, depth=1, embed_dim=32,
                                             num_heads=2),
           layers=2, stages=[(1, (2, 2), 0, None, 2)], pool=(1, 2)),
    Family("timm-swin", lambda: timm_model("swin_tiny_patch4_window7_224", 64, img_size=64, depths=(2, 1),
                                           embed_dim=16, num_heads=(1, 2), window_size=4),
           layers=3, stages=[(2, (16, 16), 0, None, 1), (1, (8, 8), 0, None, 2)], windowed=True),
    # two gated positional self-attention layers (over the patches; the class token joins after
    # them), then one plain self-attention layer over CLS + patches
    Family("timm-convit", lambda: timm_model("convit_tiny", 32, img_size=32, patch_size=8, depth=3,
                                             local_up_to_layer=2, embed_dim=48, num_heads=4),
           layers=3, stages=[(2, (4, 4), 0, None, 4), (1, (4, 4), 1, None, 4)],
           own_reference="test_convit_gpsa_records_the_gated_mixture"),
    # per stage: locally-grouped attention in 7x7 windows (padded), then global sub-sampled
    # attention over keys reduced to 2x2 (none in the last stage: sr 1)
    Family("timm-twins-svt", lambda: timm_model("twins_svt_small", 64, img_size=64, depths=(2, 2, 2, 2),
                                                embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8)),
           layers=8, stages=[(1, (16, 16), 0, None, 1), (1, (16, 16), 0, (2, 2), 1), (1, (8, 8), 0, None, 2),
                             (1, (8, 8), 0, (2, 2), 2), (1, (4, 4), 0, None, 4), (1, (4, 4), 0, (2, 2), 4),
                             (2, (2, 2), 0, None, 8)], windowed=True,
           own_reference="test_twins_locally_grouped_attention_stitched_exactly"),
    # subsampling attention between the stages: queries on the coarser grid, keys on the finer one
    Family("timm-levit", lambda: timm_model("levit_128s", 64, img_size=64),
           layers=11, stages=[(2, (4, 4), 0, None, 4), (1, (2, 2), 0, (4, 4), 8), (3, (2, 2), 0, None, 6),
                              (1, (1, 1), 0, (2, 2), 16), (4, (1, 1), 0, None, 8)]),
    # pooled keys throughout; at the stage transitions the queries are pooled too
    Family("timm-mvitv2", lambda: timm_model("mvitv2_tiny", 64, img_size=64),
           layers=10, stages=[(1, (16, 16), 0, (4, 4), 1), (1, (8, 8), 0, None, 2), (1, (8, 8), 0, (4, 4), 2),
                              (1, (4, 4), 0, (8, 8), 4), (4, (4, 4), 0, None, 4), (1, (2, 2), 0, (4, 4), 8),
                              (1, (2, 2), 0, None, 8)]),
    # a stage's first (downsampling) block attends with the previous width's head count
    Family("timm-coatnet", lambda: timm_model("coatnet_0_rw_224", 64, img_size=64),
           layers=9, stages=[(1, (4, 4), 0, None, 6), (6, (4, 4), 0, None, 12), (1, (2, 2), 0, None, 12),
                             (1, (2, 2), 0, None, 24)]),
    # cascaded group attention: one 3-D softmax per head, applied as v @ Aᵀ
    Family("timm-efficientvit-msra", lambda: timm_model("efficientvit_m0", 64, img_size=64),
           layers=6, stages=[(1, (4, 4), 0, None, 4), (2, (2, 2), 0, None, 4), (3, (1, 1), 0, None, 4)]),
    Family("timm-tnt", lambda: timm_model("tnt_s_patch16_224", 32, img_size=32, depth=2),
           layers=4, stages=[(2, (2, 2), 1, None, 6)], skipped={"inner attention": 2}),
    Family("timm-davit", lambda: timm_model("davit_tiny", 64, depths=(1, 1, 1, 1)),
           layers=8, stages=[(1, (16, 16), 0, None, 3), (1, (8, 8), 0, None, 6), (1, (4, 4), 0, None, 12),
                             (1, (2, 2), 0, None, 24)], skipped={"channel attention": 4}, windowed=True),
    Family("timm-volo", lambda: timm_model("volo_d1_224", 64, img_size=64),
           layers=20, stages=[(14, (4, 4), 0, None, 12)], pool=(2, 12), skipped={"outlook attention": 4}),
    Family("timm-xcit", lambda: timm_model("xcit_nano_12_p16_224", 32, img_size=32, depth=2),
           layers=4, refused="cross-covariance", pool=(2, 4), skipped={"cross-covariance attention": 2}),
    Family("timm-cait", lambda: timm_model("cait_xxs24_224", 32, img_size=32, depth=1),
           layers=3, refused="talking-heads", pool=(2, 4), skipped={"talking-heads attention": 1}),
    Family("timm-pit", lambda: timm_model("pit_ti_224", 64, img_size=64),
           layers=12, stages=[(2, (7, 7), 1, None, 2), (6, (4, 4), 1, None, 4), (4, (2, 2), 1, None, 8)]),
    Family("timm-maxvit", lambda: timm_model("maxvit_tiny_tf_224", 64, img_size=64),
           layers=22, stages=[(4, (16, 16), 0, None, 2), (4, (8, 8), 0, None, 4), (10, (4, 4), 0, None, 8),
                              (4, (2, 2), 0, None, 16)], windowed=True),
    Family("timm-efficientformer", lambda: timm_model("efficientformer_l1", 224),
           layers=1, stages=[(1, (7, 7), 0, None, 8)]),
    # attention in its last stage only (stride 32)
    Family("timm-fastvit", lambda: timm_model("fastvit_sa12", 64), layers=2, stages=[(2, (2, 2), 0, None, 16)]),
    # its downsampling attention (queries 7x7 over keys 14x14) is read; the talking-heads layers are not
    Family("timm-efficientformerv2", lambda: timm_model("efficientformerv2_s0", 224),
           layers=5, stages=[(1, (7, 7), 0, (14, 14), 8)], skipped={"talking-heads attention": 4}),
    Family("hf-vit", lambda: hf_model(transformers.ViTModel,
                                      transformers.ViTConfig(image_size=32, patch_size=8, **TINY_HF), (1, 3, 32, 32)),
           layers=2, stages=[(2, (4, 4), 1, None, 2)]),
    Family("hf-swin", lambda: hf_model(transformers.SwinModel,
                                       transformers.SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[2, 1],
                                                               num_heads=[1, 2], window_size=4), (1, 3, 64, 64)),
           layers=3, stages=[(2, (16, 16), 0, None, 1), (1, (8, 8), 0, None, 2)], windowed=True),
    Family("hf-levit", lambda: hf_model(transformers.LevitModel, transformers.LevitConfig(image_size=64),
                                        (1, 3, 64, 64)),
           layers=14, stages=[(4, (4, 4), 0, None, 4), (1, (2, 2), 0, (4, 4), 8), (4, (2, 2), 0, None, 8),
                              (1, (1, 1), 0, (2, 2), 16), (4, (1, 1), 0, None, 12)]),
    Family("hf-data2vec-vision", lambda: hf_model(transformers.Data2VecVisionModel,
                                                  transformers.Data2VecVisionConfig(image_size=32, patch_size=8,
                                                                                    **TINY_HF), (1, 3, 32, 32)),
           layers=2, stages=[(2, (4, 4), 1, None, 2)]),
    # no CLS token: the patches alone
    Family("hf-ijepa", lambda: hf_model(transformers.IJepaModel,
                                        transformers.IJepaConfig(image_size=32, patch_size=8, **TINY_HF),
                                        (1, 3, 32, 32)),
           layers=2, stages=[(2, (4, 4), 0, None, 2)]),
    # 5 detection tokens after the patches (TokenLayout num_suffix=5): the stage is the 4x4 grid
    Family("hf-yolos", lambda: hf_model(transformers.YolosModel,
                                        transformers.YolosConfig(image_size=[32, 32], patch_size=8,
                                                                 num_detection_tokens=5, **TINY_HF), (1, 3, 32, 32)),
           layers=2, stages=[(2, (4, 4), 1, None, 2)]),
    # video, joint space-time: no CLS token, 2 temporal x 4 x 4 tubelets (the clip's layout read from the
    # config and the input, never guessed from the 32 tokens)
    Family("hf-videomae", lambda: hf_model(transformers.VideoMAEModel,
                                           transformers.VideoMAEConfig(image_size=32, patch_size=8, num_frames=4,
                                                                       tubelet_size=2, **TINY_HF), (1, 4, 3, 32, 32)),
           layers=2, stages=[(2, (4, 4), 0, None, 2)]),
    Family("hf-vivit", lambda: hf_model(transformers.VivitModel,
                                        transformers.VivitConfig(image_size=32, tubelet_size=[2, 8, 8], num_frames=4,
                                                                 **TINY_HF), (1, 4, 3, 32, 32)),
           layers=2, stages=[(2, (4, 4), 1, None, 2)]),
    # divided space-time: a temporal and a spatial attention per block, each placed on the clip (4 x 4 x 4
    # patches + CLS); compared with a brute-force scatter there
    Family("hf-timesformer", lambda: hf_model(transformers.TimesformerModel,
                                              transformers.TimesformerConfig(image_size=32, patch_size=8, num_frames=4,
                                                                             **TINY_HF), (1, 4, 3, 32, 32)),
           layers=4, stages=[(4, (4, 4), 1, None, 2)],
           own_reference="test_video_capture::test_timesformer_divided_attention_equals_its_own_probabilities_and_a_"
                         "brute_force_scatter"),
]


def output_of(out):
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


def reference_of(ops: list[torch.Tensor]) -> torch.Tensor:
    """``[B', H, Q, K]`` probabilities of one layer from its ops' probabilities: a 3-D softmax per
    head (EfficientViT-MSRA) stacked as the heads; more batch dimensions folded."""
    if len(ops) > 1:
        return torch.stack(ops, dim=1)
    (ref,) = ops
    return ref.unsqueeze(1) if ref.dim() == 3 else ref.reshape(-1, *ref.shape[-3:])


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_every_attention_layer_is_captured_or_skipped(family):
    model, x = family.build()
    with AttentionLayerCount(model, keep=True) as count:
        ref = output_of(model(x))
    assert len(count.layers) == family.layers, count.layers
    before = hook_state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", IncompleteCaptureWarning)  # nothing unaccounted: no warning
        with vitviz.capture(model) as rec:
            out = output_of(model(x))
    assert hook_state(model) == before and torch_function_modes() == 0
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)  # the model's own output

    if family.refused is not None:
        with pytest.raises(vitviz.VitvizError, match=family.refused):
            _ = rec.stages
        captured = 0
    else:
        stages = rec.stages
        got = [(s.num_layers, s.layout.grid, s.layout.num_prefix, None if s.square else s.keys.grid, s.num_heads)
               for s in stages]
        assert got == family.stages
        captured = sum(s.num_layers for s in stages)
        for s in stages:  # probabilities: rows sum to 1 (to at most 1 where windows hold padding)
            rows = s.tensor.sum(-1)
            assert (rows <= 1 + 1e-5).all() and (s.tensor >= 0).all()
            if not family.windowed:
                torch.testing.assert_close(rows, torch.ones_like(rows), rtol=0, atol=1e-5)
    pool = rec.pool
    assert (None if pool is None else (pool.num_layers, pool.tensor.shape[2])) == family.pool
    pooled = 0 if pool is None else pool.num_layers

    # the accounting: captured + skipped = the layers the forward pass ran, and nothing unexplained
    assert Counter(what for _, what, _ in rec.skipped) == Counter(family.skipped)
    assert all(why for _, _, why in rec.skipped)
    names = Counter(name for name, _ in count.layers)
    assert not Counter(name for name, _, _ in rec.skipped) - names  # skipped layers are layers that ran
    assert captured + pooled + len(rec.skipped) == len(count.layers)
    assert rec.complete and rec.unaccounted == []

    if family.windowed or family.own_reference or family.refused is not None:
        return
    # every recorded layer equals the test's own probabilities of that call, in order
    skipped = Counter(name for name, _, _ in rec.skipped)
    refs = []
    for (name, _), ops in zip(count.layers, count.references):
        if skipped[name]:
            skipped[name] -= 1
            continue
        refs.append(reference_of(ops))
    records = rec.passes[-1].records
    assert len(records) == len(refs)
    for (_, _, got, _), want in zip(records, refs):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


# -- window attention that the model cuts itself: brute-force scatter --------------------------

def scatter_windows(windows: torch.Tensor, grid, window) -> torch.Tensor:
    """``[B, nW, H, T, T]`` attention within ``window``-sized windows of a grid padded at the bottom
    and right to whole windows (row-major windows, row-major tokens in a window) -> ``[B, H, N, N]``
    over the grid, padding dropped: written out with loops."""
    (h, w), (wh, ww) = grid, window
    cols = -(-w // ww)
    b, nw, heads, t, _ = windows.shape
    out = torch.zeros(b, heads, h * w, h * w, dtype=windows.dtype)
    for n in range(nw):
        r0, c0 = (n // cols) * wh, (n % cols) * ww
        pos = [(r0 + i // ww, c0 + i % ww) for i in range(t)]
        for i, (ri, ci) in enumerate(pos):
            for j, (rj, cj) in enumerate(pos):
                if ri < h and ci < w and rj < h and cj < w:
                    out[:, :, ri * w + ci, rj * w + cj] = windows[:, n, :, i, j]
    return out


def test_twins_locally_grouped_attention_stitched_exactly():
    """Twins' locally-grouped attention runs SDPA on ``[B, windows, heads, T, d]``: each layer is
    the test's own softmax(q kᵀ·scale) of that call, scattered onto the padded grid's windows."""
    model, x = timm_model("twins_svt_small", 64, img_size=64, depths=(2, 2, 1, 1),
                          embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8))
    assert model.blocks[0][0].attn.fused_attn  # the fused path, as the model runs it
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with AttentionLayerCount(model, keep=True) as count:
        model(x)
    with vitviz.capture(model) as rec:
        model(x)
    records = rec.passes[-1].records
    lsa = [i for i, (name, _) in enumerate(count.layers)
           if type(model.get_submodule(name)).__name__ == "LocallyGroupedAttn"]
    assert len(lsa) == 4 and len(records) == len(count.layers) == 6
    for i in lsa:
        (ref,) = count.references[i]  # [B, nW, H, 49, 49]
        attn = model.get_submodule(count.layers[i][0])
        grid = rec.passes[-1].layouts[("image", records[i][3])][0].grid
        want = scatter_windows(ref, grid, (attn.ws, attn.ws))
        torch.testing.assert_close(records[i][2].double(), want, rtol=1e-5, atol=1e-6)
    assert [records[i][2].shape[-1] for i in lsa] == [256, 64, 16, 4]  # 16x16 (9 padded windows), ..., 2x2


def test_efficientvit_msra_windows_and_cascaded_heads():
    """EfficientViT-MSRA at 128 px: stage 0 (8x8 tokens) is cut into 7x7 windows (padded to 14x14);
    each head's 3-D softmax is multiplied as v @ Aᵀ, and the heads of one call are one layer."""
    model, x = timm_model("efficientvit_m0", 128, img_size=128)
    with AttentionLayerCount(model, keep=True) as count:
        model(x)
    with vitviz.capture(model) as rec:
        model(x)
    stages = rec.stages
    assert [(s.num_layers, s.layout.grid, s.num_heads) for s in stages] == [(1, (8, 8), 4), (2, (4, 4), 4),
                                                                          (3, (2, 2), 4)]
    assert rec.complete and rec.skipped == []
    records = rec.passes[-1].records
    assert len(records) == len(count.layers) == 6
    first = count.layers[0][0]
    assert first.endswith("attn") and len(count.references[0]) == 4  # four heads, one softmax each
    heads = torch.stack(count.references[0], dim=1)  # [B * 4 windows, 4 heads, 49, 49]
    windows = heads.reshape(1, 4, 4, 49, 49)
    torch.testing.assert_close(records[0][2].double(), scatter_windows(windows, (8, 8), (7, 7)),
                               rtol=1e-5, atol=1e-6)
    for (_, _, got, _), ops in zip(records[1:], count.references[1:]):
        torch.testing.assert_close(got.double(), torch.stack(ops, dim=1), rtol=1e-5, atol=1e-6)


def test_cascaded_heads_gradients_equal_autograd():
    """With grad=True, each head of EfficientViT-MSRA's cascaded attention (a separate tensor of the
    model's graph) gets its own gradient, placed in its head of the layer: equal to autograd's
    gradient of the score with respect to that softmax output."""
    model, x = timm_model("efficientvit_m0", 64, img_size=64)
    for m in model.modules():  # its projections start at zero (BatchNorm weights 0): no gradient
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(m.weight)
    softmaxes = []

    class Keep(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.Tensor.softmax:
                out.retain_grad()
                softmaxes.append(out)
            return out

    with torch.enable_grad():
        with Keep():
            model(x)[0, 1].backward()
        model.zero_grad()
        with vitviz.capture(model, grad=True) as rec:
            score = model(x)[0, 1]
            assert len(rec.grad_inputs()) == 24  # 6 layers x 4 heads, each the model's own tensor
            score.backward()
    grads = rec.passes[-1].grads
    assert len(grads) == 6
    for layer in range(6):
        want = torch.stack([t.grad for t in softmaxes[4 * layer:4 * layer + 4]], dim=1)  # [B, 4, N, N]
        assert want.abs().max() > 0
        torch.testing.assert_close(grads[("image", layer)], want, rtol=1e-5, atol=1e-9)


def test_convit_gpsa_records_the_gated_mixture():
    """GPSA multiplies v with ``(1 - σ(g))·softmax(q kᵀ·scale) + σ(g)·softmax(pos)``, renormalised:
    that mixture, recomputed here from the module's own q, k, positional scores and gates, is
    what is recorded (one layer per GPSA call, not its two softmaxes)."""
    model, x = timm_model("convit_tiny", 32, img_size=32, patch_size=8, depth=3, local_up_to_layer=2,
                          embed_dim=48, num_heads=4)
    for blk in model.blocks[:2]:  # gates away from 0 so that both softmaxes matter
        blk.attn.gating_param.data = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    inputs = {}
    handles = [blk.attn.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0]))
               for i, blk in enumerate(model.blocks)]
    with vitviz.capture(model) as rec:
        model(x)
    for h in handles:
        h.remove()
    gpsa = rec.stages[0]
    assert gpsa.layout == vitviz.TokenLayout(0, (4, 4)) and gpsa.layers == (0, 1)
    for i in range(2):
        m, t = model.blocks[i].attn, inputs[i]
        b, n, c = t.shape
        qk = m.qk(t).reshape(b, n, 2, m.num_heads, c // m.num_heads).permute(2, 0, 3, 1, 4)
        patch = ((qk[0] @ qk[1].transpose(-2, -1)) * m.scale).softmax(-1)
        pos = m.pos_proj(m.rel_indices.expand(b, -1, -1, -1)).permute(0, 3, 1, 2).softmax(-1)
        g = torch.sigmoid(m.gating_param.view(1, -1, 1, 1))
        want = (1 - g) * patch + g * pos
        want = want / want.sum(-1, keepdim=True)
        torch.testing.assert_close(gpsa.tensor[i], want, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(want, patch, atol=1e-3)  # the mixture, not the content softmax alone
    torch.testing.assert_close(gpsa.tensor.sum(-1), torch.ones(2, 1, 4, 16), rtol=0, atol=1e-5)


# -- what is not attention, or cannot be read: skipped with its reason, never silent -----------

def test_unread_attention_warns_once_naming_the_modules():
    """A softmax over the last dimension that never multiplies values, next to attention that is
    read: rec.complete is False, rec.unaccounted names the module, one warning per capture."""

    class Odd(torch.nn.Module):
        def forward(self, x):  # [B, N, D] -> a token-by-token softmax that is only summed
            return x + (x @ x.transpose(-2, -1)).softmax(-1).sum(-1, keepdim=True)

    model, x = timm_model("vit_tiny_patch16_224", 32, img_size=32, patch_size=8, depth=2, embed_dim=32,
                          num_heads=2)
    model.blocks[1].ls1 = Odd()  # runs inside block 1, outside its attention module
    with pytest.warns(IncompleteCaptureWarning, match=r"1 attention layer\(s\) .* blocks\.1\.ls1") as caught:
        with vitviz.capture(model) as rec:
            model(x)
            model(x)
    assert len(caught) == 1
    assert not rec.complete and rec.unaccounted == ["blocks.1.ls1"] and rec.skipped == []
    assert rec.stages[0].num_layers == 2  # the rest is still captured


def test_restricted_adapters_leave_the_rest_out_on_request():
    model, x = timm_model("vit_tiny_patch16_224", 32, img_size=32, patch_size=8, depth=2, embed_dim=32,
                          num_heads=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", IncompleteCaptureWarning)
        with vitviz.capture(model, keep=[-1]) as rec:
            model(x)
    assert rec.complete and rec.attentions.num_layers == 1


def test_mixed_weights_that_are_not_probabilities_are_skipped_with_the_reason():
    class Masked(torch.nn.Module):
        def forward(self, x):  # softmax, then half of the keys zeroed without renormalising
            a = (x @ x.transpose(-2, -1)).softmax(-1)
            keep = torch.arange(x.shape[1]) % 2 == 0
            return (a * keep) @ x

    model = vitviz.wrap(torch.nn.Sequential(Masked(), Masked()), grid=(2, 2), num_prefix=0)
    with pytest.raises(vitviz.VitvizError, match="rows do not sum to 1"):
        with vitviz.capture(model):
            model(torch.randn(1, 4, 8))


def test_videomae_layout_is_read_not_guessed():
    model, x = hf_model(transformers.VideoMAEModel,
                        transformers.VideoMAEConfig(image_size=32, patch_size=8, num_frames=4, tubelet_size=2,
                                                    **TINY_HF), (1, 4, 3, 32, 32))
    with vitviz.capture(model) as rec:
        model(x)
    layout = rec.attentions.layout  # from the config (tubelets of 2, time-major) and the clip (4 frames)
    assert layout == vitviz.TokenLayout(0, (4, 4), frames=2, tubelet=2) and layout.time_major
    # 5 frames: the model floors them to the same 32 tokens (2 tubelets); which frames they hold is
    # not guessed
    five = torch.randn(1, 5, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with vitviz.capture(model) as rec:
        model(five)
    for read in (lambda: rec.stages, lambda: rec.attentions):
        with pytest.raises(LayoutError, match="VideoMAEModel: a clip of 5 frames does not split into tubelets") as e:
            read()
        assert isinstance(e.value, UnplacedAttentionError)  # also a CaptureError
    assert rec.complete and len(rec.skipped) == 2
    assert all(what == "attention over video tokens" and "5 frames" in why for _, what, why in rec.skipped)


def test_transformers_siglip_pooling_head_is_rec_pool_equal_to_its_own_weights():
    # SigLIP's multihead-attention pooling head is an nn.MultiheadAttention whose parent holds the
    # learned probe: a pooling head (rec.pool), not cross-attention of a text that is not there
    cfg = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, image_size=32, patch_size=8)
    m = transformers.SiglipVisionModel(cfg).eval()
    vm = vitviz.wrap(m)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    count = AttentionLayerCount(m)
    with torch.no_grad(), vitviz.capture(vm) as rec, count:
        out = vm(x)
    assert rec.cross is None and rec.complete and rec.skipped == []
    assert [name for name, _ in count.layers] == [  # seen without vitviz: 2 encoder layers and the head
        "encoder.layers.0.self_attn", "encoder.layers.1.self_attn", "head.attention"]
    assert [s.tensor.shape for s in rec.stages] == [(2, 2, 2, 16, 16)]
    head = m.vision_model.head if hasattr(m, "vision_model") else m.head
    with torch.no_grad():  # the reference: the module's own per-head weights for the same input
        _, w = head.attention(head.probe.expand(2, -1, -1), out.last_hidden_state, out.last_hidden_state,
                              need_weights=True, average_attn_weights=False)  # [B, H, 1, N]
    assert rec.pool.tensor.shape == (1, 2, 2, 1, 16)
    torch.testing.assert_close(rec.pool.tensor[0], w, atol=1e-6, rtol=0)


def test_the_module_tree_read_at_every_capture_is_named_modules_order():
    """capture() reads the tree without names at each call (_tree) to tell whether it changed:
    the same modules in the same order as named_modules(), shared modules once, empty slots skipped."""
    from vitviz.attention._capture import _tree

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32, patch_size=8,
                              embed_dim=16, num_heads=2)
    model.shared = model.blocks[0]  # one module under two parents
    model.register_module("empty", None)
    assert _tree(model) == [m for _, m in model.named_modules()]
    assert len(_tree(model)) == len({id(m) for m in model.modules()})
