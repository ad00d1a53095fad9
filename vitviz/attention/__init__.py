"""Attention capture at the attention op: ``capture()``, its read-only ``Recording``, and the
adapter registry (what each library knows about its attention modules).

(Named `attention`, not `capture`, so that the subpackage never shadows the `vitviz.capture` function.)
"""

from . import _timm, _torch_mha, _transformers  # noqa: F401  (register adapters)
from ._adapter import (
    AUTO,
    CROSS,
    IMAGE,
    INNER,
    POOL,
    TEXT,
    Adapter,
    Site,
    Windows,
    count_layers,
    discover,
    list_adapters,
    register_adapter,
)
from ._capture import capture
from ._mode import sdpa_probabilities
from ._recorder import Pass
from ._recording import Recording
from ._windows import WindowedAttentionMaps, WindowedLayer, WindowScheme, stitch

__all__ = ["capture", "Recording", "Pass", "Adapter", "Site", "Windows", "WindowScheme", "stitch",
           "WindowedAttentionMaps", "WindowedLayer", "list_adapters",
           "register_adapter", "discover", "count_layers", "sdpa_probabilities", "IMAGE", "TEXT", "CROSS", "AUTO",
           "POOL", "INNER"]
