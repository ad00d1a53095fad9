"""Model + capture + analysis: one call from a model and an image to a map.

* :mod:`vitviz.explain.relevance`: class-specific relevance (one forward, one backward, a pure map);
* :mod:`vitviz.explain.text`: text -> image maps of CLIP / SigLIP / open_clip models;
* :mod:`vitviz.explain.captioning`: a caption and the cross-attention of every generated word.

Example:
    >>> maps = vitviz.explain.relevance(m, x, target=281)          # [B, gh, gw]
    >>> cap = vitviz.explain.caption(m, "girl.jpg")                # cap.text, cap.cross
"""

from .captioning import Caption, Word, caption, greedy_decode, split_words
from .relevance import (
    RelevanceResult,
    Target,
    backward_through_attention,
    logits_of,
    relevance,
    relevance_pass,
    resolve_targets,
)
from .text import METHODS as TEXT_METHODS
from .text import TextMaps, explain_text, text_maps, towers

__all__ = ["relevance", "relevance_pass", "RelevanceResult", "Target", "logits_of", "resolve_targets",
           "backward_through_attention", "explain_text", "text_maps", "TextMaps", "towers", "TEXT_METHODS",
           "caption", "Caption", "Word", "split_words", "greedy_decode"]
