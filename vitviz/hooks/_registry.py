"""The adapter registry: one adapter per family of attention implementation.

An adapter finds the attention modules it understands in a model (``find``) and,
inside a capture, attaches hooks and implementation switches to them (``attach``),
registering every undo step on an ``ExitStack`` so that the model is restored on exit,
also after an exception.

Adapters run in priority order; a module claimed by one adapter, and every ancestor and
descendant of it, is not offered to the later ones, so no attention is captured twice.
"""

from __future__ import annotations

import difflib
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from ..errors import VitvizError

# Roles of an attention site:
IMAGE = "image"  # self-attention over image tokens (the image encoder)
TEXT = "text"  # self-attention over text tokens (a caption decoder)
CROSS = "cross"  # text queries over encoder tokens
AUTO = "auto"  # decided per call: self-attention when queries and keys are the same tokens


@dataclass
class Site:
    """One attention module and the role of its output."""

    name: str
    module: nn.Module
    role: str
    adapter: "Adapter"


# emit(site, attention [B, H, Q, K], role_or_None, *, graph=None) is how adapters hand over what they
# read; graph: the autograd tensor whose gradient is d/d attention when attention is a view
Emit = Callable[[Site, "object", Optional[str]], None]


class Adapter:
    """Base class of capture adapters. Subclass, set ``name`` and ``priority``, register."""

    name: str = ""
    priority: int = 100
    # True when every site is switched and hooked on its own (no shared config): a capture
    # that keeps only some layers may then leave the other sites on their fast path
    selectable: bool = False

    def find(self, root: nn.Module, is_free: Callable[[str], bool]) -> list[Site]:
        """Return the attention sites this adapter handles, in module order."""
        raise NotImplementedError

    def attach(self, sites: list[Site], emit: Emit, stack: ExitStack) -> None:
        """Hook ``sites`` so that every forward calls ``emit``; push every undo onto ``stack``."""
        raise NotImplementedError


_ADAPTERS: dict[str, Adapter] = {}


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: add an adapter (an instance of ``cls``) to the registry."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a name")
    _ADAPTERS[cls.name] = cls()
    return cls


def list_adapters() -> list[str]:
    """Registered adapter names in the order they are tried."""
    return [a.name for a in sorted(_ADAPTERS.values(), key=lambda a: a.priority)]


def get_adapter(name: str) -> Adapter:
    try:
        return _ADAPTERS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_ADAPTERS), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise VitvizError(f"unknown capture adapter {name!r}{hint} (known: {', '.join(list_adapters())})")


def discover(root: nn.Module, adapters: Optional[list[str]] = None) -> list[Site]:
    """All attention sites of ``root`` found by the registered adapters, in priority order."""
    chosen = [get_adapter(n) for n in adapters] if adapters else [
        _ADAPTERS[n] for n in list_adapters()]
    claimed: list[str] = []

    def is_free(name: str) -> bool:
        for c in claimed:
            if name == c or c == "" or name == "":
                return False
            if name.startswith(c + ".") or c.startswith(name + "."):
                return False
        return True

    sites: list[Site] = []
    for adapter in chosen:
        found = adapter.find(root, is_free)
        claimed.extend(s.name for s in found)
        sites.extend(found)
    return sites


def named_attention_like(root: nn.Module, limit: int = 6) -> list[str]:
    """Names of modules that look like attention, for error messages."""
    out = [f"{n or '<root>'} ({type(m).__name__})" for n, m in root.named_modules()
           if "attn" in type(m).__name__.lower() or "attention" in type(m).__name__.lower()]
    return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])
