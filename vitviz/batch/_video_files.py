"""One video file -> a video model's maps -> files, per method (rollout, CLS maps, relevance):
what ``vitviz rollout / cls / relevance clip.mp4 --model <video model>`` write.

Per clip (``<name>_<suffix>.*``, ``<name>_<tag>_<suffix>.*`` with ``tag``):

* ``.npy``: the raw maps, ``[frames, gh, gw]`` float32 (``[heads, frames, gh, gw]`` for CLS maps);
* ``.mp4``: every input frame with the map of its tubelet over it (frame ``i``: map
  ``i // tubelet``), one colour scale for the clip (OpenCV, ``mp4v``);
* ``.webp`` (or ``.gif``): the same frames as a looping animation (WebP lossless);
* ``.png`` (``--format``): the frame strip, one panel per temporal position labelled with its
  source frames (rows of heads for CLS maps).

Clips play at the pace of the video they were sampled from: the source's frame rate divided by
the sampling step (the stride, or ``total / num_frames`` when spread evenly), at least 1 frame
per second; 8 fps when the file states no rate. Each clip is read
(:func:`vitviz.models.read_video`), preprocessed frame by frame and run as one batch of one clip.
A file that cannot be used is skipped with its one-line reason (:class:`vitviz.errors.VideoError`),
the others are written; every file is written whole (temporary name, then rename).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._util.files import save_npy, unique_stems
from ..errors import ImageError, VitvizError
from ._engine import Outcome, check_class, predictions
from ._map_writer import _layers

ANIMATION = "webp"  # lossless and small; browsers play it like a GIF


def check_video_model(model: Any) -> None:
    """A video model with preprocessing, or a typed error before any file is read.

    Args:
        model: a :class:`vitviz.VisionModel`.

    Raises:
        VitvizError: not a video model, or no preprocessing configuration.
    """
    if not getattr(model, "is_video", False):
        raise VitvizError(f"{model.name} is an image model: it takes still images, not video clips; use a video "
                          "model (VideoMAE, ViViT, TimeSformer) for videos")
    if model.preprocessor is None:
        raise ImageError(model.name, "the model has no preprocessing configuration")


def playback_fps(fps: float | None, total: int, num_frames: int, stride: int | None) -> float | None:
    """The rate a sampled clip plays at: the source's ``fps`` over the sampling step, at least 1.

    Args:
        fps: the source's frame rate (None: unknown).
        total: the source's frames.
        num_frames: frames sampled.
        stride: the stride, or None for frames spread evenly (step ``total / num_frames``).

    Returns:
        Frames per second, or None when the source states no rate (the writers' default).
    """
    if fps is None:
        return None
    step = float(stride) if stride is not None else max(1.0, total / max(1, num_frames))
    return max(1.0, min(fps, fps / step))


def video_files(model: Any, sources: Sequence[Any], out_dir: Any, compute: Callable, *, suffix: str,
                stride: int | None = None, output: Any = None, animation: str = ANIMATION,
                progress: bool = True, on_outcome: Callable[[Outcome], None] | None = None,
                tag: str | None = None, title: str | Callable[[], str] | None = None,
                label: str | None = None, row_labels: Callable[[int], list[str]] | None = None) -> list[Outcome]:
    """The shared loop: read and sample each clip, ``compute`` its maps, write the four files.

    Args:
        model: a video :class:`vitviz.VisionModel` (``is_video``).
        sources: video file paths.
        out_dir: the folder written to.
        compute: ``x [1, T, 3, H, W] -> (maps, labels)``: ``maps [1, P, gh, gw]`` (one map per
            temporal position) or ``[1, R, P, gh, gw]`` (rows, e.g. heads: the strip gets a row per
            head, the videos show their mean); ``labels`` a one-item list of text, or None.
        suffix: the file-name suffix of the method.
        stride: ``--frame-stride`` (see :func:`vitviz.models.sample_indices`).
        output: :class:`vitviz.render.OutputOptions` (look, size, ``norm``: ``"image"`` is one
            scale per clip, ``"batch"`` one for every clip of the run, ``"none"`` ``[0, 1]``).
        animation: ``"webp"`` or ``"gif"``.
        progress: a progress bar (two clips or more, where stderr is a terminal).
        on_outcome: called with each clip's :class:`Outcome` once it is written.
        tag: put between the clip's name and the suffix (``--name-with-model``).
        title: the strip's title, or a function that gives it after the first clip ran.
        label: what the colour bar measures (default ``suffix``).
        row_labels: ``R -> labels`` of the strip's rows for ``[1, R, P, gh, gw]`` maps.

    Returns:
        One :class:`Outcome` per source, in order; unusable files carry ``error``.

    Raises:
        VitvizError: ``model`` is not a video model (before any file is read).
    """
    from .._util.progress import progress_bar
    from ..models import clip_input, read_video
    from ..render import clip_overlays, clip_strip, save_clip_animation, save_clip_video
    from ..render.output import OutputOptions

    check_video_model(model)
    if output is None:
        output = OutputOptions()
    out_dir = Path(out_dir)
    ending = suffix if tag is None else f"{tag}_{suffix}"
    names = [str(s) for s in sources]
    stems = unique_stems(names)
    outcomes: list[Outcome] = []
    waiting: list[tuple] = []  # (outcome, stem, clip, views, maps) until the run's scale is known

    def render(o: Outcome, stem: str, clip: Any, views: np.ndarray, maps: np.ndarray, scale: Any) -> None:
        movie = maps if maps.ndim == 3 else maps.mean(0)  # [P, gh, gw]: rows (heads) averaged
        fps = playback_fps(clip.fps, clip.total, len(clip.indices), stride)
        frames = clip_overlays(views, movie, tubelet=model.tubelet, cmap=output.cmap, alpha=output.alpha,
                               smooth=output.smooth, size=output.size, vmin=scale.vmin, vmax=scale.vmax)
        base = out_dir / f"{stem}_{ending}"
        o.outputs.append(save_clip_video(base, frames, fps))
        o.outputs.append(save_clip_animation(base, frames, fps, animation))
        head = title() if callable(title) else title
        text = "\n".join(t for t in (head, o.prediction) if t) or None
        rows = row_labels(maps.shape[0]) if maps.ndim == 4 and row_labels is not None else None
        fig, _ = clip_strip(views, maps, tubelet=model.tubelet, indices=clip.indices.tolist(), row_labels=rows,
                            cmap=output.cmap, alpha=output.alpha, smooth=output.smooth, title=text,
                            vmin=scale.vmin, vmax=scale.vmax, colorbar=output.colorbar,
                            label=label or suffix, dpi=output.dpi)
        o.outputs.append(output.save_figure(fig, base))

    def done(o: Outcome) -> None:
        outcomes.append(o)
        if on_outcome is not None:
            on_outcome(o)

    bar = progress_bar(total=len(names), unit="clip", enabled=progress, desc=suffix, min_total=2)
    pending: list[Outcome] = []
    try:
        for src, name, stem in zip(sources, names, stems):
            o = Outcome(name)
            try:
                clip = read_video(src, model.num_frames, stride=stride)
                views, x = clip_input(model.preprocessor, clip.frames)  # [T, h, w, 3], [T, 3, h, w]
            except ImageError as e:
                o.error = e.reason
                bar.update(1)
                (pending.append if output.norm == "batch" else done)(o)
                continue
            x = x[None].to(device=model.device, dtype=model.dtype)  # [1, T, 3, h, w]
            maps, labels = compute(x)
            maps = maps[0].detach().float().cpu().numpy()  # [P, gh, gw] or [R, P, gh, gw]
            o.prediction = labels[0] if labels else None
            o.outputs.append(save_npy(out_dir / f"{stem}_{ending}.npy", maps.astype(np.float32)))
            if output.norm == "batch":
                waiting.append((o, stem, clip, views, maps))
                pending.append(o)
            else:
                (scale,) = output.scales([maps])  # one scale for the whole clip
                render(o, stem, clip, views, maps, scale)
                done(o)
            bar.update(1)
    finally:
        bar.close()
    if output.norm == "batch":
        scales = output.scales([w[4] for w in waiting]) if waiting else []
        for w, scale in zip(waiting, scales):
            render(*w, scale)
        for o in pending:
            done(o)
    return outcomes


def rollout_video_files(model: Any, sources: Sequence[Any], out_dir: Any, *, head_fusion: str = "mean",
                        discard_ratio: float = 0.0, start_layer: int = 0, **kwargs: Any) -> list[Outcome]:
    """Attention rollout of each clip: ``<name>_rollout.{npy,mp4,webp,png}``.

    The rollout of the model's joint space-time attention (:func:`vitviz.rollout`; streamed,
    :class:`vitviz.analyze.RolloutStream`): ``[frames, gh, gw]`` per clip.

    Args:
        model: a video :class:`vitviz.VisionModel`.
        sources: video file paths.
        out_dir: the folder written to.
        head_fusion, discard_ratio, start_layer: as :func:`vitviz.rollout`.
        **kwargs: ``stride``, ``output``, ``animation``, ``progress``, ``on_outcome``, ``tag`` of
            :func:`video_files`.

    Returns:
        One :class:`Outcome` per source, in order.
    """
    from ..analyze import RolloutStream
    from ..explain import captured

    seen = [0]

    def compute(x):
        stream = RolloutStream(head_fusion=head_fusion, discard_ratio=discard_ratio, start_layer=start_layer)
        logits, rec = captured(model, x, keep="none", streams={"rollout": stream})
        seen[0] = stream.layers_seen
        preds = predictions(model, logits)
        return rec.stream("rollout"), [f"predicted: {p}" for p in preds] if preds else None  # [1, P, gh, gw]

    def title() -> str:
        return f"rollout · {model.name} · {_layers(start_layer, seen[0] or None)}"

    kwargs.setdefault("title", title)
    return video_files(model, sources, out_dir, compute, suffix="rollout", **kwargs)


def cls_video_files(model: Any, sources: Sequence[Any], out_dir: Any, *, layer: int = -1, query: Any = "auto",
                    **kwargs: Any) -> list[Outcome]:
    """What the CLS token (or another query) attends to in one layer, per head, over each clip:
    ``<name>_cls.npy`` ``[heads, frames, gh, gw]``, the strip with a row per head, and the MP4 /
    animation of the head mean.

    Args:
        model: a video :class:`vitviz.VisionModel`.
        sources: video file paths.
        out_dir: the folder written to.
        layer: the layer (negative counts from the end; default the last).
        query: as :func:`vitviz.analyze.query_maps` / ``vitviz cls --query`` (``"auto"``: the CLS
            token, or the mean of the patch rows for models without one, such as VideoMAE).
        **kwargs: ``stride``, ``output``, ``animation``, ``progress``, ``on_outcome``, ``tag`` of
            :func:`video_files`.

    Returns:
        One :class:`Outcome` per source, in order.

    Raises:
        VitvizError: ``layer`` is out of the model's range (before any file is read).
    """
    from ..analyze import check_layer
    from ..analyze.cls import all_layer_maps
    from ..attention import count_layers
    from ..explain import attentions_of, captured

    depth = count_layers(model.module)
    try:
        chosen = check_layer(depth, layer) if depth else layer
    except ValueError as e:
        raise VitvizError(f"{model.name}: {e}") from e
    what = [""]

    def compute(x):
        logits, rec = captured(model, x, keep=[chosen])
        attn = attentions_of(rec, model)
        maps = all_layer_maps(attn, query=query)[-1]  # [1, H, P, gh, gw]
        what[0] = "CLS" if query in ("auto", "cls") and attn.layout.has_cls else (
            "mean patch" if query == "auto" else f"query {query}")
        preds = predictions(model, logits)
        return maps, [f"predicted: {p}" for p in preds] if preds else None

    def title() -> str:
        shown = chosen if chosen >= 0 or not depth else depth + chosen
        return f"{what[0]} attention · {model.name} · layer {shown} · rows: heads; videos: head mean"

    kwargs.setdefault("title", title)
    kwargs.setdefault("row_labels", lambda r: [f"head {h}" for h in range(r)])
    kwargs.setdefault("label", "attention")
    return video_files(model, sources, out_dir, compute, suffix="cls", **kwargs)


def relevance_video_files(model: Any, sources: Sequence[Any], out_dir: Any, *, method: str = "chefer",
                          target: int | None = None, head_fusion: str = "mean", discard_ratio: float = 0.0,
                          start_layer: int = 0, gamma: float | None = None, **kwargs: Any) -> list[Outcome]:
    """Class-specific relevance of each clip (:func:`vitviz.explain.relevance_pass`):
    ``<name>_relevance.{npy,mp4,webp,png}`` (``<name>_<method>.*`` for other methods).

    Args:
        model: a video :class:`vitviz.VisionModel` with a classifier head.
        sources: video file paths.
        out_dir: the folder written to.
        method, target, head_fusion, discard_ratio, start_layer, gamma: as
            :func:`vitviz.batch.relevance_files`.
        **kwargs: ``stride``, ``output``, ``animation``, ``progress``, ``on_outcome``, ``tag`` of
            :func:`video_files`.

    Returns:
        One :class:`Outcome` per source, in order; the prediction says which class was explained.
    """
    from ..attention import count_layers
    from ..explain import relevance_pass
    from ..models import class_label, classifier_logits

    check_class(model, target)

    def compute(x):
        res = relevance_pass(model, x, target=target, method=method, head_fusion=head_fusion,
                             discard_ratio=discard_ratio, start_layer=start_layer, gamma=gamma)
        logits = classifier_logits(res.logits, min_classes=2)
        probs = logits.float().softmax(-1) if logits is not None else None  # [1, C]
        k = int(res.target[0])
        line = "explained: " + class_label(model, k, probs[0, k].item() if probs is not None else None)
        preds = predictions(model, res.logits)
        if preds and probs is not None and int(probs[0].argmax()) != k:
            line += f"; predicted: {preds[0]}"
        return res.maps, [line]  # [1, P, gh, gw]

    names = {"chefer": "relevance (chefer)", "grad_rollout": "gradient rollout"}
    depth = count_layers(model.module)
    kwargs.setdefault("title", f"{names.get(method, method)} · {model.name} · {_layers(start_layer, depth)}")
    suffix = "relevance" if method == "chefer" else method
    return video_files(model, sources, out_dir, compute, suffix=suffix, **kwargs)
