"""`vitviz sanity`: does the map depend on the model? Randomisation, token deletion, ROAD."""

from __future__ import annotations

import sys

from ._common import (
    add_look_arguments,
    add_model_arguments,
    add_output_arguments,
    check_alpha_argument,
    check_output_arguments,
    fail,
    load,
    output_options,
)

NAME = "sanity"
HELP = "sanity checks of map methods: model randomisation, token deletion/insertion, ROAD"
DESCRIPTION = (
    "For each method: the model is re-initialised from the top (head, last block, ..., embeddings; "
    "Adebayo et al. 2018) and the rank correlation / SSIM / top-k overlap with the trained map is "
    "reported (a good map changes: low is good); patch tokens are dropped (deletion) or added back "
    "(insertion) in the map's order; ROAD (Rong et al. 2022) removes pixels with noisy linear "
    "imputation, most (MoRF) and least (LeRF) relevant first. Baselines: a random map and a centre "
    "prior. Without --methods, the methods the model allows: on models whose stages have several "
    "token grids (Swin, PVT ...) rollout, relevance, gradient rollout and flow are left out and CLS "
    "maps read the last stage; flow is left out when its extra is not installed; each one left out "
    "gets a one-line note. Token deletion needs a token slot (timm / transformers ViTs); elsewhere "
    "it is skipped with a note, and the randomisation and ROAD still run. Prints a table and writes "
    "sanity_randomization.png (maps per step, first image), sanity_curves.png (in --format) and "
    "sanity_table.md into --out.")
EXAMPLE = "vitviz sanity cat.jpg dog.jpg --model b16 --methods rollout,relevance --road-images 2"


def add_arguments(p) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE")
    add_model_arguments(p)
    p.add_argument("--methods", default=None, metavar="LIST",
                   help="comma-separated registered map methods with one map per image (see `vitviz methods`; "
                        "cls: its heads averaged); each must run on the model, or exit status 2 before any "
                        "work. Default: those of rollout,cls,relevance,grad_rollout,flow,random,centre that "
                        "the model's token grids allow and that are installed (a note for each one left out)")
    p.add_argument("--steps", type=int, default=16, metavar="S", help="token curve points minus one")
    p.add_argument("--road-steps", type=int, default=10, metavar="S", help="ROAD curve points minus one")
    p.add_argument("--road-images", type=int, default=None, metavar="N",
                   help="ROAD on the first N images only (default all; 0 skips ROAD, the slowest part)")
    p.add_argument("--no-randomization", action="store_true", help="skip the randomisation cascade")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, metavar="N")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument("--out", default="vitviz-out", metavar="DIR")
    add_look_arguments(p)
    add_output_arguments(p, maps=False)


def run(args) -> int:
    if args.batch_size < 1:
        return fail(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.steps < 1 or args.road_steps < 1:
        return fail("--steps and --road-steps must be >= 1")
    if args.road_images is not None and args.road_images < 0:
        return fail(f"--road-images must be >= 0, got {args.road_images}")
    bad = check_alpha_argument(args) or check_output_arguments(args)
    if bad is not None:
        return bad
    from ...explain import get_method, list_methods

    methods = None  # the defaults the model allows (sanity_check chooses them, with a note for each left out)
    if args.methods is not None:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
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
    from ...render.sanity_figures import curves_figure, randomization_grid

    output = output_options(args)
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
                       progress=lambda name: print(f"[{time.time() - t0:6.1f} s] {name}", file=sys.stderr),
                       on_note=lambda note: print(f"vitviz: note: {note}", file=sys.stderr))
    table = rep.table()
    text = table.format(markdown=args.markdown)
    print(f"{model.name}, {x.shape[0]} images (ROAD on {len(next(iter(rep.road.values())).morf) if rep.road else 0})")
    print(text)
    out = Path(args.out)
    md = table.format(markdown=True) + "\n" + "".join(f"\n- note: {n}" for n in rep.notes) + ("\n" if rep.notes else "")
    written = [atomic_write_bytes(out / "sanity_table.md", md.encode())]  # with what was left out, and why
    if not args.no_randomization:
        fig, _ = randomization_grid(rep.randomization, views[0], index=0, cmap=output.cmap, alpha=output.alpha,
                                    smooth=output.smooth, dpi=output.dpi)
        written.append(output.save_figure(fig, out / "sanity_randomization"))
    if rep.tokens or rep.road:
        fig, _ = curves_figure(rep, dpi=output.dpi)
        written.append(output.save_figure(fig, out / "sanity_curves"))
    else:
        print("vitviz: note: no curves to draw (no token curves on this model and --road-images 0): "
              "sanity_curves is not written", file=sys.stderr)
    for w in written:
        print(f"-> {w}", file=sys.stderr)
    print(f"({time.time() - t0:.0f} s; " + ", ".join(f"{k} {v:.1f} s" for k, v in rep.seconds.items()) + ")",
          file=sys.stderr)
    return 1 if skipped else 0
