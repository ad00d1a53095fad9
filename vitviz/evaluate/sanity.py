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

The maps come from the public analyses (:func:`vitviz.rollout`, :func:`vitviz.cls_maps`,
:func:`vitviz.relevance`, :func:`vitviz.attention_flow`) through :func:`vitviz.capture`; see
:data:`METHODS`. Relevance methods explain, at every step, the class the *trained* model predicted.

Example:
    >>> m = vitviz.load_model("shapes-vit")
    >>> r = vitviz.evaluate.randomization(m, x, "rollout")
    >>> r.steps                  # ['trained', 'head', 'block 3', 'block 2', 'block 1', 'block 0', 'embeddings']
    >>> r.spearman.mean(1)       # [S+1] rank correlation with the trained map, per step
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import LayoutError, VitvizError
from .metrics import centre_prior, random_maps, spearman, ssim, topk_overlap

MapFn = Callable[[Any, torch.Tensor, torch.Tensor | None], torch.Tensor]

_HEAD_NAMES = ("head", "classifier", "fc")
_FINAL_NORM_NAMES = ("norm", "fc_norm", "layernorm", "post_layernorm", "final_layer_norm", "ln_post")
_BLOCK_NAMES = ("blocks", "layer", "layers", "resblocks")


# ---------------------------------------------------------------------------------------------
# methods: a name -> fn(model, x, target) -> [B, gh, gw]
# ---------------------------------------------------------------------------------------------

def _attention(model, x):
    from ..attention import capture

    with torch.no_grad(), capture(model) as rec:
        model(x)
    if rec.attentions is None:
        raise VitvizError(f"{model.name} ran no self-attention over image tokens; attention maps need a "
                          "Vision Transformer encoder")
    return rec.attentions  # [L, B, H, N, N]


def _rollout(model, x, target):
    from ..analyze import rollout

    return rollout(_attention(model, x))


def _cls(model, x, target):
    from ..analyze import cls_maps

    return cls_maps(_attention(model, x), layer=-1).mean(1)  # [B, gh, gw] heads averaged


def _flow(model, x, target):
    from ..analyze import attention_flow

    return attention_flow(_attention(model, x))


def _relevance(kind: str) -> MapFn:
    def fn(model, x, target):
        from ..explain.relevance import relevance

        return relevance(model, x, target=target, method=kind).detach()
    return fn


def _grid(model, x) -> tuple[int, int]:
    if model.patch_size is not None:
        return model._grid_from_hw(tuple(x.shape[-2:]))
    return model.layout.grid


def _random(model, x, target):
    g = torch.Generator(device="cpu").manual_seed(0)
    return random_maps(x.shape[0], _grid(model, x), generator=g).to(x.device)


def _centre(model, x, target):
    grid = _grid(model, x)
    return centre_prior(grid, device=x.device).expand(x.shape[0], *grid).clone()


METHODS: dict[str, MapFn] = {
    "rollout": _rollout,
    "cls": _cls,
    "relevance": _relevance("chefer"),
    "grad_rollout": _relevance("grad_rollout"),
    "flow": _flow,
    "random": _random,
    "centre": _centre,
}
"""The maps :func:`randomization` and ``vitviz sanity`` know by name: ``fn(model, x, target)``
returning ``[B, gh, gw]``. ``cls`` is the last layer's CLS row, heads averaged; ``random`` (one
fixed random map per image) and ``centre`` (a centre prior) are baselines that ignore the model."""


def get_map_fn(method: str | MapFn) -> MapFn:
    """The map function of a method name (see :data:`METHODS`), or ``method`` itself if callable."""
    if callable(method):
        return method
    if method in METHODS:
        return METHODS[method]
    import difflib

    close = difflib.get_close_matches(str(method), list(METHODS), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise VitvizError(f"unknown map method {method!r}{hint} (known: {', '.join(METHODS)}; or pass a "
                      "function fn(model, x, target) -> [B, gh, gw])")


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------

def as_vision_model(model):
    from ..models import VisionModel, wrap

    return model if isinstance(model, VisionModel) else wrap(model)


def prepare_inputs(model, images) -> torch.Tensor:
    """``[B, 3, H, W]`` on the model's device from a tensor or a list of images; the size is checked.

    Raises:
        LayoutError: an input whose height and width differ from the model's input size.
    """
    if isinstance(images, torch.Tensor):
        x = model.preprocess(images)
    else:
        if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
            images = [images]
        if not images:
            raise VitvizError("no images given")
        x = torch.cat([model.preprocess(im) for im in images])
    if x.dim() != 4 or x.shape[1] != 3:
        raise LayoutError(f"expected images [B, 3, H, W], got {tuple(x.shape)}")
    size = model.input_size
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        raise LayoutError(f"{model.name} takes {size[0]}x{size[1]} inputs, got {x.shape[-2]}x{x.shape[-1]}; "
                          "preprocess the images with model.preprocess (it resizes and crops)")
    return x


def check_classifier(model, score_fn=None, what: str = "this metric") -> None:
    """Refuse a model without a classifier head (timm ``num_classes=0``) unless ``score_fn`` is given.

    Raises:
        VitvizError: naming ``score_fn`` as the way out.
    """
    if score_fn is None and getattr(getattr(model, "module", model), "num_classes", None) == 0:
        raise VitvizError(f"{what} needs class scores, and {getattr(model, 'name', 'the model')} has no "
                          "classifier (num_classes=0); pass score_fn=lambda output: <a [B] tensor of "
                          "per-sample scores>")


def logits_of(output, score_fn=None, what: str = "this metric") -> torch.Tensor:
    """``[B, C]`` logits of a classifier output, or ``[B]`` scores from ``score_fn(output)``.

    Raises:
        VitvizError: the output is not a classifier's and no ``score_fn`` was given.
    """
    from ..models import classifier_logits, describe_output, score_fn_scores

    if score_fn is not None:
        return score_fn_scores(output, score_fn)
    t = classifier_logits(output)
    if t is None:
        raise VitvizError(f"{what} needs a classifier returning logits [B, classes], the model returned "
                          f"{describe_output(output)}; pass score_fn=lambda output: <a [B] tensor of "
                          "per-sample scores>")
    return t


# ---------------------------------------------------------------------------------------------
# which layers, in which order
# ---------------------------------------------------------------------------------------------

Step = tuple[str, list]  # (name, [nn.Module or nn.Parameter, ...])


def _named(module: nn.Module, names: Sequence[str]) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in module.named_modules() if n.rsplit(".", 1)[-1] in names]


def randomization_layers(module: nn.Module) -> list[Step]:
    """The re-initialisation steps of a classifier, top first.

    ``("head", [head, final norms])``, then ``("block i", [block i])`` for the last block down to
    the first, then ``("embeddings", [every parameter not in an earlier step])``. The blocks are the
    longest ``ModuleList`` (or ``Sequential``) named ``blocks`` / ``layer`` / ``layers`` /
    ``resblocks``; the head is a module named ``head``, ``classifier`` or ``fc`` outside them.

    A model without a classifier head (timm ``num_classes=0``) starts with its final norm.

    Raises:
        VitvizError: no blocks were found (pass ``layers=`` to :func:`randomization`).
    """
    lists = [(n, m) for n, m in _named(module, _BLOCK_NAMES)
             if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > 0]
    if not lists:
        raise VitvizError(f"{type(module).__name__}: no transformer blocks found (a ModuleList named "
                          f"{', '.join(_BLOCK_NAMES)}); pass layers=[(name, [modules...]), ...], top first")
    bname, blocks = max(lists, key=lambda nm: len(nm[1]))
    inside = lambda n: n == bname or n.startswith(bname + ".")  # noqa: E731
    heads = [(n, m) for n, m in _named(module, _HEAD_NAMES)
             if not inside(n) and any(True for _ in m.parameters())]
    head = [min(heads, key=lambda nm: nm[0].count("."))[1]] if heads else []
    head += [m for n, m in _named(module, _FINAL_NORM_NAMES)
             if not inside(n) and any(True for _ in m.parameters())]
    steps: list[Step] = [("head" if heads else "final norm", head)] if head else []
    steps += [(f"block {i}", [blocks[i]]) for i in reversed(range(len(blocks)))]
    seen = {id(p) for _, mods in steps for m in mods for p in m.parameters()}
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
        """One dict per step: name and the means over images (NaN-aware)."""
        return [{"step": s, "spearman": float(torch.nanmean(self.spearman[i])),
                 "ssim": float(torch.nanmean(self.ssim[i])), "topk": float(torch.nanmean(self.topk[i]))}
                for i, s in enumerate(self.steps)]


def randomization(model, images, method: str | MapFn = "rollout", *, mode: str = "cascade",
                  layers: Sequence[Step] | None = None, num_steps: int | None = None,
                  seed: int = 0, top_k: int | None = None, batch_size: int = 32,
                  target: torch.Tensor | None = None) -> Randomization:
    """Model-parameter randomisation test of a map method (Adebayo et al. 2018).

    Args:
        model: a :class:`vitviz.VisionModel` (or any module :func:`vitviz.wrap` takes).
        images: ``[B, 3, H, W]`` preprocessed inputs, or a list of images (paths, PIL, arrays).
        method: a name of :data:`METHODS` (``"rollout"``, ``"cls"``, ``"relevance"``,
            ``"grad_rollout"``, ``"flow"``, ``"random"``, ``"centre"``) or
            ``fn(model, x, target) -> [B, gh, gw]``.
        mode: ``"cascade"`` (top down, accumulating) or ``"independent"`` (one step at a time).
        layers: the steps, top first, as ``[(name, [modules or parameters]), ...]``
            (default :func:`randomization_layers`).
        num_steps: only the first ``num_steps`` steps (``0``: the trained model only).
        seed: step ``i`` re-initialises with ``seed + i``.
        top_k: patches of the top-k overlap (default a tenth of the grid, at least 1).
        batch_size: images per forward pass.
        target: ``[B]`` classes explained by relevance methods (default: the trained model's
            prediction).

    Returns:
        :class:`Randomization`; the model's parameters and buffers are unchanged afterwards.

    Raises:
        VitvizError: unknown method or mode, no blocks / head found, ``top_k`` out of range.
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
    needs_target = method in ("relevance", "grad_rollout") or callable(method)
    if target is None and needs_target:
        if not callable(method):
            check_classifier(vm, None, f"randomization of {method}")
        with torch.no_grad():
            out = vm(x)
        if callable(method):
            t = getattr(out, "logits", out)
            target = t.argmax(-1) if isinstance(t, torch.Tensor) and t.dim() == 2 else None
        else:
            target = logits_of(out, what=f"{method}").argmax(-1)  # [B]

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
    name = method if isinstance(method, str) else getattr(method, "__name__", "custom")
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


@dataclass
class SanityReport:
    """What :func:`sanity_check` found, per method.

    Attributes:
        randomization: ``{method: Randomization}`` (cascade).
        tokens: ``{method: Curves}`` token deletion / insertion (MoRF).
        road: ``{method: RoadCurves}`` (only for the first ``road_images`` inputs), may be empty.
        seconds: ``{method: seconds}`` wall time per method.
    """

    randomization: dict
    tokens: dict
    road: dict
    seconds: dict
    n: int = 0

    def rows(self) -> dict:
        """``{method: {column: mean over images}}`` (NaN-aware)."""
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

    def table(self):
        """A :class:`vitviz.zoo.benchmark.Table` (``.format(markdown=True)`` for Markdown)."""
        from ..zoo.benchmark import Table

        return Table(self.rows(), dict(SANITY_COLUMNS), self.n)


def sanity_check(model, images, methods: Sequence[str | MapFn] = DEFAULT_METHODS, *,
                 randomize: bool = True, tokens: bool = True, road_images: int | None = None,
                 steps: int = 16, road_steps: int = 10, seed: int = 0, batch_size: int = 32,
                 score_fn=None, progress: Callable[[str], None] | None = None) -> SanityReport:
    """Randomisation, token deletion / insertion and ROAD for several map methods on the same inputs.

    Args:
        model: a classifier (:class:`vitviz.VisionModel` or module).
        images: ``[B, 3, H, W]`` inputs at the model's size, or a list of images.
        methods: names of :data:`METHODS` or map functions.
        randomize, tokens: run the randomisation cascade / the token curves.
        road_images: ROAD on the first ``road_images`` inputs only (``None``: all; ``0``: none);
            its imputation is the slowest part.
        steps: points of the token curves minus one; road_steps: of the ROAD curves.
        seed: seed of the re-initialisation and of ROAD's noise.
        batch_size: images per map computation (the curves batch ``8 * batch_size`` sequences).
        score_fn: for models without a classifier (token curves and ROAD).
        progress: called with each method's name when it starts.

    Returns:
        :class:`SanityReport`.
    """
    import time

    from .perturbation import road, token_curves

    vm = as_vision_model(model)
    x = prepare_inputs(vm, images)
    b = x.shape[0]
    nr = b if road_images is None else max(0, min(int(road_images), b))
    rand, tok, rd, secs = {}, {}, {}, {}
    with torch.no_grad():
        out = vm(x)
    target = None if score_fn is not None else logits_of(out, what="sanity_check").argmax(-1)  # [B]
    for method in methods:
        name = method if isinstance(method, str) else getattr(method, "__name__", "custom")
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
                            batch_size=8 * batch_size)
        secs[name] = time.perf_counter() - t0
    return SanityReport(rand, tok, rd, secs, b)


__all__ = ["sanity_check", "SanityReport", "SANITY_COLUMNS", "DEFAULT_METHODS", "randomization", "Randomization",
           "randomization_layers", "METHODS", "get_map_fn",
           "restored", "prepare_inputs", "logits_of", "check_classifier"]
