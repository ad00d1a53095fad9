"""`vitviz models`: aliases, sources, cached or not."""

from __future__ import annotations

NAME = "models"
HELP = "list model aliases, their sources and whether weights are cached"
EXAMPLE = "vitviz models"


def add_arguments(p) -> None:
    pass


def run(args) -> int:
    from ...models import ALIASES, weights_status
    from ...zoo import ZOO

    print(f"{'alias':<20} {'source':<13} {'model id':<40} weights")
    for name, entry in ZOO.items():
        state = "bundled" if entry.weights_path() else "missing"
        print(f"{name:<20} {'vitviz zoo':<13} {name:<40} {state}  {entry.about}")
    for name, alias in ALIASES.items():
        _, path = weights_status(name)
        state = "cached" if path else "not cached"
        print(f"{name:<20} {alias.source:<13} {alias.default_id:<40} {state}  {alias.about}")
    print("\nAlso: any timm model name (vitviz rollout x.jpg --model vit_base_patch16_224), a "
          "transformers id (org/name) or local model directory; --random needs no weights.")
    return 0
