"""`vitviz fetch`: download pretrained weights ahead of time and say where they went."""

from __future__ import annotations

import sys

NAME = "fetch"
HELP = "download pretrained weights now (e.g. on a login node) and print where they went"
DESCRIPTION = ("Download the pretrained files of each model into the Hugging Face cache (HF_HOME / "
               "HF_HUB_CACHE), so that later runs, also with HF_HUB_OFFLINE=1 on machines without "
               "network access sharing that cache, find them. Cached files are not downloaded again.")
EXAMPLE = "vitviz fetch b16 dino-s16 vit-gpt2      # then: HF_HUB_OFFLINE=1 vitviz rollout cat.jpg --model b16"


def add_arguments(p) -> None:
    p.add_argument("names", nargs="+", metavar="NAME",
                   help="alias (b16, dino-s16, vit-gpt2, ...), timm name or transformers id")
    p.add_argument("--image-size", type=int, metavar="PX",
                   help="an alias's model for this size (b16 --image-size 384)")


def run(args) -> int:
    from ...errors import VitvizError
    from ...models import cache_dir, fetch

    failed = 0
    for name in args.names:
        try:
            paths = fetch(name, image_size=args.image_size)
        except VitvizError as e:
            if getattr(args, "debug", False):
                raise
            print(f"vitviz: error: {e}", file=sys.stderr)
            failed += 1
            continue
        for path in paths:
            print(f"{name}: {path}")
    print(f"{len(args.names) - failed} fetched, {failed} failed (cache: {cache_dir()})", file=sys.stderr)
    return 2 if failed else 0
