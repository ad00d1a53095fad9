"""Class-specific relevance of a model for an input: one forward, one backward, then a pure map.

This module sits above ``hooks`` (capture) and ``analyze`` (the formulas), so that the
analyzers stay pure tensor functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..analyze.gradient import RelevanceStream
from ..attention import capture
from ..errors import CaptureError, VitvizError
from ..models import VisionModel, classifier_logits, describe_output, score_fn_scores, wrap

Target = int | Sequence[int] | torch.Tensor | None


@dataclass
class RelevanceResult:
    """What one relevance pass produced.

    Attributes:
        maps: ``[B, gh, gw]`` float32 relevance maps.
        logits: ``[B, C]`` the model's logits of this pass (detached), or the detached
            output when ``score_fn`` was used.
        target: ``[B]`` long, the explained class per sample (None with ``score_fn``).
    """

    maps: torch.Tensor
    logits: Any
    target: torch.Tensor | None


def logits_of(output: Any) -> torch.Tensor:
    """``[B, C]`` classifier logits in a model's output, or the error that says what to do."""
    t = classifier_logits(output)
    if t is None:
        raise VitvizError(
            f"relevance explains a class logit and needs classifier logits [B, classes] from the "
            f"model, got {describe_output(output)}; load the model with a classifier head "
            "(num_classes > 0) or pass score_fn=lambda output: <a [B] tensor of per-sample scores>")
    return t


def resolve_targets(logits: torch.Tensor, target: Target) -> torch.Tensor:
    """``[B]`` long class indices: the argmax per sample, or ``target`` checked and broadcast."""
    b, c = logits.shape
    if target is None:
        return logits.detach().argmax(dim=-1)  # [B]
    t = torch.as_tensor(target, device=logits.device)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise VitvizError(f"target must be class indices (int), got dtype {t.dtype}")
    t = t.reshape(-1).long()
    if t.numel() == 1:
        t = t.expand(b)
    elif t.numel() != b:
        raise VitvizError(f"target has {t.numel()} classes for a batch of {b}: give one class, "
                          "one per sample, or None for the predicted class")
    bad = ((t < 0) | (t >= c)).nonzero().flatten().tolist()
    if bad:
        raise VitvizError(f"target class {t[bad[0]].item()} is out of range: the model has {c} "
                          f"classes (0..{c - 1}); check --class / target=")
    return t


def backward_through_attention(score: torch.Tensor, x: torch.Tensor, rec, name: str) -> None:
    """One backward pass of ``score`` inside a ``capture(grad=True)`` block that reaches every
    captured attention layer, computing no parameter gradients.

    The capture's tensor hooks read (store or stream) ``d score / dA`` as the pass goes by.
    Autograd is asked only for ``d score / dx`` and for the lowest layer's attention (so that
    every layer on the way from the score to the input or to the first layer is reached),
    not for every attention tensor: returning ``L`` gradients ``[B, H, N, N]`` at the end
    cost ViT-B/16 at 384 px, batch 8, 3.9x a fused forward instead of 2.8x.

    Raises:
        CaptureError: no image self-attention with an autograd graph was captured.
    """
    inputs = rec.grad_inputs()
    if not inputs:
        raise CaptureError(f"{name}: no image self-attention with an autograd graph was captured, "
                           "so there is nothing to explain")
    torch.autograd.grad(score, [x, inputs[0]], allow_unused=True)


def relevance_pass(model, x, *, target: Target = None, method: str = "chefer",
                   head_fusion: str = "mean", discard_ratio: float = 0.0, start_layer: int = 0,
                   score_fn: Callable[[Any], torch.Tensor] | None = None) -> RelevanceResult:
    """:func:`relevance` that also returns the logits and the explained classes.

    One forward pass (eager attention, captured) and one backward pass that computes only
    activation gradients down to the input (no parameter gradients, nothing accumulated into
    ``.grad``); the map is built layer by layer as the gradients w.r.t. the attention
    probabilities pass by (:class:`vitviz.analyze.RelevanceStream`). The score is the sum over samples
    of each sample's own target logit, so every sample gets the gradient of its own logit (samples do
    not interact in a ViT).

    Returns:
        :class:`RelevanceResult`.
    """
    # the map is computed in the backward pass as the gradients arrive (RelevanceStream):
    # neither the attention nor the gradients of all layers are kept or stacked
    stream = RelevanceStream(method, head_fusion=head_fusion, discard_ratio=discard_ratio,
                             start_layer=start_layer)  # checks the options before any work
    if score_fn is not None and target is not None:
        raise ValueError("give either target= or score_fn=, not both")
    vm = model if isinstance(model, VisionModel) else wrap(model)
    x = vm.preprocess(x)  # [B, 3, H, W] on the model's device and dtype
    # the input requires grad so that the graph exists even when the parameters are frozen;
    # parameter gradients are never computed (only d score / d x is asked for)
    x = x.detach().requires_grad_(True)
    with torch.enable_grad(), capture(vm, grad=True, keep="none", streams={"relevance": stream}) as rec:
        output = vm(x)
        if score_fn is not None:
            scores = score_fn_scores(output, score_fn)  # [B]
            t, logits = None, output
        else:
            logits = logits_of(output)  # [B, C]
            t = resolve_targets(logits, target)  # [B]
            scores = logits.gather(1, t[:, None]).squeeze(1)  # [B] each sample's own logit
        backward_through_attention(scores.sum(), x, rec, vm.name)
    maps = rec.stream("relevance")  # [B, gh, gw]
    if isinstance(logits, torch.Tensor):
        logits = logits.detach()
    return RelevanceResult(maps, logits, t)


def relevance(model, x, *, target: Target = None, method: str = "chefer",
              head_fusion: str = "mean", discard_ratio: float = 0.0, start_layer: int = 0,
              score_fn: Callable[[Any], torch.Tensor] | None = None) -> torch.Tensor:
    """Class-specific relevance maps: Chefer et al. 2021 or gradient rollout.

    Args:
        model: a :class:`vitviz.VisionModel` or any classifier ``nn.Module`` vitviz can capture
            (timm, transformers, torch ``MultiheadAttention``, pytorch_pretrained_vit, ...).
        x: ``[B, 3, H, W]`` preprocessed input, or one image (path, PIL image, ``HxWx3`` array).
        target: class to explain: None for each sample's predicted class, an int for all
            samples, or one int per sample.
        method: ``"chefer"`` (Chefer et al. 2021, ``R += mean_h[(dA⊙A)⁺]·R``) or
            ``"grad_rollout"`` (vit-explain's gradient rollout).
        head_fusion, discard_ratio: gradient rollout only (as :func:`vitviz.rollout`).
        start_layer: first layer taken into account.
        score_fn: instead of a target class, a function of the model's output returning the
            ``[B]`` per-sample scores to explain.

    Returns:
        ``[B, gh, gw]`` float32 maps over the patch grid (prefix tokens dropped), not rescaled.

    Raises:
        VitvizError: the output is not classifier logits, or a target is out of range.
        CaptureError: no attention could be captured with gradients.

    Example:
        >>> m = vitviz.load_model("b16")
        >>> heat = vitviz.relevance(m, m.preprocess("cat.jpg"))[0]  # predicted class
        >>> heat = vitviz.relevance(m, x, target=281, method="grad_rollout")[0]
    """
    return relevance_pass(model, x, target=target, method=method, head_fusion=head_fusion,
                          discard_ratio=discard_ratio, start_layer=start_layer,
                          score_fn=score_fn).maps
