"""Deletion and insertion curves (Petsiuk et al. 2018, "RISE"): does the model need what the map shows?

**Deletion** removes the patches in the map's order, most important first, and tracks the
model's probability for the class; a map that points at what the model uses makes it fall
fast (low area under the curve is good). **Insertion** starts from a blurred (or blank)
image and reveals the patches in the same order; the probability should rise fast (high
area is good). Removed patches take the values of a *substrate*: by default, as in RISE's
reference code, zeros of the normalised input (the dataset's mean colour) for deletion and
a Gaussian blur of the image for insertion.

All ``B * (S + 1)`` perturbed inputs are built on the model's device and run in batches of
``batch_size``; the model is any classifier returning logits ``[B, C]`` (timm) or an output
with ``.logits`` (transformers).

Example:
    >>> m = vitviz.load_model("shapes-vit")
    >>> with vitviz.capture(m) as rec:
    ...     logits = m(x)
    >>> curves = deletion_insertion(m, x, vitviz.rollout(rec.attentions))
    >>> curves.deletion_auc, curves.insertion_auc   # [B] each
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import LayoutError
from ..explain import logits_of, resolve_targets
from .metrics import curve_auc, step_masks

Substrate = str | float | torch.Tensor


@dataclass
class Curves:
    """Deletion and insertion curves.

    Attributes:
        deletion: ``[B, S+1]`` class probability after removing ``step_counts(G, S)[s]`` patches.
        insertion: ``[B, S+1]`` class probability after revealing them.
        deletion_auc: ``[B]`` area under ``deletion`` (lower is better).
        insertion_auc: ``[B]`` area under ``insertion`` (higher is better).
        target: ``[B]`` the class tracked.
    """

    deletion: torch.Tensor | None
    insertion: torch.Tensor | None
    target: torch.Tensor

    @property
    def deletion_auc(self) -> torch.Tensor | None:
        return None if self.deletion is None else curve_auc(self.deletion)

    @property
    def insertion_auc(self) -> torch.Tensor | None:
        return None if self.insertion is None else curve_auc(self.insertion)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflected borders (kernel radius ``ceil(3 sigma)``).

    The radius is cut to ``H - 1`` (``W - 1``) along a side shorter than it, as reflect padding
    needs; the kernel is renormalised over the full radius before the cut.

    Args:
        x: ``[B, C, H, W]`` floating-point images (any device).
        sigma: the standard deviation in pixels; ``<= 0`` returns ``x`` unchanged.

    Returns:
        ``[B, C, H, W]``, same dtype and device as ``x``: a new tensor, or ``x`` itself when
        ``sigma <= 0``.

    Shape:
        ``[B, C, H, W]`` -> ``[B, C, H, W]``
    """
    if sigma <= 0:
        return x
    r = max(1, math.ceil(3.0 * sigma))
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)  # [2r+1]
    k = torch.exp(-t * t / (2 * sigma * sigma))
    k = k / k.sum()  # [2r+1]
    c = x.shape[1]
    r_h, r_w = min(r, x.shape[-2] - 1), min(r, x.shape[-1] - 1)
    pad = torch.nn.functional.pad(x, (r_w, r_w, r_h, r_h), mode="reflect")  # [B, C, H+2r, W+2r]
    kh = k[r - r_h:r + r_h + 1].view(1, 1, -1, 1).expand(c, 1, -1, 1)
    kw = k[r - r_w:r + r_w + 1].view(1, 1, 1, -1).expand(c, 1, 1, -1)
    y = torch.nn.functional.conv2d(pad, kh, groups=c)  # [B, C, H, W+2r]
    return torch.nn.functional.conv2d(y, kw, groups=c)  # [B, C, H, W]


def substrate(x: torch.Tensor, kind: Substrate, blur_sigma: float | None = None) -> torch.Tensor:
    """What removed patches become.

    Args:
        x: ``[B, C, H, W]`` model inputs.
        kind: ``"zero"`` (zeros of the normalised input), ``"blur"`` (Gaussian blur,
            ``blur_sigma`` pixels, default ``max(H, W) / 45`` -- RISE's sigma 5 at 224 px),
            ``"mean"`` (each image's mean colour), a number, or a tensor broadcastable to ``x``.
        blur_sigma: sigma of ``"blur"`` in pixels (ignored by the other kinds).

    Returns:
        ``[B, C, H, W]`` with the dtype and device of ``x``. ``"mean"`` and a tensor give an
        expanded view (not writable in place); the other kinds a new tensor.

    Raises:
        ValueError: an unknown ``kind`` string.
        RuntimeError: a tensor ``kind`` that does not broadcast to ``x`` (from ``expand_as``).

    Shape:
        x: ``[B, C, H, W]`` -> ``[B, C, H, W]``
    """
    if isinstance(kind, torch.Tensor):
        return kind.to(device=x.device, dtype=x.dtype).expand_as(x)
    if isinstance(kind, (int, float)):
        return torch.full_like(x, float(kind))
    if kind == "zero":
        return torch.zeros_like(x)
    if kind == "mean":
        return x.mean(dim=(-2, -1), keepdim=True).expand_as(x)
    if kind == "blur":
        sigma = blur_sigma if blur_sigma is not None else max(x.shape[-2:]) / 45.0
        return gaussian_blur(x, sigma)
    raise ValueError(f"unknown substrate {kind!r}; use 'zero', 'blur', 'mean', a number or a tensor")


@torch.no_grad()
def deletion_insertion(model, x: torch.Tensor, maps: torch.Tensor, *, target: torch.Tensor | None = None,
                       steps: int | None = None, deletion: bool = True, insertion: bool = True,
                       deletion_substrate: Substrate = "zero", insertion_substrate: Substrate = "blur",
                       blur_sigma: float | None = None, batch_size: int = 128) -> Curves:
    """Deletion and insertion curves of patch maps.

    Args:
        model: a :class:`vitviz.VisionModel` or ``nn.Module`` classifier.
        x: ``[B, 3, H, W]`` preprocessed inputs; ``H`` and ``W`` must be multiples of the grid.
        maps: ``[B, gh, gw]`` patch maps (any scale; only their order matters).
        target: ``[B]`` class per sample (default: the model's prediction on ``x``).
        steps: curve points minus one (default: one patch per step).
        deletion, insertion: which curves to compute.
        deletion_substrate, insertion_substrate: see :func:`substrate`.
        blur_sigma: sigma of the blur substrate in pixels.
        batch_size: perturbed inputs per forward pass.

    Returns:
        :class:`Curves` with ``[B, S+1]`` softmax probabilities of ``target``.

    Raises:
        LayoutError: maps that are not one ``[gh, gw]`` per input, or an input size that is
            not a multiple of the grid.
        VitvizError: a model without classifier logits, targets that are not one class
            (integer) or one per input.
    """
    if maps.dim() != 3 or maps.shape[0] != x.shape[0]:
        raise LayoutError(f"expected maps [B, gh, gw] for {x.shape[0]} inputs, got {tuple(maps.shape)}")
    b, _, h, w = x.shape
    gh, gw = maps.shape[-2:]
    if h % gh or w % gw:
        raise LayoutError(f"input {h}x{w} is not a multiple of the {gh}x{gw} grid; crop or pad the input")
    module = getattr(model, "module", model)
    was_training = module.training
    module.eval()
    try:
        if target is None:
            target = resolve_targets(logits_of(module(x), what="deletion/insertion"), None)  # [B]
        else:
            target = resolve_targets(None, target, batch=b, device=x.device)  # [B]
        sel = step_masks(maps.to(x.device), steps)  # [B, S+1, gh, gw]
        n = sel.shape[1]
        sel_px = sel.repeat_interleave(h // gh, dim=-2).repeat_interleave(w // gw, dim=-1)  # [B, S+1, H, W]
        curves = {}
        for kind, on, sub in (("deletion", deletion, deletion_substrate),
                              ("insertion", insertion, insertion_substrate)):
            if not on:
                curves[kind] = None
                continue
            base = substrate(x, sub, blur_sigma)  # [B, 3, H, W]
            probs = torch.empty(b * n, device=x.device, dtype=torch.float32)
            tgt = target.repeat_interleave(n)  # [B*(S+1)]
            for start in range(0, b * n, batch_size):
                idx = torch.arange(start, min(start + batch_size, b * n), device=x.device)
                i, s = idx // n, idx % n
                m = sel_px[i, s][:, None]  # [k, 1, H, W]
                if kind == "deletion":
                    xi = torch.where(m, base[i], x[i])  # [k, 3, H, W]
                else:
                    xi = torch.where(m, x[i], base[i])
                p = logits_of(module(xi), what="deletion/insertion").float().softmax(-1)  # [k, C]
                probs[start:start + len(idx)] = p.gather(1, tgt[idx, None])[:, 0]
            curves[kind] = probs.reshape(b, n)  # [B, S+1]
    finally:
        module.train(was_training)
    return Curves(curves["deletion"], curves["insertion"], target)


__all__ = ["Curves", "deletion_insertion", "substrate", "gaussian_blur"]
