"""The `vitviz` command: parse, call the library, format one error.

torch, timm and transformers are imported only by the commands that need them, so that
`vitviz --help` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

EXAMPLES = """\
examples:
  vitviz rollout cat.jpg --model b16 --discard-ratio 0.9
  vitviz rollout photos/*.jpg --model b16 --weights my_finetune.pth --num-classes 37 --out maps/
  vitviz rollout cat.jpg --model deit-s-distilled --random      # untrained weights, no download
  vitviz models                                                 # aliases and whether weights are cached
  vitviz demo                                                   # bundled images, offline

exit status: 0 all done, 1 some inputs skipped, 2 bad arguments / unknown model / missing weights
"""


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, metavar="NAME",
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitviz",
        description="Attention maps for Vision Transformers: capture, analyze, render.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"vitviz {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser(
        "rollout", help="attention rollout overlay per image",
        description="Attention rollout (Abnar & Zuidema 2020) over each image: writes "
                    "<name>_rollout.png (overlay) and <name>_rollout.npy (raw patch map).",
        epilog="example:\n  vitviz rollout cat.jpg dog.png --model b16 --discard-ratio 0.9 --out maps/\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("images", nargs="+", metavar="IMAGE")
    _model_args(r)
    r.add_argument("--head-fusion", choices=["mean", "max", "min"], default="mean")
    r.add_argument("--discard-ratio", type=float, default=0.0, metavar="R",
                   help="share of smallest attention entries zeroed per layer, in [0, 1)")
    r.add_argument("--start-layer", type=int, default=0, metavar="L")
    r.add_argument("--batch-size", type=int, default=8, metavar="N")
    r.add_argument("--cmap", default="jet")
    r.add_argument("--alpha", type=float, default=0.5, help="heatmap weight in the overlay")
    r.add_argument("--out", default="vitviz-out", metavar="DIR")

    sub.add_parser("models", help="list model aliases, their sources and whether weights are cached",
                   description="List model aliases, their sources and whether weights are cached.")

    d = sub.add_parser("demo", help="run on the bundled sample images, offline",
                       description="Rollout of the bundled sample images with a small bundled "
                                   "architecture; no network needed.")
    d.add_argument("--out", default="vitviz-demo", metavar="DIR")
    return parser


def _fail(message: str, code: int = 2) -> int:
    print(f"vitviz: error: {message}", file=sys.stderr)
    return code


def _load(args):
    from .models import load_model

    return load_model(args.model, weights=args.weights, pretrained=not args.random,
                      num_classes=args.num_classes, image_size=args.image_size, device=args.device)


def _report(outcomes) -> int:
    done = [o for o in outcomes if o.ok]
    skipped = [o for o in outcomes if not o.ok]
    for o in done:
        pred = f"  [{o.prediction}]" if o.prediction else ""
        print(f"{o.source} -> {o.outputs[-1]}{pred}")
    for o in skipped:
        print(f"vitviz: skipped {o.source}: {o.error}", file=sys.stderr)
    print(f"{len(done)} done, {len(skipped)} skipped", file=sys.stderr)
    return 1 if skipped else 0


def cmd_rollout(args) -> int:
    if not 0.0 <= args.discard_ratio < 1.0:
        return _fail(f"--discard-ratio must be in [0, 1), got {args.discard_ratio}")
    if not 0.0 <= args.alpha <= 1.0:
        return _fail(f"--alpha must be in [0, 1], got {args.alpha}")
    from .batch import rollout_files

    model = _load(args)
    outcomes = rollout_files(model, args.images, args.out, head_fusion=args.head_fusion,
                             discard_ratio=args.discard_ratio, start_layer=args.start_layer,
                             batch_size=args.batch_size, cmap=args.cmap, alpha=args.alpha)
    return _report(outcomes)


def cmd_models(args) -> int:
    from .models._aliases import ALIASES
    from .models._loader import timm_weights_location

    print(f"{'alias':<20} {'source':<13} {'model id':<40} weights")
    for name, alias in ALIASES.items():
        path = None
        if alias.source == "timm":
            path, _ = timm_weights_location(alias.default_id)
        state = "cached" if path else "not cached"
        print(f"{name:<20} {alias.source:<13} {alias.default_id:<40} {state}  {alias.about}")
    print("\nAlso: any timm model name (vitviz rollout x.jpg --model vit_base_patch16_224), a "
          "transformers id (org/name) or local model directory; --random needs no weights.")
    return 0


def cmd_demo(args) -> int:
    from .batch import rollout_files
    from .models import load_model
    from .zoo import sample_images

    images = sample_images()
    # a small architecture with untrained weights until the bundled trained model lands
    model = load_model("ti16", pretrained=False, device="cpu")
    outcomes = rollout_files(model, images, args.out, discard_ratio=0.9)
    code = _report(outcomes)
    print(f"demo written to {args.out}/ (untrained ViT-Ti/16: the maps show the mechanics, "
          "not a trained model's focus)")
    return code


COMMANDS = {"rollout": cmd_rollout, "models": cmd_models, "demo": cmd_demo}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("vitviz: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for users; --debug shows the traceback
        from .errors import VitvizError

        if args.debug:
            raise
        if isinstance(e, VitvizError):
            return _fail(str(e), e.exit_code)
        return _fail(f"{type(e).__name__}: {e} (run with --debug for the traceback)", 3)


if __name__ == "__main__":
    sys.exit(main())
