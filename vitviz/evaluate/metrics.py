"""How well does a map point at the object? Metrics against ground-truth masks, and the pure
parts of deletion / insertion curves.

Every metric compares a **patch map** ``[B, gh, gw]`` with a **pixel mask** ``[B, H, W]``
(bool). The map is read as the image-sized map obtained by *nearest-neighbour* upsampling
(what ``torch.nn.functional.interpolate(mode="nearest")`` does: pixel ``(y, x)`` takes the
value of patch ``(floor(y * gh / H), floor(x * gw / W))``), and all metrics are computed
exactly for that upsampled map, at the cost of the patch grid: :func:`patch_counts` counts
how many object pixels fall into each patch, and every metric is a weighted sum over patches.

* :func:`pointing_game` (Zhang et al. 2016, "Top-down Neural Attention by Excitation
  Backprop"): a hit when the map's maximum lies on the object. A patch map is constant over
  each patch, so its maximum is a whole patch: a hit when that patch holds more than
  ``threshold`` object pixels (default: any). Tied maxima count as the expected hit of a
  uniformly random choice among them.
* :func:`energy_pointing` (Wang et al. 2020, "Score-CAM"): the share of the map's mass
  that falls on the object.
* :func:`mask_iou`: intersection over union of the map, min-max scaled and thresholded,
  with the mask.
* :func:`mask_auc`: ROC AUC of the map's values as a pixel-wise score for "object"
  (ties count one half), i.e. the probability that a random object pixel scores higher than
  a random background pixel.
* deletion / insertion (Petsiuk et al. 2018, "RISE"): :func:`patch_order`,
  :func:`step_masks` and :func:`curve_auc` here; the part that runs a model is
  :func:`vitviz.evaluate.faithfulness.deletion_insertion`.
* :func:`word_grounding`: the pointing game of each caption word's map against the mask
  of the object the word names.
* Baseline maps: :func:`random_maps` and :func:`centre_prior` (from :mod:`vitviz.explain.baselines`).

All functions are batched, pure, device- and dtype-agnostic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import LayoutError
from ..explain.baselines import centre_prior, random_maps  # the baselines, re-exported with the metrics


def _check(maps: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(maps, torch.Tensor):
        maps = torch.as_tensor(maps)
    if not isinstance(masks, torch.Tensor):
        masks = torch.as_tensor(masks)
    if maps.dim() == 2:
        maps = maps.unsqueeze(0)
    if masks.dim() == 2:
        masks = masks.unsqueeze(0)
    if maps.dim() != 3 or masks.dim() != 3:
        raise LayoutError(f"expected maps [B, gh, gw] and masks [B, H, W], got {tuple(maps.shape)} "
                          f"and {tuple(masks.shape)}")
    if maps.shape[0] != masks.shape[0]:
        raise LayoutError(f"{maps.shape[0]} maps for {masks.shape[0]} masks; give one mask per map")
    if masks.shape[-2] < maps.shape[-2] or masks.shape[-1] < maps.shape[-1]:
        raise LayoutError(f"masks {tuple(masks.shape[-2:])} are smaller than the map grid "
                          f"{tuple(maps.shape[-2:])}; give masks at the image's resolution")
    if not torch.isfinite(maps).all():
        raise ValueError("maps contain NaN or infinite values")
    return maps, masks


def _assign(n_pixels: int, n_cells: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """One-hot ``[n_pixels, n_cells]``: the cell each pixel row (or column) falls in (nearest)."""
    idx = torch.div(torch.arange(n_pixels, device=device) * n_cells, n_pixels, rounding_mode="floor")
    return torch.nn.functional.one_hot(idx, n_cells).to(dtype)  # [n_pixels, n_cells]


def patch_counts(masks: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Object pixels and all pixels per patch, under nearest-neighbour upsampling of the grid.

    Args:
        masks: ``[B, H, W]`` bool (or 0/1) pixel masks.
        grid: ``(gh, gw)`` of the maps.

    Returns:
        ``(inside, total)``: ``[B, gh, gw]`` object pixels per patch and ``[gh, gw]`` pixels
        per patch (float32). When ``H`` and ``W`` are multiples of the grid, ``total`` is the
        patch area everywhere.

    Example:
        >>> m = torch.zeros(1, 4, 4, dtype=torch.bool); m[0, :2, :3] = True
        >>> patch_counts(m, (2, 2))[0]
        tensor([[[4., 2.],
                 [0., 0.]]])
    """
    gh, gw = int(grid[0]), int(grid[1])
    b, h, w = masks.shape
    rows = _assign(h, gh, masks.device, torch.float32)  # [H, gh]
    cols = _assign(w, gw, masks.device, torch.float32)  # [W, gw]
    inside = torch.einsum("hi,bhw,wj->bij", rows, masks.to(torch.float32), cols)  # [B, gh, gw]
    total = rows.sum(0)[:, None] * cols.sum(0)[None, :]  # [gh, gw]
    return inside, total


def pointing_game(maps: torch.Tensor, masks: torch.Tensor, *, threshold: float = 0.0) -> torch.Tensor:
    """Pointing game per sample: does the map's maximum fall on the object?

    The maximal patch is a hit when the share of its pixels inside the mask is greater than
    ``threshold`` (default 0: at least one object pixel). When several patches tie for the
    maximum, the score is the share of them that hit (the expected score of a random pick).

    Args:
        maps: ``[B, gh, gw]`` (or ``[gh, gw]``) patch maps, any scale.
        masks: ``[B, H, W]`` bool object masks at image resolution.
        threshold: share of a patch's pixels that must be object, in ``[0, 1)``.

    Returns:
        ``[B]`` float32 in ``[0, 1]`` (1 hit, 0 miss).

    Example:
        >>> maps = torch.tensor([[[0., 1.], [0., 0.]]])
        >>> mask = torch.zeros(1, 4, 4, dtype=torch.bool); mask[0, 0, 3] = True
        >>> pointing_game(maps, mask)
        tensor([1.])
    """
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    maps, masks = _check(maps, masks)
    inside, total = patch_counts(masks, (maps.shape[-2], maps.shape[-1]))  # [B, gh, gw], [gh, gw]
    hit = (inside / total > threshold).flatten(1)  # [B, G]
    flat = maps.flatten(1)  # [B, G]
    top = flat == flat.amax(dim=1, keepdim=True)  # [B, G] tied maxima
    return (top & hit).sum(1).float() / top.sum(1).float()  # [B]


def energy_pointing(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of the map's mass on the object (energy-based pointing game, Score-CAM).

    ``sum(map * mask) / sum(map)`` over the nearest-upsampled map; maps must be non-negative.

    Args:
        maps: ``[B, gh, gw]`` (or ``[gh, gw]``) non-negative patch maps, any scale.
        masks: ``[B, H, W]`` (or ``[H, W]``) bool object masks at image resolution, at least
            as large as the grid.

    Returns:
        ``[B]`` float32 in ``[0, 1]`` (NaN for an all-zero map).

    Raises:
        LayoutError: maps or masks that are not 2-D/3-D, a different number of maps and masks,
            or masks smaller than the map grid.
        ValueError: a negative map value, or NaN/infinite values in the maps.
    """
    maps, masks = _check(maps, masks)
    if (maps < 0).any():
        raise ValueError("energy_pointing needs non-negative maps (e.g. rollout or attention); "
                         "clamp or shift signed maps first")
    inside, total = patch_counts(masks, (maps.shape[-2], maps.shape[-1]))  # [B, gh, gw], [gh, gw]
    m = maps.float()
    return (m * inside).flatten(1).sum(1) / (m * total).flatten(1).sum(1)  # [B]


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max scale each map to ``[0, 1]``; a constant map becomes zeros.

    Args:
        maps: ``[B, gh, gw]`` patch maps, any real dtype; each sample is scaled over its own
            values (for a ``[B, ...]`` tensor, over everything after the first dimension).

    Returns:
        ``[B, gh, gw]`` float32 in ``[0, 1]``, a new tensor of the shape of ``maps``.

    Shape:
        ``[B, gh, gw]`` -> ``[B, gh, gw]`` float32
    """
    m = maps.float().flatten(1)  # [B, G]
    lo, hi = m.amin(1, keepdim=True), m.amax(1, keepdim=True)  # [B, 1]
    span = hi - lo
    out = torch.where(span > 0, (m - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                      torch.zeros_like(m))
    return out.reshape(maps.shape)


def mask_iou(maps: torch.Tensor, masks: torch.Tensor, *, threshold: float = 0.5) -> torch.Tensor:
    """IoU of the thresholded map with the mask.

    Each map is min-max scaled to ``[0, 1]`` and its patches at or above ``threshold`` form
    the predicted region (a constant map predicts nothing); the IoU is computed over pixels
    of the nearest-upsampled map.

    Args:
        maps: ``[B, gh, gw]``.
        masks: ``[B, H, W]`` bool.
        threshold: in ``(0, 1]``.

    Returns:
        ``[B]`` float32 in ``[0, 1]``.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    maps, masks = _check(maps, masks)
    inside, total = patch_counts(masks, (maps.shape[-2], maps.shape[-1]))  # [B, gh, gw], [gh, gw]
    pred = (normalize_maps(maps) >= threshold).float()  # [B, gh, gw]
    inter = (pred * inside).flatten(1).sum(1)  # [B]
    union = (pred * total).flatten(1).sum(1) + inside.flatten(1).sum(1) - inter  # [B]
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(union))


def mask_auc(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """ROC AUC of the map as a pixel classifier of the mask (ties count one half).

    ``AUC = sum_ij pos_i * neg_j * ([v_i > v_j] + 0.5 [v_i == v_j]) / (P * N)`` over patches
    ``i, j`` with values ``v``, object pixel counts ``pos`` and background pixel counts
    ``neg`` (the Mann-Whitney statistic of the nearest-upsampled map).

    The pairwise comparison runs in chunks of samples with a bounded ``[b, G, G]`` tensor.

    Args:
        maps: ``[B, gh, gw]`` (or ``[gh, gw]``) patch maps, any scale (only the order of the
            values matters).
        masks: ``[B, H, W]`` (or ``[H, W]``) bool object masks at image resolution, at least
            as large as the grid.

    Returns:
        ``[B]`` float32 in ``[0, 1]``; NaN when the mask is empty or covers the whole image.

    Raises:
        LayoutError: maps or masks that are not 2-D/3-D, a different number of maps and masks,
            or masks smaller than the map grid.
        ValueError: NaN or infinite values in the maps.
    """
    maps, masks = _check(maps, masks)
    inside, total = patch_counts(masks, (maps.shape[-2], maps.shape[-1]))  # [B, gh, gw], [gh, gw]
    pos = inside.flatten(1)  # [B, G]
    neg = total.flatten()[None, :] - pos  # [B, G]
    v = maps.float().flatten(1)  # [B, G]
    g = v.shape[1]
    step = max(1, _PAIRWISE_BUDGET // (g * g))  # samples per chunk: bounded [b, G, G] memory
    num = torch.cat([_auc_numerator(v[i:i + step], pos[i:i + step], neg[i:i + step])
                     for i in range(0, v.shape[0], step)])  # [B]
    den = pos.sum(1) * neg.sum(1)  # [B]
    return torch.where(den > 0, num / den.clamp_min(1e-12), torch.full_like(den, float("nan")))


_PAIRWISE_BUDGET = 1 << 24  # entries of the [b, G, G] comparison tensor per chunk


def _auc_numerator(v: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """``sum_ij pos_i neg_j ([v_i > v_j] + 0.5 [v_i == v_j])``.

    Shape:
        v, pos, neg: ``[b, G]`` -> ``[b]``
    """
    gt = (v[:, :, None] > v[:, None, :]).float() + 0.5 * (v[:, :, None] == v[:, None, :]).float()  # [b, G, G]
    return torch.einsum("bi,bij,bj->b", pos, gt, neg)


# ---------------------------------------------------------------------------------------------
# deletion / insertion: the model-free parts
# ---------------------------------------------------------------------------------------------

def patch_order(maps: torch.Tensor) -> torch.Tensor:
    """Patch indices (row-major) from the most to the least important; ties keep index order.

    Args:
        maps: ``[B, gh, gw]`` patch maps, any scale.

    Returns:
        ``[B, gh*gw]`` int64: ``out[b, k]`` is the flat index ``y * gw + x`` of the ``k``-th most
        important patch of sample ``b`` (a stable descending sort).

    Shape:
        ``[B, gh, gw]`` -> ``[B, gh*gw]`` long
    """
    return torch.argsort(maps.flatten(1), dim=1, descending=True, stable=True)


def step_counts(num_patches: int, steps: int) -> list[int]:
    """How many patches are removed (or revealed) at each of the ``steps + 1`` points of a curve.

    ``round(s * G / steps)`` for ``s = 0 .. steps``: from none to all.

    Args:
        num_patches: ``G``, the patches of the grid (``gh * gw``).
        steps: ``S``, points of the curve minus one, at least 1.

    Returns:
        ``S + 1`` non-decreasing counts, the first 0 and the last ``G`` (Python's ``round``:
        halves go to the even number).

    Raises:
        ValueError: ``steps < 1``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return [int(round(s * num_patches / steps)) for s in range(steps + 1)]


def step_masks(maps: torch.Tensor, steps: int | None = None) -> torch.Tensor:
    """Which patches are removed (deletion) or revealed (insertion) at each step.

    Step ``s`` selects the ``step_counts(G, steps)[s]`` highest-ranked patches of
    :func:`patch_order`.

    Args:
        maps: ``[B, gh, gw]``.
        steps: points of the curve minus one (default ``G``: one patch per step).

    Returns:
        ``[B, S+1, gh, gw]`` bool.
    """
    b, gh, gw = maps.shape
    g = gh * gw
    steps = g if steps is None else int(steps)
    counts = torch.tensor(step_counts(g, steps), device=maps.device)  # [S+1]
    order = patch_order(maps)  # [B, G]
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(g, device=maps.device).expand(b, g))  # [B, G] rank of each patch
    sel = rank[:, None, :] < counts[None, :, None]  # [B, S+1, G]
    return sel.reshape(b, steps + 1, gh, gw)


def curve_auc(scores: torch.Tensor) -> torch.Tensor:
    """Area under a curve sampled at evenly spaced points of ``[0, 1]`` (trapezoidal rule).

    Args:
        scores: ``[B, S+1]`` curve values (e.g. class probabilities), any real dtype; the
            points are at ``s / S`` for ``s = 0 .. S``.

    Returns:
        ``[B]`` float32: the mean of the trapezoids (for probabilities, in ``[0, 1]``).

    Raises:
        ValueError: fewer than two points (``S + 1 < 2``).

    Shape:
        ``[B, S+1]`` -> ``[B]``
    """
    s = scores.float()
    if s.shape[-1] < 2:
        raise ValueError("a curve needs at least two points")
    return (s[..., 1:] + s[..., :-1]).sum(-1) / (2.0 * (s.shape[-1] - 1))


# ---------------------------------------------------------------------------------------------
# captions
# ---------------------------------------------------------------------------------------------

def word_grounding(word_maps: torch.Tensor, word_masks: Sequence[torch.Tensor | None], *,
                   threshold: float = 0.0) -> torch.Tensor:
    """Pointing game of every caption word against the object it names.

    Args:
        word_maps: ``[T, gh, gw]``, one map per word (e.g. :func:`vitviz.word_grids`).
        word_masks: ``T`` entries, each a ``[H, W]`` bool mask of the object the word names,
            or ``None`` for words that name no object ("a", "above").
        threshold: as :func:`pointing_game`.

    Returns:
        ``[T]`` float32: 1 hit, 0 miss, NaN for words without an object.
        ``torch.nanmean`` of it is the word grounding accuracy.
    """
    if len(word_masks) != word_maps.shape[0]:
        raise LayoutError(f"{word_maps.shape[0]} word maps for {len(word_masks)} word masks")
    out = torch.full((word_maps.shape[0],), float("nan"), device=word_maps.device)
    idx = [i for i, m in enumerate(word_masks) if m is not None]
    if idx:
        masks = torch.stack([torch.as_tensor(word_masks[i], device=word_maps.device) for i in idx])
        out[idx] = pointing_game(word_maps[idx], masks, threshold=threshold)
    return out


# ---------------------------------------------------------------------------------------------
# map against map: how much did a map change? (randomisation sanity checks)
# ---------------------------------------------------------------------------------------------

def _pair_flat(a: torch.Tensor, b: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.dim() == 2:
        a = a.unsqueeze(0)
    if b.dim() == 2:
        b = b.unsqueeze(0)
    if a.dim() != 3 or a.shape != b.shape:
        raise LayoutError(f"{what} compares maps of one shape [B, gh, gw], got {tuple(a.shape)} and "
                          f"{tuple(b.shape)}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError(f"{what}: maps contain NaN or infinite values")
    return a, b


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks ``1 .. G`` of each row, ties sharing the mean of their ranks (as ``scipy.stats.rankdata``).

    ``rank_i = 1 + #{j: v_j < v_i} + (#{j: v_j == v_i} - 1) / 2``, computed in chunks of rows
    with a bounded ``[b, G, G]`` comparison.

    Args:
        values: ``[B, G]`` rows of values to rank (any real dtype; compared as float32).

    Returns:
        ``[B, G]`` float32 ranks in ``[1, G]``; tied values share the mean of their ranks.

    Shape:
        ``[B, G]`` -> ``[B, G]`` float32

    Example:
        >>> average_ranks(torch.tensor([[3., 1., 3., 2.]]))
        tensor([[3.5000, 1.0000, 3.5000, 2.0000]])
    """
    v = values.float()
    g = v.shape[1]
    step = max(1, _PAIRWISE_BUDGET // max(1, g * g))
    out = []
    for i in range(0, v.shape[0], step):
        c = v[i:i + step]  # [b, G]
        less = (c[:, None, :] < c[:, :, None]).sum(-1).float()  # [b, G] entries below each value
        equal = (c[:, None, :] == c[:, :, None]).sum(-1).float()  # [b, G] ties, itself included
        out.append(1.0 + less + (equal - 1.0) / 2.0)
    return torch.cat(out) if out else v.clone()


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of each pair of maps (Pearson correlation of average ranks).

    Args:
        a, b: ``[B, gh, gw]`` (or ``[gh, gw]``) maps of one shape.

    Returns:
        ``[B]`` float32 in ``[-1, 1]``; NaN where a map is constant (its ranks do not vary).

    Example:
        >>> spearman(torch.tensor([[[1., 2.], [3., 4.]]]), torch.tensor([[[10., 20.], [30., 99.]]]))
        tensor([1.])
    """
    a, b = _pair_flat(a, b, "spearman")
    ra, rb = average_ranks(a.flatten(1)), average_ranks(b.flatten(1))  # [B, G]
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    num = (ra * rb).sum(1)  # [B]
    den = (ra.square().sum(1) * rb.square().sum(1)).sqrt()  # [B]
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.full_like(num, float("nan")))


def ssim(a: torch.Tensor, b: torch.Tensor, *, window: int = 7, sigma: float = 1.5,
         normalize: bool = True) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) of each pair of maps, as in Adebayo et al. 2018.

    Each map is min-max scaled to ``[0, 1]`` first (``normalize=True``; data range 1), then
    local means, variances and the covariance are taken under a Gaussian window (``sigma``
    patches, ``min(window, gh, gw)`` patches wide, valid positions only) and
    ``SSIM = (2 mu_a mu_b + C1)(2 cov + C2) / ((mu_a² + mu_b² + C1)(var_a + var_b + C2))`` with
    ``C1 = 0.01²``, ``C2 = 0.03²`` is averaged over the positions.

    Args:
        a, b: ``[B, gh, gw]`` (or ``[gh, gw]``) maps of one shape.
        window: window width in patches (clipped to the grid).
        sigma: Gaussian sigma of the window in patches.
        normalize: min-max scale each map first (a constant map becomes zeros).

    Returns:
        ``[B]`` float32, 1 for identical maps.
    """
    if window < 1 or sigma <= 0:
        raise ValueError(f"ssim needs window >= 1 and sigma > 0, got window={window}, sigma={sigma}")
    a, b = _pair_flat(a, b, "ssim")
    if normalize:
        a, b = normalize_maps(a), normalize_maps(b)
    a, b = a.float()[:, None], b.float()[:, None]  # [B, 1, gh, gw]
    kh, kw = min(window, a.shape[-2]), min(window, a.shape[-1])

    def gauss(k: int) -> torch.Tensor:
        t = torch.arange(k, device=a.device, dtype=torch.float32) - (k - 1) / 2.0
        w = torch.exp(-t * t / (2.0 * sigma * sigma))
        return w / w.sum()  # [k]

    kernel = (gauss(kh)[:, None] * gauss(kw)[None, :])[None, None]  # [1, 1, kh, kw]
    def f(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(t, kernel)  # [B, 1, gh-kh+1, gw-kw+1]

    mu_a, mu_b = f(a), f(b)
    var_a = f(a * a) - mu_a * mu_a
    var_b = f(b * b) - mu_b * mu_b
    cov = f(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)  # [B]


def topk_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """Share of the ``k`` highest patches of ``a`` that are also among the ``k`` highest of ``b``.

    Patches are ranked as :func:`patch_order` ranks them (ties keep index order).

    Args:
        a, b: ``[B, gh, gw]`` maps of one shape.
        k: patches compared, ``1 <= k <= gh*gw``.

    Returns:
        ``[B]`` float32 in ``[0, 1]``.
    """
    a, b = _pair_flat(a, b, "topk_overlap")
    g = a.shape[-2] * a.shape[-1]
    if not 1 <= int(k) <= g:
        raise ValueError(f"top-k overlap needs 1 <= k <= {g} (the patches of a {a.shape[-2]}x{a.shape[-1]} "
                         f"map), got k={k}")
    ta = patch_order(a)[:, :k]  # [B, k]
    tb = patch_order(b)[:, :k]
    hit = (ta[:, :, None] == tb[:, None, :]).any(-1)  # [B, k]
    return hit.float().mean(1)


__all__ = ["patch_counts", "pointing_game", "energy_pointing", "normalize_maps", "mask_iou", "mask_auc",
           "patch_order", "step_counts", "step_masks", "curve_auc", "word_grounding", "random_maps",
           "centre_prior", "average_ranks", "spearman", "ssim", "topk_overlap"]
