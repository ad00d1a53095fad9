"""Renderers: RGB uint8 images and maps in, arrays or figures out."""

from .caption_strip import caption_strip
from .overlay import colorize, normalize_map, overlay

__all__ = ["overlay", "colorize", "normalize_map", "caption_strip"]
