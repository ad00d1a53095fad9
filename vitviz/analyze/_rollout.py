"""Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers").

Per sample and layer: fuse heads; optionally zero the smallest entries; add the identity
for the residual connection (``0.5*A + 0.5*I``); re-normalise rows; multiply the layers
in order. The map is the CLS row of the product over the patch tokens, not rescaled.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..errors import LayoutError
from ..types import AttentionMaps, TokenLayout
from ._tokens import check_options, fuse_heads, query_weights


def discard_smallest(a: torch.Tensor, discard_ratio: float, keep_first: bool = True) -> torch.Tensor:
    """Zero the ``k = int(N*N*discard_ratio)`` smallest entries of each sample's ``[N, N]`` matrix.

    When ``keep_first`` (the model has a CLS token), the CLS->CLS entry ``[0, 0]`` is kept even
    if it is among the ``k`` smallest (then ``k - 1`` entries are zeroed). Batched: one top-k
    over the flattened matrices, no per-sample loop.

    Args:
        a: ``[B, N, N]`` non-negative weights (fused heads).
        discard_ratio: the share of entries to zero, in ``[0, 1)``.
        keep_first: keep the ``[0, 0]`` (CLS->CLS) entry.

    Returns:
        ``[B, N, N]``: a new tensor, or ``a`` itself when nothing is discarded (``k == 0``).

    Raises:
        ValueError: ``discard_ratio`` outside ``[0, 1)``.

    Shape:
        a: ``[B, N, N]`` -> ``[B, N, N]``
    """
    check_options(discard_ratio=discard_ratio)
    b, n, _ = a.shape
    k = int(n * n * discard_ratio)
    if k == 0:
        return a
    flat = a.reshape(b, n * n)  # [B, N*N]
    # Keep the N*N - k largest instead of finding the k smallest: an unsorted top-k of the
    # kept entries is several times faster than a sorted top-k of the discarded ones and
    # selects the same set (up to the order among equal values at the boundary).
    idx = flat.topk(n * n - k, dim=-1, largest=True, sorted=False).indices  # [B, N*N-k]
    out = torch.zeros_like(flat).scatter_(1, idx, flat.gather(1, idx))  # [B, N*N]
    if keep_first:
        out[:, 0] = flat[:, 0]
    return out.reshape(b, n, n)


def _layer_matrix(attn_l: torch.Tensor, head_fusion: str, discard_ratio: float,
                  keep_first: bool) -> torch.Tensor:
    """One layer's rollout matrix ``0.5*A + 0.5*I``, rows re-normalised.

    Shape:
        attn_l: ``[B, H, N, N]`` -> ``[B, N, N]`` float32
    """
    if head_fusion == "mean":  # accumulate in float32 without a float32 copy of every head
        a = attn_l.mean(dim=-3, dtype=torch.float32)  # [B, N, N]
    else:
        a = fuse_heads(attn_l, head_fusion).float()  # [B, N, N] (exact: max/min pick values)
    return residual_matrix(a, discard_ratio, keep_first)


def residual_matrix(a: torch.Tensor, discard_ratio: float, keep_first: bool) -> torch.Tensor:
    """Discard the smallest entries of fused ``[B, N, N]`` weights, add the residual and
    re-normalise the rows: ``rownorm(0.5 * W + 0.5 * I)``, computed in place on ``a`` (which
    must be a fresh tensor) as the equal ``(W + I) / rowsum(W + I)``.

    Shape:
        a: ``[B, N, N]`` float -> ``[B, N, N]``
    """
    if discard_ratio > 0:
        a = discard_smallest(a, discard_ratio, keep_first)
    a.diagonal(dim1=-2, dim2=-1).add_(1.0)
    return a.div_(a.sum(dim=-1, keepdim=True))


def rollout_matrix(attn: AttentionMaps, *, head_fusion: str = "mean", discard_ratio: float = 0.0,
                   start_layer: int = 0) -> torch.Tensor:
    """The full rollout product ``R = Â_L … Â_start`` over all tokens.

    Args:
        attn: :class:`AttentionMaps` ``[L, B, H, N, N]``.
        head_fusion, discard_ratio: as :func:`rollout`.
        start_layer: first layer of the product (negative counts from the end).

    Returns:
        ``[B, N, N]`` float32; row ``i`` says how much of token ``i``'s final representation
        flows from each input token.

    Raises:
        ValueError: ``start_layer`` out of range, an unknown head fusion or a discard ratio
            outside ``[0, 1)``.
        LayoutError: reduced keys (queries and keys must be the same tokens).
    """
    attn.require_square("rollout")
    t = attn.tensor  # [L, B, H, N, N]
    num_layers = t.shape[0]
    if not -num_layers <= start_layer < num_layers:
        raise ValueError(f"start_layer {start_layer} is out of range for {num_layers} layers")
    start = start_layer % num_layers
    keep_first = bool(attn.layout.has_cls)
    r = _layer_matrix(t[start], head_fusion, discard_ratio, keep_first)  # [B, N, N]
    for layer in range(start + 1, num_layers):
        r = _layer_matrix(t[layer], head_fusion, discard_ratio, keep_first) @ r  # R = Â_l R
    return r


def rollout_matrices(attn: AttentionMaps, *, head_fusion: str = "mean", discard_ratio: float = 0.0) -> torch.Tensor:
    """The rollout product up to every layer: ``R_l = Â_l … Â_1`` for ``l = 1 … L``.

    Row ``i`` of ``R_l`` is where token ``i``'s representation after layer ``l`` comes from
    (Abnar & Zuidema 2020, the same layer matrices as :func:`rollout_matrix`); the last one is
    :func:`rollout_matrix`. One ``N x N`` product per layer, as the forward running product.

    Args:
        attn: :class:`AttentionMaps` ``[L, B, H, N, N]``.
        head_fusion, discard_ratio: as :func:`rollout`.

    Returns:
        ``[L, B, N, N]`` float32.

    Shape:
        attn.tensor: ``[L, B, H, N, N]`` -> ``[L, B, N, N]``

    Example:
        >>> rollout_matrices(rec.attentions)[5, 0, 0]  # the CLS row of the rollout up to layer 6
    """
    check_options(head_fusion, discard_ratio)
    t = attn.tensor  # [L, B, H, N, N]
    keep_first = bool(attn.layout.has_cls)
    out = torch.empty((t.shape[0], t.shape[1], t.shape[-2], t.shape[-1]), dtype=torch.float32,
                      device=t.device)  # [L, B, N, N]
    for layer in range(t.shape[0]):
        a = _layer_matrix(t[layer], head_fusion, discard_ratio, keep_first)  # [B, N, N]
        out[layer] = a if layer == 0 else a @ out[layer - 1]  # R_l = Â_l R_{l-1}
    return out


def token_map(rows: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Read a patch map out of square token-to-token matrices.

    The CLS row over the patch tokens (prefix tokens dropped), or, for a model without a CLS
    token, the mean of the patch rows.

    Args:
        rows: ``[..., N, N]`` token-to-token matrices (a rollout or relevance product).
        layout: the token layout of the ``N`` tokens.

    Returns:
        ``[..., gh, gw]``: the map over the patch grid, not rescaled.

    Raises:
        LayoutError: ``N`` does not fit ``layout``.

    Shape:
        rows: ``[..., N, N]`` -> ``[..., gh, gw]``
    """
    if rows.shape[-1] != layout.num_tokens:
        raise LayoutError(f"{rows.shape[-1]} tokens do not fit the layout {layout}")
    if layout.has_cls:
        vec = rows[..., 0, layout.patches]  # [..., P]
    else:
        vec = rows[..., layout.patches, layout.patches].mean(dim=-2)  # [..., P]
    return layout.patch_map(vec)


def rollout(attn: AttentionMaps, *, head_fusion: str = "mean", discard_ratio: float = 0.0,
            start_layer: int = 0) -> torch.Tensor:
    """Attention rollout map per sample.

    Args:
        attn: :class:`AttentionMaps` ``[L, B, H, N, N]``.
        head_fusion: how heads are combined per layer: ``"mean"``, ``"max"`` or ``"min"``.
        discard_ratio: share of each fused ``N x N`` matrix set to zero, smallest first
            (the CLS->CLS entry is kept).
        start_layer: first layer of the product (negative counts from the end).

    Returns:
        ``[B, gh, gw]`` float32: the CLS row of the rollout product over the patch tokens,
        not rescaled (for models without CLS, the mean of the patch rows).

    Raises:
        ValueError: ``start_layer`` out of range, an unknown head fusion or a discard ratio
            outside ``[0, 1)``.
        LayoutError: reduced keys (queries and keys must be the same tokens).

    Example:
        >>> with vitviz.capture(m) as rec:
        ...     m(x)
        >>> vitviz.rollout(rec.attentions, discard_ratio=0.9).shape
        torch.Size([1, 14, 14])
    """
    attn.require_square("rollout")
    t = attn.tensor  # [L, B, H, N, N]
    num_layers = t.shape[0]
    if not -num_layers <= start_layer < num_layers:
        raise ValueError(f"start_layer {start_layer} is out of range for {num_layers} layers")
    keep_first = bool(attn.layout.has_cls)
    layers = range(start_layer % num_layers, num_layers)
    return _row_chain((_layer_matrix(t[i], head_fusion, discard_ratio, keep_first) for i in reversed(layers)),
                      attn.layout)


def _row_chain(matrices: Iterable[torch.Tensor], layout: TokenLayout) -> torch.Tensor:
    """The rollout map from the layer matrices ``Â_L, Â_{L-1}, …`` (last layer first).

    The map is one row of ``R = Â_L … Â_start`` (the CLS row, or the mean of the patch rows):
    pushed through the layers from the last one down, ``r = ((qᵀ Â_L) Â_{L-1}) … Â_start``, it
    costs ``O(L·N²)`` per sample instead of the ``O(L·N³)`` of the full product.

    Shape:
        each matrix ``[B, N, N]`` -> ``[B, gh, gw]``
    """
    row = None  # [B, 1, N]
    for a in matrices:
        if a.shape[-1] != layout.num_tokens:
            raise LayoutError(f"{a.shape[-1]} tokens do not fit the layout {layout}")
        if row is None:
            row = query_weights(layout, "auto", device=a.device).expand(a.shape[0], 1, a.shape[-1])
        row = torch.bmm(row, a)  # [B, 1, N]
    if row is None:
        raise ValueError("no layer to roll out")
    return layout.patch_map(row[:, 0, layout.patches])  # [B, gh, gw] ([B, frames, gh, gw] for a video)


class RolloutStream:
    """Attention rollout computed layer by layer, as the layers run (a stream of
    :func:`vitviz.capture`).

    Each layer's attention ``[B, H, N, N]`` is reduced to its rollout matrix ``[B, N, N]``
    (float32) as it runs and the attention is freed: memory ``O(L·B·N²)`` instead of the
    ``O(L·B·H·N²)`` of keeping every layer. :meth:`result` pushes the query row down through
    the matrices as :func:`rollout` does, so the two are equal to the bit (same matrices,
    same products). What it needs to know about the model comes with each layer: whether
    token 0 is a CLS token (kept when discarding) from ``layout``, the depth from
    ``num_layers`` (for a negative ``start_layer``; when the depth is not known before the
    pass ends, the last ``-start_layer`` matrices are kept).

    Args:
        head_fusion, discard_ratio, start_layer: as :func:`rollout`.

    Example:
        >>> s = RolloutStream(discard_ratio=0.9)
        >>> for i, a in enumerate(per_layer_attention):   # each [B, H, N, N]
        ...     s.update(a, layer=i, layout=layout)
        >>> s.result(layout)                              # [B, gh, gw]
    """

    def __init__(self, *, head_fusion: str = "mean", discard_ratio: float = 0.0, start_layer: int = 0):
        check_options(head_fusion, discard_ratio)
        self.head_fusion, self.discard_ratio, self.start_layer = head_fusion, discard_ratio, start_layer
        # the heads are fused first: a capture may hand over [B, 1, N, N] already fused this way
        self.fused_heads = head_fusion
        self.reset()

    def reset(self) -> None:
        """Forget the layers seen so far (a new forward pass)."""
        self.layers_seen = 0
        self.matrices: list[torch.Tensor] = []  # [B, N, N] float32 per layer from start_layer

    def update(self, attn_l: torch.Tensor, *, layer: int, layout: TokenLayout,
               num_layers: int | None = None) -> None:
        """Fold in one layer's attention (called by the capture as the layer runs).

        Args:
            attn_l: ``[B, H, N, N]`` the layer's attention (or ``[B, 1, N, N]`` with the heads
                already fused as :attr:`fused_heads` says).
            layer: the layer's index in forward order.
            layout: the token layout of this input.
            num_layers: the depth of the model, when known before the pass ends.
        """
        self.layers_seen = max(self.layers_seen, layer + 1)
        start = self.start_layer
        if start < 0 and num_layers:
            start %= num_layers
        if start >= 0 and layer < start:
            return
        self.matrices.append(_layer_matrix(attn_l.detach(), self.head_fusion, self.discard_ratio,
                                           bool(layout.has_cls)))  # [B, N, N]
        if start < 0:  # depth unknown: keep the last -start layers
            self.matrices = self.matrices[start:]

    def result(self, layout: TokenLayout) -> torch.Tensor:
        """The rollout map of the layers seen.

        Args:
            layout: the token layout of the input.

        Returns:
            ``[B, gh, gw]`` float32, equal to :func:`rollout` on the stored attention.

        Raises:
            ValueError: no layer at or after ``start_layer`` was seen.
            LayoutError: the layers' token count does not fit ``layout``.
        """
        if not self.matrices:
            raise ValueError(f"no layer at or after start_layer {self.start_layer} was seen "
                             f"({self.layers_seen} layers seen)")
        if self.start_layer < 0 and len(self.matrices) < -self.start_layer:
            raise ValueError(f"start_layer {self.start_layer} is out of range for {self.layers_seen} layers")
        return _row_chain(reversed(self.matrices), layout)
