"""Many images: one batch engine (decode workers, batches, skip records, outcomes) and the map
writer (one overlay and one ``.npy`` per image for single-map methods).

Example:
    >>> from vitviz.batch import iter_captures
    >>> for batch, rec, out in iter_captures(m, ["a.jpg", "b.jpg"], batch_size=8):
    ...     maps = vitviz.rollout(rec.attentions)       # [B, gh, gw]
"""

from ._engine import (
    ImageSet,
    Item,
    Outcome,
    check_class,
    collate,
    decode,
    default_workers,
    iter_batches,
    iter_captures,
    load_batches,
    num_classes,
    predictions,
)
from ._map_writer import map_files, relevance_files, rollout_files
from ._video_files import (
    check_video_model,
    cls_video_files,
    playback_fps,
    relevance_video_files,
    rollout_video_files,
    video_files,
)

__all__ = ["Outcome", "Item", "ImageSet", "decode", "collate", "default_workers", "iter_batches", "load_batches",
           "iter_captures", "predictions", "num_classes", "check_class", "map_files", "rollout_files",
           "relevance_files", "video_files", "rollout_video_files", "cls_video_files", "relevance_video_files",
           "check_video_model", "playback_fps"]
