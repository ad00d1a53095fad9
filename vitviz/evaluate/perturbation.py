"""Perturbations a ViT has seen: token deletion / insertion, and ROAD (noisy linear imputation).

Pixel deletion fills the removed patches with grey or blur, inputs the model never saw, so a
falling score may measure the artefact rather than the loss of evidence. Two alternatives:

**Token deletion / insertion.** A ViT takes any subset of its patch tokens: the removed patch
tokens are dropped from the sequence after the patch and position embeddings, the prefix
tokens (CLS, distillation, registers) always stay. Deletion drops the map's top patches
first (MoRF, most relevant first; low AUC is good) or its bottom patches first (LeRF; high AUC
is good); insertion starts from the prefix tokens alone and adds the top patches back. Where
the tokens are selected:

* timm ``VisionTransformer`` (and subclasses such as DeiT): at the model's own token-dropping
  slot ``patch_drop`` (timm's ``PatchDropout`` position, after ``_pos_embed``), by a forward
  hook that returns the kept tokens; the model runs its own forward otherwise;
* transformers ViT-style models (a submodule ``embeddings`` with ``patch_embeddings``): by a
  forward hook on the ``embeddings`` output (CLS + patches with position embeddings).

The perturbed sequences (any image, any step, deletion or insertion) run ``batch_size`` at a
time, sorted by length so that shorter sequences cost less. On a timm ``VisionTransformer`` that
reads its class token (``global_pool="token"``), sequences of different lengths share one
forward pass: each is padded to the longest of its batch and the padding is masked out as keys
(timm's own ``attn_mask``: a padded token is attended by nobody, so every real token, the class
token included, gets the values it gets in its own shorter sequence); a batch pads at most a
quarter more tokens than it holds. Elsewhere (average or attention pooling would read the
padding; transformers ViTs take no mask) a forward pass holds sequences of one length only.

**ROAD** (Rong et al. 2022, "A Consistent and Efficient Evaluation Strategy for Attribution
Methods"): removed pixels are replaced by noisy linear imputation, each removed pixel being the
weighted mean of its 8 neighbours (weights 1/6 for the 4 direct and 1/12 for the 4 diagonal
neighbours, out-of-image neighbours left out) -- a sparse linear system solved here for all
images at once by Jacobi-preconditioned conjugate gradients -- plus Gaussian noise. Both orders,
MoRF and LeRF, are reported: a map is consistent when removing its top first hurts more than
removing its bottom first (``lerf_auc - morf_auc`` > 0).

Example:
    >>> m = vitviz.load_model("shapes-vit")
    >>> c = vitviz.evaluate.token_curves(m, x, maps)          # deletion + insertion, MoRF
    >>> c.deletion_auc, c.insertion_auc
    >>> r = vitviz.evaluate.road(m, x, maps, steps=10)
    >>> r.morf_auc, r.lerf_auc
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import LayoutError, VitvizError
from ..explain import (
    as_vision_model,
    check_classifier,
    check_target_range,
    grid_of,
    logits_of,
    prepare_inputs,
    resolve_targets,
)
from .faithfulness import Curves
from .metrics import curve_auc, patch_order, step_counts

ScoreFn = Callable[[Any], torch.Tensor]


# ---------------------------------------------------------------------------------------------
# token selection
# ---------------------------------------------------------------------------------------------

def _whole_grid_needed(config: Any) -> str | None:
    """Why a transformers model's layers need every patch token (so that tokens cannot be
    dropped after its embeddings), or None."""
    if config is None:
        return None
    if getattr(config, "depths", None) is not None or getattr(config, "window_size", None) is not None:
        return "its layers attend within windows or on several grids of the whole image (Swin-like)"
    if getattr(config, "use_relative_position_bias", False) or getattr(config, "use_shared_relative_position_bias",
                                                                       False):
        return "its relative position bias is laid out for the whole grid (BEiT-like)"
    if getattr(config, "mask_ratio", 0) and float(config.mask_ratio) > 0:
        return "its embeddings shuffle and mask the patches themselves (ViT-MAE)"
    return None


def token_site(module: nn.Module) -> tuple[nn.Module, str]:
    """The module whose output is the token sequence to select from, and how it was found.

    Args:
        module: the model's ``nn.Module``.

    Returns:
        ``(module, how)``: the module whose forward output holds the prefix and patch tokens,
        and a few words on where it is.

    Raises:
        VitvizError: neither a timm ``VisionTransformer``-like nor a transformers ViT-like model,
            or a transformers model whose layers need every patch token (Swin, BEiT, ViT-MAE).
    """
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover - timm is a dependency
        VisionTransformer = ()
    # only timm's VisionTransformer family: others with a patch_drop (EVA: rotary position
    # embeddings of the full grid) would need the kept indices passed on as well
    if isinstance(module, VisionTransformer) and isinstance(getattr(module, "patch_drop", None), nn.Module):
        return module.patch_drop, "timm patch_drop (the model's own token-dropping slot)"
    for name, m in module.named_modules():
        if name.rsplit(".", 1)[-1] == "embeddings" and hasattr(m, "patch_embeddings"):
            why = _whole_grid_needed(getattr(module, "config", None))
            if why is not None:
                raise VitvizError(
                    f"{type(module).__name__}: token deletion drops patch tokens after the embeddings, but {why}; "
                    "use pixel deletion (vitviz.evaluate.deletion_insertion) or ROAD (vitviz.evaluate.road)")
            return m, f"output of {name} (after the patch and position embeddings)"
    raise VitvizError(f"{type(module).__name__}: token deletion needs a timm VisionTransformer (its "
                      "patch_drop slot) or a transformers ViT (an 'embeddings' module with "
                      "'patch_embeddings'); use pixel deletion (vitviz.evaluate.deletion_insertion) "
                      "or ROAD (vitviz.evaluate.road) for other models")


@torch.no_grad()
def forward_kept_tokens(model, x: torch.Tensor, keep: torch.Tensor):
    """The model's output when only the patch tokens ``keep`` (and every prefix token) are kept.

    Args:
        model: a :class:`vitviz.VisionModel` or module (timm ViT or transformers ViT).
        x: ``[B, 3, H, W]`` inputs.
        keep: ``[B, n]`` long, row-major patch indices in ``0 .. gh*gw-1`` kept per input, in the
            order they appear in the sequence (``n = 0``: prefix tokens only).

    Returns:
        the model's own output (logits for a classifier).
    """
    vm = as_vision_model(model)
    site, _ = token_site(vm.module)
    g = grid_of(vm, x)
    n_patch = g[0] * g[1]
    keep = torch.as_tensor(keep, device=x.device).long()
    if keep.dim() != 2 or keep.shape[0] != x.shape[0]:
        raise LayoutError(f"keep must be [B, n] patch indices for {x.shape[0]} inputs, got {tuple(keep.shape)}")
    if keep.numel() and (keep.min() < 0 or keep.max() >= n_patch):
        raise LayoutError(f"keep holds patch indices outside 0..{n_patch - 1} (a {g[0]}x{g[1]} grid)")

    def hook(mod, args, out):
        seq = out[0] if isinstance(out, (tuple, list)) else out  # [B, N, D]
        p = seq.shape[1] - n_patch
        if seq.dim() != 3 or p < 0:
            raise LayoutError(f"{vm.name}: expected [B, prefix + {n_patch}, D] tokens at {type(mod).__name__}, "
                              f"got {tuple(seq.shape)}")
        idx = torch.cat([torch.arange(p, device=seq.device).expand(seq.shape[0], p), keep + p], 1)  # [B, P+n]
        sel = seq.gather(1, idx[:, :, None].expand(-1, -1, seq.shape[2]))  # [B, P+n, D]
        return (sel, *out[1:]) if isinstance(out, tuple) else sel

    handle = site.register_forward_hook(hook)
    try:
        return vm(x)
    finally:
        handle.remove()


_PAD_WASTE = 1.25  # a padded batch holds at most this many times the tokens of its sequences


def _pads(module: nn.Module) -> bool:
    """Whether sequences of different lengths can share a forward pass, padded and masked.

    True for a timm ``VisionTransformer`` with prefix tokens that reads them alone
    (``global_pool="token"``, no attention pool) and passes ``attn_mask`` to every block: the
    padding is then invisible to every real token. Average pooling, attention pooling or a block
    without ``attn_mask`` would see it."""
    import inspect

    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    if not isinstance(module, VisionTransformer) or getattr(module, "global_pool", None) != "token":
        return False
    if getattr(module, "attn_pool", None) is not None or int(getattr(module, "num_prefix_tokens", 0)) < 1:
        return False
    takes_mask = lambda f: "attn_mask" in inspect.signature(f).parameters  # noqa: E731
    blocks = getattr(module, "blocks", ())
    return takes_mask(module.forward) and takes_mask(module.forward_features) and len(blocks) > 0 \
        and all(takes_mask(b.forward) for b in blocks)


def _chunks(lengths: list[int], batch_size: int, waste: float) -> list[list[int]]:
    """Row indices in batches: longest first, at most ``batch_size`` rows, and at most ``waste``
    times the tokens of its rows once padded to its longest (``waste=1``: one length per batch).

    ``lengths`` are whole sequence lengths (prefix tokens included)."""
    order = sorted(range(len(lengths)), key=lambda r: -lengths[r])
    out: list[list[int]] = []
    real = 0
    for r in order:
        cur = out[-1] if out else None
        fits = cur is not None and (len(cur) + 1) * lengths[cur[0]] <= waste * (real + lengths[r])
        if cur is not None and fits and len(cur) < batch_size:
            cur.append(r)
            real += lengths[r]
        else:
            out.append([r])
            real = lengths[r]
    return out


@torch.no_grad()
def _forward_padded(vm, site: nn.Module, x: torch.Tensor, keep: torch.Tensor, n_kept: torch.Tensor):
    """The model's output with patch tokens ``keep[i, :n_kept[i]]`` kept for input ``i``, every
    sequence padded to ``keep.shape[1]`` patch tokens and the padding masked out as keys
    (timm ``attn_mask``). Only for models where :func:`_pads` holds.

    Shape:
        x ``[k, 3, H, W]``, keep ``[k, n]`` long (entries past ``n_kept`` ignored), n_kept ``[k]``
    """
    g = grid_of(vm, x)
    n_patch = g[0] * g[1]
    real = torch.arange(keep.shape[1], device=x.device)[None] < n_kept[:, None]  # [k, n]
    keep = torch.where(real, keep, torch.zeros_like(keep))  # padding repeats patch 0: finite values
    p = int(vm.module.num_prefix_tokens)
    mask = torch.cat([torch.ones(x.shape[0], p, dtype=torch.bool, device=x.device), real], 1)  # [k, P+n]

    def hook(mod, args, out):
        seq = out  # [k, P+G, D]
        if seq.dim() != 3 or seq.shape[1] != p + n_patch:
            raise LayoutError(f"{vm.name}: expected [B, {p} + {n_patch}, D] tokens at {type(mod).__name__}, "
                              f"got {tuple(seq.shape)}")
        idx = torch.cat([torch.arange(p, device=seq.device).expand(seq.shape[0], p), keep + p], 1)  # [k, P+n]
        return seq.gather(1, idx[:, :, None].expand(-1, -1, seq.shape[2]))  # [k, P+n, D]

    handle = site.register_forward_hook(hook)
    try:
        # keys masked, queries not: a padded token's own row is computed and never read
        return vm.module(x, attn_mask=mask[:, None, None, :])  # mask [k, 1, 1, P+n]
    finally:
        handle.remove()


def _order(maps: torch.Tensor, order: str) -> torch.Tensor:
    if order == "morf":
        return patch_order(maps)  # [B, G] most relevant first
    if order == "lerf":
        return patch_order(-maps)  # least relevant first
    raise VitvizError(f"order must be 'morf' or 'lerf', got {order!r}")


def _check_maps(vm, x: torch.Tensor, maps: torch.Tensor, coarse: bool = False) -> torch.Tensor:
    """``maps`` checked: ``[B, gh, gw]`` on the model's patch grid; with ``coarse`` also on a
    coarser grid whose cells are whole blocks of pixels (a stage of a hierarchical model)."""
    g = grid_of(vm, x)
    h, w = x.shape[-2:]
    ok = isinstance(maps, torch.Tensor) and maps.dim() == 3 and maps.shape[0] == x.shape[0]
    if ok and tuple(maps.shape[-2:]) != tuple(g):
        ok = coarse and 1 <= maps.shape[-2] <= g[0] and 1 <= maps.shape[-1] <= g[1] \
            and h % maps.shape[-2] == 0 and w % maps.shape[-1] == 0
    if not ok:
        shape = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
        more = f", or a coarser grid that divides the {h}x{w} input" if coarse else ""
        raise LayoutError(f"expected maps [{x.shape[0]}, {g[0]}, {g[1]}] (one map per input on the model's "
                          f"{g[0]}x{g[1]} patch grid{more}), got {shape}")
    if not torch.isfinite(maps).all():
        raise ValueError("maps contain NaN or infinite values")
    return maps.to(x.device)


def _steps(g: int, steps: int | None) -> list[int]:
    s = g if steps is None else int(steps)
    if not 1 <= s <= g:
        raise VitvizError(f"steps must be in 1..{g} (the patches of the grid), got {steps}")
    return step_counts(g, s)


def _targets(vm, x: torch.Tensor, target, score_fn, what: str) -> torch.Tensor | None:
    """``[B]`` classes to track (the prediction by default), or None with ``score_fn``."""
    check_classifier(vm, score_fn, what)
    if score_fn is not None:
        if target is not None:
            raise VitvizError("give either target= or score_fn=, not both")
        return None
    if target is None:
        return resolve_targets(logits_of(vm(x), what=what), None)  # [B]
    # checked here (integers, 1 or B of them); the range against the scores in _score
    return resolve_targets(None, target, batch=x.shape[0], device=x.device)  # [B]


def _score(output, target, score_fn, idx, what) -> torch.Tensor:
    if score_fn is not None:
        return logits_of(output, score_fn).float()  # [k]
    p = logits_of(output, what=what).float().softmax(-1)  # [k, C]
    check_target_range(target[idx], p.shape[1])
    return p.gather(1, target[idx, None])[:, 0]


@torch.no_grad()
def token_curves(model, x, maps: torch.Tensor, *, target: torch.Tensor | None = None,
                 steps: int | None = None, deletion: bool = True, insertion: bool = True,
                 order: str = "morf", score_fn: ScoreFn | None = None, batch_size: int = 128) -> Curves:
    """Token deletion and insertion curves of patch maps.

    Step ``s`` removes (deletion) or keeps (insertion) the ``step_counts(G, steps)[s]`` first
    patches of the map's order; the prefix tokens always stay.

    Args:
        model: a :class:`vitviz.VisionModel` or module (timm ViT or transformers ViT).
        x: ``[B, 3, H, W]`` inputs at the model's size (or a list of images).
        maps: ``[B, gh, gw]`` patch maps (only their order matters).
        target: ``[B]`` (or one) class whose softmax probability is tracked (default: the prediction).
        steps: points of the curve minus one (default ``G``: one token per step).
        deletion, insertion: which curves to compute.
        order: ``"morf"`` (most relevant first) or ``"lerf"`` (least relevant first).
        score_fn: instead of class probabilities, ``score_fn(output) -> [k]`` scores (for models
            without a classifier).
        batch_size: perturbed sequences per forward pass.

    Returns:
        :class:`vitviz.evaluate.Curves` (``deletion`` / ``insertion`` ``[B, S+1]``, their AUCs, ``target``).

    Raises:
        LayoutError: images of another size than the model's, maps of another grid.
        VitvizError: no classifier and no ``score_fn``; ``steps`` out of range; a model whose
            tokens cannot be selected.
    """
    vm = as_vision_model(model)
    x = prepare_inputs(vm, x)
    maps = _check_maps(vm, x, maps)
    token_site(vm.module)
    if batch_size < 1:
        raise VitvizError(f"batch_size must be >= 1, got {batch_size}")
    b = x.shape[0]
    g = maps.shape[-2] * maps.shape[-1]
    counts = _steps(g, steps)
    rank = _order(maps, order)  # [B, G]
    module = vm.module
    was_training = module.training
    module.eval()
    try:
        tgt = _targets(vm, x, target, score_fn, "token deletion")
        kinds = [k for k, on in (("deletion", deletion), ("insertion", insertion)) if on]
        # every row: (kind, step, image); its sequence keeps n patch tokens
        rows = [(kind, s, i) for kind in kinds for s in range(len(counts)) for i in range(b)]
        kept = [g - counts[s] if kind == "deletion" else counts[s] for kind, s, _ in rows]
        site, _ = token_site(module)
        pads = _pads(module)
        prefix = int(getattr(module, "num_prefix_tokens", 0))
        out = {k: torch.empty(b, len(counts), device=x.device) for k in kinds}
        for chunk in _chunks([prefix + n for n in kept], batch_size, _PAD_WASTE if pads else 1.0):
            part = [rows[r] for r in chunk]
            img = torch.tensor([i for _, _, i in part], device=x.device)  # [k]
            n_max = kept[chunk[0]]  # longest first
            keep = torch.stack([
                torch.nn.functional.pad(
                    (rank[i, counts[s]:] if kind == "deletion" else rank[i, :counts[s]]).sort().values,
                    (0, n_max - kept[r]))
                for r, (kind, s, i) in zip(chunk, part)])  # [k, n_max] kept patches in sequence order, then padding
            if all(kept[r] == n_max for r in chunk):
                output = forward_kept_tokens(vm, x[img], keep)
            else:
                n_kept = torch.tensor([kept[r] for r in chunk], device=x.device)  # [k]
                output = _forward_padded(vm, site, x[img], keep, n_kept)
            sc = _score(output, tgt, score_fn, img, "token deletion")
            for (kind, s, i), v in zip(part, sc):
                out[kind][i, s] = v
    finally:
        module.train(was_training)
    return Curves(out.get("deletion"), out.get("insertion"), tgt)


# ---------------------------------------------------------------------------------------------
# ROAD: noisy linear imputation
# ---------------------------------------------------------------------------------------------

def _neighbour_kernel(device, dtype) -> torch.Tensor:
    d, c = 1.0 / 6.0, 1.0 / 12.0
    return torch.tensor([[c, d, c], [d, 0.0, d], [c, d, c]], device=device, dtype=dtype)  # [3, 3]


def _pcg(v: torch.Tensor, u: torch.Tensor, z: torch.Tensor, tol: float, max_iter: int) -> torch.Tensor:
    """Jacobi-preconditioned CG on ``D z_u - W_uu z_u = W_uk v_k`` from the start ``z``.

    Planes stop one by one as their relative residual falls below ``tol``; the ones still
    running are gathered into smaller tensors as the others finish.

    Shape:
        v, u, z: ``[P, 1, H, W]`` (values, unknown 0/1, start) -> ``[P, 1, H, W]``
    """
    h, w = v.shape[-2:]
    k = _neighbour_kernel(v.device, v.dtype)[None, None]  # [1, 1, 3, 3]
    conv = lambda t: torch.nn.functional.conv2d(t, k, padding=1)  # noqa: E731 zero outside the image
    diag = conv(torch.ones(1, 1, h, w, device=v.device, dtype=v.dtype))  # [1, 1, H, W] in-image weights
    rhs = u * conv(v * (1 - u))  # [P, 1, H, W]

    def apply(t, uu):  # A t on the unknowns
        return uu * (diag * t - conv(t * uu))

    out = z * u
    r = rhs - apply(out, u)
    stop = (tol * rhs.flatten(1).norm(dim=1)).clamp_min(1e-12)  # [P]
    idx = torch.arange(v.shape[0], device=v.device)  # planes still running
    zz, uu = out.clone(), u
    pz = r / diag
    p = pz.clone()
    rz = (r * pz).flatten(1).sum(1)  # [P]
    for _ in range(max_iter):
        active = r.flatten(1).norm(dim=1) > stop  # [p]
        n_active = int(active.sum())
        if n_active == 0:
            break
        if n_active < 0.75 * len(idx):  # gather the running planes
            out[idx] = zz
            keep = active.nonzero().flatten()
            idx, zz, uu, r, p, rz, stop = idx[keep], zz[keep], uu[keep], r[keep], p[keep], rz[keep], stop[keep]
            active = active[keep]
        ap = apply(p, uu)
        pap = (p * ap).flatten(1).sum(1)
        alpha = torch.where(active & (pap > 0), rz / pap.clamp_min(1e-30), torch.zeros_like(rz))
        zz = zz + alpha[:, None, None, None] * p
        r = r - alpha[:, None, None, None] * ap
        pz = r / diag
        rz_new = (r * pz).flatten(1).sum(1)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-30), torch.zeros_like(rz))
        p = pz + beta[:, None, None, None] * p
        rz = rz_new
    out[idx] = zz
    return out


def _cascade(v: torch.Tensor, u: torch.Tensor, tol: float, max_iter: int | None) -> torch.Tensor:
    """Solve on a half-size problem first (recursively) and start the full-size CG from its upsampled
    solution (cascadic conjugate gradients): far fewer full-size iterations for large holes."""
    h, w = v.shape[-2:]
    z0 = torch.zeros_like(v)
    if min(h, w) >= 16 and h % 2 == 0 and w % 2 == 0:
        known = 1 - u
        ks = torch.nn.functional.avg_pool2d(known, 2)  # [P, 1, H/2, W/2] share of known pixels
        vs = torch.nn.functional.avg_pool2d(v * known, 2) / ks.clamp_min(1e-12)  # mean of the known ones
        us = (ks < 1).to(v.dtype)  # a coarse pixel is unknown when any of its pixels is
        zc = _cascade(vs * (1 - us), us, tol, max_iter)
        zc = torch.where(us > 0, zc, vs)
        z0 = torch.nn.functional.interpolate(zc, size=(h, w), mode="bilinear", align_corners=False)
    return _pcg(v, u, z0, tol, max_iter if max_iter is not None else h * w)


def linear_impute(x: torch.Tensor, remove: torch.Tensor, *, tol: float = 1e-4,
                  max_iter: int | None = None) -> torch.Tensor:
    """Replace removed pixels by the solution of ROAD's linear system (no noise).

    Every removed pixel ``i`` satisfies ``x_i = sum_j w_ij x_j / sum_j w_ij`` over its in-image
    neighbours ``j`` (``w = 1/6`` for the 4 direct, ``1/12`` for the 4 diagonal ones); kept pixels
    stay. Solved for all images and channels at once by Jacobi-preconditioned conjugate gradients
    on ``D x_u - W_uu x_u = W_uk x_k`` (symmetric, positive definite unless every pixel is
    removed; then the result is 0), started from the solution of the half-size problem.

    Args:
        x: ``[B, C, H, W]``.
        remove: ``[B, H, W]`` bool, pixels to impute.
        tol: relative residual ``|b - A z| / |b|`` at which an image-channel stops.
        max_iter: CG iterations per level at most (default ``H*W``).

    Returns:
        ``[B, C, H, W]``.
    """
    if not isinstance(remove, torch.Tensor) or remove.shape != (x.shape[0], *x.shape[-2:]):
        shape = tuple(remove.shape) if isinstance(remove, torch.Tensor) else type(remove).__name__
        raise LayoutError(f"remove must be [B, H, W] = {(x.shape[0], *x.shape[-2:])}, got {shape}")
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    bsz, ch, h, w = x.shape
    v = x.to(work).reshape(bsz * ch, 1, h, w)  # [BC, 1, H, W]
    u = remove[:, None].to(work).expand(bsz, ch, h, w).reshape(bsz * ch, 1, h, w)  # [BC, 1, H, W] unknown
    z = _cascade(v * (1 - u), u, tol, max_iter)
    out = v * (1 - u) + z * u
    return out.reshape(bsz, ch, h, w).to(x.dtype)


def noisy_linear_impute(x: torch.Tensor, remove: torch.Tensor, *, noise: float = 0.01,
                        generator: torch.Generator | None = None, tol: float = 1e-4) -> torch.Tensor:
    """ROAD's noisy linear imputation: :func:`linear_impute` plus ``N(0, noise²)`` on the removed pixels.

    The noise is drawn in float32 on the generator's device (the CPU without a generator), then
    moved to the device and dtype of ``x``; kept pixels get none.

    Args:
        x: ``[B, C, H, W]`` images (input units, e.g. normalised).
        remove: ``[B, H, W]`` bool, pixels to impute.
        noise: standard deviation of the Gaussian noise on imputed pixels; ``0`` adds none.
        generator: a ``torch.Generator`` for reproducible noise (default: the global one).
        tol: as :func:`linear_impute`.

    Returns:
        ``[B, C, H, W]`` with the dtype and device of ``x``.

    Raises:
        LayoutError: ``remove`` is not a ``[B, H, W]`` tensor matching ``x`` (from
            :func:`linear_impute`).

    Shape:
        x ``[B, C, H, W]``, remove ``[B, H, W]`` bool -> ``[B, C, H, W]``
    """
    out = linear_impute(x, remove, tol=tol)
    if noise > 0:
        eps = torch.randn(out.shape, generator=generator, device="cpu" if generator is None else generator.device,
                          dtype=torch.float32).to(device=out.device, dtype=out.dtype)
        out = out + noise * eps * remove[:, None].to(out.dtype)
    return out


@dataclass
class RoadCurves:
    """ROAD curves.

    Attributes:
        morf: ``[B, S+1]`` score after removing the map's top patches (most relevant first).
        lerf: ``[B, S+1]`` score after removing its bottom patches first.
        counts: patches removed at each point.
        target: ``[B]`` class tracked (None with ``score_fn``).
    """

    morf: torch.Tensor
    lerf: torch.Tensor
    counts: list
    target: torch.Tensor | None

    @property
    def morf_auc(self) -> torch.Tensor:
        """``[B]`` lower is better."""
        return curve_auc(self.morf)

    @property
    def lerf_auc(self) -> torch.Tensor:
        """``[B]`` higher is better."""
        return curve_auc(self.lerf)

    @property
    def gap(self) -> torch.Tensor:
        """``[B]`` ``lerf_auc - morf_auc``: positive for a map consistent with the model."""
        return self.lerf_auc - self.morf_auc


@torch.no_grad()
def road(model, x, maps: torch.Tensor, *, target: torch.Tensor | None = None, steps: int | None = 10,
         noise: float = 0.01, seed: int = 0, score_fn: ScoreFn | None = None,
         batch_size: int = 128, coarse: bool = False) -> RoadCurves:
    """ROAD (remove and debias): MoRF and LeRF curves with noisy linear imputation.

    Args:
        model: a classifier (:class:`vitviz.VisionModel` or module).
        x: ``[B, 3, H, W]`` inputs at the model's size (or a list of images).
        maps: ``[B, gh, gw]`` patch maps.
        target: class tracked (default the prediction); or ``score_fn(output) -> [k]``.
        steps: points of the curves minus one (default 10: 0 %, 10 %, ... 100 % of the patches).
        noise: standard deviation of the noise added to imputed pixels (input units).
        seed: seed of the noise.
        batch_size: perturbed images per forward pass (and per imputation).
        coarse: also take maps on a grid coarser than the model's patch grid whose cells are
            whole blocks of pixels (the last stage of Swin, whose CLS-style maps are 2x2 where
            the patch grid is 16x16); each step removes whole cells of that grid.

    Returns:
        :class:`RoadCurves`.

    Raises:
        LayoutError: images of another size than the model's, maps of another grid.
        VitvizError: no classifier and no ``score_fn``; ``steps`` out of range.
    """
    vm = as_vision_model(model)
    x = prepare_inputs(vm, x)
    maps = _check_maps(vm, x, maps, coarse=coarse)
    if batch_size < 1:
        raise VitvizError(f"batch_size must be >= 1, got {batch_size}")
    b, _, h, w = x.shape
    gh, gw = maps.shape[-2:]
    if h % gh or w % gw:
        raise LayoutError(f"input {h}x{w} is not a multiple of the {gh}x{gw} grid")
    g = gh * gw
    counts = _steps(g, steps)
    module = vm.module
    was_training = module.training
    module.eval()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    try:
        tgt = _targets(vm, x, target, score_fn, "ROAD")
        curves = {}
        for order in ("morf", "lerf"):
            rank = _order(maps, order)  # [B, G]
            pos = torch.empty_like(rank)
            pos.scatter_(1, rank, torch.arange(g, device=x.device).expand(b, g))  # [B, G] rank of each patch
            rows = [(i, s) for i in range(b) for s in range(len(counts))]
            res = torch.empty(b, len(counts), device=x.device)
            for start in range(0, len(rows), batch_size):
                part = rows[start:start + batch_size]
                img = torch.tensor([i for i, _ in part], device=x.device)
                c = torch.tensor([counts[s] for _, s in part], device=x.device)
                rem = (pos[img] < c[:, None]).reshape(-1, gh, gw)  # [k, gh, gw]
                rem = rem.repeat_interleave(h // gh, 1).repeat_interleave(w // gw, 2)  # [k, H, W]
                xi = noisy_linear_impute(x[img], rem, noise=noise, generator=gen)
                sc = _score(vm(xi), tgt, score_fn, img, "ROAD")
                for (i, s), v in zip(part, sc):
                    res[i, s] = v
            curves[order] = res
    finally:
        module.train(was_training)
    return RoadCurves(curves["morf"], curves["lerf"], counts, tgt)


__all__ = ["token_curves", "forward_kept_tokens", "token_site", "linear_impute", "noisy_linear_impute",
           "road", "RoadCurves"]
