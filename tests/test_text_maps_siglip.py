"""MaskCLIP on SigLIP: ``vitviz.explain_text(..., method="maskclip")`` on a tiny random
transformers ``SiglipModel`` against MaskCLIP written out here from the model's weights.

SigLIP has no class token: it pools the vision encoder's output with an attention head (a learnt
probe query, an ``nn.MultiheadAttention``, then a LayerNorm + MLP residual). MaskCLIP (Zhou et al.
2022) reads an attention pool by its value path for every token (their treatment of CLIP-ResNet's
attention pooling; vitviz's ``_HFTowers.dense`` documents the same for SigLIP): every token of the
vision encoder's output (all its layers, then ``post_layernorm``) goes through the head's value
projection and output projection, plus the head's own MLP residual; each patch embedding is then
scored against each text by SigLIP's logit, ``logit_scale.exp() · cos + logit_bias``. Texts are
tokenized as SigLIP's processor does: padded to the context length, no attention mask.
"""

import pytest
import torch
import transformers
from torch.nn import functional as F

import vitviz
from vitviz.explain.text import text_maps

WORDS = ["[PAD]", "[UNK]", "[EOS]", "a", "red", "circle", "blue", "square", "green", "star", "above"]
CONTEXT = 8
TEXTS = ["a red circle", "a blue square above a green star", "a green circle"]


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer over WORDS that appends [EOS] (SigLIP pools its text at the last token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A [EOS]", special_tokens=[("[EOS]", vocab["[EOS]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]",
                                   model_max_length=CONTEXT)


def tiny_siglip(seed=0):
    """Random weights, 32 px images in 8 px patches (a 4x4 grid), 3 vision layers."""
    torch.manual_seed(seed)
    cfg = transformers.SiglipConfig(
        text_config=dict(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=CONTEXT, pad_token_id=0, bos_token_id=2,
                         eos_token_id=2),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4))
    m = transformers.SiglipModel(cfg).eval()
    with torch.no_grad():  # SigLIP initialises scale and bias to constants: give them other values
        m.logit_scale.fill_(1.3)
        m.logit_bias.fill_(-0.7)
    return m


def image(seed=1):
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def head_value_path(model, tokens):
    """MaskCLIP's reading of SigLIP's attention-pool head for every token ``[B, N, D]``, from the
    head's weights: value projection, output projection, then the head's LayerNorm + MLP residual."""
    head = model.vision_model.head
    att = head.attention  # nn.MultiheadAttention: in_proj = [W_q; W_k; W_v]
    d = tokens.shape[-1]
    v = F.linear(tokens, att.in_proj_weight[2 * d:], att.in_proj_bias[2 * d:])  # [B, N, D]
    o = F.linear(v, att.out_proj.weight, att.out_proj.bias)  # [B, N, D]
    ln = head.layernorm
    z = F.layer_norm(o, (d,), ln.weight, ln.bias, ln.eps)
    mlp = head.mlp
    return o + F.linear(mlp.activation_fn(F.linear(z, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias)


def patch_logits(model, dense, text):
    """SigLIP's logit of every patch embedding ``[P, D]`` against every text ``[T, D]``: ``[T, P]``."""
    dense = dense / dense.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    return (text @ dense.T) * model.logit_scale.exp() + model.logit_bias


def maskclip_reference(model, tok, x, texts):
    """``([T, P] patch logits, [T] image logits, vision hidden states, [T, D] text embeddings)``
    written out from the weights."""
    enc = tok(texts, padding="max_length", max_length=CONTEXT, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], pixel_values=x, output_hidden_states=True)
        vision = out.vision_model_output
        post = model.vision_model.post_layernorm
        h = vision.hidden_states[-1]  # [1, N, D]: the output of the last encoder layer
        z = F.layer_norm(h, h.shape[-1:], post.weight, post.bias, post.eps)
        torch.testing.assert_close(z, vision.last_hidden_state)  # what the head reads
        dense = head_value_path(model, z)[0]  # [P, D]: no class token, every token is a patch
        logits = patch_logits(model, dense, out.text_embeds)  # [T, P]
    return logits, out.logits_per_image[0], vision.hidden_states, out.text_embeds


def test_maskclip_on_siglip_written_out_from_weights(tokenizer):
    m = tiny_siglip()
    vm = vitviz.wrap(m, tokenizer=tokenizer)
    x = image()
    maps = vitviz.explain_text(vm, x, TEXTS, method="maskclip")
    assert maps.shape == (3, 4, 4) and maps.dtype == torch.float32
    want, scores, hidden, text = maskclip_reference(m, tokenizer, x, TEXTS)
    torch.testing.assert_close(maps, want.reshape(3, 4, 4), atol=1e-5, rtol=1e-5)
    assert want.std() > 0.1  # patches differ: the comparison can fail
    # the scores are the model's own image-text logits (of its sigmoid)
    res = text_maps(vm, x, TEXTS, method="maskclip")
    torch.testing.assert_close(res.maps, maps)
    torch.testing.assert_close(res.scores, scores, atol=1e-5, rtol=1e-5)
    # every encoder layer counts: the same reading of the last layer's input differs
    with torch.no_grad():
        without_last = patch_logits(m, head_value_path(m, m.vision_model.post_layernorm(hidden[-2]))[0], text)
    assert (without_last - want).abs().max() > 0.1


def test_maskclip_on_siglip_one_text_equals_its_row(tokenizer):
    """Texts are padded to SigLIP's context, unmasked: one text alone gives its row of the batch."""
    m = tiny_siglip()
    vm = vitviz.wrap(m, tokenizer=tokenizer)
    x = image()
    maps = vitviz.explain_text(vm, x, TEXTS, method="maskclip")
    one = vitviz.explain_text(vm, x, TEXTS[1:2], method="maskclip")
    torch.testing.assert_close(one[0], maps[1], atol=1e-6, rtol=1e-5)
