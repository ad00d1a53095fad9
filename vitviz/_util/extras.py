"""Optional dependencies ("extras"): which feature needs what, and one error when it is missing.

vitviz's core install holds what the main job needs (capture, rollout, CLS maps, relevance,
captions, figures, the gallery). Heavier parts used by one feature are extras of the package,
declared in ``pyproject.toml`` under ``[project.optional-dependencies]``:

=========  ==========================  =========================================
extra      installs                    for
=========  ==========================  =========================================
``flow``   ``ortools``                 exact attention flow (max-flow solver)
``clip``   ``open_clip_torch``         CLIP models (open_clip)
``all``    every extra above
=========  ==========================  =========================================

A feature calls :func:`require_extra` before it does any work; without the package the user
gets a :class:`vitviz.errors.MissingExtraError` that names the command to run, and the
command line prints it as one line with exit status 2.

Example:
    >>> from vitviz._util.extras import require_extra
    >>> max_flow = require_extra("flow")      # the module, or MissingExtraError
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from ..errors import MissingExtraError, VitvizError

__all__ = ["Extra", "EXTRAS", "require_extra", "has_extra"]


@dataclass(frozen=True)
class Extra:
    """One optional part: the distribution it installs, the module a feature imports, what for."""

    name: str
    distribution: str  # as pip names it (the requirement in pyproject.toml)
    module: str  # what the feature imports
    feature: str  # what the user called, for the message


EXTRAS: dict[str, Extra] = {e.name: e for e in (
    Extra("flow", "ortools", "ortools.graph.python.max_flow", "attention flow (its exact max-flow solver)"),
    Extra("clip", "open_clip_torch", "open_clip", "CLIP models"),
)}


def require_extra(name: str, feature: str | None = None) -> ModuleType:
    """Import the module of extra ``name``; raise a one-line error naming the install otherwise.

    Args:
        name: a key of :data:`EXTRAS` (``"flow"``, ``"clip"``).
        feature: what the user called (default: the extra's own description).

    Returns:
        The imported module (e.g. ``ortools.graph.python.max_flow`` for ``"flow"``).

    Raises:
        MissingExtraError: the module cannot be imported; says ``pip install 'vitviz[NAME]'``.
        VitvizError: ``name`` is not an extra of vitviz.
    """
    extra = EXTRAS.get(name)
    if extra is None:
        raise VitvizError(f"vitviz has no extra {name!r} (its extras: {', '.join(sorted(EXTRAS))}, all)")
    try:
        return importlib.import_module(extra.module)
    except ImportError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MissingExtraError(
            f"{feature or extra.feature} needs the optional package '{extra.distribution}', which "
            f"could not be imported ({reason}); install it with: pip install 'vitviz[{name}]'",
            extra=name, package=extra.distribution) from e


def has_extra(name: str) -> bool:
    """Whether the module of extra ``name`` can be imported (imports it once)."""
    try:
        require_extra(name)
    except MissingExtraError:
        return False
    return True
