"""Renderers: RGB uint8 images and maps in, arrays or figures out."""

from .caption_strip import caption_strip
from .figures import (distance_plot, entropy_heatmap, heatmap, map_grid, mask_contours, panels,
                      pos_similarity_grid, save_figure)
from .overlay import colorize, normalize_map, overlay, overlay_region

__all__ = ["overlay", "overlay_region", "colorize", "normalize_map", "caption_strip", "distance_plot", "entropy_heatmap",
           "heatmap", "map_grid", "mask_contours", "panels", "pos_similarity_grid", "save_figure"]
