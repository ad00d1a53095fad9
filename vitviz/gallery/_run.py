"""Run the model and the gallery's methods on one batch (main thread).

The methods come from the one registry (:mod:`vitviz.explain`) and run through its engine
(:func:`vitviz.explain.run_methods`): attention methods share one captured forward pass; grad
methods add one backward pass of every image's predicted-class logit; ``needs="model"``
methods run the model themselves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import VitvizError

if TYPE_CHECKING:  # the registry (and torch) load when a batch runs, not when the gallery is imported
    from ..explain import Method, MethodResult


def per_image(method: Method, res: MethodResult, b: int, frames: bool = False) -> tuple[list[np.ndarray], list]:
    """Split a method's batch result into ``b`` float32 arrays ``[gh, gw]`` / ``[K, gh, gw]``
    (a video model's, ``frames=True``: ``[P, gh, gw]`` / ``[K, P, gh, gw]``).

    Args:
        method: the method (for messages).
        res: its result for the batch.
        b: the batch size.
        frames: the maps have a time axis (a video model's clips).

    Returns:
        ``(maps, [(names, text), ...])``, one entry per image.

    Raises:
        VitvizError: maps of another shape or count, or names / texts not one per image.
    """
    import torch

    maps = res.maps
    if isinstance(maps, torch.Tensor):
        arr = maps.detach().float().cpu().numpy()  # [B, gh, gw] or [B, K, gh, gw]
        per = list(arr) if arr.ndim - frames in (3, 4) and arr.shape[0] == b else None
    elif isinstance(maps, (list, tuple)) and len(maps) == b:
        per = [m.detach().float().cpu().numpy() if isinstance(m, torch.Tensor)
               else np.asarray(m, dtype=np.float32) for m in maps]
    else:
        per = None
    if per is None or any(m.ndim - frames not in (2, 3) or min(m.shape[-2:]) < 1 for m in per):
        count = len(maps) if hasattr(maps, "__len__") else "?"
        shape = getattr(maps, "shape", None) or f"{type(maps).__name__} of {count}"
        want = ("[B, frames, gh, gw] or [B, K, frames, gh, gw]" if frames else
                "[B, gh, gw], [B, K, gh, gw] or B arrays [K, gh, gw]")
        raise VitvizError(f"gallery method {method.name!r} returned maps {shape} for a batch of {b}; "
                          f"expected {want}")
    names = list(res.names) if res.names is not None else [None] * b
    texts = list(res.texts) if res.texts is not None else [None] * b
    if len(names) != b or len(texts) != b:
        raise VitvizError(f"gallery method {method.name!r} returned {len(names)} name lists / "
                          f"{len(texts)} texts for a batch of {b}")
    return [np.ascontiguousarray(m, dtype=np.float32) for m in per], list(zip(names, texts))


# use streaming analyses inside the capture when every shared method has one; tests switch it
# off to compare both paths
USE_STREAMS = True


def run_methods(model: Any, x: Any, methods: list[tuple[Method, dict]]) -> tuple[Any, dict[str, MethodResult]]:
    """Run the shared forward pass (if any method needs it) and every method on one batch.

    Attention methods share one captured forward pass without gradients. With a grad method,
    the forward pass runs with gradients and one backward pass of every image's
    predicted-class logit follows (only the attention gradients are computed, no parameter
    gradients). When every shared method streams (and :data:`USE_STREAMS`), the capture keeps
    no layer. Captioning-style methods run the model themselves. The engine is
    :func:`vitviz.explain.run_methods`.

    Args:
        model: the :class:`vitviz.VisionModel`.
        x: ``[B, 3, H, W]`` on the model's device and dtype.
        methods: ``(method, options)`` pairs, each method once.

    Returns:
        ``(model output or None, {method name: MethodResult})``

    Raises:
        VitvizError: as :func:`vitviz.explain.run_methods`.
    """
    from ..explain import run_methods as run

    done = run(model, x, methods, stream=USE_STREAMS)
    return done.output, {m.name: r for (m, _), r in zip(methods, done.results)}


def top5(model, output) -> list[list[dict]] | None:
    """The top-5 classes per image (index, label, probability), or None for a non-classifier.

    Args:
        model: the :class:`vitviz.VisionModel` (its labels).
        output: the model's output of the batch.

    Returns:
        One list of up to 5 dicts per image, or None.
    """
    from ..models import classifier_logits

    logits = classifier_logits(output, min_classes=2)
    if logits is None:
        return None
    p = logits.detach().float().softmax(-1)  # [B, C]
    vals, idx = p.topk(min(5, p.shape[-1]), dim=-1)  # [B, k]
    labels = getattr(model, "labels", None)
    out = []
    for vs, cs in zip(vals.cpu().tolist(), idx.cpu().tolist()):
        out.append([{"index": int(c), "label": str(labels[c]) if labels and c < len(labels) else None,
                     "prob": round(float(v), 4)} for v, c in zip(vs, cs)])
    return out
