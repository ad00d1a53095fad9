"""`vitviz heads`: per-head statistics: attention distance, entropy, share of attention on prefix tokens."""

from __future__ import annotations

from ._common import (
    add_model_arguments,
    add_naming_argument,
    add_output_arguments,
    check_output_arguments,
    load,
    model_tag,
    output_options,
    report,
    with_model,
)

NAME = "heads"
HELP = "per-head statistics: mean attention distance, entropy, attention on prefix tokens"
DESCRIPTION = ("Per layer and head: the mean attention distance in pixels (the ViT paper's plot; "
               "patch queries and keys only, weights renormalised over the patches), the mean "
               "entropy of the attention rows (nats) and the share of patch attention that goes to "
               "prefix tokens (CLS/distillation/registers). Writes <name>_heads.png and "
               "<name>_heads.json per image, and heads_mean.png / heads_mean.json averaged over all "
               "images when there are several; --name-with-model puts the model after <name> "
               "(heads_mean_<model>). Prints every file written.")
EXAMPLE = "vitviz heads photos/*.jpg --model b16 --out heads/"


def add_arguments(p) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE")
    add_model_arguments(p)
    p.add_argument("--batch-size", type=int, default=8, metavar="N")
    p.add_argument("--out", default="vitviz-out", metavar="DIR")
    add_output_arguments(p, maps=False)
    add_naming_argument(p)


def _figure(dist, ent, share, unit: str, title: str, dpi: int = 100):
    from ...render.figures import MAX_ASPECT, distance_plot, entropy_heatmap, heatmap, new_figure, wrap

    num_layers, num_heads = dist.shape
    cols = 3 if share is not None else 2
    width_in = 4.6 * cols + 0.6 + 0.3 * max(0, num_heads - 12)
    height_in = max(1.6 + max(4.2, 0.3 * num_layers), width_in / MAX_ASPECT)  # never wider than 3x its height
    fig = new_figure(width_in * dpi, height_in * dpi, dpi)  # constrained layout
    axes = fig.subplots(1, cols)
    distance_plot(dist, unit=unit, ax=axes[0])
    entropy_heatmap(ent, ax=axes[1])
    if share is not None:
        heatmap(share, label="share of attention", title="Patch attention on prefix tokens",
                cmap="cividis", vmin=0.0, vmax=1.0, ax=axes[2])
    fig.suptitle(wrap(title, width_in * dpi * 0.9, 12, dpi))
    return fig


def _summary(dist, ent, share, unit: str) -> dict:
    return {"distance_unit": unit, "mean_attention_distance": dist.tolist(),
            "entropy_nats": ent.tolist(),
            "prefix_attention_share": share.tolist() if share is not None else None}


def run(args) -> int:
    import json
    from pathlib import Path

    import torch

    from ..._util.files import atomic_write_bytes
    from ...analyze.stats import attention_entropy, mean_attention_distance, prefix_attention_share
    from ...batch import iter_captures

    bad = check_output_arguments(args)
    if bad is not None:
        return bad
    output = output_options(args)
    model = load(args)
    patch = model.patch_size
    unit = "pixels" if patch is not None else "patches"
    out = Path(args.out)
    tag = model_tag(args)
    outcomes, totals = [], []
    for o, stem, _view, attn in iter_captures(model, args.images, batch_size=args.batch_size, desc="heads"):
        outcomes.append(o)
        if o.error:
            continue
        dist = mean_attention_distance(attn, patch_size=patch)[:, 0]  # [L, H]
        ent = attention_entropy(attn)[:, 0]  # [L, H]
        share = prefix_attention_share(attn)[:, 0] if attn.layout.num_prefix else None  # [L, H]
        totals.append((dist, ent, share))
        stem = with_model(stem, tag)
        body = json.dumps({"image": o.source, **_summary(dist, ent, share, unit)}, indent=1)
        o.outputs.append(atomic_write_bytes(out / f"{stem}_heads.json", body.encode()))
        fig = _figure(dist, ent, share, unit, Path(o.source).name, output.dpi)
        o.outputs.append(output.save_figure(fig, out / f"{stem}_heads"))
    code = report(outcomes)
    if len(totals) > 1:
        dist = torch.stack([t[0] for t in totals]).mean(0)
        ent = torch.stack([t[1] for t in totals]).mean(0)
        share = torch.stack([t[2] for t in totals]).mean(0) if totals[0][2] is not None else None
        body = json.dumps({"images": [o.source for o in outcomes if o.ok], **_summary(dist, ent, share, unit)},
                          indent=1)
        mean = with_model("heads_mean", tag)
        js = atomic_write_bytes(out / f"{mean}.json", body.encode())
        png = output.save_figure(_figure(dist, ent, share, unit, f"mean over {len(totals)} images",
                                         output.dpi), out / mean)
        print(f"{len(totals)} images -> {js}")
        print(f"{len(totals)} images -> {png}")
    return code
