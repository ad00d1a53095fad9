"""Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers").

Per sample and layer: fuse heads; optionally zero the smallest entries; add the identity
for the residual connection (``0.5*A + 0.5*I``); re-normalise rows; multiply the layers
in order. The map is the CLS row of the product over the patch tokens, not rescaled.
"""

from __future__ import annotations

import torch

from ..errors import LayoutError
from ..types import AttentionMaps, TokenLayout

HEAD_FUSIONS = ("mean", "max", "min")


def check_options(head_fusion: str = "mean", discard_ratio: float = 0.0) -> None:
    """Raise ``ValueError`` for an unknown head fusion or a discard ratio outside ``[0, 1)``."""
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {', '.join(HEAD_FUSIONS)}, got {head_fusion!r}")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")


def fuse_heads(attn: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """Fuse the head dimension of ``[..., H, Q, K]`` attention into ``[..., Q, K]``.

    Args:
        attn: attention with heads in dim ``-3``.
        head_fusion: ``"mean"``, ``"max"`` or ``"min"``.
    """
    if head_fusion == "mean":
        return attn.mean(dim=-3)
    if head_fusion == "max":
        return attn.amax(dim=-3)
    if head_fusion == "min":
        return attn.amin(dim=-3)
    check_options(head_fusion)  # raises: an unknown name


def discard_smallest(a: torch.Tensor, discard_ratio: float, keep_first: bool = True) -> torch.Tensor:
    """Zero the ``k = int(N*N*discard_ratio)`` smallest entries of each sample's ``[N, N]`` matrix.

    When ``keep_first`` (the model has a CLS token), the CLS->CLS entry ``[0, 0]`` is kept even
    if it is among the ``k`` smallest (then ``k - 1`` entries are zeroed). Batched: one top-k
    over the flattened matrices, no per-sample loop.

    Shape:
        a: ``[B, N, N]`` -> ``[B, N, N]`` (a new tensor)
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

    Returns:
        ``[B, N, N]`` float32; row ``i`` says how much of token ``i``'s final representation
        flows from each input token.
    """
    t = attn.tensor  # [L, B, H, N, N]
    num_layers = t.shape[0]
    if not -num_layers <= start_layer < num_layers:
        raise ValueError(f"start_layer {start_layer} is out of range for {num_layers} layers")
    start = start_layer % num_layers
    keep_first = bool(attn.layout.has_cls)
    r = None
    for layer in range(start, num_layers):
        a = _layer_matrix(t[layer], head_fusion, discard_ratio, keep_first)  # [B, N, N]
        r = a if r is None else a @ r  # R = Â_l R
    return r


def token_map(rows: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Read a patch map out of square token-to-token matrices.

    The CLS row over the patch tokens (prefix tokens dropped), or, for a model without a CLS
    token, the mean of the patch rows.

    Shape:
        rows: ``[..., N, N]`` -> ``[..., gh, gw]``
    """
    p = layout.num_prefix
    if rows.shape[-1] != layout.num_tokens:
        raise LayoutError(f"{rows.shape[-1]} tokens do not fit the layout {layout}")
    if layout.has_cls:
        vec = rows[..., 0, p:]  # [..., P]
    else:
        vec = rows[..., p:, p:].mean(dim=-2)  # [..., P]
    return vec.reshape(*vec.shape[:-1], *layout.grid)


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

    Example:
        >>> with vitviz.capture(m) as rec:
        ...     m(x)
        >>> vitviz.rollout(rec.attentions, discard_ratio=0.9).shape
        torch.Size([1, 14, 14])
    """
    from .query import query_weights

    t = attn.tensor  # [L, B, H, N, N]
    num_layers, b, n = t.shape[0], t.shape[1], t.shape[-1]
    if not -num_layers <= start_layer < num_layers:
        raise ValueError(f"start_layer {start_layer} is out of range for {num_layers} layers")
    layout = attn.layout
    if n != layout.num_tokens:
        raise LayoutError(f"{n} tokens do not fit the layout {layout}")
    # The map is one row of R = Â_L … Â_start (the CLS row, or the mean of the patch rows):
    # pushed through the layers from the last one down, r = ((qᵀ Â_L) Â_{L-1}) … Â_start, it
    # costs O(L·N²) per sample instead of the O(L·N³) of the full product (same matrices).
    row = query_weights(layout, "auto", device=t.device).expand(b, 1, n)  # [B, 1, N]
    keep_first = bool(layout.has_cls)
    for layer in range(num_layers - 1, start_layer % num_layers - 1, -1):
        row = torch.bmm(row, _layer_matrix(t[layer], head_fusion, discard_ratio, keep_first))  # [B, 1, N]
    return row[:, 0, layout.num_prefix:].reshape(b, *layout.grid)


class RolloutStream:
    """Attention rollout computed layer by layer, as the layers run (a stream of
    :func:`vitviz.capture`).

    Keeps only the running product ``[B, N, N]`` (float32) instead of every layer's
    ``[B, H, N, N]``: memory ``O(B*N^2)`` instead of ``O(L*B*H*N^2)``. Gives exactly
    :func:`rollout`'s result (same per-layer matrix, same product order). What it needs to
    know about the model comes with each layer: whether token 0 is a CLS token (kept when
    discarding) from ``layout``, the depth from ``num_layers`` (for a negative
    ``start_layer``; when the depth is not known before the pass ends, the last
    ``-start_layer`` layer matrices are kept and multiplied at the end).

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
        self.product = None  # [B, N, N] float32
        self.last: list[torch.Tensor] = []  # negative start_layer, depth unknown: [B, N, N] each

    def update(self, attn_l: torch.Tensor, *, layer: int, layout: TokenLayout,
               num_layers: int | None = None) -> None:
        """Fold in layer ``layer`` (of ``num_layers``, when known) with attention ``[B, H, N, N]``."""
        self.layers_seen = max(self.layers_seen, layer + 1)
        start = self.start_layer
        if start < 0 and num_layers:
            start %= num_layers
        if start >= 0 and layer < start:
            return
        a = _layer_matrix(attn_l.detach(), self.head_fusion, self.discard_ratio,
                          bool(layout.has_cls))  # [B, N, N]
        if start < 0:  # depth unknown: keep the last -start layers
            self.last = (self.last + [a])[start:]
            return
        self.product = a if self.product is None else a @ self.product

    def result(self, layout: TokenLayout) -> torch.Tensor:
        """The rollout map ``[B, gh, gw]`` of the layers seen."""
        product = self.product
        if self.last:
            if len(self.last) < -self.start_layer:
                raise ValueError(f"start_layer {self.start_layer} is out of range for "
                                 f"{self.layers_seen} layers")
            for a in self.last:
                product = a if product is None else a @ product
        if product is None:
            raise ValueError(f"no layer at or after start_layer {self.start_layer} was seen "
                             f"({self.layers_seen} layers seen)")
        return token_map(product, layout)
