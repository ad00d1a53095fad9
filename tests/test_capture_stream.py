"""Streaming capture: keep='none' / keep=[...] with streams gives the stored path's maps."""

import pytest
import timm
import torch

import vitviz
from vitviz.analyze import RelevanceStream, RolloutStream, cls_maps, relevance_map
from vitviz.errors import CaptureError


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, depth=3, img_size=64,
                             num_classes=4).eval()


def test_streamed_rollout_equals_stored(model):
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad(), vitviz.capture(model) as rec:
        ref = model(x)
    stored = vitviz.rollout(rec.attentions, discard_ratio=0.9)
    stream = RolloutStream(discard_ratio=0.9)
    with torch.no_grad(), vitviz.capture(model, keep="none", streams={"r": stream}) as rec2:
        out = model(x)
    assert torch.equal(out, ref)
    # the stream got each layer's head mean computed a few heads at a time (summed in another
    # order than the stored tensor's mean): equal to float rounding
    torch.testing.assert_close(rec2.stream("r"), stored, rtol=1e-5, atol=1e-7)
    assert all(not p.records for p in rec2.passes)  # nothing stored
    with pytest.raises(CaptureError, match="no layer of it was kept"):
        _ = rec2.attentions


def test_keep_selected_layers(model):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), vitviz.capture(model) as rec:
        model(x)
    with torch.no_grad(), vitviz.capture(model, keep=[-1, 0]) as rec2:
        model(x)
    kept = rec2.attentions
    assert kept.num_layers == 2
    assert torch.equal(kept.tensor[0], rec.attentions.tensor[0])  # the first layer: same input
    # the layers in between ran their fused attention (not kept), whose float rounding differs
    # from the eager path by ~1e-8 here: the last layer's input differs at that level
    assert torch.allclose(kept.tensor[1], rec.attentions.tensor[-1], atol=1e-6)
    assert torch.allclose(cls_maps(kept, layer=-1), cls_maps(rec.attentions, layer=-1), atol=1e-6)


def _computed_during_forward(model, monkeypatch, **capture_kwargs):
    """(fused_attn of each block as it ran, how many layers' probabilities the capture computed)."""
    import vitviz.attention._mode as ops

    seen, computed = {}, []
    real = ops.sdpa_probabilities
    monkeypatch.setattr(ops, "sdpa_probabilities", lambda *a, **k: computed.append(1) or real(*a, **k))
    hooks = [blk.attn.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, m.fused_attn))
             for i, blk in enumerate(model.blocks)]
    try:
        with torch.no_grad(), vitviz.capture(model, **capture_kwargs) as rec:
            model(torch.randn(1, 3, 64, 64))
    finally:
        for h in hooks:
            h.remove()
        monkeypatch.undo()
    return seen, len(computed), rec


def test_layers_not_kept_stay_on_the_fused_kernel(model, monkeypatch):
    own = model.blocks[0].attn.fused_attn  # the model's own setting (timm's default: fused)
    assert own
    seen, computed, rec = _computed_during_forward(model, monkeypatch, keep=[1])
    assert seen == {0: own, 1: own, 2: own}  # nothing switched
    assert computed == 1  # only the kept layer's probabilities; the others ran the fused kernel
    assert rec.attentions.num_layers == 1
    assert torch.allclose(rec.attentions.tensor.sum(-1), torch.tensor(1.0))
    _, computed, _ = _computed_during_forward(model, monkeypatch, keep=[1], streams={"r": RolloutStream()})
    assert computed == 3  # a stream needs every layer
    _, computed, _ = _computed_during_forward(model, monkeypatch)
    assert computed == 3


class _Reader:
    """A stream that reads only ``layers`` and notes what it was given."""

    def __init__(self, layers):
        self.layers, self.got = layers, []

    def reset(self):
        self.got = []

    def update(self, attn, *, layer, num_layers, layout):
        self.got.append((layer, tuple(attn.shape)))

    def result(self, layout):
        return self.got


def test_a_stream_that_names_its_layers_leaves_the_others_on_the_fused_kernel(model, monkeypatch):
    seen, computed, rec = _computed_during_forward(model, monkeypatch, keep="none", streams={"s": _Reader([1])})
    assert seen == {0: True, 1: True, 2: True}  # nothing switched
    assert computed == 1  # only layer 1's probabilities; layers 0 and 2 ran the fused kernel
    assert rec.stream("s") == [(1, (1, 3, 18, 18))]  # called for its layer only, with every head
    _, computed, rec = _computed_during_forward(model, monkeypatch, keep="none", streams={"s": _Reader([-1])})
    assert computed == 1 and [layer for layer, _ in rec.stream("s")] == [2]  # -1: the last, the depth being known


def test_rollout_with_the_last_layer_s_cls_maps_fuses_the_heads_of_every_other_layer(model, monkeypatch):
    import vitviz.attention._mode as ops
    from vitviz.explain import LayerStream

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), vitviz.capture(model) as ref:
        model(x)
    fused, full = [], []
    real_fused, real_full = ops.sdpa_fused_heads, ops.sdpa_probabilities
    monkeypatch.setattr(ops, "sdpa_fused_heads", lambda *a, **k: fused.append(1) or real_fused(*a, **k))
    streams = {"r": RolloutStream(), "c": LayerStream(-1), "s": _Reader([-1])}
    with torch.no_grad(), vitviz.capture(model, keep="none", streams=streams) as rec:
        monkeypatch.setattr(ops, "sdpa_probabilities", lambda *a, **k: full.append(len(fused)) or real_full(*a, **k))
        model(x)
    monkeypatch.undo()
    assert len(fused) == 2  # layers 0 and 1: the head mean, a few heads at a time
    assert full[-1] == 2  # the last layer's per-head probabilities, computed after the two fused layers
    assert rec.stream("s") == [(2, (2, 3, 18, 18))]
    torch.testing.assert_close(rec.stream("r"), vitviz.rollout(ref.attentions), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(rec.stream("c"), cls_maps(ref.attentions, layer=-1), rtol=1e-5, atol=1e-6)


def test_selected_layers_are_counted_in_the_order_they_run(model):
    class Reversed(torch.nn.Module):  # runs the blocks last to first
        def __init__(self, vit):
            super().__init__()
            self.vit = vit

        def forward(self, x):
            t = self.vit.patch_embed(x)
            t = torch.cat([self.vit.cls_token.expand(len(t), -1, -1), self.vit.dist_token.expand(len(t), -1, -1),
                           t], 1) + self.vit.pos_embed
            for blk in reversed(self.vit.blocks):
                t = blk(t)
            return t

    wrapped = vitviz.wrap(Reversed(model), grid=(4, 4), num_prefix=2)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), vitviz.capture(wrapped, keep=[0]) as first:
        wrapped(x)
    with torch.no_grad(), vitviz.capture(wrapped, keep="all") as rec:
        wrapped(x)
    assert rec.attentions.num_layers == 3
    # layer 0 is the first to run (blocks[2]), whatever the module order
    assert torch.equal(first.attentions.tensor[0], rec.attentions.tensor[0])


def test_streams_reset_per_pass(model):
    stream = RolloutStream()
    a, b = torch.randn(1, 3, 64, 64), torch.randn(2, 3, 64, 64)
    with torch.no_grad(), vitviz.capture(model, keep="none", streams={"r": stream}) as rec:
        model(a)
        model(b)
    with torch.no_grad(), vitviz.capture(model) as ref:
        model(b)
    torch.testing.assert_close(rec.stream("r"), vitviz.rollout(ref.attentions), rtol=1e-5, atol=1e-7)


def test_bad_keep_and_grad_with_keep():
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32).eval()
    with pytest.raises(ValueError, match="keep"):
        with vitviz.capture(m, keep="some"):
            pass
    with pytest.raises(CaptureError, match="keep='all'"):
        with vitviz.capture(m, grad=True, keep="none"):  # without a gradient stream
            pass


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.05), (torch.float16, 0.005)])
def test_half_precision_models_give_float32_maps_close_to_float32(dtype, tol):
    """Stated tolerance: max |map - map_fp32| <= tol * max(map_fp32) (bf16 5%, fp16 0.5%),
    with discard_ratio 0.9, whose top-k is the most precision-sensitive step."""
    import copy

    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=4, img_size=64).eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad(), vitviz.capture(m) as rec:
        m(x)
    ref = vitviz.rollout(rec.attentions, discard_ratio=0.9)
    half = copy.deepcopy(m).to(dtype)
    stream = RolloutStream(discard_ratio=0.9)
    with torch.no_grad(), vitviz.capture(half, keep="none", streams={"r": stream}) as rec2:
        half(x.to(dtype))
    out = rec2.stream("r")
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() <= tol * ref.abs().max()


# -- gradient streams: relevance computed in the backward pass ------------------------------------

def _relevance_both_ways(m, x, target, stream, **kw):
    """(streamed map, stored-path map, recording of the streamed run)."""
    with vitviz.capture(m, grad=True) as rec:
        m(x).gather(1, target[:, None]).sum().backward()
    stored = relevance_map(rec.attentions, rec.attention_grads, method=stream.method, **kw)
    with vitviz.capture(m, grad=True, keep="none", streams={"rel": stream}) as rec2:
        logits = m(x)
        torch.autograd.grad(logits.gather(1, target[:, None]).sum(), rec2.grad_inputs())
    return rec2.stream("rel"), stored, rec2


@pytest.mark.parametrize("method,kw", [
    ("chefer", {}), ("chefer", {"start_layer": -2}),
    ("grad_rollout", {"discard_ratio": 0.5}), ("grad_rollout", {"head_fusion": "max", "start_layer": 1}),
])
def test_streamed_relevance_equals_stored(model, method, kw):
    # distilled model: two prefix tokens; batch of 3 with different targets
    x, target = torch.randn(3, 3, 64, 64), torch.tensor([0, 3, 1])
    streamed, stored, rec = _relevance_both_ways(model, x, target, RelevanceStream(method, **kw), **kw)
    assert streamed.shape == stored.shape == (3, 4, 4)
    assert torch.allclose(streamed, stored, rtol=1e-5, atol=1e-7)
    assert all(not p.records and not p.grads for p in rec.passes)  # nothing per layer was kept
    with pytest.raises(CaptureError, match="no layer of it was kept"):
        _ = rec.attention_grads


def test_streamed_relevance_without_cls_token():
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=3, img_size=32, num_classes=4,
                          class_token=False, global_pool="avg").eval()
    x, target = torch.randn(2, 3, 32, 32), torch.tensor([2, 1])
    for method in ("chefer", "grad_rollout"):
        streamed, stored, _ = _relevance_both_ways(m, x, target, RelevanceStream(method))
        assert torch.allclose(streamed, stored, rtol=1e-5, atol=1e-7)


def test_relevance_stream_errors(model):
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(CaptureError, match="grad=True"):
        with vitviz.capture(model, streams={"rel": RelevanceStream()}):
            pass
    with pytest.raises(ValueError, match="grad_rollout"):
        RelevanceStream("chefer", discard_ratio=0.9)
    with vitviz.capture(model, grad=True, keep="none", streams={"rel": RelevanceStream()}):
        out = model(x)[0, 1]
        out.backward(retain_graph=True)
        with pytest.raises(CaptureError, match="second gradient"):
            out.backward()


def test_a_stream_under_autograd_gives_the_no_grad_maps_and_a_differentiable_output():
    # streams that fuse heads compute in place (out=), which autograd refuses: with gradients on
    # (no torch.no_grad, as a user writes it) the capture takes the differentiable path instead
    m = vitviz.load_model("shapes-vit")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with vitviz.capture(m, keep="none", streams={"r": RolloutStream()}) as rec:
        out = m(x)
    with torch.no_grad(), vitviz.capture(m, keep="none", streams={"r": RolloutStream()}) as rec0:
        out0 = m(x)
    assert out.requires_grad
    torch.testing.assert_close(rec.stream("r"), rec0.stream("r"), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.detach(), out0, atol=1e-5, rtol=0)
    out.sum().backward()  # the graph is whole
    assert all(p.grad is not None for p in m.module.parameters() if p.requires_grad)
