"""`vitviz flow`: attention flow (max-flow through the attention graph) per image."""

from __future__ import annotations

from ._common import (
    add_model_arguments,
    add_naming_argument,
    add_render_arguments,
    check_render_arguments,
    fail,
    load,
    model_tag,
    output_options,
    print_notes,
    report,
    with_model,
)
from .cls import QUERY_HELP, parse_query

NAME = "flow"
HELP = "attention flow (Abnar & Zuidema 2020) per image, next to rollout"
DESCRIPTION = ("Attention flow: the maximum flow from the CLS token through the attention graph "
               "(residual included) to every patch, normalised. Writes <name>_flow.png (overlay), "
               "<name>_flow.npy (raw patch map) and <name>_flow_panels.png (image | rollout | flow); "
               "--name-with-model puts the model after <name>. Prints every file written.")
EXAMPLE = "vitviz flow cat.jpg --model b16 --out maps/"


def add_arguments(p) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE")
    add_model_arguments(p)
    p.add_argument("--query", default="auto", metavar="Q", help=QUERY_HELP)
    p.add_argument("--head-fusion", choices=["mean", "max", "min"], default="mean")
    p.add_argument("--start-layer", type=int, default=0, metavar="L")
    add_render_arguments(p)
    add_naming_argument(p)


def run(args) -> int:
    bad = check_render_arguments(args)
    if bad is not None:
        return bad
    try:
        query = parse_query(args.query)
    except ValueError as e:
        return fail(str(e))
    from ..._util.extras import require_extra

    require_extra("flow", "vitviz flow")  # before the model loads: one line, exit status 2
    from pathlib import Path

    from ..._util.files import save_npy
    from ...analyze import rollout
    from ...analyze.flow import attention_flow
    from ...batch import iter_captures
    from ...render import display_image
    from ...render.figures import panels

    output = output_options(args)
    model = load(args)
    out = Path(args.out)
    tag = model_tag(args)
    outcomes, waiting = [], []  # waiting: (outcome, stem, view, flow, roll) for --norm batch
    depth = [0]  # layers of the captured attention (for the title)

    def render(o, stem, view, heat, roll, s_flow, s_roll):
        fig, _ = panels(display_image(view, output.size), {"rollout": roll, "attention flow": heat},
                        cmap=output.cmap, alpha=output.alpha, smooth=output.smooth, norm=output.norm,
                        vmin=[s_roll.vmin, s_flow.vmin], vmax=[s_roll.vmax, s_flow.vmax],
                        colorbar=output.colorbar, dpi=output.dpi)
        o.outputs.append(output.save_figure(fig, out / f"{stem}_flow_panels"))
        head = f"attention flow · {model.name} · layers {args.start_layer}–{depth[0] - 1}"
        title = f"{head}\npredicted: {o.prediction}" if o.prediction else head
        o.outputs.append(output.save_overlay(out / f"{stem}_flow", view, heat, s_flow, label="attention flow",
                                             title=title))

    for o, stem, view, attn in iter_captures(model, args.images, batch_size=args.batch_size, desc="flow"):
        outcomes.append(o)
        if o.error:
            continue
        stem = with_model(stem, tag)
        depth[0] = list(attn.layers)[-1] + 1 if attn.layers is not None else attn.num_layers
        try:
            flow = attention_flow(attn, query=query, head_fusion=args.head_fusion,
                                  start_layer=args.start_layer, progress=True)[0]  # [gh, gw]
            roll = rollout(attn, head_fusion=args.head_fusion, start_layer=args.start_layer)[0]  # [gh, gw]
        except ValueError as e:
            return fail(str(e))
        heat, roll = flow.cpu().numpy(), roll.cpu().numpy()
        o.outputs.append(save_npy(out / f"{stem}_flow.npy", heat))
        if output.norm == "batch":
            waiting.append((o, stem, view, heat, roll))
        else:
            render(o, stem, view, heat, roll, output.scales([heat])[0], output.scales([roll])[0])
    if waiting:
        s_flow = output.scales([w[3] for w in waiting])
        s_roll = output.scales([w[4] for w in waiting])
        for w, sf, sr in zip(waiting, s_flow, s_roll):
            render(*w, sf, sr)
    print_notes(output)
    return report(outcomes)
