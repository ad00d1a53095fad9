"""vitviz: where is the Vision Transformer looking, and why?"""

from .errors import (CaptureError, CheckpointError, ImageError, LayoutError, ModelNotFoundError,
                     VitvizError, WeightsNotFoundError)
from .types import AttentionMaps, CrossAttentionMaps, TokenLayout
from .models import VisionModel, wrap
from .capture import capture

__all__ = [
    "AttentionMaps", "CrossAttentionMaps", "TokenLayout", "VisionModel", "wrap", "capture",
    "VitvizError", "CaptureError", "CheckpointError", "ImageError", "LayoutError",
    "ModelNotFoundError", "WeightsNotFoundError",
]
