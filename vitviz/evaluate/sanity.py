"""Model-parameter randomisation (Adebayo et al. 2018, "Sanity Checks for Saliency Maps").

Does a map depend on the model? The model's layers are re-initialised from the top down --
the classifier head (with the final norm) first, then the transformer blocks from the last to
the first, then everything left (patch embedding, position embedding, prefix tokens) -- and the
map is recomputed after every step. A map that barely changes when the weights it should
explain are gone explains the image (edges, a centre bias), not the model.

* ``mode="cascade"``: the steps accumulate (head; head + last block; ...), as Adebayo et al.
* ``mode="independent"``: each step re-initialises only its own layers, the rest stays trained.

Re-initialisation is seeded (step ``i`` uses ``seed + i`` in both modes, so a block gets the same
random weights in both) and uses each layer's own init rule: ``reset_parameters()`` of every
module that has one (``nn.Linear``, ``nn.Conv2d``, ``nn.LayerNorm`` ...); parameters held
directly by a module without one (CLS token, position embedding, layer-scale) are drawn from a
normal distribution with the trained tensor's own mean and standard deviation. Every parameter
and buffer is restored bit for bit afterwards, also after an exception.

The maps come from the one registry of map methods (:mod:`vitviz.explain`: ``rollout``,
``cls``, ``relevance``, ``grad_rollout``, ``flow``, the baselines ``random`` and ``centre``,
and every method registered with :func:`vitviz.explain.register_method` that gives one map per
image), computed by :func:`vitviz.explain.compute_maps`; :data:`METHODS` is a view of it.
Relevance methods explain, at every step, the class the *trained* model predicted.

Example:
    >>> m = vitviz.load_model("shapes-vit")
    >>> r = vitviz.evaluate.randomization(m, x, "rollout")
    >>> r.steps                  # ['trained', 'head', 'block 3', 'block 2', 'block 1', 'block 0', 'embeddings']
    >>> r.spearman.mean(1)       # [S+1] rank correlation with the trained map, per step
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import LayoutError, MissingExtraError, VitvizError
from ..explain import (
    Method,
    as_vision_model,
    check_classifier,
    compute_maps,
    get_method,
    list_methods,
    logits_of,
    prepare_inputs,
    resolve_targets,
    single_map_method,
)
from ..models import classifier_logits
from ._table import Table
from .metrics import spearman, ssim, topk_overlap

MapFn = Callable[[Any, torch.Tensor, torch.Tensor | None], torch.Tensor]

_HEAD_NAMES = ("head", "classifier", "fc")
_FINAL_NORM_NAMES = ("norm", "fc_norm", "layernorm", "post_layernorm", "final_layer_norm", "ln_post")
_BLOCK_NAMES = ("blocks", "layer", "layers", "resblocks")
_STAGE_NAMES = ("stages",)  # lists of stages of hierarchical models (also "layers": Swin)


# ---------------------------------------------------------------------------------------------
# methods: the registry's methods with one map per image, as fn(model, x, target) -> [B, gh, gw]
# ---------------------------------------------------------------------------------------------

def _registry_map_fn(method: Method) -> MapFn:
    def fn(model, x, target=None):
        return compute_maps(model, x, method, target=target, one_map=True)  # [B, gh, gw]

    fn.__name__ = method.name
    return fn


class _MapFns(Mapping):
    """``name -> fn(model, x, target) -> [B, gh, gw]`` for every registered method that gives
    one map per image (a read-only view of the registry: methods registered later appear)."""

    def __getitem__(self, name: str) -> MapFn:
        return _registry_map_fn(single_map_method(name, "the sanity checks"))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in list_methods() and get_method(name).single_map

    def get(self, name, default=None):
        return self[name] if name in self else default

    def __iter__(self) -> Iterator[str]:
        return iter([n for n in list_methods() if get_method(n).single_map])

    def __len__(self) -> int:
        return sum(1 for _ in self)


METHODS: Mapping[str, MapFn] = _MapFns()
"""The maps :func:`randomization` and ``vitviz sanity`` know by name: a view of the registry
(:func:`vitviz.explain.list_methods`) with the methods that give one map per image, each as
``fn(model, x, target)`` returning ``[B, gh, gw]``. ``cls`` is the last layer's CLS row, heads
averaged; ``random`` (one fixed random map per image) and ``centre`` (a centre prior) are
baselines that ignore the model."""


def get_map_fn(method: str | Method | MapFn) -> MapFn:
    """The map function of a method.

    Args:
        method: a registered name (see :data:`METHODS`), a :class:`vitviz.explain.Method`, or
            ``fn(model, x, target) -> [B, gh, gw]`` (returned as it is).

    Returns:
        ``fn(model, x, target) -> [B, gh, gw]``.

    Raises:
        VitvizError: unknown name, or a method without one map per image.
    """
    if isinstance(method, (str, Method)):
        try:
            return _registry_map_fn(single_map_method(method, "the sanity checks"))
        except VitvizError as e:
            if isinstance(method, str) and method in list_methods():
                raise
            raise VitvizError(f"{e}; or pass a function fn(model, x, target) -> [B, gh, gw]") from None
    if callable(method):
        return method
    raise VitvizError(f"a map method is a registered name or fn(model, x, target) -> [B, gh, gw], "
                      f"got {type(method).__name__}")


# ---------------------------------------------------------------------------------------------
# which layers, in which order
# ---------------------------------------------------------------------------------------------

Step = tuple[str, list]  # (name, [nn.Module or nn.Parameter, ...])


def _named(module: nn.Module, names: Sequence[str]) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in module.named_modules() if n.rsplit(".", 1)[-1] in names]


def _lists(module: nn.Module, names: Sequence[str]) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in _named(module, names)
            if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > 0]


def _block_list(stage: nn.Module) -> tuple[str, nn.Module] | None:
    """The blocks of one stage of a hierarchical model: the longest list named like
    :data:`_BLOCK_NAMES` inside it whose items are blocks (modules with submodules), or None."""
    found = [(n, m) for n, m in _lists(stage, _BLOCK_NAMES)
             if n and all(any(True for _ in b.children()) for b in m)]
    return max(found, key=lambda nm: len(nm[1])) if found else None


def _stage_steps(stages: nn.Module) -> list[Step] | None:
    """The block steps of a list of stages (Swin, PVT, MaxViT: ``layers[s].blocks[i]``), top
    first, or None when ``stages`` is not a list of at least two stages that each hold blocks.

    Each stage's other layers (patch merging, its norm) go with its first block."""
    inner = [_block_list(st) for st in stages]
    if len(stages) < 2 or any(b is None for b in inner):
        return None
    steps: list[Step] = []
    for s, (st, (bname, blocks)) in enumerate(zip(stages, inner)):
        other = [c for n, c in st.named_children() if not (bname == n or bname.startswith(n + "."))]
        other += list(st.parameters(recurse=False))
        steps += [(f"stage {s} block {i}", [blocks[i]] + (other if i == 0 else [])) for i in range(len(blocks))]
    return steps[::-1]


def randomization_layers(module: nn.Module) -> list[Step]:
    """The re-initialisation steps of a classifier, top first.

    ``("head", [head, final norms])``, then ``("block i", [block i])`` for the last block down to
    the first, then ``("embeddings", [every parameter not in an earlier step])``. The blocks are the
    longest ``ModuleList`` (or ``Sequential``) named ``blocks`` / ``layer`` / ``layers`` /
    ``resblocks``; the head is a module named ``head``, ``classifier`` or ``fc`` outside them, the
    final norms the modules named ``norm``, ``fc_norm``, ``layernorm`` ... outside them and
    outside the embeddings.

    Hierarchical models (Swin, PVT, MaxViT ...), whose blocks sit in a list of stages
    (``layers`` / ``stages``, each stage holding its own ``blocks``), get one step per block of
    every stage, from the last stage's last block down: ``("stage 3 block 1", ...)`` ...
    ``("stage 0 block 0", ...)``; each stage's other layers (patch merging) go with its first
    block.

    A model without a classifier head (timm ``num_classes=0``) starts with its final norm.

    Args:
        module: the classifier's ``nn.Module`` (e.g. ``VisionModel.module``).

    Returns:
        ``[(name, items), ...]`` top first: ``name`` is ``"head"`` (or ``"final norm"`` without a
        head), ``"block i"`` for ``i`` from the last block to 0 (``"stage s block i"`` for
        hierarchical models), then ``"embeddings"``; ``items`` are the ``nn.Module`` s of the
        step (with a stage's first block, also the stage's other modules and parameters), or
        for ``"embeddings"`` the remaining ``nn.Parameter`` s. Steps without parameters (no
        head and no final norm; nothing left for ``"embeddings"``) are left out.

    Raises:
        VitvizError: no blocks were found (pass ``layers=`` to :func:`randomization`).
    """
    lists = _lists(module, _BLOCK_NAMES)
    if not lists:
        raise VitvizError(f"{type(module).__name__}: no transformer blocks found (a ModuleList named "
                          f"{', '.join(_BLOCK_NAMES)}); pass layers=[(name, [modules...]), ...], top first")
    bname, blocks = max(lists, key=lambda nm: len(nm[1]))
    block_steps: list[Step] = [(f"block {i}", [blocks[i]]) for i in reversed(range(len(blocks)))]
    # a list of stages that each hold blocks, with more blocks in all than the longest list
    staged = [(n, m, st) for n, m in _lists(module, _BLOCK_NAMES + _STAGE_NAMES)
              if (st := _stage_steps(m)) is not None]
    if staged:
        sname, smod, ssteps = max(staged, key=lambda t: len(t[2]))
        if len(ssteps) > len(blocks):
            bname, block_steps = sname, ssteps
    inside = lambda n: n == bname or n.startswith(bname + ".")  # noqa: E731
    heads = [(n, m) for n, m in _named(module, _HEAD_NAMES)
             if not inside(n) and any(True for _ in m.parameters())]
    head = [min(heads, key=lambda nm: nm[0].count("."))[1]] if heads else []
    head += [m for n, m in _named(module, _FINAL_NORM_NAMES)
             if not inside(n) and "embed" not in n and any(True for _ in m.parameters())]
    steps: list[Step] = [("head" if heads else "final norm", head)] if head else []
    steps += block_steps
    seen = {id(p) for _, items in steps for it in items
            for p in ([it] if isinstance(it, nn.Parameter) else it.parameters())}
    rest = [p for p in module.parameters() if id(p) not in seen]
    if rest:
        steps.append(("embeddings", rest))
    return steps


def _reinit(items: list) -> None:
    """Re-initialise modules (``reset_parameters`` where they have one) and bare parameters."""
    done: set[int] = set()
    loose: list[nn.Parameter] = []
    for it in items:
        if isinstance(it, nn.Parameter):
            loose.append(it)
            continue
        for m in it.modules():
            reset = getattr(m, "reset_parameters", None) or getattr(m, "_reset_parameters", None)
            own = list(m.parameters(recurse=False))
            if callable(reset) and own:
                reset()
                done.update(id(p) for p in own)
                if isinstance(m, nn.MultiheadAttention):  # its reset also covers out_proj
                    done.update(id(p) for p in m.parameters())
            else:
                loose.extend(own)
    with torch.no_grad():
        for p in loose:
            if id(p) in done:
                continue
            done.add(id(p))
            mean = p.float().mean()
            std = p.float().std() if p.numel() > 1 else torch.zeros(())
            p.copy_((torch.randn(p.shape, device=p.device) * std + mean).to(p.dtype))


@contextlib.contextmanager
def restored(module: nn.Module):
    """Snapshot every parameter and buffer; copy them back on exit (also after an exception)."""
    saved = [(t, t.detach().clone()) for t in list(module.parameters()) + list(module.buffers())]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, v in saved:
                t.copy_(v)


def _seeded(seed: int, device: torch.device):
    devices = [device] if device.type == "cuda" else []
    ctx = torch.random.fork_rng(devices=devices)
    ctx.__enter__()
    torch.manual_seed(seed)
    return ctx


# ---------------------------------------------------------------------------------------------
# randomization
# ---------------------------------------------------------------------------------------------

@dataclass
class Randomization:
    """Maps after each randomisation step and how far they moved from the trained model's.

    Attributes:
        steps: ``S+1`` names: ``"trained"``, then what the step re-initialised (``"head"``,
            ``"block 3"`` ...); in cascade mode step ``s`` also keeps the steps before it.
        maps: ``[S+1, B, gh, gw]`` float32 maps (step 0: the trained model).
        spearman: ``[S+1, B]`` rank correlation of each step's map with the trained map.
        ssim: ``[S+1, B]`` SSIM of the min-max normalised maps.
        topk: ``[S+1, B]`` share of the trained map's top-``k`` patches still in the top ``k``.
        k: the ``k`` of ``topk``.
        mode: ``"cascade"`` or ``"independent"``.
        method: the method's name.
    """

    steps: list[str]
    maps: torch.Tensor
    spearman: torch.Tensor
    ssim: torch.Tensor
    topk: torch.Tensor
    k: int
    mode: str
    method: str = ""
    target: torch.Tensor | None = field(default=None, repr=False)

    def summary(self) -> list[dict]:
        """One dict per step: name and the means over images (NaN-aware).

        Returns:
            ``S+1`` dicts in step order, ``{"step": name, "spearman": float, "ssim": float,
            "topk": float}``: each the ``torch.nanmean`` over the ``B`` images (NaN when every
            image's value is NaN, e.g. a constant map).
        """
        return [{"step": s, "spearman": float(torch.nanmean(self.spearman[i])),
                 "ssim": float(torch.nanmean(self.ssim[i])), "topk": float(torch.nanmean(self.topk[i]))}
                for i, s in enumerate(self.steps)]


def _method_name(method: str | Method | MapFn) -> str:
    if isinstance(method, str):
        return method
    if isinstance(method, Method):
        return method.name
    return getattr(method, "__name__", "custom")


def randomization(model, images, method: str | Method | MapFn = "rollout", *, mode: str = "cascade",
                  layers: Sequence[Step] | None = None, num_steps: int | None = None,
                  seed: int = 0, top_k: int | None = None, batch_size: int = 32,
                  target: torch.Tensor | None = None) -> Randomization:
    """Model-parameter randomisation test of a map method (Adebayo et al. 2018).

    Args:
        model: a :class:`vitviz.VisionModel` (or any module :func:`vitviz.wrap` takes).
        images: ``[B, 3, H, W]`` preprocessed inputs, or a list of images (paths, PIL, arrays).
        method: a registered map method (``vitviz methods``: ``"rollout"``, ``"cls"``,
            ``"relevance"``, ``"grad_rollout"``, ``"flow"``, ``"random"``, ``"centre"`` or one
            of your own with one map per image; a stack such as ``cls``'s heads is averaged), a
            :class:`vitviz.explain.Method`, or ``fn(model, x, target) -> [B, gh, gw]``.
        mode: ``"cascade"`` (top down, accumulating) or ``"independent"`` (one step at a time).
        layers: the steps, top first, as ``[(name, [modules or parameters]), ...]``
            (default :func:`randomization_layers`).
        num_steps: only the first ``num_steps`` steps (``0``: the trained model only).
        seed: step ``i`` re-initialises with ``seed + i``.
        top_k: patches of the top-k overlap (default a tenth of the grid, at least 1).
        batch_size: images per forward pass.
        target: ``[B]`` classes explained by grad methods (relevance, grad_rollout) and passed
            to functions (default: the trained model's prediction).

    Returns:
        :class:`Randomization`; the model's parameters and buffers are unchanged afterwards.

    Raises:
        VitvizError: unknown method or mode, a method without one map per image, no blocks /
            head found, ``top_k`` out of range, a grad method on a model without a classifier.
        LayoutError: images of another size than the model's.
    """
    if mode not in ("cascade", "independent"):
        raise VitvizError(f"mode must be 'cascade' or 'independent', got {mode!r}")
    if batch_size < 1:
        raise VitvizError(f"batch_size must be >= 1, got {batch_size}")
    fn = get_map_fn(method)
    vm = as_vision_model(model)
    x = prepare_inputs(vm, images)  # [B, 3, H, W]
    module = vm.module
    steps = list(layers) if layers is not None else randomization_layers(module)
    if num_steps is not None:
        if not 0 <= num_steps <= len(steps):
            raise VitvizError(f"num_steps must be in 0..{len(steps)}, got {num_steps}")
        steps = steps[:num_steps]
    registered = None if callable(method) and not isinstance(method, Method) \
        else single_map_method(method, "randomization")
    needs_target = registered is None or registered.class_specific
    if target is None and needs_target:
        if registered is not None:
            check_classifier(vm, None, f"randomization of {registered.name}")
        with torch.no_grad():
            out = vm(x)
        if registered is None:  # a function gets the prediction when the model is a classifier
            t = classifier_logits(out)
            target = None if t is None else resolve_targets(t, None)  # [B]
        else:
            target = resolve_targets(logits_of(out, what=registered.name), None)  # [B]

    def maps_now() -> torch.Tensor:
        out = []
        for i in range(0, x.shape[0], batch_size):
            t = None if target is None else target[i:i + batch_size]
            m = fn(vm, x[i:i + batch_size], t)
            if not isinstance(m, torch.Tensor) or m.dim() != 3:
                raise LayoutError(f"a map method must return [B, gh, gw], got "
                                  f"{tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__}")
            out.append(m.detach().float())
        return torch.cat(out)  # [B, gh, gw]

    was_training = module.training
    module.eval()
    all_maps = []
    try:
        with restored(module):
            trained = None
            if mode == "independent":
                trained = [(t, t.detach().clone()) for t in list(module.parameters()) + list(module.buffers())]
            all_maps.append(maps_now())
            for i, (_, items) in enumerate(steps):
                if trained is not None and i > 0:
                    with torch.no_grad():  # back to the trained weights
                        for t, v in trained:
                            t.copy_(v)
                rng = _seeded(seed + i, vm.device)
                try:
                    _reinit(items)
                finally:
                    rng.__exit__(None, None, None)
                all_maps.append(maps_now())
    finally:
        module.train(was_training)
    maps = torch.stack(all_maps)  # [S+1, B, gh, gw]
    g = maps.shape[-2] * maps.shape[-1]
    k = max(1, g // 10) if top_k is None else int(top_k)
    if not 1 <= k <= g:
        raise VitvizError(
            f"top_k must be in 1..{g} (patches of the {maps.shape[-2]}x{maps.shape[-1]} grid), got {top_k}")
    ref = maps[0]
    sp = torch.stack([spearman(ref, m) for m in maps])  # [S+1, B]
    ss = torch.stack([ssim(ref, m) for m in maps])
    tk = torch.stack([topk_overlap(ref, m, k) for m in maps])
    name = _method_name(method)
    return Randomization(["trained"] + [n for n, _ in steps], maps, sp, ss, tk, k, mode, name, target)


# ---------------------------------------------------------------------------------------------
# every check for several methods: the table of `vitviz sanity` and `benchmark-maps --sanity`
# ---------------------------------------------------------------------------------------------

SANITY_COLUMNS = {
    "rand_head": ("rank corr., head random ↓", False),
    "rand_all": ("rank corr., all random ↓", False),
    "ssim_all": ("SSIM, all random ↓", False),
    "topk_all": ("top-k kept, all random ↓", False),
    "tok_del": ("token deletion AUC ↓", False),
    "tok_ins": ("token insertion AUC ↑", True),
    "road_morf": ("ROAD MoRF AUC ↓", False),
    "road_lerf": ("ROAD LeRF AUC ↑", True),
}
"""Column key -> (header, higher is better) of :meth:`SanityReport.table`."""

DEFAULT_METHODS = ("rollout", "cls", "relevance", "grad_rollout", "flow", "random", "centre")
"""The methods :func:`sanity_check` tries when none are named. Those a model's token grids do not
allow (rollout, relevance, gradient rollout and flow chain the layers over one set of tokens:
not on Swin, PVT, ... whose stages have several grids; there CLS maps read the last stage) and
those whose optional package is missing (flow: ``vitviz[flow]``) are left out, each with a note
(:attr:`SanityReport.dropped`)."""


@dataclass
class SanityReport:
    """What :func:`sanity_check` found, per method.

    Attributes:
        randomization: ``{method: Randomization}`` (cascade).
        tokens: ``{method: Curves}`` token deletion / insertion (MoRF); empty when the model has
            no token slot (see :func:`vitviz.evaluate.perturbation.token_site`).
        road: ``{method: RoadCurves}`` (only for the first ``road_images`` inputs), may be empty.
        seconds: ``{method: seconds}`` wall time per method.
        n: the number of images.
        dropped: ``{method: reason}`` of the default methods left out (not installed, or not
            possible on the model's token grids).
        notes: one line per thing left out (methods, token curves), as printed by ``vitviz sanity``.
    """

    randomization: dict
    tokens: dict
    road: dict
    seconds: dict
    n: int = 0
    dropped: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def rows(self) -> dict:
        """``{method: {column: mean over images}}`` (NaN-aware).

        Returns:
            One row per method of ``randomization``, in its order: a dict from
            :data:`SANITY_COLUMNS` keys to floats. ``rand_head``/``rand_all``/``ssim_all``/
            ``topk_all`` (the first and the last randomisation step; NaN-aware means) only when
            there was a step beyond ``"trained"``; ``tok_del``/``tok_ins`` only for methods in
            ``tokens``; ``road_morf``/``road_lerf`` only for methods in ``road`` (plain means
            over images).
        """
        out = {}
        for name, r in self.randomization.items():
            row = {}
            if len(r.steps) > 1:
                row["rand_head"] = float(torch.nanmean(r.spearman[1]))
                row["rand_all"] = float(torch.nanmean(r.spearman[-1]))
                row["ssim_all"] = float(torch.nanmean(r.ssim[-1]))
                row["topk_all"] = float(torch.nanmean(r.topk[-1]))
            c = self.tokens.get(name)
            if c is not None:
                row["tok_del"] = float(c.deletion_auc.mean())
                row["tok_ins"] = float(c.insertion_auc.mean())
            rc = self.road.get(name)
            if rc is not None:
                row["road_morf"] = float(rc.morf_auc.mean())
                row["road_lerf"] = float(rc.lerf_auc.mean())
            out[name] = row
        return out

    def table(self) -> Table:
        """The report as a table.

        Returns:
            A :class:`vitviz.evaluate.Table` (``.format(markdown=True)`` for Markdown).
        """
        return Table(self.rows(), dict(SANITY_COLUMNS), self.n, list(self.notes))


def _reason(e: Exception) -> str:
    """The first clause of an error's message: why a method cannot run (for one note line)."""
    text = " ".join(str(e).split())
    return text.split("; ")[0] if "; " in text else text


def _choose_methods(vm, x: torch.Tensor, methods: Sequence[str | Method | MapFn] | None,
                    target: torch.Tensor | None, say: Callable[[str], None],
                    defaults: Sequence[str] = DEFAULT_METHODS) -> tuple[list, dict]:
    """The methods to run and ``{name: reason}`` of the default ones left out.

    Named methods are checked and tried on the first image: one that cannot run raises its error
    (before any work). Without names, ``defaults`` are tried the same way and the ones that
    cannot run are left out, each with a note."""
    named = methods is not None
    candidates = list(methods) if named else list(defaults)
    dropped: dict[str, str] = {}
    kept = []
    for method in candidates:  # unknown names, per-word methods and missing extras: before any work
        try:
            fn = get_map_fn(method)
        except MissingExtraError as e:
            if named:
                raise
            dropped[_method_name(method)] = str(e)
            say(f"{_method_name(method)} is skipped: {e}")
            continue
        kept.append((method, fn))
    chosen = []
    for method, fn in kept:  # what the model's token grids allow: tried on the first image
        name = _method_name(method)
        try:
            m = fn(vm, x[:1], None if target is None else target[:1])
            if not isinstance(m, torch.Tensor) or m.dim() != 3:
                raise LayoutError(f"a map method must return [B, gh, gw], got "
                                  f"{tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__}")
        except VitvizError as e:
            if named:
                raise
            dropped[name] = _reason(e)
            say(f"{name} is skipped: {dropped[name]}")
            continue
        chosen.append(method)
    if not chosen:
        raise VitvizError(f"none of the map methods {', '.join(dropped)} can run on {vm.name}: "
                          + "; ".join(f"{k}: {v}" for k, v in dropped.items()))
    return chosen, dropped


def sanity_check(model, images, methods: Sequence[str | Method | MapFn] | None = None, *,
                 randomize: bool = True, tokens: bool = True, road_images: int | None = None,
                 steps: int = 16, road_steps: int = 10, seed: int = 0, batch_size: int = 32,
                 score_fn=None, progress: Callable[[str], None] | None = None,
                 on_note: Callable[[str], None] | None = None,
                 defaults: Sequence[str] = DEFAULT_METHODS) -> SanityReport:
    """Randomisation, token deletion / insertion and ROAD for several map methods on the same inputs.

    Args:
        model: a classifier (:class:`vitviz.VisionModel` or module).
        images: ``[B, 3, H, W]`` inputs at the model's size, or a list of images.
        methods: registered map methods with one map per image (``vitviz methods``), or map
            functions ``fn(model, x, target) -> [B, gh, gw]``; each is tried on the first image
            before any other work, and one that cannot run raises. ``None``: the methods of
            :data:`DEFAULT_METHODS` that the model allows and that are installed; the others are
            left out with a note (e.g. on Swin: CLS maps of the last stage and the baselines).
        randomize, tokens: run the randomisation cascade / the token curves. The token curves
            are skipped, with a note, on a model without a token slot
            (:func:`vitviz.evaluate.perturbation.token_site`: Swin, ConvNeXt-like ...); the
            randomisation and ROAD work with any classifier.
        road_images: ROAD on the first ``road_images`` inputs only (``None``: all; ``0``: none);
            its imputation is the slowest part.
        steps: points of the token curves minus one; road_steps: of the ROAD curves.
        seed: seed of the re-initialisation and of ROAD's noise.
        batch_size: images per map computation (the curves batch ``8 * batch_size`` sequences).
        score_fn: for models without a classifier (token curves and ROAD).
        progress: called with each method's name when it starts.
        on_note: called with each note (something left out, and why) when it is made; the
            notes are also in :attr:`SanityReport.notes`.
        defaults: the registered methods tried when ``methods`` is ``None`` (default
            :data:`DEFAULT_METHODS`).

    Returns:
        :class:`SanityReport`.

    Raises:
        VitvizError: an unknown method, one without one map per image, or a named method that
            cannot run on the model (all before any work); a model without a classifier and no
            ``score_fn``; no default method can run.
        MissingExtraError: a named method's optional package is not installed (before any work).
    """
    import time

    from .perturbation import road, token_curves, token_site

    notes: list[str] = []

    def say(text: str) -> None:
        notes.append(text)
        if on_note is not None:
            on_note(text)

    if methods is not None:
        for method in methods:
            get_map_fn(method)  # unknown names, per-word methods and missing extras fail before any work
    vm = as_vision_model(model)
    x = prepare_inputs(vm, images)
    b = x.shape[0]
    nr = b if road_images is None else max(0, min(int(road_images), b))
    with torch.no_grad():
        out = vm(x)
    target = None if score_fn is not None else resolve_targets(logits_of(out, what="sanity_check"), None)  # [B]
    chosen, dropped = _choose_methods(vm, x, methods, target, say, defaults)
    if tokens:
        try:
            token_site(vm.module)
        except VitvizError as e:
            tokens = False
            say(f"token deletion / insertion is skipped: {_reason(e)} (randomisation and ROAD run on any "
                "classifier)")
    rand, tok, rd, secs = {}, {}, {}, {}
    for method in chosen:
        name = _method_name(method)
        if progress is not None:
            progress(name)
        t0 = time.perf_counter()
        r = randomization(vm, x, method, seed=seed, batch_size=batch_size, target=target,
                          num_steps=None if randomize else 0)
        rand[name] = r
        maps = r.maps[0]  # [B, gh, gw] of the trained model
        if tokens:
            tok[name] = token_curves(vm, x, maps, target=target, steps=min(steps, maps[0].numel()),
                                     score_fn=score_fn, batch_size=8 * batch_size)
        if nr:
            rd[name] = road(vm, x[:nr], maps[:nr], target=None if target is None else target[:nr],
                            steps=min(road_steps, maps[0].numel()), seed=seed, score_fn=score_fn,
                            batch_size=8 * batch_size, coarse=True)  # e.g. Swin's last stage: 2x2 cells
        secs[name] = time.perf_counter() - t0
    return SanityReport(rand, tok, rd, secs, b, dropped, notes)


__all__ = ["sanity_check", "SanityReport", "SANITY_COLUMNS", "DEFAULT_METHODS", "randomization", "Randomization",
           "randomization_layers", "METHODS", "get_map_fn",
           "restored", "prepare_inputs", "logits_of", "check_classifier", "as_vision_model"]
