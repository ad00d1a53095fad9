"""Heatmaps over images with OpenCV."""

from __future__ import annotations

import numpy as np

_CV2_MAPS = {
    "jet": "COLORMAP_JET", "viridis": "COLORMAP_VIRIDIS", "inferno": "COLORMAP_INFERNO",
    "magma": "COLORMAP_MAGMA", "plasma": "COLORMAP_PLASMA", "turbo": "COLORMAP_TURBO",
    "hot": "COLORMAP_HOT", "bone": "COLORMAP_BONE", "cool": "COLORMAP_COOL",
    "parula": "COLORMAP_PARULA", "rainbow": "COLORMAP_RAINBOW", "cividis": "COLORMAP_CIVIDIS",
}


def as_rgb_uint8(image) -> np.ndarray:
    """An ``HxWx3`` uint8 RGB array from an RGB array or a PIL image."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL.Image
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(
            f"image must be an HxWx3 uint8 RGB array or a PIL image, got {arr.dtype} {arr.shape}; "
            "convert it with vitviz.models.load_image(...) first"
        )
    return arr


def normalize_map(heatmap) -> np.ndarray:
    """Min-max scale a 2-D map to ``[0, 1]`` float32 (a constant map becomes zeros)."""
    if hasattr(heatmap, "detach"):  # torch.Tensor
        heatmap = heatmap.detach().float().cpu().numpy()
    h = np.asarray(heatmap, dtype=np.float32)
    h = np.squeeze(h)
    if h.ndim != 2:
        raise ValueError(f"heatmap must be 2-D [gh, gw], got shape {np.shape(heatmap)}")
    if not np.isfinite(h).all():
        raise ValueError("heatmap contains NaN or infinite values")
    lo, hi = float(h.min()), float(h.max())
    return (h - lo) / (hi - lo) if hi > lo else np.zeros_like(h)


def colorize(unit_map: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """Map a ``[0, 1]`` float array to ``HxWx3`` uint8 RGB with an OpenCV or matplotlib colormap."""
    import cv2

    u8 = np.clip(np.rint(unit_map * 255.0), 0, 255).astype(np.uint8)
    if cmap in _CV2_MAPS and hasattr(cv2, _CV2_MAPS[cmap]):
        bgr = cv2.applyColorMap(u8, getattr(cv2, _CV2_MAPS[cmap]))
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    import matplotlib

    try:
        lut = matplotlib.colormaps[cmap](np.arange(256))[:, :3]  # [256, 3] in [0, 1]
    except KeyError:
        raise ValueError(f"unknown colormap {cmap!r}; try one of {', '.join(_CV2_MAPS)}") from None
    return (lut[u8] * 255.0 + 0.5).astype(np.uint8)


def overlay(image, heatmap, *, cmap: str = "jet", alpha: float = 0.5) -> np.ndarray:
    """Draw a patch-grid heatmap over an image.

    The map is min-max scaled to ``[0, 1]``, upsampled to the image size with bicubic
    interpolation, coloured, and blended: ``out = (1 - alpha) * image + alpha * colour``.

    Args:
        image: ``HxWx3`` uint8 RGB array or PIL image (the image the model saw, e.g.
            ``model.preprocessor.view(path)``).
        heatmap: ``[gh, gw]`` map (tensor or array), any scale.
        cmap: OpenCV colormap name (``"jet"``, ``"inferno"``, ...) or any matplotlib name.
        alpha: weight of the heatmap; ``alpha=0`` returns the image unchanged.

    Returns:
        ``HxWx3`` uint8 RGB array.

    Example:
        >>> vis = vitviz.overlay(img, vitviz.rollout(rec.attentions)[0], alpha=0.5)
    """
    import cv2

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    img = as_rgb_uint8(image)
    unit = normalize_map(heatmap)  # [gh, gw] in [0, 1]
    h, w = img.shape[:2]
    up = np.clip(cv2.resize(unit, (w, h), interpolation=cv2.INTER_CUBIC), 0.0, 1.0)  # [H, W]
    colour = colorize(up, cmap).astype(np.float32)  # [H, W, 3]
    out = (1.0 - alpha) * img.astype(np.float32) + alpha * colour
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def overlay_region(image, heatmap, box, *, cmap: str = "jet", alpha: float = 0.5) -> np.ndarray:
    """Draw a patch-grid heatmap over the part of a full-resolution image the model saw.

    ``box`` is the model's view on ``image`` (:meth:`vitviz.models.Preprocess.region`): the
    map is min-max scaled, upsampled bicubically to the box's size in the image's own pixels,
    coloured and blended inside the box as :func:`overlay` does; pixels the model never saw
    (cut off by the centre crop) stay as they are. Parts of the box outside the image (padding)
    are dropped.

    Args:
        image: ``HxWx3`` uint8 RGB array or PIL image, the original picture.
        heatmap: ``[gh, gw]`` map (tensor or array), any scale.
        box: ``(left, top, right, bottom)`` in ``image`` pixels (floats allowed).
        cmap, alpha: as :func:`overlay`.

    Returns:
        ``HxWx3`` uint8 RGB array of ``image``'s size.

    Example:
        >>> pre = m.preprocessor
        >>> vis = overlay_region(load_image("cat.jpg"), heat[0], pre.region("cat.jpg"))
    """
    import cv2

    from ..errors import RenderError

    if not 0.0 <= alpha <= 1.0:
        raise RenderError(f"alpha must be in [0, 1], got {alpha}")
    img = as_rgb_uint8(image)
    h, w = img.shape[:2]
    try:
        left, top, right, bottom = (float(v) for v in box)
    except (TypeError, ValueError):
        raise RenderError(f"box must be four numbers (left, top, right, bottom), got {box!r}") from None
    if not (right > left and bottom > top) or not all(np.isfinite((left, top, right, bottom))):
        raise RenderError(f"box must be finite with right > left and bottom > top, got {box!r}; "
                          "use model.preprocessor.region(image)")
    x0, y0 = int(round(left)), int(round(top))
    bw, bh = max(int(round(right)) - x0, 1), max(int(round(bottom)) - y0, 1)
    unit = normalize_map(heatmap)  # [gh, gw] in [0, 1]
    up = np.clip(cv2.resize(unit, (bw, bh), interpolation=cv2.INTER_CUBIC), 0.0, 1.0)  # [bh, bw]
    # the part of the box inside the image
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x0 + bw, w), min(y0 + bh, h)
    out = img.copy()
    if ix1 <= ix0 or iy1 <= iy0:
        return out
    colour = colorize(up[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0], cmap).astype(np.float32)  # [h', w', 3]
    patch = img[iy0:iy1, ix0:ix1].astype(np.float32)
    out[iy0:iy1, ix0:ix1] = np.clip(np.rint((1.0 - alpha) * patch + alpha * colour), 0, 255).astype(np.uint8)
    return out
