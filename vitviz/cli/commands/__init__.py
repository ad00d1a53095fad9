"""One module per `vitviz` subcommand, found automatically.

A command module defines ``NAME``, ``HELP`` (one line), optionally ``DESCRIPTION`` and
``EXAMPLE``, ``add_arguments(parser)`` and ``run(args) -> int`` (the exit status). It
imports nothing heavy at module level: torch, timm and transformers are imported inside
``run`` so that `vitviz --help` stays fast. Shared pieces live in ``_common``.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

# the order in `vitviz --help`; commands not listed here follow in name order
ORDER = ["rollout", "cls", "relevance", "flow", "posembed", "heads", "caption", "gallery",
         "benchmark-maps", "sanity", "methods", "models", "classes", "fetch", "demo"]


def command_modules() -> list[ModuleType]:
    mods = [importlib.import_module(f"{__name__}.{info.name}")
            for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_")]
    rank = {n: i for i, n in enumerate(ORDER)}
    return sorted(mods, key=lambda m: (rank.get(m.NAME, len(ORDER)), m.NAME))
