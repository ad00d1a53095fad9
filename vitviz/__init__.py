"""vitviz: where is the Vision Transformer looking, and why?"""

from .errors import (CaptureError, CheckpointError, ImageError, LayoutError, ModelNotFoundError,
                     VitvizError, WeightsNotFoundError)
from .types import AttentionMaps, CrossAttentionMaps, TokenLayout
from .models import VisionModel, wrap
from .capture import capture
from .analyze import cls_maps, rollout
from .render import overlay

__all__ = [
    "AttentionMaps", "CrossAttentionMaps", "TokenLayout", "VisionModel", "wrap", "capture", "rollout", "cls_maps", "overlay",
    "VitvizError", "CaptureError", "CheckpointError", "ImageError", "LayoutError",
    "ModelNotFoundError", "WeightsNotFoundError",
]
