"""One overlay and one raw ``.npy`` map per image for single-map methods (rollout, relevance):
what ``vitviz rollout``, ``vitviz relevance`` and the demo write.

Images come from the batch engine (:mod:`vitviz.batch._engine`): unreadable ones are skipped and
reported, never fatal; every file is written whole (temporary name, then rename).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from .._util.files import save_npy
from ._engine import Outcome, check_class, load_batches, predictions


def map_files(model, sources: Sequence, out_dir, compute: Callable, *, suffix: str,
              batch_size: int = 8, cmap: str = "inferno", alpha: float | None = None, output=None,
              progress: bool = True, on_outcome: Callable[[Outcome], None] | None = None,
              on_original: bool = False, tag: str | None = None,
              title: str | Callable[[], str] | None = None) -> list[Outcome]:
    """The shared loop: load and batch images, ``compute`` maps, write overlay + ``.npy``.

    Overlays follow ``output`` (:class:`vitviz.render.OutputOptions`): shown at least 256 px
    on their short side (or ``output.size``), scaled by ``output.norm``. With
    ``norm="batch"`` the overlays are written after every map of the run is known (one scale
    for all); the ``.npy`` files as each batch completes.

    Args:
        model: a :class:`vitviz.VisionModel`.
        sources: image paths (or PIL images / arrays).
        out_dir: folder for ``<name>_<suffix>.png`` and ``<name>_<suffix>.npy``
            (``<name>_<tag>_<suffix>.*`` with ``tag``).
        compute: ``x [B, 3, H, W] -> (maps [B, gh, gw], per-sample labels list or None)``.
        suffix: the file-name suffix of the method.
        batch_size: images per forward pass.
        cmap, alpha: as :func:`vitviz.overlay` (used when ``output`` is None).
        output: the output options; notes (constant maps, ...) are added to ``output.notes``.
        on_original: draw the overlay on the image at its own resolution (the model's
            centre-crop region mapped back onto it, :func:`vitviz.render.overlay_region`, each
            map on its own scale) instead of on the model's view; the ``.npy`` map is the same.
        tag: put between the image's name and the suffix (``--name-with-model``: the model), so
            that runs of several models can share ``out_dir``.
        title: the overlays' title (model, method, layers), or a function that gives it once the
            first batch ran; each image's label from ``compute`` (its class) goes on a second line.

    Returns:
        One :class:`Outcome` per source, in order; unreadable ones carry ``error``.
    """
    from ..render.output import OutputOptions

    if output is None:
        output = OutputOptions(cmap=cmap, alpha=alpha)
    out_dir = Path(out_dir)
    ending = suffix if tag is None else f"{tag}_{suffix}"  # of the file names; labels say the method
    outcomes = []
    deferred = []  # (outcome, item, map) waiting for the run's scale (norm="batch")
    if on_original and output.norm != "image":
        output.note("overlays on the original picture are drawn each on its own scale")

    def finish(items_done):
        for o in items_done:
            outcomes.append(o)
            if on_outcome is not None:
                on_outcome(o)

    def write(o, it, heat, scale):
        path = out_dir / f"{it.stem}_{ending}"
        head = title() if callable(title) else title
        text = "\n".join(t for t in (head, o.prediction) if t) or None
        if not on_original:
            o.outputs.append(output.save_overlay(path, it.view, heat, scale, label=suffix, title=text))
            return
        h, w = it.original.shape[:2]  # the photo at its own size
        o.outputs.append(output.save_original_overlay(path, it.original, heat, model.preprocessor.region((w, h)),
                                                      label=suffix, title=text))

    for items, x in load_batches(model, sources, batch_size=batch_size, desc=suffix, progress=progress,
                                 keep_original=on_original):
        good = [it for it in items if it.view is not None]
        if x is not None:
            maps, labels = compute(x)  # [B, gh, gw]
            maps = maps.detach().float().cpu().numpy()
            for j, it in enumerate(good):
                o = it.outcome
                o.prediction = labels[j] if labels else None
                o.outputs.append(save_npy(out_dir / f"{it.stem}_{ending}.npy", maps[j]))
                if output.norm == "batch":
                    deferred.append((o, it, maps[j]))
                else:
                    (scale,) = output.scales([maps[j]])
                    write(o, it, maps[j], scale)
        if output.norm == "batch":
            outcomes.extend(it.outcome for it in items)
        else:
            finish([it.outcome for it in items])
    if output.norm == "batch":
        scales = output.scales([d[2] for d in deferred]) if deferred else []
        for (o, it, heat), scale in zip(deferred, scales):
            write(o, it, heat, scale)
        done, outcomes = outcomes, []
        finish(done)
    return outcomes


def rollout_files(model, sources: Sequence, out_dir, *, head_fusion: str = "mean",
                  discard_ratio: float = 0.0, start_layer: int = 0, **kwargs) -> list[Outcome]:
    """Write a rollout overlay PNG and the raw ``[gh, gw]`` map (``.npy``) for every image.

    Streaming: each layer's attention is folded into the running rollout product as it runs
    and then freed (:class:`vitviz.analyze.RolloutStream`), so memory stays ``O(B*N^2)``.

    Args:
        model: a :class:`vitviz.VisionModel`.
        sources: image paths (or PIL images / arrays).
        out_dir: folder for ``<name>_rollout.png`` and ``<name>_rollout.npy``.
        head_fusion, discard_ratio, start_layer: as :func:`vitviz.rollout`.
        **kwargs: ``batch_size``, ``cmap``, ``alpha``, ``output``, ``progress``, ``on_outcome``,
            ``on_original``, ``tag`` of :func:`map_files`.

    Returns:
        One :class:`Outcome` per source, in order; unreadable ones carry ``error``.
    """
    from ..analyze import RolloutStream
    from ..explain import captured

    seen = [0]  # layers the stream folded (for the title)

    def compute(x):
        stream = RolloutStream(head_fusion=head_fusion, discard_ratio=discard_ratio, start_layer=start_layer)
        logits, rec = captured(model, x, keep="none", streams={"rollout": stream})
        seen[0] = stream.layers_seen
        preds = predictions(model, logits)
        return rec.stream("rollout"), [f"predicted: {p}" for p in preds] if preds else None  # [B, gh, gw]

    def title() -> str:
        return f"rollout · {model.name} · {_layers(start_layer, seen[0] or None)}"

    kwargs.setdefault("title", title)
    return map_files(model, sources, out_dir, compute, suffix="rollout", **kwargs)


def _layers(start: int, depth: int | None) -> str:
    """``"layers 0–11"`` (0-based, as ``layer=`` of the API), or ``"layers 3–"`` when the depth is
    not known."""
    if depth is None:
        return f"layers {start}–"
    first = start if start >= 0 else depth + start
    return f"layer {first}" if first == depth - 1 else f"layers {first}–{depth - 1}"


def relevance_files(model, sources: Sequence, out_dir, *, method: str = "chefer",
                    target: int | None = None, head_fusion: str = "mean",
                    discard_ratio: float = 0.0, start_layer: int = 0, gamma: float | None = None,
                    **kwargs) -> list[Outcome]:
    """Write a class-specific relevance overlay PNG and the raw ``[gh, gw]`` map per image.

    One forward and one backward pass per batch (:func:`vitviz.explain.relevance_pass`).

    Args:
        model: a :class:`vitviz.VisionModel` with a classifier head.
        sources: image paths (or PIL images / arrays).
        out_dir: folder for ``<name>_relevance.{png,npy}`` (``method="chefer"``) or
            ``<name>_grad_rollout.{png,npy}``.
        method: ``"chefer"``, ``"grad_rollout"``, ``"attnlrp"`` or ``"cp-lrp"``.
        target: class to explain for every image; None for each image's predicted class.
        head_fusion, discard_ratio: gradient rollout only.
        start_layer: first layer taken into account (not the LRP methods).
        gamma: ``"attnlrp"`` / ``"cp-lrp"`` only: the γ-rule on linear and convolution layers
            (None: the plain gradient).
        **kwargs: ``batch_size``, ``cmap``, ``alpha``, ``output``, ``progress``, ``on_outcome``,
            ``on_original``, ``tag`` of :func:`map_files`.

    Returns:
        One :class:`Outcome` per source, in order; unreadable ones carry ``error``; the
        prediction says which class was explained.
    """
    from ..attention import count_layers
    from ..explain import relevance_pass
    from ..models import class_label, classifier_logits

    check_class(model, target)

    def compute(x):
        res = relevance_pass(model, x, target=target, method=method, head_fusion=head_fusion,
                             discard_ratio=discard_ratio, start_layer=start_layer, gamma=gamma)
        preds = predictions(model, res.logits)
        logits = classifier_logits(res.logits, min_classes=2)
        probs = logits.float().softmax(-1) if logits is not None else None  # [B, C]
        top = probs.argmax(-1).tolist() if probs is not None else None  # [B] predicted classes
        labels = []
        for j, k in enumerate(int(t) for t in res.target):
            line = "explained: " + class_label(model, k, probs[j, k].item() if probs is not None else None)
            labels.append(f"{line}; predicted: {preds[j]}" if preds and top and top[j] != k else line)
        return res.maps, labels  # [B, gh, gw]

    names = {"chefer": "relevance (chefer)", "grad_rollout": "gradient rollout"}
    depth = count_layers(model.module)
    kwargs.setdefault("title", f"{names.get(method, method)} · {model.name} · {_layers(start_layer, depth)}")
    suffix = "relevance" if method == "chefer" else method
    return map_files(model, sources, out_dir, compute, suffix=suffix, **kwargs)
