"""Renderers: RGB uint8 images and maps in, arrays or figures out."""

from ._caption_strip import caption_strip
from ._overlay import (
                      ALPHA_GAMMA,
                      ALPHA_MAX,
                      DEFAULT_CMAP,
                      NORMS,
                      SIZE_RANGE,
                      Scale,
                      as_map,
                      colorize,
                      colormap_lut,
                      display_image,
                      map_scales,
                      normalize_map,
                      overlay,
                      overlay_region,
                      scale_map,
)
from ._video_write import (
                      clip_overlays,
                      clip_strip,
                      encode_animation,
                      encode_mp4,
                      frame_label,
                      save_clip_animation,
                      save_clip_video,
)
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

__all__ = ["overlay", "overlay_region", "colorize", "normalize_map", "display_image", "map_scales", "Scale",
           "NORMS", "SIZE_RANGE", "DEFAULT_CMAP", "ALPHA_MAX", "ALPHA_GAMMA", "as_map", "colormap_lut", "scale_map",
           "caption_strip", "distance_plot", "entropy_heatmap", "heatmap", "map_grid", "mask_contours",
           "overlay_figure", "panels", "pos_similarity_grid", "save_figure", "figure_bytes",
           "OutputOptions", "PANEL_IN", "clip_overlays", "clip_strip", "encode_mp4", "encode_animation",
           "save_clip_video", "save_clip_animation", "frame_label"]
