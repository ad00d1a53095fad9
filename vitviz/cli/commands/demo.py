"""`vitviz demo`: the bundled trained models on fresh synthetic scenes, offline."""

from __future__ import annotations

NAME = "demo"
HELP = "run the bundled trained models on synthetic scenes, offline; writes a small gallery"
DESCRIPTION = (
    "Generates a few scenes with known objects, runs the bundled shapes-vit classifier and the "
    "shapes-captioner on them, and writes a gallery: attention rollout, relevance, per-head CLS "
    "maps, captions with one map per word, position-embedding similarity. No network needed.")
EXAMPLE = "vitviz demo --out vitviz-demo"


def add_arguments(p) -> None:
    p.add_argument("--out", default="vitviz-demo", metavar="DIR")
    p.add_argument("--num-images", type=int, default=4, metavar="N", help="scenes per model (default 4)")
    p.add_argument("--seed", type=int, default=3_000_000, help="first scene seed")


def run(args) -> int:
    from ._common import fail

    if not 1 <= args.num_images <= 32:
        return fail(f"--num-images must be in 1..32, got {args.num_images}")
    from ...zoo.demo import write_demo

    index = write_demo(args.out, num_images=args.num_images, seed=args.seed)
    print(f"demo written to {index.parent}/ -- open {index} in a browser")
    return 0
