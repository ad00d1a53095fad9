"""Text -> image maps (vitviz.explain_text) on tiny random-weight CLIP, SigLIP and open_clip models.

Equivalence: chefer against transformers' eager ``output_attentions`` and autograd; legrad and
maskclip against their formulas written out from the model's weights and hidden states;
batched texts against one by one. Invariants: the model's outputs, hooks and gradients are
unchanged. Bad input: one clear VitvizError (or a warning) each.
"""

import pytest
import torch
import transformers
from helpers import hook_state, tiny_word_clip, torch_function_modes

import vitviz
from vitviz.errors import VitvizError
from vitviz.explain.text import text_maps

GRID = (4, 4)


def tiny_clip(layers=3, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=10, bos_token_id=0, eos_token_id=1,
                         pad_token_id=2),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=layers, num_attention_heads=4),
        projection_dim=16)
    return transformers.CLIPModel(cfg).eval()


def tiny_siglip(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.SiglipConfig(
        text_config=dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=8),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=3, num_attention_heads=4))
    m = transformers.SiglipModel(cfg).eval()
    with torch.no_grad():  # SigLIP initialises scale and bias to zero in _init_weights: give them values
        m.logit_scale.fill_(1.3)
        m.logit_bias.fill_(-0.7)
    return m


def image(seed=1):
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


IDS = torch.tensor([[0, 5, 7, 9, 1, 2], [0, 11, 12, 1, 2, 2], [0, 20, 21, 22, 23, 1]])
MASK = (IDS != 2).long()


def eager_reference(model, x, ids, mask=None):
    """An eager copy of ``model`` run on ``T`` copies of ``x`` against ``T`` texts, attentions kept."""
    ref = type(model)(model.config).eval()
    ref.load_state_dict(model.state_dict())
    ref.set_attn_implementation("eager")
    t = ids.shape[0]
    out = ref(input_ids=ids, pixel_values=x.repeat(t, 1, 1, 1), attention_mask=mask, output_attentions=True,
              output_hidden_states=True)
    return ref, out


# -- chefer ---------------------------------------------------------------------------------------

def test_chefer_equals_eager_attentions_and_autograd():
    m = tiny_clip()
    x = image()
    res = text_maps(m, x, IDS, method="chefer")
    _, out = eager_reference(m, x, IDS)
    att = out.vision_model_output.attentions  # L x [T, H, N, N]
    n = att[0].shape[-1]
    expected = []
    for t in range(IDS.shape[0]):
        grads = torch.autograd.grad(out.logits_per_image[t, t], att, retain_graph=True)
        r = torch.eye(n)
        for a, g in zip(att, grads, strict=True):
            r = r + (a[t] * g[t]).clamp(min=0).mean(dim=0) @ r
        expected.append(r[0, 1:].reshape(GRID))
    expected = torch.stack(expected).detach()
    assert res.maps.shape == (3, *GRID)
    assert expected.abs().max() > 1e-3  # a map worth comparing
    torch.testing.assert_close(res.maps, expected, atol=1e-6, rtol=1e-5)
    # the score explained is the model's own logit
    torch.testing.assert_close(res.scores, out.logits_per_image.diagonal().detach(), atol=1e-5, rtol=1e-5)


def test_chefer_start_layer_drops_early_layers():
    m = tiny_clip()
    x = image()
    full = vitviz.explain_text(m, x, IDS[:1], method="chefer")
    late = vitviz.explain_text(m, x, IDS[:1], method="chefer", start_layer=-1)
    _, out = eager_reference(m, x, IDS[:1])
    att = out.vision_model_output.attentions
    g = torch.autograd.grad(out.logits_per_image[0, 0], att[-1])[0]
    last = (att[-1][0] * g[0]).clamp(min=0).mean(dim=0)  # one layer: R = I + Ā
    torch.testing.assert_close(late[0], last[0, 1:].reshape(GRID).detach(), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(full, late)


# -- legrad ---------------------------------------------------------------------------------------

def legrad_reference(m, x, ids, start, sigmoid=False, mask=None):
    ref, out = eager_reference(m, x, ids, mask)
    vout = out.vision_model_output
    att, hidden = vout.attentions, vout.hidden_states  # hidden[l + 1]: output of layer l
    text = out.text_embeds.detach()  # normalised
    scale = ref.logit_scale.exp()
    bias = ref.logit_bias if sigmoid else 0.0
    vision = ref.vision_model
    num_layers = len(att)
    p = 0 if sigmoid else 1
    maps = []
    for t in range(ids.shape[0]):
        total = torch.zeros(GRID)
        for layer in range(start % num_layers, num_layers):
            tokens = hidden[layer + 1][t:t + 1]
            if sigmoid:
                emb = vision.head(vision.post_layernorm(tokens))
            else:
                emb = ref.visual_projection(vision.post_layernorm(tokens[:, 0]))
            emb = emb / emb.norm(dim=-1, keepdim=True)
            s = (emb[0] * text[t]).sum() * scale + bias
            g = torch.autograd.grad(s, att[layer], retain_graph=True)[0][t]  # [H, N, N]
            total += g.clamp(min=0).mean(dim=(0, 1))[p:].reshape(GRID)
        maps.append(total)
    return torch.stack(maps).detach()


@pytest.mark.parametrize("start", [-2, 0])
def test_legrad_equals_formula_written_out(start):
    m = tiny_clip()
    x = image()
    res = vitviz.explain_text(m, x, IDS, method="legrad", start_layer=start)
    expected = legrad_reference(m, x, IDS, start)
    assert expected.abs().max() > 1e-4
    torch.testing.assert_close(res, expected, atol=1e-6, rtol=1e-5)


def test_legrad_default_is_the_last_two_layers():
    m = tiny_clip()
    x = image()
    torch.testing.assert_close(vitviz.explain_text(m, x, IDS, method="legrad"),
                               vitviz.explain_text(m, x, IDS, method="legrad", start_layer=1))


def test_legrad_of_one_text_golden_nonnegative():
    # ReLU of the gradients, averaged: never negative
    res = vitviz.explain_text(tiny_clip(), image(), IDS, method="legrad", start_layer=0)
    assert (res >= 0).all()


# -- maskclip -------------------------------------------------------------------------------------

def test_maskclip_written_out_from_weights():
    m = tiny_clip()
    x = image()
    res = text_maps(m, x, IDS, method="maskclip")
    _, out = eager_reference(m, x, IDS)
    with torch.no_grad():
        h = out.vision_model_output.hidden_states[-2][:1]  # input of the last layer [1, N, D]
        last = m.vision_model.encoder.layers[-1]
        ln = torch.nn.functional.layer_norm(h, (32,), last.layer_norm1.weight, last.layer_norm1.bias,
                                            last.layer_norm1.eps)
        v = ln @ last.self_attn.v_proj.weight.T + last.self_attn.v_proj.bias
        o = v @ last.self_attn.out_proj.weight.T + last.self_attn.out_proj.bias  # [1, N, D]
        post = m.vision_model.post_layernorm
        z = torch.nn.functional.layer_norm(o[0, 1:], (32,), post.weight, post.bias, post.eps)
        e = z @ m.visual_projection.weight.T  # [P, 16]
        e = e / e.norm(dim=-1, keepdim=True)
        txt = out.text_embeds  # normalised [T, 16]
        expected = (txt @ e.T) * m.logit_scale.exp()  # [T, P]
    torch.testing.assert_close(res.maps, expected.reshape(3, *GRID), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.scores, out.logits_per_image.diagonal(), atol=1e-5, rtol=1e-5)


def test_maskclip_golden_two_patch_cosines():
    from vitviz.analyze.text_image import patch_text_logits

    patches = torch.tensor([[[3.0, 0.0], [1.0, 1.0]]])  # [1, 2, 2]
    text = torch.tensor([[1.0, 0.0], [0.0, -2.0]])
    out = patch_text_logits(patches, text, vitviz.TokenLayout(1, (1, 2)), scale=2.0, bias=0.5)
    r = 2 ** -0.5
    expected = torch.tensor([[[2.0 + 0.5, 2 * r + 0.5]], [[0.5, -2 * r + 0.5]]])
    torch.testing.assert_close(out, expected)


def test_legrad_layer_golden():
    from vitviz.analyze.text_image import legrad_layer

    g = torch.zeros(1, 2, 3, 3)  # [B, H, N, N], one prefix token, grid 1x2
    g[0, 0, :, 1] = 3.0  # head 0: every query -> key 1
    g[0, 1, 0, 2] = -6.0  # negative: removed by the ReLU
    g[0, 1, 1, 2] = 6.0  # one query of three
    out = legrad_layer(g, vitviz.TokenLayout(1, (1, 2)))
    torch.testing.assert_close(out, torch.tensor([[[1.5, 1.0]]]))


# -- batching, invariants ------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["chefer", "legrad", "maskclip"])
def test_batched_texts_equal_one_by_one(method):
    m = tiny_clip()
    x = image()
    batched = text_maps(m, x, IDS, method=method)
    for t in range(IDS.shape[0]):
        one = text_maps(m, x, IDS[t:t + 1], method=method)
        torch.testing.assert_close(one.maps[0], batched.maps[t], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(one.scores[0], batched.scores[t], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["chefer", "legrad", "maskclip"])
def test_model_unchanged(method):
    m = tiny_clip()
    x = image()
    with torch.no_grad():
        before = m(input_ids=IDS, pixel_values=x).logits_per_image
    hooks = hook_state(m)
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    impl = m.config._attn_implementation
    vitviz.explain_text(m, x, IDS, method=method)
    assert hook_state(m) == hooks
    assert torch_function_modes() == 0
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    assert all(p.grad is None for p in m.parameters())
    assert m.config._attn_implementation == impl
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=IDS, pixel_values=x).logits_per_image, before)


def test_hooks_removed_after_an_error():
    m = tiny_clip()
    hooks = hook_state(m)
    with pytest.raises(VitvizError):
        vitviz.explain_text(m, image(), IDS, method="legrad", start_layer=7)
    assert hook_state(m) == hooks
    assert torch_function_modes() == 0


# -- strings and the tokenizer -----------------------------------------------------------------

def word_tokenizer(tmp_path):
    from vitviz.models.bundled.shapes_clip import build_tokenizer_file, load_tokenizer

    path = tmp_path / "tok.json"
    build_tokenizer_file(path)
    return load_tokenizer(path)


def test_strings_tokenized_with_the_models_tokenizer(tmp_path):
    tok = word_tokenizer(tmp_path)
    vm = vitviz.wrap(tiny_word_clip(tok), tokenizer=tok)
    texts = ["a red circle", "a blue star above a green square"][:1] + ["a blue star"]
    res = text_maps(vm, image(), texts, method="chefer")
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = vm.module(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                           pixel_values=image()).logits_per_image[0]
    torch.testing.assert_close(res.scores, logits, atol=1e-5, rtol=1e-5)
    assert res.texts == texts
    # padding differs one by one: the attention mask keeps the maps equal
    one = text_maps(vm, image(), texts[1:], method="chefer")
    torch.testing.assert_close(one.maps[0], res.maps[1], atol=1e-6, rtol=1e-5)


def test_long_text_truncated_with_a_note(tmp_path):
    tok = word_tokenizer(tmp_path)
    vm = vitviz.wrap(tiny_word_clip(tok), tokenizer=tok)  # context 6: [BOS] + 4 words + [EOS]
    with pytest.warns(UserWarning, match="truncated"):
        res = text_maps(vm, image(), ["a red star above a blue circle"], method="maskclip")
    assert res.notes and "context of 6" in res.notes[0]
    assert res.maps.shape == (1, *GRID)


def test_strings_without_tokenizer_ask_for_ids():
    with pytest.raises(VitvizError, match="no tokenizer.*token ids"):
        vitviz.explain_text(tiny_clip(), image(), ["a red circle"])


def test_empty_text_list():
    with pytest.raises(VitvizError, match="no text given"):
        vitviz.explain_text(tiny_clip(), image(), [])


def test_ids_longer_than_context():
    with pytest.raises(VitvizError, match="exceed.*context of 10"):
        vitviz.explain_text(tiny_clip(), image(), torch.zeros(1, 11, dtype=torch.long))


def test_model_without_text_tower():
    vit = transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=32,
        patch_size=8)).eval()
    with pytest.raises(VitvizError, match="no text tower"):
        vitviz.explain_text(vit, image(), IDS)


def test_unknown_method_and_image_batch():
    with pytest.raises(VitvizError, match="unknown text-map method"):
        vitviz.explain_text(tiny_clip(), image(), IDS, method="gradcam")
    with pytest.raises(VitvizError, match="one image"):
        vitviz.explain_text(tiny_clip(), torch.randn(2, 3, 32, 32), IDS)


# -- SigLIP ---------------------------------------------------------------------------------------

SIG_IDS = torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("method", ["chefer", "legrad", "maskclip"])
def test_siglip_grid_finite_and_own_logit(method):
    m = tiny_siglip()
    x = image()
    res = text_maps(m, x, SIG_IDS, method=method)
    assert res.maps.shape == (3, *GRID)
    assert torch.isfinite(res.maps).all() and res.maps.abs().max() > 0
    with torch.no_grad():
        logits = m(input_ids=SIG_IDS, pixel_values=x).logits_per_image[0]  # the sigmoid's logit
    torch.testing.assert_close(res.scores, logits, atol=1e-5, rtol=1e-5)


def test_siglip_legrad_through_the_attention_pool_head():
    m = tiny_siglip()
    x = image()
    res = vitviz.explain_text(m, x, SIG_IDS, method="legrad", start_layer=0)
    torch.testing.assert_close(res, legrad_reference(m, x, SIG_IDS, 0, sigmoid=True), atol=1e-6, rtol=1e-5)


def test_siglip_chefer_mean_of_patch_rows():
    m = tiny_siglip()
    x = image()
    res = vitviz.explain_text(m, x, SIG_IDS[:1], method="chefer")
    _, out = eager_reference(m, x, SIG_IDS[:1])
    att = out.vision_model_output.attentions
    grads = torch.autograd.grad(out.logits_per_image[0, 0], att)
    r = torch.eye(16)
    for a, g in zip(att, grads, strict=True):
        r = r + (a[0] * g[0]).clamp(min=0).mean(dim=0) @ r
    torch.testing.assert_close(res[0], r.mean(dim=0).reshape(GRID).detach(), atol=1e-6, rtol=1e-5)


# -- open_clip ------------------------------------------------------------------------------------

def tiny_open_clip():
    import open_clip  # the `clip` extra: `make test` installs it, so a missing one fails here
    torch.manual_seed(0)
    return open_clip.CLIP(embed_dim=16, vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=3,
                                                        head_width=8, mlp_ratio=2),
                          text_cfg=dict(context_length=8, vocab_size=50, width=32, heads=4, layers=2)).eval()


@pytest.mark.parametrize("method", ["chefer", "legrad", "maskclip"])
def test_open_clip_grid_finite_and_own_logit(method):
    m = tiny_open_clip()
    x = image()
    ids = SIG_IDS
    res = text_maps(m, x, ids, method=method)
    assert res.maps.shape == (3, *GRID)
    assert torch.isfinite(res.maps).all() and res.maps.abs().max() > 0
    with torch.no_grad():
        torch.testing.assert_close(res.scores, m.get_logits(x, ids)[0][0], atol=1e-5, rtol=1e-5)


def test_open_clip_chefer_against_explicit_attention():
    """Reference: the same open_clip model run block by block with the attention written out."""
    m = tiny_open_clip()
    x = image()
    ids = SIG_IDS[:1]
    res = vitviz.explain_text(m, x, ids, method="chefer")
    v = m.visual
    with torch.no_grad():
        text = m.encode_text(ids, normalize=True)
    h = v._embeds(x)  # [1, N, D]
    atts = []
    for blk in v.transformer.resblocks:
        a_in = blk.ln_1(h)
        mha = blk.attn
        d = a_in.shape[-1]
        q, k, val = torch.nn.functional.linear(a_in, mha.in_proj_weight, mha.in_proj_bias).split(d, dim=-1)
        heads = mha.num_heads
        q, k, val = (t.reshape(1, -1, heads, d // heads).transpose(1, 2) for t in (q, k, val))
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // heads) ** 0.5, dim=-1)  # [1, H, N, N]
        atts.append(a)
        o = (a @ val).transpose(1, 2).reshape(1, -1, d)
        h = h + mha.out_proj(o)
        h = h + blk.mlp(blk.ln_2(h))
    emb = v._pool(h)[0] @ v.proj
    s = (emb / emb.norm(dim=-1, keepdim=True) * text).sum() * m.logit_scale.exp()
    grads = torch.autograd.grad(s, atts)
    r = torch.eye(h.shape[1])
    for a, g in zip(atts, grads, strict=True):
        r = r + (a[0] * g[0]).clamp(min=0).mean(dim=0) @ r
    torch.testing.assert_close(res[0], r[0, 1:].reshape(GRID).detach(), atol=1e-6, rtol=1e-5)


def test_open_clip_default_tokenizer_needs_its_vocabulary():
    with pytest.raises(VitvizError, match="no tokenizer"):
        vitviz.explain_text(tiny_open_clip(), image(), ["a red circle"])


def test_open_clip_create_model_strings_and_truncation():
    """A tower built by open_clip's own factory (tiny config over ViT-B-32's), with its default
    BPE tokenizer: strings work offline, and a text past the context is truncated with a note."""
    import open_clip  # the `clip` extra: `make test` installs it, so a missing one fails here
    torch.manual_seed(0)
    m = open_clip.create_model("ViT-B-32", pretrained=None, embed_dim=16,
                               vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=8),
                               text_cfg=dict(context_length=8, vocab_size=49408, width=32, heads=4, layers=1)).eval()
    x = image()
    texts = ["a red circle", "a photo of a very small blue square on a table"]
    with pytest.warns(UserWarning, match="truncated"):
        res = text_maps(m, x, texts, method="legrad")
    assert res.maps.shape == (2, *GRID) and torch.isfinite(res.maps).all()
    assert any("context of 8" in n for n in res.notes)
    ids = open_clip.SimpleTokenizer(context_length=8)(texts)
    with torch.no_grad():
        torch.testing.assert_close(res.scores, m.get_logits(x, ids)[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.maps, vitviz.explain_text(m, x, ids, method="legrad"))


@pytest.mark.parametrize("method", ["chefer", "legrad"])
def test_eager_and_sdpa_models_give_the_same_maps(method):
    """The op-level capture reads SDPA (gradients dOut·Vᵀ) and the eager softmax alike."""
    m = tiny_clip()
    eager = tiny_clip()
    eager.set_attn_implementation("eager")
    x = image()
    torch.testing.assert_close(vitviz.explain_text(eager, x, IDS, method=method),
                               vitviz.explain_text(m, x, IDS, method=method), atol=1e-6, rtol=1e-5)


def test_maskclip_takes_no_start_layer():
    with pytest.raises(VitvizError, match="start_layer does not apply"):
        vitviz.explain_text(tiny_clip(), image(), IDS, method="maskclip", start_layer=0)


# ---- words outside the tokenizer's vocabulary ------------------------------------------------------

def test_words_outside_the_vocabulary_are_warned_by_name():
    """shapes-clip's word-level vocabulary reads "a dog on a skateboard" as [BOS] a [UNK] [UNK] a
    [UNK] [EOS]: the map cannot see the words, and the warning names them."""
    from vitviz.errors import UnknownTokenWarning

    m = vitviz.load_model("shapes-clip")
    x = torch.zeros(1, 3, 64, 64)
    assert m.tokenizer.convert_ids_to_tokens(m.tokenizer("a dog on a skateboard")["input_ids"]) == \
        ["[BOS]", "a", "[UNK]", "[UNK]", "a", "[UNK]", "[EOS]"]
    with pytest.warns(UnknownTokenWarning) as caught:
        res = text_maps(m, x, ["a dog on a skateboard", "a red circle"], method="chefer")
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert '"dog", "on", "skateboard"' in msg and '"a"' not in msg and "\n" not in msg
    assert "shapes-clip" in msg and "[UNK]" in msg and "circle" in msg  # the words it knows, listed
    assert msg in res.notes and res.maps.shape[0] == 2
    # as written: case and punctuation are part of a word-level token
    assert vitviz.explain.text.unknown_words(m.tokenizer, ["A red Circle."]) == ["A", "Circle."]


def test_known_words_and_token_ids_are_not_warned():
    import warnings

    from vitviz.errors import UnknownTokenWarning

    m = vitviz.load_model("shapes-clip")
    x = torch.zeros(1, 3, 64, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = text_maps(m, x, ["a red circle above a blue square"], method="maskclip")
        text_maps(m, x, m.tokenizer(["a red circle"], return_tensors="pt")["input_ids"], method="maskclip")
    assert not [w for w in caught if issubclass(w.category, UnknownTokenWarning)]
    assert res.notes == []


def test_unknown_words_leaves_out_a_template_token_that_is_also_the_unknown_token():
    """CLIP's tokenizer uses <|endoftext|> both as its unknown and its end token, and byte-level BPE
    never produces an unknown token: nothing is named."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from vitviz.explain.text import unknown_words

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>", *sorted(alphabet)])}
    core = Tokenizer(models.BPE(vocab, [], unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>")
    ids = tok("a dog on a skateboard")["input_ids"]
    assert ids[-1] == tok.unk_token_id  # the end token is the unknown token's id
    assert unknown_words(tok, ["a dog on a skateboard", "ünïcode ✓"]) == []


def test_unknown_words_of_a_tokenizer_without_offsets():
    """Tokenizers that give no offsets (slow ones, hand-written ones) are asked word by word."""
    from vitviz.explain.text import unknown_words

    class WordTokenizer:
        unk_token, unk_token_id = "<unk>", 0
        vocab = {"<unk>": 0, "a": 1, "red": 2, "circle": 3}

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [self.vocab.get(w, 0) for w in text.split()]}

    assert unknown_words(WordTokenizer(), ["a red dog", "a cat on a red circle"]) == ["dog", "cat", "on"]
    assert unknown_words(object(), ["a dog"]) == []  # no unknown token: nothing to name
