"""Reading images from files, PIL images and arrays into 8-bit RGB.

Every odd input a user may hand over is either turned into an RGB image or reported
with a :class:`~vitviz.errors.ImageError` that names the file, says what is wrong and
what to do:

========================  ==============================================================
input                     handling
========================  ==============================================================
EXIF orientation          applied (``ImageOps.exif_transpose``): phone photos come upright
``1``, ``L``, ``CMYK``,   Pillow's own conversion to RGB
``YCbCr``, ``P``
``LA``, ``PA``, ``RGBA``, composited over a white background (transparent = white)
``P`` with transparency
``I;16*`` (16-bit)        scaled by the range of the type: ``v * 255 / 65535``, rounded.
                          ``Image.convert("RGB")`` would clip everything above 255
``I`` (32-bit int)        the same 16-bit scaling when the values fit in ``[0, 65535]``
                          (Pillow's mode for 16-bit data from some formats), else the
                          image's own min..max range
``F`` (32-bit float)      ``v * 255`` when the values lie in ``[0, 1]``, else min..max
missing file, directory,  ImageError naming the file and the fix
empty file, not an image,
truncated or corrupt,
decompression bomb
========================  ==============================================================

Arrays: ``HxW`` (grayscale), ``HxWx1``, ``HxWx3`` (RGB), ``HxWx4`` (RGBA) of ``uint8``;
``uint16`` (scaled like 16-bit images); ``bool``; floats in ``[0, 1]``.
"""

from __future__ import annotations

import os
import struct
import warnings
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .._util.files import usable_file
from ..errors import ImageError

ImageSource = Union[str, "os.PathLike[str]", Image.Image, np.ndarray]

_WHITE = (255, 255, 255)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I;16S", "I;16LS", "I;16BS")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_PIL_RGB_CONVERTIBLE = ("1", "L", "CMYK", "YCbCr", "RGBX")
# leading bytes of common formats: a file that starts like one but that Pillow cannot identify
# is reported as truncated rather than as "not an image"
_SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF8", "GIF"),
               (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


# --------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------

def load_image(source: Any) -> Image.Image:
    """Load an image as an 8-bit RGB ``PIL.Image``.

    Args:
        source: a path (``str`` or ``os.PathLike``), an open binary file object, a
            ``PIL.Image``, or a numpy array (``HxW``, ``HxWx1``, ``HxWx3`` RGB or ``HxWx4``
            RGBA; ``uint8``, ``uint16``, ``bool``, or float with values in ``[0, 1]``).

    Returns:
        A ``PIL.Image`` in mode ``"RGB"``, upright according to its EXIF orientation. A
        new object: the caller's PIL image is never modified.

    Raises:
        ImageError: the source cannot be read; the message names it, says why and what to do.

    Example:
        >>> load_image("cat.jpg").mode
        'RGB'
        >>> load_image(np.zeros((4, 6), np.uint8)).size   # (width, height)
        (6, 4)
    """
    if isinstance(source, Image.Image):
        name = _pil_name(source)
        try:
            source.load()  # an image from Image.open() is decoded lazily: fail here, by name
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as e:
            raise ImageError(name, f"the image data is truncated or corrupt: {e}; re-create or "
                                   "re-download the file") from e
        return _to_rgb(_exif_upright(source, name), name)
    if isinstance(source, np.ndarray):
        return _from_array(source)
    if isinstance(source, (str, os.PathLike)):
        return _from_path(source)
    if hasattr(source, "read"):
        name = str(getattr(source, "name", "<file object>"))
        return _from_file(source, name)
    kind = type(source).__module__ + "." + type(source).__qualname__
    if kind.startswith("torch."):
        hint = ("a tensor is taken as already preprocessed by VisionModel.preprocess; to load it "
                "as an image pass tensor.permute(1, 2, 0).numpy() (HxWx3, values in [0, 1])")
    else:
        hint = "pass a file path, a PIL.Image or an HxWx3 uint8 numpy array"
    raise ImageError(f"<{kind}>", f"cannot read an image from a {kind}; {hint}")


def to_rgb_array(image: Any) -> np.ndarray:
    """Any input :func:`load_image` takes, as an ``HxWx3`` ``uint8`` RGB array.

    Args:
        image: path, file object, ``PIL.Image`` or numpy array (see :func:`load_image`).

    Returns:
        A C-contiguous, writable ``np.ndarray`` of shape ``[H, W, 3]`` and dtype ``uint8``.

    Example:
        >>> to_rgb_array(np.zeros((2, 3), np.uint8)).shape
        (2, 3, 3)
    """
    arr = np.asarray(load_image(image), dtype=np.uint8)  # [H, W, 3]
    return np.array(arr, dtype=np.uint8, order="C", copy=True)


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------

def _from_path(path) -> Image.Image:
    name = os.fspath(path)
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    size = usable_file(name)
    try:
        fh = open(name, "rb")
    except OSError as e:
        raise ImageError(name, f"cannot be opened ({e.strerror or e}); check its permissions") from e
    with fh:
        return _from_file(fh, name, size=size)


def _from_file(fh, name: str, size: int | None = None) -> Image.Image:
    """Open, fully decode and convert an image from a binary file object."""
    # Pillow warns above Image.MAX_IMAGE_PIXELS and raises above twice that; both are refused
    # here, with the size and how to raise the limit. The warning is turned into an error
    # only inside this block (the global warning filters are restored on exit).
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(fh)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(name, _bomb_reason(e)) from e
    except UnidentifiedImageError as e:
        raise ImageError(name, _not_an_image_reason(fh, name)) from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(name, f"the file header is corrupt ({e}); re-create or re-download it") from e
    with im:
        fmt = im.format or "image"
        try:
            # force a full decode now: Pillow decodes lazily, and a truncated file would
            # otherwise fail (or come out half grey) much later. ImageFile.LOAD_TRUNCATED_IMAGES
            # is left as the user set it.
            im.load()
        except Image.DecompressionBombError as e:  # pragma: no cover - raised at open in Pillow
            raise ImageError(name, _bomb_reason(e)) from e
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as e:
            size_txt = f" (the file has {size} bytes)" if size is not None else ""
            raise ImageError(
                name, f"the {fmt} data is truncated or corrupt{size_txt}: {e}; the file was not "
                      "written or downloaded completely; re-create or re-download it") from e
        im = _exif_upright(im, name)
        return _to_rgb(im, name)


def _bomb_reason(e: Exception) -> str:
    limit = Image.MAX_IMAGE_PIXELS
    msg = str(e)
    return (f"image too large to load safely ({msg.rstrip('.')}). It may be a decompression bomb; "
            f"if you trust this file, raise Pillow's limit (now {limit} pixels) with "
            "`PIL.Image.MAX_IMAGE_PIXELS = None` (or a larger number) before loading it")


def _not_an_image_reason(fh, name: str) -> str:
    head = b""
    try:
        fh.seek(0)
        head = fh.read(16)
    except (OSError, ValueError, AttributeError):
        pass
    ext = os.path.splitext(name)[1]
    from ._video_read import video_kind

    video = video_kind(head, name)
    if video is not None:
        return (f"is a video ({video}), not an image, and the model takes still images; to map a video use a "
                "video model (VideoMAE, ViViT, TimeSformer) with --model, or extract frames as images "
                f"(ffmpeg -i {os.path.basename(name)} frame_%03d.png)")
    for magic, fmt in _SIGNATURES:
        if head.startswith(magic):
            return (f"starts like a {fmt} file but its header is truncated or corrupt; the file was "
                    "not written or downloaded completely; re-create or re-download it")
    what = f"a {ext} file" if ext else "the file"
    shown = ""
    if head:
        printable = all(32 <= b < 127 or b in (9, 10, 13) for b in head)
        start = head.decode("ascii") if printable else head[:8]
        shown = f" (it starts with {start!r})"
    return (f"not an image Pillow can read: {what} whose content is not in any known image "
            f"format{shown}; check that it is really an image, or convert it to PNG or JPEG")


# --------------------------------------------------------------------------------------------
# PIL images
# --------------------------------------------------------------------------------------------

def _pil_name(im: Image.Image) -> str:
    filename = getattr(im, "filename", "") or ""
    return str(filename) if filename else f"<PIL.Image mode={im.mode} size={im.width}x{im.height}>"


def _exif_upright(im: Image.Image, name: str) -> Image.Image:
    """Apply the EXIF orientation tag; a malformed tag is ignored with a warning."""
    try:
        out = ImageOps.exif_transpose(im)
    except Exception as e:  # noqa: BLE001 - Pillow raises many types on broken EXIF blocks
        warnings.warn(f"{name}: EXIF orientation ignored ({type(e).__name__}: {e})", stacklevel=3)
        return im
    return out if out is not None else im


def _to_rgb(im: Image.Image, name: str) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (see the module docstring for the rules)."""
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode == "P":
        if "transparency" in im.info or (im.palette is not None and im.palette.mode == "RGBA"):
            return _over_white(im.convert("RGBA"))
        return im.convert("RGB")
    if mode in _ALPHA_MODES:
        return _over_white(im.convert("RGBA"))
    if mode in _PIL_RGB_CONVERTIBLE:
        return im.convert("RGB")
    if mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(im)  # [H, W] uint16 (or >u2 / signed for the rare S modes)
        if arr.dtype.kind == "i":
            return _gray_to_rgb(_scale_min_max(arr))
        return _gray_to_rgb(_scale_16bit(arr))
    if mode == "I":
        arr = np.asarray(im)  # [H, W] int32
        if arr.size and arr.min() >= 0 and arr.max() <= 65535:
            return _gray_to_rgb(_scale_16bit(arr))
        return _gray_to_rgb(_scale_min_max(arr))
    if mode == "F":
        arr = np.asarray(im)  # [H, W] float32
        if not np.isfinite(arr).all():
            raise ImageError(name, "the float image holds NaN or infinite values; replace them "
                                   "before loading (e.g. np.nan_to_num)")
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            return _gray_to_rgb(_round_u8(arr * 255.0))
        return _gray_to_rgb(_scale_min_max(arr))
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(name, f"unsupported image mode {mode!r} ({e}); convert the image to RGB "
                               "(e.g. PNG or JPEG) with an image editor first") from e


def _over_white(rgba: Image.Image) -> Image.Image:
    """Composite an RGBA image over an opaque white background."""
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _scale_16bit(arr: np.ndarray) -> np.ndarray:
    """``[0, 65535]`` to ``[0, 255]``: ``round(v * 255 / 65535)`` in integer arithmetic."""
    wide = arr.astype(np.uint32)  # [H, W]
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def _scale_min_max(arr: np.ndarray) -> np.ndarray:
    """Stretch the image's own value range to ``[0, 255]`` (a constant image becomes 0)."""
    a = arr.astype(np.float64)  # [H, W]
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return _round_u8((a - lo) * 255.0 / (hi - lo))


def _round_u8(a: np.ndarray) -> np.ndarray:
    """Round half up (``floor(x + 0.5)``) and clip to ``uint8``."""
    return np.clip(np.floor(a + 0.5), 0, 255).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(gray, dtype=np.uint8)).convert("RGB")


# --------------------------------------------------------------------------------------------
# numpy arrays
# --------------------------------------------------------------------------------------------

def _from_array(arr: np.ndarray) -> Image.Image:
    name = f"<array shape={tuple(arr.shape)} dtype={arr.dtype}>"
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        raise ImageError(name, "looks channel-first (CxHxW); pass an HxWxC array, e.g. "
                               "arr.transpose(1, 2, 0)")
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4)):
        raise ImageError(name, "expected an image array of shape HxW (grayscale), HxWx3 (RGB) or "
                               "HxWx4 (RGBA)")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(name, "the array is empty (zero height or width)")
    u8 = _array_to_uint8(arr, name)  # [H, W] or [H, W, C]
    if u8.ndim == 3 and u8.shape[-1] == 1:
        u8 = u8[..., 0]
    u8 = np.ascontiguousarray(u8)
    if u8.ndim == 2:
        return Image.fromarray(u8).convert("RGB")
    if u8.shape[-1] == 4:
        return _over_white(Image.fromarray(u8))
    return Image.fromarray(u8)


def _array_to_uint8(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 2:  # uint16, either byte order
        return _scale_16bit(arr)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise ImageError(name, "the array holds NaN or infinite values; replace them first "
                                   "(e.g. np.nan_to_num)")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise ImageError(name, f"float arrays must hold values in [0, 1], got [{lo:.4g}, {hi:.4g}]; "
                                   "divide by 255 if the values are 0-255, or pass a uint8 array")
        return _round_u8(arr.astype(np.float64) * 255.0)
    fix = "arr.astype(np.uint8)" if arr.dtype.kind in "iu" else "a uint8 array"
    raise ImageError(name, f"unsupported array dtype {arr.dtype}; expected uint8 (0-255), uint16 or "
                           f"float in [0, 1]; if the values are 0-255 pass {fix}")


__all__ = ["load_image", "to_rgb_array", "ImageSource"]
