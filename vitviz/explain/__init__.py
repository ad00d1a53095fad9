"""Model + capture + analysis: one call from a model and an image to a map; THE registry of map methods.

* the registry (:mod:`vitviz.explain._methods`): :func:`register_method`, :func:`get_method`,
  :func:`list_methods`; every consumer (gallery, sanity checks, ``benchmark-maps``,
  ``vitviz methods``) reads it. :func:`compute_maps` gives one method's maps for a batch,
  :func:`run_methods` several sharing one forward (and backward) pass
  (:mod:`vitviz.explain._apply`);
* the shared steps (:mod:`vitviz.explain._shared`): :func:`captured` (a model run under capture:
  ``(output, rec)``), :func:`attentions_of` (its attention, or the one "nothing captured"
  error), :func:`logits_of`, :func:`resolve_targets`, :func:`check_classifier`;
* :func:`vitviz.explain.relevance`: class-specific relevance (one forward, one backward, a pure map);
* :mod:`vitviz.explain.text`: text -> image maps of CLIP / SigLIP / open_clip models;
* :mod:`vitviz.explain.captioning`: a caption and the cross-attention of every generated word;
* :mod:`vitviz.explain.baselines`: maps that ignore the model (random, centre prior).

Example:
    >>> maps = vitviz.explain.relevance(m, x, target=281)          # [B, gh, gw]
    >>> maps = vitviz.explain.compute_maps(m, x, "rollout", discard_ratio=0.9)
    >>> cap = vitviz.explain.caption(m, "girl.jpg")                # cap.text, cap.cross
"""

from ._apply import MethodsRun, compute_maps, run_methods, single_map_method
from ._methods import (
    NEEDS,
    OUTPUTS,
    LayerStream,
    Method,
    MethodInput,
    MethodResult,
    get_method,
    list_methods,
    register_method,
    unregister_method,
)
from ._relevance import RelevanceResult, relevance, relevance_pass
from ._shared import (
    Target,
    as_vision_model,
    attentions_of,
    backward_through_attention,
    captured,
    check_classifier,
    check_target_range,
    grid_of,
    logits_of,
    prepare_inputs,
    resolve_targets,
)
from .baselines import centre_prior, random_maps
from .captioning import Caption, Word, caption, greedy_decode, split_words
from .text import METHODS as TEXT_METHODS
from .text import TextMaps, explain_text, text_maps, towers

__all__ = ["relevance", "relevance_pass", "RelevanceResult", "Target", "logits_of", "resolve_targets",
           "backward_through_attention", "explain_text", "text_maps", "TextMaps", "towers", "TEXT_METHODS",
           "caption", "Caption", "Word", "split_words", "greedy_decode",
           # the registry of map methods
           "register_method", "unregister_method", "get_method", "list_methods", "Method", "MethodInput",
           "MethodResult", "NEEDS", "OUTPUTS", "LayerStream", "compute_maps", "run_methods", "MethodsRun",
           "single_map_method",
           # shared steps
           "captured", "attentions_of", "check_classifier", "check_target_range", "prepare_inputs",
           "as_vision_model", "grid_of", "random_maps", "centre_prior"]
