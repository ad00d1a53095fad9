"""The attention explorer: one self-contained HTML page built from plain arrays.

The page (template ``view.html`` next to this file) shows the model's view of the image and,
over it, the attention of a query token the user picks (a click on a patch, or a CLS,
distillation or register token) at a chosen layer and head, the rollout up to that layer, or
the class relevance; beside it the share of the query's attention that goes to the prefix
tokens in every layer (on a percent axis), and the top-5 prediction. The map is drawn as
:func:`vitviz.overlay` draws it by default (its colour map, patch blocks, opacity growing with
the value; the page's script repeats the formula, and a browser test checks the pixels against
it). Layers, heads, patches and register tokens are numbered from 0, as ``layer=`` in the API.
Everything is inline (script, style, the image as a PNG data URL, the numbers as base64): no
request leaves the file, so it works from ``file://`` and can be mailed.

Numbers are stored compactly: every attention row is split into its prefix keys (float32, so
the prefix share is exact to float32) and its patch keys, quantised to uint8 from the row's
smallest to its largest patch value (error at most ``(max - min) / 510``; see
:func:`quantize_rows`). When the page would exceed ``max_bytes``, the
per-head rows of the earliest layers are dropped (their mean and max stay) and the page says so.

This module takes numpy arrays only: it imports neither models nor hooks.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

TEMPLATE = Path(__file__).resolve().parent / "view.html"
DEFAULT_MAX_BYTES = 40_000_000  # ViT-B/16 at 384 px fits with the per-head rows of its last layers


@dataclass
class ExploreData:
    """Everything the explorer page shows, as plain arrays.

    Attributes:
        image: ``[H, W, 3]`` uint8 RGB, the model's view of the image (what the patches cover).
        attention: ``[L, Hd, N, N]`` float attention probabilities (rows sum to 1).
        num_prefix: prefix tokens (CLS, distillation, registers) before the patches.
        grid: ``(gh, gw)`` patch rows and columns; ``N == num_prefix + gh * gw``.
        prefix_names: one display name per prefix token (e.g. ``["CLS", "dist"]``).
        rollout: ``[L, N, N]`` rollout products ``R_l = Â_l … Â_1`` (mean over heads), or None.
        relevance: ``[N, N]`` non-negative rows of Chefer et al. 2021 relevance of the explained
            class (row ``i``: what token ``i`` draws on), or None.
        relevance_class: the name of the explained class.
        top5: ``(class name, probability)`` pairs, most probable first (empty without a classifier).
        title: the page title (usually the image's file name); HTML-escaped on the page.
        model_name: shown under the title; HTML-escaped on the page.
        notes: extra lines shown on the page.
    """

    image: np.ndarray
    attention: np.ndarray
    num_prefix: int
    grid: tuple[int, int]
    prefix_names: list[str]
    rollout: np.ndarray | None = None
    relevance: np.ndarray | None = None
    relevance_class: str = ""
    top5: list[tuple[str, float]] = field(default_factory=list)
    title: str = "vitviz explorer"
    model_name: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class QuantizedRows:
    """Attention rows as uint8 codes over the patch keys plus exact prefix keys.

    Attributes:
        codes: ``[..., P]`` uint8, ``round((v - min_row) / scale)`` over the patch keys.
        offset: ``[...]`` float32, the row's smallest patch value.
        scale: ``[...]`` float32, ``(max_row - min_row) / 255`` (0 for a constant row).
        prefix: ``[..., p]`` float32, the prefix-key values as they are.
    """

    codes: np.ndarray
    offset: np.ndarray
    scale: np.ndarray
    prefix: np.ndarray

    def dequantize(self) -> np.ndarray:
        """``[..., p + P]`` float32 rows: prefix values, then ``offset + codes * scale``."""
        patches = self.offset[..., None] + self.codes.astype(np.float32) * self.scale[..., None]  # [..., P]
        return np.concatenate([self.prefix, patches], axis=-1)


def quantize_rows(rows: np.ndarray, num_prefix: int) -> QuantizedRows:
    """Split rows into exact prefix keys and uint8-quantised patch keys.

    The patch part of every row is mapped onto 0..255 from its own smallest to its largest
    value, so a row whose mass sits mostly on a prefix token (an attention sink), or a nearly
    uniform row, keeps the detail among its patches, and the page's min-max colour scale of a
    row is exact to 8 bits. The reconstruction error of a patch value is at most
    ``(max_row - min_row) / 510``.

    Args:
        rows: ``[..., N]`` floats.
        num_prefix: how many leading keys are prefix tokens (kept as float32).

    Returns:
        :class:`QuantizedRows`.

    Example:
        >>> q = quantize_rows(np.array([[0.5, 0.1, 0.2, 0.4]]), 1)
        >>> q.codes, q.prefix
        (array([[  0,  85, 255]], dtype=uint8), array([[0.5]], dtype=float32))
    """
    r = np.asarray(rows, dtype=np.float32)
    prefix = np.ascontiguousarray(r[..., :num_prefix])  # [..., p]
    patches = r[..., num_prefix:]  # [..., P]
    if patches.shape[-1]:
        lo, hi = patches.min(axis=-1), patches.max(axis=-1)  # [...]
    else:
        lo = hi = np.zeros(r.shape[:-1], np.float32)
    scale = ((hi - lo) / 255.0).astype(np.float32)  # [...]
    safe = np.where(scale > 0, scale, 1.0)[..., None]
    codes = np.clip(np.rint((patches - lo[..., None]) / safe), 0, 255).astype(np.uint8)  # [..., P]
    return QuantizedRows(codes, lo.astype(np.float32), scale, prefix)


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def _b64_len(nbytes: int) -> int:
    return 4 * math.ceil(nbytes / 3)


def _block(name: str, q: QuantizedRows) -> tuple[dict[str, str], int]:
    """The base64 strings of a quantised block (``name``, ``name_s``, ``name_p``) and their size."""
    parts = {name: q.codes, f"{name}_o": q.offset.astype("<f4"), f"{name}_s": q.scale.astype("<f4"),
             f"{name}_p": q.prefix.astype("<f4")}
    out = {k: _b64(v) for k, v in parts.items()}
    return out, sum(len(v) for v in out.values())


def _rows_size(shape_rows: tuple[int, ...], n: int, p: int) -> int:
    """Base64 size of a quantised block with rows of shape ``shape_rows`` and ``n`` keys."""
    rows = int(np.prod(shape_rows))
    return _b64_len(rows * (n - p)) + 2 * _b64_len(rows * 4) + _b64_len(rows * p * 4)


def _png_data_url(rgb: np.ndarray) -> str:
    import cv2

    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("the image could not be encoded as PNG")
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def _json_for_script(value: Any) -> str:
    """JSON that is safe inside a ``<script>`` element (no ``</script>``, no ``<!--``)."""
    text = json.dumps(value, ensure_ascii=True, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _ranges(layers: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0–2, 5"`` (0-based, as ``layer=`` in the API and on the page)."""
    spans: list[list[int]] = []
    for i in layers:
        if spans and spans[-1][1] == i - 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(f"{a}" if a == b else f"{a}–{b}" for a, b in spans)


def _check(data: ExploreData) -> tuple[int, int, int]:
    a = data.attention
    if a.ndim != 4 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"attention must be [L, heads, N, N], got shape {a.shape}")
    num_layers, _, n, _ = a.shape
    gh, gw = data.grid
    if n != data.num_prefix + gh * gw:
        raise ValueError(f"{n} tokens do not fit {data.num_prefix} prefix tokens + a {gh}x{gw} grid")
    if len(data.prefix_names) != data.num_prefix:
        raise ValueError(f"{len(data.prefix_names)} prefix names for {data.num_prefix} prefix tokens")
    img = data.image
    if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
        raise ValueError(f"image must be [H, W, 3] uint8, got {img.shape} {img.dtype}")
    if data.rollout is not None and data.rollout.shape != (num_layers, n, n):
        raise ValueError(f"rollout must be [L, N, N] = {(num_layers, n, n)}, got {data.rollout.shape}")
    if data.relevance is not None and data.relevance.shape != (n, n):
        raise ValueError(f"relevance must be [N, N] = {(n, n)}, got {data.relevance.shape}")
    return num_layers, a.shape[1], n


def explore_payload(data: ExploreData, *, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[dict[str, Any], dict[str, str]]:
    """The page's metadata and its base64 data blocks.

    Blocks: ``mean`` and ``max`` ``[L, N, ·]`` (head fusions of every layer), ``heads``
    ``[Lh, Hd, N, ·]`` (the layers in ``meta["head_layers"]``), ``rollout`` ``[L, N, ·]`` and
    ``relevance`` ``[N, ·]``, each quantised as :func:`quantize_rows` (``name`` codes,
    ``name_o`` offsets, ``name_s`` scales, ``name_p`` prefix values, little-endian float32).

    Per-head rows are kept for the last layers first: as many as ``max_bytes`` leaves room for
    once everything else is in; ``meta["dropped"]`` says what was left out.

    Returns:
        ``(meta, blocks)``.
    """
    num_layers, heads, n = _check(data)
    p = data.num_prefix
    a = np.asarray(data.attention, dtype=np.float32)  # [L, Hd, N, N]
    blocks: dict[str, str] = {}
    used = 0
    for name, arr in (("mean", a.mean(axis=1)), ("max", a.max(axis=1))):  # [L, N, N]
        b, size = _block(name, quantize_rows(arr, p))
        blocks.update(b)
        used += size
    if data.rollout is not None:
        b, size = _block("rollout", quantize_rows(data.rollout, p))
        blocks.update(b)
        used += size
    if data.relevance is not None:
        b, size = _block("relevance", quantize_rows(data.relevance, p))
        blocks.update(b)
        used += size
    gh, gw = data.grid
    meta: dict[str, Any] = {
        "title": data.title, "model": data.model_name, "layers": num_layers, "heads": heads,
        "tokens": n, "prefix": p, "grid": [gh, gw], "prefix_names": list(data.prefix_names),
        "head_layers": [], "has_rollout": data.rollout is not None,
        "has_relevance": data.relevance is not None, "relevance_class": data.relevance_class,
        "top5": [[str(c), float(v)] for c, v in data.top5], "image": _png_data_url(data.image),
        "size": [int(data.image.shape[0]), int(data.image.shape[1])], "dropped": [],
        "notes": list(data.notes), **_look(),
    }
    # an upper bound of everything but the per-head rows: template, names, metadata (with room
    # for the two notes on what was dropped and the list of kept layers), data elements
    escaped = len(html.escape(data.title, quote=True)) * 2 + len(html.escape(data.model_name, quote=True))
    used += (len(TEMPLATE.read_text(encoding="utf-8")) + escaped + len(_json_for_script(meta)) + 600
             + 8 * num_layers + 80 * (len(blocks) + 4))
    per_layer = _rows_size((heads, n), n, p)
    room = max(0, max_bytes - used)
    keep = 0 if heads <= 1 else min(num_layers, room // per_layer)
    meta["head_layers"] = list(range(num_layers - keep, num_layers))
    if keep:
        b, _ = _block("heads", quantize_rows(a[num_layers - keep:], p))
        blocks.update(b)
    dropped: list[str] = meta["dropped"]
    if heads > 1 and keep < num_layers:
        dropped.append(f"Per-head rows of layer{'s' if num_layers - keep > 1 else ''} "
                       f"{_ranges(list(range(num_layers - keep)))} were left out to keep the page under "
                       f"{max_bytes / 1e6:.3g} MB: there, only the mean and the max over heads can be shown.")
    if used > max_bytes:
        dropped.append(f"The page is about {used / 1e6:.3g} MB, over the {max_bytes / 1e6:.3g} MB asked for, "
                       "even without per-head rows.")
    return meta, blocks


def _look() -> dict[str, Any]:
    """How the page draws a map, the same as :func:`vitviz.overlay`'s default: ``lut`` (the colour
    table of the default colour map, 256 RGB triples, flat), ``cmap`` (its name), and the opacity
    ``a = alpha_max * u ** alpha_gamma`` of a value scaled to ``u`` in ``[0, 1]`` (the page's
    opacity slider starts at ``alpha_max`` and sets the opacity at the peak)."""
    from ..render import ALPHA_GAMMA, ALPHA_MAX, DEFAULT_CMAP, colormap_lut

    lut = colormap_lut(DEFAULT_CMAP)  # [256, 3] uint8
    return {"lut": [int(v) for v in lut.reshape(-1)], "cmap": DEFAULT_CMAP,
            "alpha_max": float(ALPHA_MAX), "alpha_gamma": float(ALPHA_GAMMA)}


def render_explore(data: ExploreData, *, max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """The explorer page for ``data`` as one self-contained HTML string.

    Args:
        data: :class:`ExploreData`.
        max_bytes: size the page should stay under; per-head rows of the earliest layers are
            dropped to get there (the page says which).

    Returns:
        The HTML text (UTF-8 when written).

    Example:
        >>> page = render_explore(ExploreData(image=rgb, attention=a, num_prefix=1, grid=(14, 14),
        ...                                   prefix_names=["CLS"]))
    """
    meta, blocks = explore_payload(data, max_bytes=max_bytes)
    data_tags = "\n".join(f'<script type="application/octet-stream" id="vv-{k}">{v}</script>'
                          for k, v in blocks.items())
    values = {"TITLE": html.escape(data.title, quote=True), "SUBTITLE": html.escape(data.model_name, quote=True),
              "DATA": data_tags, "META": _json_for_script(meta)}
    # one pass over the template: a title that contains "{{DATA}}" stays text
    return re.sub(r"\{\{([A-Z]+)\}\}", lambda m: values[m.group(1)], TEMPLATE.read_text(encoding="utf-8"))
