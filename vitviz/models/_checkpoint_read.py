"""Weights files, read safely: ``read_state_dict`` never runs arbitrary code.

``.safetensors`` files go through safetensors and pickled files (``.pth``, ``.pt``, ``.bin``,
``.ckpt``) through ``torch.load(..., weights_only=True)``. A pickle that needs more than tensors
and plain containers (a whole pickled ``nn.Module``, a custom class, numpy arrays, an
``argparse.Namespace``) is refused with :class:`~vitviz.errors.CheckpointError`. Weights nested
under ``state_dict`` / ``model`` / ... and prefixed by DDP's ``module.`` are unwrapped.

Example:
    >>> sd = read_state_dict("B_16_imagenet1k_finetuned.pth")
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Union

import torch

from ..errors import CheckpointError

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_SUFFIXES = (".safetensors",)

# Keys under which training scripts nest the weights, in order of preference: the live
# weights first, an exponential moving average only when nothing else is there.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network",
                 "state_dict_ema", "model_ema", "ema")
# Prefixes that wrappers add to every key: DistributedDataParallel / DataParallel ("module."),
# torch.compile ("_orig_mod."), a LightningModule or a wrapper holding the net as `.model`.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")

_RESAVE_FIX = (
    "in the code that wrote it (and only if you trust the file), load it there and save the "
    "weights alone: torch.save(model.state_dict(), 'weights.pth') or "
    "safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')"
)

PathLike = Union[str, "os.PathLike[str]"]


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------

def read_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file into a flat ``{name: tensor}`` dict on the CPU, without running code.

    ``.safetensors`` files are read with safetensors; ``.pth``, ``.pt``, ``.bin`` and
    ``.ckpt`` files with ``torch.load(path, map_location="cpu", weights_only=True)``.
    Training checkpoints that nest the weights (under ``"state_dict"``,
    ``"model_state_dict"``, ``"model"``, ``"module"``, or an EMA copy under
    ``"state_dict_ema"``/``"model_ema"``/``"ema"`` when nothing else holds them) are
    unwrapped, and a prefix that every key shares because of a wrapper (``"module."`` from
    DistributedDataParallel, ``"_orig_mod."`` from ``torch.compile``, ``"model."`` from a
    wrapper module) is stripped. The format is told by the file's first bytes, so a
    torch file named ``.safetensors`` (or the reverse) still loads; the extension decides
    only when the bytes say nothing.

    Args:
        path: the weights file.

    Returns:
        dict mapping parameter names to tensors (CPU, dtype as stored).

    Raises:
        CheckpointError: the file is missing, empty, of an unknown kind, unreadable, holds
            no tensors, or needs arbitrary code execution to unpickle (a pickled
            ``nn.Module``, a custom class); the message names the file and the fix.

    Example:
        >>> sd = read_state_dict("finetuned.pth")
        >>> sd["pos_embed"].shape
        torch.Size([1, 577, 768])
    """
    p = Path(path)
    name = str(path)
    if not p.exists():
        raise CheckpointError(f"{name}: no such weights file; check the path given to --weights")
    if p.is_dir():
        raise CheckpointError(
            f"{name}: is a directory, not a weights file; pass the .safetensors or .pth file inside it")
    suffix = p.suffix.lower()
    if suffix not in PICKLE_SUFFIXES + SAFETENSORS_SUFFIXES:
        raise CheckpointError(
            f"{name}: unknown weights file type {suffix or '(no extension)'!r}; expected one of "
            f"{', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}. Rename the file if it is one of "
            "these, or re-save the weights with torch.save(model.state_dict(), 'weights.pth')")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{name}: the file is empty (0 bytes); it was probably cut off while "
                              "being written or downloaded: copy or download it again")

    kind = _sniff(p) or ("safetensors" if suffix in SAFETENSORS_SUFFIXES else "torch")
    obj = _read_safetensors(p, name) if kind == "safetensors" else _read_pickle(p, name)
    sd = _unwrap(obj, name)
    return _strip_wrapper_prefixes(sd)


def _sniff(p: Path) -> str | None:
    """The file's format from its first bytes (a misnamed file still loads), or None."""
    try:
        with open(p, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise CheckpointError(f"{p}: cannot be opened ({e.strerror}); check its permissions") from e
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch.save zip / legacy pickle
        return "torch"
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: u64 header length, then JSON
        n = int.from_bytes(head[:8], "little")
        if 0 < n <= p.stat().st_size - 8:
            return "safetensors"
    return None


def _read_safetensors(p: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(p), device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError, or OSError
        raise CheckpointError(
            f"{name}: not a readable safetensors file ({type(e).__name__}: {_first_line(e)}); "
            "check that it was written by safetensors and copied completely") from e


def _read_pickle(p: Path, name: str):
    try:
        with warnings.catch_warnings():  # a plain pickle: refused below, with a clearer message
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            # a file object, not the path: torch.load dispatches on a ".safetensors" name itself
            with open(p, "rb") as f:
                return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Weights only load failed" not in msg:
            raise CheckpointError(
                f"{name}: not a PyTorch checkpoint (unpickling failed: {_first_line(e)}); "
                "check that it was written by torch.save and copied completely") from e
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", msg)
        if found:
            what = (f"holds the Python object {found.group(1)} (a pickled class or function, e.g. a "
                    "whole nn.Module or a custom class), not just tensors")
        else:
            detail = re.search(r"WeightsUnpickler error:\s*(.+)", msg)
            what = ("uses pickle features that weights-only loading refuses "
                    f"({detail.group(1).strip()[:120] if detail else 'not plain tensors'})")
        raise CheckpointError(
            f"{name}: {what}; unpickling it needs arbitrary code execution, which vitviz refuses. "
            f"Fix: {_RESAVE_FIX}") from e
    except Exception as e:  # zip errors (RuntimeError), truncated pickles (EOFError), garbage (KeyError...)
        raise CheckpointError(
            f"{name}: not a readable PyTorch checkpoint ({type(e).__name__}: {_first_line(e)}); "
            "check that it was written by torch.save and copied completely") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else "no details"


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _unwrap(obj, name: str, depth: int = 0) -> dict[str, torch.Tensor]:
    """Find the ``{name: tensor}`` dict inside what a checkpoint file holds."""
    if _is_tensor_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping) and depth < 4:
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner:
                return _unwrap(inner, name, depth + 1)
    if isinstance(obj, Mapping):
        if not obj:
            raise CheckpointError(f"{name}: holds an empty dict, no weights; re-save it with "
                                  "torch.save(model.state_dict(), 'weights.pth')")
        tensors = [k for k, v in obj.items() if isinstance(v, torch.Tensor)]
        others = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        raise CheckpointError(
            f"{name}: holds a dict that is not a state dict ({len(tensors)} tensors, {len(others)} "
            f"other entries such as {others[:5]}) and none of the usual keys "
            f"{list(_WRAPPER_KEYS)} holding one; re-save the weights alone with "
            "torch.save(model.state_dict(), 'weights.pth')")
    raise CheckpointError(
        f"{name}: holds a {type(obj).__name__}, not a dict of tensors; re-save the weights with "
        "torch.save(model.state_dict(), 'weights.pth')")


def _strip_wrapper_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip prefixes that *every* key shares because of a wrapper, repeatedly."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) and len(k) > len(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


# --------------------------------------------------------------------------------------------
