"""transformers capture: equal to transformers' own eager ``output_attentions``, model restored.

Every model is built from a tiny random config (no download). The source of truth is the
same model, deep-copied, switched to eager by transformers itself and called with
``output_attentions=True`` (which leaves transformers' hooks on the copy, never on the
model under test). Data2Vec-Vision, which transformers will not switch, is compared with
another instance built eager with the same weights, and with the softmax recomputed from the q,
k and mask of its own SDPA calls.
"""

import copy

import pytest
import torch
import transformers
from helpers import TINY_VIT, AttentionLayerCount, SdpaCalls, build_blip, build_ved, hook_state
from torch import nn
from transformers import PreTrainedModel
from transformers.configuration_utils import PreTrainedConfig
from transformers.utils.output_capturing import OutputRecorder, install_all_output_capturing_hooks

import vitviz
from vitviz import capture
from vitviz.attention._adapter import CROSS, IMAGE, TEXT, discover
from vitviz.attention._transformers import TransformersAdapter
from vitviz.models import wrap
from vitviz.types import TokenLayout

ATOL = 1e-6  # same eager kernels on the same weights: only summation-order noise


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def build(model_cls: str, config_cls: str, **extra) -> nn.Module:
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**TINY_VIT, **extra})
    return getattr(transformers, model_cls)(config).eval()


def build_clip() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        vision_config=dict(TINY_VIT),
        text_config=dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=16),
        projection_dim=16)
    return transformers.CLIPModel(cfg).eval()


def eager_reference(model: nn.Module, *args, **kwargs):
    """transformers' own attentions: a deep copy switched to eager, output_attentions=True."""
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    with torch.no_grad():
        return ref(*args, output_attentions=True, **kwargs), ref


def attn_impls(model: nn.Module) -> dict:
    """The attention implementation of every config reachable from the model, by path."""
    out = {}

    def visit(path, cfg):
        out[path] = cfg._attn_implementation
        for key in cfg.sub_configs:
            sub = getattr(cfg, key, None)
            if sub is not None:
                visit(f"{path}.{key}", sub)

    for name, m in model.named_modules():
        cfg = getattr(m, "config", None)
        if isinstance(cfg, PreTrainedConfig):
            visit(name or "<root>", cfg)
    return out


def no_transformers_hooks_flag(model: nn.Module) -> bool:
    return not any(getattr(m, "_output_capturing_hooks_installed", False) for m in model.modules())


def transformers_attention_hooks(model: nn.Module) -> dict:
    """{module name: {(key, index)}} where transformers' own walk installs attention hooks."""
    probe = copy.deepcopy(model)
    install_all_output_capturing_hooks(probe)
    out: dict = {}
    for name, m in probe.named_modules():
        for hook in m._forward_hooks.values():
            code = getattr(hook, "__code__", None)
            if code is None or code.co_name != "output_capturing_hook":
                continue
            cells = dict(zip(code.co_freevars, (c.cell_contents for c in hook.__closure__)))
            if "attentions" in cells["key"]:
                out.setdefault(name, set()).add((cells["key"], cells["index"]))
    return out


def stack(attns) -> torch.Tensor:
    return torch.stack(list(attns))  # [L, B, H, Q, K]


# ---------------------------------------------------------------------------------------------
# image encoders: equal to output_attentions, layout from the input, model restored
# ---------------------------------------------------------------------------------------------

VISION_CASES = {
    "vit": (lambda: build("ViTForImageClassification", "ViTConfig", num_labels=5),
            (32, 32), {}, TokenLayout(1, (4, 4))),
    "vit-nonsquare": (lambda: build("ViTForImageClassification", "ViTConfig", num_labels=5),
                      (32, 48), {"interpolate_pos_encoding": True}, TokenLayout(1, (4, 6))),
    "deit-teacher": (lambda: build("DeiTForImageClassificationWithTeacher", "DeiTConfig", num_labels=5),
                     (32, 32), {}, TokenLayout(2, (4, 4))),
    "dinov2": (lambda: build("Dinov2Model", "Dinov2Config"), (32, 32), {}, TokenLayout(1, (4, 4))),
    "dinov2-nonsquare": (lambda: build("Dinov2Model", "Dinov2Config"), (40, 24), {},
                         TokenLayout(1, (5, 3))),
    "dinov2-registers": (lambda: build("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig",
                                       num_register_tokens=3),
                         (32, 32), {}, TokenLayout(4, (4, 4))),
    "beit": (lambda: build("BeitModel", "BeitConfig", use_relative_position_bias=True),
             (32, 32), {}, TokenLayout(1, (4, 4))),
    "clip-vision": (lambda: build("CLIPVisionModel", "CLIPVisionConfig"), (32, 32), {},
                    TokenLayout(1, (4, 4))),
    # no CLS token; weights 10x the default init (with std 0.02 its attention is uniform to 4e-3)
    "ijepa": (lambda: build("IJepaModel", "IJepaConfig", initializer_range=0.2), (32, 32), {},
              TokenLayout(0, (4, 4))),
}


@pytest.mark.parametrize("case", list(VISION_CASES))
def test_image_encoder_equals_output_attentions(case):
    make, (h, w), kwargs, layout = VISION_CASES[case]
    model = make()
    torch.manual_seed(1)
    x = torch.randn(2, 3, h, w)  # [B, 3, H, W]
    impls_before = attn_impls(model)
    hooks_before = hook_state(model)
    assert set(impls_before.values()) == {"sdpa"}  # transformers' default: read at SDPA
    with torch.no_grad():
        plain = model(x, **kwargs)[0]
    ref_out, _ = eager_reference(model, x, **kwargs)

    with torch.no_grad(), capture(model) as rec:
        assert attn_impls(model) == impls_before  # nothing switched
        out = model(x, **kwargs)[0]

    attn = rec.attentions
    expected = stack(ref_out.attentions)  # [L, B, H, N, N]
    assert attn.tensor.shape == (2, 2, 4, layout.num_tokens, layout.num_tokens)
    torch.testing.assert_close(attn.tensor, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(attn.tensor.sum(-1), torch.ones(attn.tensor.shape[:-1]),
                               atol=1e-5, rtol=0)
    assert attn.layout == layout
    assert rec.cross is None and rec.text is None
    # outputs: those of the eager model, and of the untouched sdpa model to float tolerance
    torch.testing.assert_close(out, ref_out[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=0)
    # restored: same implementation everywhere, no hook left, same sdpa outputs again
    assert attn_impls(model) == impls_before
    assert hook_state(model) == hooks_before
    assert no_transformers_hooks_flag(model)
    with torch.no_grad():
        assert torch.equal(model(x, **kwargs)[0], plain)


def test_data2vec_vision_equals_eager_and_its_own_sdpa_calls():
    """Data2Vec-Vision runs SDPA and transformers refuses to switch it to eager: two references.
    transformers' eager ``output_attentions`` of another instance built eager with the same weights,
    and softmax(q kᵀ·scale + bias) recomputed from the q, k and relative-position bias the model
    passes to SDPA (helpers.AttentionLayerCount, float64)."""
    cfg = dict(TINY_VIT, use_relative_position_bias=True, initializer_range=0.2)
    torch.manual_seed(0)
    model = transformers.Data2VecVisionModel(transformers.Data2VecVisionConfig(**cfg)).eval()
    with torch.no_grad():  # a relative-position bias that matters
        for layer in model.encoder.layer:
            nn.init.normal_(layer.attention.attention.relative_position_bias.relative_position_bias_table)
    ref = transformers.Data2VecVisionModel(transformers.Data2VecVisionConfig(attn_implementation="eager", **cfg))
    ref.load_state_dict(model.state_dict())
    ref.eval()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)  # [B, 3, H, W]
    impls_before = attn_impls(model)
    assert set(impls_before.values()) == {"sdpa"}
    with torch.no_grad():
        ref_out = ref(x, output_attentions=True)
        with AttentionLayerCount(model, keep=True) as count, SdpaCalls() as sdpa:
            plain = model(x).last_hidden_state
    assert len(sdpa.calls) == 2 and all(c["attn_mask"] is not None for c in sdpa.calls)  # the bias
    hooks_before = hook_state(model)
    with torch.no_grad(), capture(model) as rec:
        out = model(x).last_hidden_state
    assert attn_impls(model) == impls_before and hook_state(model) == hooks_before
    assert rec.complete and rec.skipped == []
    attn = rec.attentions
    assert attn.layout == TokenLayout(1, (4, 4)) and attn.tensor.shape == (2, 2, 4, 17, 17)
    expected = stack(ref_out.attentions)  # [L, B, H, N, N]
    assert (expected - 1 / 17).abs().max() > 0.1  # far from uniform
    torch.testing.assert_close(attn.tensor, expected, atol=ATOL, rtol=0)
    for layer, (want,) in enumerate(count.references):  # [B, H, N, N] float64
        torch.testing.assert_close(attn.tensor[layer].double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(out, ref_out.last_hidden_state, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# captioners: encoder self-attention, cross-attention, decoder self-attention
# ---------------------------------------------------------------------------------------------

def test_vision_encoder_decoder_gpt2():
    model = build_ved()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)  # [B, 3, H, W]
    ids = torch.randint(0, 50, (2, 5))  # [B, T]
    impls_before = attn_impls(model)
    hooks_before = hook_state(model)
    assert set(impls_before.values()) == {"sdpa"} and len(impls_before) >= 3  # top, encoder, decoder
    with torch.no_grad():
        plain = model(pixel_values=x, decoder_input_ids=ids).logits
    ref_out, _ = eager_reference(model, pixel_values=x, decoder_input_ids=ids)

    with torch.no_grad(), capture(model) as rec:
        assert attn_impls(model) == impls_before  # nothing switched: read at SDPA
        logits = model(pixel_values=x, decoder_input_ids=ids).logits

    # encoder self-attention [L, B, H, N, N]
    torch.testing.assert_close(rec.attentions.tensor, stack(ref_out.encoder_attentions),
                               atol=ATOL, rtol=0)
    assert rec.attentions.tensor.shape == (2, 2, 4, 17, 17)
    assert rec.attentions.layout == TokenLayout(1, (4, 4))
    # cross-attention [L, B, H, T, Ni]: text queries over all encoder tokens
    assert rec.cross.tensor.shape == (2, 2, 4, 5, 17)
    torch.testing.assert_close(rec.cross.tensor, stack(ref_out.cross_attentions), atol=ATOL, rtol=0)
    torch.testing.assert_close(rec.cross.tensor.sum(-1), torch.ones(2, 2, 4, 5), atol=1e-5, rtol=0)
    assert rec.cross.layout == TokenLayout(1, (4, 4))
    # decoder self-attention [L, B, H, T, T], causal
    assert rec.text.shape == (2, 2, 4, 5, 5)
    torch.testing.assert_close(rec.text, stack(ref_out.decoder_attentions), atol=ATOL, rtol=0)
    assert torch.all(rec.text.triu(diagonal=1) == 0)

    torch.testing.assert_close(logits, ref_out.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits, plain, atol=1e-5, rtol=0)
    assert attn_impls(model) == impls_before
    assert hook_state(model) == hooks_before
    assert no_transformers_hooks_flag(model)


def test_blip_vision_and_text_cross_attention():
    model = build_blip()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)  # [B, 3, H, W]
    ids = torch.randint(3, 50, (2, 6))  # [B, T]
    impls_before = attn_impls(model)
    hooks_before = hook_state(model)
    ref_out, ref = eager_reference(model, pixel_values=x, input_ids=ids)
    with torch.no_grad():  # BLIP exposes only the vision attentions: ask its text decoder
        ref_text = ref.text_decoder(input_ids=ids, encoder_hidden_states=ref_out.image_embeds,
                                    output_attentions=True)

    with torch.no_grad(), capture(model) as rec:
        logits = model(pixel_values=x, input_ids=ids).logits

    assert rec.attentions.tensor.shape == (2, 2, 4, 17, 17)
    torch.testing.assert_close(rec.attentions.tensor, stack(ref_out.attentions), atol=ATOL, rtol=0)
    assert rec.attentions.layout == TokenLayout(1, (4, 4))
    assert rec.cross.tensor.shape == (2, 2, 4, 6, 17)
    torch.testing.assert_close(rec.cross.tensor, stack(ref_text.cross_attentions), atol=ATOL, rtol=0)
    assert rec.cross.layout == TokenLayout(1, (4, 4))
    torch.testing.assert_close(rec.text, stack(ref_text.attentions), atol=ATOL, rtol=0)
    torch.testing.assert_close(logits, ref_out.logits, atol=ATOL, rtol=0)
    assert attn_impls(model) == impls_before
    assert hook_state(model) == hooks_before
    assert no_transformers_hooks_flag(model)


def test_clip_text_tower_is_text_not_image():
    model = build_clip()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)  # [B, 3, H, W]
    ids = torch.randint(0, 50, (2, 7))  # [B, T]
    ref_out, _ = eager_reference(model, input_ids=ids, pixel_values=x)
    with torch.no_grad(), capture(model) as rec:
        model(input_ids=ids, pixel_values=x)
    torch.testing.assert_close(rec.attentions.tensor, stack(ref_out.vision_model_output.attentions),
                               atol=ATOL, rtol=0)
    torch.testing.assert_close(rec.text, stack(ref_out.text_model_output.attentions), atol=ATOL, rtol=0)
    assert rec.cross is None


# ---------------------------------------------------------------------------------------------
# discovery: the same modules as transformers' own walk of _can_record_outputs
# ---------------------------------------------------------------------------------------------

DISCOVERY_MODELS = {
    "vit": lambda: build("ViTForImageClassification", "ViTConfig", num_labels=5),
    "deit-teacher": lambda: build("DeiTForImageClassificationWithTeacher", "DeiTConfig"),
    "dinov2-registers": lambda: build("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig",
                                      num_register_tokens=3),
    "beit": lambda: build("BeitModel", "BeitConfig"),
    "ved": build_ved,
    "blip": build_blip,
    "clip": build_clip,
}


@pytest.mark.parametrize("case", list(DISCOVERY_MODELS))
def test_sites_are_transformers_own_attention_modules(case):
    model = DISCOVERY_MODELS[case]()
    sites = TransformersAdapter().find(model, lambda name: True)
    ours: dict = {}
    for s in sites:
        ours.setdefault(s.name, set()).add((s.key, s.index))
    theirs = transformers_attention_hooks(model)
    assert theirs  # the comparison is not vacuous
    assert ours == theirs
    assert no_transformers_hooks_flag(model)  # the probe ran on a copy


class ToyAttn(nn.Module):
    """softmax(x x^T / sqrt(D)) over [B, N, D], multiplied with the values; no ``config`` attribute."""

    def forward(self, x):  # x: [B, N, D]
        a = torch.softmax(x @ x.transpose(-1, -2) / x.shape[-1] ** 0.5, dim=-1)  # [B, N, N]
        return x + 1, a.unsqueeze(1), a @ x  # ([B, N, D], [B, 1, N, N], [B, N, D])


class ToyText(PreTrainedModel):
    config_class = transformers.BertConfig
    _can_record_outputs = {"attentions": OutputRecorder(ToyAttn, index=1, layer_name="talk")}

    def __init__(self, config):
        super().__init__(config)
        self.talk, self.self_attn = ToyAttn(), ToyAttn()
        self.post_init()

    def forward(self, x):
        return self.self_attn(self.talk(x)[0])[0]


class ToyVision(PreTrainedModel):
    """Every kind of _can_record_outputs entry, and a nested sub-model with its own entries."""

    config_class = transformers.ViTConfig
    _can_record_outputs = {
        "attentions": [OutputRecorder(ToyAttn, index=1, layer_name="self_attn"), "extra"],
        "cross_attentions": OutputRecorder(target_class=None, class_name="xattn", index=1),
        "hidden_states": ToyAttn,
    }

    def __init__(self, config):
        super().__init__(config)
        self.blocks = nn.ModuleList([nn.ModuleDict(dict(self_attn=ToyAttn(), xattn=ToyAttn(), other=ToyAttn()))
                                     for _ in range(2)])
        self.extra = ToyAttn()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))  # states the 1 prefix token of its inputs
        self.text = ToyText(transformers.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                                                    intermediate_size=8))
        self.post_init()

    def forward(self, x):
        for block in self.blocks:
            x = block["other"](block["xattn"](block["self_attn"](x)[0])[0])[0]
        return self.text(self.extra(x)[0])


def test_every_kind_of_record_entry_and_sub_model_dispatch():
    model = ToyVision(transformers.ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                                             intermediate_size=8, image_size=8, patch_size=4)).eval()
    sites = TransformersAdapter().find(model, lambda name: True)
    assert {s.name: {(s.key, s.index)} for s in sites} == transformers_attention_hooks(model)
    # roles from the nearest config: the attention modules have none, their owning model has
    assert {s.name: s.role for s in sites} == {
        "blocks.0.self_attn": IMAGE, "blocks.0.xattn": CROSS, "blocks.1.self_attn": IMAGE,
        "blocks.1.xattn": CROSS, "extra": IMAGE, "text.talk": TEXT}

    x = torch.randn(2, 5, 8)  # [B, N, D]: 1 prefix + 2x2 patches
    # only this adapter: the generic one would also read the ToyAttn modules nobody records
    with torch.no_grad(), capture(model, adapters=["transformers"]) as rec:
        model(x)

    def probs(t):  # [B, 1, N, N]
        return torch.softmax(t @ t.transpose(-1, -2) / 8 ** 0.5, dim=-1).unsqueeze(1)

    # each ToyAttn adds 1 to its input: the k-th one called (k = 0..8) sees ins[k]
    ins = [x]
    for _ in range(8):
        ins.append(ins[-1] + 1)
    # call order: self_attn, xattn, other (block 0), the same (block 1), extra, text.talk, text.self_attn
    expect_self = torch.stack([probs(ins[0]), probs(ins[3]), probs(ins[6])])  # [3, B, 1, N, N]
    expect_cross = torch.stack([probs(ins[1]), probs(ins[4])])  # [2, B, 1, N, N]
    torch.testing.assert_close(rec.attentions.tensor, expect_self, atol=ATOL, rtol=0)
    torch.testing.assert_close(rec.cross.tensor, expect_cross, atol=ATOL, rtol=0)
    torch.testing.assert_close(rec.text, probs(ins[7]).unsqueeze(0), atol=ATOL, rtol=0)
    assert rec.attentions.layout == TokenLayout(1, (2, 2))


def test_roles_of_encoder_decoder_sites():
    roles = {s.name: s.role for s in discover(build_ved())}
    assert roles == {
        "encoder.layers.0.attention": IMAGE, "encoder.layers.1.attention": IMAGE,
        "decoder.transformer.h.0.attn": TEXT, "decoder.transformer.h.0.crossattention": CROSS,
        "decoder.transformer.h.1.attn": TEXT, "decoder.transformer.h.1.crossattention": CROSS,
    }
    blip_roles = {s.name: s.role for s in discover(build_blip())}
    assert blip_roles["vision_model.encoder.layers.0.self_attn"] == IMAGE
    assert blip_roles["text_decoder.bert.encoder.layer.0.attention.self"] == TEXT
    assert blip_roles["text_decoder.bert.encoder.layer.0.crossattention.self"] == CROSS


def test_claimed_modules_are_skipped_and_other_models_ignored():
    model = build("ViTModel", "ViTConfig")
    adapter = TransformersAdapter()
    assert adapter.find(model, lambda name: not name.startswith("encoder.layer.0")) == [
        s for s in adapter.find(model, lambda name: True) if not s.name.startswith("encoder.layer.0")]
    assert len(adapter.find(model, lambda name: True)) == 2
    plain = nn.Sequential(nn.Linear(4, 4), nn.MultiheadAttention(4, 2))
    assert adapter.find(plain, lambda name: True) == []


# ---------------------------------------------------------------------------------------------
# switches restored: shared configs, mixed implementations, exceptions
# ---------------------------------------------------------------------------------------------

def test_shared_config_restored_and_both_models_captured():
    torch.manual_seed(0)
    config = transformers.ViTConfig(**TINY_VIT)
    a, b = transformers.ViTModel(config).eval(), transformers.ViTModel(config).eval()
    assert a.config is b.config

    class Pair(nn.Module):  # a plain container: two top-most PreTrainedModels
        def __init__(self):
            super().__init__()
            self.a, self.b = a, b

        def forward(self, x):
            return self.a(x).last_hidden_state + self.b(x).last_hidden_state

    pair = Pair().eval()
    x = torch.randn(1, 3, 32, 32)  # [B, 3, H, W]
    ref_a, _ = eager_reference(a, x)
    ref_b, _ = eager_reference(b, x)
    hooks_before = hook_state(pair)
    # wrap() of a container would count both models' cls_token parameters: state the layout
    with torch.no_grad(), capture(wrap(pair, num_prefix=1)) as rec:
        assert a.config._attn_implementation == "sdpa"  # the shared config is not touched
        pair(x)
    assert rec.attentions.tensor.shape == (4, 1, 4, 17, 17)
    expected = torch.cat([stack(ref_a.attentions), stack(ref_b.attentions)])  # a runs first
    torch.testing.assert_close(rec.attentions.tensor, expected, atol=ATOL, rtol=0)
    assert a.config._attn_implementation == "sdpa"
    assert hook_state(pair) == hooks_before


def test_mixed_implementations_untouched_and_both_read():
    model = build_ved()
    model.set_attn_implementation({"encoder": "eager", "decoder": "sdpa"})
    before = attn_impls(model)
    assert before["encoder"] == "eager" and before["decoder"] == "sdpa"
    x, ids = torch.randn(1, 3, 32, 32), torch.randint(0, 50, (1, 4))
    ref_out, _ = eager_reference(model, pixel_values=x, decoder_input_ids=ids)
    with torch.no_grad(), capture(model) as rec:
        assert attn_impls(model) == before
        model(pixel_values=x, decoder_input_ids=ids)
    assert attn_impls(model) == before
    torch.testing.assert_close(rec.attentions.tensor, stack(ref_out.encoder_attentions), atol=ATOL, rtol=0)
    torch.testing.assert_close(rec.cross.tensor, stack(ref_out.cross_attentions), atol=ATOL, rtol=0)
    torch.testing.assert_close(rec.text, stack(ref_out.decoder_attentions), atol=ATOL, rtol=0)

    blip = build_blip()  # eager by construction, and cannot be switched: stays as it is
    before = attn_impls(blip)
    with torch.no_grad(), capture(blip):
        pass
    assert attn_impls(blip) == before


def test_restored_after_exception_inside_block():
    model = build_ved()
    impls_before = attn_impls(model)
    hooks_before = hook_state(model)
    x = torch.randn(1, 3, 32, 32)  # [B, 3, H, W]
    ids = torch.randint(0, 50, (1, 4))  # [B, T]
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), capture(model):
            model(pixel_values=x, decoder_input_ids=ids)
            raise RuntimeError("boom")
    assert attn_impls(model) == impls_before
    assert hook_state(model) == hooks_before

    # an exception raised by the model itself, in the middle of a forward pass
    with pytest.raises(ValueError, match="channel"):  # transformers' own check of the input
        with torch.no_grad(), capture(model):
            model(pixel_values=torch.randn(1, 5, 32, 32), decoder_input_ids=ids)  # 5 channels
    assert attn_impls(model) == impls_before
    assert hook_state(model) == hooks_before
    assert no_transformers_hooks_flag(model)


def test_external_kernels_are_refused_with_the_way_out():
    model = build("ViTModel", "ViTConfig")
    model.config._attn_implementation_internal = "flash_attention_2"  # as set_attn_implementation would
    refused = r"external kernel 'flash_attention_2'.*set_attn_implementation\('sdpa'\)"
    with pytest.raises(vitviz.CaptureError, match=refused):
        with capture(model):
            pass
    assert hook_state(model) == hook_state(build("ViTModel", "ViTConfig"))


# ---------------------------------------------------------------------------------------------
# batched equals one-by-one
# ---------------------------------------------------------------------------------------------

def test_batched_equals_one_by_one():
    model = build_ved()
    torch.manual_seed(2)
    x = torch.randn(3, 3, 32, 32)  # [B, 3, H, W]
    ids = torch.randint(0, 50, (3, 4))  # [B, T]
    with torch.no_grad(), capture(model) as rec:
        model(pixel_values=x, decoder_input_ids=ids)
    batched = (rec.attentions.tensor, rec.cross.tensor, rec.text)
    for i in range(3):
        with torch.no_grad(), capture(model) as one:
            model(pixel_values=x[i:i + 1], decoder_input_ids=ids[i:i + 1])
        for got, full in zip((one.attentions.tensor, one.cross.tensor, one.text), batched):
            torch.testing.assert_close(got, full[:, i:i + 1], atol=ATOL, rtol=0)


def test_prefix_tokens_read_off_the_model_before_any_capture():
    import vitviz

    """wrap() counts CLS / distillation / register / class_embedding parameters of HF models."""
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        DeiTConfig,
        DeiTForImageClassificationWithTeacher,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                 image_size=32, patch_size=8)
    deit = vitviz.wrap(DeiTForImageClassificationWithTeacher(DeiTConfig(**small)))
    assert deit.layout == vitviz.TokenLayout(2, (4, 4))
    regs = vitviz.wrap(Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=3, **small)))
    assert regs.layout == vitviz.TokenLayout(4, (4, 4))
    clip = vitviz.wrap(CLIPVisionModel(CLIPVisionConfig(**small)))
    assert clip.layout == vitviz.TokenLayout(1, (4, 4))
