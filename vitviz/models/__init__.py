"""Model loading: aliases, loaders, checkpoint converters, preprocessing."""

from ._vision_model import VisionModel, describe, wrap

__all__ = ["VisionModel", "wrap", "describe"]
