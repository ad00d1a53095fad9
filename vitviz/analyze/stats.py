"""Per-head, per-layer statistics of attention: entropy, mean attention distance, prefix share.

* Entropy of each query row, ``-sum_k a_qk log a_qk`` in nats (``0 log 0 = 0``), averaged
  over the chosen query rows. ``normalized=True`` divides by ``log N`` (1 = uniform).
* Mean attention distance, the ViT paper's Fig. 7 (right) / Fig. 11 (Dosovitskiy et al.
  2021, App. D.7): for every patch query, the attention-weighted mean distance between its
  patch and the patches it attends to, averaged over the patch queries. Distances come from
  the token grid (patch centres, row-major; in patches, or in pixels with ``patch_size``).
  Prefix tokens have no position: they are excluded as queries and as keys, and each
  query's attention over the patches is renormalised to sum to 1 (``renormalize=False``
  keeps the raw weights, so attention to prefix tokens counts as distance 0, as in some
  public re-implementations).
* Prefix share: the attention mass that patch queries (or all queries) put on prefix tokens
  (CLS, distillation, registers), the "attention sink" measure of Darcet et al. 2024.
"""

from __future__ import annotations

import torch

from ..errors import LayoutError
from ..types import AttentionMaps, TokenLayout

QUERY_SETS = ("all", "patches", "prefix", "cls")


def _query_slice(layout: TokenLayout, queries: str) -> slice:
    p, n = layout.num_prefix, layout.num_tokens
    if queries == "all":
        return slice(0, n)
    if queries == "patches":
        return layout.patches
    if queries in ("prefix", "cls"):
        if p == 0 or (queries == "cls" and not layout.has_cls):
            raise LayoutError(f"{layout} has no {'CLS' if queries == 'cls' else 'prefix'} token")
        return slice(0, 1) if queries == "cls" else slice(0, p)
    raise ValueError(f"queries must be one of {', '.join(QUERY_SETS)}, got {queries!r}")


def attention_entropy(attn: AttentionMaps, *, queries: str = "all", normalized: bool = False) -> torch.Tensor:
    """Mean entropy of the attention rows, per layer, sample and head.

    Args:
        attn: :class:`AttentionMaps` ``[L, B, H, N, N]``.
        queries: rows to average: ``"all"``, ``"patches"``, ``"prefix"`` or ``"cls"``.
        normalized: divide by ``log N`` so that uniform attention gives 1.

    Returns:
        ``[L, B, H]`` float32, in nats (or in ``[0, 1]`` when normalized).

    Example:
        >>> attention_entropy(rec.attentions).mean(1)  # [L, H] averaged over the batch
    """
    attn.require_rows("attention entropy")
    a = attn.tensor[..., _query_slice(attn.layout, queries), :].double()  # [L, B, H, Q, N]
    ent = -torch.where(a > 0, a * a.clamp_min(1e-300).log(), torch.zeros_like(a)).sum(-1)  # [L, B, H, Q]
    ent = ent.mean(-1)  # [L, B, H]
    if normalized:
        n = attn.tensor.shape[-1]
        ent = ent / torch.log(torch.tensor(float(n), dtype=ent.dtype)) if n > 1 else torch.zeros_like(ent)
    return ent.float()


def patch_distances(grid: tuple[int, int], patch_size: int | tuple[int, int] | None = None,
                    *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Euclidean distances between patch centres.

    Args:
        grid: ``(gh, gw)``.
        patch_size: ``p`` or ``(ph, pw)`` in pixels; ``None`` measures in patches.

    Returns:
        ``[gh*gw, gh*gw]`` (row-major patches).
    """
    gh, gw = grid
    if patch_size is None:
        ph = pw = 1.0
    elif isinstance(patch_size, (tuple, list)):
        ph, pw = float(patch_size[0]), float(patch_size[-1])
    else:
        ph = pw = float(patch_size)
    rows = torch.arange(gh, device=device, dtype=torch.float64).repeat_interleave(gw) * ph  # [P]
    cols = torch.arange(gw, device=device, dtype=torch.float64).repeat(gh) * pw  # [P]
    d = ((rows[:, None] - rows[None]) ** 2 + (cols[:, None] - cols[None]) ** 2).sqrt()  # [P, P]
    return d.to(dtype)


def mean_attention_distance(attn: AttentionMaps, *, patch_size: int | tuple[int, int] | None = None,
                            renormalize: bool = True) -> torch.Tensor:
    """Mean attention distance per layer, sample and head (the ViT paper's plot).

    Args:
        attn: :class:`AttentionMaps` ``[L, B, H, N, N]``.
        patch_size: ``p`` or ``(ph, pw)`` to measure in pixels (e.g. ``model.patch_size``);
            ``None`` measures in patches.
        renormalize: renormalise each query's attention over the patches to sum to 1.

    Returns:
        ``[L, B, H]`` float32.

    Example:
        >>> d = mean_attention_distance(rec.attentions, patch_size=16).mean(1)  # [L, H] pixels
    """
    attn.require_square("mean attention distance")
    layout = attn.layout
    a = attn.tensor[..., layout.patches, layout.patches].double()  # [L, B, H, P, P]
    if renormalize:
        a = a / a.sum(-1, keepdim=True).clamp_min(1e-300)
    d = patch_distances(layout.grid, patch_size, device=a.device, dtype=a.dtype)  # [gh*gw, gh*gw]
    if layout.is_video:  # the distance within the frame, whatever the two tokens' temporal positions
        gh, gw = layout.grid
        where = torch.arange(gh * gw, device=a.device).reshape(gh, gw).expand(layout.frames, gh, gw)
        spatial = layout.patch_values(where)  # [P]: each patch token's position in the frame
        d = d[spatial][:, spatial]  # [P, P]
    per_query = torch.einsum("lbhqk,qk->lbhq", a, d)  # [L, B, H, P]
    return per_query.mean(-1).float()  # [L, B, H]


def prefix_attention_share(attn: AttentionMaps, *, queries: str = "patches",
                           per_token: bool = False) -> torch.Tensor:
    """Share of attention that goes to prefix tokens (CLS, distillation, registers).

    Args:
        attn: :class:`AttentionMaps` ``[L, B, H, N, N]``.
        queries: rows to average: ``"patches"`` (default), ``"all"``, ``"prefix"`` or ``"cls"``.
        per_token: keep one value per prefix token instead of their sum.

    Returns:
        ``[L, B, H]`` (or ``[L, B, H, num_prefix]``) float32 in ``[0, 1]``; zeros (or an empty
        last dimension) for models without prefix tokens.
    """
    layout = attn.layout
    p = layout.num_prefix
    attn.require_rows("the prefix attention share")
    a = attn.tensor[..., _query_slice(layout, queries), :p].double()  # [L, B, H, Q, p]
    share = a.mean(-2)  # [L, B, H, p]
    return (share if per_token else share.sum(-1)).float()
