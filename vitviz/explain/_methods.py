"""The one registry of map methods: every way vitviz turns a model and a batch into maps.

A method is registered once, with what it needs, and every consumer reads it from here: the
gallery (``vitviz gallery``), the sanity checks (:func:`vitviz.evaluate.randomization`,
``vitviz sanity``), the map benchmark (``vitviz benchmark-maps``) and
:func:`vitviz.explain.compute_maps`; ``vitviz methods`` lists them.

A method turns one batch into maps. It receives a :class:`MethodInput` (the model, the
input batch, the capture recording and the model's output) and returns a
:class:`MethodResult` (or just a tensor): ``[B, gh, gw]`` for one map per image
(``output="map"``), ``[B, K, gh, gw]`` for a fixed number of maps per image (one per head:
``output="stack"``; consumers that need one map per image average them), or a list of ``B``
tensors ``[K_i, gh, gw]`` when the count varies per image (caption words, texts:
``output="list"``; only the gallery draws those).

What a method needs from the forward pass is declared when it is registered:

* ``needs="attention"``: one forward pass under :func:`vitviz.capture` (no gradients);
  ``inp.attentions`` holds ``[L, B, H, N, N]``. A method that can work layer by layer also
  gives ``stream=`` (a factory of a streaming analysis with ``reset()``,
  ``update(attn, *, layer, num_layers, layout)``, ``result(layout)``, e.g.
  :class:`vitviz.analyze._rollout.RolloutStream`): when every
  chosen attention method streams, the capture keeps no layer at all (memory ``O(B*N^2)``)
  and the method reads its result as ``inp.streamed``.
* ``needs="grad"``: the shared forward pass runs with gradients under
  ``vitviz.capture(model, grad=True)``, followed by one backward pass of every image's
  target logit (the predicted class unless a target is given; ``inp.target``);
  ``inp.rec.attention_grads`` holds ``dA``. All grad methods share that one backward pass.
  A grad method's ``stream=`` gives a gradient stream (``update_grad``, e.g.
  :class:`vitviz.analyze.RelevanceStream`) computed as the backward pass runs; when every
  shared method streams, no layer's attention or gradient is kept.
* ``needs="model"``: no shared forward pass; the method runs the model itself (captioning:
  generate, then read the cross-attention). ``needs=("model", "texts")``: it also takes
  the texts to locate (option ``texts``; CLIP / SigLIP text maps).
* ``needs="none"``: the method ignores the model (the baselines ``random`` and ``centre``).

This module imports no torch: ``vitviz gallery --merge`` and ``vitviz methods --help`` stay
light. Running methods on a batch is :func:`vitviz.explain.run_methods` /
:func:`vitviz.explain.compute_maps`.

Example:
    >>> from vitviz.explain import register_method
    >>> @register_method("last_layer_mean", description="mean attention of the last layer")
    ... def _last(inp):
    ...     a = inp.attentions.tensor[-1].mean(1)            # [B, N, N]
    ...     return a[:, 0, 1:].reshape(-1, *inp.attentions.layout.grid)   # [B, gh, gw]
    >>> vitviz.explain.compute_maps(m, x, "last_layer_mean").shape   # [B, gh, gw]
    >>> vitviz.evaluate.randomization(m, x, "last_layer_mean")       # and every other consumer
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import VitvizError

if TYPE_CHECKING:  # torch stays out of `vitviz gallery --merge` and `--help`
    import torch

NEEDS = ("attention", "grad", "model", "none")
"""How a method runs: on the shared captured pass (attention), on it with one backward pass
(grad), by running the model itself (model), or without the model (none)."""

OUTPUTS = ("map", "stack", "list")
"""What a method returns per batch: ``[B, gh, gw]`` (map), ``[B, K, gh, gw]`` (stack) or ``B``
arrays ``[K_i, gh, gw]`` (list)."""


@dataclass
class MethodInput:
    """What a method gets for one batch.

    Attributes:
        model: the :class:`vitviz.VisionModel`.
        x: ``[B, 3, H, W]`` input batch on the model's device and dtype.
        rec: the :class:`vitviz.Recording` of the shared forward pass (``None`` for
            ``needs="model"`` and ``needs="none"`` methods).
        output: the model's output for ``x`` (logits, or a transformers output object), or
            ``None`` for ``needs="model"`` and ``needs="none"`` methods.
        streamed: the result of this method's streaming analysis, when the capture streamed.
        target: ``[B]`` the classes whose logits were backpropagated (``needs="grad"``: the
            predicted ones unless targets were given), or the given targets otherwise.
    """

    model: Any
    x: torch.Tensor
    rec: Any = None
    output: Any = None
    streamed: Any = None
    target: torch.Tensor | None = None

    @property
    def attentions(self):
        """:class:`vitviz.AttentionMaps` ``[L, B, H, N, N]`` of the image encoder.

        Raises:
            CaptureError: no self-attention over image tokens was captured (the one error of
                :func:`vitviz.explain.attentions_of`).
        """
        from ._shared import attentions_of

        return attentions_of(self.rec, self.model)

    @property
    def logits(self) -> torch.Tensor | None:
        """``[B, C]`` classifier logits, or ``None`` when the output is not a classifier's."""
        from ..models import classifier_logits

        return classifier_logits(self.output, min_classes=2)


@dataclass
class MethodResult:
    """Maps for one batch.

    Attributes:
        maps: ``[B, gh, gw]``, ``[B, K, gh, gw]``, or a sequence of ``B`` tensors/arrays
            ``[K_i, gh, gw]``.
        names: per image, the names of its ``K`` maps (``"head 0"``, words ...), or ``None``.
        texts: per image, a text shown with it (a caption), or ``None``.
    """

    maps: Any
    names: Sequence[Sequence[str]] | None = None
    texts: Sequence[str] | None = None


@dataclass(frozen=True)
class Method:
    """A registered map method (see :func:`register_method`).

    Attributes:
        name: the name used with ``--methods`` and ``method=``.
        fn: ``fn(inp: MethodInput, **options) -> MethodResult | Tensor``.
        needs: ``"attention"``, ``"grad"``, ``"model"`` or ``"none"`` (see :data:`NEEDS`).
        description: one line for ``vitviz methods``.
        defaults: the method's options and their default values.
        stream: ``stream(model, **options)`` -> a streaming analysis, or ``None``.
        extra: the optional vitviz extra it needs (``vitviz._util.extras``), if any.
        texts: it takes texts to locate (option ``texts``).
        output: ``"map"``, ``"stack"`` or ``"list"`` (see :data:`OUTPUTS`).
        explains_class: it explains one class logit per image (``inp.target``, the predicted
            class when None) although it runs the model itself.
    """

    name: str
    fn: Callable[..., Any]
    needs: str = "attention"
    description: str = ""
    defaults: dict = field(default_factory=dict)
    stream: Callable[..., Any] | None = None  # stream(model, **options) -> streaming analysis
    extra: str | None = None  # the optional vitviz extra it needs (vitviz._util.extras), if any
    texts: bool = False  # takes the texts to locate (option "texts")
    output: str = "map"  # "map" [B, gh, gw], "stack" [B, K, gh, gw], "list" B x [K_i, gh, gw]
    explains_class: bool = False  # a "model" method that explains one class logit per image (target=)

    @property
    def class_specific(self) -> bool:
        """True when the method explains one class logit per image (``inp.target``): the grad
        methods and the ``needs="model"`` methods registered with ``explains_class=True`` (LRP).
        The sanity checks fix that class to the trained model's prediction."""
        return self.needs == "grad" or self.explains_class

    @property
    def requirements(self) -> tuple[str, ...]:
        """What the method needs, as listed by ``vitviz methods``: the pass, then ``"texts"``."""
        return (self.needs,) + (("texts",) if self.texts else ())

    @property
    def single_map(self) -> bool:
        """True when the method gives one map per image, or a fixed stack of them that is
        averaged into one (``output`` ``"map"`` or ``"stack"``): what the sanity checks and
        ``benchmark-maps`` score. Caption words and text maps (``"list"``) are the gallery's."""
        return self.output != "list"

    def check_installed(self, what: str | None = None) -> None:
        """Refuse the method when the optional package it needs is not installed.

        Args:
            what: how the error names the method (default ``"the gallery method 'NAME'"``).

        Raises:
            MissingExtraError: naming ``pip install 'vitviz[EXTRA]'``.
        """
        if self.extra is not None:
            from .._util.extras import require_extra

            require_extra(self.extra, what or f"the gallery method {self.name!r}")

    def options(self, given: dict | None = None) -> dict:
        """The method's options: its defaults updated with ``given``.

        Args:
            given: option name -> value (``None``: the defaults).

        Returns:
            A new dict of every option of the method.

        Raises:
            VitvizError: an option the method does not have (its options are listed).
        """
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.defaults))
        if unknown:
            known = ", ".join(sorted(self.defaults)) or "none"
            raise VitvizError(f"method {self.name!r} has no option {', '.join(unknown)} "
                              f"(its options: {known})")
        return {**self.defaults, **given}

    def __call__(self, inp: MethodInput, **options) -> MethodResult:
        """Run the method on one batch with its options checked; a bare tensor becomes a
        :class:`MethodResult`."""
        out = self.fn(inp, **self.options(options))
        return out if isinstance(out, MethodResult) else MethodResult(out)


_METHODS: dict[str, Method] = {}


def _parse_needs(needs: str | Sequence[str]) -> tuple[str, bool]:
    items = [needs] if isinstance(needs, str) else list(needs)
    kinds = [n for n in items if n in NEEDS]
    other = [n for n in items if n not in NEEDS and n != "texts"]
    if len(kinds) != 1 or other:
        raise ValueError(f"needs must be one of {', '.join(NEEDS)}, optionally with 'texts' "
                         f"(e.g. needs=('model', 'texts')), got {needs!r}")
    return kinds[0], "texts" in items


def register_method(name: str, *, needs: str | Sequence[str] = "attention", description: str = "",
                    replace: bool = False, stream: Callable[..., Any] | None = None,
                    extra: str | None = None, output: str = "map", explains_class: bool = False,
                    **defaults) -> Callable:
    """Decorator registering ``fn(inp: MethodInput, **options) -> MethodResult | Tensor``.

    Args:
        name: the name used with ``--methods`` (lower case, no commas).
        needs: ``"attention"``, ``"grad"``, ``"model"`` or ``"none"`` (see the module
            docstring), or a tuple of one of them and ``"texts"`` for a method that locates
            texts (its option ``texts`` is added with the default ``()``).
        description: one line for ``vitviz methods``.
        replace: allow replacing a registered method of the same name.
        stream: ``stream(model, **options)`` returning a streaming analysis (``update`` for
            ``needs="attention"``, ``update_grad`` for ``needs="grad"``) whose
            ``result(layout)`` the method then reads as ``inp.streamed``.
        extra: the optional vitviz extra the method needs (``"flow"``); a gallery that asks
            for the method without it fails before any image is read, naming the install.
        output: ``"map"`` (``[B, gh, gw]``), ``"stack"`` (``[B, K, gh, gw]``) or ``"list"``
            (``B`` arrays ``[K_i, gh, gw]``); the sanity checks and ``benchmark-maps`` take
            ``"map"`` and ``"stack"`` methods.
        explains_class: a ``needs="model"`` method that explains one class logit per image
            (``inp.target``; the predicted class when None), as LRP does: the sanity checks fix
            that class, and ``benchmark-maps`` scores it by default.
        **defaults: the method's options and their default values.

    Returns:
        The decorator; it returns ``fn`` unchanged.

    Raises:
        ValueError: a bad name, ``needs``, ``output`` or ``extra``, or a name already
            registered (without ``replace=True``).
    """
    kind, texts = _parse_needs(needs)
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", name or "") or name in ("input", "image", "images"):
        raise ValueError(f"invalid method name {name!r}: letters, digits, '_' and '-' only (it names "
                         "the method's output folder), not 'input'/'images'")
    if texts:
        defaults.setdefault("texts", ())

    def deco(fn: Callable) -> Callable:
        if name in _METHODS and not replace and _METHODS[name].fn is not fn:
            raise ValueError(f"a map method named {name!r} is already registered; pass replace=True")
        if extra is not None:
            from .._util.extras import EXTRAS

            if extra not in EXTRAS:
                raise ValueError(f"unknown extra {extra!r} (known: {', '.join(sorted(EXTRAS))})")
        _METHODS[name] = Method(name, fn, kind, description, dict(defaults), stream, extra, texts, output,
                                explains_class)
        return fn

    return deco


def unregister_method(name: str) -> bool:
    """Remove a registered method (a test's or a plugin's teardown).

    Args:
        name: the method's name.

    Returns:
        True when it was registered, False when there was nothing to remove.
    """
    return _METHODS.pop(name, None) is not None


def list_methods() -> list[str]:
    """Names of the registered map methods, sorted.

    Returns:
        The names, for ``--methods``, ``method=`` and :func:`get_method`.
    """
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    """The method called ``name``; an unknown name lists the close ones.

    Args:
        name: a registered name (see :func:`list_methods`).

    Returns:
        The :class:`Method`.

    Raises:
        VitvizError: unknown name.
    """
    if isinstance(name, str) and name in _METHODS:
        return _METHODS[name]
    close = difflib.get_close_matches(str(name), list(_METHODS), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise VitvizError(f"unknown map method {name!r}{hint} (registered: {', '.join(sorted(_METHODS))}; "
                      "see `vitviz methods`)")


# --------------------------------------------------------------------------------------------
# built-in methods
# --------------------------------------------------------------------------------------------

def _rollout_stream(model, *, head_fusion: str, discard_ratio: float, start_layer: int):
    from ..analyze import RolloutStream

    return RolloutStream(head_fusion=head_fusion, discard_ratio=discard_ratio, start_layer=start_layer)


@register_method("rollout", description="attention rollout (Abnar & Zuidema 2020), one map per image",
                 stream=_rollout_stream, head_fusion="mean", discard_ratio=0.0, start_layer=0)
def _rollout(inp: MethodInput, *, head_fusion: str, discard_ratio: float, start_layer: int):
    if inp.streamed is not None:
        return inp.streamed  # [B, gh, gw], computed layer by layer during the forward pass
    from ..analyze import rollout

    return rollout(inp.attentions, head_fusion=head_fusion, discard_ratio=discard_ratio,
                   start_layer=start_layer)  # [B, gh, gw]


class LayerStream:
    """Keeps one layer's attention ``[B, H, N, N]`` while the layers run (a negative ``layer``
    counts from the end: when the depth is not known before the pass ends, the last ``-layer``
    seen are kept); ``result`` gives :func:`vitviz.cls_maps` of it.

    Memory: one layer (``|layer|`` layers for a negative index) instead of all ``L``. Each layer
    is read on its own token grid (``per_layer_layouts``), so hierarchical models work too. It
    reads only its layer (``layers``, as ``keep=``): the other layers run as the capture's other
    streams need them, or on the model's fused kernel.
    """

    per_layer_layouts = True

    def __init__(self, layer: int = -1):
        self.layer = int(layer)
        self.layers = [self.layer]  # the layers the capture passes to update (every layer while the depth is unknown)
        self.reset()

    def reset(self) -> None:
        """Forget the layers seen (a new forward pass)."""
        from collections import deque

        self.seen = 0
        self.kept = None  # [B, H, N, N]
        self.recent = deque(maxlen=max(1, -self.layer))

    def update(self, attn_l, *, layer: int, layout, num_layers=None) -> None:
        """Keep layer ``layer``'s attention ``[B, H, N, N]`` if it is the chosen one.

        Called by the capture as each image self-attention layer runs. With a non-negative
        index only that layer is kept; with a negative one, the layer ``num_layers + layer``
        when the depth is known, else the last ``-layer`` layers seen (a bounded queue).

        Args:
            attn_l: ``[B, H, N, N]`` the layer's attention on its own token grid (kept as
                given, not copied).
            layer: the layer's index in forward order.
            layout: the :class:`~vitviz.TokenLayout` of this layer's tokens (kept with it).
            num_layers: the depth of the model, when known before the pass ends.
        """
        self.seen = max(self.seen, layer + 1)
        if self.layer >= 0:
            if layer == self.layer:
                self.kept = (attn_l, layout)
        elif num_layers:  # the depth is known: the index from the end is a layer number
            if layer == num_layers + self.layer:
                self.kept = (attn_l, layout)
        else:
            self.recent.append((attn_l, layout))

    def result(self, layout):
        """``[B, H, gh, gw]`` CLS maps of the kept layer.

        Args:
            layout: the layout of the last layer (the capture's argument; unused: the kept
                layer is read on the layout it was given with in :meth:`update`).

        Returns:
            ``[B, H, gh, gw]`` float32 per-head attention of the CLS token (the mean of the patch
            rows for a model without CLS) over the kept layer's patch grid, as
            :func:`vitviz.cls_maps`; prefix tokens dropped, not rescaled.

        Raises:
            ValueError: the layer was not seen (out of range for the model's depth).
        """
        from ..analyze.cls import cls_maps
        from ..types import AttentionMaps

        if self.kept is not None:
            kept = self.kept
        else:
            kept = self.recent[0] if len(self.recent) == -self.layer else None
        if kept is None:
            raise ValueError(f"layer {self.layer} is out of range for {self.seen} layers")
        a, own = kept  # the layer's attention on its own token grid
        return cls_maps(AttentionMaps(a[None], own), layer=0)  # [B, H, gh, gw]


def _cls_stream(model, *, layer: int):
    return LayerStream(layer)


@register_method("cls", description="attention of the CLS token at one layer, one map per head",
                 stream=_cls_stream, output="stack", layer=-1)
def _cls(inp: MethodInput, *, layer: int):
    if inp.streamed is not None:
        maps = inp.streamed  # [B, H, gh, gw]
    else:
        from ..analyze.cls import cls_maps

        maps = cls_maps(inp.attentions, layer=layer)  # [B, H, gh, gw]
    b, h = maps.shape[:2]
    return MethodResult(maps, names=[[f"head {i}" for i in range(h)] for _ in range(b)])


def _relevance_stream(method: str):
    def make(model, **options):
        from ..analyze.gradient import RelevanceStream

        return RelevanceStream(method, **options)
    return make


@register_method("relevance", needs="grad", stream=_relevance_stream("chefer"), start_layer=0,
                 description="class-specific relevance of the predicted class (Chefer et al. 2021)")
def _relevance(inp: MethodInput, *, start_layer: int):
    if inp.streamed is not None:
        return inp.streamed  # [B, gh, gw], computed during the backward pass
    from ..analyze.gradient import relevance_map

    return relevance_map(inp.attentions, inp.rec.attention_grads, method="chefer",
                         start_layer=start_layer)  # [B, gh, gw]


@register_method("grad_rollout", needs="grad", stream=_relevance_stream("grad_rollout"), head_fusion="mean",
                 discard_ratio=0.0, start_layer=0, description="gradient rollout of the predicted class (vit-explain)")
def _grad_rollout(inp: MethodInput, *, head_fusion: str, discard_ratio: float, start_layer: int):
    if inp.streamed is not None:
        return inp.streamed  # [B, gh, gw]
    from ..analyze.gradient import relevance_map

    return relevance_map(inp.attentions, inp.rec.attention_grads, method="grad_rollout",
                         head_fusion=head_fusion, discard_ratio=discard_ratio,
                         start_layer=start_layer)  # [B, gh, gw]


def _lrp(method: str):
    def run(inp: MethodInput, *, gamma: float | None):
        from ._relevance import relevance

        return relevance(inp.model, inp.x, target=inp.target, method=method, gamma=gamma)  # [B, gh, gw]
    return run


register_method("attnlrp", needs="model", explains_class=True, gamma=None,
                description="AttnLRP (Achtibat et al. 2024): LRP with attention-aware rules, per patch"
                )(_lrp("attnlrp"))
register_method("cp-lrp", needs="model", explains_class=True, gamma=None,
                description="CP-LRP (Ali et al. 2022): LRP with attention held constant, per patch"
                )(_lrp("cp-lrp"))


@register_method("flow", head_fusion="mean", start_layer=0, extra="flow",
                 description="attention flow (Abnar & Zuidema 2020), max-flow per patch")
def _flow(inp: MethodInput, *, head_fusion: str, start_layer: int):
    from ..analyze.flow import attention_flow

    return attention_flow(inp.attentions, head_fusion=head_fusion, start_layer=start_layer)  # [B, gh, gw]


@register_method("caption", needs="model", output="list", max_new_tokens=20, num_beams=1, layer=-1,
                 head_fusion="mean", description="caption under each image, one cross-attention map per word")
def _caption(inp: MethodInput, *, max_new_tokens: int, num_beams: int, layer: int, head_fusion: str):
    from .captioning import caption

    maps, names, texts = [], [], []
    for j in range(inp.x.shape[0]):  # vitviz.caption decodes one image at a time
        cap = caption(inp.model, inp.x[j:j + 1], max_new_tokens=max_new_tokens, num_beams=num_beams)
        grids = cap.word_grids(layer=layer, head_fusion=head_fusion, merge="mean")  # [W, gh, gw]
        maps.append(grids)
        names.append([w.text for w in cap.words])
        texts.append(cap.text)
    return MethodResult(maps, names=names, texts=texts)


@register_method("text", needs=("model", "texts"), output="list", method="chefer",
                 description="text -> image maps of a CLIP/SigLIP model, one per --texts entry (vitviz text)")
def _text(inp: MethodInput, *, texts: Sequence[str], method: str):
    from .text import text_maps

    if not texts:
        raise VitvizError("the gallery method 'text' needs texts to locate: --texts \"a red circle\" "
                          "\"a blue square\" (from Python: options={'text': {'texts': [...]}})")
    maps, names = [], []
    for j in range(inp.x.shape[0]):  # explain_text explains one image against every text
        res = text_maps(inp.model, inp.x[j:j + 1], list(texts), method=method)
        maps.append(res.maps)  # [T, gh, gw]
        names.append([f"{t} ({s:.2f})" for t, s in zip(texts, res.scores.tolist())])
    return MethodResult(maps, names=names)


@register_method("random", needs="none", seed=0,
                 description="baseline: one uniform random map per image (seeded), ignores the model")
def _random(inp: MethodInput, *, seed: int):
    import torch

    from ._shared import grid_of
    from .baselines import random_maps

    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return random_maps(inp.x.shape[0], grid_of(inp.model, inp.x), generator=g).to(inp.x.device)  # [B, gh, gw]


@register_method("centre", needs="none",
                 description="baseline: a Gaussian bump at the image centre, ignores the model")
def _centre(inp: MethodInput):
    from ._shared import grid_of
    from .baselines import centre_prior

    grid = grid_of(inp.model, inp.x)
    return centre_prior(grid, device=inp.x.device).expand(inp.x.shape[0], *grid).clone()  # [B, gh, gw]
