"""Progress bars: the one place that decides whether a tqdm bar is drawn.

Every progress bar of vitviz (the batch engine, the gallery, the explorer pages, attention
flow, the commands) is made by :func:`progress_bar`. A bar is drawn on stderr only where
someone watches it: stderr is a terminal, or the code runs in a Jupyter kernel (tqdm's widget
bar). Where stderr is a pipe or a file (a log, CI, ``2> err.txt``), no bar is drawn at all, so
the log holds no carriage returns and no terminal escape sequences, also for nested bars
(attention flow inside ``vitviz flow``). ``enabled=False`` (a ``progress=False`` argument)
switches a bar off anywhere; a bar over fewer than ``min_total`` items is not drawn either.

Example:
    >>> from vitviz._util.progress import progress_bar
    >>> for path in progress_bar(paths, desc="images", unit="img", min_total=2):
    ...     ...
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TextIO

__all__ = ["progress_bar", "interactive"]


def _in_notebook() -> bool:
    """True inside a Jupyter kernel (tqdm.auto draws a widget there, not escape sequences)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:  # noqa: BLE001 - an IPython without a running shell
        return False
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def interactive(stream: TextIO | None = None) -> bool:
    """Whether a progress bar on ``stream`` (default: the current ``sys.stderr``) is watched:
    the stream is a terminal, or the code runs in a Jupyter kernel.

    Args:
        stream: the stream the bar would write to.

    Returns:
        True for a terminal or a notebook; False for pipes, files and closed streams.
    """
    stream = sys.stderr if stream is None else stream
    try:
        if stream is not None and stream.isatty():
            return True
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False
    return _in_notebook()


def progress_bar(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str | None = None,
                 unit: str = "it", enabled: bool = True, leave: bool = True, min_total: int = 1,
                 **kwargs: Any):
    """A tqdm progress bar on stderr, drawn only where someone watches it.

    Args:
        iterable: what to iterate over (as ``tqdm(iterable)``), or None for a bar updated by hand.
        total: the number of items (default: ``len(iterable)`` when it has one).
        desc: the bar's label.
        unit: the items' unit (``"img"``, ``"token"``).
        enabled: False switches the bar off (a ``progress=False`` argument).
        leave: keep the finished bar on the screen (False for bars nested in another).
        min_total: no bar for fewer items than this (e.g. 2: no bar for one image).
        **kwargs: passed on to tqdm.

    Returns:
        A ``tqdm`` object (``update``, ``close``, iteration, context manager); disabled
        (it writes nothing at all) unless ``enabled``, stderr is a terminal or a notebook
        runs the code, and there are at least ``min_total`` items.
    """
    from tqdm.auto import tqdm

    n = total
    if n is None and iterable is not None and hasattr(iterable, "__len__"):
        n = len(iterable)  # type: ignore[arg-type]
    stream = sys.stderr
    disable = not enabled or not interactive(stream) or (n is not None and n < min_total)
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, disable=disable, file=stream, **kwargs)
