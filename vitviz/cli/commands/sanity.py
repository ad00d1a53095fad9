"""`vitviz sanity`: does the map depend on the model? Randomisation, token deletion, ROAD."""

from __future__ import annotations

import sys

from ._common import add_model_arguments, fail, load

NAME = "sanity"
HELP = "sanity checks of map methods: model randomisation, token deletion/insertion, ROAD"
DESCRIPTION = (
    "For each method: the model is re-initialised from the top (head, last block, ..., embeddings; "
    "Adebayo et al. 2018) and the rank correlation / SSIM / top-k overlap with the trained map is "
    "reported (a good map changes: low is good); patch tokens are dropped (deletion) or added back "
    "(insertion) in the map's order; ROAD (Rong et al. 2022) removes pixels with noisy linear "
    "imputation, most (MoRF) and least (LeRF) relevant first. Baselines: a random map and a centre "
    "prior. Prints a table and writes sanity_randomization.png (maps per step, first image), "
    "sanity_curves.png and sanity_table.md into --out.")
EXAMPLE = "vitviz sanity cat.jpg dog.jpg --model b16 --methods rollout,relevance --road-images 2"


def add_arguments(p) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE")
    add_model_arguments(p)
    p.add_argument("--methods", default="rollout,cls,relevance,grad_rollout,flow,random,centre",
                   help="comma-separated registered map methods with one map per image (see `vitviz methods`; "
                        "cls: its heads averaged); default: rollout,cls,relevance,grad_rollout,flow,random,centre")
    p.add_argument("--steps", type=int, default=16, metavar="S", help="token curve points minus one")
    p.add_argument("--road-steps", type=int, default=10, metavar="S", help="ROAD curve points minus one")
    p.add_argument("--road-images", type=int, default=None, metavar="N",
                   help="ROAD on the first N images only (default all; 0 skips ROAD, the slowest part)")
    p.add_argument("--no-randomization", action="store_true", help="skip the randomisation cascade")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, metavar="N")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument("--out", default="vitviz-out", metavar="DIR")


def run(args) -> int:
    if args.batch_size < 1:
        return fail(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.steps < 1 or args.road_steps < 1:
        return fail("--steps and --road-steps must be >= 1")
    if args.road_images is not None and args.road_images < 0:
        return fail(f"--road-images must be >= 0, got {args.road_images}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    from ...explain import get_method, list_methods

    fit = [n for n in list_methods() if get_method(n).single_map]  # the registry: one map per image
    unknown = [m for m in methods if m not in fit]
    if not methods or unknown:
        return fail(f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(fit)} "
                    "(see `vitviz methods`)")
    for m in methods:
        get_method(m).check_installed(f"the map method {m!r}")  # a missing extra fails before the model loads
    import time
    from pathlib import Path

    import torch

    from ..._util.files import atomic_write_bytes
    from ...batch import load_batches
    from ...evaluate.sanity import sanity_check
    from ...render.figures import save_figure
    from ...render.sanity_figures import curves_figure, randomization_grid

    model = load(args)
    xs, views, skipped = [], [], []
    for items, x in load_batches(model, args.images, batch_size=args.batch_size, desc="load"):
        for it in items:
            if it.view is None:
                skipped.append(it.outcome)
            else:
                views.append(it.view)
        if x is not None:
            xs.append(x)
    for o in skipped:
        print(f"vitviz: skipped {o.source}: {o.error}", file=sys.stderr)
    if not xs:
        return fail("no readable images")
    x = torch.cat(xs)
    t0 = time.time()
    rep = sanity_check(model, x, methods, randomize=not args.no_randomization, road_images=args.road_images,
                       steps=args.steps, road_steps=args.road_steps, seed=args.seed,
                       batch_size=args.batch_size,
                       progress=lambda name: print(f"[{time.time() - t0:6.1f} s] {name}", file=sys.stderr))
    table = rep.table()
    text = table.format(markdown=args.markdown)
    print(f"{model.name}, {x.shape[0]} images (ROAD on {len(next(iter(rep.road.values())).morf) if rep.road else 0})")
    print(text)
    out = Path(args.out)
    written = [atomic_write_bytes(out / "sanity_table.md", (table.format(markdown=True) + "\n").encode())]
    if not args.no_randomization:
        fig, _ = randomization_grid(rep.randomization, views[0], index=0)
        written.append(save_figure(fig, out / "sanity_randomization.png"))
    fig, _ = curves_figure(rep)
    written.append(save_figure(fig, out / "sanity_curves.png"))
    for w in written:
        print(f"-> {w}", file=sys.stderr)
    print(f"({time.time() - t0:.0f} s; " + ", ".join(f"{k} {v:.1f} s" for k, v in rep.seconds.items()) + ")",
          file=sys.stderr)
    return 1 if skipped else 0
