"""Registered map methods on a batch: one shared captured forward (and backward) pass for all.

:func:`run_methods` runs several methods of the registry (:mod:`vitviz.explain._methods`) on
one batch, the way the gallery does; :func:`compute_maps` gives one method's maps outside the
gallery (the sanity checks, ``benchmark-maps``, notebooks). Both use the shared steps of
:mod:`vitviz.explain._shared` (:func:`~vitviz.explain.captured`, targets, logits).

Example:
    >>> maps = compute_maps(m, x, "rollout")                       # [B, gh, gw]
    >>> rel = compute_maps(m, x, "relevance", target=3)            # [B, gh, gw]
    >>> heads = compute_maps(m, x, "cls", layer=-1)                # [B, H, gh, gw]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from ..errors import LayoutError, VitvizError
from ..models import VisionModel
from ._methods import Method, MethodInput, MethodResult, get_method, list_methods
from ._shared import Target, as_vision_model, captured, logits_of, resolve_targets


class MethodsRun(NamedTuple):
    """What :func:`run_methods` produced for one batch.

    Attributes:
        output: the model's output of the shared pass (``None`` without one).
        results: one :class:`MethodResult` per requested method, in order.
        rec: the :class:`vitviz.Recording` of the shared pass (``None`` without one).
        target: ``[B]`` the classes explained by grad methods (or the given targets), or ``None``.
    """

    output: Any
    results: list[MethodResult]
    rec: Any
    target: torch.Tensor | None


def _forward(model: VisionModel, x: torch.Tensor) -> Any:
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


def run_methods(model: Any, x: torch.Tensor, methods: Sequence[tuple[Method, dict]], *,
                target: Target = None, stream: bool = True) -> MethodsRun:
    """Run registered methods on one batch, sharing one captured forward pass.

    Attention methods share one captured forward pass without gradients. With a grad method,
    the forward pass runs with gradients and one backward pass of every image's target logit
    follows (the predicted class unless ``target`` is given; only the attention gradients are
    computed, no parameter gradients). When ``stream`` and every shared method streams, the
    capture keeps no layer. ``needs="model"`` methods run the model themselves and
    ``needs="none"`` methods ignore it.

    Args:
        model: a :class:`vitviz.VisionModel` (or module).
        x: ``[B, 3, H, W]`` on the model's device and dtype.
        methods: ``(method, options)`` pairs (missing options take the method's defaults); a
            method may appear several times with different options.
        target: classes explained by grad methods (default: the predicted ones).
        stream: use the methods' streaming analyses when all shared methods have one.

    Returns:
        :class:`MethodsRun`.

    Raises:
        VitvizError: a grad method on a model without classifier logits, bad targets, an
            unknown option, a model that cannot be called as ``model(images)``.
        CaptureError: no attention could be captured.
    """
    vm = as_vision_model(model)
    methods = [(m, m.options(o)) for m, o in methods]  # defaults filled in, unknown options refused
    given = None if target is None else resolve_targets(None, target, batch=x.shape[0], device=x.device)
    results: list[Any] = [None] * len(methods)
    shared = [(i, m, o) for i, (m, o) in enumerate(methods) if m.needs in ("attention", "grad")]
    names = [m.name for _, m, _ in shared]
    keys = {i: m.name if names.count(m.name) == 1 else f"{m.name}#{i}" for i, m, _ in shared}
    streams: dict = {}
    if shared and stream:
        made = {keys[i]: (m.stream(vm, **o) if m.stream is not None else None) for i, m, o in shared}
        if all(s is not None for s in made.values()):
            streams = made
    kw: dict[str, Any] = {"keep": "none", "streams": streams} if streams else {}
    output: Any = None
    rec: Any = None
    explained = given
    grad_names = [m.name for _, m, _ in shared if m.needs == "grad"]
    if grad_names:
        def score(out, _rec):
            nonlocal explained
            logits = logits_of(out, what=f"{', '.join(grad_names)} (explaining a class logit)",
                               score_fn_hint=False)  # [B, C]
            explained = resolve_targets(logits, given)  # [B]
            return logits.gather(1, explained[:, None]).sum()  # each sample's own target logit

        output, rec = captured(vm, x, grad=True, forward=lambda t: _forward(vm, t), score=score, **kw)
    elif shared:
        output, rec = captured(vm, x, forward=lambda t: _forward(vm, t), **kw)
    with torch.no_grad():
        for i, m, o in shared:
            streamed = rec.stream(keys[i]) if streams else None
            results[i] = m(MethodInput(vm, x, rec, output, streamed=streamed, target=explained), **o)
        for i, (m, o) in enumerate(methods):
            if m.needs in ("model", "none"):
                results[i] = m(MethodInput(vm, x, None, None, target=given), **o)
    return MethodsRun(output, results, rec, explained)


def single_map_method(method: str | Method, what: str = "compute_maps") -> Method:
    """The registered method ``method``, checked to give one map per image and to be installed.

    Args:
        method: a registered name (``vitviz methods``) or a :class:`Method`.
        what: the consumer, for the messages (``"the sanity checks"``, ``"benchmark-maps"``).

    Returns:
        The :class:`Method`.

    Raises:
        VitvizError: unknown name, or a method with a varying number of maps per image
            (``output="list"``: caption words, text maps).
        MissingExtraError: its optional package is not installed.
    """
    m = method if isinstance(method, Method) else get_method(method)
    if not m.single_map:
        fit = ", ".join(n for n in list_methods() if get_method(n).single_map)
        raise VitvizError(f"map method {m.name!r} gives a varying number of maps per image (output={m.output!r}: "
                          f"caption words, texts), which only the gallery draws; {what} take methods with one "
                          f"map (or one per head) per image: {fit}")
    m.check_installed(f"the map method {m.name!r}")
    return m


def compute_maps(model: Any, x: Any, method: str | Method, *, target: Target = None, one_map: bool = False,
                 stream: bool = True, **options) -> torch.Tensor:
    """The maps of one registered method for a model and a batch, outside the gallery.

    Args:
        model: a :class:`vitviz.VisionModel` or module.
        x: ``[B, 3, H, W]`` preprocessed inputs, or one image (path, PIL image, array).
        method: a registered name (``vitviz methods``) or a :class:`Method`.
        target: classes explained by grad methods (default: each sample's predicted class).
        one_map: one map per image: several maps per image (``[B, K, gh, gw]``, e.g. one per
            head) are averaged into ``[B, gh, gw]``.
        stream: use the method's streaming analysis, if it has one (equal results, less memory).
        **options: the method's options (e.g. ``discard_ratio=0.9`` for rollout).

    Returns:
        ``[B, gh, gw]`` or ``[B, K, gh, gw]`` float maps, detached.

    Raises:
        VitvizError: unknown method or option; a method giving a varying number of maps per
            image (``output="list"``: caption words, text maps) or something else than a tensor.
        MissingExtraError: the method's optional package is not installed.

    Example:
        >>> compute_maps(m, x, "cls", layer=3).shape                  # [B, H, gh, gw]
        >>> compute_maps(m, x, "cls", layer=3, one_map=True).shape    # [B, gh, gw]
    """
    m = single_map_method(method)
    vm = as_vision_model(model)
    x = vm.preprocess(x)  # [B, 3, H, W] on the model's device and dtype
    run = run_methods(vm, x, [(m, m.options(options))], target=target, stream=stream)
    maps = run.results[0].maps
    if not isinstance(maps, torch.Tensor) or maps.dim() not in (3, 4) or maps.shape[0] != x.shape[0]:
        got = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
        raise LayoutError(f"map method {m.name!r} returned {got} for a batch of {x.shape[0]}; expected "
                          "[B, gh, gw] or [B, K, gh, gw]")
    if one_map and maps.dim() == 4:
        maps = maps.mean(1)  # [B, gh, gw]
    return maps.detach()
