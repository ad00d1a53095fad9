"""The ``caption`` API: generate once, read the cross-attention in one teacher-forced pass."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ...errors import CaptureError, ImageError, VitvizError
from ...types import AttentionMaps, CrossAttentionMaps
from .._lrp import LRP_METHODS
from ._decoding import _hf_kind, _logits, decode_once
from ._words import Word, split_words


@dataclass
class Caption:
    """A generated caption and the cross-attention behind every token.

    Attributes:
        text: the caption (special tokens removed).
        tokens: the ``T`` predicted tokens as the tokenizer's pieces (``"Ġdog"``, ``"##ing"``),
            or as token ids (``"1043"``) when no tokenizer is available. The end token is
            not included.
        cross: :class:`CrossAttentionMaps` ``[L, 1, H, T, Ni]`` over all encoder tokens (its
            layout says which are patches); row ``t`` is the cross-attention of the decoder
            query that predicted token ``t``.
        words: :class:`Word` s, sub-word pieces merged for display (see :func:`split_words`).
        ids: ``[S]`` the whole generated sequence: given tokens, predicted tokens, end token.
        token_ids: the ``T`` predicted token ids.
        prompt_len: ``P``, the number of given tokens at the start of ``ids``.
        encoder: the image encoder's self-attention ``[L, 1, H, N, N]`` of the same forward
            pass (for ``word_grids(..., rollout=True)``), or ``None`` (e.g. a CNN encoder).
        image: the ``HxWx3`` uint8 image the model saw, when the input was an image.
        note: a remark for the user (e.g. no tokenizer: words are token ids), or ``None``.
        relevance: with ``caption(..., relevance=True)``, the gradient-weighted relevance of
            every encoder token for every predicted token (Chefer et al. 2021, encoder-decoder
            rules, :func:`vitviz.analyze.cross.encoder_decoder_relevance`), stored as
            :class:`CrossAttentionMaps` ``[1, 1, 1, T, Ni]`` (one "layer", one "head"): draw it
            with ``word_grids(cap, method="relevance")``. With ``relevance="attnlrp"`` /
            ``"cp-lrp"``: the LRP relevance of every patch instead (prefix tokens 0).
        image_grids: decoder-only vision-language models: the grids of image tokens the language
            model sees, each an :class:`~vitviz.explain.captioning.ImageGrid` (its first key in
            ``cross``, ``(gh, gw)``, the region of the model's input it covers, pixels per token);
            None for encoder-decoders (``cross.layout`` is the encoder's).
        qformer: BLIP-2: the Q-Former's cross-attention ``[Lq, 1, H, Q, N]`` (its ``Q`` queries over
            the vision tower's tokens, on their layout), through which :func:`vitviz.word_grids`
            reads the language model's attention over the queries back to patches; else None.
    """

    text: str
    tokens: list[str]
    cross: CrossAttentionMaps
    words: list[Word] = field(default_factory=list)
    ids: torch.Tensor | None = None
    token_ids: list[int] = field(default_factory=list)
    prompt_len: int = 1
    encoder: AttentionMaps | None = None
    image: np.ndarray | None = None
    note: str | None = None
    relevance: CrossAttentionMaps | None = None
    image_grids: tuple[Any, ...] | None = None
    qformer: CrossAttentionMaps | None = None

    def word_grids(self, **kwargs) -> torch.Tensor:
        """:func:`vitviz.word_grids` of this caption (same arguments).

        Args:
            **kwargs: the keyword arguments of :func:`vitviz.word_grids` (``layer``,
                ``head_fusion``, ``merge``, ``spans``, ``rollout``, ``method``; ``sample``
                defaults to 0, the one sample a Caption holds).

        Returns:
            float32 patch maps, prefix tokens dropped, not re-normalised: ``[T, gh, gw]`` by
            default (one per predicted token), ``[W, gh, gw]`` with ``merge``, with a leading
            ``[L, ...]`` for ``layer=None`` and ``[H, ...]`` after it for ``head_fusion=None``.

        Raises:
            ValueError: an unknown method or head fusion, or options the method does not take.
            LayoutError: a layer out of range, ``method="relevance"`` without relevance in the
                caption, or ``merge=`` without word spans.
        """
        from ...analyze.cross import word_grids

        return word_grids(self, **kwargs)

    def figure(self, *, layer: int | None = -1, head_fusion: str = "mean", merge: str = "mean",
               rollout: bool = False, method: str = "attention", **kwargs):
        """The caption strip: one panel per word over the image. Returns ``(fig, axes)``.

        Args:
            layer, head_fusion, rollout, method: as :func:`vitviz.word_grids`.
            merge: how sub-word maps are combined (``"mean"``, ``"sum"`` or ``"max"``).
            **kwargs: passed to :func:`vitviz.render._caption_strip.caption_strip` (``title``
                defaults to the caption's text).

        Returns:
            ``(fig, axes)``: the matplotlib figure and a flat ``np.ndarray`` of the panels'
            axes, image panel first (one panel per word of ``self.words``, each its
            ``[gh, gw]`` map over ``self.image``). ``plt.show()`` is never called.

        Raises:
            ImageError: the caption was made from a preprocessed tensor, so it holds no image.
            LayoutError: as :meth:`word_grids` (a layer out of range, no relevance, no words).
            ValueError: as :meth:`word_grids` (an unknown method, head fusion or merge).
            RenderError: maps the strip cannot draw (e.g. ``layer=None`` gives more than one
                map per word) or a layout option out of range.
        """
        from ...render import caption_strip

        if self.image is None:
            raise ImageError("<tensor>", "this caption was made from a preprocessed tensor, so the image "
                                         "the model saw is unknown; pass the image (path, PIL or "
                                         "array) to vitviz.caption, or draw with caption_strip(image, ...)")
        grids = self.word_grids(layer=layer, head_fusion=head_fusion, merge=merge, rollout=rollout,
                                method=method)
        kwargs.setdefault("title", self.text)
        return caption_strip(self.image, grids, [w.text for w in self.words], **kwargs)

    def _repr_png_(self) -> bytes | None:
        """PNG of :meth:`figure` for notebooks (``None`` without an image)."""
        if self.image is None:
            return None
        import io

        fig, _ = self.figure()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
        return buf.getvalue()

    def __repr__(self) -> str:
        shape = tuple(self.cross.tensor.shape)
        return f"Caption({self.text!r}, tokens={len(self.tokens)}, words={len(self.words)}, cross={shape})"


def _input(vm, image) -> tuple[torch.Tensor, np.ndarray | None]:
    """``([1, 3, H, W] on the model's device, the HxWx3 uint8 view or None)``."""
    if isinstance(image, torch.Tensor):
        x = vm.preprocess(image)  # passed through, [B, 3, H, W]
        view = None
    else:
        from ...models import load_image

        img = load_image(image)
        x = vm.preprocess(img)  # [1, 3, H, W]
        pre = vm.preprocessor
        view = pre.view(img) if hasattr(pre, "view") else None  # [H, W, 3] uint8
    if x.shape[0] != 1:
        raise VitvizError(f"vitviz.caption takes one image, got a batch of {x.shape[0]}; "
                          "caption the images one by one")
    return x, view


def caption(
    model,
    image,
    *,
    max_new_tokens: int = 20,
    num_beams: int = 1,
    tokenizer: Any = None,
    decode: Callable[..., Any] | None = None,
    forward: Callable[[nn.Module, torch.Tensor, torch.Tensor], Any] | None = None,
    start_ids: Sequence[int] | None = None,
    end_ids: Sequence[int] | None = None,
    prompt_len: int | None = None,
    keep_encoder: bool = True,
    relevance: bool | str = False,
    prompt: str | None = None,
    input_ids: Any = None,
    processor: Any = None,
    **generate_kwargs,
) -> Caption:
    """Caption an image and read, for every generated token, the decoder's cross-attention.

    Supported decoders: transformers ``VisionEncoderDecoderModel`` (e.g. ViT + GPT-2) and
    other encoder-decoders, ``BlipForConditionalGeneration``, and any module whose decoder
    attention vitviz can capture (e.g. ``nn.TransformerDecoder`` over a CNN or ViT feature map,
    CATR-style; wrap it with ``vitviz.wrap(module, grid=(gh, gw), num_prefix=0)``). For
    those, the teacher-forced call is ``forward(module, pixel_values, ids)`` (default
    ``module(pixel_values, ids)``) and decoding is, in order: ``decode(module, pixel_values,
    max_new_tokens=N)``, else the module's own ``generate(pixel_values, max_new_tokens=N)``,
    else :func:`greedy_decode` from ``start_ids``.

    Args:
        model: a :class:`vitviz.VisionModel` or a module (wrapped with :func:`vitviz.wrap`).
        image: path, PIL image, ``HxWx3`` uint8 array, or a preprocessed ``[1, 3, H, W]``.
        max_new_tokens: most tokens to generate.
        num_beams: 1 for greedy decoding, more for beam search (the chosen hypothesis is
            the one analysed).
        tokenizer: overrides ``model.tokenizer`` to show words; without one, token ids.
        decode: ``decode(module, pixel_values, max_new_tokens=N) -> ids [1, S]`` (given tokens
            first), for models that are not transformers captioners.
        forward: ``forward(module, pixel_values, ids) -> anything``, the teacher-forced call.
        start_ids: given tokens for the built-in greedy decoding (e.g. ``[bos_id]``).
        end_ids: tokens that end a caption (default: the model's end / [SEP] tokens).
        prompt_len: number of given tokens at the start of the decoded sequence (default:
            ``len(start_ids)``, 1 for transformers captioners and ``generate``/``decode``).
        keep_encoder: keep the encoder self-attention in ``Caption.encoder`` (for rollout
            composition); ``False`` saves its memory.
        relevance: also compute ``Caption.relevance``, the gradient-weighted relevance of
            Chefer et al. 2021 per predicted token: the teacher-forced forward then runs with
            gradients (``vitviz.capture(..., grad=True)``), followed by one backward pass per
            token from its logit. The model's parameters must require grad (the default).
            ``"attnlrp"`` / ``"cp-lrp"`` (encoder-decoder captioners): instead, the LRP relevance
            of every image patch for every predicted token (:func:`vitviz.relevance`'s rules,
            pixel relevance summed per patch; prefix tokens 0), from one forward and one
            backward pass over ``T`` copies of the image (copy ``t`` explains token ``t``).
        prompt: decoder-only vision-language models (LLaVA, PaliGemma, Qwen2-VL, Idefics3, BLIP-2, ...): the user's
            text, put into the processor's chat template with the image (default
            ``"Describe the image."``). Needs a processor.
        input_ids: decoder-only vision-language models without a processor: the prompt's token
            ids ``[S]`` or ``[1, S]``, including the model's image placeholders (one per image
            token the language model sees); ``image`` is then a preprocessed ``[1, 3, H, W]``
            tensor (or an image the model's preprocessing turns into one).
        processor: the model's transformers ``AutoProcessor`` (image processor, tokenizer, chat
            template), for ``prompt=``.
        **generate_kwargs: passed to transformers' / the model's ``generate``.

    For a decoder-only vision-language model, ``cross`` row ``t`` is the language model's
    self-attention from the position whose logits chose token ``t``, over the image-token
    positions: raw weights, not renormalised (rows sum to less than 1; the rest went to text
    tokens), on the grid of image tokens the language model sees (``Caption.image_grids`` says
    which part of the input it covers). ``encoder`` is the vision tower's self-attention of the
    same pass. BLIP-2's image tokens are its Q-Former's queries, not a grid: ``cross`` holds them as
    they are and ``Caption.qformer`` the Q-Former's cross-attention, through which
    :func:`vitviz.word_grids` reads them back to patches (:func:`vitviz.analyze.cross.query_readback`).
    LLaVA-NeXT and Idefics3 / SmolVLM give several grids (``Caption.image_grids``; ``word_grids``
    combines them, see :func:`vitviz.analyze.cross.place_grids`); InstructBLIP takes
    ``qformer_input_ids=`` with ``input_ids=``. LLaVA-OneVision, Idefics2 and BLIP-2 / InstructBLIP
    with Flan-T5 are refused with the reason.

    Returns:
        :class:`Caption` with ``cross`` ``[L, 1, H, T, Ni]``.

    Raises:
        CaptureError: no cross-attention was recorded (the model is not an encoder-decoder
            captioner vitviz can read), or the decoded sequence does not fit.
        ImageError: the image cannot be read.

    Example:
        >>> m = vitviz.load_model("vit-gpt2")
        >>> cap = vitviz.caption(m, "girl.jpg", num_beams=4)
        >>> cap.text, cap.cross.tensor.shape
        ('a young girl holding a slice of pizza', torch.Size([12, 1, 12, 8, 197]))
    """
    from ...models import VisionModel, wrap

    vm = model if isinstance(model, VisionModel) else wrap(model, tokenizer=tokenizer)
    module = vm.module
    lrp = relevance if isinstance(relevance, str) else None
    if lrp is not None and lrp not in LRP_METHODS:
        raise VitvizError(f"relevance must be True, False or one of {', '.join(LRP_METHODS)}, got {relevance!r}")
    if int(max_new_tokens) < 1:
        raise VitvizError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if int(num_beams) < 1:
        raise VitvizError(f"num_beams must be >= 1, got {num_beams}")
    from ._vlm import has_image_input, vlm_family

    family = vlm_family(module)  # a decoder-only vision-language model; refused families raise
    if family is not None:
        unused = [k for k, v in (("decode", decode), ("forward", forward), ("start_ids", start_ids),
                                 ("prompt_len", prompt_len)) if v is not None]
        if unused:
            raise VitvizError(f"{', '.join(unused)} do not apply to {type(module).__name__}: a vision-language model "
                              "is decoded by its own generate() from its prompt (prompt= or input_ids=)")
        if lrp is not None:
            raise VitvizError(f"relevance={lrp!r} is for encoder-decoder captioners; {type(module).__name__} is a "
                              "vision-language model: use relevance=True (Chefer's relevance)")
        return _vlm_caption(vm, family, image, prompt=prompt, input_ids=input_ids, processor=processor,
                            tokenizer=tokenizer, max_new_tokens=int(max_new_tokens), num_beams=int(num_beams),
                            end_ids=end_ids, keep_encoder=keep_encoder, relevance=relevance,
                            generate_kwargs=generate_kwargs)
    if not has_image_input(module):
        raise VitvizError(f"{vm.name} ({type(module).__name__}) has no image input: it is a text-only model; "
                          "vitviz.caption needs an image captioner or a vision-language model")
    if prompt is not None or input_ids is not None:
        raise VitvizError(f"prompt= and input_ids= are for decoder-only vision-language models (captured: LLaVA-1.5, "
                          "LLaVA-NeXT, PaliGemma, Qwen2-VL, Idefics3, BLIP-2, InstructBLIP); "
                          f"{vm.name} ({type(module).__name__}) is not one")
    tok = tokenizer if tokenizer is not None else vm.tokenizer
    x, view = _input(vm, image)  # [1, 3, H, W]
    kind = _hf_kind(module)

    # 1. generate once, nothing hooked ---------------------------------------------------------
    seq, given, ends = decode_once(vm, x, kind, max_new_tokens=int(max_new_tokens), num_beams=int(num_beams),
                                   tokenizer=tok, decode=decode, forward=forward, start_ids=start_ids,
                                   end_ids=end_ids, generate_kwargs=generate_kwargs)
    p = int(prompt_len) if prompt_len is not None else given
    seq = seq.to(x.device)  # [1, S]
    if p < 1 or p > seq.shape[1]:
        raise CaptureError(f"prompt_len={p} does not fit a decoded sequence of {seq.shape[1]} tokens; "
                           "the sequence must start with the given (start) tokens")

    # predicted tokens: after the given ones, up to (not including) the first end token
    predicted = [int(v) for v in seq[0, p:].tolist()]
    end_set = set(int(e) for e in ends)
    cut = next((i for i, v in enumerate(predicted) if v in end_set), len(predicted))
    predicted = predicted[:cut]
    num = len(predicted)

    # 2. one teacher-forced forward over the sequence, captured --------------------------------
    # the query at position p - 1 + t predicted token t: feed up to the last such query
    inp = seq[:, :p + max(num - 1, 0)]  # [1, S']
    positions = [p - 1 + t for t in range(num)]  # the query that predicted token t
    rec, rel = _teacher_forced(vm, x, inp, kind, forward, relevance is True, positions, predicted)
    cross = rec.cross
    if cross is None:
        raise CaptureError(
            f"no cross-attention was recorded from {vm.name}'s teacher-forced forward (hooked: "
            f"{', '.join(s.name for s in rec.sites[:4])}...); vitviz.caption needs a decoder whose "
            "cross-attention vitviz can capture (transformers cross-attention, nn.TransformerDecoder)")
    rows = cross.tensor  # [L, 1, H, Q, Ni]
    if rows.shape[-2] < p - 1 + num:
        raise CaptureError(f"the teacher-forced forward gave {rows.shape[-2]} decoder positions, "
                           f"{p - 1 + num} are needed; forward= must run the decoder over all ids")
    rows = rows[..., p - 1:p - 1 + num, :]  # [L, 1, H, T, Ni]

    pieces, words = split_words(predicted, tok)
    note = None
    if tok is None:
        note = (f"no tokenizer files were found for {vm.name}: words are shown as token ids "
                "(save the tokenizer next to the model, or pass tokenizer=)")
        text = " ".join(pieces)
    else:
        text = tok.decode(predicted, skip_special_tokens=True).strip()
    encoder = rec.attentions if keep_encoder else None
    rel_maps = None
    if lrp is not None and num:
        rel = _word_lrp(vm, x, inp, kind, forward, positions, predicted, cross.layout, lrp)  # [T, Ni]
    if relevance:
        if rel is None:  # an empty caption
            rel = rows.new_zeros(num, rows.shape[-1])
        rel_maps = CrossAttentionMaps(rel[None, None, None], cross.layout, pieces)  # [1, 1, 1, T, Ni]
    return Caption(text=text, tokens=pieces, cross=CrossAttentionMaps(rows, cross.layout, pieces),
                   words=words, ids=seq[0], token_ids=predicted, prompt_len=p, encoder=encoder,
                   image=view, note=note, relevance=rel_maps)



def _vlm_caption(vm: Any, family: str, image: Any, **kwargs: Any) -> Caption:
    """:func:`caption` for a decoder-only vision-language model (see ``_vlm.py``)."""
    from ._vlm import vlm_caption

    r = vlm_caption(vm, family, image, **kwargs)
    tok = r["tokenizer"]
    predicted = r["predicted"]
    pieces, words = split_words(predicted, tok)
    note = r["note"]
    if tok is None:
        note = "; ".join(n for n in (note, f"no tokenizer was found for {vm.name}: words are shown as token ids "
                                           "(pass tokenizer= or processor=)") if n)
        text = " ".join(pieces)
    else:
        text = tok.decode(predicted, skip_special_tokens=True).strip()
    cross = CrossAttentionMaps(r["cross"], r["layout"], pieces)  # [L, 1, H, T, Ni]
    rel = None
    if r["relevance"] is not None:
        rel = CrossAttentionMaps(r["relevance"][None, None, None], r["layout"], pieces)  # [1, 1, 1, T, Ni]
    return Caption(text=text, tokens=pieces, cross=cross, words=words, ids=r["seq"][0], token_ids=predicted,
                   prompt_len=r["prompt_len"], encoder=r["encoder"], image=r["view"], note=note,
                   image_grids=r["grids"], relevance=rel, qformer=r["qformer"])


def _teacher_forced(vm: Any, x: torch.Tensor, inp: torch.Tensor, kind: str | None, forward: Any,
                    relevance: bool, positions: list[int], predicted: list[int]) -> tuple[Any, torch.Tensor | None]:
    """One captured forward over the decoded sequence (teacher forcing); with ``relevance``, the
    relevance of every encoder token for every predicted token. Returns ``(recording, [T, Ni] or None)``."""
    from ...attention import capture

    module = vm.module
    rel = None
    with (torch.enable_grad() if relevance else torch.no_grad()), capture(vm, grad=relevance) as rec:
        if kind == "encoder-decoder":
            out = module(pixel_values=x, decoder_input_ids=inp)
        elif kind == "blip":
            out = module(pixel_values=x, input_ids=inp)
        else:
            out = (forward or (lambda mod, px, ids: mod(px, ids)))(module, x, inp)
        if relevance and rec.cross is not None and predicted:
            rel = _word_relevance(rec, _logits(out), positions, predicted)  # [T, Ni]
    return rec, rel


def _word_lrp(vm: Any, x: torch.Tensor, inp: torch.Tensor, kind: str | None, forward: Any, positions: list[int],
              predicted: list[int], layout: Any, method: str) -> torch.Tensor:
    """LRP relevance (:mod:`vitviz.explain._lrp`) of every encoder token for every predicted token:
    ``T`` copies of the image and the sequence in one batch, copy ``t`` scored by token ``t``'s
    logit at the position that predicted it; the pixel relevance summed per patch, prefix tokens 0.

    Returns:
        ``[T, Ni]`` float32.
    """
    from .._lrp import lrp_gradient, patch_sums

    num = len(predicted)
    xb = x.detach().expand(num, *x.shape[1:]).contiguous()  # [T, 3, H, W]
    ids = inp.expand(num, -1)  # [T, S']
    rows = torch.arange(num, device=x.device)
    pos = torch.tensor(positions, device=x.device)
    tok = torch.tensor(predicted, device=x.device)
    module = vm.module

    def run(t: torch.Tensor) -> Any:
        if kind == "encoder-decoder":
            return module(pixel_values=t, decoder_input_ids=ids)
        if kind == "blip":
            return module(pixel_values=t, input_ids=ids)
        return (forward or (lambda mod, px, i: mod(px, i)))(module, t, ids)

    grad, _ = lrp_gradient(run, xb, lambda out: _logits(out)[rows, pos, tok].sum(), method=method, name=vm.name)
    maps = patch_sums((xb * grad).sum(dim=1).float(), layout.grid)  # [T, gh, gw]
    rel = maps.new_zeros(num, layout.num_tokens)  # [T, Ni]
    rel[:, layout.patches] = maps.flatten(1)
    return rel


def _word_relevance(rec, logits: torch.Tensor, positions: list[int], targets: list[int]) -> torch.Tensor:
    """Chefer et al. 2021 relevance of every encoder token for every predicted token.

    One backward pass per token, from its logit at the position that predicted it, through
    the graph of the single teacher-forced forward (``retain_graph``); the gradients with
    respect to every captured attention tensor are read with ``torch.autograd.grad`` on the
    capture's graph tensors (``rec.grad_inputs``), so parameter ``.grad`` s are untouched.

    Returns:
        ``[T, Ni]`` float32.
    """
    from ...analyze.cross import encoder_decoder_relevance
    from ...attention import CROSS, IMAGE, TEXT

    stacks = {IMAGE: rec.attentions.tensor if rec.attentions is not None else None,
              TEXT: rec.text, CROSS: rec.cross.tensor}  # [L, B, H, Q, K] each
    inputs: dict[str, list[torch.Tensor]] = {}
    for role, stack in stacks.items():
        if stack is None:
            continue
        inputs[role] = rec.grad_inputs(role)
        if len(inputs[role]) != stack.shape[0]:
            raise CaptureError(
                f"{stack.shape[0] - len(inputs[role])} of {stack.shape[0]} {role} attention layers ran "
                "without an autograd graph, so their gradients cannot be read; relevance needs the "
                "model's parameters to require grad (do not freeze them, or pass relevance=False)")
    flat = [t for role in inputs for t in inputs[role]]
    rows = []
    for pos, tok in zip(positions, targets):
        score = logits[0, pos, tok]
        grads = torch.autograd.grad(score, flat, retain_graph=True, allow_unused=True)
        per_role: dict[str, torch.Tensor] = {}
        i = 0
        for role in inputs:
            shape = stacks[role].shape  # [L, B, H, Q, K]
            gs = []
            for _ in range(shape[0]):
                g = grads[i]
                i += 1
                gs.append(torch.zeros(shape[1:], device=stacks[role].device) if g is None
                          else g.detach().float().reshape(shape[1:]))  # [B, H, Q, K]
            per_role[role] = torch.stack(gs)  # [L, B, H, Q, K]
        r = encoder_decoder_relevance(stacks[CROSS], per_role[CROSS], stacks[TEXT], per_role.get(TEXT),
                                      stacks[IMAGE], per_role.get(IMAGE))  # [1, S', Ni]
        rows.append(r[0, pos])  # [Ni]
    return torch.stack(rows)  # [T, Ni]
