"""The data that flows between capture, analyzers and renderers.

Everything here is plain data: a token layout and tensors of attention
probabilities. Users can build these themselves (e.g. from saved ``.npy`` files)
and hand them to any analyzer.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import LayoutError

if TYPE_CHECKING:  # torch is imported lazily so `vitviz --help` stays fast
    import torch


@dataclass(frozen=True)
class TokenLayout:
    """Where the tokens of a Vision Transformer sequence come from.

    The sequence is ``num_prefix`` prefix tokens (CLS first, then distillation
    and register tokens) followed by ``gh * gw`` patch tokens in row-major order.
    ``has_cls`` says whether the first prefix token is a CLS token; models with
    prefix tokens normally have one, models without prefix tokens do not.

    A video model's patch tokens also have a time axis: ``frames`` temporal positions of
    ``tubelet`` input frames each, so ``frames * gh * gw`` patch tokens, in the model's own
    order: time-major ``(frame, row, col)`` (VideoMAE, ViViT) or space-major
    ``(row, col, frame)`` (TimeSformer, ``time_major=False``). Maps over such a layout are
    ``[..., frames, gh, gw]`` (:meth:`patch_map`).

    Args:
        num_prefix: number of non-patch tokens before the patches.
        grid: ``(gh, gw)`` patch rows and columns of *this* input (required: a layout has no
            default grid; ``TokenLayout()`` without one still gives 14x14 with a
            ``DeprecationWarning``, and will be refused in a later version).
        has_cls: whether token 0 is a CLS token (default: ``num_prefix > 0``).
        num_suffix: tokens after the patches (YOLOS' detection tokens); default 0.
        frames: temporal token positions of a video model (input frames / ``tubelet``); 1 for
            images.
        tubelet: input frames per temporal position (VideoMAE and ViViT: 2; TimeSformer: 1).
        time_major: the patch tokens run ``(frame, row, col)`` (True) or ``(row, col, frame)``
            (False, TimeSformer).

    Example:
        >>> TokenLayout(num_prefix=2, grid=(14, 14)).num_tokens  # DeiT distilled
        198
        >>> TokenLayout(num_prefix=0, grid=(14, 14), frames=8, tubelet=2).map_shape  # VideoMAE-B, 16 frames
        (8, 14, 14)
    """

    num_prefix: int = 1
    grid: tuple[int, int] = None  # type: ignore[assignment]  # required; None only for the deprecation path
    has_cls: bool | None = field(default=None)
    num_suffix: int = 0
    frames: int = 1
    tubelet: int = 1
    time_major: bool = True

    def __post_init__(self) -> None:
        if self.grid is None:
            warnings.warn("TokenLayout() without grid= is deprecated (it assumed a 14x14 grid); pass "
                          "grid=(rows, cols) of the input", DeprecationWarning, stacklevel=3)
            object.__setattr__(self, "grid", (14, 14))
        grid = tuple(int(g) for g in self.grid)
        if len(grid) != 2 or min(grid) < 1:
            raise LayoutError(f"grid must be two positive ints (rows, cols), got {self.grid!r}")
        if int(self.num_prefix) < 0:
            raise LayoutError(f"num_prefix must be >= 0, got {self.num_prefix}")
        object.__setattr__(self, "grid", grid)
        object.__setattr__(self, "num_prefix", int(self.num_prefix))
        if int(self.num_suffix) < 0:
            raise LayoutError(f"num_suffix must be >= 0, got {self.num_suffix}")
        object.__setattr__(self, "num_suffix", int(self.num_suffix))
        for name in ("frames", "tubelet"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or int(value) < 1:
                raise LayoutError(f"{name} must be a positive int, got {value!r}")
            object.__setattr__(self, name, int(value))
        object.__setattr__(self, "time_major", bool(self.time_major))
        if self.has_cls is None:
            object.__setattr__(self, "has_cls", self.num_prefix > 0)
        elif self.has_cls and self.num_prefix == 0:
            raise LayoutError("has_cls=True needs num_prefix >= 1 (the CLS token is a prefix token)")

    def __repr__(self) -> str:
        suffix = f", num_suffix={self.num_suffix}" if self.num_suffix else ""
        if self.is_video:
            suffix += f", frames={self.frames}, tubelet={self.tubelet}"
            suffix += "" if self.time_major else ", time_major=False"
        return f"TokenLayout(num_prefix={self.num_prefix}, grid={self.grid}, has_cls={self.has_cls}{suffix})"

    @property
    def is_video(self) -> bool:
        """Whether the patch tokens have a time axis (a video model's layout)."""
        return self.frames > 1 or self.tubelet > 1

    @property
    def map_shape(self) -> tuple[int, ...]:
        """The shape of a map over the patch tokens: ``(gh, gw)``, or ``(frames, gh, gw)`` for a video."""
        return (self.frames, *self.grid) if self.is_video else self.grid

    @property
    def num_patches(self) -> int:
        return self.frames * self.grid[0] * self.grid[1]

    def patch_map(self, values: torch.Tensor) -> torch.Tensor:
        """Values over the patch tokens laid out as a map.

        Args:
            values: ``[..., P]``, one value per patch token in the sequence's order.

        Returns:
            ``[..., gh, gw]``, or ``[..., frames, gh, gw]`` for a video (whatever the model's
            token order).

        Raises:
            LayoutError: the last dimension is not the ``P`` patch tokens.
        """
        if values.shape[-1] != self.num_patches:
            raise LayoutError(f"{values.shape[-1]} values do not fit the {self.num_patches} patch tokens of {self}")
        lead = values.shape[:-1]
        if self.time_major:
            return values.reshape(*lead, *self.map_shape)
        gh, gw = self.grid
        return values.reshape(*lead, gh, gw, self.frames).movedim(-1, -3)  # (row, col, frame) -> (frame, row, col)

    def patch_values(self, maps: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`patch_map`: maps laid out on the grid back in the sequence's order.

        Args:
            maps: ``[..., gh, gw]``, or ``[..., frames, gh, gw]`` for a video.

        Returns:
            ``[..., P]``, one value per patch token in the model's token order.

        Raises:
            LayoutError: the maps do not end in :attr:`map_shape`.
        """
        shape = self.map_shape
        if tuple(maps.shape[maps.dim() - len(shape):]) != tuple(shape):
            raise LayoutError(f"maps of shape {tuple(maps.shape)} do not end in {tuple(shape)} ({self})")
        lead = maps.shape[:maps.dim() - len(shape)]
        if not self.time_major:
            maps = maps.movedim(-3, -1)  # (frame, row, col) -> (row, col, frame)
        return maps.reshape(*lead, self.num_patches)

    def patch_index(self, row: int, col: int, frame: int = 0) -> int:
        """The sequence index of the patch token at ``(row, col)`` of temporal position ``frame``.

        Args:
            row, col: the patch's grid position (negative counts from the end).
            frame: its temporal position (0 for an image layout).

        Returns:
            The token's index in the sequence (prefix tokens counted).

        Raises:
            LayoutError: the position is outside the grid (negative counts from the end).
        """
        gh, gw = self.grid
        t = self.frames
        if not (-gh <= row < gh and -gw <= col < gw and -t <= frame < t):
            where = f"({frame}, {row}, {col})" if self.is_video else f"({row}, {col})"
            grid = f"{t}x{gh}x{gw} (frames x rows x cols)" if self.is_video else f"{gh}x{gw}"
            raise LayoutError(f"patch {where} is outside the {grid} patch grid")
        row, col, frame = row % gh, col % gw, frame % t
        inner = (frame * gh + row) * gw + col if self.time_major else (row * gw + col) * t + frame
        return self.num_prefix + inner

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + self.num_patches + self.num_suffix

    @property
    def patches(self) -> slice:
        """Where the patch tokens are in the sequence: ``x[..., layout.patches]``."""
        return slice(self.num_prefix, self.num_prefix + self.num_patches)

    def check_tokens(self, n: int, what: str = "attention") -> None:
        """Check that a sequence of ``n`` tokens fits this layout.

        Args:
            n: the sequence length.
            what: what the sequence is, for the message.

        Raises:
            LayoutError: ``n`` is not ``num_prefix + gh*gw + num_suffix``.
        """
        if n != self.num_tokens:
            patches = f"{self.grid[0]}x{self.grid[1]}"
            patches = f"{self.frames}x{patches}" if self.is_video else patches
            raise LayoutError(
                f"{what} has {n} tokens but the layout {self} needs "
                f"{self.num_prefix} prefix + {patches} patches"
                + (f" + {self.num_suffix} suffix" if self.num_suffix else "") + f" = {self.num_tokens}; "
                "pass the right grid= / num_prefix= to vitviz.wrap or TokenLayout"
            )


def _as_tensor(x: object) -> torch.Tensor:
    import numpy as np
    import torch

    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor or numpy array, got {type(x).__name__}")
    return x


def _row_sums(t: torch.Tensor) -> str:
    """``"rows sum to 0.998-1.000"`` of an attention tensor (its last dim), for a one-line repr."""
    if t.numel() == 0:
        return "no rows"
    s = t.detach().float().sum(-1)
    return f"rows sum to {float(s.min()):.3f}-{float(s.max()):.3f}"


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


@dataclass
class AttentionMaps:
    """Self-attention probabilities of an image encoder.

    Args:
        tensor: ``[L, B, H, N, N]`` float attention (rows sum to 1), layer-major in
            the order the layers run; query index first, key index second.
        layout: the :class:`TokenLayout` of the ``N`` tokens (of the queries, when
            ``key_layout`` is given).
        key_layout: the layout of the keys when they are other tokens than the queries:
            ``[L, B, H, Nq, Nk]`` attention over keys pooled or spatially reduced to a coarser
            grid (PVT, Segformer, Twins, MViTv2). None: keys = queries.
        layers: which of the model's image self-attention layers these are (counted over the
            whole model, in the order they run), for one stage of a hierarchical model
            (``rec.stages``); None: every layer, in order.
        rows: the token indices of the query rows the tensor holds, when it holds only some
            (``vitviz.capture(m, rows="cls")``): ``[L, B, H, R, N]`` with row ``r`` the attention
            of token ``rows[r]`` over all ``N`` keys of ``layout``. None: every row. CLS and query
            maps read such maps; analyses that chain layers (rollout, flow) need every row.

    Example:
        >>> maps = AttentionMaps(torch.softmax(torch.randn(2, 1, 3, 5, 5), -1),
        ...                      TokenLayout(num_prefix=1, grid=(2, 2)))
        >>> maps.num_layers, maps.num_heads
        (2, 3)
    """

    tensor: torch.Tensor
    layout: TokenLayout
    key_layout: TokenLayout | None = None
    layers: tuple[int, ...] | None = None
    rows: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        self.tensor = _as_tensor(self.tensor)
        t = self.tensor
        if self.key_layout == self.layout:
            self.key_layout = None
        if self.rows is not None:
            self._check_rows()
        elif t.dim() != 5 or (self.key_layout is None and t.shape[-1] != t.shape[-2]):
            raise LayoutError(
                f"AttentionMaps expects a [L, B, H, N, N] tensor (or [L, B, H, Nq, Nk] with key_layout=), "
                f"got shape {tuple(t.shape)}"
            )
        if self.rows is not None:
            pass  # checked by _check_rows
        elif self.key_layout is None:
            self.layout.check_tokens(t.shape[-1])
        else:
            self.layout.check_tokens(t.shape[-2], "attention queries")
            self.key_layout.check_tokens(t.shape[-1], "attention keys")
        if self.layers is not None:
            self.layers = tuple(int(i) for i in self.layers)
            if len(self.layers) != t.shape[0]:
                raise LayoutError(f"{len(self.layers)} layer indices given for {t.shape[0]} layers")

    def _check_rows(self) -> None:
        t = self.tensor
        if self.key_layout is not None:
            raise LayoutError("AttentionMaps takes rows= or key_layout=, not both")
        rows = tuple(int(r) for r in self.rows)  # type: ignore[union-attr]
        if t.dim() != 5 or t.shape[-2] != len(rows):
            raise LayoutError(f"AttentionMaps with rows={rows} expects a [L, B, H, {len(rows)}, N] tensor, "
                              f"got shape {tuple(t.shape)}")
        self.layout.check_tokens(t.shape[-1], "attention keys")
        n = t.shape[-1]
        if not rows or any(not 0 <= r < n for r in rows) or len(set(rows)) != len(rows):
            raise LayoutError(f"rows must be distinct token indices in 0..{n - 1}, got {rows}")
        self.rows = rows

    def require_rows(self, what: str) -> None:
        """Check that the tensor holds every query row (not a rows-only capture).

        Args:
            what: the analysis that needs every row, for the message.

        Raises:
            LayoutError: only some rows were captured (``rows=``).
        """
        if self.rows is not None:
            raise LayoutError(
                f"{what} needs the attention of every query token, but these maps hold only the rows of "
                f"tokens {list(self.rows)} (vitviz.capture(..., rows=...)); capture without rows= for it")

    @property
    def keys(self) -> TokenLayout:
        """The layout of the key tokens (the query layout unless keys are reduced)."""
        return self.key_layout if self.key_layout is not None else self.layout

    @property
    def square(self) -> bool:
        """Whether queries and keys are the same tokens, every row of them (what rollout and flow need)."""
        return self.key_layout is None and self.rows is None

    def require_square(self, what: str) -> None:
        """Check that queries and keys are the same tokens (what rollout and flow chain).

        Args:
            what: the analysis that needs it, for the message.

        Raises:
            LayoutError: the keys are reduced (spatial-reduction attention), or only some query
                rows were captured.
        """
        self.require_rows(what)
        if self.key_layout is not None:
            raise LayoutError(
                f"{what} chains attention over one set of tokens, but these layers' keys are reduced to "
                f"{self.key_layout.grid[0]}x{self.key_layout.grid[1]} while the queries are "
                f"{self.layout.grid[0]}x{self.layout.grid[1]} (spatial-reduction attention); use "
                "vitviz.cls_maps / vitviz.query_maps, which map each layer over its key grid")

    @property
    def num_layers(self) -> int:
        return self.tensor.shape[0]

    @property
    def device(self) -> torch.device:
        """Where the maps are."""
        return self.tensor.device

    def weighted_rows(self, weights: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """The query rows combined: ``sum_q weights[q] * tensor[..., q, :]`` (what CLS-row and
        query maps read).

        Args:
            weights: ``[Nq]`` weights of the query rows held (``[R]`` with :attr:`rows`), on
                :attr:`device`; their dtype is the result's.
            layer: one layer's index, or None for every layer.

        Returns:
            ``[B, H, Nk]`` for one layer, ``[L, B, H, Nk]`` for all.
        """
        import torch

        a = self.tensor if layer is None else self.tensor[layer]
        return torch.einsum("q,...qk->...k", weights, a.to(weights.dtype))

    @property
    def batch_size(self) -> int:
        return self.tensor.shape[1]

    @property
    def num_heads(self) -> int:
        return self.tensor.shape[2]

    def __len__(self) -> int:
        return self.num_layers

    def __repr__(self) -> str:
        """One line: shape, dtype, layout(s), layers and row sums (never the raw tensor)."""
        keys = "" if self.key_layout is None else f", key_layout={self.key_layout!r}"
        layers = "" if self.layers is None else f", layers={self.layers[0]}-{self.layers[-1]}"
        rows = "" if self.rows is None else f", rows={list(self.rows)}"
        dims = "[L, B, H, N, N]" if self.rows is None else "[L, B, H, R, N]"
        shape, sums, dtype = self._summary()
        return (f"AttentionMaps([{', '.join(str(d) for d in shape)}] {dims} {str(dtype).replace('torch.', '')}, "
                f"layout={self.layout!r}{keys}{layers}{rows}, {_row_sums(sums[..., None])})")

    def _summary(self) -> tuple[list[int], torch.Tensor, torch.dtype]:
        """``(shape, row sums, dtype)`` of the tensor, for the repr."""
        return list(self.tensor.shape), self.tensor.detach().float().sum(-1), self.tensor.dtype

    def to(self, *args: Any, **kwargs: Any) -> AttentionMaps:
        """The same maps moved or cast, as ``torch.Tensor.to``.

        Args:
            *args: ``torch.Tensor.to``'s arguments (a device, a dtype).
            **kwargs: its keyword arguments.

        Returns:
            A new :class:`AttentionMaps` with the same layouts and layer indices.
        """
        return AttentionMaps(self.tensor.to(*args, **kwargs), self.layout, self.key_layout, self.layers, self.rows)

    def samples(self, start: int, stop: int) -> AttentionMaps:
        """The maps of samples ``start`` to ``stop - 1`` of the batch (the same layouts and layers).

        Args:
            start, stop: the samples, as a slice ``[start:stop]`` of the batch.

        Returns:
            :class:`AttentionMaps` ``[L, stop - start, H, N, N]`` (a view where the tensor allows).
        """
        return AttentionMaps(self.tensor[:, start:stop], self.layout, self.key_layout, self.layers, self.rows)

    def _repr_png_(self) -> bytes:
        """PNG for notebooks: the CLS-row map (mean of the patch rows without CLS) of every
        layer and head of the first sample, as a layers x heads grid; for a clip, the maps of
        its middle temporal token position (named in the title)."""
        from .analyze.cls import all_layer_maps
        from .render.figures import figure_png, map_grid

        first = self.samples(0, 1)
        maps = all_layer_maps(first)[:, 0]  # [L, H, gh, gw] ([L, H, frames, gh, gw] for a clip) over the key grid
        names = self.layers if self.layers is not None else range(self.num_layers)
        what = "CLS attention" if self.layout.has_cls else "mean patch attention"
        if self.keys.is_video:
            middle = self.keys.frames // 2
            maps = maps[:, :, middle]  # [L, H, gh, gw]
            what += f" on temporal position {middle} of {self.keys.frames}"
        gh, gw = self.keys.grid
        fig, _ = map_grid(maps, row_labels=[f"layer {i}" for i in names],
                          col_labels=[f"head {h}" for h in range(self.num_heads)], cmap="inferno",
                          title=f"{what}, sample 0 of {self.batch_size} ({gh}x{gw} patches)")
        return figure_png(fig)


@dataclass
class CrossAttentionMaps:
    """Cross-attention of text queries over image-encoder tokens.

    Args:
        tensor: ``[L, B, H, T, Ni]``: for every decoder layer, sample, head and
            text position, the attention over the ``Ni`` encoder tokens.
        layout: the :class:`TokenLayout` of the encoder tokens (which are patches).
        tokens: the ``T`` text tokens as strings, when known.
    """

    tensor: torch.Tensor
    layout: TokenLayout
    tokens: Sequence[str] | None = None

    def __post_init__(self) -> None:
        self.tensor = _as_tensor(self.tensor)
        t = self.tensor
        if t.dim() != 5:
            raise LayoutError(
                f"CrossAttentionMaps expects a [L, B, H, T, Ni] tensor, got shape {tuple(t.shape)}"
            )
        self.layout.check_tokens(t.shape[-1], "cross-attention keys")
        if self.tokens is not None:
            self.tokens = list(self.tokens)
            if len(self.tokens) != t.shape[-2]:
                raise LayoutError(
                    f"{len(self.tokens)} tokens given for {t.shape[-2]} cross-attention query rows"
                )

    def __repr__(self) -> str:
        """One line: shape, dtype, layout, the first tokens and row sums (never the raw tensor).
        Rows of a decoder-only model's map sum to less than 1 (the rest went to text tokens)."""
        tokens = ""
        if self.tokens is not None:
            shown = ", ".join(repr(w) for w in list(self.tokens)[:5])
            tokens = f", tokens=[{shown}{', ...' if len(self.tokens) > 5 else ''}]"
        return (f"CrossAttentionMaps({_shape(self.tensor)} [L, B, H, T, Ni] "
                f"{str(self.tensor.dtype).replace('torch.', '')}, layout={self.layout!r}{tokens}, "
                f"{_row_sums(self.tensor)})")

    @property
    def num_layers(self) -> int:
        return self.tensor.shape[0]
