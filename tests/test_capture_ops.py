"""Attention read at the op: SDPA by its definition, softmax multiplied with values in every
style people write (einsum, torch.softmax + @, classes whose names say nothing), gradients,
keep=[layers] on the fused kernel, nesting, threads, and what the op level cannot see.

Sources of truth: probabilities computed here from each module's own q and k (caught at the
module's input), torch's own SDPA output (A @ v must equal it), autograd through an explicit
softmax twin, and hand-computed values on 2x2 inputs.
"""

import math
import threading

import pytest
import torch
import torch.nn.functional as F
from helpers import hook_state, torch_function_modes
from torch import nn

import vitviz
from vitviz.attention import sdpa_probabilities
from vitviz.errors import CaptureError

ATOL = 1e-6


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------------------------
# SDPA's probabilities, by its definition
# --------------------------------------------------------------------------------------------

def test_sdpa_probabilities_hand_computed():
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # [1, L=2, d=2]
    k = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # [1, S=2, d=2]
    # logits = q k^T / sqrt(2) = [[1, 0], [0, 2]] / sqrt(2)
    s = 1 / math.sqrt(2)
    e = math.exp
    golden = torch.tensor([[[e(s) / (e(s) + 1), 1 / (e(s) + 1)],
                            [1 / (1 + e(2 * s)), e(2 * s) / (1 + e(2 * s))]]])
    torch.testing.assert_close(sdpa_probabilities(q, k), golden, atol=1e-7, rtol=0)
    # causal: the first query sees only the first key
    causal = sdpa_probabilities(q, k, is_causal=True)
    torch.testing.assert_close(causal[0, 0], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(causal[0, 1], golden[0, 1], atol=1e-7, rtol=0)
    # a boolean mask keeps True; a float mask is added; scale replaces 1/sqrt(d)
    keep = torch.tensor([[False, True], [True, True]])
    torch.testing.assert_close(sdpa_probabilities(q, k, attn_mask=keep)[0, 0], torch.tensor([0.0, 1.0]))
    bias = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    got = sdpa_probabilities(q, k, attn_mask=bias, scale=0.0)  # logits = bias
    torch.testing.assert_close(got[0], torch.tensor([[0.75, 0.25], [0.5, 0.5]]), atol=1e-7, rtol=0)


@pytest.mark.parametrize("kw", [
    {}, {"is_causal": True}, {"scale": 0.3}, {"mask": "bool"}, {"mask": "float"},
    {"enable_gqa": True}, {"mask": "bool-broadcast"},
])
def test_sdpa_probabilities_times_v_equals_torch_sdpa(kw):
    kw = dict(kw)
    b, h, length, source, d = 2, 4, 5, 7, 8
    hk = 2 if kw.get("enable_gqa") else h
    q = torch.randn(b, h, length, d, dtype=torch.float64)
    k = torch.randn(b, hk, source, d, dtype=torch.float64)
    v = torch.randn(b, hk, source, 3, dtype=torch.float64)
    mask = kw.pop("mask", None)
    if mask == "bool":
        kw["attn_mask"] = torch.rand(b, h, length, source) > 0.3
        kw["attn_mask"][..., 0] = True  # no fully masked row
    elif mask == "bool-broadcast":
        kw["attn_mask"] = torch.rand(length, source) > 0.3
        kw["attn_mask"][..., 0] = True
    elif mask == "float":
        kw["attn_mask"] = torch.randn(1, h, length, source, dtype=torch.float64)
    probs = sdpa_probabilities(q, k, **kw)  # [B, H, L, S]
    assert probs.shape == (b, h, length, source)
    torch.testing.assert_close(probs.sum(-1), torch.ones(b, h, length, dtype=torch.float64))
    vv = v.repeat_interleave(h // hk, dim=1) if hk != h else v
    torch.testing.assert_close(probs @ vv, F.scaled_dot_product_attention(q, k, v, **kw), atol=1e-12, rtol=0)


# --------------------------------------------------------------------------------------------
# hand-written attention in the styles people write, with names that say nothing
# --------------------------------------------------------------------------------------------

class Qkv(nn.Module):
    """q, k, v of [B, N, D] as [B, H, N, d]; ``last_qk`` keeps the module's own q and k."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def split(self, x):
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        self.last_qk = (q.detach(), k.detach())
        return q, k, v

    def merge(self, o):  # [B, H, N, d] -> [B, N, D]
        return self.out(o.transpose(1, 2).flatten(2))

    def reference(self):
        q, k = self.last_qk
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # [B, H, N, N]


class Mixer(Qkv):
    """PyTorch 2 idiom: F.scaled_dot_product_attention, no weights anywhere."""

    def forward(self, x):
        return self.merge(F.scaled_dot_product_attention(*self.split(x)))


class MSA(Qkv):
    """einsum and Tensor.softmax."""

    def forward(self, x):
        q, k, v = self.split(x)
        dots = torch.einsum("bhid,bhjd->bhij", q, k) * q.shape[-1] ** -0.5
        return self.merge(torch.einsum("bhij,bhjd->bhid", dots.softmax(dim=-1), v))


class TokenMixer(Qkv):
    """torch.softmax, dropout, then @."""

    def __init__(self, dim, heads):
        super().__init__(dim, heads)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        q, k, v = self.split(x)
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), -1)
        return self.merge(self.drop(a) @ v)


class Block(nn.Module):
    def __init__(self, mixer, dim, heads):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mix = mixer(dim, heads)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.mix(self.n1(x))
        return x + self.ff(self.n2(x))


class TutorialViT(nn.Module):
    def __init__(self, mixer, dim=32, heads=4, depth=3, patch=4, grid=(3, 4)):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + grid[0] * grid[1], dim))
        self.body = nn.Sequential(*[Block(mixer, dim, heads) for _ in range(depth)])
        self.fc = nn.Linear(dim, 5)

    def forward(self, img):
        x = self.patch_embed(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        return self.fc(self.body(x)[:, 0])


@pytest.mark.parametrize("mixer", [Mixer, MSA, TokenMixer])
def test_hand_written_attention_is_exact_whatever_its_style(mixer):
    model = TutorialViT(mixer).eval()
    x = torch.randn(2, 3, 12, 16)
    with torch.no_grad():
        plain = model(x)
    before = hook_state(model)
    refs = []
    handles = [b.mix.register_forward_hook(lambda m, a, o: refs.append(m.reference())) for b in model.body]
    with torch.no_grad(), vitviz.capture(model) as rec:
        out = model(x)
    for h in handles:
        h.remove()
    assert hook_state(model) == before and torch_function_modes() == 0
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=0)  # the output is the model's own
    attn = rec.attentions
    assert attn.layout == vitviz.TokenLayout(1, (3, 4))
    assert attn.tensor.shape == (3, 2, 4, 13, 13)
    torch.testing.assert_close(attn.tensor, torch.stack(refs), atol=ATOL, rtol=0)
    assert [s.name for s in rec.sites] == ["body.0.mix", "body.1.mix", "body.2.mix"]
    assert vitviz.rollout(attn).shape == (2, 3, 4)


def test_a_softmax_not_multiplied_with_values_is_not_attention():
    class Gate(nn.Module):
        def forward(self, x):  # [B, N, D]: a softmax over features, used as a gate
            w = (x @ x.transpose(-1, -2)).softmax(-1)  # [B, N, N], never multiplied with values
            return x * w.sum(-1, keepdim=True)

    gate = Gate()
    # the softmax is seen and counted (a softmax over the last dimension of a 3-D tensor), but it
    # never multiplies values: the error says so, and does not blame external kernels
    with pytest.raises(CaptureError, match="ran attention in Gate, but vitviz could read none of it") as e:
        with torch.no_grad(), vitviz.capture(vitviz.wrap(gate, grid=(2, 2), num_prefix=0)):
            gate(torch.randn(1, 4, 3))
    assert "external kernel" not in str(e.value) and "multiplies the values" in str(e.value)


def test_attention_computed_outside_the_model_is_not_recorded():
    model = TutorialViT(Mixer).eval()
    q = torch.randn(1, 2, 5, 4)
    with torch.no_grad(), vitviz.capture(model) as rec:
        F.scaled_dot_product_attention(q, q, q)  # the user's own code inside the block
        model(torch.randn(1, 3, 12, 16))
    assert rec.attentions.tensor.shape[0] == 3


# --------------------------------------------------------------------------------------------
# gradients: d score / dA at SDPA equals autograd through an explicit softmax
# --------------------------------------------------------------------------------------------

def test_sdpa_gradient_equals_autograd_of_an_explicit_softmax_twin():
    model = TutorialViT(Mixer).eval()
    twin = TutorialViT(TokenMixer).eval()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 12, 16)
    with vitviz.capture(model, grad=True) as rec:
        model(x)[:, 1].sum().backward()
    probs = []
    hooks = []

    def keep(mod, args, out):  # the twin's post-softmax attention, as its own autograd sees it
        probs.append(args[0])
        args[0].retain_grad()

    hooks = [b.mix.drop.register_forward_hook(keep) for b in twin.body]
    twin(x)[:, 1].sum().backward()
    for h in hooks:
        h.remove()
    expected = torch.stack([p.grad for p in probs])  # [L, B, H, N, N]
    assert expected.abs().max() > 0
    torch.testing.assert_close(rec.attention_grads.tensor, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rec.attentions.tensor, torch.stack([p.detach() for p in probs]),
                               atol=ATOL, rtol=0)


# --------------------------------------------------------------------------------------------
# keep=[layers]: the other layers run the model's fused kernel
# --------------------------------------------------------------------------------------------

def test_layers_not_kept_run_the_fused_kernel(monkeypatch):
    import vitviz.attention._mode as ops

    computed = []
    real = ops.sdpa_probabilities
    monkeypatch.setattr(ops, "sdpa_probabilities", lambda *a, **k: computed.append(1) or real(*a, **k))
    model = TutorialViT(Mixer).eval()
    x = torch.randn(1, 3, 12, 16)
    with torch.no_grad(), vitviz.capture(model) as full:
        model(x)
    assert len(computed) == 3
    computed.clear()
    with torch.no_grad(), vitviz.capture(model, keep=[-1]) as last:
        model(x)
    # no adapter knows this model's depth before it runs: the probabilities of every layer
    # are computed and the last one kept
    assert last.attentions.tensor.shape[0] == 1
    torch.testing.assert_close(last.attentions.tensor[0], full.attentions.tensor[-1], atol=0, rtol=0)
    computed.clear()
    with torch.no_grad(), vitviz.capture(model, keep=[1]) as second:
        model(x)
    assert len(computed) == 1  # layers 0 and 2 ran the fused kernel
    # layer 0's fused output rounds differently from A @ v (~1e-8): layer 1's input differs as much
    torch.testing.assert_close(second.attentions.tensor[0], full.attentions.tensor[1], atol=1e-6, rtol=0)
    computed.clear()
    with torch.no_grad(), vitviz.capture(model, keep="none") as none:
        model(x)
    assert not computed
    with pytest.raises(CaptureError, match="no layer of it was kept"):
        _ = none.attentions


# --------------------------------------------------------------------------------------------
# streams get the layer's context
# --------------------------------------------------------------------------------------------

def test_streams_get_layer_depth_and_layout():
    import timm

    class Spy:
        def reset(self):
            self.calls = []

        def update(self, attn, *, layer, num_layers, layout):
            self.calls.append((layer, num_layers, layout, tuple(attn.shape)))

        def result(self, layout):
            return self.calls

    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=(32, 48),
                              depth=2, num_heads=2, embed_dim=16).eval()
    spy = Spy()
    with torch.no_grad(), vitviz.capture(model, keep="none", streams={"spy": spy}) as rec:
        model(torch.randn(1, 3, 32, 48))
    layout = vitviz.TokenLayout(2, (2, 3), has_cls=True)
    assert rec.stream("spy") == [(0, 2, layout, (1, 2, 8, 8)), (1, 2, layout, (1, 2, 8, 8))]
    # a model no adapter knows: the depth is not known while it runs
    spy2, plain = Spy(), TutorialViT(MSA).eval()
    with torch.no_grad(), vitviz.capture(plain, keep="none", streams={"s": spy2}):
        plain(torch.randn(1, 3, 12, 16))
    assert [(c[0], c[1]) for c in spy2.calls] == [(0, None), (1, None), (2, None)]


# --------------------------------------------------------------------------------------------
# nesting, threads, leftovers
# --------------------------------------------------------------------------------------------

def test_nested_captures_both_record_and_leave_nothing():
    model = TutorialViT(Mixer).eval()
    x = torch.randn(1, 3, 12, 16)
    before = hook_state(model)
    with torch.no_grad(), vitviz.capture(model) as outer:
        with vitviz.capture(model) as inner:
            assert torch_function_modes() == 2
            out = model(x)
        assert torch_function_modes() == 1
    assert torch_function_modes() == 0 and hook_state(model) == before
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(outer.attentions.tensor, inner.attentions.tensor, atol=0, rtol=0)
    assert len(outer.passes[-1].records) == len(inner.passes[-1].records) == 3


def test_an_exception_leaves_no_mode_or_hook():
    model = TutorialViT(MSA).eval()
    before = hook_state(model)
    with pytest.raises(RuntimeError, match="boom"):
        with vitviz.capture(model):
            model(torch.randn(1, 3, 12, 16))
            raise RuntimeError("boom")
    assert torch_function_modes() == 0 and hook_state(model) == before
    with pytest.raises(RuntimeError):  # an error inside the model's own forward
        with vitviz.capture(model):
            model(torch.randn(1, 5, 12, 16))
    assert torch_function_modes() == 0 and hook_state(model) == before


def test_another_threads_forward_is_untouched():
    model = TutorialViT(Mixer).eval()
    x = torch.randn(2, 3, 12, 16)
    with torch.no_grad():
        plain = model(x)
    inside, ran = threading.Event(), threading.Event()
    seen = {}

    def other():
        inside.wait(10)
        with torch.no_grad():
            seen["modes"] = torch_function_modes()
            seen["out"] = model(x)  # the same model, while the capture is active elsewhere
        ran.set()

    t = threading.Thread(target=other)
    t.start()
    with torch.no_grad(), vitviz.capture(model) as rec:
        inside.set()
        assert ran.wait(30)
        assert not rec.passes  # the other thread's forward is not recorded
        model(x[:1])
    t.join()
    assert seen["modes"] == 0
    torch.testing.assert_close(seen["out"], plain, atol=0, rtol=0)
    assert len(rec.passes) == 1 and rec.attentions.tensor.shape == (3, 1, 4, 13, 13)


# --------------------------------------------------------------------------------------------
# what the op level cannot see
# --------------------------------------------------------------------------------------------

def test_compiled_modules_are_refused_with_the_way_out():
    model = TutorialViT(Mixer).eval()
    compiled = torch.compile(model)  # nothing is compiled before its first call
    with pytest.raises(CaptureError, match=r"compiled with torch.compile.*_orig_mod"):
        with vitviz.capture(compiled):
            pass
    model.body[1].compile()  # nn.Module.compile() on one block
    with pytest.raises(CaptureError, match=r"body\.1 .*compiled"):
        with vitviz.capture(model):
            pass
    assert torch_function_modes() == 0


def test_gradient_streams_run_the_fused_kernel_and_get_dout_times_v(monkeypatch):
    """Relevance streamed from a fused forward (dA = dOut·vᵀ, A recomputed in the backward pass)
    equals relevance from stored probabilities and autograd's gradients."""
    import vitviz.attention._mode as ops
    from vitviz.analyze import RelevanceStream, relevance_map

    model = TutorialViT(Mixer).eval()
    x = torch.randn(3, 3, 12, 16)
    with vitviz.capture(model, grad=True) as rec:
        model(x)[:, 2].sum().backward()
    stored = relevance_map(rec.attentions, rec.attention_grads, method="chefer")
    phases, backwards = [], []
    real, real_backward = ops.sdpa_probabilities, ops.sdpa_backward
    monkeypatch.setattr(ops, "sdpa_probabilities",
                        lambda *a, **k: phases.append(torch.is_grad_enabled()) or real(*a, **k))
    monkeypatch.setattr(ops, "sdpa_backward",
                        lambda *a, **k: backwards.append(k.get("fusion")) or real_backward(*a, **k))
    stream = RelevanceStream("chefer")
    with vitviz.capture(model, grad=True, keep="none", streams={"r": stream}) as rec2:
        out = model(x)
        assert not phases and not backwards  # the forward pass ran the fused kernel only
        out[:, 2].sum().backward()
    assert not phases  # A is never computed on its own ...
    # ... but once per layer, as its gradient arrived, for the stream (only the fused
    # mean_h[(A ⊙ dA)⁺]) and the gradients of q, k, v alike: SDPA's own backward did not run
    assert backwards == [("mean", True)] * 3
    torch.testing.assert_close(rec2.stream("r"), stored, atol=1e-6, rtol=1e-5)


def test_kept_layers_are_computed_into_one_stack_without_a_copy():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=3, num_heads=2,
                              embed_dim=16).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), vitviz.capture(model) as rec:
        model(x)
    t = rec.attentions.tensor  # [L, B, H, N, N]
    assert rec.attentions.tensor.data_ptr() == t.data_ptr()  # no torch.stack copy per access
    assert [r[2].data_ptr() for r in rec.passes[-1].records] == [t[i].data_ptr() for i in range(3)]
    for b in model.blocks:  # the model's own eager softmax as the reference
        b.attn.fused_attn = False
    with torch.no_grad(), vitviz.capture(model) as eager:
        model(x)
    torch.testing.assert_close(t, eager.attentions.tensor, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kw", [{}, {"is_causal": True}, {"mask": "bool"}, {"mask": "float"}, {"enable_gqa": True}])
@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
def test_sdpa_fused_heads_equals_full_probabilities_fused(kw, fusion, monkeypatch):
    import vitviz.attention._mode as ops
    from vitviz.analyze import fuse_heads

    monkeypatch.setattr(ops, "_CHUNK_BYTES", 2 * 6 * 7 * 4)  # two heads per chunk: several chunks
    kw = dict(kw)
    b, h, length, source, d = 2, 5, 6, 7, 4
    hk = 1 if kw.get("enable_gqa") else h
    q, k, v = torch.randn(b, h, length, d), torch.randn(b, hk, source, d), torch.randn(b, hk, source, 3)
    mask = kw.pop("mask", None)
    if mask == "bool":
        kw["attn_mask"] = torch.rand(length, source) > 0.3
        kw["attn_mask"][:, 0] = True
    elif mask == "float":
        kw["attn_mask"] = torch.randn(b, 1, length, source)
    out, fused = ops.sdpa_fused_heads(q, k, v, fusion=fusion, **kw)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, **kw), atol=1e-6, rtol=1e-5)
    full = sdpa_probabilities(q, k, **kw)  # [B, H, L, S]
    torch.testing.assert_close(fused, fuse_heads(full, fusion).unsqueeze(1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fusion", ["mean", "max"])
def test_streaming_rollout_never_builds_all_heads(fusion, monkeypatch):
    import timm

    import vitviz.attention._mode as ops
    from vitviz.analyze import RolloutStream

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=3, num_heads=4,
                              embed_dim=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), vitviz.capture(model) as rec:
        plain = model(x)
    stored = vitviz.rollout(rec.attentions, head_fusion=fusion, discard_ratio=0.5)
    shapes = []
    real = ops.sdpa_probabilities
    monkeypatch.setattr(ops, "sdpa_probabilities", lambda q, *a, **k: shapes.append(q.dim()) or real(q, *a, **k))
    monkeypatch.setattr(ops, "_CHUNK_BYTES", 5 * 5 * 4)  # one head of 5 tokens at a time
    stream = RolloutStream(head_fusion=fusion, discard_ratio=0.5)
    with torch.no_grad(), vitviz.capture(model, keep="none", streams={"r": stream}) as streamed:
        out = model(x)
    assert shapes and set(shapes) == {3}  # chunks of one head: [B, H, N, N] never computed
    assert len(shapes) == 3 * 2 * 4  # layers x batch x heads
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(streamed.stream("r"), stored, rtol=1e-5, atol=1e-7)


def test_a_changed_module_tree_is_read_again():
    model = TutorialViT(Mixer, depth=2).eval()
    vm = vitviz.wrap(model)
    x = torch.randn(1, 3, 12, 16)
    with torch.no_grad(), vitviz.capture(vm) as rec:
        vm(x)
    assert [s.name for s in rec.sites] == ["body.0.mix", "body.1.mix"]
    model.body.append(Block(MSA, 32, 4))  # a third layer, of another style
    with torch.no_grad(), vitviz.capture(vm) as rec2:
        vm(x)
    assert [s.name for s in rec2.sites] == ["body.0.mix", "body.1.mix", "body.2.mix"]
    assert rec2.attentions.tensor.shape[0] == 3
