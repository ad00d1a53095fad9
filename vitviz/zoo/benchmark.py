"""Evaluate attention maps against ground truth on the bundled models' held-out scenes (map quality;
the speed benchmarks are in ``benchmarks/``).

For ``shapes-vit`` every registered map method with one map per image (the registry of
:mod:`vitviz.explain`: rollout and its variants, CLS maps per layer, relevance, gradient
rollout, attention flow when its solver is installed, the random and centre baselines, and any
method registered with :func:`vitviz.explain.register_method`) is scored on a fixed set of
held-out scenes with the metrics
of :mod:`vitviz.evaluate.metrics` and deletion / insertion curves
(:mod:`vitviz.evaluate.faithfulness`). For ``shapes-captioner`` the word maps of the teacher-forced
ground-truth captions are scored by word grounding: does the map of a colour or shape word
peak on the object that word names?

Used by ``vitviz benchmark-maps`` and by the tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..evaluate import Table
from ..evaluate.metrics import (
    centre_prior,
    energy_pointing,
    mask_auc,
    mask_iou,
    pointing_game,
    random_maps,
    word_grounding,
)
from ..explain import MethodInput, attentions_of, captured, get_method, list_methods, run_methods, single_map_method
from .scenes import HELDOUT_SEEDS, Scene, make_dataset

# metric name -> (column header, higher is better)
CLASSIFIER_METRICS = {
    "pointing": ("pointing game ↑", True),
    "energy": ("energy in mask ↑", True),
    "iou": ("IoU@0.5 ↑", True),
    "auc": ("mask AUC ↑", True),
    "deletion": ("deletion AUC ↓", False),
    "insertion": ("insertion AUC ↑", True),
}

CLASSIFIER_ROWS: tuple[tuple[str, str, dict], ...] = (
    ("rollout", "rollout", {}),
    ("rollout discard 0.5", "rollout", {"discard_ratio": 0.5}),
    ("rollout discard 0.9", "rollout", {"discard_ratio": 0.9}),
    ("rollout max, discard 0.9", "rollout", {"head_fusion": "max", "discard_ratio": 0.9}),
    ("rollout min", "rollout", {"head_fusion": "min"}),
    ("CLS attention, layer {layer}", "cls", {}),  # one row per layer
    ("relevance (Chefer 2021)", "relevance", {}),
    ("gradient rollout", "grad_rollout", {}),
    ("AttnLRP (Achtibat 2024)", "attnlrp", {}),
    ("CP-LRP (Ali 2022)", "cp-lrp", {}),
    ("attention flow", "flow", {}),
    ("baseline: random", "random", {}),  # seeded with the batch's start
    ("baseline: centre prior", "centre", {}),
)
"""The rows of ``vitviz benchmark-maps`` for a classifier: ``(row name, registered method,
options)``. Registered methods not named here get one row under their own name."""


def _masks(scenes: Sequence[Scene]) -> torch.Tensor:
    return torch.from_numpy(np.stack([s.mask for s in scenes]))  # [B, H, W] bool


def _classifier_rows(methods: Sequence[str] | None) -> list[tuple[str, str, dict]]:
    """``(row, method, options)`` of the chosen methods: the standard rows, then one row per
    other registered method (by default every one with one map per image that does not run
    the model itself)."""
    if methods is None:
        extra = [n for n in list_methods() if get_method(n).single_map
                 and (get_method(n).needs != "model" or get_method(n).explains_class)]
    else:
        extra = list(dict.fromkeys(methods))
        for name in extra:
            get_method(name)  # an unknown name lists the close ones
    rows = [r for r in CLASSIFIER_ROWS if r[1] in extra]
    named = {r[1] for r in CLASSIFIER_ROWS}
    return rows + [(n, n, {}) for n in extra if n not in named]


def classifier_methods(model, x: torch.Tensor, *, relevance: bool = True, flow: bool = True,
                       seed: int = 0, methods: Sequence[str] | None = None
                       ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every map of a batch: ``{row name: [B, gh, gw]}``, and notes on what was left out.

    The maps come from the registry of :mod:`vitviz.explain` (:data:`CLASSIFIER_ROWS`: rollout
    variants, the CLS row of every layer with heads averaged, relevance, gradient rollout,
    attention flow, the baselines; then every other registered method with one map per image).
    The attention methods share one captured forward pass, the grad methods one forward and
    one backward pass.

    Args:
        model: a :class:`vitviz.VisionModel` classifier.
        x: ``[B, 3, H, W]`` inputs.
        relevance: include the grad methods (relevance, gradient rollout).
        flow: include attention flow.
        seed: seed of the random baseline.
        methods: only these registered methods (their standard rows, e.g. every rollout
            variant for ``"rollout"``); default every registered method with one map per image
            that does not run the model itself.

    Returns:
        ``({row name: [B, gh, gw]}, notes)``.

    Raises:
        VitvizError: an unknown or unsuitable method name (a method with a varying number of
            maps per image).
        CaptureError: the model ran no attention over image tokens.
    """
    notes = []
    rows = _classifier_rows(methods)
    chosen = [(row, get_method(name), dict(opts)) for row, name, opts in rows]
    if not relevance:
        if any(m.class_specific for _, m, _ in chosen):
            notes.append("relevance, gradient rollout and LRP were skipped")
        chosen = [c for c in chosen if not c[1].class_specific]
    if not flow:
        if any(m.extra == "flow" for _, m, _ in chosen):
            notes.append("attention flow was skipped")
        chosen = [c for c in chosen if c[1].extra != "flow"]
    for _, m, _ in chosen:
        single_map_method(m, "benchmark-maps")  # one map per image, its extra installed
    for _, m, opts in chosen:
        if m.name == "random":
            opts.setdefault("seed", seed)
    maps: dict[str, torch.Tensor] = {}
    # the attention methods and the baselines: one captured pass, every layer kept (the CLS rows)
    plain = [c for c in chosen if c[1].needs != "grad" and c[1].name != "cls"]
    run = run_methods(model, x, [(m, m.options(o)) for _, m, o in plain], stream=False)
    if any(m.name == "cls" for _, m, _ in chosen):
        rec, output = run.rec, run.output
        if rec is None:  # no other attention method: the pass of the CLS rows
            output, rec = captured(model, x)
        cls = next(m for _, m, _ in chosen if m.name == "cls")
        inp = MethodInput(model, x, rec, output)
        for layer in range(attentions_of(rec, model).num_layers):
            maps[f"CLS attention, layer {layer}"] = cls(inp, layer=layer).maps.mean(1)  # [B, gh, gw] heads averaged
    done = dict(zip((row for row, _, _ in plain), (r.maps for r in run.results)))
    grads = [c for c in chosen if c[1].needs == "grad"]
    if grads:  # one forward and one backward pass of each image's predicted class
        run = run_methods(model, x, [(m, m.options(o)) for _, m, o in grads])
        done.update(zip((row for row, _, _ in grads), (r.maps.detach() for r in run.results)))
    ordered: dict[str, torch.Tensor] = {}
    for row, m, _ in chosen:
        if m.name == "cls":
            ordered.update(maps)
        else:
            found = done[row]
            ordered[row] = found.mean(1) if found.dim() == 4 else found  # [B, gh, gw]
    return ordered, notes


# Insertion starts from a blurred image. RISE's sigma (5 px at 224 px, i.e. 1.4 px at 64 px)
# leaves the shapes recognisable (shapes-vit still scores 91% on such images), which makes every
# insertion curve start high; one patch (8 px) removes the evidence (accuracy 21%, chance 17%).
INSERTION_BLUR_SIGMA = 8.0


def evaluate_classifier(model=None, *, n: int = 200, seeds: Sequence[int] | None = None,
                         batch_size: int = 50, steps: int = 16, deletion: bool = True,
                         blur_sigma: float = INSERTION_BLUR_SIGMA,
                         relevance: bool = True, flow: bool = True, methods: Sequence[str] | None = None,
                         progress: Callable[[int, int], None] | None = None) -> Table:
    """Score every map of ``shapes-vit`` on held-out classification scenes.

    Args:
        model: a :class:`vitviz.VisionModel` (default: the bundled ``shapes-vit``).
        n: number of scenes (the first ``n`` held-out seeds unless ``seeds`` is given).
        seeds: scene seeds.
        batch_size: scenes per forward pass.
        steps: points of the deletion / insertion curves minus one.
        deletion: also compute deletion / insertion AUC (``(steps + 1) * 2`` forward passes per scene
            and method). Deletion fills removed patches with zeros of the normalised input
            (grey); insertion starts from a Gaussian blur of ``blur_sigma`` pixels.
        blur_sigma: blur of the insertion start image (default one patch, see
            :data:`INSERTION_BLUR_SIGMA`).
        relevance, flow: include those analyses when their modules are installed.
        methods: only these registered map methods (see :func:`classifier_methods`).
        progress: called with ``(done, total)`` after every batch.

    Returns:
        :class:`Table` with one row per method; ``extra["accuracy"]`` is the classifier's
        accuracy on the same scenes.

    Raises:
        VitvizError: an unknown method, or one without one map per image.
    """
    from ..evaluate.faithfulness import deletion_insertion
    from ..models.bundled.shapes import to_input

    if model is None:
        from ..models import load_model

        model = load_model("shapes-vit")
    seeds = list(seeds) if seeds is not None else list(HELDOUT_SEEDS)[:n]
    scenes = make_dataset("classification", seeds)
    sums: dict[str, dict[str, float]] = {}
    counts: dict[str, dict[str, int]] = {}
    notes: list[str] = []
    correct = 0
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start:start + batch_size]
        x = to_input(np.stack([s.image for s in chunk]), device=model.device, dtype=model.dtype)
        masks = _masks(chunk).to(x.device)
        labels = torch.tensor([s.label for s in chunk], device=x.device)
        with torch.no_grad():
            logits = model(x)
        correct += int((logits.argmax(-1) == labels).sum())
        maps, notes = classifier_methods(model, x, relevance=relevance, flow=flow, seed=start, methods=methods)
        for name, m in maps.items():
            m = m.detach().float()
            vals = {"pointing": pointing_game(m, masks), "iou": mask_iou(m, masks),
                    "auc": mask_auc(m, masks)}
            if (m >= 0).all():
                vals["energy"] = energy_pointing(m, masks)
            if deletion:
                curves = deletion_insertion(model, x, m, target=labels, steps=steps, blur_sigma=blur_sigma,
                                            batch_size=max(64, batch_size * 2))
                vals["deletion"] = curves.deletion_auc
                vals["insertion"] = curves.insertion_auc
            row, cnt = sums.setdefault(name, {}), counts.setdefault(name, {})
            for k, v in vals.items():
                v = v[~torch.isnan(v)]
                row[k] = row.get(k, 0.0) + float(v.sum())
                cnt[k] = cnt.get(k, 0) + int(v.numel())
        if progress is not None:
            progress(min(start + batch_size, len(scenes)), len(scenes))
    rows = {name: {k: s / max(1, counts[name][k]) for k, s in r.items()} for name, r in sums.items()}
    table = Table(rows, dict(CLASSIFIER_METRICS), len(scenes), notes)
    table.extra["accuracy"] = correct / len(scenes)
    return table


def evaluate_sanity(model=None, *, n: int = 200, seeds: Sequence[int] | None = None,
                    methods: Sequence[str] | None = None, road_images: int | None = 20,
                    steps: int = 16, road_steps: int = 10, batch_size: int = 50,
                    progress: Callable[[str], None] | None = None, tokens: bool = True,
                    leave_out: Sequence[str] = (), on_note: Callable[[str], None] | None = None) -> Table:
    """Sanity checks of every map method of ``shapes-vit`` on held-out scenes.

    Model-parameter randomisation (cascade, Adebayo et al. 2018), token deletion / insertion
    and ROAD (on the first ``road_images`` scenes: its imputation is the slow part) for
    rollout, CLS attention (last layer), relevance, gradient rollout, attention flow and the
    random and centre baselines; see :func:`vitviz.evaluate.sanity.sanity_check`. Attention
    flow is left out, with a note, when its extra (``vitviz[flow]``) is not installed.

    Args:
        model: the classifier (default: the bundled ``shapes-vit``).
        n: held-out scenes (the first ``n`` of :data:`HELDOUT_SEEDS`), unless ``seeds`` is given.
        seeds: the scenes' seeds.
        methods: registered map methods (each must run; a missing extra raises); default: those
            of :data:`vitviz.evaluate.sanity.DEFAULT_METHODS` that are installed and run.
        road_images: ROAD on the first ``road_images`` scenes (``None``: all; ``0``: none).
        steps, road_steps: points of the token and ROAD curves minus one.
        batch_size: images per map computation.
        progress: called with each method's name when it starts.
        tokens: compute the token deletion / insertion curves.
        leave_out: default methods not to run (``--no-flow``, ``--no-relevance``).
        on_note: called with each note (a method or the token curves left out, and why).

    Returns:
        :class:`Table` with the columns of :data:`vitviz.evaluate.sanity.SANITY_COLUMNS`;
        ``notes`` says what was left out; ``extra["seconds"]`` holds the time per method and
        ``extra["road_images"]`` the count.

    Raises:
        VitvizError: an unknown method, or one that cannot run on the model.
        MissingExtraError: a named method's optional package is not installed.
    """
    from ..evaluate.sanity import DEFAULT_METHODS, sanity_check
    from ..models.bundled.shapes import to_input

    if model is None:
        from ..models import load_model

        model = load_model("shapes-vit")
    seeds = list(seeds) if seeds is not None else list(HELDOUT_SEEDS)[:n]
    scenes = make_dataset("classification", seeds)
    x = to_input(np.stack([s.image for s in scenes]), device=model.device, dtype=model.dtype)
    rep = sanity_check(model, x, None if methods is None else list(methods), road_images=road_images,
                       steps=steps, road_steps=road_steps, tokens=tokens, batch_size=batch_size, progress=progress,
                       on_note=on_note, defaults=[m for m in DEFAULT_METHODS if m not in set(leave_out)])
    table = rep.table()
    table.extra["seconds"] = rep.seconds
    table.extra["road_images"] = min(len(scenes), road_images if road_images is not None else len(scenes))
    return table


def evaluate_captioner(model=None, *, n: int = 200, seeds: Sequence[int] | None = None,
                        batch_size: int = 50,
                        progress: Callable[[int, int], None] | None = None) -> Table:
    """Word grounding of ``shapes-captioner``'s cross-attention on held-out caption scenes.

    The ground-truth caption is teacher-forced; the map of word ``t`` is the cross-attention
    of the decoder query that predicts it (the query reading word ``t - 1``), as in
    :func:`vitviz.caption`. Scored: colour and shape words, each against the mask of the
    object it names (pointing game), per decoder layer with heads averaged, also composed
    with the encoder's rollout, against the random and centre baselines.

    Returns:
        :class:`Table` with one row per map kind and the column ``"grounding"`` (plus
        ``"grounding_colour"`` and ``"grounding_shape"``); ``extra`` holds the greedy caption
        exact-match rate on the same scenes.
    """
    from ..analyze import rollout_matrix
    from ..models.bundled.shapes import caption_ids, to_input
    from .scenes import COLOURS, SHAPES

    if model is None:
        from ..models import load_model

        model = load_model("shapes-captioner")
    tok = model.tokenizer
    module = model.module
    seeds = list(seeds) if seeds is not None else list(HELDOUT_SEEDS)[:n]
    scenes = make_dataset("caption", seeds)
    bos = tok.get_vocab()["[BOS]"]
    hits: dict[str, dict[str, list]] = {}
    exact = 0

    def add(method, kind, values):
        hits.setdefault(method, {}).setdefault(kind, []).extend(values)

    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start:start + batch_size]
        x = to_input(np.stack([s.image for s in chunk]), device=model.device, dtype=model.dtype)
        ids = caption_ids([s.caption for s in chunk], tok).to(x.device)  # [B, T] words, EOS, PAD
        dec_in = torch.cat([torch.full_like(ids[:, :1], bos), ids[:, :-1]], 1)  # [B, T]
        _, rec = captured(model, x, forward=lambda pixels, ids=dec_in: module(
            pixel_values=pixels, decoder_input_ids=ids, decoder_attention_mask=torch.ones_like(ids)))
        with torch.no_grad():
            gen = module.generate(pixel_values=x, max_new_tokens=ids.shape[1])
        texts = tok.batch_decode(gen, skip_special_tokens=True)
        exact += sum(int(t.split() == s.words) for t, s in zip(texts, chunk))
        cross = rec.cross  # [L, B, H, T, Ni]
        layout = cross.layout
        p = layout.num_prefix
        fused = cross.tensor.float().mean(2)  # [L, B, T, Ni]
        roll = rollout_matrix(attentions_of(rec, model))  # [B, Ni, Ni]
        candidates = {f"cross-attention, layer {i}": fused[i] for i in range(fused.shape[0])}
        candidates["cross-attention, mean of layers"] = fused.mean(0)
        candidates["last layer ∘ encoder rollout"] = fused[-1] @ roll  # [B, T, Ni]
        g = torch.Generator(device="cpu").manual_seed(start)
        for b, s in enumerate(chunk):
            t = len(s.words)
            masks = s.word_masks()
            kinds = ["colour" if w in COLOURS else "shape" if w in SHAPES else None for w in s.words]
            mt = [torch.from_numpy(m).to(x.device) if m is not None else None for m in masks]
            per = {name: c[b, :t, p:].reshape(t, *layout.grid) for name, c in candidates.items()}
            per["baseline: random"] = random_maps(t, layout.grid, generator=g).to(x.device)
            per["baseline: centre prior"] = centre_prior(layout.grid, device=x.device).expand(t, *layout.grid)
            for name, maps in per.items():
                score = word_grounding(maps, mt)  # [T]
                for k, v in zip(kinds, score.tolist()):
                    if k is not None:
                        add(name, "grounding", [v])
                        add(name, f"grounding_{k}", [v])
        if progress is not None:
            progress(min(start + batch_size, len(scenes)), len(scenes))
    rows = {name: {k: float(np.mean(v)) for k, v in r.items()} for name, r in hits.items()}
    cols = {"grounding": ("word grounding ↑", True), "grounding_colour": ("colour words ↑", True),
            "grounding_shape": ("shape words ↑", True)}
    table = Table(rows, cols, len(scenes))
    table.extra["exact_match"] = exact / len(scenes)
    return table
