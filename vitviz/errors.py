"""Typed errors. Each says what was expected, what was found and what to do.

The command line maps every :class:`VitvizError` to a one-line message and its
``exit_code`` (2 for bad arguments, unknown models and missing weights).
"""

from __future__ import annotations


class VitvizError(Exception):
    """Base class of every error vitviz raises on purpose."""

    exit_code = 2


class ModelNotFoundError(VitvizError, KeyError):
    """An unknown model name; the message lists the closest known names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class WeightsNotFoundError(VitvizError, FileNotFoundError):
    """Pretrained weights are neither cached locally nor given as a file."""


class CheckpointError(VitvizError, ValueError):
    """A weights file that cannot be read or does not fit the architecture."""


class ImageError(VitvizError, ValueError):
    """An input image that cannot be read; the message names the file."""

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")


class LayoutError(VitvizError, ValueError):
    """The token layout of a model or an attention tensor is inconsistent."""


class CaptureError(VitvizError, RuntimeError):
    """Nothing (or something inconsistent) was captured from a forward pass."""


class PreprocessError(VitvizError, ValueError):
    """Preprocessing settings that cannot work (bad size, mean/std, interpolation)."""


class RenderError(VitvizError, ValueError):
    """Drawing settings or maps that cannot be drawn (a bad size, dpi, format, scale or map)."""
