"""Word-to-patch maps from a captioner's cross-attention.

A caption decoder attends from every text position to the ``Ni`` encoder tokens
(``CrossAttentionMaps``, ``[L, B, H, T, Ni]``). Row ``t`` is the attention of the query that
predicted word ``t`` (see :func:`vitviz.caption`). This module turns those rows into
``[gh, gw]`` patch maps, one per token or per word:

1. pick a layer (or keep all of them) and a sample;
2. fuse the heads (``mean`` / ``max`` / ``min``, as :func:`vitviz.rollout`), or keep them;
3. optionally compose with the image encoder's attention rollout (Abnar & Zuidema 2020), so
   that the maps refer to *input* patches rather than to encoder *output* tokens:
   ``C' = C @ R`` where ``R = rollout_matrix(encoder attention)``; row ``j`` of ``R`` says how
   much of encoder output token ``j`` flows from each input token, so ``C'[t, i] =
   sum_j C[t, j] R[j, i]`` (rows of ``C`` and ``R`` sum to 1, so rows of ``C'`` do too);
4. keep the patch tokens (prefix tokens such as CLS dropped) and reshape to the grid,
   **not** re-normalised: the renderers scale;
5. optionally merge sub-word pieces into words (see :func:`merge_pieces`).

Everything here is a pure function of tensors: no model, no files, no plotting.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import LayoutError
from ..types import AttentionMaps, CrossAttentionMaps, TokenLayout
from ._rollout import rollout_matrix
from ._tokens import HEAD_FUSIONS, fuse_heads

MERGE_RULES = ("mean", "sum", "max")


def merge_pieces(maps: torch.Tensor, spans: Sequence[Any], rule: str = "mean", dim: int = -3) -> torch.Tensor:
    """Combine the maps of the sub-word pieces of each word.

    The rule, and why ``"mean"`` is the default: before the prefix tokens are dropped every
    piece's cross-attention row is a probability distribution over the encoder tokens; their
    mean is again one, so a word split into three pieces is drawn on the same scale as a word
    of one piece, and a word's map is the average of where its pieces looked. ``"sum"`` adds
    the pieces (total attention spent on the word: long words weigh more); ``"max"`` keeps,
    per patch, the strongest piece.

    Args:
        maps: per-token maps with the token axis at ``dim``, e.g. ``[T, gh, gw]`` (``dim=-3``).
        spans: one ``(start, stop)`` pair (or ``range``, or an object with ``.start`` and
            ``.stop`` such as :class:`vitviz.explain.captioning.Word`) per word; pieces
            ``start <= t < stop``; spans must be non-empty and inside ``[0, T)``.
        rule: ``"mean"`` (default), ``"sum"`` or ``"max"``.
        dim: the token axis of ``maps``.

    Returns:
        ``maps`` with the token axis of length ``W = len(spans)``.

    Raises:
        ValueError: an unknown merge rule.
        LayoutError: a word span that does not fit the tokens.

    Shape:
        ``[..., T, gh, gw]`` -> ``[..., W, gh, gw]`` (with ``dim=-3``)

    Example:
        >>> maps = torch.tensor([[1.0], [3.0], [5.0]]).reshape(3, 1, 1)   # [T=3, 1, 1]
        >>> merge_pieces(maps, [(0, 2), (2, 3)])[:, 0, 0]                   # "pizza" = piz + za
        tensor([2., 5.])
    """
    if rule not in MERGE_RULES:
        raise ValueError(f"merge rule must be one of {', '.join(MERGE_RULES)}, got {rule!r}")
    dim = dim % maps.dim()
    num = maps.shape[dim]
    out = []
    for span in spans:
        start, stop = (span.start, span.stop) if hasattr(span, "start") else (int(span[0]), int(span[1]))
        if not 0 <= start < stop <= num:
            raise LayoutError(f"word span ({start}, {stop}) does not fit {num} tokens: spans must be "
                              f"non-empty (start < stop) and within [0, {num})")
        piece = maps.narrow(dim, start, stop - start)  # [..., n, gh, gw]
        if rule == "mean":
            out.append(piece.mean(dim=dim))
        elif rule == "sum":
            out.append(piece.sum(dim=dim))
        else:
            out.append(piece.amax(dim=dim))
    if not out:
        shape = list(maps.shape)
        shape[dim] = 0
        return maps.new_zeros(shape)
    return torch.stack(out, dim=dim)


def patch_grid(rows: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Drop the prefix tokens of rows over encoder tokens and reshape them to the patch grid.

    Shape:
        ``[..., Ni]`` -> ``[..., gh, gw]``
    """
    if rows.shape[-1] != layout.num_tokens:
        raise LayoutError(
            f"rows over {rows.shape[-1]} encoder tokens do not fit the layout {layout} "
            f"({layout.num_prefix} prefix + {layout.grid[0]}x{layout.grid[1]} patches)")
    return layout.patch_map(rows[..., layout.patches])  # [..., gh, gw]


def query_readback(qformer: CrossAttentionMaps, sample: int = 0) -> torch.Tensor:
    """How much each Q-Former query took from each vision token (BLIP-2), for reading a language
    model's attention over the queries back to patches.

    The rule: the mean over the Q-Former's cross-attention layers and heads,
    ``R[q, n] = mean_{l,h} A_l,h[q, n]``. Its rows sum to 1 (each layer's are probabilities over
    the ``N`` vision tokens), so a word's map ``m = c · R`` (``c`` its attention over the queries)
    keeps the word's total attention on the image tokens, ``Σ_n m[n] = Σ_q c[q]``, and spreads it
    over the patches each query read from (the CLS column is dropped when drawing, as for every map).
    The mean over layers and heads is the same head fusion the maps use by default; it is a
    read-back of where the queries looked, not a causal attribution.

    Args:
        qformer: the Q-Former's cross-attention ``[Lq, B, H, Q, N]`` over the vision tokens' layout.
        sample: which sample.

    Returns:
        ``[Q, N]`` float32.

    Shape:
        ``[Lq, B, H, Q, N]`` -> ``[Q, N]``

    Example:
        >>> query_readback(cap.qformer).shape   # 32 queries over 1 + 16x16 vision tokens
        torch.Size([32, 257])
    """
    t = qformer.tensor
    if not -t.shape[1] <= sample < t.shape[1]:
        raise LayoutError(f"sample {sample} is out of range for {t.shape[1]} Q-Former samples")
    return t[:, sample].float().mean(dim=(0, 1))  # [Q, N]


def _overlap(fine: tuple[float, float, int], coarse: tuple[float, float, int]) -> torch.Tensor:
    """``[nf, nc]``: the share of each coarse cell (along one axis) that falls in each fine cell.

    ``fine`` and ``coarse`` are ``(start, stop, cells)`` of an axis in pixels; column ``j`` sums
    to the part of coarse cell ``j`` that lies inside the fine axis (1 when it lies inside).
    """
    f0, f1, nf = fine
    c0, c1, nc = coarse
    fe = f0 + torch.arange(nf + 1, dtype=torch.float64) * ((f1 - f0) / nf)  # cell edges
    ce = c0 + torch.arange(nc + 1, dtype=torch.float64) * ((c1 - c0) / nc)
    lo = torch.maximum(fe[:-1, None], ce[None, :-1])
    hi = torch.minimum(fe[1:, None], ce[None, 1:])
    return ((hi - lo).clamp(min=0) / (ce[1:] - ce[:-1])[None, :]).float()  # [nf, nc]


def place_grids(rows: torch.Tensor, grids: Sequence[Any], grid: int | None = None) -> torch.Tensor:
    """Rows over the image keys of a vision-language model whose image tokens form several grids
    (LLaVA-NeXT: the base image and the any-resolution tiles; Idefics3 / SmolVLM: the sub-images
    and the global image), as maps on the picture.

    Each grid (an :class:`~vitviz.explain.captioning.ImageGrid`: its first key, ``(gh, gw)``,
    prefix and per-row newline tokens, and the ``region`` of the input it covers) gives its own
    ``[gh, gw]`` map from its keys; prefix and newline tokens are on no grid and are left out.

    The combined map (``grid=None``) is drawn on the finest grid: cells of the smallest grid cell
    (LLaVA-NeXT: the tiles' unpadded grid; Idefics3: the sub-images side by side) over the
    region all the grids cover together. It is the **sum** of every grid's map placed on it by
    area: a cell's value is spread over the fine cells it overlaps, in proportion to the
    overlap, ``m[i] = Σ_grids Σ_j a_j · |fine_i ∩ cell_j| / |cell_j|`` (per axis, in pixels of the
    input). A grid on the fine cells lands on them as it is, and the total is kept: the combined
    map sums to the attention on all the grids' tokens. Not re-normalised.

    Args:
        rows: ``[..., Ni]`` over the image keys.
        grids: the grids, e.g. ``cap.image_grids``.
        grid: ``None`` for the combined map, or the index of one grid for its own map.

    Returns:
        ``[..., gh, gw]`` of the fine grid (``grid=None``) or of grid ``grid``.

    Raises:
        LayoutError: a grid index out of range, or keys that do not fit the rows.

    Example:
        >>> a = torch.tensor([4.0, 0, 0, 0] + [1.0, 0, 0, 0, 9, 0, 0, 0, 0, 9])   # base 2x2 + tiles 2x4 (+ newlines)
        >>> place_grids(a, cap.image_grids)[0]   # base cell (0, 0) spread over two tile cells
        tensor([3., 2., 0., 0.])
    """
    grids = list(grids)
    if grid is not None and not -len(grids) <= grid < len(grids):
        raise LayoutError(f"grid {grid} is out of range for {len(grids)} image grids")
    maps = []
    for g in grids:
        keys = g.keys().to(rows.device)
        if int(keys.max()) >= rows.shape[-1]:
            raise LayoutError(f"an image grid with keys up to {int(keys.max())} does not fit rows over "
                              f"{rows.shape[-1]} image tokens")
        maps.append(rows[..., keys].reshape(*rows.shape[:-1], *g.grid))  # [..., gh, gw]
    if grid is not None:
        return maps[grid]
    ch, cw = min((float(g.cell[0]) * float(g.cell[1]), (float(g.cell[0]), float(g.cell[1]))) for g in grids)[1]
    top, left = min(g.region[0] for g in grids), min(g.region[1] for g in grids)
    bottom, right = max(g.region[2] for g in grids), max(g.region[3] for g in grids)
    fh, fw = max(1, round((bottom - top) / ch)), max(1, round((right - left) / cw))
    out = rows.new_zeros(*rows.shape[:-1], fh, fw, dtype=torch.float32)
    for g, a in zip(grids, maps):
        t, lft, b, r = g.region
        my = _overlap((top, bottom, fh), (t, b, g.grid[0])).to(rows.device)  # [fh, gh]
        mx = _overlap((left, right, fw), (lft, r, g.grid[1])).to(rows.device)  # [fw, gw]
        out = out + my @ a.float() @ mx.T  # [..., fh, fw]
    return out


def _rollout_rows(rollout: object, cross: CrossAttentionMaps, sample: int,
                  head_fusion: str | None) -> torch.Tensor:
    """The encoder rollout matrix ``[Ni, Ni]`` of one sample, for composition."""
    if isinstance(rollout, AttentionMaps):
        if rollout.layout.num_tokens != cross.layout.num_tokens:
            raise LayoutError(
                f"the encoder attention has {rollout.layout.num_tokens} tokens but the "
                f"cross-attention keys are {cross.layout.num_tokens}: pass the encoder attention "
                "of the same forward pass")
        if not -rollout.batch_size <= sample < rollout.batch_size:
            raise LayoutError(f"sample {sample} is out of range for {rollout.batch_size} encoder samples")
        fusion = head_fusion if head_fusion is not None else "mean"
        one = AttentionMaps(rollout.tensor[:, sample:sample + 1 if sample != -1 else None],
                            rollout.layout)  # [L, 1, H, N, N]
        return rollout_matrix(one, head_fusion=fusion)[0]  # [N, N]
    if isinstance(rollout, torch.Tensor):
        r = rollout
        if r.dim() == 3:
            r = r[sample]  # [N, N]
        n = cross.layout.num_tokens
        if r.shape != (n, n):
            raise LayoutError(f"a rollout matrix must be [N, N] or [B, N, N] with N = {n} encoder "
                              f"tokens, got {tuple(rollout.shape)}")
        return r
    raise TypeError("rollout must be False, True (with a Caption), an AttentionMaps of the encoder "
                    f"or a [B, N, N] rollout matrix, got {type(rollout).__name__}")


def word_grids(
    cap: Any,
    *,
    layer: int | None = -1,
    head_fusion: str | None = "mean",
    sample: int = 0,
    merge: str | None = None,
    spans: Sequence[Any] | None = None,
    rollout: bool | AttentionMaps | torch.Tensor = False,
    method: str = "attention",
    grid: int | None = None,
) -> torch.Tensor:
    """Patch maps of what the decoder looked at for every generated token (or word).

    Args:
        cap: a :class:`vitviz.Caption` or a :class:`CrossAttentionMaps` ``[L, B, H, T, Ni]``.
        layer: decoder layer (negative counts from the end); ``None`` keeps all layers.
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads; ``None`` keeps the heads.
        sample: which sample of the batch (a Caption holds one).
        merge: ``None`` (one map per token, default), or ``"mean"`` / ``"sum"`` / ``"max"``:
            one map per word, sub-word pieces combined by :func:`merge_pieces` (``"mean"``
            is the documented display rule). The words come from ``cap.words`` or ``spans``.
        spans: ``(start, stop)`` token spans of the words, for a bare ``CrossAttentionMaps``.
        rollout: ``False`` (default): maps over encoder output tokens. ``True``: composed with
            the rollout of the encoder attention of the same pass (``cap.encoder``), so that
            the maps refer to input patches. Also accepts the encoder :class:`AttentionMaps`
            or a ``[B, N, N]`` rollout matrix. Composition happens after head fusion (for
            ``"mean"`` the same as composing every head); the encoder's rollout fuses its
            heads with the same ``head_fusion`` (``"mean"`` when the heads are kept).
        method: ``"attention"`` (default): the cross-attention ``cap.cross``. ``"relevance"``:
            the gradient-weighted relevance ``cap.relevance`` of a Caption made with
            ``caption(..., relevance=True)`` (Chefer et al. 2021; it already runs through the
            encoder, so ``rollout`` must be False).
        grid: a vision-language model whose image tokens form several grids (LLaVA-NeXT's base
            image and tiles, ``cap.image_grids``): ``None`` (default) for the combined map on the
            finest grid, or the index of one grid for its own map (:func:`place_grids`).

    Returns:
        float32 maps, prefix tokens dropped, not re-normalised:
        ``[T, gh, gw]``; ``[W, gh, gw]`` with ``merge``; a leading ``[L, ...]`` with
        ``layer=None`` and ``[H, ...]`` after it with ``head_fusion=None``.

    Raises:
        ValueError: an unknown method or head fusion, or options the method does not take.
        TypeError: ``cap`` is neither a Caption nor CrossAttentionMaps.
        LayoutError: a layer or sample out of range, no relevance in the caption, or ``merge=``
            without word spans.

    Shape:
        cross ``[L, B, H, T, Ni]`` -> ``[T, gh, gw]`` (default)

    Example:
        >>> cap = vitviz.caption(m, "girl.jpg")
        >>> vitviz.word_grids(cap).shape                 # one map per token
        torch.Size([7, 14, 14])
        >>> vitviz.word_grids(cap, merge="mean").shape   # one map per word
        torch.Size([6, 14, 14])
    """
    if method == "relevance":
        if rollout is not False and rollout is not None:
            raise ValueError("rollout= does not apply to method='relevance': the relevance already "
                             "propagates through the encoder's attention")
        cross = getattr(cap, "relevance", None)
        if cross is None:
            raise LayoutError("no relevance in this caption: make it with "
                              "vitviz.caption(model, image, relevance=True)")
    elif method == "attention":
        cross = getattr(cap, "cross", cap)
    else:
        raise ValueError(f"method must be 'attention' or 'relevance', got {method!r}")
    if not isinstance(cross, CrossAttentionMaps):
        raise TypeError(f"word_grids takes a Caption or CrossAttentionMaps, got {type(cap).__name__}")
    if head_fusion is not None and head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {', '.join(HEAD_FUSIONS)} or None, got {head_fusion!r}")
    t = cross.tensor  # [L, B, H, T, Ni]
    num_layers, batch = t.shape[0], t.shape[1]
    if layer is not None:
        if not -num_layers <= layer < num_layers:
            raise LayoutError(f"layer {layer} is out of range for {num_layers} decoder layers")
        t = t[layer:layer + 1 if layer != -1 else None]  # [1, B, H, T, Ni]
    if not -batch <= sample < batch:
        raise LayoutError(f"sample {sample} is out of range for a batch of {batch}")
    a = t[:, sample].float()  # [L', H, T, Ni]
    if head_fusion is not None:
        a = fuse_heads(a, head_fusion)  # [L', T, Ni]
    if rollout is not False and rollout is not None:
        if getattr(cap, "image_grids", None) is not None:
            raise LayoutError(
                "rollout= composes a captioner's cross-attention with its image encoder's rollout; the image "
                "tokens of a decoder-only vision-language model are projected features of one vision-tower "
                "layer, not its output tokens, so they are not composed: use rollout=False (or "
                "method='relevance' with caption(..., relevance=True))")
        if rollout is True:
            encoder = getattr(cap, "encoder", None)
            if encoder is None:
                raise LayoutError(
                    "rollout=True needs the encoder's self-attention, and none was recorded (a CNN "
                    "encoder has none); pass rollout=False, or the encoder AttentionMaps")
            rollout = encoder
        r = _rollout_rows(rollout, cross, sample, head_fusion).to(a)  # [Ni, Ni]
        a = a @ r  # [L', (H,) T, Ni]
    qformer = getattr(cap, "qformer", None)
    if isinstance(qformer, CrossAttentionMaps):  # BLIP-2: the keys are the Q-Former's queries
        a = a @ query_readback(qformer, sample).to(a)  # [L', (H,) T, N] over the vision tower's tokens
        grids = patch_grid(a, qformer.layout)  # [L', (H,) T, gh, gw]
    elif _several(getattr(cap, "image_grids", None)):  # LLaVA-NeXT: base image + tiles with newlines
        grids = place_grids(a, cap.image_grids, grid)  # [L', (H,) T, gh, gw]
    else:
        if grid not in (None, 0, -1):
            raise LayoutError(f"grid {grid} is out of range: this caption's image tokens form one grid")
        grids = patch_grid(a, cross.layout)  # [L', (H,) T, gh, gw]
    if merge is not None:
        if spans is None:
            words = getattr(cap, "words", None)
            if words is None:
                raise LayoutError("merge= needs word spans: pass a Caption (it has .words) or spans=")
            spans = words
        grids = merge_pieces(grids, spans, merge, dim=-3)  # [L', (H,) W, gh, gw]
    return grids[0] if layer is not None else grids


def _several(grids: Any) -> bool:
    """Whether a caption's image tokens are not one plain grid (several grids, or newline tokens)."""
    return grids is not None and (len(grids) > 1 or any(getattr(g, "newline", 0) for g in grids))


# ---------------------------------------------------------------------------------------------
# gradient-weighted relevance (Chefer et al. 2021, encoder-decoder rules)
# ---------------------------------------------------------------------------------------------

def _grad_weighted(attn_l: torch.Tensor, grad_l: torch.Tensor) -> torch.Tensor:
    """``Ā = mean_h[(∇A ⊙ A)⁺]`` (Chefer et al. 2021, Eq. 5). ``[B, H, Q, K]`` -> ``[B, Q, K]``."""
    return (grad_l.float() * attn_l.float()).clamp(min=0).mean(dim=-3)


def _normalized_residual(r: torch.Tensor) -> torch.Tensor:
    """``R̄ = R̂ + I`` with ``R̂ = R - I`` row-normalised (Chefer et al. 2021, Eq. 8-9).

    A row of ``R - I`` that sums to 0 (a token the explained score does not depend on, e.g.
    a decoder position after the explained one) stays 0 instead of becoming NaN.

    Shape:
        ``[B, N, N]`` -> ``[B, N, N]``
    """
    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)  # [N, N]
    hat = r - eye  # [B, N, N]
    sums = hat.sum(dim=-1, keepdim=True)  # [B, N, 1]
    hat = torch.where(sums > 0, hat / sums.clamp(min=torch.finfo(r.dtype).tiny), torch.zeros_like(hat))
    return hat + eye


def _check_pair(attn: torch.Tensor, grads: torch.Tensor, what: str) -> None:
    if tuple(attn.shape) != tuple(grads.shape):
        raise LayoutError(f"{what} gradients of shape {tuple(grads.shape)} do not match the attention "
                          f"{tuple(attn.shape)}; pass the gradients of the same forward pass")


def encoder_decoder_relevance(
    cross: torch.Tensor,
    cross_grads: torch.Tensor,
    text: torch.Tensor | None = None,
    text_grads: torch.Tensor | None = None,
    encoder: torch.Tensor | None = None,
    encoder_grads: torch.Tensor | None = None,
) -> torch.Tensor:
    """Relevance of the encoder tokens for every decoder position, for one explained score.

    Chefer, Gur & Wolf 2021, "Generic Attention-model Explainability for Interpreting Bi-Modal
    and Encoder-Decoder Transformers" (ICCV), rules for an encoder-decoder, as in the authors'
    code (Transformer-MM-Explainability, ``DETR/modules/ExplanationGenerator.py``):

    - start with ``R_ii = I`` (image tokens), ``R_tt = I`` (text tokens), ``R_ti = 0``;
    - every layer uses ``Ā = mean_h[(∇A ⊙ A)⁺]`` (Eq. 5), ``∇A`` the gradient of the score;
    - encoder self-attention, per layer: ``R_ii += Ā · R_ii`` (Eq. 6);
    - then per decoder layer, its text self-attention: ``R_tt += Ā · R_tt`` and
      ``R_ti += Ā · R_ti`` (Eq. 6-7), then its cross-attention:
      ``R_ti += R̄_ttᵀ · Ā · R̄_ii`` (Eq. 10) with ``R̄ = R̂ + I``, ``R̂ = R - I``
      row-normalised (Eq. 8-9). (``R_tt`` gains ``Ā · R_it = 0``: the encoder never sees text.)

    One deviation, for exactness: a row of ``R - I`` that sums to zero stays zero (the authors'
    code divides 0 by 0 and then zeroes the NaN *products*). With a causal decoder this makes
    one teacher-forced pass over a whole caption give, for the word predicted at position
    ``p``, exactly the relevance of a pass over the prefix ending at ``p`` (tested).

    Args:
        cross: cross-attention ``[L, B, H, T, Ni]``; ``cross_grads``: its gradients.
        text: decoder self-attention ``[L, B, H, T, T]`` and ``text_grads``, or None.
        encoder: encoder self-attention ``[Le, B, H, Ni, Ni]`` and ``encoder_grads``, or None
            (e.g. a CNN encoder: ``R_ii = I``).

    Returns:
        ``R_ti`` ``[B, T, Ni]`` float32: row ``p`` is the relevance of every encoder token for
        the decoder output at position ``p`` (take the row of the explained word's position).

    Raises:
        LayoutError: gradients missing for an attention given, or the encoder's tokens do
            not match the cross-attention's keys.

    Example:
        >>> r = encoder_decoder_relevance(cross, d_cross, text, d_text, enc, d_enc)  # [B, T, Ni]
    """
    _check_pair(cross, cross_grads, "cross-attention")
    num_layers, b, _, t, ni = cross.shape
    dev = cross.device
    eye_i = torch.eye(ni, dtype=torch.float32, device=dev)  # [Ni, Ni]
    r_ii = eye_i.expand(b, ni, ni).clone()  # [B, Ni, Ni]
    if encoder is not None:
        if encoder_grads is None:
            raise LayoutError("encoder attention given without its gradients (encoder_grads=)")
        _check_pair(encoder, encoder_grads, "encoder self-attention")
        if encoder.shape[-1] != ni:
            raise LayoutError(f"the encoder attention is over {encoder.shape[-1]} tokens but the "
                              f"cross-attention keys are {ni}")
        for layer in range(encoder.shape[0]):
            cam = _grad_weighted(encoder[layer], encoder_grads[layer].to(dev))  # [B, Ni, Ni]
            r_ii = r_ii + cam @ r_ii
    if text is not None:
        if text_grads is None:
            raise LayoutError("decoder self-attention given without its gradients (text_grads=)")
        _check_pair(text, text_grads, "decoder self-attention")
        if text.shape[0] != num_layers or text.shape[-1] != t:
            raise LayoutError(
                f"decoder self-attention {tuple(text.shape)} does not pair with the cross-attention "
                f"{tuple(cross.shape)}: one self- and one cross-attention per decoder layer expected")
    r_tt = torch.eye(t, dtype=torch.float32, device=dev).expand(b, t, t).clone()  # [B, T, T]
    r_ti = torch.zeros(b, t, ni, dtype=torch.float32, device=dev)  # [B, T, Ni]
    r_ii_bar = _normalized_residual(r_ii)  # [B, Ni, Ni]; the encoder is done before the decoder
    for layer in range(num_layers):
        if text is not None:
            assert text_grads is not None  # checked with text above
            cam = _grad_weighted(text[layer], text_grads[layer].to(dev))  # [B, T, T]
            r_tt = r_tt + cam @ r_tt
            r_ti = r_ti + cam @ r_ti
        cam = _grad_weighted(cross[layer], cross_grads[layer].to(dev))  # [B, T, Ni]
        r_ti = r_ti + _normalized_residual(r_tt).transpose(-1, -2) @ cam @ r_ii_bar
    return r_ti
