"""Renderers: RGB uint8 images and maps in, arrays or figures out."""

from .caption_strip import caption_strip
from .figures import (
                      PANEL_IN,
                      distance_plot,
                      entropy_heatmap,
                      figure_bytes,
                      heatmap,
                      map_grid,
                      mask_contours,
                      overlay_figure,
                      panels,
                      pos_similarity_grid,
                      save_figure,
)
from .output import OutputOptions
from .overlay import NORMS, Scale, colorize, display_image, map_scales, normalize_map, overlay, overlay_region

__all__ = ["overlay", "overlay_region", "colorize", "normalize_map", "display_image", "map_scales", "Scale",
           "NORMS", "caption_strip", "distance_plot", "entropy_heatmap", "heatmap", "map_grid", "mask_contours",
           "overlay_figure", "panels", "pos_similarity_grid", "save_figure", "figure_bytes",
           "OutputOptions", "PANEL_IN"]
