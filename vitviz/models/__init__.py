"""Model loading: aliases, loaders, checkpoint converters, image loading, preprocessing."""

from ._aliases import ALIASES
from ._checkpoint_read import read_state_dict
from ._class_names import class_index, class_label
from ._hub import cache_dir
from ._image import load_image, to_rgb_array
from ._loader import fetch, list_models, load_model, weights_status
from ._outputs import classifier_logits, describe_output, output_logits, score_fn_scores
from ._pos_params import patch_position_embeddings, pos_similarity
from ._preprocess import Preprocess
from ._video_read import VIDEO_SUFFIXES, Clip, clip_input, is_video_file, read_video, sample_indices
from ._vision_model import VisionModel, describe, wrap

__all__ = ["VisionModel", "wrap", "describe", "load_model", "list_models", "fetch", "load_image",
           "to_rgb_array", "Preprocess", "pos_similarity", "patch_position_embeddings", "ALIASES",
           "read_state_dict", "cache_dir", "weights_status", "classifier_logits", "output_logits",
           "describe_output", "score_fn_scores", "class_index", "class_label",
           "Clip", "read_video", "sample_indices", "clip_input", "is_video_file", "VIDEO_SUFFIXES"]
