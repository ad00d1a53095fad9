"""Class names of a classifier: a name or an index to a class index, and the list to show.

A model's names are ``VisionModel.labels``: the bundled shapes models carry theirs, timm
ImageNet models get timm's descriptions (``"tabby, tabby cat"``) and transformers models
their config's ``id2label``. A name matches a class when it equals the whole label or one of
its comma-separated synonyms, ignoring case, spaces around it and ``_`` versus space.
"""

from __future__ import annotations

import difflib
from typing import Any

from ..errors import VitvizError


def _norm(text: str) -> str:
    return " ".join(str(text).replace("_", " ").lower().split())


def _names(label: str) -> list[str]:
    """The label itself and its comma-separated synonyms, normalised."""
    whole = _norm(label)
    parts = [_norm(p) for p in str(label).split(",") if p.strip()]
    return [whole] + [p for p in parts if p != whole]


def class_index(model: Any, value: int | str, *, what: str = "--class") -> int:
    """The class index ``value`` names: an index (``281``, ``"281"``) or a class name.

    Args:
        model: a :class:`vitviz.VisionModel` (its ``labels`` and ``name`` are read).
        value: a class index, or a name from ``model.labels`` (whole or one synonym, any case).
        what: how the value was given, for the message (``"--class"``, ``"target="``).

    Returns:
        The class index (not checked against the classifier's size for an index: the model
        does that when it runs).

    Raises:
        VitvizError: a name for a model without class names, an unknown name (with the
            closest names), or a name that fits several classes.

    Example:
        >>> class_index(load_model("shapes-vit"), "triangle")
        2
    """
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    name = getattr(model, "name", None) or "the model"
    labels = getattr(model, "labels", None)
    if not labels:
        raise VitvizError(f"{what} {text!r}: {name} has no class names; give a class index instead "
                          "(an integer from 0)")
    key = _norm(text)
    exact = [i for i, lab in enumerate(labels) if _norm(lab) == key]
    hits = exact or [i for i, lab in enumerate(labels) if key in _names(lab)]
    if len(hits) == 1:
        return hits[0]
    if hits:
        shown = ", ".join(f"{i} ({labels[i]})" for i in hits[:6])
        raise VitvizError(f"{what} {text!r} names {len(hits)} classes of {name}: {shown}; give the index")
    every = {n: i for i, lab in enumerate(labels) for n in _names(lab)}
    close = difflib.get_close_matches(key, list(every), n=5, cutoff=0.6)
    hint = ("; close: " + ", ".join(f"{n} ({every[n]})" for n in close)) if close else ""
    raise VitvizError(f"{what} {text!r} is not a class name of {name}{hint}; list them with "
                      f"`vitviz classes {name}`")


def class_label(model: Any, index: int, prob: float | None = None) -> str:
    """A class as figures and command output name it: ``"star (class 3, p=0.93)"`` for a model
    with class names, else ``"class 3 (p=0.93)"``.

    Args:
        model: a :class:`vitviz.VisionModel`.
        index: the class index.
        prob: the class's probability, shown when given.

    Returns:
        The text.
    """
    labels = getattr(model, "labels", None)
    p = f", p={prob:.2f}" if prob is not None else ""
    if labels and 0 <= index < len(labels):
        return f"{labels[index]} (class {index}{p})"
    return f"class {index} ({p[2:]})" if p else f"class {index}"
