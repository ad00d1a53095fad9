"""What a model returned: the one place that finds the logits in a model's output."""

from __future__ import annotations

from typing import Any

import torch


def output_logits(output: Any) -> torch.Tensor | None:
    """The logits tensor of a model output, any shape.

    Looks where the libraries put it: the output itself when it is a tensor, ``.logits``
    (transformers' ``ModelOutput``), or the first element of a tuple or list.

    Args:
        output: what the model returned.

    Returns:
        The tensor, or None when the output holds none there.
    """
    t = getattr(output, "logits", output)
    if isinstance(t, (tuple, list)) and t and isinstance(t[0], torch.Tensor):
        t = t[0]
    return t if isinstance(t, torch.Tensor) else None


def classifier_logits(output: Any, *, min_classes: int = 1) -> torch.Tensor | None:
    """``[B, C]`` floating-point classifier logits in a model output, or None when it holds none.

    Args:
        output: what the model returned (a tensor, an object with ``.logits``, a tuple).
        min_classes: the fewest classes that count as a classifier (2 to show a prediction).

    Returns:
        The ``[B, C]`` floating-point logits, or None (no logits, another shape, an integer
        tensor, or fewer than ``min_classes`` classes).

    Example:
        >>> classifier_logits(torch.zeros(2, 10)).shape
        torch.Size([2, 10])
        >>> classifier_logits(torch.zeros(2, 5, 7)) is None   # a captioner's [B, S, V]
        True
    """
    t = output_logits(output)
    if t is None or t.dim() != 2 or t.shape[-1] < min_classes or not t.is_floating_point():
        return None
    return t


def describe_output(output: Any) -> str:
    """A short description of a model output, for error messages.

    Args:
        output: what the model returned.

    Returns:
        Its logits' shape (``"(2, 10)"``), or its type's name when it holds no logits.
    """
    t = output_logits(output)
    return str(tuple(t.shape)) if t is not None else type(output).__name__


def score_fn_scores(output: Any, score_fn: Any) -> torch.Tensor:
    """Per-sample scores from a user's ``score_fn(output)``, checked.

    Args:
        output: what the model returned.
        score_fn: ``score_fn(output)`` -> a ``[B]`` tensor of per-sample scores.

    Returns:
        The ``[B]`` scores.

    Raises:
        VitvizError: ``score_fn`` returned something other than a ``[B]`` tensor.
    """
    from ..errors import VitvizError

    s = score_fn(output)
    if not isinstance(s, torch.Tensor) or s.dim() != 1:
        got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
        raise VitvizError(f"score_fn must return a [B] tensor of per-sample scores, got {got}")
    return s
