"""`vitviz classes`: the class names of a classifier, with their indices (for --class)."""

from __future__ import annotations

from ._common import load

NAME = "classes"
HELP = "list a classifier's class names and indices (what --class accepts)"
DESCRIPTION = ("Prints one line per class: its index and its name. --class of `vitviz relevance` and "
               "`vitviz explore` takes either. Names come from the model: the bundled shapes models, "
               "timm's ImageNet descriptions for pretrained timm models, a transformers config's "
               "id2label. --find TEXT keeps the classes whose name contains TEXT.")
EXAMPLE = "vitviz classes shapes-vit"


def add_arguments(p) -> None:
    p.add_argument("model", metavar="NAME", help="model alias, timm name, transformers id or local directory")
    p.add_argument("--weights", metavar="FILE", help="a checkpoint (its classifier size)")
    p.add_argument("--random", action="store_true", help="untrained weights (no download; few models then "
                                                          "have names)")
    p.add_argument("--num-classes", type=int, metavar="N", help="classifier size (default: from --weights)")
    p.add_argument("--find", metavar="TEXT", help="only the classes whose name contains TEXT (any case)")
    p.set_defaults(image_size=None, device="cpu")


def run(args) -> int:
    from ...batch import num_classes

    model = load(args)
    labels = model.labels
    count = num_classes(model.module)
    if not labels:
        size = f"{count} classes, 0..{count - 1}" if count else "no classifier size stated"
        print(f"{model.name} has no class names ({size}); give --class as an index")
        return 0
    find = (args.find or "").lower()
    shown = [(i, name) for i, name in enumerate(labels) if find in str(name).lower()]
    width = len(str(len(labels) - 1))
    for i, name in shown:
        print(f"{i:>{width}}  {name}")
    if find and not shown:
        print(f"no class name of {model.name} contains {args.find!r}")
    return 0
