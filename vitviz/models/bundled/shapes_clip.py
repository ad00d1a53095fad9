"""``shapes-clip``: a small CLIP (transformers ``CLIPModel``) for the procedural scenes.

Image tower: 64 px input, 8 px patches (8x8 grid plus CLS), 4 layers, width 96, 4 heads.
Text tower: the scenes' words with a word-level tokenizer that puts ``[BOS]`` before and
``[EOS]`` after every text (CLIP pools the ``[EOS]`` token), 2 layers, width 64, context 12.
Joint space of 64 dimensions. Trained contrastively on object phrases (``"a red star"``) and
captions of the caption scenes by ``python -m tools.train.train_clip``; the input is the scene
as it is (:func:`vitviz.models.bundled.shapes.preprocess`).
"""

from __future__ import annotations

import torch

from .shapes import IMAGE_SIZE, PATCH, preprocess, vocabulary, word_tokenizer

TOKENIZER_FILE = "shapes-clip.tokenizer.json"
CONTEXT = 12  # longest caption: 9 words, plus [BOS] and [EOS]
EMBED = 64


def build_tokenizer_file(path) -> None:
    """Write the word-level tokenizer of ``shapes-clip`` (``tokenizers`` JSON) to ``path``:
    the captioner's vocabulary, with ``[BOS] ... [EOS]`` added around every text."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

    vocab = vocabulary()
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("[PAD]", "[BOS]", "[EOS]", "[UNK]")])
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])])
    tok.save(str(path))


def load_tokenizer(path=None):
    """The ``shapes-clip`` tokenizer as a ``PreTrainedTokenizerFast`` (lower-cases nothing:
    the scenes' words are lower case)."""
    return word_tokenizer(path, TOKENIZER_FILE, "the shapes-clip", "tools.train.train_clip",
                          model_max_length=CONTEXT)


def shapes_clip_module(*, vision_layers: int = 4, vision_width: int = 96) -> torch.nn.Module:
    """The ``shapes-clip`` architecture with untrained weights (``CLIPModel``)."""
    from transformers import CLIPConfig, CLIPModel

    vocab = vocabulary()
    text = dict(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=CONTEXT, bos_token_id=vocab["[BOS]"],
                eos_token_id=vocab["[EOS]"], pad_token_id=vocab["[PAD]"], attention_dropout=0.0)
    vision = dict(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=vision_width,
                  intermediate_size=2 * vision_width, num_hidden_layers=vision_layers, num_attention_heads=4,
                  attention_dropout=0.0)
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=EMBED)
    return CLIPModel(cfg).eval()


def build_shapes_clip(tokenizer_path: str | None = None):
    """``shapes-clip`` as a :class:`~vitviz.models.VisionModel` (with its tokenizer), untrained."""
    from .._vision_model import wrap

    return wrap(shapes_clip_module(), num_prefix=1, tokenizer=load_tokenizer(tokenizer_path),
                preprocess=preprocess(), name="shapes-clip")
