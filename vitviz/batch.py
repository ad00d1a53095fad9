"""Maps for many images: load, batch, capture, analyze, write. Used by the CLI.

Unreadable images are skipped and reported, never fatal; every file is written whole
(temporary name, then rename).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from ._io import save_npy, save_png, unique_stems
from .errors import ImageError, VitvizError


@dataclass
class Outcome:
    """What happened to one input."""

    source: str
    outputs: list[Path] = field(default_factory=list)
    error: Optional[str] = None
    prediction: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def rollout_files(model, sources: Sequence, out_dir, *, head_fusion: str = "mean",
                  discard_ratio: float = 0.0, start_layer: int = 0, batch_size: int = 8,
                  cmap: str = "jet", alpha: float = 0.5, progress: bool = True,
                  on_outcome: Optional[Callable[[Outcome], None]] = None) -> list[Outcome]:
    """Write a rollout overlay PNG and the raw ``[gh, gw]`` map (``.npy``) for every image.

    Args:
        model: a :class:`vitviz.VisionModel`.
        sources: image paths (or PIL images / arrays).
        out_dir: folder for ``<name>_rollout.png`` and ``<name>_rollout.npy``.
        head_fusion, discard_ratio, start_layer: as :func:`vitviz.rollout`.
        batch_size: images per forward pass.
        cmap, alpha: as :func:`vitviz.overlay`.

    Returns:
        One :class:`Outcome` per source, in order; unreadable ones carry ``error``.
    """
    import torch
    from tqdm.auto import tqdm

    from .analyze import rollout
    from .hooks import capture
    from .models import load_image
    from .render import overlay

    if model.preprocessor is None:
        raise ImageError(model.name, "the model has no preprocessing configuration")
    out_dir = Path(out_dir)
    names = [str(s) if isinstance(s, (str, Path)) else f"image{i}" for i, s in enumerate(sources)]
    stems = unique_stems(names)
    outcomes = [Outcome(n) for n in names]
    bar = tqdm(total=len(sources), unit="img", disable=not progress, desc="rollout")
    for chunk in _chunks(list(range(len(sources))), max(1, batch_size)):
        xs, views, idx = [], [], []
        for i in chunk:
            try:
                img = load_image(sources[i])
                xs.append(model.preprocessor(img))  # [1, 3, H, W]
                views.append(model.preprocessor.view(img))  # [H, W, 3] uint8
                idx.append(i)
            except ImageError as e:
                outcomes[i].error = e.reason
        if xs:
            x = torch.cat(xs).to(device=model.device, dtype=model.dtype)  # [B, 3, H, W]
            with torch.no_grad(), capture(model) as rec:
                logits = model(x)
            maps = rollout(rec.attentions, head_fusion=head_fusion, discard_ratio=discard_ratio,
                           start_layer=start_layer)  # [B, gh, gw]
            preds = _predictions(model, logits)
            for j, i in enumerate(idx):
                heat = maps[j].cpu().numpy()
                o = outcomes[i]
                o.prediction = preds[j] if preds else None
                o.outputs.append(save_npy(out_dir / f"{stems[i]}_rollout.npy", heat))
                o.outputs.append(save_png(out_dir / f"{stems[i]}_rollout.png",
                                          overlay(views[j], heat, cmap=cmap, alpha=alpha)))
        for i in chunk:
            if on_outcome is not None:
                on_outcome(outcomes[i])
        bar.update(len(chunk))
    bar.close()
    return outcomes


def _predictions(model, logits) -> Optional[list[str]]:
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


def relevance_files(model, sources: Sequence, out_dir, *, method: str = "chefer",
                    target: Optional[int] = None, head_fusion: str = "mean",
                    discard_ratio: float = 0.0, start_layer: int = 0, batch_size: int = 8,
                    cmap: str = "jet", alpha: float = 0.5, progress: bool = True,
                    on_outcome: Optional[Callable[[Outcome], None]] = None) -> list[Outcome]:
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
        batch_size: images per forward pass.
        cmap, alpha: as :func:`vitviz.overlay`.

    Returns:
        One :class:`Outcome` per source, in order; unreadable ones carry ``error``; the
        prediction says which class was explained.
    """
    import torch
    from tqdm.auto import tqdm

    from .explain import relevance_pass
    from .models import load_image
    from .render import overlay

    if model.preprocessor is None:
        raise ImageError(model.name, "the model has no preprocessing configuration")
    classes = _num_classes(model.module)
    if target is not None and classes is not None and not 0 <= target < classes:
        raise VitvizError(f"class {target} is out of range: {model.name} has {classes} classes "
                          f"(0..{classes - 1}); check --class")
    suffix = "relevance" if method == "chefer" else method
    out_dir = Path(out_dir)
    names = [str(s) if isinstance(s, (str, Path)) else f"image{i}" for i, s in enumerate(sources)]
    stems = unique_stems(names)
    outcomes = [Outcome(n) for n in names]
    bar = tqdm(total=len(sources), unit="img", disable=not progress, desc=suffix)
    for chunk in _chunks(list(range(len(sources))), max(1, batch_size)):
        xs, views, idx = [], [], []
        for i in chunk:
            try:
                img = load_image(sources[i])
                xs.append(model.preprocessor(img))  # [1, 3, H, W]
                views.append(model.preprocessor.view(img))  # [H, W, 3] uint8
                idx.append(i)
            except ImageError as e:
                outcomes[i].error = e.reason
        if xs:
            x = torch.cat(xs).to(device=model.device, dtype=model.dtype)  # [B, 3, H, W]
            res = relevance_pass(model, x, target=target, method=method, head_fusion=head_fusion,
                                 discard_ratio=discard_ratio, start_layer=start_layer)
            preds = _predictions(model, res.logits)
            labels = model.labels
            for j, i in enumerate(idx):
                heat = res.maps[j].cpu().numpy()  # [gh, gw]
                k = int(res.target[j])
                o = outcomes[i]
                explained = f"explained: {labels[k] if labels and k < len(labels) else k}"
                o.prediction = f"{preds[j]}; {explained}" if preds else explained
                o.outputs.append(save_npy(out_dir / f"{stems[i]}_{suffix}.npy", heat))
                o.outputs.append(save_png(out_dir / f"{stems[i]}_{suffix}.png",
                                          overlay(views[j], heat, cmap=cmap, alpha=alpha)))
        for i in chunk:
            if on_outcome is not None:
                on_outcome(outcomes[i])
        bar.update(len(chunk))
    bar.close()
    return outcomes


def _num_classes(module) -> Optional[int]:
    """Classifier size of a timm (``num_classes``) or transformers (``config.num_labels``) model."""
    n = getattr(module, "num_classes", None)
    if n is None and getattr(module, "classifier", None) is not None:
        n = getattr(getattr(module, "config", None), "num_labels", None)
    return n if isinstance(n, int) and n > 0 else None
