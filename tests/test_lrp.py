"""AttnLRP and CP-LRP at the op level (vitviz.relevance(method="attnlrp" | "cp-lrp")).

Equivalence: CP-LRP against lxt's own implementation (in a subprocess, since lxt patches
torchvision for the whole process), AttnLRP and CP-LRP against a reference written out below
(explicit per-layer relevance, rule by rule, on 2-layer timm and transformers ViTs, in float64).
Invariants: conservation (CP-LRP, no biases), pixel sums = patch sums, batched = one by one,
the model and its autograd unchanged. Golden values: patch sums, the rules on hand-sized inputs.
"""

import os
import subprocess
import sys
import tempfile

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from helpers import tiny_hf, tiny_timm, torch_function_modes
from torch import nn

import vitviz
import vitviz.explain
from vitviz.errors import VitvizError
from vitviz.explain._lrp import patch_sums

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------------
# the reference: AttnLRP / CP-LRP written out per layer (Achtibat et al. 2024; Ali et al. 2022)
# ---------------------------------------------------------------------------------------------

def _linear_rel(x, w, b, r_out):
    """LRP-0 through ``z = x Wᵀ + b``: ``R_j = Σ_k x_j w_kj / z_k · R_k`` (the bias keeps its share)."""
    z = x @ w.T + b
    return x * ((r_out / z) @ w)


def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    sd = ((x - mu) ** 2).mean(-1, keepdim=True).add(eps).sqrt()
    return (x - mu) / sd * w + b, mu, sd


def _ln_rel(x, w, b, eps, r_out):
    """Identity rule on the normaliser: ``y = u·w + b`` (LRP-0 elementwise), ``u = M x / sd`` with
    ``M = I - 11ᵀ/D`` linear and ``sd`` a constant (LRP-0 through ``M``)."""
    y, mu, sd = _ln(x, w, b, eps)
    u = (x - mu) / sd
    r_u = u * w / y * r_out
    d = x.shape[-1]
    m = torch.eye(d, dtype=x.dtype) - 1.0 / d
    return x / sd * ((r_u / u) @ m)


def _add_rel(a, b, r_out):
    """``z = a + b``: each part in proportion to its contribution."""
    z = a + b
    return a / z * r_out, b / z * r_out


def reference_lrp(spec, x, target, *, cp):
    """Pixel relevance ``[B, H, W]`` and logits, by explicit rules layer by layer (float64)."""
    p, heads, dim = spec["patch"], spec["heads"], spec["cls"].shape[-1]
    d = dim // heads
    scale = d ** -0.5
    b = x.shape[0]
    patches = F.unfold(x, p, stride=p).transpose(1, 2)  # [B, n, 3·p·p], channel-major like conv weights
    wc = spec["conv_w"].reshape(dim, -1)
    tok = patches @ wc.T + spec["conv_b"]  # [B, n, D]
    h0 = torch.cat([spec["cls"].expand(b, 1, dim), tok], 1) + spec["pos"]  # [B, N, D]
    hs, saved = [h0], []
    h = h0
    for blk in spec["blocks"]:
        a, _, _ = _ln(h, *blk["ln1"])
        qkv = a @ blk["qkv_w"].T + blk["qkv_b"]  # [B, N, 3D]
        q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in qkv.split(dim, -1))  # [B, H, N, d]
        s = q @ k.transpose(-1, -2) * scale  # [B, H, N, N]
        att = s.softmax(-1)
        o = att @ v  # [B, H, N, d]
        om = o.transpose(1, 2).reshape(b, -1, dim)
        out = om @ blk["proj_w"].T + blk["proj_b"]
        h1 = h + out
        c, _, _ = _ln(h1, *blk["ln2"])
        f1 = c @ blk["fc1_w"].T + blk["fc1_b"]
        g = F.gelu(f1)
        f2 = g @ blk["fc2_w"].T + blk["fc2_b"]
        h2 = h1 + f2
        saved.append((h, a, q, k, v, s, att, o, om, out, h1, c, f1, g, f2))
        h = h2
        hs.append(h)
    hn, _, _ = _ln(h, *spec["norm"])
    logits = hn[:, 0] @ spec["head_w"].T + spec["head_b"]  # [B, C]

    r_logits = torch.zeros_like(logits).scatter(1, target[:, None], logits.gather(1, target[:, None]))
    r_hn = torch.zeros_like(hn)
    r_hn[:, 0] = _linear_rel(hn[:, 0], spec["head_w"], spec["head_b"], r_logits)
    r = _ln_rel(h, *spec["norm"], r_hn)
    for blk, (h_in, a, q, k, v, s, att, o, om, out, h1, c, _f1, g, f2) in zip(spec["blocks"][::-1], saved[::-1]):
        # MLP branch: h2 = h1 + f2
        r_h1, r_f2 = _add_rel(h1, f2, r)
        r_g = _linear_rel(g, blk["fc2_w"], blk["fc2_b"], r_f2)
        r_f1 = r_g  # identity rule on GELU
        r_c = _linear_rel(c, blk["fc1_w"], blk["fc1_b"], r_f1)
        r_h1 = r_h1 + _ln_rel(h1, *blk["ln2"], r_c)
        # attention branch: h1 = h + out
        r_h, r_out = _add_rel(h_in, out, r_h1)
        r_om = _linear_rel(om, blk["proj_w"], blk["proj_b"], r_out)
        r_o = r_om.reshape(b, -1, heads, d).transpose(1, 2)  # [B, H, N, d]
        ratio = r_o / o
        if cp:  # A constant: o is linear in v
            r_att = torch.zeros_like(att)
            r_v = v * (att.transpose(-1, -2) @ ratio)
            r_q = r_k = torch.zeros_like(q)
        else:  # uniform rule at A·v, AttnLRP's softmax rule, uniform rule at q·kᵀ
            r_att = 0.5 * att * (ratio @ v.transpose(-1, -2))
            r_v = 0.5 * v * (att.transpose(-1, -2) @ ratio)
            r_s = s * (r_att - att * r_att.sum(-1, keepdim=True))
            rs = r_s / s
            r_q = 0.5 * q * scale * (rs @ k)
            r_k = 0.5 * k * scale * (rs.transpose(-1, -2) @ q)
        r_qkv = torch.cat([t.transpose(1, 2).reshape(b, -1, dim) for t in (r_q, r_k, r_v)], -1)  # [B, N, 3D]
        r_a = _linear_rel(a, blk["qkv_w"], blk["qkv_b"], r_qkv)
        r = r_h + _ln_rel(h_in, *blk["ln1"], r_a)
    # embeddings: h0 = [cls, tok] + pos; the class token and the position embeddings keep theirs
    r_tok, _ = _add_rel(tok, spec["pos"][:, 1:].expand_as(tok), r[:, 1:])
    r_patches = _linear_rel(patches, wc, spec["conv_b"], r_tok)  # [B, n, 3·p·p]
    pixels = F.fold(r_patches.transpose(1, 2), x.shape[-2:], p, stride=p).sum(1)  # [B, H, W]
    return pixels, logits


def _spec_timm(m):
    blocks = [{"ln1": (b.norm1.weight, b.norm1.bias, b.norm1.eps), "qkv_w": b.attn.qkv.weight,
               "qkv_b": b.attn.qkv.bias, "proj_w": b.attn.proj.weight, "proj_b": b.attn.proj.bias,
               "ln2": (b.norm2.weight, b.norm2.bias, b.norm2.eps), "fc1_w": b.mlp.fc1.weight,
               "fc1_b": b.mlp.fc1.bias, "fc2_w": b.mlp.fc2.weight, "fc2_b": b.mlp.fc2.bias} for b in m.blocks]
    return {"patch": m.patch_embed.patch_size[0], "heads": m.blocks[0].attn.num_heads,
            "conv_w": m.patch_embed.proj.weight, "conv_b": m.patch_embed.proj.bias, "cls": m.cls_token,
            "pos": m.pos_embed, "blocks": blocks, "norm": (m.norm.weight, m.norm.bias, m.norm.eps),
            "head_w": m.head.weight, "head_b": m.head.bias}


def _spec_hf(m):
    blocks = []
    for layer in m.vit.layers:
        s = layer.attention
        blocks.append({"ln1": (layer.layernorm_before.weight, layer.layernorm_before.bias, layer.layernorm_before.eps),
                       "qkv_w": torch.cat([s.q_proj.weight, s.k_proj.weight, s.v_proj.weight]),
                       "qkv_b": torch.cat([s.q_proj.bias, s.k_proj.bias, s.v_proj.bias]),
                       "proj_w": s.o_proj.weight, "proj_b": s.o_proj.bias,
                       "ln2": (layer.layernorm_after.weight, layer.layernorm_after.bias, layer.layernorm_after.eps),
                       "fc1_w": layer.mlp.fc1.weight, "fc1_b": layer.mlp.fc1.bias,
                       "fc2_w": layer.mlp.fc2.weight, "fc2_b": layer.mlp.fc2.bias})
    e = m.vit.embeddings
    return {"patch": m.config.patch_size, "heads": m.config.num_attention_heads,
            "conv_w": e.patch_embeddings.projection.weight, "conv_b": e.patch_embeddings.projection.bias,
            "cls": e.cls_token, "pos": e.position_embeddings, "blocks": blocks,
            "norm": (m.vit.layernorm.weight, m.vit.layernorm.bias, m.vit.layernorm.eps),
            "head_w": m.classifier.weight, "head_b": m.classifier.bias}


def _randomise(m, seed=1):
    """Biases and embeddings drawn too (the libraries start them at zero), so every rule matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=p.dtype)
            norm_weight = p.dim() == 1 and name.endswith("weight")  # layer norm scales around 1
            p.copy_(1 + 0.2 * r if norm_weight else r * (0.5 if p.dim() > 1 else 0.2))
    return m


def _models():
    timm_model = _randomise(tiny_timm(real_head=True)).double()
    hf_model = _randomise(tiny_hf(real_head=True)).double()
    return [("timm", timm_model, _spec_timm), ("transformers", hf_model, _spec_hf)]


@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("lib", ["timm", "transformers"])
def test_equals_the_written_out_rules(lib, method):
    _, model, spec_of = next(t for t in _models() if t[0] == lib)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    target = torch.tensor([0, 3, 4])
    with torch.no_grad():
        ref, ref_logits = reference_lrp(spec_of(model), x, target, cp=method == "cp-lrp")
    logits = model(x)
    logits = logits if isinstance(logits, torch.Tensor) else logits.logits
    torch.testing.assert_close(ref_logits, logits.detach(), rtol=1e-10, atol=1e-10)  # the reference is this model
    got = vitviz.relevance(model, x, target=target, method=method, pixels=True)  # [B, H, W]
    assert got.shape == (3, 32, 32)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    # the rules matter: the plain gradient × input is something else
    xg = x.clone().requires_grad_(True)
    out = model(xg)
    out = out if isinstance(out, torch.Tensor) else out.logits
    (grad,) = torch.autograd.grad(out.gather(1, target[:, None]).sum(), xg)
    plain = (x * grad).sum(1)
    assert (plain - ref).abs().max() > 1e-2 * ref.abs().max()


@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp"])
def test_fused_and_eager_attention_agree(method):
    """timm's fused path (F.scaled_dot_product_attention) and its eager softmax-then-matmul path
    get the same rules."""
    model = _randomise(tiny_timm(real_head=True))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    fused = vitviz.relevance(model, x, method=method, pixels=True)
    for blk in model.blocks:
        blk.attn.fused_attn = False
    eager = vitviz.relevance(model, x, method=method, pixels=True)
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-5 * float(eager.abs().max()))


# ---------------------------------------------------------------------------------------------
# CP-LRP equals lxt (torchvision ViT, lxt's own rule set), in a subprocess
# ---------------------------------------------------------------------------------------------

def _tiny_torchvision():
    torch.manual_seed(0)
    cfg = dict(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=5)
    model = torchvision.models.VisionTransformer(**cfg).eval()
    _randomise(model, seed=4)  # torchvision starts its head at zero: every logit would be 0
    return cfg, model


def test_cp_lrp_equals_lxt():
    # the reference must be there: a skip would hide the equality this test stands for
    import importlib.util

    assert importlib.util.find_spec("lxt") is not None, \
        "lxt is missing: `make install` installs it (pip install --no-deps lxt==2.1)"
    cfg, model = _tiny_torchvision()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    target = torch.tensor([1, 3])
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.pt"), os.path.join(tmp, "out.pt")
        torch.save({"cfg": cfg, "state": model.state_dict(), "x": x, "target": target}, src)
        run = subprocess.run([sys.executable, os.path.join(HERE, "_lxt_reference.py"), src, dst],
                             capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert run.returncode == 0, run.stderr[-3000:]
        ref = torch.load(dst, weights_only=True)
    torch.testing.assert_close(ref["logits"], model(x).detach(), rtol=1e-5, atol=1e-5)
    got = vitviz.relevance(model, x, target=target, method="cp-lrp", pixels=True)
    scale = float(ref["pixels"].abs().max())
    assert scale > 0
    torch.testing.assert_close(got, ref["pixels"], rtol=1e-4, atol=1e-5 * scale)
    # AttnLRP (relevance through the softmax too) is not what lxt's CP rule set computes
    other = vitviz.relevance(model, x, target=target, method="attnlrp", pixels=True)
    assert (other - ref["pixels"]).abs().max() > 1e-3 * scale


# ---------------------------------------------------------------------------------------------
# invariants
# ---------------------------------------------------------------------------------------------

def test_cp_lrp_conserves_the_logit_without_biases():
    """No biases, class token or position embeddings: every rule of CP-LRP is conservative, so the
    pixel relevance sums to the explained logit (Ali et al. 2022)."""
    model = _randomise(tiny_timm(real_head=True)).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name in ("cls_token", "pos_embed"):
                p.zero_()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    target = torch.tensor([2, 0])
    px = vitviz.relevance(model, x, target=target, method="cp-lrp", pixels=True)
    logit = model(x).gather(1, target[:, None]).squeeze(1).detach()
    torch.testing.assert_close(px.double().sum((1, 2)), logit, rtol=1e-6, atol=1e-9)
    # AttnLRP's softmax rule is not conservative: its sum differs
    a = vitviz.relevance(model, x, target=target, method="attnlrp", pixels=True)
    assert (a.double().sum((1, 2)) - logit).abs().max() > 1e-6


@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp"])
def test_patch_map_sums_pixels_and_batched_equals_one_by_one(method):
    model = _randomise(tiny_timm(real_head=True))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    px = vitviz.relevance(model, x, method=method, pixels=True, target=[0, 1, 2])  # [B, H, W]
    maps = vitviz.relevance(model, x, method=method, target=[0, 1, 2])  # [B, gh, gw]
    assert maps.shape == (3, 4, 4) and maps.dtype == torch.float32
    torch.testing.assert_close(maps, px.reshape(3, 4, 8, 4, 8).sum((2, 4)), rtol=1e-5, atol=1e-6)
    one = torch.cat([vitviz.relevance(model, x[i:i + 1], method=method, pixels=True, target=i) for i in range(3)])
    torch.testing.assert_close(px, one, rtol=1e-5, atol=1e-6 * float(px.abs().max()))


def test_patch_sums_golden():
    px = torch.arange(16.0).reshape(1, 4, 4)
    assert patch_sums(px, (2, 2)).tolist() == [[[0 + 1 + 4 + 5, 2 + 3 + 6 + 7], [8 + 9 + 12 + 13, 10 + 11 + 14 + 15]]]
    # a grid that does not divide the image: each pixel row/column in exactly one cell, sums kept
    odd = patch_sums(torch.ones(1, 5, 5), (2, 2))
    assert odd.tolist() == [[[9.0, 6.0], [6.0, 4.0]]]


def test_identity_and_uniform_rules_on_a_hand_sized_attention():
    """One attention step by hand: out = softmax(q kᵀ) v with q, k, v from x: x ⊙ grad equals the
    hand-written rule (uniform at q·kᵀ and A·v, the softmax rule), and GELU passes relevance unchanged."""
    from vitviz.explain._lrp import LRPRules

    x = torch.tensor([[[1.0, -0.5], [0.25, 2.0]]], dtype=torch.float64, requires_grad=True)  # [1, 2, 2]
    rules = LRPRules(cp=False, gamma=None)
    with rules:
        s = x @ x.transpose(-1, -2)  # q = k = x (a product of two activations)
        a = s.softmax(-1)
        out = F.gelu(a @ x)  # A·v, then GELU
        score = out.sum()
    rules.check()
    (g,) = torch.autograd.grad(score, x)
    with torch.no_grad():
        xv = x.detach()
        s_ = xv @ xv.transpose(-1, -2)
        a_ = s_.softmax(-1)
        o_ = a_ @ xv
        r_o = F.gelu(o_)  # identity rule: R at A·v's output = GELU's output
        ratio = r_o / o_
        r_a = 0.5 * a_ * (ratio @ xv.transpose(-1, -2))
        r_v = 0.5 * xv * (a_.transpose(-1, -2) @ ratio)
        r_s = s_ * (r_a - a_ * r_a.sum(-1, keepdim=True))
        rs = r_s / s_
        r_q = 0.5 * xv * (rs @ xv)
        r_k = 0.5 * xv * (rs.transpose(-1, -2) @ xv)
        expected = r_q + r_k + r_v
    torch.testing.assert_close(x.detach() * g, expected, rtol=1e-10, atol=1e-12)


def test_products_written_with_bmm_baddbmm_einsum_get_the_same_rules():
    from vitviz.explain._lrp import LRPRules

    x0 = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(17), dtype=torch.float64)
    forms = {
        "matmul": lambda x: (x @ x.transpose(1, 2)).softmax(-1) @ x,
        "bmm": lambda x: torch.bmm(torch.bmm(x, x.transpose(1, 2)).softmax(-1), x),
        "baddbmm": lambda x: torch.bmm(torch.baddbmm(torch.zeros(2, 3, 3, dtype=x.dtype), x,
                                                     x.transpose(1, 2)).softmax(-1), x),
        "einsum": lambda x: torch.einsum("bij,bjd->bid", torch.einsum("bid,bjd->bij", x, x).softmax(-1), x),
    }
    got = {}
    for name, f in forms.items():
        x = x0.clone().requires_grad_(True)
        rules = LRPRules(cp=False, gamma=None)
        with rules:
            score = f(x).sum()
        rules.check()
        got[name] = torch.autograd.grad(score, x)[0]
    for name in forms:
        torch.testing.assert_close(got[name], got["matmul"], rtol=1e-10, atol=1e-12, msg=name)
    x = x0.clone().requires_grad_(True)
    plain = torch.autograd.grad(forms["matmul"](x).sum(), x)[0]
    assert (plain - got["matmul"]).abs().max() > 1e-3  # the rules changed the gradient


def test_gamma_rule_on_a_linear_layer_by_hand():
    """The γ-rule (Montavon et al. 2019): R_j = Σ_k a_j (w_jk + γw⁺_jk) / z_γ,k · R_k, R_k = z_k g_k."""
    from vitviz.explain._lrp import LRPRules

    w = nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64))
    bias = nn.Parameter(torch.tensor([0.25, -0.5], dtype=torch.float64))
    x = torch.tensor([[2.0, 1.0]], dtype=torch.float64, requires_grad=True)
    with LRPRules(cp=False, gamma=0.5):
        z = F.linear(x, w, bias)  # [1, 2]: [0.25, 3.5]
        score = (z * torch.tensor([1.0, 2.0], dtype=torch.float64)).sum()  # R_k = z_k g_k
    (g,) = torch.autograd.grad(score, x)
    assert w.grad is None  # no parameter gradient
    wg = torch.tensor([[1.5, -2.0], [0.75, 4.5]], dtype=torch.float64)
    bg = torch.tensor([0.375, -0.5], dtype=torch.float64)
    zg = torch.tensor([2.0, 1.0], dtype=torch.float64) @ wg.T + bg  # [1.375, 5.5]
    r_out = torch.tensor([0.25 * 1.0, 3.5 * 2.0], dtype=torch.float64)
    expected = torch.tensor([2.0, 1.0], dtype=torch.float64) * ((r_out / zg) @ wg)
    torch.testing.assert_close((x * g).detach()[0], expected, rtol=1e-5, atol=1e-8)


def test_model_output_and_autograd_unchanged():
    model = _randomise(tiny_timm(real_head=True))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))

    def grads():
        model.zero_grad(set_to_none=True)
        out = model(x)
        out[:, 1].sum().backward()
        g = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return out.detach(), g

    out0, g0 = grads()
    res = vitviz.explain.relevance_pass(model, x, method="attnlrp", gamma=0.25)
    vitviz.relevance(model, x, method="cp-lrp")
    assert all(p.grad is None for p in model.parameters())  # no parameter gradient was computed
    torch.testing.assert_close(res.logits, out0, rtol=0, atol=0)  # the forward value under the rules
    out1, g1 = grads()
    torch.testing.assert_close(out1, out0, rtol=0, atol=0)
    assert g1.keys() == g0.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=0, atol=0, msg=n)
    assert torch_function_modes() == 0


def test_bundled_shapes_vit_and_gamma():
    m = vitviz.load_model("shapes-vit")
    x = torch.randn(2, 3, *m.input_size, generator=torch.Generator().manual_seed(9))
    for method in ("attnlrp", "cp-lrp"):
        maps = vitviz.relevance(m, x, method=method)
        assert maps.shape == (2, *m.layout.grid) and torch.isfinite(maps).all()
    g = vitviz.relevance(m, x, method="attnlrp", gamma=0.25)
    assert not torch.allclose(g, vitviz.relevance(m, x, method="attnlrp"))


# ---------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------

class _SoftmaxNotMultiplied(nn.Module):
    """A 'ViT' whose attention weights are summed, not multiplied with values."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        t = self.proj(x).flatten(2).transpose(1, 2)  # [B, N, 8]
        a = (t @ t.transpose(1, 2)).softmax(-1)  # [B, N, N]
        return self.head(t * a.sum(-1, keepdim=True)).mean(1)


class _Cnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.proj(x).mean((2, 3)))


def test_refusals():
    x = torch.randn(1, 3, 32, 32)
    m = vitviz.wrap(_SoftmaxNotMultiplied(), grid=(4, 4), num_prefix=0)
    with pytest.raises(VitvizError, match="without its rule"):
        vitviz.relevance(m, x, method="attnlrp")
    with pytest.raises(VitvizError, match="no attention op"):
        vitviz.relevance(vitviz.wrap(_Cnn(), grid=(4, 4), num_prefix=0), x, method="cp-lrp")
    model = tiny_timm(real_head=True)
    with pytest.raises(VitvizError, match="gamma"):
        vitviz.relevance(model, x, method="attnlrp", gamma=-1)
    with pytest.raises(ValueError, match="pixels"):
        vitviz.relevance(model, x, method="chefer", pixels=True)
    assert torch_function_modes() == 0


def test_multihead_attention_options_refused():
    mha = nn.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=True)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(3, 8, 8, 8)
            self.attn = mha
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            t = self.proj(x).flatten(2).transpose(1, 2)
            return self.head(self.attn(t, t, t)[0].mean(1))

    with pytest.raises(VitvizError, match="bias_k"):
        vitviz.relevance(vitviz.wrap(M(), grid=(4, 4), num_prefix=0), torch.randn(1, 3, 32, 32), method="attnlrp")


def test_timm_other_vits_run():
    """Register tokens and no class token (timm) run under the rules."""
    for kw in ({"reg_tokens": 2}, {"class_token": False, "global_pool": "avg"}):
        model = tiny_timm(real_head=True, **kw)
        maps = vitviz.relevance(model, torch.randn(2, 3, 32, 32), method="attnlrp")
        assert maps.shape == (2, 4, 4) and torch.isfinite(maps).all()
    assert timm is not None


# ---------------------------------------------------------------------------------------------
# text maps (CLIP, SigLIP)
# ---------------------------------------------------------------------------------------------

def _tiny_contrastive(kind):
    import transformers

    torch.manual_seed(0)
    text = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=8)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4)
    if kind == "clip":
        text.update(bos_token_id=0, eos_token_id=1, pad_token_id=2)
        model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                               projection_dim=16)).eval()
    else:
        model = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision)).eval()
        with torch.no_grad():
            model.logit_bias.fill_(-0.7)
    return _randomise(model, seed=11).double()


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_text_maps_cp_lrp_conserve_the_image_text_logit(kind):
    """Vision tower without biases, class or position embeddings: CP-LRP's map of each text sums to
    its logit (minus SigLIP's logit bias); the embedding's L2 normalisation gets the identity rule.
    CLIP's QuickGELU (x·σ(1.702x)) is a product of two activations (uniform rule) and a sigmoid
    (identity rule); SigLIP pools with nn.MultiheadAttention (written out under the rules)."""
    model = _tiny_contrastive(kind)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("vision_model") and (name.endswith("bias") or "embedding" in name
                                                    and "patch" not in name):
                p.zero_()
    ids = torch.tensor([[0, 5, 6, 7, 1, 2, 2, 2], [0, 9, 10, 1, 2, 2, 2, 2]])
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    res = vitviz.explain.text_maps(model, x, ids, method="cp-lrp")
    assert res.maps.shape == (2, 4, 4)
    bias = float(model.logit_bias.detach()) if kind == "siglip" else 0.0
    torch.testing.assert_close(res.maps.double().sum((1, 2)), res.scores.double() - bias, rtol=1e-5, atol=1e-6)
    chefer = vitviz.explain.text_maps(model, x, ids, method="chefer")
    torch.testing.assert_close(res.scores, chefer.scores)  # the same logits
    lrp = vitviz.explain.text_maps(model, x, ids, method="attnlrp").maps
    assert torch.isfinite(lrp).all() and not torch.allclose(lrp[0], lrp[1])
    with pytest.raises(VitvizError, match="start_layer"):
        vitviz.explain_text(model, x, ids, method="attnlrp", start_layer=1)


# ---------------------------------------------------------------------------------------------
# the registry, the CLI, the sanity checks
# ---------------------------------------------------------------------------------------------

def test_registered_methods_and_cli(tmp_path, capsys):
    from vitviz.cli import main
    from vitviz.explain import compute_maps, get_method

    m = vitviz.load_model("shapes-vit")
    x = torch.randn(2, 3, *m.input_size, generator=torch.Generator().manual_seed(13))
    for name in ("attnlrp", "cp-lrp"):
        method = get_method(name)
        assert method.needs == "model" and method.class_specific and method.single_map
        got = compute_maps(m, x, name, target=[1, 2])
        torch.testing.assert_close(got, vitviz.relevance(m, x, method=name, target=[1, 2]))
        predicted = compute_maps(m, x, name, gamma=0.25)  # no target: each image's predicted class
        t = m(x).argmax(-1)
        torch.testing.assert_close(predicted, vitviz.relevance(m, x, method=name, target=t, gamma=0.25))
    image = os.path.join(HERE, "..", "vitviz", "assets", "shapes-triangle.png")
    assert main(["relevance", image, "--model", "shapes-vit", "--method", "attnlrp", "--out", str(tmp_path)]) == 0
    saved = torch.from_numpy(__import__("numpy").load(tmp_path / "shapes-triangle_attnlrp.npy"))
    torch.testing.assert_close(saved.float(), vitviz.relevance(m, image, method="attnlrp")[0])
    assert main(["relevance", image, "--model", "shapes-vit", "--method", "cp-lrp", "--start-layer", "1",
                 "--out", str(tmp_path)]) == 2
    assert "--start-layer" in capsys.readouterr().err
    # --gamma reaches the rules (a different map from the plain gradient, equal to Python's gamma=)
    assert main(["relevance", image, "--model", "shapes-vit", "--method", "cp-lrp", "--gamma", "0.25",
                 "--name-with-model", "--out", str(tmp_path)]) == 0
    gamma_map = torch.from_numpy(__import__("numpy").load(tmp_path / "shapes-triangle_shapes-vit_cp-lrp.npy"))
    torch.testing.assert_close(gamma_map.float(), vitviz.relevance(m, image, method="cp-lrp", gamma=0.25)[0])
    assert not torch.allclose(gamma_map.float(), vitviz.relevance(m, image, method="cp-lrp")[0])
    for bad in (["--method", "chefer", "--gamma", "0.25"], ["--method", "attnlrp", "--gamma", "-1"]):
        assert main(["relevance", image, "--model", "shapes-vit", *bad, "--out", str(tmp_path)]) == 2
        assert "--gamma" in capsys.readouterr().err


def test_randomization_fixes_the_explained_class(monkeypatch):
    """The sanity check explains the trained model's predicted class at every cascade step, as for
    chefer's relevance (the LRP methods run the model themselves, registered explains_class=True)."""
    import vitviz.explain._relevance as rel
    from vitviz.evaluate.sanity import randomization

    m = vitviz.load_model("shapes-vit")
    x = torch.randn(2, 3, *m.input_size, generator=torch.Generator().manual_seed(14))
    trained = m(x).argmax(-1)
    seen, real = [], rel.relevance

    def spy(*args, target=None, **kw):
        seen.append(None if target is None else torch.as_tensor(target).clone())
        return real(*args, target=target, **kw)

    monkeypatch.setattr(rel, "relevance", spy)
    randomization(m, x, "attnlrp", num_steps=2)
    assert len(seen) == 3  # the trained map, then two cascade steps
    for t in seen:
        assert t is not None and t.tolist() == trained.tolist()


# ---------------------------------------------------------------------------------------------
# captions
# ---------------------------------------------------------------------------------------------

def test_caption_lrp_per_word_equals_one_word_at_a_time():
    """caption(..., relevance="attnlrp"): T copies in one batch give each word the relevance it gets
    alone (one forward and backward pass per word under the rules), on the patch tokens only."""
    from helpers import build_ved

    from vitviz.explain._lrp import lrp_gradient

    model = build_ved()
    _randomise(model, seed=15)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(16))
    cap = vitviz.caption(model, x, max_new_tokens=4, relevance="attnlrp")
    num = len(cap.token_ids)
    assert num >= 2
    rel = cap.relevance.tensor[0, 0, 0]  # [T, Ni]
    assert rel.shape == (num, 17) and (rel[:, 0] == 0).all() and rel[:, 1:].abs().sum() > 0
    ids = cap.ids[None, :cap.prompt_len + num - 1]
    for t in range(num):
        def score(out, t=t):
            return out.logits[0, cap.prompt_len - 1 + t, cap.token_ids[t]]

        grad, _ = lrp_gradient(lambda px: model(pixel_values=px, decoder_input_ids=ids), x, score, method="attnlrp")
        alone = (x * grad).sum(1)[0].reshape(4, 8, 4, 8).sum((1, 3)).flatten()  # [16]
        torch.testing.assert_close(rel[t, 1:], alone, rtol=1e-4, atol=1e-6 * float(alone.abs().max()))
    grids = vitviz.word_grids(cap, method="relevance")
    assert grids.shape[-2:] == (4, 4)
    with pytest.raises(VitvizError, match="relevance must be"):
        vitviz.caption(model, x, max_new_tokens=2, relevance="lrp")


def test_inplace_activations_get_the_identity_rule():
    """nn.SiLU(inplace=True) / nn.ELU(inplace=True): the rule runs out of place, with the same
    result as the out-of-place modules."""
    from vitviz.explain._lrp import LRPRules

    x0 = torch.randn(3, 5, generator=torch.Generator().manual_seed(18), dtype=torch.float64)
    for inplace, plain in ((nn.SiLU(inplace=True), nn.SiLU()), (nn.ELU(inplace=True), nn.ELU())):
        grads = []
        for act in (inplace, plain):
            x = x0.clone().requires_grad_(True)
            with LRPRules(cp=False, gamma=None):
                y = act(x * 1.0)
                score = y.sum()
            grads.append(torch.autograd.grad(score, x)[0])
            torch.testing.assert_close(y.detach(), plain(x0))
        torch.testing.assert_close(grads[0], grads[1])
        torch.testing.assert_close(x0 * grads[1], plain(x0))  # identity rule: x·grad = f(x)
