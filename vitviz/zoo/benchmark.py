"""Evaluate attention maps against ground truth on the bundled models' held-out scenes (map quality;
the speed benchmarks are in ``benchmarks/``).

For ``shapes-vit`` every analysis vitviz offers (rollout and its variants, CLS maps per
layer, relevance and attention flow when those modules are installed) and two baselines (a
random map and a centre prior) are scored on a fixed set of held-out scenes with the metrics
of :mod:`vitviz.evaluate.metrics` and deletion / insertion curves
(:mod:`vitviz.evaluate.faithfulness`). For ``shapes-captioner`` the word maps of the teacher-forced
ground-truth captions are scored by word grounding: does the map of a colour or shape word
peak on the object that word names?

Used by ``vitviz benchmark-maps`` and by the tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..evaluate.metrics import (
    centre_prior,
    energy_pointing,
    mask_auc,
    mask_iou,
    pointing_game,
    random_maps,
    word_grounding,
)
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


@dataclass
class Table:
    """Rows of ``method -> {metric: mean}`` with the number of scenes scored."""

    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    columns: dict[str, tuple[str, bool]] = field(default_factory=dict)
    n: int = 0
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def format(self, markdown: bool = False) -> str:
        """The table as fixed-width text (or a Markdown table)."""
        cols = [c for c in self.columns if any(c in r for r in self.rows.values())]
        heads = ["method"] + [self.columns[c][0] for c in cols]
        body = [[name] + [f"{r[c]:.3f}" if c in r and not math.isnan(r[c]) else "-" for c in cols]
                for name, r in self.rows.items()]
        if markdown:
            lines = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
            lines += ["| " + " | ".join(row) + " |" for row in body]
            return "\n".join(lines)
        widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(heads)]
        fmt = lambda row: "  ".join(v.ljust(widths[0]) if i == 0 else v.rjust(widths[i])  # noqa: E731
                                    for i, v in enumerate(row))
        lines = [fmt(heads), "  ".join("-" * w for w in widths)] + [fmt(row) for row in body]
        return "\n".join(lines)


def _masks(scenes: Sequence[Scene]) -> torch.Tensor:
    return torch.from_numpy(np.stack([s.mask for s in scenes]))  # [B, H, W] bool


def classifier_methods(model, x: torch.Tensor, *, relevance: bool = True, flow: bool = True,
                       seed: int = 0) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every map of a batch: ``{method name: [B, gh, gw]}``, and notes on what was left out."""
    from ..analyze import attention_flow, cls_maps, rollout
    from ..attention import capture
    from ..explain.relevance import relevance as explain_relevance

    notes = []
    with torch.no_grad(), capture(model) as rec:
        model(x)
    attn = rec.attentions  # [L, B, H, N, N]
    b = x.shape[0]
    grid = attn.layout.grid
    maps: dict[str, torch.Tensor] = {}
    maps["rollout"] = rollout(attn)
    maps["rollout discard 0.5"] = rollout(attn, discard_ratio=0.5)
    maps["rollout discard 0.9"] = rollout(attn, discard_ratio=0.9)
    maps["rollout max, discard 0.9"] = rollout(attn, head_fusion="max", discard_ratio=0.9)
    maps["rollout min"] = rollout(attn, head_fusion="min")
    for layer in range(attn.num_layers):
        maps[f"CLS attention, layer {layer}"] = cls_maps(attn, layer=layer).mean(1)  # [B, gh, gw]
    if relevance:
        maps["relevance (Chefer 2021)"] = explain_relevance(model, x, method="chefer")
        maps["gradient rollout"] = explain_relevance(model, x, method="grad_rollout")
    else:
        notes.append("relevance and gradient rollout were skipped")
    if flow:
        maps["attention flow"] = attention_flow(attn)
    else:
        notes.append("attention flow was skipped")
    g = torch.Generator(device="cpu").manual_seed(seed)
    maps["baseline: random"] = random_maps(b, grid, generator=g).to(x.device)
    maps["baseline: centre prior"] = centre_prior(grid, device=x.device).expand(b, *grid)
    return maps, notes


# Insertion starts from a blurred image. RISE's sigma (5 px at 224 px, i.e. 1.4 px at 64 px)
# leaves the shapes recognisable (shapes-vit still scores 91% on such images), which makes every
# insertion curve start high; one patch (8 px) removes the evidence (accuracy 21%, chance 17%).
INSERTION_BLUR_SIGMA = 8.0


def evaluate_classifier(model=None, *, n: int = 200, seeds: Sequence[int] | None = None,
                         batch_size: int = 50, steps: int = 16, deletion: bool = True,
                         blur_sigma: float = INSERTION_BLUR_SIGMA,
                         relevance: bool = True, flow: bool = True,
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
        progress: called with ``(done, total)`` after every batch.

    Returns:
        :class:`Table` with one row per method; ``extra["accuracy"]`` is the classifier's
        accuracy on the same scenes.
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
        maps, notes = classifier_methods(model, x, relevance=relevance, flow=flow, seed=start)
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
                     progress: Callable[[str], None] | None = None) -> Table:
    """Sanity checks of every map method of ``shapes-vit`` on held-out scenes.

    Model-parameter randomisation (cascade, Adebayo et al. 2018), token deletion / insertion
    and ROAD (on the first ``road_images`` scenes: its imputation is the slow part) for
    rollout, CLS attention (last layer), relevance, gradient rollout, attention flow and the
    random and centre baselines; see :func:`vitviz.evaluate.sanity.sanity_check`.

    Returns:
        :class:`Table` with the columns of :data:`vitviz.evaluate.sanity.SANITY_COLUMNS`;
        ``extra["seconds"]`` holds the time per method and ``extra["road_images"]`` the count.
    """
    from ..evaluate.sanity import DEFAULT_METHODS, sanity_check
    from ..models.bundled.shapes import to_input

    if model is None:
        from ..models import load_model

        model = load_model("shapes-vit")
    seeds = list(seeds) if seeds is not None else list(HELDOUT_SEEDS)[:n]
    scenes = make_dataset("classification", seeds)
    x = to_input(np.stack([s.image for s in scenes]), device=model.device, dtype=model.dtype)
    rep = sanity_check(model, x, list(methods or DEFAULT_METHODS), road_images=road_images, steps=steps,
                       road_steps=road_steps, batch_size=batch_size, progress=progress)
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
    from ..analyze.rollout import rollout_matrix
    from ..attention import capture
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
        with torch.no_grad(), capture(model) as rec:
            module(pixel_values=x, decoder_input_ids=dec_in, decoder_attention_mask=torch.ones_like(dec_in))
        with torch.no_grad():
            gen = module.generate(pixel_values=x, max_new_tokens=ids.shape[1])
        texts = tok.batch_decode(gen, skip_special_tokens=True)
        exact += sum(int(t.split() == s.words) for t, s in zip(texts, chunk))
        cross = rec.cross  # [L, B, H, T, Ni]
        layout = cross.layout
        p = layout.num_prefix
        fused = cross.tensor.float().mean(2)  # [L, B, T, Ni]
        roll = rollout_matrix(rec.attentions)  # [B, Ni, Ni]
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
