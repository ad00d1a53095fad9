"""`vitviz demo`: the bundled images, offline."""

from __future__ import annotations

from ._common import report

NAME = "demo"
HELP = "run on the bundled sample images, offline"
DESCRIPTION = "Rollout of the bundled sample images with a small architecture; no network needed."
EXAMPLE = "vitviz demo --out vitviz-demo"


def add_arguments(p) -> None:
    p.add_argument("--out", default="vitviz-demo", metavar="DIR")


def run(args) -> int:
    from ..batch import rollout_files
    from ..models import load_model
    from ..zoo import sample_images

    # a small architecture with untrained weights until the bundled trained model lands
    model = load_model("ti16", pretrained=False, device="cpu")
    outcomes = rollout_files(model, sample_images(), args.out, discard_ratio=0.9)
    code = report(outcomes)
    print(f"demo written to {args.out}/ (untrained ViT-Ti/16: the maps show the mechanics, "
          "not a trained model's focus)")
    return code
