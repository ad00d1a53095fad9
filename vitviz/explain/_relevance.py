"""Class-specific relevance of a model for an input: one forward, one backward, then a pure map.

This module sits above ``attention`` (capture) and ``analyze`` (the formulas), so that the
analyzers stay pure tensor functions; the capture, the logits and the targets are the shared
steps of :mod:`vitviz.explain._shared`. The registered map methods ``relevance`` and
``grad_rollout`` (:func:`vitviz.explain.compute_maps`) compute the same maps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..analyze.gradient import RelevanceStream
from ..errors import LayoutError
from ..models import score_fn_scores
from ._lrp import LRP_METHODS, lrp_gradient, patch_sums
from ._shared import Target, as_vision_model, captured, grid_of, logits_of, resolve_targets

__all__ = ["relevance", "relevance_pass", "RelevanceResult", "Target"]


@dataclass
class RelevanceResult:
    """What one relevance pass produced.

    Attributes:
        maps: ``[B, gh, gw]`` float32 relevance maps (``[B, frames, gh, gw]`` for a clip).
        logits: ``[B, C]`` the model's logits of this pass (detached), or the detached
            output when ``score_fn`` was used.
        target: ``[B]`` long, the explained class per sample (None with ``score_fn``).
    """

    maps: torch.Tensor
    logits: Any
    target: torch.Tensor | None


class _Score:
    """The scalar every relevance method differentiates: the sum over samples of each sample's
    own target logit (or of ``score_fn``'s per-sample scores), remembering the logits and the
    explained classes for the :class:`RelevanceResult`."""

    def __init__(self, target: Target, score_fn: Callable[[Any], torch.Tensor] | None, what: str):
        self.target, self.score_fn, self.what = target, score_fn, what
        self.logits: Any = None
        self.explained: torch.Tensor | None = None

    def __call__(self, output) -> torch.Tensor:
        if self.score_fn is not None:
            self.logits = output
            return score_fn_scores(output, self.score_fn).sum()  # [B] -> one backward for all samples
        logits = logits_of(output, what=self.what)  # [B, C]
        self.explained = resolve_targets(logits, self.target)  # [B]
        self.logits = logits
        return logits.gather(1, self.explained[:, None]).squeeze(1).sum()  # each sample's own logit

    def result(self, maps: torch.Tensor) -> RelevanceResult:
        logits = self.logits.detach() if isinstance(self.logits, torch.Tensor) else self.logits
        return RelevanceResult(maps, logits, self.explained)


def _refuse_clip_for_images(vm, x) -> None:
    """A clip ``[B, T, C, H, W]`` given to an image model: refused (its maps would need the
    model's token order over time, which vitviz reads only for the video families it knows)."""
    if isinstance(x, torch.Tensor) and x.dim() == 5 and not vm.is_video:
        raise LayoutError(f"{vm.name} is an image model but the input is a clip {tuple(x.shape)} [B, T, C, H, W]; "
                          "give images [B, C, H, W], or a video model (VideoMAE, ViViT, TimeSformer)")


def _lrp_pass(model, x, *, target: Target, method: str, pixels: bool, gamma: float | None,
              score_fn: Callable[[Any], torch.Tensor] | None) -> RelevanceResult:
    """AttnLRP / CP-LRP (:mod:`vitviz.explain._lrp`): one forward pass under the rules, one
    backward pass; the relevance is ``Σ_c x ⊙ ∂score/∂x`` per pixel, summed within each patch
    unless ``pixels`` (a clip's: within each patch of each tubelet's frames, ``[B, frames, gh, gw]``)."""
    if score_fn is not None and target is not None:
        raise ValueError("give either target= or score_fn=, not both")
    vm = as_vision_model(model)
    _refuse_clip_for_images(vm, x)
    x = vm.preprocess(x)  # [B, 3, H, W] ([B, T, 3, H, W] a clip) on the model's device and dtype
    score = _Score(target, score_fn, f"relevance (method={method!r} explains a class logit)")
    grad, _ = lrp_gradient(vm, x, score, method=method, gamma=gamma, name=vm.name)
    # Σ_c x ⊙ ∂score/∂x (lxt's convention): [B, H, W], or [B, T, H, W] for a clip
    rel = (x.detach() * grad).sum(dim=-3).float()
    if pixels:
        return score.result(rel)
    if rel.dim() == 4:  # a clip: each temporal token position sums its tubelet's frames, then its patches
        layout = vm.layout_at(tuple(x.shape[-2:]), frames=x.shape[1])  # LayoutError: frames not whole tubelets
        b, _, h, w = rel.shape
        tubes = rel.reshape(b * layout.frames, layout.tubelet, h, w).sum(1)  # [B*frames, H, W]
        return score.result(patch_sums(tubes, grid_of(vm, x)).reshape(b, layout.frames, *grid_of(vm, x)))
    return score.result(patch_sums(rel, grid_of(vm, x)))  # [B, gh, gw]


def relevance_pass(model, x, *, target: Target = None, method: str = "chefer",
                   head_fusion: str = "mean", discard_ratio: float = 0.0, start_layer: int = 0,
                   score_fn: Callable[[Any], torch.Tensor] | None = None, pixels: bool = False,
                   gamma: float | None = None) -> RelevanceResult:
    """:func:`relevance` that also returns the logits and the explained classes.

    One forward pass (eager attention, captured) and one backward pass that computes only
    activation gradients down to the input (no parameter gradients, nothing accumulated into
    ``.grad``); the map is built layer by layer as the gradients w.r.t. the attention
    probabilities pass by (:class:`vitviz.analyze.RelevanceStream`). The score is the sum over samples
    of each sample's own target logit, so every sample gets the gradient of its own logit (samples do
    not interact in a ViT).

    Args:
        model, x, target, method, head_fusion, discard_ratio, start_layer, score_fn, pixels, gamma: as
            :func:`relevance`.

    Returns:
        :class:`RelevanceResult`.

    Raises:
        ValueError: both ``target`` and ``score_fn``, or bad method options.
        VitvizError: the output is not classifier logits, or a target is out of range.
        CaptureError: no attention could be captured with gradients.
    """
    if method in LRP_METHODS:
        if (head_fusion, discard_ratio, start_layer) != ("mean", 0.0, 0):
            raise ValueError(f"head_fusion, discard_ratio and start_layer do not apply to method={method!r}")
        return _lrp_pass(model, x, target=target, method=method, pixels=pixels, gamma=gamma, score_fn=score_fn)
    if method not in ("chefer", "grad_rollout"):
        raise ValueError(f"method must be one of chefer, grad_rollout, {', '.join(LRP_METHODS)}, got {method!r}")
    if pixels or gamma is not None:
        raise ValueError(f"pixels= and gamma= apply to the LRP methods ({', '.join(LRP_METHODS)}), "
                         f"not to method={method!r}")
    # the map is computed in the backward pass as the gradients arrive (RelevanceStream):
    # neither the attention nor the gradients of all layers are kept or stacked
    stream = RelevanceStream(method, head_fusion=head_fusion, discard_ratio=discard_ratio,
                             start_layer=start_layer)  # checks the options before any work
    if score_fn is not None and target is not None:
        raise ValueError("give either target= or score_fn=, not both")
    vm = as_vision_model(model)
    _refuse_clip_for_images(vm, x)
    x = vm.preprocess(x)  # [B, 3, H, W] ([B, T, 3, H, W] a clip) on the model's device and dtype
    score = _Score(target, score_fn, "relevance (it explains a class logit)")
    # the input is a leaf that requires grad so that the graph exists even when the parameters
    # are frozen; parameter gradients are never computed (only d score / d x is asked for)
    _, rec = captured(vm, x, grad=True, score=lambda output, _rec: score(output), keep="none",
                      streams={"relevance": stream})
    return score.result(rec.stream("relevance"))  # [B, gh, gw]


def relevance(model, x, *, target: Target = None, method: str = "chefer",
              head_fusion: str = "mean", discard_ratio: float = 0.0, start_layer: int = 0,
              score_fn: Callable[[Any], torch.Tensor] | None = None, pixels: bool = False,
              gamma: float | None = None) -> torch.Tensor:
    """Class-specific relevance maps: Chefer et al. 2021, gradient rollout, AttnLRP or CP-LRP.

    Args:
        model: a :class:`vitviz.VisionModel` or any classifier ``nn.Module`` vitviz can capture
            (timm, transformers, torch ``MultiheadAttention``, pytorch_pretrained_vit, ...).
        x: ``[B, 3, H, W]`` preprocessed input, or one image (path, PIL image, ``HxWx3`` array);
            for a video model (VideoMAE, ViViT, TimeSformer) a clip ``[B, T, 3, H, W]``.
        target: class to explain: None for each sample's predicted class, an int for all
            samples, or one int per sample.
        method: ``"chefer"`` (Chefer et al. 2021, ``R += mean_h[(dA⊙A)⁺]·R``) or
            ``"grad_rollout"`` (vit-explain's gradient rollout), ``"attnlrp"`` (Achtibat et al.
            2024: layer-wise relevance propagation with attention-aware rules, applied at the op
            level; nothing on the model is patched) or ``"cp-lrp"`` (Ali et al. 2022: the same with
            the attention probabilities held constant).
        head_fusion, discard_ratio: gradient rollout only (as :func:`vitviz.rollout`).
        start_layer: first layer taken into account.
        score_fn: instead of a target class, a function of the model's output returning the
            ``[B]`` per-sample scores to explain.
        pixels: LRP methods only: return the pixel relevance ``[B, H, W]``, the sum over
            channels of ``x ⊙ ∂score/∂x`` under the rules (lxt's convention; the class token and
            the position embeddings are not part of it). Default: that relevance summed within
            each patch, ``[B, gh, gw]`` (equal sums).
        gamma: LRP methods only: the γ-rule on linear and convolution layers with this γ
            (lxt's recommendation for ViTs); None (default) for their plain gradient.

    Returns:
        ``[B, gh, gw]`` float32 maps over the patch grid (prefix tokens dropped), not rescaled;
        ``[B, H, W]`` with ``pixels=True``. For a clip: ``[B, frames, gh, gw]`` (one map per
        temporal token position; the LRP methods sum each tubelet's frames), ``[B, T, H, W]``
        with ``pixels=True``.

    Raises:
        VitvizError: the output is not classifier logits, or a target is out of range.
        CaptureError: no attention could be captured with gradients.

    Example:
        >>> m = vitviz.load_model("b16")
        >>> heat = vitviz.relevance(m, m.preprocess("cat.jpg"))[0]  # predicted class
        >>> heat = vitviz.relevance(m, x, target=281, method="grad_rollout")[0]
        >>> px = vitviz.relevance(m, x, method="attnlrp", pixels=True)[0]  # [H, W]
    """
    return relevance_pass(model, x, target=target, method=method, head_fusion=head_fusion,
                          discard_ratio=discard_ratio, start_layer=start_layer,
                          score_fn=score_fn, pixels=pixels, gamma=gamma).maps
