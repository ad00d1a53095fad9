"""The architectures of the bundled models, built with the libraries users know.

* ``shapes-vit``: timm's ``VisionTransformer`` (64 px input, 8 px patches -> 8x8 grid plus a
  CLS token, 4 blocks, width 128, 4 heads), classifying the shape in a
  :func:`~vitviz.zoo.scenes.classification_scene`.
* ``shapes-captioner``: a transformers ``VisionEncoderDecoderModel``: a ``ViTModel`` encoder
  (64 px, 8 px patches, 4 layers, width 128, 4 heads) and a ``GPT2LMHeadModel`` decoder with
  cross-attention (3 layers, width 128, 4 heads) over a word-level vocabulary, captioning
  :func:`~vitviz.zoo.scenes.caption_scene` images.

Both take the scene image as it is (64 x 64, no resize), scaled to ``[0, 1]`` and normalised
with mean = std = 0.5 per channel: :func:`to_input` and the models' ``preprocessor`` give
the same tensor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .vocabulary import IMAGE_SIZE, SHAPES, VOCAB_WORDS

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
PATCH = 8
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
SPECIAL_TOKENS = ("[PAD]", "[BOS]", "[EOS]", "[UNK]")
TOKENIZER_FILE = "shapes-captioner.tokenizer.json"
MAX_CAPTION_TOKENS = 12  # longest caption: 9 words, plus [BOS] and [EOS]


def to_input(images: np.ndarray, device=None, dtype=torch.float32) -> torch.Tensor:
    """Scene images to model inputs.

    Shape:
        images: ``[B, H, W, 3]`` (or ``[H, W, 3]``) uint8 -> ``[B, 3, H, W]`` float
    """
    x = torch.as_tensor(np.ascontiguousarray(images), device=device)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    x = x.permute(0, 3, 1, 2).to(dtype) / 255.0  # [B, 3, H, W]
    mean = torch.tensor(MEAN, device=x.device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device, dtype=dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def preprocess():
    """The :class:`~vitviz.models.Preprocess` of both models (64 px squash, mean = std = 0.5)."""
    from .._preprocess import Preprocess

    return Preprocess(size=(IMAGE_SIZE, IMAGE_SIZE), resize_mode="squash", crop_pct=1.0,
                      interpolation="bilinear", mean=MEAN, std=STD)


# ---------------------------------------------------------------------------------------------
# shapes-vit
# ---------------------------------------------------------------------------------------------

def shapes_vit_module() -> torch.nn.Module:
    """The classifier architecture with untrained weights (timm ``VisionTransformer``)."""
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMAGE_SIZE,
                              patch_size=PATCH, embed_dim=128, depth=4, num_heads=4, mlp_ratio=2.0,
                              num_classes=len(SHAPES))
    # the data config timm reports for this model: the scenes as they are
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, IMAGE_SIZE, IMAGE_SIZE),
                                crop_pct=1.0, crop_mode="squash", interpolation="bilinear",
                                mean=MEAN, std=STD, num_classes=len(SHAPES), hf_hub_id=None,
                                url=None, tag="vitviz-shapes")
    return model


def build_shapes_vit():
    """``shapes-vit`` as a :class:`~vitviz.models.VisionModel`, untrained."""
    from .._vision_model import wrap

    return wrap(shapes_vit_module(), preprocess=preprocess(), labels=list(SHAPES), name="shapes-vit")


# ---------------------------------------------------------------------------------------------
# shapes-captioner
# ---------------------------------------------------------------------------------------------

def vocabulary() -> dict[str, int]:
    """Word -> id: the special tokens, then the words of every caption."""
    words = list(SPECIAL_TOKENS) + list(VOCAB_WORDS)
    return {w: i for i, w in enumerate(words)}


def build_tokenizer_file(path) -> None:
    """Write the word-level tokenizer (``tokenizers`` JSON) of the captioner to ``path``."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocabulary(), unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS])
    tok.save(str(path))


def load_tokenizer(path=None):
    """The captioner's tokenizer as a ``PreTrainedTokenizerFast`` (from the packaged file).

    Args:
        path: a tokenizer JSON file; default: the one shipped in ``vitviz/models/bundled/weights``.
    """
    return word_tokenizer(path, TOKENIZER_FILE, "the captioner's", "tools.train.train")


def word_tokenizer(path, default_file: str, whose: str, trainer: str, **kwargs):
    """A zoo model's word-level tokenizer file (``path``, default ``default_file`` in the shipped
    weights) as a ``PreTrainedTokenizerFast`` with the zoo's special tokens; a missing file is a
    :class:`~vitviz.WeightsNotFoundError` naming how to rebuild it (``python -m <trainer>``)."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path) if path is not None else WEIGHTS_DIR / default_file
    if not path.is_file():
        from ...errors import WeightsNotFoundError

        raise WeightsNotFoundError(
            f"{whose} tokenizer file {path} is missing; reinstall vitviz or rebuild it with "
            f"`python -m {trainer} tokenizer`")
    return PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="[BOS]", eos_token="[EOS]",
                                   pad_token="[PAD]", unk_token="[UNK]", **kwargs)


def shapes_captioner_module() -> torch.nn.Module:
    """The captioner architecture with untrained weights (``VisionEncoderDecoderModel``)."""
    from transformers import (
        GenerationConfig,
        GPT2Config,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
    )

    vocab = vocabulary()
    enc = ViTConfig(image_size=IMAGE_SIZE, patch_size=PATCH, num_channels=3, hidden_size=128,
                    num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-6)
    dec = GPT2Config(vocab_size=len(vocab), n_positions=16, n_embd=128, n_layer=3, n_head=4,
                     n_inner=256, add_cross_attention=True, is_decoder=True,
                     bos_token_id=vocab["[BOS]"], eos_token_id=vocab["[EOS]"],
                     pad_token_id=vocab["[PAD]"], tie_word_embeddings=False,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id = vocab["[BOS]"]
    cfg.pad_token_id = vocab["[PAD]"]
    cfg.eos_token_id = vocab["[EOS]"]
    cfg.tie_word_embeddings = False
    model = VisionEncoderDecoderModel(config=cfg)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=vocab["[BOS]"], bos_token_id=vocab["[BOS]"],
        eos_token_id=vocab["[EOS]"], pad_token_id=vocab["[PAD]"], max_new_tokens=MAX_CAPTION_TOKENS - 1,
        num_beams=1, do_sample=False)
    return model


def timm_vit_to_hf_encoder(sd: dict) -> dict:
    """Rename a timm ``VisionTransformer`` state dict to a transformers ``ViTModel`` one.

    The captioner's encoder starts from the trained ``shapes-vit`` (same sizes). timm's fused
    ``qkv`` is split into ``q_proj``, ``k_proj``, ``v_proj`` (rows in that order); the
    classifier head is dropped. Both use LayerNorm eps 1e-6 and exact GELU, so the encoder
    computes the same features as ``timm_model.forward_features`` (tested).

    Args:
        sd: the timm state dict.

    Returns:
        The state dict of a transformers ``ViTModel`` (without the pooler).
    """
    out = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.position_embeddings": sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"],
        "layernorm.bias": sd["norm.bias"],
    }
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    names = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"layers.{i}."
        for a, b in names.items():
            for p in ("weight", "bias"):
                out[f"{dst}{b}.{p}"] = sd[f"{src}{a}.{p}"]
        for p in ("weight", "bias"):
            q, k, v = sd[f"{src}attn.qkv.{p}"].chunk(3, dim=0)
            out[f"{dst}attention.q_proj.{p}"] = q
            out[f"{dst}attention.k_proj.{p}"] = k
            out[f"{dst}attention.v_proj.{p}"] = v
    return out


def build_shapes_captioner(tokenizer_path: str | None = None):
    """``shapes-captioner`` as a :class:`~vitviz.models.VisionModel` (with its tokenizer), untrained."""
    from .._vision_model import wrap

    # the ViT encoder puts one CLS token before the 8x8 patches
    return wrap(shapes_captioner_module(), num_prefix=1, tokenizer=load_tokenizer(tokenizer_path),
                preprocess=preprocess(), name="shapes-captioner")


def caption_ids(captions: list[str], tokenizer, length: int = MAX_CAPTION_TOKENS - 1) -> torch.Tensor:
    """Token ids of captions followed by ``[EOS]``, padded with ``[PAD]`` to ``length``.

    Shape:
        ``[B, length]`` long
    """
    vocab = tokenizer.get_vocab()
    rows = []
    for c in captions:
        ids = tokenizer(c, add_special_tokens=False)["input_ids"] + [vocab["[EOS]"]]
        rows.append(ids + [vocab["[PAD]"]] * (length - len(ids)))
    return torch.tensor(rows, dtype=torch.long)
