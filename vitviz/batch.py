"""Maps for many images: load, batch, capture, analyze, write. Used by the CLI.

Unreadable images are skipped and reported, never fatal; every file is written whole
(temporary name, then rename).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ._io import save_npy, unique_stems
from .errors import ImageError, VitvizError


@dataclass
class Outcome:
    """What happened to one input."""

    source: str
    outputs: list[Path] = field(default_factory=list)
    error: str | None = None
    prediction: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


@dataclass
class Item:
    """One input of a batch: its outcome to fill, a unique safe file stem, the ``HxWx3``
    uint8 image the model saw (None when unreadable) and, when asked for, the image at its
    own resolution."""

    outcome: Outcome
    stem: str
    view: object | None = None
    original: object | None = None  # HxWx3 uint8 of the file itself, when asked for


def load_batches(model, sources: Sequence, *, batch_size: int = 8, desc: str = "images",
                 progress: bool = True, keep_original: bool = False
                 ) -> Iterable[tuple[list[Item], object | None]]:
    """Load, preprocess and batch images; unreadable ones are marked, not fatal.

    Yields:
        ``(items, x)`` per chunk of ``batch_size`` sources, in order: every source of the
        chunk as an :class:`Item`, and ``x [B, 3, H, W]`` of the readable ones (in the same
        order, on the model's device and dtype), or None when none was readable.
    """
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from .models import load_image

    if model.preprocessor is None:
        raise ImageError(model.name, "the model has no preprocessing configuration")
    names = [str(s) if isinstance(s, (str, Path)) else f"image{i}" for i, s in enumerate(sources)]
    stems = unique_stems(names)
    bar = tqdm(total=len(sources), unit="img", disable=not progress, desc=desc)
    try:
        for chunk in _chunks(list(range(len(sources))), max(1, batch_size)):
            items, xs = [], []
            for i in chunk:
                item = Item(Outcome(names[i]), stems[i])
                try:
                    img = load_image(sources[i])
                    xs.append(model.preprocessor(img))  # [1, 3, H, W]
                    item.view = model.preprocessor.view(img)  # [H, W, 3] uint8
                    if keep_original:
                        item.original = np.asarray(img)  # [H0, W0, 3] uint8, the file's own size
                except ImageError as e:
                    item.outcome.error = e.reason
                items.append(item)
            x = torch.cat(xs).to(device=model.device, dtype=model.dtype) if xs else None  # [B, 3, H, W]
            yield items, x
            bar.update(len(chunk))
    finally:
        bar.close()


def map_files(model, sources: Sequence, out_dir, compute: Callable, *, suffix: str,
              batch_size: int = 8, cmap: str = "jet", alpha: float = 0.5, output=None,
              progress: bool = True, on_outcome: Callable[[Outcome], None] | None = None,
              on_original: bool = False) -> list[Outcome]:
    """The shared loop: load and batch images, ``compute`` maps, write overlay + ``.npy``.

    Overlays follow ``output`` (:class:`vitviz.render.OutputOptions`): shown at least 256 px
    on their short side (or ``output.size``), scaled by ``output.norm``. With
    ``norm="batch"`` the overlays are written after every map of the run is known (one scale
    for all); the ``.npy`` files as each batch completes.

    Args:
        model: a :class:`vitviz.VisionModel`.
        sources: image paths (or PIL images / arrays).
        out_dir: folder for ``<name>_<suffix>.png`` and ``<name>_<suffix>.npy``.
        compute: ``x [B, 3, H, W] -> (maps [B, gh, gw], per-sample labels list or None)``.
        suffix: the file-name suffix of the method.
        batch_size: images per forward pass.
        cmap, alpha: as :func:`vitviz.overlay` (used when ``output`` is None).
        output: the output options; notes (constant maps, ...) are added to ``output.notes``.
        on_original: draw the overlay on the image at its own resolution (the model's
            centre-crop region mapped back onto it, :func:`vitviz.render.overlay_region`, each
            map on its own scale) instead of on the model's view; the ``.npy`` map is the same.

    Returns:
        One :class:`Outcome` per source, in order; unreadable ones carry ``error``.
    """
    from ._io import atomic_write_bytes
    from .render import overlay_region
    from .render.output import OutputOptions, encode_image

    if output is None:
        output = OutputOptions(cmap=cmap, alpha=alpha)
    out_dir = Path(out_dir)
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
        path = out_dir / f"{it.stem}_{suffix}"
        if not on_original:
            o.outputs.append(output.save_overlay(path, it.view, heat, scale, label=suffix))
            return
        h, w = it.original.shape[:2]
        pic = overlay_region(it.original, heat, model.preprocessor.region((w, h)), cmap=output.cmap,
                             alpha=output.alpha)
        o.outputs.append(atomic_write_bytes(path.with_suffix(f".{output.overlay_ext}"),
                                            encode_image(pic, output.overlay_ext)))

    for items, x in load_batches(model, sources, batch_size=batch_size, desc=suffix, progress=progress,
                                 keep_original=on_original):
        good = [it for it in items if it.view is not None]
        if x is not None:
            maps, labels = compute(x)  # [B, gh, gw]
            maps = maps.detach().float().cpu().numpy()
            for j, it in enumerate(good):
                o = it.outcome
                o.prediction = labels[j] if labels else None
                o.outputs.append(save_npy(out_dir / f"{it.stem}_{suffix}.npy", maps[j]))
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
            ``on_original`` of :func:`map_files`.

    Returns:
        One :class:`Outcome` per source, in order; unreadable ones carry ``error``.
    """
    import torch

    from .analyze import RolloutStream
    from .hooks import capture

    def compute(x):
        stream = RolloutStream(head_fusion=head_fusion, discard_ratio=discard_ratio, start_layer=start_layer)
        with torch.no_grad(), capture(model, keep="none", streams={"rollout": stream}) as rec:
            logits = model(x)
        return rec.stream("rollout"), _predictions(model, logits)  # [B, gh, gw]

    return map_files(model, sources, out_dir, compute, suffix="rollout", **kwargs)


def relevance_files(model, sources: Sequence, out_dir, *, method: str = "chefer",
                    target: int | None = None, head_fusion: str = "mean",
                    discard_ratio: float = 0.0, start_layer: int = 0, **kwargs) -> list[Outcome]:
    """Write a class-specific relevance overlay PNG and the raw ``[gh, gw]`` map per image.

    One forward and one backward pass per batch (:func:`vitviz.explain.relevance_pass`).

    Args:
        model: a :class:`vitviz.VisionModel` with a classifier head.
        sources: image paths (or PIL images / arrays).
        out_dir: folder for ``<name>_relevance.{png,npy}`` (``method="chefer"``) or
            ``<name>_grad_rollout.{png,npy}``.
        method: ``"chefer"`` or ``"grad_rollout"``.
        target: class to explain for every image; None for each image's predicted class.
        head_fusion, discard_ratio: gradient rollout only.
        start_layer: first layer taken into account.
        **kwargs: ``batch_size``, ``cmap``, ``alpha``, ``output``, ``progress``, ``on_outcome``,
            ``on_original`` of :func:`map_files`.

    Returns:
        One :class:`Outcome` per source, in order; unreadable ones carry ``error``; the
        prediction says which class was explained.
    """
    from .explain import relevance_pass

    classes = _num_classes(model.module)
    if target is not None and classes is not None and not 0 <= target < classes:
        raise VitvizError(f"class {target} is out of range: {model.name} has {classes} classes "
                          f"(0..{classes - 1}); check --class")

    def compute(x):
        res = relevance_pass(model, x, target=target, method=method, head_fusion=head_fusion,
                             discard_ratio=discard_ratio, start_layer=start_layer)
        preds = _predictions(model, res.logits)
        names = model.labels
        explained = [f"explained: {names[k] if names and k < len(names) else k}"
                     for k in (int(t) for t in res.target)]
        labels = [f"{p}; {e}" for p, e in zip(preds, explained)] if preds else explained
        return res.maps, labels  # [B, gh, gw]

    suffix = "relevance" if method == "chefer" else method
    return map_files(model, sources, out_dir, compute, suffix=suffix, **kwargs)


def _predictions(model, logits) -> list[str] | None:
    """Top-1 class per sample ("label (p=0.93)"), when the output is classifier logits."""
    import torch

    t = getattr(logits, "logits", logits)
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[-1] < 2:
        return None
    p = t.float().softmax(-1)
    conf, cls = p.max(-1)
    labels = model.labels
    return [f"{labels[c] if labels and c < len(labels) else c} (p={v:.2f})"
            for c, v in zip(cls.tolist(), conf.tolist())]


def _num_classes(module) -> int | None:
    """Classifier size of a timm (``num_classes``) or transformers (``config.num_labels``) model."""
    n = getattr(module, "num_classes", None)
    if n is None and getattr(module, "classifier", None) is not None:
        n = getattr(getattr(module, "config", None), "num_labels", None)
    return n if isinstance(n, int) and n > 0 else None
