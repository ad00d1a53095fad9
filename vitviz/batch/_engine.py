"""The batch engine: images in, batches for the model out; unreadable images become skip records.

One engine serves every command that works on many images and the gallery::

    sources ──► ImageSet (decode + preprocess, in DataLoader workers or in this process)
            ──► collate (readable images stacked; unreadable ones kept as (index, reason))
            ──► iter_batches ──► load_batches (Items + Outcomes: the commands)
                             └─► the gallery's pipeline (records, resume, shards)

:func:`iter_captures` adds the captured forward pass for commands that analyse the attention
of each image (``cls``, ``flow``, ``heads``); :func:`predictions` formats a classifier's top-1.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._util.files import unique_stems
from ..errors import ImageError


@dataclass
class Outcome:
    """What happened to one input of a command."""

    source: str
    outputs: list[Path] = field(default_factory=list)
    error: str | None = None
    prediction: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Item:
    """One input of a batch: its outcome to fill, a unique safe file stem, the ``HxWx3``
    uint8 image the model saw (None when unreadable) and, when asked for, the image at its
    own resolution."""

    outcome: Outcome
    stem: str
    view: Any = None
    original: Any = None  # HxWx3 uint8 of the file itself, when asked for


# --------------------------------------------------------------------------------------------
# decoding (runs in DataLoader workers, or in this process)
# --------------------------------------------------------------------------------------------

def decode(pre: Any, source: Any) -> tuple[np.ndarray, Any]:
    """``(view [H, W, 3] uint8, x [3, H, W] float32)`` for one image.

    ``pre`` is a :class:`vitviz.Preprocess` (``x = pre.normalize(pre.view(source))``, equal to
    ``pre(source)[0]``) or a user-supplied callable without ``view()``: then the view is the
    image resized to the input size.

    Args:
        pre: a :class:`vitviz.Preprocess`, or a callable ``PIL.Image -> [1, 3, H, W]`` (or
            ``[3, H, W]``) tensor.
        source: anything :func:`vitviz.load_image` takes (a path, file object, ``PIL.Image``
            or array).

    Returns:
        ``(view, x)``: ``view`` the ``[H, W, 3]`` uint8 image as the model sees it (resized and
        cropped), ``x`` the ``[3, H, W]`` preprocessed tensor (float32 for a
        :class:`vitviz.Preprocess`; whatever dtype a user callable gives).

    Raises:
        ImageError: the source cannot be read (from :func:`vitviz.load_image`; not raised
            here directly). A user callable may raise anything.
    """
    if hasattr(pre, "view") and hasattr(pre, "normalize"):
        view = pre.view(source)  # [H, W, 3] uint8: resized and cropped, as the model sees it
        return view, pre.normalize(view)  # [3, H, W]
    from ..models import load_image

    img = load_image(source)
    x = pre(img)  # [1, 3, H, W]
    x = x[0] if x.dim() == 4 else x
    view = np.asarray(img.resize((int(x.shape[-1]), int(x.shape[-2]))), dtype=np.uint8)
    return view, x


class ImageSet:
    """Map-style dataset of images -> ``(index, x, view, None, original)`` or
    ``(index, None, None, reason, None)``; ``original`` is the file's own pixels when
    ``keep_original``, else None."""

    def __init__(self, sources: Sequence[Any], preprocessor: Any, *, keep_original: bool = False):
        self.sources = list(sources)
        self.pre = preprocessor
        self.keep_original = keep_original

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple[int, Any, Any, str | None, Any]:
        import torch

        try:
            view, x = decode(self.pre, self.sources[i])
            original = None
            if self.keep_original:
                from ..models import load_image

                original = np.asarray(load_image(self.sources[i]))  # [H0, W0, 3] uint8
            return i, x, torch.from_numpy(np.ascontiguousarray(view)), None, original
        except ImageError as e:
            return i, None, None, e.reason, None
        except Exception as e:  # noqa: BLE001 - any decoder failure is this file's problem, not the run's
            return i, None, None, f"could not be read ({type(e).__name__}: {e})", None


def collate(items: list[tuple[int, Any, Any, str | None, Any]]) -> dict[str, Any]:
    """Stack the readable images; keep the unreadable ones as ``(index, reason)``.

    Args:
        items: what :class:`ImageSet` gives per source: ``(index, x, view, None, original)``
            for a readable image (``x [3, H, W]``, ``view [H, W, 3]`` uint8 tensor,
            ``original`` ``[H0, W0, 3]`` uint8 or None) or ``(index, None, None, reason, None)``
            for an unreadable one.

    Returns:
        ``{"index": [i, ...], "x": [B, 3, H, W] or None, "views": [B, H, W, 3] uint8 or None,
        "originals": [...], "failures": [(i, reason), ...]}``
    """
    import torch

    ok = [it for it in items if it[3] is None]
    batch: dict[str, Any] = {"index": [it[0] for it in ok], "x": None, "views": None,
                             "originals": [it[4] for it in ok],
                             "failures": [(it[0], it[3]) for it in items if it[3] is not None]}
    if ok:
        batch["x"] = torch.stack([it[1] for it in ok])  # [B, 3, H, W]
        batch["views"] = torch.stack([it[2] for it in ok])  # [B, H, W, 3] uint8
    return batch


def default_workers() -> int:
    """Decoding processes of the gallery by default: ``min(4, CPUs - 1)``, at least 1.

    Returns:
        The number of DataLoader workers, in ``[1, 4]`` (``os.cpu_count()`` unknown counts as 2).
    """
    return max(1, min(4, (os.cpu_count() or 2) - 1))


def iter_batches(preprocessor: Any, sources: Sequence[Any], *, batch_size: int, workers: int = 0,
                 pin_memory: bool = False, keep_original: bool = False) -> Iterator[dict[str, Any]]:
    """Decode and batch ``sources`` in order (``workers`` processes; 0 decodes in this process).

    Args:
        preprocessor: a :class:`vitviz.Preprocess` or a callable (see :func:`decode`).
        sources: the images, anything :func:`vitviz.load_image` takes.
        batch_size: sources per batch (values below 1 count as 1).
        workers: DataLoader worker processes; 0 decodes in this process.
        pin_memory: pin the batches' tensors (for a faster copy to a GPU).
        keep_original: also read each file at its own resolution (``"originals"``).

    Yields:
        one :func:`collate` batch per ``batch_size`` sources, in order.
    """
    from torch.utils.data import DataLoader

    loader = DataLoader(ImageSet(sources, preprocessor, keep_original=keep_original),
                        batch_size=max(1, batch_size), shuffle=False, num_workers=workers,
                        collate_fn=collate, pin_memory=pin_memory, prefetch_factor=4 if workers else None)
    yield from loader


# --------------------------------------------------------------------------------------------
# the commands' view: Items with Outcomes
# --------------------------------------------------------------------------------------------

def load_batches(model: Any, sources: Sequence[Any], *, batch_size: int = 8, desc: str = "images",
                 progress: bool = True, keep_original: bool = False
                 ) -> Iterable[tuple[list[Item], Any]]:
    """Load, preprocess and batch images; unreadable ones are marked, not fatal.

    Args:
        model: a :class:`vitviz.VisionModel` (its ``preprocessor``, ``device``, ``dtype``).
        sources: the images, anything :func:`vitviz.load_image` takes; a path names its
            outcome, other sources are named ``image{i}``.
        batch_size: sources per chunk.
        desc: the progress bar's label.
        progress: show a tqdm progress bar (only for two images or more, and only where
            stderr is a terminal or a notebook runs the code: ``vitviz._util.progress``).
        keep_original: also keep each file at its own resolution (``Item.original``,
            ``[H0, W0, 3]`` uint8).

    Yields:
        ``(items, x)`` per chunk of ``batch_size`` sources, in order: every source of the
        chunk as an :class:`Item`, and ``x [B, 3, H, W]`` of the readable ones (in the same
        order, on the model's device and dtype), or None when none was readable.
    """
    from .._util.progress import progress_bar

    if model.preprocessor is None:
        raise ImageError(model.name, "the model has no preprocessing configuration")
    names = [str(s) if isinstance(s, (str, Path)) else f"image{i}" for i, s in enumerate(sources)]
    stems = unique_stems(names)
    # no bar for one image, nor where stderr is not a terminal
    bar = progress_bar(total=len(sources), unit="img", enabled=progress, desc=desc, min_total=2)
    try:
        for batch in iter_batches(model.preprocessor, sources, batch_size=batch_size,
                                  keep_original=keep_original):
            items = {i: Item(Outcome(names[i]), stems[i]) for i in batch["index"]}
            for i, reason in batch["failures"]:
                items[i] = Item(Outcome(names[i], error=reason), stems[i])
            if batch["views"] is not None:
                for j, i in enumerate(batch["index"]):
                    items[i].view = batch["views"][j].numpy()  # [H, W, 3] uint8
                    items[i].original = batch["originals"][j]
            x = batch["x"]
            if x is not None:
                x = x.to(device=model.device, dtype=model.dtype)  # [B, 3, H, W]
            yield [items[i] for i in sorted(items)], x
            bar.update(len(items))
    finally:
        bar.close()


def iter_captures(model: Any, sources: Sequence[Any], *, batch_size: int = 8, desc: str = "images",
                  progress: bool = True, keep: Any = "all", stages: bool = False
                  ) -> Iterator[tuple[Outcome, str, Any, Any]]:
    """Load, batch and capture the images; yield one result per source, in order.

    ``keep`` is passed to :func:`vitviz.capture` (e.g. ``[layer]``: only that layer is kept).

    Yields:
        ``(outcome, stem, view, attn)``: the :class:`Outcome` to fill, a unique safe file stem,
        the ``HxWx3`` uint8 image the model saw and the :class:`~vitviz.AttentionMaps` of this
        image (``[L, 1, H, N, N]``; with ``stages=True`` a list of them, one per stage of
        ``rec.stages``, for models whose layers attend over different token grids). For an
        unreadable image ``outcome.error`` is set and ``view`` and ``attn`` are ``None``.

    Args:
        model: a :class:`vitviz.VisionModel`.
        sources: the images, anything :func:`vitviz.load_image` takes.
        batch_size: images per captured forward pass.
        desc: the progress bar's label.
        progress: show a tqdm progress bar (as :func:`load_batches`).
        keep: the layers :func:`vitviz.capture` keeps (``"all"`` or a list of indices).
        stages: yield one :class:`~vitviz.AttentionMaps` per stage (a list) instead of one.

    Raises:
        ImageError: the model has no preprocessing configuration (raised by
            :func:`load_batches` before any image is read; an unreadable image is not an error).
        CaptureError: the forward pass captured no attention (from the capture).
    """
    from ..explain import attentions_of, captured

    for items, x in load_batches(model, sources, batch_size=batch_size, desc=desc, progress=progress):
        found: list = []
        if x is not None:
            _, rec = captured(model, x, keep=keep)
            found = attentions_of(rec, model, stages=True) if stages else [attentions_of(rec, model)]
        j = 0
        for it in items:
            if it.view is None:
                yield it.outcome, it.stem, None, None
            else:
                mine = [a.samples(j, j + 1) for a in found]  # (window layers stay windows)
                yield it.outcome, it.stem, it.view, mine if stages else mine[0]
                j += 1


# --------------------------------------------------------------------------------------------
# what a classifier said
# --------------------------------------------------------------------------------------------

def predictions(model: Any, output: Any) -> list[str] | None:
    """Top-1 class per sample ("label (p=0.93)"), when the output is classifier logits.

    Args:
        model: a :class:`vitviz.VisionModel` (its ``labels`` name the classes; without them,
            or for an index past them, the class index is shown).
        output: what the model returned for a batch (a ``[B, C]`` tensor, an object with
            ``.logits``, a tuple).

    Returns:
        One ``"label (p=0.93)"`` string per sample (softmax probability of the top class), or
        None when the output holds no ``[B, C]`` floating-point logits with ``C >= 2``.
    """
    from ..models import classifier_logits

    t = classifier_logits(output, min_classes=2)
    if t is None:
        return None
    p = t.float().softmax(-1)
    conf, cls = p.max(-1)
    labels = model.labels
    return [f"{labels[c] if labels and c < len(labels) else c} (p={v:.2f})"
            for c, v in zip(cls.tolist(), conf.tolist())]


def num_classes(module: Any) -> int | None:
    """Classifier size of a timm (``num_classes``) or transformers (``config.num_labels``) model.

    Args:
        module: the ``torch.nn.Module`` (``VisionModel.module``).

    Returns:
        The number of classes, or None when the module states no positive integer count (a
        timm model with ``num_classes=0``, a transformers model without a ``classifier``).
    """
    n = getattr(module, "num_classes", None)
    if n is None and getattr(module, "classifier", None) is not None:
        n = getattr(getattr(module, "config", None), "num_labels", None)
    return n if isinstance(n, int) and n > 0 else None


def check_class(model: Any, target: int | None) -> None:
    """A class index the model has, or a typed error naming its range (before any image is read).

    Args:
        model: a :class:`vitviz.VisionModel`.
        target: the ``--class`` index, or None (the predicted class).

    Raises:
        VitvizError: the class is out of the model's stated range
            (:func:`vitviz.explain.check_target_range`).
    """
    from ..explain import check_target_range

    classes = num_classes(model.module)
    if target is not None and classes is not None:
        check_target_range(target, classes, model.name)
