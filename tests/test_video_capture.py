"""Video transformers captured on the clip's token grid (issue 28).

VideoMAE and ViViT run joint space-time attention: one sequence over the whole clip, compared
whole with their eager ``output_attentions``. TimeSformer runs divided attention: a temporal
attention (``B*gh*gw`` sequences of ``T`` tokens) then a spatial one (``B*T`` sequences of a CLS
copy + one frame's patches), each placed as a block-sparse ``[B, H, N, N]`` over the clip. Its
placement is compared with a brute-force scatter written here with loops; the spatial part with
its ``output_attentions``, the temporal part with ``softmax(q kᵀ·scale)`` recomputed from the
module's own ``qkv``; its gradients with the autograd of a forward pass written out here that
mixes the values with the placed matrices (leaves), so both the matrices and their gradients
are exact as the mixing matrices of the model. The token order is checked on models whose q and
k are set by hand so that each token attends to the tokens of its own temporal position.
VideoMAE pre-training scatters the visible tubes like ViT-MAE's visible patches.
"""

import pytest
import torch
import transformers
from helpers import hook_state, torch_function_modes
from torch import nn

import vitviz
from vitviz.analyze import RolloutStream
from vitviz.errors import UnplacedAttentionError
from vitviz.types import TokenLayout

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
B, FRAMES, GH, GW = 2, 4, 4, 4  # clips, input frames, patch grid
P = GH * GW


def build(family: str, impl: str = "eager", cls=None, **extra):
    """A tiny random model of a video family (image 32, patch 8, 4 frames, 2 layers, 2 heads)."""
    torch.manual_seed(0)
    if family == "videomae":
        cfg = transformers.VideoMAEConfig(image_size=32, patch_size=8, num_frames=FRAMES, tubelet_size=2,
                                          num_labels=3, **TINY, **extra)
        cls = cls or transformers.VideoMAEForVideoClassification
    elif family == "vivit":
        cfg = transformers.VivitConfig(image_size=32, tubelet_size=[2, 8, 8], num_frames=FRAMES, num_labels=3,
                                       **TINY, **extra)
        cls = cls or transformers.VivitForVideoClassification
    else:
        extra.setdefault("initializer_range", 0.3)  # attention far from uniform over 4 frames
        cfg = transformers.TimesformerConfig(image_size=32, patch_size=8, num_frames=FRAMES, num_labels=3,
                                             **TINY, **extra)
        cls = cls or transformers.TimesformerForVideoClassification
    cfg._attn_implementation = impl
    model = cls(cfg).eval()
    for head in [m for n, m in model.named_modules() if n.endswith("classifier")]:
        nn.init.normal_(head.weight)  # transformers starts heads near zero: one class everywhere
    return model


def clip(batch=B, frames=FRAMES, seed=1):
    return torch.randn(batch, frames, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def assert_rows_sum_to_one(t):
    rows = t.sum(-1)
    torch.testing.assert_close(rows, torch.ones_like(rows), rtol=0, atol=1e-5)


# -- joint space-time attention: VideoMAE, ViViT ------------------------------------------------------

JOINT = {"videomae": TokenLayout(0, (GH, GW), frames=2, tubelet=2),
         "vivit": TokenLayout(1, (GH, GW), frames=2, tubelet=2)}


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("family", list(JOINT))
def test_joint_space_time_attention_equals_eager_output_attentions(family, impl):
    model = build(family, impl)
    x = clip()
    with torch.no_grad():
        plain = model(x).logits
        model.set_attn_implementation("eager")
        eager = model(x, output_attentions=True).attentions
        model.set_attn_implementation(impl)
    before = hook_state(model)
    with torch.no_grad(), vitviz.capture(model) as rec:
        logits = model(x).logits
    if impl == "eager":  # the model's own softmax: its output, bitwise
        assert torch.equal(logits, plain)
    else:  # the capture computes A and A·v in place of the fused kernel
        torch.testing.assert_close(logits, plain, rtol=1e-5, atol=1e-5)
    assert hook_state(model) == before and torch_function_modes() == 0
    a = rec.attentions
    assert a.layout == JOINT[family] and a.layout.time_major and rec.complete and rec.skipped == []
    n = JOINT[family].num_tokens
    assert tuple(a.tensor.shape) == (2, B, 2, n, n)
    torch.testing.assert_close(a.tensor, torch.stack(eager), rtol=1e-5, atol=1e-6)
    assert_rows_sum_to_one(a.tensor)
    assert vitviz.rollout(a).shape == (B, 2, GH, GW) and vitviz.cls_maps(a).shape == (B, 2, 2, GH, GW)


# -- TimeSformer: divided space-time attention ----------------------------------------------------------

def token(r, c, t, frames=FRAMES):
    """TimeSformer's sequence index of patch (r, c) of frame t: CLS, then (row, col, frame)."""
    return 1 + (r * GW + c) * frames + t


def scatter_divided(kind, seq, batch=B, frames=FRAMES):
    """Brute force, with loops: one divided layer's per-sequence attention on the clip's
    [B, H, N, N] -- temporal: ``seq[b*P + r*GW + c, h, t, t2]``, the CLS row the identity;
    spatial: ``seq[b*T + t, h, i, j]`` (0 the frame's CLS copy), the CLS row the mean over
    frames. The loops write a table (destination, source, weight) that is then applied with one
    differentiable ``index_put`` (so the reference forward below can backpropagate through it)."""
    heads = seq.shape[1]
    n = 1 + P * frames
    dst, src, weight, const = [], [], [], []  # const: (destination, value) independent of seq
    flat_src = lambda s, h, i, j: ((s * heads + h) * seq.shape[2] + i) * seq.shape[3] + j  # noqa: E731
    flat_dst = lambda b, h, i, j: ((b * heads + h) * n + i) * n + j  # noqa: E731
    for b in range(batch):
        for h in range(heads):
            if kind == "time":
                const.append((flat_dst(b, h, 0, 0), 1.0))
                for r in range(GH):
                    for c in range(GW):
                        for t in range(frames):
                            for t2 in range(frames):
                                dst.append(flat_dst(b, h, token(r, c, t, frames), token(r, c, t2, frames)))
                                src.append(flat_src(b * P + r * GW + c, h, t, t2))
                                weight.append(1.0)
                continue
            for t in range(frames):
                s = b * frames + t
                dst.append(flat_dst(b, h, 0, 0))
                src.append(flat_src(s, h, 0, 0))
                weight.append(1.0 / frames)
                for i in range(P):
                    r, c = divmod(i, GW)
                    q = token(r, c, t, frames)
                    dst += [flat_dst(b, h, 0, q), flat_dst(b, h, q, 0)]
                    src += [flat_src(s, h, 0, 1 + i), flat_src(s, h, 1 + i, 0)]
                    weight += [1.0 / frames, 1.0]
                    for j in range(P):
                        r2, c2 = divmod(j, GW)
                        dst.append(flat_dst(b, h, q, token(r2, c2, t, frames)))
                        src.append(flat_src(s, h, 1 + i, 1 + j))
                        weight.append(1.0)
    out = torch.zeros(batch * heads * n * n, dtype=seq.dtype)
    if const:
        out[[d for d, _ in const]] = torch.tensor([v for _, v in const], dtype=seq.dtype)
    values = seq.reshape(-1)[torch.tensor(src)] * torch.tensor(weight, dtype=seq.dtype)
    out = out.index_put((torch.tensor(dst),), values, accumulate=True)
    return out.view(batch, heads, n, n)


def qkv_of(attention, hidden):
    """q, k, v ``[B', H, L, d]`` of a TimesformerSelfAttention from its own qkv layer."""
    b, length, dim = hidden.shape
    heads = attention.num_heads
    qkv = attention.qkv(hidden).reshape(b, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def test_timesformer_divided_attention_equals_its_own_probabilities_and_a_brute_force_scatter():
    model = build("timesformer")
    x = clip()
    layers = model.timesformer.encoder.layer
    temporal_inputs = []
    handles = [layer.temporal_attention.attention.register_forward_pre_hook(
        lambda m, args: temporal_inputs.append(args[0])) for layer in layers]
    with torch.no_grad():
        plain = model(x).logits
        out = model(x, output_attentions=True)  # the spatial attention only: [B*T, H, 1+P, 1+P] per block
    for h in handles:
        h.remove()
    temporal_inputs = temporal_inputs[len(layers):]  # those of the second call
    before = hook_state(model)
    with torch.no_grad(), vitviz.capture(model) as rec:
        logits = model(x).logits
    assert torch.equal(logits, plain)
    assert hook_state(model) == before and torch_function_modes() == 0
    a = rec.attentions
    layout = TokenLayout(1, (GH, GW), frames=FRAMES, tubelet=1, time_major=False)
    assert a.layout == layout and rec.complete and rec.skipped == []
    assert tuple(a.tensor.shape) == (4, B, 2, 65, 65)  # 2 per block: temporal, then spatial
    assert [p for p in rec.passes[-1].layouts.values()] == [(layout, None)] * 4
    for i, layer in enumerate(layers):
        sa = layer.temporal_attention.attention
        with torch.no_grad():
            q, k, _ = qkv_of(sa, temporal_inputs[i])  # [B*P, H, T, d]
            temporal = ((q @ k.transpose(-2, -1)) * sa.scale).softmax(-1)
        assert temporal.std() > 1e-2  # not uniform: the comparison can fail
        torch.testing.assert_close(a.tensor[2 * i], scatter_divided("time", temporal), rtol=1e-5, atol=1e-6)
        spatial = out.attentions[i]
        assert spatial.shape == (B * FRAMES, 2, 1 + P, 1 + P)
        torch.testing.assert_close(a.tensor[2 * i + 1], scatter_divided("space", spatial), rtol=1e-5, atol=1e-6)
        # the patch rows of frame t are that frame's rows, read back by hand
        for t in range(FRAMES):
            rows = [token(r, c, t) for r in range(GH) for c in range(GW)]
            cols = [0] + rows
            torch.testing.assert_close(a.tensor[2 * i + 1][:, :, rows][..., cols],
                                       spatial.view(B, FRAMES, 2, 1 + P, 1 + P)[:, t, :, 1:], rtol=0, atol=0)
    assert_rows_sum_to_one(a.tensor)
    assert vitviz.rollout(a).shape == (B, FRAMES, GH, GW)
    # a streaming rollout (keep="none") sees the same placed layers
    with torch.no_grad(), vitviz.capture(model, keep="none", streams={"r": RolloutStream()}) as streamed:
        model(x)
    torch.testing.assert_close(streamed.stream("r"), vitviz.rollout(a), rtol=1e-5, atol=1e-6)
    # (the mean over heads is placed once; a max over heads needs every head placed)
    with torch.no_grad(), vitviz.capture(model, keep="none", streams={"r": RolloutStream(head_fusion="max")}) as top:
        model(x)
    torch.testing.assert_close(top.stream("r"), vitviz.rollout(a, head_fusion="max"), rtol=1e-5, atol=1e-6)
    # keep= and rows= act on the placed layers
    with torch.no_grad(), vitviz.capture(model, keep=[-1], rows="cls") as last:
        model(x)
    assert last.attentions.rows == (0,)
    torch.testing.assert_close(last.attentions.tensor[0], a.tensor[-1][:, :, :1], rtol=0, atol=0)


def reference_forward(model, x):
    """TimesformerForVideoClassification's forward written out, with every divided attention
    placed on the clip (brute force) and used as the mixing matrix: ``out = M @ V`` over all the
    clip's tokens, ``M = scatter(softmax(q kᵀ·scale)) + Z`` with ``Z`` a zero leaf, so that
    ``Z.grad`` is the gradient with respect to the placed matrix (every later path included).
    Returns the logits, the placed matrices and the leaves (temporal, spatial per block)."""
    tf = model.timesformer
    batch = x.shape[0]
    h = tf.embeddings(x)  # [B, N, D]: CLS, then (row, col, frame)
    placed, leaves = [], []
    for layer in tf.encoder.layer:
        sa = layer.temporal_attention.attention
        xt = layer.temporal_layernorm(h[:, 1:])  # [B, P*T, D]
        q, k, v = qkv_of(sa, xt)  # [B, H, P*T, d]
        heads, d = q.shape[1], q.shape[-1]
        qs = q.reshape(batch, heads, P, FRAMES, d)
        ks = k.reshape(batch, heads, P, FRAMES, d)
        seq = ((qs @ ks.transpose(-2, -1)) * sa.scale).softmax(-1)  # [B, H, P, T, T]
        seq = seq.permute(0, 2, 1, 3, 4).reshape(batch * P, heads, FRAMES, FRAMES)
        zt = torch.zeros(batch, heads, 1 + P * FRAMES, 1 + P * FRAMES, requires_grad=True)
        mt = scatter_divided("time", seq, batch) + zt
        ctx = (mt[:, :, 1:, 1:] @ v).transpose(1, 2).reshape(batch, P * FRAMES, -1)
        temporal = h[:, 1:] + layer.temporal_dense(layer.temporal_attention.output(ctx))
        tokens = torch.cat([h[:, :1], temporal], dim=1)  # [B, N, D]
        sa = layer.attention.attention
        q, k, v = qkv_of(sa, layer.layernorm_before(tokens))  # [B, H, N, d]
        frames = []
        for t in range(FRAMES):  # frame t's sequence: the CLS copy and the frame's patches
            idx = [0] + [token(r, c, t) for r in range(GH) for c in range(GW)]
            frames.append(((q[:, :, idx] @ k[:, :, idx].transpose(-2, -1)) * sa.scale).softmax(-1))
        seq = torch.stack(frames, 1).reshape(batch * FRAMES, heads, 1 + P, 1 + P)
        zs = torch.zeros_like(zt, requires_grad=True)
        ms = scatter_divided("space", seq, batch) + zs
        ctx = (ms @ v).transpose(1, 2).reshape(batch, 1 + P * FRAMES, -1)
        hidden = tokens + layer.attention.output(ctx)
        h = hidden + layer.output(layer.intermediate(layer.layernorm_after(hidden)))
        placed += [mt, ms]
        leaves += [zt, zs]
    if tf.layernorm is not None:
        h = tf.layernorm(h)
    return model.classifier(h[:, 0]), placed, leaves


def chefer_by_hand(attn, grads, layout):
    """Chefer et al. 2021 written out: R = I; R += mean_h[(A ⊙ dA)⁺] R per layer; the CLS row
    over the patches, as (frame, row, col) maps."""
    n = attn.shape[-1]
    r = torch.eye(n, dtype=torch.float64).expand(attn.shape[1], n, n)
    for a, g in zip(attn.double(), grads.double()):
        r = r + (a * g).clamp(min=0).mean(1) @ r
    return layout.patch_map(r[:, 0, 1:]).float()


def test_timesformer_gradients_are_exact_for_the_placed_matrices():
    # d score / d M of the placed matrix M as the model's mixing matrix, on M's support (the
    # entries the model has: elsewhere M is 0, and A ⊙ dA is 0 whatever the gradient)
    model = build("timesformer")
    x = clip()
    logits, placed, leaves = reference_forward(model, x)
    with torch.no_grad():
        plain = model(x).logits
    torch.testing.assert_close(logits, plain, rtol=1e-5, atol=1e-5)  # the placed matrices mix as the model
    target = plain.argmax(1)
    logits.gather(1, target[:, None]).sum().backward()
    with vitviz.capture(model, grad=True) as rec:
        model(x).logits.gather(1, target[:, None]).sum().backward()
    a, g = rec.attentions.tensor, rec.attention_grads.tensor
    for i, (m, z) in enumerate(zip(placed, leaves)):
        kind = "time" if i % 2 == 0 else "space"
        support = scatter_divided(kind, torch.ones(B * (P if kind == "time" else FRAMES), 2,
                                                   *((FRAMES,) * 2 if kind == "time" else (1 + P,) * 2))) != 0
        assert z.grad[support].abs().max() > 1e-3  # a gradient that can differ
        torch.testing.assert_close(a[i], m.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g[i][support], z.grad[support], rtol=1e-4, atol=1e-5)
        assert (g[i][~support] == 0).all()
        torch.testing.assert_close(a[i] * g[i], m.detach() * z.grad, rtol=1e-4, atol=1e-5)
    assert (g[0::2, :, :, 0] == 0).all()  # the temporal CLS row: the CLS token is not mixed there
    want = chefer_by_hand(torch.stack([m.detach() for m in placed]), torch.stack([z.grad for z in leaves]),
                          rec.attentions.layout)
    got = vitviz.relevance(model, x, method="chefer")
    assert got.shape == (B, FRAMES, GH, GW)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["videomae", "vivit", "timesformer"])
@pytest.mark.parametrize("method", ["chefer", "grad_rollout", "attnlrp", "cp-lrp"])
def test_video_relevance_batched_equals_one_by_one(family, method):
    model = build(family)
    vm = vitviz.wrap(model)
    x = clip(batch=2)
    maps = vitviz.relevance(vm, x, method=method)
    frames = vm.layout_at((32, 32), frames=FRAMES).frames
    assert maps.shape == (2, frames, GH, GW) and torch.isfinite(maps).all()
    assert maps.flatten(1).std(1).min() > 0
    for b in range(2):
        torch.testing.assert_close(maps[b:b + 1], vitviz.relevance(vm, x[b:b + 1], method=method),
                                   rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp"])
def test_video_lrp_pools_each_tubelets_frames_and_patch_pixels(method):
    model = build("videomae")
    vm = vitviz.wrap(model)
    x = clip(batch=1)
    pixels = vitviz.relevance(vm, x, method=method, pixels=True)  # [B, T, H, W]: per input frame
    maps = vitviz.relevance(vm, x, method=method)  # [B, frames, gh, gw]
    assert pixels.shape == (1, FRAMES, 32, 32) and maps.shape == (1, 2, GH, GW)
    for t in range(2):  # temporal position t: input frames 2t, 2t+1; patch (r, c): pixels 8r.., 8c..
        for r in range(GH):
            for c in range(GW):
                want = pixels[0, 2 * t:2 * t + 2, 8 * r:8 * r + 8, 8 * c:8 * c + 8].sum()
                torch.testing.assert_close(maps[0, t, r, c], want, rtol=1e-5, atol=1e-6)


# -- the token order, known by construction ----------------------------------------------------------

def frame_tokens_model(family):
    """A model whose first layer attends, from each token, to the tokens of its own temporal
    position, whatever order the model keeps them in: position (and time) embeddings zero, every
    patch embedding ``s·u + b`` (``s`` the mean value of its pixels in channel 0), the same
    pattern in both heads' halves of the embedding, and q = k = 10·LN(x) in every attention.
    Within a head every LN(x) has the same norm, so a token scores itself (and every token of the
    same embedding: the same frame of a clip whose frames are constant) highest."""
    model = build(family)
    dim = TINY["hidden_size"]
    half = torch.randn(dim // 2, generator=torch.Generator().manual_seed(5))
    bias = torch.cat([half, half])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                m.weight.zero_()
                for d in (0, dim // 2):  # u = e_0 + e_16: one value in each head's half
                    m.weight[d, 0] = 1.0 / m.weight[d, 0].numel()
                m.bias.copy_(bias)
        for name, value in list(model.named_parameters()) + list(model.named_buffers()):
            if "position_embeddings" in name or "time_embeddings" in name:
                value.zero_()
        for m in model.modules():
            if isinstance(getattr(m, "position_embeddings", None), torch.Tensor) and not isinstance(
                    m.position_embeddings, nn.Parameter):
                m.position_embeddings = torch.zeros_like(m.position_embeddings)  # VideoMAE: a fixed table
        for m in model.modules():
            projections = ([m.query, m.key] if hasattr(m, "query") and hasattr(m, "key") else
                           [m.q_proj, m.k_proj] if hasattr(m, "q_proj") and hasattr(m, "k_proj") else
                           [m.qkv] if hasattr(m, "qkv") else [])
            for lin in projections:
                w = torch.eye(dim) * 10.0
                lin.weight.copy_(w.repeat(lin.weight.shape[0] // dim, 1))  # qkv: q, k and v
                if lin.bias is not None:
                    lin.bias.zero_()
            for name in ("q_bias",):
                if getattr(m, name, None) is not None:
                    getattr(m, name).zero_()
    return model


def frames_clip():
    """One clip whose input frame t is constant 2t - 3 (all pixels, all channels)."""
    values = torch.arange(FRAMES, dtype=torch.float32) * 2 - 3
    return values.view(1, FRAMES, 1, 1, 1).expand(1, FRAMES, 3, 32, 32).clone()


@pytest.mark.parametrize("family", ["videomae", "vivit", "timesformer"])
def test_a_late_frame_query_maps_onto_the_late_frame(family):
    model = frame_tokens_model(family)
    with torch.no_grad(), vitviz.capture(model) as rec:
        model(frames_clip())
    a = rec.attentions
    layout = a.layout
    last = layout.frames - 1
    for query in [(last, 1, 2), (0, 3, 0)]:
        m = vitviz.query_maps(a, query, layer=0)[0].mean(0)  # [frames, gh, gw], heads averaged
        mass = m.sum((-2, -1))  # per temporal position
        assert mass[query[0]] > 0.99 * m.sum(), mass
        # read in the other token order, the same row lands elsewhere: the order is what makes it right
        other = TokenLayout(layout.num_prefix, layout.grid, frames=layout.frames, tubelet=layout.tubelet,
                            time_major=not layout.time_major)
        row = a.tensor[0, 0].mean(0)[layout.patch_index(query[1], query[2], query[0])]
        wrong = other.patch_map(row[layout.patches]).sum((-2, -1))
        assert wrong[query[0]] < 0.6 * mass[query[0]], (wrong, mass)
    if family == "timesformer":  # temporal attention: patch (r, c, t) attends to (r, c, t) itself
        m = vitviz.query_maps(a, (last, 1, 2), layer=0)[0].mean(0)
        assert m[last, 1, 2] > 0.99
        # spatial attention (layer 1) stays within the query's frame by construction
        m = vitviz.query_maps(a, (last, 1, 2), layer=1)[0].mean(0)
        assert m[:last].sum() == 0 and m[last].sum() > 0.5


def test_vivit_cls_map_of_a_late_frame_lands_on_it():
    # the CLS token set to the embedding of the last temporal position's patches: its map there
    model = frame_tokens_model("vivit")
    clip_ = frames_clip()
    with torch.no_grad():
        tubes = model.vivit.embeddings.patch_embeddings(clip_)  # [1, frames*P, D], time-major
        model.vivit.embeddings.cls_token.copy_(tubes[:, -1:])
    with torch.no_grad(), vitviz.capture(model) as rec:
        model(clip_)
    maps = vitviz.cls_maps(rec.attentions, layer=0)[0].mean(0)  # sample 0, heads averaged: [frames, gh, gw]
    assert maps.shape == (2, GH, GW)
    assert maps[1].sum() > 0.95 * maps.sum() and maps[1].std() < 1e-4  # every patch of the late frame alike


# -- VideoMAE pre-training: visible tubes scattered --------------------------------------------------

def test_videomae_pretraining_scatters_the_visible_tubes():
    model = build("videomae", cls=transformers.VideoMAEForPreTraining, decoder_hidden_size=32,
                  decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=64)
    x = clip()
    mask = torch.zeros(B, 32, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    for b in range(B):
        mask[b, torch.randperm(32, generator=g)[:20]] = True  # 12 visible tubes each
    decoder = []
    hook = model.decoder.decoder_layers[0].attention.attention.register_forward_hook(
        lambda m, args, out: decoder.append(out[1]))
    with torch.no_grad():
        out = model(x, bool_masked_pos=mask, output_attentions=True)
    hook.remove()
    before = hook_state(model)
    with torch.no_grad(), vitviz.capture(model) as rec:
        again = model(x, bool_masked_pos=mask)
    assert torch.equal(again.logits, out.logits)
    assert hook_state(model) == before
    a = rec.attentions
    assert a.layout == JOINT["videomae"] and tuple(a.tensor.shape) == (3, B, 2, 32, 32) and rec.complete
    for b in range(B):
        visible = [i for i in range(32) if not mask[b, i]]
        hidden = [i for i in range(32) if mask[b, i]]
        for layer in range(2):  # the encoder: visible tubes only, in order
            torch.testing.assert_close(a.tensor[layer, b][:, visible][..., visible], out.attentions[layer][b],
                                       rtol=1e-5, atol=1e-6)
            assert a.tensor[layer, b][:, hidden].abs().sum() == 0 and a.tensor[layer, b][..., hidden].abs().sum() == 0
        order = visible + hidden  # the decoder: the visible tubes, then the masked ones
        torch.testing.assert_close(a.tensor[2, b][:, order][..., order], decoder[0][b], rtol=1e-5, atol=1e-6)
        assert_rows_sum_to_one(a.tensor[2, b])
    maps = vitviz.cls_maps(a, layer=0).mean(1)  # [B, frames, gh, gw]; masked tubes blank
    assert (maps.flatten(1)[mask] == 0).all() and (maps.flatten(1)[~mask] > 0).all()


# -- read, never guessed (clips that do not split into tubelets: test_capture_accounting) ------------

class _OtherVideoConfig(transformers.VideoMAEConfig):
    model_type = "other-video"  # a video model whose token order vitviz does not know


class _FramesThroughAnImageModel(nn.Module):
    """A 5-D clip folded into a batch of frames for an image ViT."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.vit = transformers.ViTModel(transformers.ViTConfig(image_size=32, patch_size=8, **TINY)).eval()

    def forward(self, x):
        return self.vit(x.flatten(0, 1)).last_hidden_state


@pytest.mark.parametrize("kind", ["unknown-video-family", "5-d-input-to-an-image-model"])
def test_other_video_models_are_refused_with_the_reason(kind):
    if kind == "unknown-video-family":
        model = transformers.VideoMAEModel(_OtherVideoConfig(image_size=32, patch_size=8, num_frames=4,
                                                             tubelet_size=2, **TINY)).eval()
    else:
        model = vitviz.wrap(_FramesThroughAnImageModel().eval(), grid=(4, 4), num_prefix=1)
    with torch.no_grad(), vitviz.capture(model) as rec:
        model(clip())
    with pytest.raises(UnplacedAttentionError, match="does not place .*no image or clip layout is guessed"):
        _ = rec.attentions
    assert rec.complete and {what for _, what, _ in rec.skipped} == {"attention over video tokens"}


def test_notebook_png_of_a_clip_shows_its_middle_temporal_position(monkeypatch):
    model = build("videomae")
    with torch.no_grad(), vitviz.capture(model) as rec:
        model(clip(batch=1))
    a = rec.attentions
    import vitviz.render.figures as figures

    seen = {}
    draw = figures.map_grid

    def spy(maps, **kw):
        seen.update(maps=maps, title=kw.get("title"))
        return draw(maps, **kw)

    monkeypatch.setattr(figures, "map_grid", spy)
    png = a._repr_png_()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert tuple(seen["maps"].shape) == (2, 2, GH, GW) and "temporal position 1 of 2" in seen["title"]
    for layer in range(2):  # sample 0, every head, temporal position 1
        torch.testing.assert_close(seen["maps"][layer], vitviz.cls_maps(a, layer=layer)[0, :, 1])


class _FramesClassifiedByAnImageModel(nn.Module):
    """A clip's frames classified one by one by an image ViT, the logits averaged."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.vit = transformers.ViTForImageClassification(
            transformers.ViTConfig(image_size=32, patch_size=8, num_labels=3, **TINY)).eval()

    def forward(self, x):
        return self.vit(x.flatten(0, 1)).logits.view(x.shape[0], x.shape[1], -1).mean(1)


@pytest.mark.parametrize("method", ["chefer", "attnlrp"])
def test_relevance_of_a_clip_through_an_image_model_is_refused(method):
    model = vitviz.wrap(_FramesClassifiedByAnImageModel().eval(), grid=(4, 4), num_prefix=1, patch_size=8)
    assert model(clip()).shape == (B, 3)  # the model itself takes the clip
    with pytest.raises(vitviz.VitvizError, match="is an image model but the input is a clip"):
        vitviz.relevance(model, clip(), method=method)


def test_timesformer_encoder_called_without_the_clip_is_refused():
    model = build("timesformer")
    with torch.no_grad():
        hidden = model.timesformer.embeddings(clip())  # [B, 1 + P*T, D]
        with vitviz.capture(model) as rec:
            model.timesformer.encoder(hidden)  # no clip seen: frames and batch unknown
    with pytest.raises(UnplacedAttentionError, match="divided time attention.* ran without a clip"):
        _ = rec.attentions
    assert rec.complete and len(rec.skipped) == 4


@pytest.mark.parametrize("kind", ["time", "space"])
@pytest.mark.parametrize("fusion", [("mean", True), ("max", False), ("min", True)])
def test_divided_product_equals_the_fusion_of_the_placed_matrices(kind, fusion):
    # the gradient streams of a divided layer get fuse_h(M ⊙ dM) computed from the per-sequence
    # tensors; it must equal the fusion of the placed probabilities times the placed gradient
    from vitviz.analyze import fuse_heads
    from vitviz.attention._divided import DividedScheme

    scheme = DividedScheme(kind, (2, 3), 4)
    sequences, length = scheme.sequences(2)
    g = torch.Generator().manual_seed(7)
    attn = torch.softmax(torch.randn(sequences, 3, length, length, generator=g), -1)
    grad = torch.randn(sequences, 3, length, length, generator=g)
    prod = scheme.place(attn) * scheme.place(grad, mode="grad")  # [B, H, N, N]
    want = fuse_heads(prod.clamp(min=0) if fusion[1] else prod, fusion[0])
    got = scheme.product(attn, grad, fusion)
    assert got.shape == (2, scheme.num_tokens, scheme.num_tokens)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    # the spatial CLS row takes part (its [0, 0] corner included); the temporal one is 1 x 0
    assert (float(want[:, 0].abs().sum()) > 0) == (kind == "space")
    if kind == "space" and fusion[0] != "min":  # (the min over heads of clamped values may be 0)
        assert float(want[:, 0, 0].abs().sum()) > 0
