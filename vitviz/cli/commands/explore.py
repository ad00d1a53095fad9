"""`vitviz explore`: an interactive attention explorer page per image (one self-contained HTML file)."""

from __future__ import annotations

import sys

from ._common import (
    add_class_argument,
    add_model_arguments,
    add_naming_argument,
    check_class_argument,
    class_target,
    fail,
    load,
    model_tag,
    with_model,
)

NAME = "explore"
HELP = "interactive attention explorer: one self-contained HTML page per image"
DESCRIPTION = ("Writes one HTML file per image that works offline (from file://, no network): click a "
               "patch, or pick the CLS, distillation or a register token, to see its attention in "
               "every layer and head (mean, max, each head), the rollout up to a layer, the Chefer "
               "relevance of the predicted class, the share of its attention on prefix tokens per "
               "layer, and the top-5 prediction. --out is the page (a name ending in .html, one "
               "image) or a folder (<name>_explore.html per image; <name>_<model>_explore.html with "
               "--name-with-model).")
EXAMPLE = "vitviz explore cat.jpg --model b16 --out cat.html"


def add_arguments(p) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE")
    add_model_arguments(p)
    p.add_argument("--out", default="vitviz-out", metavar="PATH",
                   help="the page (ending in .html, one image) or a folder (default vitviz-out)")
    add_class_argument(p, "class the relevance explains")
    p.add_argument("--max-mb", type=float, default=40.0, metavar="MB",
                   help="size each page stays under; per-head rows of the earliest layers are left "
                        "out when needed and the page says so (default 40)")
    add_naming_argument(p)


def run(args) -> int:
    from pathlib import Path

    from ..._util.files import unique_stems
    from ...errors import ImageError

    single = str(args.out).lower().endswith((".html", ".htm"))
    if single and len(args.images) > 1:
        return fail(f"--out {args.out} names one page but {len(args.images)} images were given; "
                    "give a folder instead")
    if single and args.name_with_model:
        return fail(f"--name-with-model names the pages written into a folder; --out {args.out} is the "
                    "page's own name: give a folder, or drop --name-with-model")
    bad = check_class_argument(args)
    if bad is not None:
        return bad
    if args.max_mb <= 0:
        return fail(f"--max-mb must be positive, got {args.max_mb}")
    from ...explorer import explore

    model = load(args)
    target = class_target(model, args)
    skipped = 0
    tag = model_tag(args)
    for src, stem in zip(args.images, [with_model(s, tag) for s in unique_stems(args.images)], strict=True):
        try:
            page = explore(model, src, target=target, max_bytes=int(args.max_mb * 1e6))
        except ImageError as e:
            print(f"vitviz: skipped {src}: {e}", file=sys.stderr)
            skipped += 1
            continue
        out = page.save(Path(args.out) if single else Path(args.out) / f"{stem}_explore.html")
        top = page.data.top5
        pred = f"  [{top[0][0]} (p={top[0][1]:.2f})]" if top else ""
        print(f"{src} -> {out} ({out.stat().st_size / 1e6:.1f} MB){pred}")
    print(f"{len(args.images) - skipped} done, {skipped} skipped", file=sys.stderr)
    return 1 if skipped else 0
