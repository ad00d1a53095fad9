"""`vitviz flow`: attention flow (max-flow through the attention graph) per image."""

from __future__ import annotations

from ._common import (add_model_arguments, add_render_arguments, check_render_arguments, fail, load,
                      report)
from .cls import QUERY_HELP, parse_query

NAME = "flow"
HELP = "attention flow (Abnar & Zuidema 2020) per image, next to rollout"
DESCRIPTION = ("Attention flow: the maximum flow from the CLS token through the attention graph "
               "(residual included) to every patch, normalised. Writes <name>_flow.png (overlay), "
               "<name>_flow.npy (raw patch map) and <name>_flow_panels.png (image | rollout | flow).")
EXAMPLE = "vitviz flow cat.jpg --model b16 --out maps/"


def add_arguments(p) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE")
    add_model_arguments(p)
    p.add_argument("--query", default="auto", metavar="Q", help=QUERY_HELP)
    p.add_argument("--head-fusion", choices=["mean", "max", "min"], default="mean")
    p.add_argument("--start-layer", type=int, default=0, metavar="L")
    add_render_arguments(p)


def run(args) -> int:
    bad = check_render_arguments(args)
    if bad is not None:
        return bad
    try:
        query = parse_query(args.query)
    except ValueError as e:
        return fail(str(e))
    from .._extras import require_extra

    require_extra("flow", "vitviz flow")  # before the model loads: one line, exit status 2
    from pathlib import Path

    from .._io import save_npy, save_png
    from ..analyze.flow import attention_flow
    from ..analyze.rollout import rollout
    from ..render.figures import panels, save_figure
    from ..render.overlay import overlay
    from .cls import iter_captures

    model = load(args)
    out = Path(args.out)
    outcomes = []
    for o, stem, view, attn in iter_captures(model, args.images, batch_size=args.batch_size, desc="flow"):
        outcomes.append(o)
        if o.error:
            continue
        try:
            flow = attention_flow(attn, query=query, head_fusion=args.head_fusion,
                                  start_layer=args.start_layer, progress=True)[0]  # [gh, gw]
            roll = rollout(attn, head_fusion=args.head_fusion, start_layer=args.start_layer)[0]  # [gh, gw]
        except ValueError as e:
            return fail(str(e))
        heat = flow.cpu().numpy()
        o.outputs.append(save_npy(out / f"{stem}_flow.npy", heat))
        fig, _ = panels(view, {"rollout": roll, "attention flow": flow}, cmap=args.cmap, alpha=args.alpha)
        o.outputs.append(save_figure(fig, out / f"{stem}_flow_panels.png"))
        o.outputs.append(save_png(out / f"{stem}_flow.png", overlay(view, heat, cmap=args.cmap, alpha=args.alpha)))
    return report(outcomes)
