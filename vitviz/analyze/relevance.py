"""Gradient-weighted, class-specific relevance maps from attention and its gradient.

Two published methods, both pure batched functions of the attention probabilities ``A`` and
the gradients ``dA = d score / d A`` of one forward and one backward pass (see
``vitviz.capture(model, grad=True)`` and ``vitviz.relevance``):

- **Chefer et al. 2021**, "Generic Attention-model Explainability for Interpreting Bi-Modal
  and Encoder-Decoder Transformers" (ICCV 2021), the self-attention rule (their Eq. 5-6):
  ``R = I``; for every layer in the order the layers run,
  ``Ā = mean_h[(dA ⊙ A)⁺]`` (clamp at 0 per head, then average heads) and ``R = R + Ā · R``.
  The map is the CLS row of ``R`` over the patch tokens. With every gradient equal to 1,
  ``Ā = mean_h A`` and ``R = Π_l (I + Ā_l)`` (later layers on the left)
  ``= 2^L · Π_l (0.5·I + 0.5·Ā_l)``, i.e. ``2^L`` times the attention rollout product
  (whose rows already sum to 1), which the tests check.
- **Gradient rollout**, the "grad rollout" of Jacob Gildenblat's vit-explain project
  (github.com/jacobgil/vit-explain, ``vit_grad_rollout.py``): per layer fuse the heads of
  ``A ⊙ dA`` (mean by default), *then* clamp at 0 (the order differs from Chefer's, which
  clamps each head first), optionally discard the smallest entries, add the identity
  (``0.5·W + 0.5·I``), re-normalise every row and multiply the layers in order, exactly as
  :func:`vitviz.rollout`. Two deliberate differences from that script: rows are normalised
  row-wise (the script divides by a broadcast row-sum vector, i.e. column-wise), and
  discarding keeps the CLS->CLS entry as vitviz's rollout does.

Both maps: the CLS row over the patch tokens (prefix tokens such as distillation or register
tokens dropped); models without a CLS token use the mean of the patch rows
(:func:`vitviz.analyze.rollout.token_map`). Not rescaled: renderers do the scaling.
"""

from __future__ import annotations

from typing import Union

import torch

from ..errors import LayoutError
from ..types import AttentionMaps, _as_tensor
from .rollout import discard_smallest, fuse_heads, token_map

METHODS = ("chefer", "grad_rollout")

Grads = Union[AttentionMaps, torch.Tensor]


def _grad_tensor(attn: AttentionMaps, grads: Grads) -> torch.Tensor:
    """The ``[L, B, H, N, N]`` gradient tensor, checked against the attention's shape."""
    g = grads.tensor if isinstance(grads, AttentionMaps) else _as_tensor(grads)
    if tuple(g.shape) != tuple(attn.tensor.shape):
        raise LayoutError(
            f"gradients of shape {tuple(g.shape)} do not match the attention {tuple(attn.tensor.shape)} "
            "[L, B, H, N, N]; pass rec.attention_grads of the same capture as rec.attentions")
    return g


def _start(num_layers: int, start_layer: int) -> int:
    if not -num_layers <= start_layer < num_layers:
        raise ValueError(f"start_layer {start_layer} is out of range for {num_layers} layers")
    return start_layer % num_layers


def chefer_layer(attn_l: torch.Tensor, grad_l: torch.Tensor) -> torch.Tensor:
    """One layer's head-averaged, gradient-weighted attention ``mean_h[(dA ⊙ A)⁺]``.

    Shape:
        attn_l, grad_l: ``[B, H, N, N]`` -> ``[B, N, N]`` float32
    """
    return (grad_l.float() * attn_l.float()).clamp_(min=0).mean(dim=-3)  # [B, N, N]


def relevance_matrix(attn: AttentionMaps, grads: Grads, *, start_layer: int = 0) -> torch.Tensor:
    """Chefer et al. 2021 relevance ``R`` over all tokens (``R = I; R += Ā·R`` per layer).

    Args:
        attn: :class:`AttentionMaps` ``[L, B, H, N, N]``.
        grads: gradients of the explained score w.r.t. those probabilities, same shape
            (``rec.attention_grads`` or a tensor).
        start_layer: first layer taken into account (negative counts from the end).

    Returns:
        ``[B, N, N]`` float32; row ``i`` is the relevance of every input token for token ``i``.

    Example:
        >>> r = relevance_matrix(rec.attentions, rec.attention_grads)  # [B, N, N]
    """
    t = attn.tensor  # [L, B, H, N, N]
    g = _grad_tensor(attn, grads)  # [L, B, H, N, N]
    num_layers, b, _, n, _ = t.shape
    start = _start(num_layers, start_layer)
    eye = torch.eye(n, dtype=torch.float32, device=t.device)  # [N, N]
    r = eye.expand(b, n, n).clone()  # [B, N, N]
    for layer in range(start, num_layers):
        cam = chefer_layer(t[layer], g[layer].to(t.device))  # [B, N, N]
        r = torch.baddbmm(r, cam, r)  # R + Ā·R
    return r


def chefer_relevance(attn: AttentionMaps, grads: Grads, *, start_layer: int = 0) -> torch.Tensor:
    """Class-specific relevance map of Chefer et al. 2021 per sample.

    Args:
        attn: :class:`AttentionMaps` ``[L, B, H, N, N]``.
        grads: gradients of the explained score (e.g. the target logit) w.r.t. the attention
            probabilities, same shape.
        start_layer: first layer taken into account.

    Returns:
        ``[B, gh, gw]`` float32: the CLS row of ``R`` over the patch tokens, not rescaled
        (for models without CLS, the mean of the patch rows).

    Example:
        >>> with vitviz.capture(m, grad=True) as rec:
        ...     m(x)[0, 281].backward()
        >>> chefer_relevance(rec.attentions, rec.attention_grads).shape
        torch.Size([1, 14, 14])
    """
    r = relevance_matrix(attn, grads, start_layer=start_layer)  # [B, N, N]
    return token_map(r, attn.layout)


def grad_rollout_matrix(attn: AttentionMaps, grads: Grads, *, head_fusion: str = "mean",
                        discard_ratio: float = 0.0, start_layer: int = 0) -> torch.Tensor:
    """Gradient rollout product over all tokens (vit-explain's grad rollout, rows normalised).

    Per layer: ``W = fuse_h(A ⊙ dA)`` clamped at 0; the ``int(N*N*discard_ratio)`` smallest
    entries of each sample's ``W`` zeroed (CLS->CLS kept); ``Â = 0.5·W + 0.5·I`` with rows
    re-normalised; ``R = Â_L … Â_start``.

    Args:
        attn: :class:`AttentionMaps` ``[L, B, H, N, N]``.
        grads: gradients w.r.t. the attention probabilities, same shape.
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads of ``A ⊙ dA``.
        discard_ratio: share of each fused ``N x N`` matrix set to zero, smallest first.
        start_layer: first layer of the product.

    Returns:
        ``[B, N, N]`` float32.
    """
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    t = attn.tensor  # [L, B, H, N, N]
    g = _grad_tensor(attn, grads)  # [L, B, H, N, N]
    num_layers, n = t.shape[0], t.shape[-1]
    start = _start(num_layers, start_layer)
    keep_first = bool(attn.layout.has_cls)
    eye = torch.eye(n, dtype=torch.float32, device=t.device)  # [N, N]
    r = None
    for layer in range(start, num_layers):
        weighted = t[layer].float() * g[layer].to(t.device).float()  # [B, H, N, N]
        w = fuse_heads(weighted, head_fusion).clamp_(min=0)  # [B, N, N]
        if discard_ratio > 0:
            w = discard_smallest(w, discard_ratio, keep_first)
        a = 0.5 * w + 0.5 * eye  # [B, N, N]; rows sum to >= 0.5
        a = a / a.sum(dim=-1, keepdim=True)
        r = a if r is None else torch.bmm(a, r)  # R = Â_l R
    return r


def grad_rollout(attn: AttentionMaps, grads: Grads, *, head_fusion: str = "mean",
                 discard_ratio: float = 0.0, start_layer: int = 0) -> torch.Tensor:
    """Gradient rollout map per sample (see :func:`grad_rollout_matrix`).

    With all gradients equal to 1 it equals :func:`vitviz.rollout` with the same options.

    Returns:
        ``[B, gh, gw]`` float32: the CLS row of the product over the patch tokens, not
        rescaled (for models without CLS, the mean of the patch rows).

    Example:
        >>> grad_rollout(rec.attentions, rec.attention_grads, discard_ratio=0.9).shape
        torch.Size([1, 14, 14])
    """
    r = grad_rollout_matrix(attn, grads, head_fusion=head_fusion, discard_ratio=discard_ratio,
                            start_layer=start_layer)  # [B, N, N]
    return token_map(r, attn.layout)


def relevance_map(attn: AttentionMaps, grads: Grads, *, method: str = "chefer",
                  head_fusion: str = "mean", discard_ratio: float = 0.0,
                  start_layer: int = 0) -> torch.Tensor:
    """Dispatch to :func:`chefer_relevance` or :func:`grad_rollout` by ``method``.

    ``head_fusion`` and ``discard_ratio`` belong to gradient rollout; Chefer's rule has
    neither (it averages the clamped heads), so other values raise ``ValueError`` there.

    Returns:
        ``[B, gh, gw]`` float32.
    """
    if method == "chefer":
        if head_fusion != "mean" or discard_ratio != 0.0:
            raise ValueError("method='chefer' averages the clamped heads and discards nothing; "
                             "head_fusion= and discard_ratio= apply to method='grad_rollout'")
        return chefer_relevance(attn, grads, start_layer=start_layer)
    if method == "grad_rollout":
        return grad_rollout(attn, grads, head_fusion=head_fusion, discard_ratio=discard_ratio,
                            start_layer=start_layer)
    raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
