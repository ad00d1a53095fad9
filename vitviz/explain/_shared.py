"""The steps every explanation shares: run a model under capture, read its attention, find its
logits and the classes to explain.

One of each, used by :func:`vitviz.explain.relevance`, :mod:`vitviz.explain.text`, the
gallery, the sanity checks and perturbation curves (:mod:`vitviz.evaluate`), the batch engine,
the explorer and the benchmarks:

* :func:`captured`: ``model(x)`` inside :func:`vitviz.capture` -> ``(output, Recording)``;
  with ``grad=True`` one backward pass of ``score(output, rec)`` inside the block.
* :func:`attentions_of`: ``rec.attentions`` (or ``rec.stages``), or the one
  :class:`~vitviz.errors.CaptureError` for "no attention was captured".
* :func:`logits_of`: ``[B, C]`` logits (:func:`vitviz.models.classifier_logits`) or ``[B]``
  scores of a ``score_fn``, or a typed error; :func:`check_classifier` refuses a model
  without a head before any work.
* :func:`resolve_targets`: the argmax per sample, or given targets checked (integer dtype,
  one or one per sample, within the class count).

Running registered map methods on a batch is :mod:`vitviz.explain._apply` (built on these).

Example:
    >>> out, rec = captured(m, x)                     # no gradients
    >>> attn = attentions_of(rec, m)                   # [L, B, H, N, N]
    >>> t = resolve_targets(logits_of(out), None)      # [B] predicted classes
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import CaptureError, LayoutError, VitvizError
from ..models import VisionModel, classifier_logits, describe_output, score_fn_scores, wrap

Target = int | Sequence[int] | torch.Tensor | None

_SCORE_FN_HINT = "pass score_fn=lambda output: <a [B] tensor of per-sample scores>"


# ---------------------------------------------------------------------------------------------
# models and inputs
# ---------------------------------------------------------------------------------------------

def as_vision_model(model: Any) -> VisionModel:
    """``model`` as a :class:`vitviz.VisionModel` (wrapped with :func:`vitviz.wrap` when a module).

    Args:
        model: a :class:`vitviz.VisionModel` or a torch module.

    Returns:
        The :class:`vitviz.VisionModel`.
    """
    return model if isinstance(model, VisionModel) else wrap(model)


def prepare_inputs(model: VisionModel, images: Any) -> torch.Tensor:
    """``[B, 3, H, W]`` on the model's device from a tensor or a list of images; the size is checked.

    Args:
        model: a :class:`vitviz.VisionModel`.
        images: ``[B, 3, H, W]`` (or ``[3, H, W]``) preprocessed inputs, one image, or a list
            of images (paths, PIL images, arrays).

    Returns:
        ``[B, 3, H, W]`` on the model's device and dtype.

    Raises:
        VitvizError: an empty list.
        LayoutError: an input whose height and width differ from the model's input size.
    """
    if isinstance(images, torch.Tensor):
        x = model.preprocess(images)
    else:
        if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
            images = [images]
        if not images:
            raise VitvizError("no images given")
        x = torch.cat([model.preprocess(im) for im in images])
    if x.dim() != 4 or x.shape[1] != 3:
        raise LayoutError(f"expected images [B, 3, H, W], got {tuple(x.shape)}")
    size = model.input_size
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        raise LayoutError(f"{model.name} takes {size[0]}x{size[1]} inputs, got {x.shape[-2]}x{x.shape[-1]}; "
                          "preprocess the images with model.preprocess (it resizes and crops)")
    return x


def grid_of(model: VisionModel, x: torch.Tensor) -> tuple[int, int]:
    """The patch grid ``(gh, gw)`` of input ``x`` ``[B, 3, H, W]`` (the model's layout grid when
    its patch size is unknown).

    Args:
        model: a :class:`vitviz.VisionModel`.
        x: the input batch.

    Returns:
        ``(gh, gw)``.
    """
    if model.patch_size is not None:
        return model._grid_from_hw(tuple(x.shape[-2:]))
    return model.layout.grid


# ---------------------------------------------------------------------------------------------
# logits and targets
# ---------------------------------------------------------------------------------------------

def check_classifier(model: Any, score_fn: Any = None, what: str = "this metric") -> None:
    """Refuse a model without a classifier head (timm ``num_classes=0``) unless ``score_fn`` is given.

    Args:
        model: a :class:`vitviz.VisionModel` or module.
        score_fn: the user's ``score_fn``, if any (then any model is fine).
        what: what needs class scores, for the message.

    Raises:
        VitvizError: naming ``score_fn`` as the way out.
    """
    if score_fn is None and getattr(getattr(model, "module", model), "num_classes", None) == 0:
        raise VitvizError(f"{what} needs class scores, and {getattr(model, 'name', 'the model')} has no "
                          f"classifier (num_classes=0); {_SCORE_FN_HINT}")


def logits_of(output: Any, score_fn: Callable[[Any], torch.Tensor] | None = None, what: str = "this method",
              *, min_classes: int = 1, score_fn_hint: bool = True) -> torch.Tensor:
    """``[B, C]`` classifier logits of a model output, or ``[B]`` scores from ``score_fn(output)``.

    The one place that turns "the output holds no logits" into a typed error; the logits
    themselves are found by :func:`vitviz.models.classifier_logits`.

    Args:
        output: what the model returned.
        score_fn: instead of logits, a function of the output returning ``[B]`` scores.
        what: what needs the logits, for the message.
        min_classes: the fewest classes that count as a classifier.
        score_fn_hint: the message names ``score_fn=`` as a way out (where the caller takes one).

    Returns:
        ``[B, C]`` logits, or ``[B]`` scores with ``score_fn``.

    Raises:
        VitvizError: the output is not a classifier's and no ``score_fn`` was given, or
            ``score_fn`` returned something other than ``[B]``.
    """
    if score_fn is not None:
        return score_fn_scores(output, score_fn)
    t = classifier_logits(output, min_classes=min_classes)
    if t is None:
        way_out = " or " + _SCORE_FN_HINT if score_fn_hint else ""
        raise VitvizError(f"{what} needs classifier logits [B, classes] from the model, got "
                          f"{describe_output(output)}; load the model with a classifier head "
                          f"(num_classes > 0){way_out}")
    return t


def check_target_range(target: int | torch.Tensor, num_classes: int, name: str = "the model") -> None:
    """Refuse class indices outside ``0 .. num_classes - 1``.

    Args:
        target: one class index or a tensor of them.
        num_classes: the classifier's class count.
        name: the model's name, for the message.

    Raises:
        VitvizError: the first index out of range, with the valid range.
    """
    t = torch.as_tensor(target).reshape(-1)
    bad = ((t < 0) | (t >= num_classes)).nonzero().flatten().tolist()
    if bad:
        raise VitvizError(f"target class {t[bad[0]].item()} is out of range: {name} has {num_classes} "
                          f"classes (0..{num_classes - 1}); check --class / target=")


def resolve_targets(logits: torch.Tensor | None, target: Target, *, batch: int | None = None,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """``[B]`` long class indices: the argmax per sample, or ``target`` checked and broadcast.

    Args:
        logits: ``[B, C]`` logits (the batch size and class count come from them), or ``None``
            when ``target`` is given and the logits are not computed yet (then ``batch`` gives
            ``B`` and the range is checked where the scores are read).
        target: ``None`` (each sample's argmax), one class for every sample, or one per sample.
        batch: ``B`` when ``logits`` is ``None``.
        device: where the targets go when ``logits`` is ``None``.

    Returns:
        ``[B]`` long.

    Raises:
        VitvizError: targets that are not integers, a count that is neither 1 nor ``B``, a
            class out of range.
        ValueError: neither logits nor targets, or neither logits nor ``batch``.
    """
    if target is None:
        if logits is None:
            raise ValueError("resolve_targets needs the logits, or a target and the batch size")
        return logits.detach().argmax(dim=-1)  # [B]
    if logits is not None:
        b, c = logits.shape
        device = logits.device
    elif batch is None:
        raise ValueError("resolve_targets needs the logits, or a target and the batch size")
    else:
        b, c = int(batch), None
    t = torch.as_tensor(target, device=device)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise VitvizError(f"target must be class indices (int), got dtype {t.dtype}")
    t = t.reshape(-1).long()
    if t.numel() == 1:
        t = t.expand(b)
    elif t.numel() != b:
        raise VitvizError(f"target has {t.numel()} classes for a batch of {b}: give one class, "
                          "one per sample, or None for the predicted class")
    if c is not None:
        check_target_range(t, c)
    return t


# ---------------------------------------------------------------------------------------------
# capture
# ---------------------------------------------------------------------------------------------

def backward_through_attention(score: torch.Tensor, x: torch.Tensor, rec, name: str) -> None:
    """One backward pass of ``score`` inside a ``capture(grad=True)`` block that reaches every
    captured attention layer, computing no parameter gradients.

    The capture's tensor hooks read (store or stream) ``d score / dA`` as the pass goes by.
    Autograd is asked only for ``d score / dx`` and for the lowest layer's attention (so that
    every layer on the way from the score to the input or to the first layer is reached),
    not for every attention tensor: returning ``L`` gradients ``[B, H, N, N]`` at the end
    cost ViT-B/16 at 384 px, batch 8, 3.9x a fused forward instead of 2.8x.

    Args:
        score: a scalar computed from the forward pass of this block.
        x: the input leaf (``requires_grad``).
        rec: the block's :class:`vitviz.Recording`.
        name: the model's name, for the message.

    Raises:
        CaptureError: no image self-attention with an autograd graph was captured.
    """
    inputs = rec.grad_inputs()
    if not inputs:
        raise CaptureError(f"{name}: no image self-attention with an autograd graph was captured, "
                           "so there is nothing to explain")
    torch.autograd.grad(score, [x, inputs[0]], allow_unused=True)


def captured(model: Any, x: torch.Tensor, *, grad: bool = False,
             forward: Callable[[torch.Tensor], Any] | None = None,
             score: Callable[[Any, Any], torch.Tensor | None] | None = None,
             **capture_kwargs) -> tuple[Any, Any]:
    """Run the model once inside :func:`vitviz.capture`; return its output and the recording.

    Args:
        model: a :class:`vitviz.VisionModel` or module (what is captured).
        x: the input batch.
        grad: ``False``: the pass runs under ``torch.no_grad()``. ``True``: with gradients on
            an input leaf ``x.detach().requires_grad_(True)`` (no parameter gradients are
            computed) under ``capture(..., grad=True)``; ``score`` is then backpropagated inside
            the block (:func:`backward_through_attention`).
        forward: what runs instead of ``model(x)`` (e.g. a tower's encoder), called with the input.
        score: ``score(output, rec)`` -> a scalar to backpropagate, or ``None`` for no backward
            pass (``grad=True`` only).
        **capture_kwargs: passed to :func:`vitviz.capture` (``keep=``, ``streams=``, ``adapters=``).

    Returns:
        ``(output, rec)``.

    Raises:
        CaptureError: as :func:`vitviz.capture` and :func:`backward_through_attention`.
        ValueError: ``score`` without ``grad=True``.
    """
    from ..attention import capture  # looked up at each call: tools and tests may wrap it

    vm = as_vision_model(model)
    run = forward if forward is not None else vm
    if not grad:
        if score is not None:
            raise ValueError("captured(score=...) backpropagates the score: pass grad=True")
        with torch.no_grad(), capture(vm, **capture_kwargs) as rec:
            output = run(x)
        return output, rec
    xg = x.detach().requires_grad_(True)  # the graph exists even when the parameters are frozen
    with torch.enable_grad(), capture(vm, grad=True, **capture_kwargs) as rec:
        output = run(xg)
        s = score(output, rec) if score is not None else None
        if s is not None:
            backward_through_attention(s, xg, rec, vm.name)
    return output, rec


def attentions_of(rec: Any, model: Any, *, stages: bool = False):
    """The image self-attention a capture recorded, or the one error saying there is none.

    Args:
        rec: a :class:`vitviz.Recording` (or ``None``: nothing was captured).
        model: the model, for the message.
        stages: return ``rec.stages`` (one :class:`vitviz.AttentionMaps` per token grid)
            instead of ``rec.attentions``.

    Returns:
        :class:`vitviz.AttentionMaps` ``[L, B, H, N, N]``, or the list of stages.

    Raises:
        CaptureError: no self-attention over image tokens was captured (also raised by
            ``rec.attentions`` for hierarchical models, naming ``rec.stages``).
    """
    found = None if rec is None else (rec.stages if stages else rec.attentions)
    if found is None or (stages and not found):
        raise CaptureError(f"{getattr(model, 'name', None) or 'the model'} ran no self-attention over image "
                           "tokens: there is no attention map to read; attention maps need a Vision "
                           "Transformer encoder (a model whose layers attend over its image patches)")
    return found
