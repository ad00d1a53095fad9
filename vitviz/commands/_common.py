"""Pieces shared by the commands: model arguments, loading, outcome reports, errors."""

from __future__ import annotations

import argparse
import sys


def add_model_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    """--model, --weights, --random, --num-classes, --image-size, --device."""
    g = p.add_argument_group("model")
    g.add_argument("--model", required=required, metavar="NAME",
                   help="alias (b16, s16, deit-s-distilled, dinov2-s-reg, ...), timm name, "
                        "transformers id or local directory")
    g.add_argument("--weights", metavar="FILE",
                   help=".safetensors or .pth/.pt/.bin state dict (also pytorch_pretrained_vit checkpoints)")
    g.add_argument("--random", action="store_true", help="untrained weights (no download needed)")
    g.add_argument("--num-classes", type=int, metavar="N", help="classifier size (default: from --weights)")
    g.add_argument("--image-size", type=int, metavar="PX",
                   help="input size; position embeddings are interpolated when needed")
    g.add_argument("--device", default=None, metavar="DEV",
                   help="cpu, cuda or mps (default: cuda when available)")


def add_render_arguments(p: argparse.ArgumentParser) -> None:
    """--batch-size, --cmap, --alpha, --out of the commands that write overlays."""
    p.add_argument("--batch-size", type=int, default=8, metavar="N")
    p.add_argument("--cmap", default="jet")
    p.add_argument("--alpha", type=float, default=0.5, help="heatmap weight in the overlay")
    p.add_argument("--out", default="vitviz-out", metavar="DIR")


def add_original_argument(p: argparse.ArgumentParser) -> None:
    """--on-original of the commands that write one overlay per image."""
    p.add_argument("--on-original", action="store_true",
                   help="draw the overlay on the image at its own resolution (the model's centre-crop "
                        "region mapped back onto it) instead of on the model's input view")


def check_render_arguments(args):
    """The exit status for bad overlay arguments (after printing the error), or None."""
    if not 0.0 <= args.alpha <= 1.0:
        return fail(f"--alpha must be in [0, 1], got {args.alpha}")
    if args.batch_size < 1:
        return fail(f"--batch-size must be at least 1, got {args.batch_size}")
    return None


def load(args):
    """The model the common arguments describe."""
    from ..models import load_model

    return load_model(args.model, weights=args.weights, pretrained=not args.random,
                      num_classes=args.num_classes, image_size=args.image_size, device=args.device)


def fail(message: str, code: int = 2) -> int:
    """Print one error line and return the exit status."""
    print(f"vitviz: error: {message}", file=sys.stderr)
    return code


def report(outcomes) -> int:
    """Print what was written and what was skipped; 1 when anything was skipped, else 0."""
    done = [o for o in outcomes if o.ok]
    skipped = [o for o in outcomes if not o.ok]
    for o in done:
        pred = f"  [{o.prediction}]" if o.prediction else ""
        print(f"{o.source} -> {o.outputs[-1]}{pred}")
    for o in skipped:
        print(f"vitviz: skipped {o.source}: {o.error}", file=sys.stderr)
    print(f"{len(done)} done, {len(skipped)} skipped", file=sys.stderr)
    return 1 if skipped else 0
