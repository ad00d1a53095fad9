"""The `vitviz` command: parse, call the library, format one error.

Each subcommand lives in ``vitviz/cli/commands/<name>.py``. torch, timm and transformers are
imported only by the commands that need them, so that `vitviz --help` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

EXAMPLES = """\
examples:
  vitviz rollout cat.jpg --model b16 --discard-ratio 0.9
  vitviz rollout photos/*.jpg --model b16 --weights my_finetune.pth --num-classes 37 --out maps/
  vitviz rollout cat.jpg --model deit-s-distilled --random      # untrained weights, no download
  vitviz relevance cat.jpg --model b16 --class 281              # class-specific relevance (Chefer et al. 2021)
  vitviz relevance cat.jpg --model b16 --class "tabby cat"      # a class by name (vitviz classes b16 lists them)
  vitviz cls cat.jpg --model dino-s16 --mask 0.6               # per-head CLS maps + DINO masks
  vitviz flow cat.jpg --model b16                               # attention flow (max-flow)
  vitviz posembed --model b16                                   # position-embedding similarity
  vitviz heads photos/*.jpg --model b16                         # entropy, attention distance per head
  vitviz caption girl.jpg --model vit-gpt2 --num-beams 4        # one map per generated word
  vitviz gallery photos/ --model b16 --out gallery/             # every map of a folder + index.html
  vitviz rollout cat.jpg --model b16 --on-original              # overlay on the photo at its own size
  vitviz fetch b16 vit-gpt2                                     # download now (login node), then HF_HUB_OFFLINE=1
  vitviz sanity cat.jpg --model b16 --methods rollout,relevance  # randomisation, token deletion, ROAD
  vitviz models                                                 # aliases and whether weights are cached
  vitviz classes shapes-vit                                     # class names and indices (for --class)
  vitviz demo                                                   # bundled images, offline

exit status: 0 all done, 1 some inputs skipped, 2 bad arguments / unknown model / missing weights,
  3 internal error (a bug in vitviz or a library: rerun with --debug and report the traceback)
"""


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    from .._version import __version__
    from .commands import command_modules

    parser = argparse.ArgumentParser(
        prog="vitviz", description="Attention maps for Vision Transformers: capture, analyze, render.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"vitviz {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    runners = {}
    for mod in command_modules():
        example = getattr(mod, "EXAMPLE", None)
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP),
                           epilog=f"example:\n  {example}\n" if example else None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        runners[mod.NAME] = mod.run
    return parser, runners


def main(argv: Sequence[str] | None = None) -> int:
    parser, runners = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return runners[args.command](args)
    except KeyboardInterrupt:
        print("vitviz: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for users; --debug shows the traceback
        from ..errors import VitvizError

        if args.debug:
            raise
        msg = str(e) if isinstance(e, VitvizError) else f"{type(e).__name__}: {e} (run with --debug for the traceback)"
        print(f"vitviz: error: {msg}", file=sys.stderr)
        return e.exit_code if isinstance(e, VitvizError) else 3
