"""Text -> image maps for contrastive image-text models: where does this image match "a red circle"?

One map per text over the image's patch grid, for transformers ``CLIPModel`` and
``SiglipModel``, open_clip CLIP models and the bundled ``shapes-clip``. This module sits
above ``hooks`` (capture) and ``analyze`` (the formulas), as :func:`vitviz.explain.relevance` does: it
knows, per model family, where the text tower, the vision tower, the pooling and the logit
are (:class:`_Towers`); the attention and its gradients are read by :func:`vitviz.capture`.

The score explained for text ``t`` is the model's own image-text logit: CLIP's
``logit_scale.exp() · cos(image, text)`` (``logits_per_image[0, t]``), SigLIP's
``logit_scale.exp() · cos + logit_bias`` (the logit of its sigmoid), open_clip's scaled
cosine (plus its ``logit_bias`` where the model has one). ``T`` texts are explained in one
batch: the image is repeated ``T`` times and copy ``t`` is scored against text ``t`` (copies
do not interact in a ViT), so one backward pass gives every text its own gradients.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._util.extras import require_extra
from ..analyze.gradient import RelevanceStream
from ..analyze.text_image import LeGradStream, patch_text_logits
from ..attention import capture
from ..errors import UnknownTokenWarning, VitvizError
from ..models import VisionModel, wrap
from ._lrp import LRP_METHODS, lrp_gradient, patch_sums
from ._shared import captured, grid_of

METHODS = ("chefer", "legrad", "maskclip", "attnlrp", "cp-lrp")
# LeGrad's default: the last two layers (the authors' wrapper starts at layer index -2)
LEGRAD_START = -2

Texts = str | Sequence[str] | torch.Tensor


@dataclass
class TextMaps:
    """What one :func:`text_maps` call produced.

    Attributes:
        maps: ``[T, gh, gw]`` float32, one map per text (patch tokens, not rescaled).
        scores: ``[T]`` float32, the model's image-text logit of each text.
        texts: the texts as given (strings), or None for token ids.
        method: the method that made the maps.
        notes: what the user should know (e.g. texts truncated to the model's context, words
            outside the tokenizer's vocabulary).
    """

    maps: torch.Tensor
    scores: torch.Tensor
    texts: list[str] | None
    method: str
    notes: list[str]


def _pooler(out: Any) -> torch.Tensor:
    """The embedding in a transformers ``get_*_features`` output (a tensor, or ``pooler_output``)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _first(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


class _Towers:
    """One contrastive model: its vision tower (what is captured), text tower, pooling and logit.

    Subclasses say where each part is for one family; nothing here changes the model.
    """

    family = ""
    sigmoid = False  # the logit is that of a sigmoid (a learnt bias is added)
    # MaskCLIP reads the last block's input (that block's attention read by its value path), or,
    # for a tower pooled by an attention head (SigLIP), the last block's output (the head's value path)
    dense_from_output = False

    def __init__(self, vm: VisionModel):
        self.vm = vm
        self.model = vm.module

    # -- parts -----------------------------------------------------------------------------
    tower: nn.Module  # the vision tower: its forward takes the pixels
    num_prefix: int
    context_length: int

    def blocks(self) -> list[nn.Module]:
        """The vision tower's transformer blocks, in order."""
        raise NotImplementedError

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` image embeddings, by the model's own method (runs the vision tower)."""
        raise NotImplementedError

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``[T, D]`` text embeddings, by the model's own method."""
        raise NotImplementedError

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, N, D]`` tokens of a layer -> ``[B, D]`` embedding: the final norm and projection
        (or attention-pool head) applied as to the last layer's tokens."""
        raise NotImplementedError

    def dense(self, h: torch.Tensor) -> torch.Tensor:
        """MaskCLIP patch embeddings ``[B, P, D]`` from the last block's input ``h`` ``[B, N, D]``
        (its output where :attr:`dense_from_output`)."""
        raise NotImplementedError

    def scale_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The logit scale (exponentiated) and bias, as 0-d float32 tensors."""
        scale = self.model.logit_scale.detach().float().exp().reshape(())
        bias = getattr(self.model, "logit_bias", None)
        b = bias.detach().float().reshape(()) if bias is not None else torch.zeros((), device=scale.device)
        return scale, b

    def logits(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Row-wise logits ``[B]`` of image ``b`` against text ``b`` (``[B, D]`` each), as the model."""
        scale = self.model.logit_scale.exp().reshape(())
        image = image / image.norm(p=2, dim=-1, keepdim=True)
        text = text / text.norm(p=2, dim=-1, keepdim=True)
        out = (image * text.to(image.dtype)).sum(dim=-1) * scale  # [B]
        bias = getattr(self.model, "logit_bias", None)
        return out + bias.reshape(()) if bias is not None else out

    # -- tokens ----------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
        """``(ids [T, L], attention mask [T, L] or None, notes)`` with the model's tokenizer."""
        raise NotImplementedError

    def _no_tokenizer(self) -> VitvizError:
        return VitvizError(
            f"{self.vm.name} has no tokenizer, so texts given as strings cannot be turned into tokens; "
            "pass token ids (a LongTensor [T, L]) or wrap the model with its tokenizer: "
            "vitviz.wrap(model, tokenizer=...)")

    def _truncated(self, texts: list[str], lengths: list[int]) -> list[str]:
        long = [t for t, n in zip(texts, lengths, strict=True) if n > self.context_length]
        if not long:
            return []
        note = (f"{len(long)} text(s) are longer than {self.vm.name}'s context of {self.context_length} "
                f"tokens and were truncated (first: {long[0][:60]!r}); shorten them to keep every word")
        warnings.warn(note, stacklevel=3)
        return [note]

    def _unknown(self, tok: Any, texts: list[str]) -> list[str]:
        """Warn (:class:`vitviz.errors.UnknownTokenWarning`) naming the words of ``texts`` that the
        tokenizer reads as its unknown token; the note, or nothing."""
        words = unknown_words(tok, texts)
        if not words:
            return []
        unk = getattr(tok, "unk_token", None) or "the unknown token"
        vocab = _small_vocabulary(tok)
        known = f"; the words it knows: {', '.join(vocab)}" if vocab else ""
        note = (f"{len(words)} word(s) are not in {self.vm.name}'s vocabulary and were read as {unk}: "
                + ", ".join(f'"{w}"' for w in words)
                + f"; the maps and scores do not see them: use words the tokenizer knows{known}")
        warnings.warn(note, UnknownTokenWarning, stacklevel=3)
        return [note]


class _HFTowers(_Towers):
    """transformers ``CLIPModel`` and ``SiglipModel`` (and models built like them)."""

    def __init__(self, vm: VisionModel):
        super().__init__(vm)
        m = self.model
        self.family = "siglip" if getattr(m, "logit_bias", None) is not None else "clip"
        self.sigmoid = self.family == "siglip"
        self.dense_from_output = self.sigmoid
        self.tower = m.vision_model
        self.num_prefix = 0 if self.sigmoid else 1
        self.context_length = int(m.config.text_config.max_position_embeddings)

    def blocks(self) -> list[nn.Module]:
        t = self._vision()
        return list(t.encoder.layers)

    def _vision(self) -> nn.Module:
        """The module holding ``post_layernorm`` and (SigLIP) ``head``."""
        t = self.tower
        return t if hasattr(t, "post_layernorm") else t.vision_model

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return _pooler(self.model.get_image_features(pixel_values=x))

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return _pooler(self.model.get_text_features(input_ids=ids, attention_mask=mask))

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        v = self._vision()
        if self.sigmoid:  # SigLIP: post-norm on every token, then the attention-pool head
            return v.head(v.post_layernorm(tokens))
        return self.model.visual_projection(v.post_layernorm(tokens[:, 0]))

    def dense(self, h: torch.Tensor) -> torch.Tensor:
        if self.sigmoid:
            # SigLIP pools with an attention head: its value path for every token of the encoder's
            # output h (MaskCLIP's treatment of CLIP's attention pooling), then the head's own MLP residual
            v = self._vision()
            z = v.post_layernorm(h)  # [B, N, D]: what the head reads
            att = v.head.attention  # nn.MultiheadAttention
            d = z.shape[-1]
            w_v = att.in_proj_weight[2 * d:]
            b_v = att.in_proj_bias[2 * d:] if att.in_proj_bias is not None else None
            o = att.out_proj(nn.functional.linear(z, w_v, b_v))  # [B, N, D]
            o = o + v.head.mlp(v.head.layernorm(o))
            return o
        last = self.blocks()[-1]
        attn = last.self_attn
        o = attn.out_proj(attn.v_proj(last.layer_norm1(h)))  # [B, N, D] values through the output projection
        v = self._vision()
        return self.model.visual_projection(v.post_layernorm(o[:, self.num_prefix:]))

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
        tok = self.vm.tokenizer
        if tok is None:
            raise self._no_tokenizer()
        padding: bool | str = "max_length" if self.sigmoid else True
        lengths = [len(ids) for ids in tok(texts)["input_ids"]]
        notes = self._truncated(texts, lengths) + self._unknown(tok, texts)
        enc = tok(texts, padding=padding, truncation=True, max_length=self.context_length, return_tensors="pt")
        mask = None if self.sigmoid else enc.get("attention_mask")  # SigLIP is trained on padded text, unmasked
        return enc["input_ids"], mask, notes


class _OpenClipTowers(_Towers):
    """open_clip CLIP models with a ViT image tower (``model.visual`` a ``VisionTransformer``)."""

    family = "open_clip"

    def __init__(self, vm: VisionModel):
        super().__init__(vm)
        m = self.model
        self.tower = m.visual
        if not hasattr(self.tower, "transformer") or getattr(self.tower, "attn_pool", None) is not None:
            raise VitvizError(
                f"{vm.name}: text maps support open_clip models whose image tower is a ViT without "
                f"attentional pooling; its image tower is {type(self.tower).__name__}")
        self.num_prefix = 1  # open_clip's VisionTransformer always puts its class token first
        self.context_length = int(getattr(m, "context_length", 77))
        self.sigmoid = getattr(m, "logit_bias", None) is not None

    def blocks(self) -> list[nn.Module]:
        return list(self.tower.transformer.resblocks)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.model.encode_text(ids)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled = self.tower._pool(tokens)[0]  # the tower's own pooling and final norm
        proj = self.tower.proj
        return pooled @ proj if proj is not None else pooled

    def dense(self, h: torch.Tensor) -> torch.Tensor:
        last = self.blocks()[-1]
        att = last.attn  # nn.MultiheadAttention
        d = h.shape[-1]
        w_v = att.in_proj_weight[2 * d:]
        b_v = att.in_proj_bias[2 * d:] if att.in_proj_bias is not None else None
        o = att.out_proj(nn.functional.linear(last.ln_1(h), w_v, b_v))  # [B, N, D]
        o = self.tower.ln_post(o[:, self.num_prefix:])
        proj = self.tower.proj
        return o @ proj if proj is not None else o

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
        tok = self.vm.tokenizer
        if tok is None:
            vocab = getattr(self.model, "vocab_size", None)
            if vocab != 49408:  # open_clip's default BPE tokenizer fits only its 49408-token vocabulary
                raise self._no_tokenizer()
            open_clip = require_extra("clip", "text maps of open_clip models")
            tok = open_clip.SimpleTokenizer(context_length=self.context_length)
        notes: list[str] = []
        if hasattr(tok, "encode") and hasattr(tok, "sot_token_id"):  # open_clip's SimpleTokenizer
            notes = self._truncated(texts, [len(tok.encode(t)) + 2 for t in texts])
            ids = tok(texts, context_length=self.context_length)
        else:
            out = tok(texts)
            ids = out if isinstance(out, torch.Tensor) else torch.as_tensor(out["input_ids"])
            notes = self._truncated(texts, [int(ids.shape[-1])] * len(texts)) if ids.shape[-1] > self.context_length \
                else []
            notes += self._unknown(tok, texts)
            ids = ids[:, :self.context_length]
        return ids.long(), None, notes


def unknown_words(tokenizer: Any, texts: Sequence[str]) -> list[str]:
    """The words of ``texts`` that ``tokenizer`` reads as its unknown token, each once, in order.

    A word-level vocabulary (``shapes-clip``) has no token for words it was not built with:
    ``"a dog on a skateboard"`` becomes ``[BOS] a [UNK] [UNK] a [UNK] [EOS]``. Byte-level BPE
    tokenizers (CLIP's, open_clip's) have no unknown token and give ``[]``.

    Args:
        tokenizer: a transformers tokenizer (one with ``unk_token_id``; others give ``[]``).
        texts: the texts.

    Returns:
        The unknown words as written in the texts (``"dog"``, ``"Circle."``).
    """
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not callable(tokenizer):
        return []
    found: list[str] = []
    enc = None
    if getattr(tokenizer, "is_fast", False):  # exact spans from the offsets
        try:
            enc = tokenizer(list(texts), return_offsets_mapping=True, return_special_tokens_mask=True)
        except (TypeError, ValueError, NotImplementedError, KeyError):
            enc = None
    if enc is not None and "offset_mapping" in enc and "special_tokens_mask" in enc:
        for text, ids, spans, special in zip(texts, enc["input_ids"], enc["offset_mapping"],
                                             enc["special_tokens_mask"], strict=True):
            for i, (a, b), sp in zip(ids, spans, special, strict=True):
                if i == unk and not sp and b > a:  # an unknown word, not the special token of a template
                    found.append(text[a:b])
    else:  # other tokenizers: word by word
        for text in texts:
            for word in text.split():
                ids = tokenizer(word, add_special_tokens=False)["input_ids"]
                if unk in ids:
                    found.append(word)
    return list(dict.fromkeys(found))


def _small_vocabulary(tokenizer: Any, most: int = 40) -> list[str]:
    """The words of a small word-level vocabulary (at most ``most``, special tokens left out),
    sorted; ``[]`` for a larger one."""
    get = getattr(tokenizer, "get_vocab", None)
    if not callable(get):
        return []
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    words = sorted(w for w in get() if w not in special)
    return words if len(words) <= most else []


def towers(model: Any) -> _Towers:
    """The :class:`_Towers` of a contrastive image-text model, or a :class:`VitvizError`.

    Looks only at the model's attributes (nothing runs or changes): transformers-style
    (``get_image_features``, ``get_text_features``, ``vision_model``, ``logit_scale``) first,
    then open_clip-style (``encode_image``, ``encode_text``, ``visual``, ``logit_scale``).

    Args:
        model: a :class:`vitviz.VisionModel`, or a module (wrapped with :func:`vitviz.wrap`).

    Returns:
        A :class:`_HFTowers` (transformers ``CLIPModel`` / ``SiglipModel`` and models built like
        them) or a :class:`_OpenClipTowers` (open_clip CLIP models, ``shapes-clip``).

    Raises:
        VitvizError: the model has neither set of attributes: it has no text tower (e.g. an
            image classifier).
    """
    vm = model if isinstance(model, VisionModel) else wrap(model)
    m = vm.module
    if all(hasattr(m, a) for a in ("get_image_features", "get_text_features", "vision_model", "logit_scale")):
        return _HFTowers(vm)
    if all(hasattr(m, a) for a in ("encode_image", "encode_text", "visual", "logit_scale")):
        return _OpenClipTowers(vm)
    raise VitvizError(
        f"{vm.name} ({type(m).__name__}) has no text tower: text maps need a contrastive image-text "
        "model (transformers CLIPModel or SiglipModel, an open_clip CLIP model, or 'shapes-clip'); "
        "for an image classifier use vitviz.relevance")


def _token_ids(tw: _Towers, texts: Texts) -> tuple[torch.Tensor, torch.Tensor | None, list[str] | None, list[str]]:
    """``(ids [T, L], mask, texts as strings or None, notes)``, checked."""
    if isinstance(texts, torch.Tensor):
        ids = texts
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.is_floating_point() or ids.dtype == torch.bool or ids.numel() == 0:
            raise VitvizError(f"token ids must be a non-empty LongTensor [T, L], got {ids.dtype} "
                              f"{tuple(texts.shape)}")
        if ids.shape[1] > tw.context_length:
            raise VitvizError(
                f"token ids of length {ids.shape[1]} exceed {tw.vm.name}'s context of {tw.context_length} "
                "tokens; give at most that many (or pass strings, which are truncated by the tokenizer)")
        return ids.long(), None, None, []
    items = [texts] if isinstance(texts, str) else list(texts)
    if not items:
        raise VitvizError("no text given: pass at least one text (a string, a list of strings or token ids [T, L])")
    if not all(isinstance(t, str) for t in items):
        bad = next(t for t in items if not isinstance(t, str))
        raise VitvizError(f"texts must be strings or a LongTensor of token ids, got a {type(bad).__name__}")
    ids, mask, notes = tw.tokenize(items)
    return ids, mask, items, notes


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise VitvizError(f"unknown text-map method {method!r}; use one of {', '.join(METHODS)}")


def _block_outputs(blocks: list[nn.Module], store: dict[int, torch.Tensor], *, inputs: bool = False):
    """Forward hooks storing each block's output (or input) tokens ``[B, N, D]`` by block index."""
    handles = []
    for i, block in enumerate(blocks):
        if inputs:
            def pre(_m, args, i=i):
                store[i] = _first(args)
            handles.append(block.register_forward_pre_hook(pre))
        else:
            def post(_m, _args, out, i=i):
                store[i] = _first(out)
            handles.append(block.register_forward_hook(post))
    return handles


def text_maps(model: Any, image: Any, texts: Texts, *, method: str = "chefer",
              start_layer: int | None = None) -> TextMaps:
    """:func:`explain_text` that also returns the scores and any notes.

    Args:
        model: a contrastive image-text model (as :func:`explain_text`).
        image: a path, PIL image, ``HxWx3`` uint8 array, or a preprocessed ``[1, 3, H, W]``.
        texts: a string, a list of strings, or a ``LongTensor [T, L]`` (or ``[L]``) of token ids.
        method: ``"chefer"``, ``"legrad"``, ``"maskclip"``, ``"attnlrp"`` or ``"cp-lrp"`` (see
            :func:`explain_text`).
        start_layer: first layer taken into account (chefer: default 0; legrad: default -2;
            not accepted by maskclip and the LRP methods).

    Returns:
        :class:`TextMaps`: ``maps`` ``[T, gh, gw]`` float32 (one per text over the image's
        patch grid, prefix tokens dropped, not rescaled), ``scores`` ``[T]`` float32 (the
        model's image-text logit of each text), ``texts`` (the strings, or None for token ids),
        ``method`` and ``notes`` (e.g. texts truncated to the model's context, words outside the
        tokenizer's vocabulary: also warned, the latter as :class:`vitviz.errors.UnknownTokenWarning`).

    Raises:
        VitvizError: an unknown method, ``start_layer`` with maskclip (or out of range with
            legrad), no text or texts that are neither strings nor integer token ids, token ids
            longer than the model's context, strings for a model without a tokenizer, a model
            without a text tower, a batch of more than one image, or captured layers that do not
            match the vision tower's blocks (legrad).
        ValueError: ``start_layer`` out of range with chefer (from the relevance stream).
        MissingExtraError: an open_clip model without its own tokenizer and open_clip not
            installed.
        ImageError: the image cannot be read.
        CaptureError: no self-attention of the vision tower was captured.

    Shape:
        image ``[1, 3, H, W]``, texts ``T`` -> maps ``[T, gh, gw]``, scores ``[T]``
    """
    _check_method(method)
    if method == "maskclip" and start_layer is not None:
        raise VitvizError("start_layer does not apply to method='maskclip' (it reads the last layer only)")
    if method in LRP_METHODS and start_layer is not None:
        raise VitvizError(f"start_layer does not apply to method={method!r} (LRP propagates through every layer)")
    vm = model if isinstance(model, VisionModel) else wrap(model)
    tw = towers(vm)
    ids, mask, strings, notes = _token_ids(tw, texts)
    x = vm.preprocess(image)  # [1, 3, H, W]
    if x.shape[0] != 1:
        raise VitvizError(f"explain_text takes one image, got a batch of {x.shape[0]}; call it once per image")
    dev = x.device
    ids = ids.to(dev)
    mask = mask.to(dev) if mask is not None else None
    num_texts = ids.shape[0]
    tower_vm = wrap(tw.tower, num_prefix=tw.num_prefix, has_cls=tw.num_prefix > 0 or None,
                    name=f"{vm.name} vision tower")
    with torch.no_grad():
        text = tw.encode_text(ids, mask)  # [T, D]
    blocks = tw.blocks()
    store: dict[int, torch.Tensor] = {}

    if method == "maskclip":
        handles = _block_outputs(blocks[-1:], store, inputs=not tw.dense_from_output)
        try:
            image_emb, rec = captured(tower_vm, x, forward=tw.encode_image, keep="none")  # [1, D]
        finally:
            for h in handles:
                h.remove()
        layout = tower_vm.layout_for(rec.passes[-1].input_hw, store[0].shape[1])
        with torch.no_grad():
            dense = tw.dense(store[0])  # [1, P, D]
            scale, bias = tw.scale_bias()
            maps = patch_text_logits(dense, text, layout, scale=scale, bias=bias)  # [T, gh, gw]
            scores = tw.logits(image_emb.expand(num_texts, -1), text)  # [T]
        return TextMaps(maps, scores.detach().float(), strings, method, notes)

    # one copy of the image per text: copy t is scored against text t
    xb = x.detach().repeat(num_texts, 1, 1, 1)  # [T, 3, H, W]
    if method == "chefer":
        stream = RelevanceStream("chefer", start_layer=0 if start_layer is None else start_layer)
        scores, rec = captured(tower_vm, xb, grad=True, forward=lambda t: tw.logits(tw.encode_image(t), text),
                               score=lambda out, _rec: out.sum(), keep="none", streams={"map": stream})  # [T]
        maps = rec.stream("map")  # [T, gh, gw]
        return TextMaps(maps, scores.detach().float(), strings, method, notes)
    if method in LRP_METHODS:  # the rules on the vision tower and the logit; the texts are constants
        grad, scores = lrp_gradient(lambda t: tw.logits(tw.encode_image(t), text), xb, lambda out: out.sum(),
                                    method=method, name=tower_vm.name)  # [T, 3, H, W], [T]
        pixels = (xb * grad).sum(dim=1).float()  # [T, H, W]: Σ_c x ⊙ ∂s_t/∂x under the rules
        maps = patch_sums(pixels, grid_of(tower_vm, xb))  # [T, gh, gw]
        return TextMaps(maps, scores.detach().float(), strings, method, notes)
    # LeGrad: one backward pass per layer, each of that layer's own pooled score
    xb = xb.requires_grad_(True)
    legrad = LeGradStream(LEGRAD_START if start_layer is None else start_layer)
    handles = _block_outputs(blocks, store)
    try:
        with torch.enable_grad(), capture(tower_vm, grad=True, keep="none", streams={"map": legrad}) as rec:
            scores = tw.logits(tw.encode_image(xb), text)  # [T]
            graph = rec.grad_inputs()  # one per layer, in order
            n = len(graph)
            if n != len(blocks):
                raise VitvizError(f"{vm.name}: {n} attention layers were captured for {len(blocks)} blocks")
            first = LEGRAD_START if start_layer is None else start_layer
            if not -n <= first < n:
                raise VitvizError(f"start_layer {first} is out of range for {n} layers")
            for layer in range(first % n, n):
                s_l = tw.logits(tw.pool(store[layer]), text).sum()  # Σ_t s_l(t)
                torch.autograd.grad(s_l, [graph[layer]], retain_graph=layer < n - 1)
            maps = rec.stream("map")  # [T, gh, gw]
    finally:
        for h in handles:
            h.remove()
        store.clear()
    return TextMaps(maps, scores.detach().float(), strings, method, notes)


def explain_text(model: Any, image: Any, texts: Texts, *, method: str = "chefer",
                 start_layer: int | None = None) -> torch.Tensor:
    """Text -> image maps: which patches make this image match each text?

    Args:
        model: a contrastive image-text model: a :class:`vitviz.VisionModel` or module of
            transformers ``CLIPModel`` / ``SiglipModel``, an open_clip CLIP model, or
            ``vitviz.load_model("shapes-clip")``.
        image: a path, PIL image, ``HxWx3`` uint8 array, or a preprocessed ``[1, 3, H, W]``.
        texts: a string, a list of strings (tokenized with the model's own tokenizer; words it
            does not know are warned about, :class:`vitviz.errors.UnknownTokenWarning`), or a
            ``LongTensor [T, L]`` of token ids.
        method: what explains the image-text logit of each text:

            - ``"chefer"``: Chefer et al. 2021 (their CLIP notebook): per vision layer
              ``R += mean_h[(∇A ⊙ A)⁺] R``; the map is the CLS row of ``R`` over the patches
              (SigLIP, without CLS: the mean of the patch rows).
            - ``"legrad"``: Bousselham et al. 2024 (LeGrad): for each layer from
              ``start_layer`` (default the last two), the score of that layer's pooled token
              through the final norm and projection (SigLIP: through the attention-pool head),
              differentiated w.r.t. that layer's attention; the map is
              ``Σ_l mean_{h, q} ReLU(∂s_l/∂A_l)`` over the patch keys.
            - ``"maskclip"``: Zhou et al. 2022 (MaskCLIP): the logit of every patch embedding
              taken from the last layer's values through its output projection, the final
              norm and projection. No gradients.
            - ``"attnlrp"`` / ``"cp-lrp"``: layer-wise relevance propagation of the logit
              through the vision tower with AttnLRP's (Achtibat et al. 2024) or CP-LRP's (Ali et
              al. 2022) rules (as :func:`vitviz.relevance`; the normalisation of the embedding
              gets the identity rule), summed within each patch.
        start_layer: first layer taken into account (chefer: default 0; legrad: default -2).

    Returns:
        ``[T, gh, gw]`` float32, one map per text over the image's patch grid (prefix tokens
        dropped), not rescaled.

    Raises:
        VitvizError: no text, a model without a text tower, strings for a model without a
            tokenizer, token ids longer than the model's context, an unknown method.

    Example:
        >>> m = vitviz.load_model("shapes-clip")
        >>> maps = vitviz.explain_text(m, "shapes.png", ["a red circle", "a blue square"])
        >>> maps.shape  # [2, 8, 8]
    """
    return text_maps(model, image, texts, method=method, start_layer=start_layer).maps

