"""vitviz: where is the Vision Transformer looking, and why?

The public API is re-exported here. Names are loaded on first use, so that importing
``vitviz`` (and running ``vitviz --help``) does not import torch, timm or transformers.

Example:
    >>> import vitviz
    >>> m = vitviz.load_model("b16")
    >>> x = m.preprocess("cat.jpg")
    >>> with vitviz.capture(m) as rec:
    ...     logits = m(x)
    >>> heat = vitviz.rollout(rec.attentions, discard_ratio=0.9)[0]
    >>> png = vitviz.overlay(m.preprocessor.view("cat.jpg"), heat)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__

_EXPORTS = {
    # data
    "TokenLayout": "vitviz.types",
    "AttentionMaps": "vitviz.types",
    "CrossAttentionMaps": "vitviz.types",
    # errors
    "VitvizError": "vitviz.errors",
    "CaptureError": "vitviz.errors",
    "CheckpointError": "vitviz.errors",
    "ImageError": "vitviz.errors",
    "LayoutError": "vitviz.errors",
    "ModelNotFoundError": "vitviz.errors",
    "WeightsNotFoundError": "vitviz.errors",
    "PreprocessError": "vitviz.errors",
    "MissingExtraError": "vitviz.errors",
    "UnplacedAttentionError": "vitviz.errors",
    "IncompleteCaptureWarning": "vitviz.errors",
    # load
    "VisionModel": "vitviz.models",
    "wrap": "vitviz.models",
    "load_model": "vitviz.models",
    "list_models": "vitviz.models",
    "load_image": "vitviz.models",
    "to_rgb_array": "vitviz.models",
    "Preprocess": "vitviz.models",
    # capture
    "capture": "vitviz.attention",
    "Recording": "vitviz.attention",
    # analyze
    "rollout": "vitviz.analyze",
    "cls_maps": "vitviz.analyze",
    "chefer_relevance": "vitviz.analyze",
    "grad_rollout": "vitviz.analyze",
    "word_grids": "vitviz.analyze",
    "query_maps": "vitviz.analyze",
    "attention_flow": "vitviz.analyze",
    "mass_masks": "vitviz.analyze",
    "attention_entropy": "vitviz.analyze",
    "mean_attention_distance": "vitviz.analyze",
    "prefix_attention_share": "vitviz.analyze",
    "pos_similarity": "vitviz.models",
    # captioning
    "caption": "vitviz.explain",
    "Caption": "vitviz.explain",
    # batch
    "build_gallery": "vitviz.gallery",
    "merge_gallery": "vitviz.gallery",
    # explain (model + capture + analyzer)
    "relevance": "vitviz.explain",
    "explain_text": "vitviz.explain",
    "TextMaps": "vitviz.explain",
    # explore (model + capture + analyzers + page)
    "explore": "vitviz.explorer",
    "Explorer": "vitviz.explorer",
    # render
    "overlay": "vitviz.render",
}

_SUBMODULES = {"metrics": "vitviz.evaluate", "zoo": "vitviz.zoo", "gallery": "vitviz.gallery"}
# `vitviz.metrics.pointing_game(...)` without an import; vitviz.metrics is the evaluation package

__all__ = sorted(_EXPORTS) + list(_SUBMODULES) + ["__version__"]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(_SUBMODULES[name])
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vitviz' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # for type checkers and IDEs
    from .analyze import (
        attention_entropy,
        attention_flow,
        chefer_relevance,
        cls_maps,
        grad_rollout,
        mass_masks,
        mean_attention_distance,
        prefix_attention_share,
        query_maps,
        rollout,
        word_grids,
    )
    from .attention import Recording, capture
    from .errors import (
        CaptureError,
        CheckpointError,
        ImageError,
        IncompleteCaptureWarning,
        LayoutError,
        MissingExtraError,
        ModelNotFoundError,
        PreprocessError,
        UnplacedAttentionError,
        VitvizError,
        WeightsNotFoundError,
    )
    from .explain import Caption, TextMaps, caption, explain_text, relevance
    from .explorer import Explorer, explore
    from .gallery import build_gallery, merge_gallery
    from .models import Preprocess, VisionModel, list_models, load_image, load_model, pos_similarity, to_rgb_array, wrap
    from .render import overlay
    from .types import AttentionMaps, CrossAttentionMaps, TokenLayout
