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
(:func:`vitviz.analyze._rollout.token_map`). Not rescaled: renderers do the scaling.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import LayoutError
from ..types import AttentionMaps, TokenLayout
from ._rollout import residual_matrix, token_map
from ._tokens import check_options, fuse_heads, query_weights

METHODS = ("chefer", "grad_rollout")

Grads = AttentionMaps | torch.Tensor


def _grad_tensor(attn: AttentionMaps, grads: Grads) -> torch.Tensor:
    """The ``[L, B, H, N, N]`` gradient tensor, checked against the attention's shape."""
    g = grads.tensor if isinstance(grads, AttentionMaps) else grads
    if isinstance(g, np.ndarray):  # as AttentionMaps takes them
        g = torch.from_numpy(g)
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor or numpy array of gradients, got {type(g).__name__}")
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
    attn.require_square("relevance")
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
    check_options(head_fusion, discard_ratio)
    attn.require_square("gradient rollout")
    t = attn.tensor  # [L, B, H, N, N]
    g = _grad_tensor(attn, grads)  # [L, B, H, N, N]
    start = _start(t.shape[0], start_layer)
    keep_first = bool(attn.layout.has_cls)
    r = grad_rollout_layer(t[start], g[start].to(t.device), head_fusion, discard_ratio, keep_first)  # [B, N, N]
    for layer in range(start + 1, t.shape[0]):
        a = grad_rollout_layer(t[layer], g[layer].to(t.device), head_fusion, discard_ratio, keep_first)
        r = torch.bmm(a, r)  # R = Â_l R
    return r


def grad_rollout_layer(attn_l: torch.Tensor, grad_l: torch.Tensor, head_fusion: str = "mean",
                       discard_ratio: float = 0.0, keep_first: bool = True) -> torch.Tensor:
    """One layer's gradient-rollout matrix: ``W = fuse_h(A ⊙ dA)⁺``, smallest entries
    discarded, ``rownorm(0.5·W + 0.5·I)``.

    Shape:
        attn_l, grad_l: ``[B, H, N, N]`` -> ``[B, N, N]`` float32
    """
    weighted = attn_l.float() * grad_l.float()  # [B, H, N, N]
    w = fuse_heads(weighted, head_fusion).clamp_(min=0)  # [B, N, N]
    return residual_matrix(w, discard_ratio, keep_first)


def grad_rollout(attn: AttentionMaps, grads: Grads, *, head_fusion: str = "mean",
                 discard_ratio: float = 0.0, start_layer: int = 0) -> torch.Tensor:
    """Gradient rollout map per sample (see :func:`grad_rollout_matrix`).

    With all gradients equal to 1 it equals :func:`vitviz.rollout` with the same options.

    Args:
        attn: :class:`AttentionMaps` ``[L, B, H, N, N]``.
        grads: gradients w.r.t. the attention probabilities, same shape.
        head_fusion: ``"mean"``, ``"max"`` or ``"min"`` over heads of ``A ⊙ dA``.
        discard_ratio: share of each fused ``N x N`` matrix set to zero, smallest first.
        start_layer: first layer of the product (negative counts from the end).

    Returns:
        ``[B, gh, gw]`` float32: the CLS row of the product over the patch tokens, not
        rescaled (for models without CLS, the mean of the patch rows).

    Raises:
        ValueError: an unknown head fusion, a discard ratio outside ``[0, 1)`` or a start
            layer out of range.
        LayoutError: reduced keys (the product needs queries and keys to be the same tokens),
            or gradients of another shape.

    Example:
        >>> grad_rollout(rec.attentions, rec.attention_grads, discard_ratio=0.9).shape
        torch.Size([1, 14, 14])
    """
    r = grad_rollout_matrix(attn, grads, head_fusion=head_fusion, discard_ratio=discard_ratio,
                            start_layer=start_layer)  # [B, N, N]
    return token_map(r, attn.layout)


def _check_method(method: str, head_fusion: str, discard_ratio: float) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "chefer" and (head_fusion != "mean" or discard_ratio != 0.0):
        raise ValueError("method='chefer' averages the clamped heads and discards nothing; "
                         "head_fusion= and discard_ratio= apply to method='grad_rollout'")
    check_options(head_fusion, discard_ratio)


def relevance_map(attn: AttentionMaps, grads: Grads, *, method: str = "chefer",
                  head_fusion: str = "mean", discard_ratio: float = 0.0,
                  start_layer: int = 0) -> torch.Tensor:
    """Dispatch to :func:`chefer_relevance` or :func:`grad_rollout` by ``method``.

    ``head_fusion`` and ``discard_ratio`` belong to gradient rollout; Chefer's rule has
    neither (it averages the clamped heads), so other values raise ``ValueError`` there.

    Args:
        attn: :class:`AttentionMaps` ``[L, B, H, N, N]``.
        grads: gradients of the explained score w.r.t. the attention probabilities, same shape.
        method: ``"chefer"`` or ``"grad_rollout"``.
        head_fusion: gradient rollout's head fusion (``"mean"``, ``"max"``, ``"min"``).
        discard_ratio: gradient rollout's share of smallest entries to zero.
        start_layer: first layer taken into account.

    Returns:
        ``[B, gh, gw]`` float32.

    Raises:
        ValueError: an unknown method, options the method does not take, or options out of range.
        LayoutError: reduced keys, or gradients of another shape.
    """
    _check_method(method, head_fusion, discard_ratio)
    if method == "chefer":
        return chefer_relevance(attn, grads, start_layer=start_layer)
    return grad_rollout(attn, grads, head_fusion=head_fusion, discard_ratio=discard_ratio,
                        start_layer=start_layer)


class RelevanceStream:
    """Chefer relevance or gradient rollout, computed in the backward pass as the gradients
    arrive (a gradient stream of :func:`vitviz.capture`).

    Each layer's factor (``Ā = mean_h[(dA ⊙ A)⁺]`` for Chefer, the normalised gradient-rollout
    matrix otherwise) is computed when that layer's gradient arrives and kept as one
    ``[B, N, N]`` float32 matrix; the attention and gradient of the layer are then free.
    The map needs only the query row of the product (the CLS row, or the mean of the patch
    rows), so :meth:`result` multiplies a ``[B, N]`` row through the layers, last layer first:
    ``O(L*B*N^2)`` work and memory instead of the stored path's ``[L, B, H, N, N]`` attention
    and gradients and ``O(L*B*N^3)`` products. Equal to :func:`relevance_map` on the stored
    attention and gradients (same factors; the product is only associated differently).

    Args:
        method, head_fusion, discard_ratio, start_layer: as :func:`relevance_map`.

    Example:
        >>> s = RelevanceStream("chefer")
        >>> with vitviz.capture(m, grad=True, keep="none", streams={"rel": s}) as rec:
        ...     logits = m(x)
        ...     torch.autograd.grad(logits[:, 281].sum(), rec.grad_inputs())
        >>> rec.stream("rel").shape  # [B, gh, gw]
    """

    def __init__(self, method: str = "chefer", *, head_fusion: str = "mean", discard_ratio: float = 0.0,
                 start_layer: int = 0):
        _check_method(method, head_fusion, discard_ratio)
        self.method, self.head_fusion, self.discard_ratio = method, head_fusion, discard_ratio
        self.start_layer = start_layer
        self.reset()

    def reset(self) -> None:
        """Forget the layers seen so far (a new forward pass)."""
        self.factors: dict[int, torch.Tensor] = {}  # layer -> [B, N, N] float32

    @property
    def grad_fusion(self) -> tuple[str, bool]:
        """What of a layer this stream reads: ``(head_fusion, clamp_first)``, the head fusion of
        ``A ⊙ dA`` with each head clamped at 0 first (Chefer: ``("mean", True)``) or not
        (gradient rollout). A capture that computes the attention's backward pass itself hands
        :meth:`update_grad_fused` that ``[B, N, N]`` fusion, computed a few heads at a time."""
        return ("mean", True) if self.method == "chefer" else (self.head_fusion, False)

    def update_grad_fused(self, fused: torch.Tensor, *, layer: int, num_layers: int,
                          layout: TokenLayout) -> None:
        """Fold in one layer given only ``fuse_h(A ⊙ dA)`` as :attr:`grad_fusion` says
        (called by the capture in the backward pass instead of :meth:`update_grad`).

        Args:
            fused: ``[B, N, N]`` float32: ``mean_h[(A ⊙ dA)⁺]`` (Chefer) or ``fuse_h(A ⊙ dA)``
                (gradient rollout, clamped here).
            layer, num_layers, layout: as :meth:`update_grad`.

        Raises:
            ValueError: the layer already received a gradient in this pass.
        """
        if not self._take(layer, num_layers):
            return
        if self.method == "chefer":
            self.factors[layer] = fused
        else:
            self.factors[layer] = residual_matrix(fused.clamp_(min=0), self.discard_ratio, bool(layout.has_cls))

    def _take(self, layer: int, num_layers: int) -> bool:
        """Whether ``layer`` is folded in (from ``start_layer`` on); refuses a second gradient."""
        if layer < _start(num_layers, self.start_layer):
            return False
        if layer in self.factors:
            raise ValueError(f"layer {layer} received a second gradient: a relevance stream takes "
                             "one backward pass per forward pass (for gradients summed over several, "
                             "use keep='all' and rec.attention_grads)")
        return True

    def update_grad(self, attn_l: torch.Tensor, grad_l: torch.Tensor, *, layer: int, num_layers: int,
                    layout: TokenLayout) -> None:
        """Fold in one layer's attention and gradient (called by the capture in the backward pass).

        Args:
            attn_l: ``[B, H, N, N]`` the layer's attention probabilities.
            grad_l: ``[B, H, N, N]`` the gradient of the explained score w.r.t. them.
            layer: the layer's index in forward order.
            num_layers: how many layers the forward pass ran.
            layout: the token layout of this input.

        Raises:
            ValueError: the layer already received a gradient in this pass.
        """
        if not self._take(layer, num_layers):
            return
        if self.method == "chefer":
            self.factors[layer] = chefer_layer(attn_l, grad_l)
        else:
            self.factors[layer] = grad_rollout_layer(attn_l, grad_l, self.head_fusion, self.discard_ratio,
                                                     bool(layout.has_cls))

    def result(self, layout: TokenLayout) -> torch.Tensor:
        """The relevance maps of the layers folded in.

        Args:
            layout: the token layout of the input.

        Returns:
            ``[B, gh, gw]`` float32 over the patch tokens, not rescaled.

        Raises:
            ValueError: no gradient reached the attention.
            LayoutError: the layers' token count does not fit ``layout``.
        """
        if not self.factors:
            raise ValueError("no gradient reached the attention: backpropagate a score inside the "
                             "`with vitviz.capture(..., grad=True)` block")
        first = next(iter(self.factors.values()))  # [B, N, N]
        b, n = first.shape[0], first.shape[-1]
        if n != layout.num_tokens:
            raise LayoutError(f"{n} tokens do not fit the layout {layout}")
        # the CLS row, or the mean of the patch rows: token_map's rows as query weights
        row = query_weights(layout, "auto", device=first.device).expand(b, 1, n)  # [B, 1, N]
        # a layer with no gradient has factor 0 (Chefer: R += 0) or the identity (rollout)
        for layer in sorted(self.factors, reverse=True):
            f = self.factors[layer]
            row = torch.baddbmm(row, row, f) if self.method == "chefer" else torch.bmm(row, f)
        return layout.patch_map(row[:, 0, layout.patches])  # [B, gh, gw] ([B, frames, gh, gw] for a video)
