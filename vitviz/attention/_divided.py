"""Divided space-time attention (TimeSformer) put on the clip's token grid.

TimeSformer (Bertasius et al. 2021, "Is Space-Time Attention All You Need for Video
Understanding?", divided space-time attention; transformers' ``TimesformerLayer``) keeps one
sequence of ``1 + T*gh*gw`` tokens per clip -- a CLS token, then the patches in ``(row, col,
frame)`` order -- and runs two attentions per block, each over a part of it:

- **temporal** (``temporal_attention``): ``B*gh*gw`` sequences of ``T`` tokens, the patch
  ``(r, c)`` of every frame; the CLS token is not in them (its output is dropped).
- **spatial** (``attention``): ``B*T`` sequences of ``1 + gh*gw`` tokens, one frame's patches
  after a per-frame copy of the CLS token; the CLS outputs of the ``T`` copies are averaged.

Each is placed as a block-sparse ``[B, H, N, N]`` matrix over the clip's tokens (``N = 1 +
T*gh*gw``, the model's own order) that mixes the layer's values exactly as the model does:

- temporal: patch ``(r, c, t)``'s row is its attention over ``(r, c, t')``; the CLS row is the
  identity (the CLS token is not mixed in this layer: it keeps its own value).
- spatial: patch ``(r, c, t)``'s row is frame ``t``'s: column 0 its weight on frame ``t``'s CLS
  copy, ``(r', c', t)`` its weights on the frame's patches; the CLS row is the mean over frames
  of the frames' CLS rows (column 0: the mean of the CLS->CLS weights; ``(r', c', t)``: ``1/T``
  of frame ``t``'s weight). This is exact because the ``T`` copies are one vector (the block
  repeats the CLS token) and the model averages their outputs. Rows still sum to 1.

Gradients (``d score / d A`` of the model's per-sequence probabilities) are placed so that they
are the gradient with respect to the placed matrix as the mixing matrix: the same as the
probabilities on patch rows; on the spatial CLS row ``T`` times the frame's gradient
(``dM[0, (r, c, t)] = T·dA_t[0, 1 + (r, c)]``, ``dM[0, 0] = Σ_t dA_t[0, 0]``, since
``M[0, ·]`` carries ``1/T`` of each frame's weight); zero on the temporal CLS row (not used).
Then ``M ⊙ dM`` of the CLS row equals the frames' own ``A_t ⊙ dA_t`` (Chefer relevance).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..analyze import fuse_heads

TIME, SPACE = "time", "space"


@dataclass(frozen=True)
class DividedScheme:
    """One divided-attention layer of a clip: which attention it is and the clip's token grid.

    Attributes:
        kind: ``"time"`` (over the frames of one patch) or ``"space"`` (over one frame's patches,
            with a copy of the CLS token first).
        grid: ``(gh, gw)`` patches per frame.
        frames: ``T`` temporal token positions.
    """

    kind: str
    grid: tuple[int, int]
    frames: int

    @property
    def patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        """``N = 1 + T*gh*gw``: the CLS token and every patch of the clip."""
        return 1 + self.frames * self.patches

    def sequences(self, batch: int) -> tuple[int, int]:
        """``(sequences, tokens per sequence)`` the model attends over for ``batch`` clips."""
        if self.kind == TIME:
            return batch * self.patches, self.frames
        return batch * self.frames, 1 + self.patches

    def fits(self, shape: tuple, batch: int | None) -> bool:
        """Whether an attention of ``shape`` (``[B', H, Q, K]``) is this layer for ``batch`` clips."""
        if batch is None:
            return False
        sequences, length = self.sequences(batch)
        return shape[0] == sequences and shape[-2] == length and shape[-1] == length

    def _patch_index(self, device) -> torch.Tensor:
        """The flat ``[N*N]`` positions of the patch rows' entries, in the order of the source
        entries (see :meth:`place`)."""
        t, p, n = self.frames, self.patches, self.num_tokens
        if self.kind == TIME:  # source [rc, t, t'] -> (1 + rc*T + t, 1 + rc*T + t')
            rc = torch.arange(p, device=device).view(p, 1, 1)
            q = 1 + rc * t + torch.arange(t, device=device).view(1, t, 1)
            k = 1 + rc * t + torch.arange(t, device=device).view(1, 1, t)
            return (q * n + k).reshape(-1)
        # source [t, rc, j] (j: 0 the frame's CLS copy, 1 + rc' a patch) -> (1 + rc*T + t, col)
        frame = torch.arange(t, device=device).view(t, 1, 1)
        q = 1 + torch.arange(p, device=device).view(1, p, 1) * t + frame
        j = torch.arange(1 + p, device=device).view(1, 1, 1 + p)
        k = torch.where(j == 0, torch.zeros_like(j), 1 + (j - 1) * t + frame)
        return (q * n + k).reshape(-1)

    def product(self, attn: torch.Tensor, grad: torch.Tensor, fusion: tuple[str, bool]) -> torch.Tensor:
        """``fuse_h(M ⊙ dM)`` of the placed probabilities ``M`` and gradient ``dM``, each head
        clamped at 0 first when ``fusion[1]``, without forming either ``[B, H, N, N]``.

        The product is placed like the probabilities with the spatial CLS row unscaled (``M``
        carries ``1/T`` of each frame's weight and ``dM`` ``T`` times its gradient, so
        ``M ⊙ dM = A_t ⊙ dA_t`` there), except ``[0, 0]``: ``mean_t A_t[0, 0] · Σ_t dA_t[0, 0]``
        per head (spatial) or ``1 · 0`` (temporal).

        Args:
            attn, grad: ``[B * S, H, L, L]`` the layer's probabilities and their gradient as the
                model computed them.
            fusion: ``(head_fusion, clamp_first)`` (:func:`vitviz.analyze.fuse_heads`).

        Returns:
            ``[B, N, N]`` float32.
        """
        head_fusion, clamp = fusion
        a, g = attn.float(), grad.float()
        prod = a * g  # [B*S, H, L, L]
        if clamp:
            prod.clamp_(min=0)
        out = self.place(fuse_heads(prod, head_fusion).unsqueeze(1), mode="product")[:, 0]  # [B, N, N]
        if self.kind == SPACE:
            s, heads = a.shape[:2]
            a00 = a[:, :, 0, 0].reshape(s // self.frames, self.frames, heads)  # [B, T, H]
            g00 = g[:, :, 0, 0].reshape(s // self.frames, self.frames, heads)
            corner = (a00.mean(1) * g00.sum(1)).unsqueeze(-1).unsqueeze(-1)  # [B, H, 1, 1]
            if clamp:
                corner = corner.clamp(min=0)
            out[:, 0, 0] = fuse_heads(corner, head_fusion)[:, 0, 0]
        return out

    def place(self, attn: torch.Tensor, mode: str = "probs") -> torch.Tensor:
        """The layer's per-sequence attention (or its gradient, or their product) on the clip's grid.

        Args:
            attn: ``[B * S, H, L, L]`` as the model computed it (``S`` sequences of ``L`` tokens
                per clip: :meth:`sequences`).
            mode: ``"probs"`` (probabilities), ``"grad"`` (a gradient ``d score / d attn``, the
                CLS row scaled as described in the module docstring) or ``"product"`` (a product
                of the two, already fused over heads or not: the CLS row unscaled, ``[0, 0]``
                left 0 for :meth:`product`).

        Returns:
            ``[B, H, N, N]`` in the dtype of ``attn``.

        Raises:
            ValueError: ``attn``'s shape is not this layer's.
        """
        s, heads, length, _ = attn.shape
        per, want = self.sequences(1)
        if s % per or length != want or attn.shape[-1] != want:
            raise ValueError(f"divided attention of shape {tuple(attn.shape)} does not fit {self}")
        b, t, p, n = s // per, self.frames, self.patches, self.num_tokens
        out = attn.new_zeros(b, heads, n * n)
        flat = self._patch_index(attn.device)
        if self.kind == TIME:
            src = attn.reshape(b, p, heads, t, t).transpose(1, 2)  # [B, H, P, T, T]
            out[..., flat] = src.reshape(b, heads, -1)
            out = out.view(b, heads, n, n)
            if mode == "probs":  # the CLS token keeps its own value; its gradient row is zero (not used)
                out[:, :, 0, 0] = 1
            return out
        a = attn.reshape(b, t, heads, 1 + p, 1 + p)  # [B, T, H, 1+P, 1+P]
        out[..., flat] = a[..., 1:, :].transpose(1, 2).reshape(b, heads, -1)  # patch rows of every frame
        out = out.view(b, heads, n, n)
        cls = a[..., 0, :]  # [B, T, H, 1+P]: each frame's CLS row
        # M[0, 0] = mean_t A_t[0, 0] and M[0, (rc, t)] = A_t[0, 1+rc] / T; dM = T x those of dA
        scale = {"grad": float(t), "probs": 1.0 / t, "product": 1.0}[mode]
        if mode != "product":  # a product's [0, 0] is not a placement of the frames' (see product)
            out[:, :, 0, 0] = cls[..., 0].sum(1) * (1.0 if mode == "grad" else scale)
        out[:, :, 0, 1:] = (cls[..., 1:] * scale).permute(0, 2, 3, 1).reshape(b, heads, p * t)  # (rc, t) order
        return out


class DividedPlacer:
    """``placer(attn)`` puts a divided layer on the clip's grid; ``placer.grad(g)`` its gradient."""

    def __init__(self, scheme: DividedScheme):
        self.scheme = scheme

    def __call__(self, attn: torch.Tensor) -> torch.Tensor:
        return self.scheme.place(attn)

    def grad(self, g: torch.Tensor) -> torch.Tensor:
        return self.scheme.place(g, mode="grad")
