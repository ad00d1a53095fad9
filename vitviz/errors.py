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


class VideoError(ImageError):
    """A video file that cannot be used: unreadable, truncated, an unsupported codec, too few
    frames for the model, or a still image where a video model needs a clip. The message names
    the file, says what is wrong and what to do (an :class:`ImageError`, so a batch skips it)."""


class LayoutError(VitvizError, ValueError):
    """The token layout of a model or an attention tensor is inconsistent."""


class CaptureError(VitvizError, RuntimeError):
    """Nothing (or something inconsistent) was captured from a forward pass."""


class RenderError(VitvizError, ValueError):
    """Drawing settings or maps that cannot be drawn (a bad size, dpi, format, scale, alpha, box or map)."""


class PreprocessError(VitvizError, ValueError):
    """Preprocessing settings that cannot work (bad size, mean/std, interpolation)."""


class DownloadError(WeightsNotFoundError):
    """Pretrained weights are not cached and could not be downloaded from the Hugging Face Hub.

    Attributes:
        reason: ``"offline"`` (``HF_HUB_OFFLINE`` is set), ``"unreachable"`` (no network, no
            answer in time), ``"not_found"`` (no such repo or revision), ``"no_file"`` (the repo
            lacks the file), ``"auth"`` (private or gated: log in) or ``"failed"`` (the transfer
            broke off; only a ``*.incomplete`` file may stay, never taken for the weights).
        repo_id, filename: what was asked for.
    """

    def __init__(self, message: str, *, reason: str, repo_id: str = "", filename: str = ""):
        super().__init__(message)
        self.reason = reason
        self.repo_id = repo_id
        self.filename = filename

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class MissingExtraError(VitvizError, ImportError):
    """A feature needs an optional dependency that is not installed.

    The message names the package and the extra that installs it, e.g.
    ``pip install 'vitviz[flow]'``.
    """

    def __init__(self, message: str, *, extra: str, package: str):
        self.extra = extra
        self.package = package
        super().__init__(message, name=package)


class UnplacedAttentionError(CaptureError, LayoutError):
    """Attention layers ran whose tokens vitviz cannot place on the image (a video input, windows
    or groups of a scheme vitviz does not know): both a capture and a layout error. The message
    names the model, the layers and why."""


class IncompleteCaptureWarning(UserWarning):
    """A capture saw attention layers that it neither recorded nor could explain (they are not
    in ``rec.skipped``); ``rec.complete`` is False. The message names the modules."""


class UnknownTokenWarning(UserWarning):
    """A text given to a text-image model holds words its tokenizer does not know: they are read
    as its unknown token (``[UNK]``), so the maps and scores do not see them. The message names
    the words (:func:`vitviz.explain.text.unknown_words`)."""
