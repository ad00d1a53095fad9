"""The adapter registry: what only a library knows about its attention modules.

Capture reads attention at the op (:mod:`._mode`), for any module. An adapter adds what the op
cannot tell: which modules of a model are attention sites and what their calls are -- image
self-attention, text self-attention or cross-attention (``find``). It switches nothing and
hooks nothing.

Adapters run in priority order; a module claimed by one adapter, and every ancestor and
descendant of it, is not offered to the later ones.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from ..errors import VitvizError

# Roles of an attention site:
IMAGE = "image"  # self-attention over image tokens (the image encoder)
TEXT = "text"  # self-attention over text tokens (a caption decoder)
CROSS = "cross"  # text queries over encoder tokens
AUTO = "auto"  # decided per call: self-attention when queries and keys are the same tokens
POOL = "pool"  # a few queries (class token, latents) pooling the image tokens: rec.pool
INNER = "inner"  # attention that is not over the image's tokens (channels, pixels inside a patch):
# not recorded; the site's ``note`` says why (for the error when a model has no other attention)


@dataclass
class Windows:
    """Where a window-attention site's block keeps its window scheme (Swin-style models).

    Attributes:
        block: the block that partitions its token grid into windows and calls the site.
        read_grid: ``(args, kwargs)`` of the block's forward -> ``(H, W)`` of its token grid.
        pad_first: the block pads its grid before the cyclic shift (transformers), not after (timm).
        make: ``make(block, grid)`` -> the scheme, for blocks that are not Swin-like (read from
            ``window_size`` and ``shift_size``).
        grid: the grid of the block's running call (set by the capture's pre-hook on ``block``).
    """

    block: nn.Module = field(repr=False)
    read_grid: Callable[[tuple, dict], tuple[int, int]] = field(repr=False)
    pad_first: bool = False
    make: Callable | None = field(default=None, repr=False)
    grid: tuple[int, int] | None = None

    def scheme(self):
        """The window scheme of the block's running call.

        Returns:
            The :class:`~vitviz.attention._windows.WindowScheme`, or None outside a call or for a
            block without windows (``window_size`` 0: a global block, as in SAM).
        """
        from ._windows import WindowScheme

        if self.grid is None:
            return None
        if self.make is not None:
            return self.make(self.block, self.grid)
        if not getattr(self.block, "window_size", 0):
            return None  # window_size 0: a global block (SAM)
        window, shift = _pair(self.block.window_size), _pair(getattr(self.block, "shift_size", 0))
        return WindowScheme(self.grid, window, shift, self.pad_first)


def _pair(x) -> tuple[int, int]:
    return (int(x[0]), int(x[-1])) if isinstance(x, (tuple, list)) else (int(x), int(x))


@dataclass
class Site:
    """One attention module and the role of the attention calls it runs.

    ``adapter`` is None for a module no adapter knows, found at its first attention call
    (role AUTO: square calls are image self-attention, others cross-attention). An IMAGE
    site's calls with fewer queries than keys (class token, latents) have the role POOL;
    with more queries than keys, they are image attention over reduced keys (PVT-style).
    ``windows`` describes window attention (Swin); ``divided``: ``"time"`` or ``"space"`` for
    the two attentions of a divided space-time block (TimeSformer, placed by
    :mod:`._divided`), else empty; ``note`` says why an INNER site's calls
    are not attention over the image's tokens, and ``what`` what they are (e.g. "channel
    attention"): both go into ``rec.skipped``. ``coarse_queries``: the site pools its queries
    onto a coarser grid than its keys (LeViT's subsampling attention, MViTv2's stage
    transitions), so its calls with fewer queries than keys are image attention placed with
    both grids, not a class token pooling the image (POOL).
    """

    name: str
    module: nn.Module = field(repr=False)
    role: str
    adapter: Adapter | None = field(repr=False)
    windows: Windows | None = None
    divided: str = ""
    note: str = ""
    what: str = ""
    coarse_queries: bool = False


class Adapter:
    """Base class of capture adapters. Subclass, set ``name`` and ``priority``, register."""

    name: str = ""
    priority: int = 100
    # True when the library calls its attention ops only inside the site modules' forward. Kept
    # for adapters written against earlier versions: the capture's mode now sees the whole
    # forward pass whatever the adapters say, so that every attention op is accounted for
    scoped: bool = False

    def find(self, root: nn.Module, is_free: Callable[[str], bool]) -> list[Site]:
        """The attention sites this adapter knows in ``root``.

        Args:
            root: the model's root module.
            is_free: ``is_free(name)`` is False for a module name that an adapter tried earlier
                already claimed (itself, a parent or a child); claim only free ones.

        Returns:
            The :class:`Site` s, with their roles, in module order.

        Raises:
            NotImplementedError: in the base class; every adapter implements it.
        """
        raise NotImplementedError


_ADAPTERS: dict[str, Adapter] = {}


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: add an adapter (an instance of ``cls``) to the registry.

    Args:
        cls: an :class:`Adapter` subclass with a ``name``.

    Returns:
        ``cls`` unchanged.

    Raises:
        ValueError: ``cls`` has no name.
    """
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a name")
    _ADAPTERS[cls.name] = cls()
    return cls


def list_adapters() -> list[str]:
    """The registered adapters.

    Returns:
        Their names in the order they are tried (by priority).
    """
    return [a.name for a in sorted(_ADAPTERS.values(), key=lambda a: a.priority)]


def get_adapter(name: str) -> Adapter:
    try:
        return _ADAPTERS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_ADAPTERS), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise VitvizError(
            f"unknown capture adapter {name!r}{hint} (known: {', '.join(list_adapters())})") from None


def discover(root: nn.Module, adapters: list[str] | None = None) -> list[Site]:
    """All attention sites of ``root`` that the adapters know.

    Args:
        root: the model's root module.
        adapters: the adapter names to try (default: every registered adapter).

    Returns:
        The :class:`Site` s, adapter by adapter in priority order; a module claimed by one
        adapter is not offered to the next.

    Raises:
        VitvizError: an unknown adapter name (the message lists the close ones).
    """
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


def count_layers(root: nn.Module, role: str = IMAGE) -> int | None:
    """How many attention layers of one role the adapters know in ``root``.

    Args:
        root: the model's root module.
        role: ``IMAGE``, ``TEXT``, ``CROSS``, ...; sites whose role is decided per call
            (``AUTO``) count too.

    Returns:
        The count, or None when the adapters know none (a module not known to any adapter may
        add more at run time).
    """
    n = sum(1 for s in discover(root) if s.role in (role, AUTO))
    return n or None
