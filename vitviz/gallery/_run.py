"""Run the model and the gallery's methods on one batch (main thread).

Attention methods share one captured forward pass; grad methods add one backward pass of every
image's predicted-class logit; ``needs="model"`` methods run the model themselves.
"""

from __future__ import annotations

import numpy as np

from ..errors import VitvizError
from ._methods import Method, MethodInput, MethodResult


def per_image(method: Method, res: MethodResult, b: int) -> tuple[list[np.ndarray], list]:
    """Split a method's batch result into ``b`` float32 arrays ``[gh, gw]`` / ``[K, gh, gw]``."""
    import torch

    maps = res.maps
    if isinstance(maps, torch.Tensor):
        arr = maps.detach().float().cpu().numpy()  # [B, gh, gw] or [B, K, gh, gw]
        per = list(arr) if arr.ndim in (3, 4) and arr.shape[0] == b else None
    elif isinstance(maps, (list, tuple)) and len(maps) == b:
        per = [m.detach().float().cpu().numpy() if isinstance(m, torch.Tensor)
               else np.asarray(m, dtype=np.float32) for m in maps]
    else:
        per = None
    if per is None or any(m.ndim not in (2, 3) or min(m.shape[-2:]) < 1 for m in per):
        count = len(maps) if hasattr(maps, "__len__") else "?"
        shape = getattr(maps, "shape", None) or f"{type(maps).__name__} of {count}"
        raise VitvizError(f"gallery method {method.name!r} returned maps {shape} for a batch of {b}; "
                          "expected [B, gh, gw], [B, K, gh, gw] or B arrays [K, gh, gw]")
    names = list(res.names) if res.names is not None else [None] * b
    texts = list(res.texts) if res.texts is not None else [None] * b
    if len(names) != b or len(texts) != b:
        raise VitvizError(f"gallery method {method.name!r} returned {len(names)} name lists / "
                          f"{len(texts)} texts for a batch of {b}")
    return [np.ascontiguousarray(m, dtype=np.float32) for m in per], list(zip(names, texts))


# use streaming analyses inside the capture when every shared method has one; tests switch it
# off to compare both paths
USE_STREAMS = True


def forward(model, x):
    """``model(x)``; a model that cannot be called so gets a typed error with the way out."""
    try:
        return model(x)
    except VitvizError:
        raise
    except (TypeError, ValueError) as e:  # a model that needs other inputs (a captioner's ids)
        raise VitvizError(
            f"{model.name} could not run on a batch of shape {tuple(x.shape)} ({type(e).__name__}: {e}); "
            "attention methods (rollout, cls, relevance, ...) call the model as model(images): "
            "for a captioning model use --methods caption") from e


def run_methods(model, x, methods: list[tuple[Method, dict]]):
    """Run the shared forward pass (if any method needs it) and every method on one batch.

    Attention methods share one captured forward pass without gradients. With a grad method,
    the forward pass runs with gradients and one backward pass of every image's
    predicted-class logit follows (only the attention gradients are computed, no parameter
    gradients). When every shared method streams, the capture keeps no layer. Captioning-style methods
    run the model themselves.

    Returns:
        ``(model output or None, {method: MethodResult})``
    """
    import torch

    from ..attention import capture
    from ..explain.relevance import backward_through_attention
    from ..models import classifier_logits

    results: dict[str, MethodResult] = {}
    output = None
    shared = [(m, o) for m, o in methods if m.needs in ("attention", "grad")]
    grad = any(m.needs == "grad" for m, _ in shared)
    streams: dict = {}
    if shared and USE_STREAMS:
        made = {m.name: (m.stream(model, **o) if m.stream is not None else None) for m, o in shared}
        if all(s is not None for s in made.values()):
            streams = made
    kw = {"keep": "none", "streams": streams} if streams else {}
    if grad:
        xg = x.detach().requires_grad_(True)  # the graph exists even when the parameters are frozen
        with torch.enable_grad(), capture(model, grad=True, **kw) as rec:
            output = forward(model, xg)
            logits = classifier_logits(output, min_classes=2)
            if logits is None:
                raise VitvizError(f"{', '.join(m.name for m, _ in shared if m.needs == 'grad')} explain "
                                  "the predicted class and need classifier logits [B, classes]; "
                                  "this model's output is not a classifier's")
            target = logits.detach().argmax(dim=-1)  # [B]
            score = logits.gather(1, target[:, None]).sum()  # each sample's own predicted logit
            backward_through_attention(score, xg, rec, model.name)  # hooks store or stream dA
    elif shared:
        target = None
        with torch.no_grad(), capture(model, **kw) as rec:
            output = forward(model, x)
    if shared:
        with torch.no_grad():
            for m, o in shared:
                streamed = rec.stream(m.name) if streams else None
                results[m.name] = m(MethodInput(model, x, rec, output, streamed=streamed, target=target), **o)
    for m, o in methods:
        if m.needs == "model":
            with torch.no_grad():
                results[m.name] = m(MethodInput(model, x, None, None), **o)
    return output, results


def top5(model, output) -> list[list[dict]] | None:
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
