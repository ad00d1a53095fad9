"""Attention capture by forward hooks: the adapter registry and the `capture()` context manager.

(Named `hooks`, not `capture`, so that the subpackage never shadows the `vitviz.capture` function.)
"""

from . import _timm, _transformers, _torch_mha, _generic  # noqa: F401  (register adapters)
from ._capture import Pass, Recording, capture
from ._registry import Adapter, Site, list_adapters, register_adapter

__all__ = ["capture", "Recording", "Pass", "Adapter", "Site", "list_adapters", "register_adapter"]
