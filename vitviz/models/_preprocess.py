"""Image preprocessing: resize, centre crop, scale to [0, 1], normalise.

:class:`Preprocess` reproduces the evaluation transforms of the libraries the models come
from, pixel for pixel, with Pillow's resampling:

* timm's ``transforms_imagenet_eval`` (``timm.data.create_transform(**data_config)``):
  crop modes ``center`` (``resize_mode="shortest"``), ``squash`` and ``border``. timm
  resizes PIL images with ``PIL.Image.resize`` (through torchvision), so
  :meth:`Preprocess.from_timm` gives the same tensor bit for bit.
* transformers' image processors (``ViTImageProcessor``, ``DeiTImageProcessor``, ``CLIP…``):
  ``size={"height", "width"}`` (squash) or ``{"shortest_edge"}``, then an optional centre
  crop. The ``…Pil`` processors resize with Pillow as vitviz does: same values to float32
  rounding. The default ``…ImageProcessor`` classes of transformers 5 resize the ``uint8``
  tensor with ``torchvision.transforms.v2.functional.resize`` (torch's native uint8
  antialiased kernel on the CPU), whose fixed-point arithmetic rounds some pixels one grey
  level away from Pillow's: after normalisation a difference of at most ``1 / (255 * std)``
  (tested in ``tests/test_preprocess.py``).

:meth:`Preprocess.view` returns the resized and cropped RGB image as the model sees it,
before normalisation: the picture renderers draw attention maps over.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import PreprocessError
from ._image import load_image

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
# transformers' IMAGENET_STANDARD_MEAN / _STD: ViTImageProcessor's defaults
HF_VIT_MEAN = (0.5, 0.5, 0.5)
HF_VIT_STD = (0.5, 0.5, 0.5)
TIMM_DEFAULT_CROP_PCT = 0.875  # timm.data.constants.DEFAULT_CROP_PCT

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
# PIL's integer codes, as stored in transformers' preprocessor_config.json ("resample": 3)
_RESAMPLE_BY_CODE = {int(v): k for k, v in _RESAMPLE.items()}
_RESIZE_MODES = ("shortest", "squash", "border")
_CROP_OFFSETS = ("round", "floor")

SizeLike = int | Sequence[int]


def _hw(value: SizeLike, what: str) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)):
        h = w = int(value)
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        h, w = int(value[0]), int(value[1])
    else:
        raise PreprocessError(f"{what} must be an int or (height, width), got {value!r}")
    if h < 1 or w < 1:
        raise PreprocessError(f"{what} must be positive, got {(h, w)}")
    return h, w


def _triple(value: Any, what: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    vals = tuple(float(v) for v in value)
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3:
        raise PreprocessError(f"{what} must hold 3 values (R, G, B), got {value!r}")
    return vals  # type: ignore[return-value]


@dataclass
class Preprocess:
    """Turn images into model inputs ``[B, 3, H, W]`` the way the model was trained.

    Pipeline: load as RGB (:func:`~vitviz.models._image.load_image`), resize, centre crop
    (or pad) to ``size``, scale to ``[0, 1]``, subtract ``mean``, divide by ``std``.

    Args:
        size: ``(H, W)`` of the model input (an int means square).
        resize_mode: how the image is brought to ``size``:

            * ``"squash"`` (default): resize both sides to ``resize_size`` (by default
              ``size``), ignoring the aspect ratio, then centre crop to ``size``: nothing is
              cut off when ``crop_pct == 1``. transformers' ``ViTImageProcessor``; timm's
              ``crop_mode="squash"``.
            * ``"shortest"``: keep the aspect ratio, scale the shorter side to
              ``floor(size / crop_pct)``, centre crop to ``size``: timm's eval transform
              (``crop_mode="center"``) and transformers' ``{"shortest_edge"}`` resize.
            * ``"border"``: keep the aspect ratio, scale the *longer* side to
              ``floor(size / crop_pct)``, pad with the mean colour, crop to ``size``
              (timm's ``crop_mode="border"``).
        crop_pct: the fraction of the resized image kept by the centre crop (timm's
            ``crop_pct``); ``1.0`` keeps all of it.
        interpolation: ``"bicubic"`` (default), ``"bilinear"``, ``"nearest"``,
            ``"lanczos"``, ``"box"`` or ``"hamming"`` (Pillow's filters).
        mean: per-channel mean of the ``[0, 1]`` image (default ImageNet's).
        std: per-channel standard deviation (default ImageNet's).
        resize_size: overrides the size before the crop computed from ``crop_pct``. An int
            is the shorter side in ``"shortest"`` mode (the longer one is
            ``int(S * long / short)``, as torchvision's ``Resize(S)``); ``(h, w)`` in
            ``"shortest"`` mode scales by ``min(H / h, W / w)`` and rounds (timm's
            ``ResizeKeepRatio``); in ``"squash"`` mode it is the resized size.
        crop_offset: where a centre crop starts: ``"round"`` = ``round((H - h) / 2)``
            (torchvision's ``CenterCrop``, so timm) or ``"floor"`` = ``(H - h) // 2``
            (transformers).

    Shape:
        ``__call__``: ``[1, 3, H, W]`` float32; ``batch``: ``[B, 3, H, W]``;
        ``view``: ``[H, W, 3]`` uint8.

    Example:
        >>> pre = Preprocess(size=(224, 224), resize_mode="shortest", crop_pct=0.9)
        >>> pre("cat.jpg").shape
        torch.Size([1, 3, 224, 224])
        >>> pre.view("cat.jpg").shape          # what the model sees, for overlays
        (224, 224, 3)
    """

    size: int | tuple[int, int] = (224, 224)
    resize_mode: str = "squash"
    crop_pct: float = 1.0
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD
    resize_size: int | tuple[int, int] | None = None
    crop_offset: str = "round"

    def __post_init__(self) -> None:
        self.size = _hw(self.size, "size")
        if self.resize_mode not in _RESIZE_MODES:
            raise PreprocessError(
                f"resize_mode must be one of {', '.join(_RESIZE_MODES)}, got {self.resize_mode!r}")
        self.interpolation = _interp_name(self.interpolation)
        if not (isinstance(self.crop_pct, (int, float)) and 0.0 < float(self.crop_pct) <= 4.0):
            raise PreprocessError(f"crop_pct must be a number in (0, 4], got {self.crop_pct!r}")
        self.crop_pct = float(self.crop_pct)
        if self.crop_offset not in _CROP_OFFSETS:
            raise PreprocessError(
                f"crop_offset must be 'round' or 'floor', got {self.crop_offset!r}")
        self.mean = _triple(self.mean, "mean")
        self.std = _triple(self.std, "std")
        if any(s <= 0 for s in self.std):
            raise PreprocessError(f"std must be positive, got {self.std}")
        if self.resize_size is not None:
            if isinstance(self.resize_size, (int, np.integer)) and self.resize_mode == "shortest":
                self.resize_size = _hw(self.resize_size, "resize_size")[0]
            else:
                self.resize_size = _hw(self.resize_size, "resize_size")

    # -- the transform -----------------------------------------------------------------------
    def _scale_size(self) -> int | tuple[int, int]:
        """The size before the crop: timm's ``scale_size`` (``floor(size / crop_pct)``)."""
        if self.resize_size is not None:
            return self.resize_size
        h, w = (math.floor(s / self.crop_pct) for s in self.size)
        if self.resize_mode == "shortest" and h == w:
            return h  # timm: torchvision Resize(int) for square targets
        return h, w

    def _resized(self, im: Image.Image) -> Image.Image:
        w, h = im.size
        new_h, new_w = self._resized_hw(h, w)
        if (new_w, new_h) == (w, h):
            return im
        return im.resize((new_w, new_h), _RESAMPLE[self.interpolation])

    def _cropped(self, im: Image.Image) -> Image.Image:
        ch, cw = self.size
        w, h = im.size
        top, left = self._crop_origin(h, w)
        if top >= 0 and left >= 0:
            if (w, h) == (cw, ch):
                return im
            return im.crop((left, top, left + cw, top + ch))
        # torchvision CenterCrop / timm CenterCropOrPad: pad (floor on the left/top), then crop
        fill = (tuple(round(255 * m) for m in self.mean) if self.resize_mode == "border" else (0, 0, 0))
        canvas = Image.new("RGB", (cw, ch), fill)
        canvas.paste(im, (-left, -top))
        return canvas

    def _resized_hw(self, h: int, w: int) -> tuple[int, int]:
        """The size ``_resized`` gives an ``h x w`` image (same arithmetic, no pixels)."""
        scale = self._scale_size()
        if self.resize_mode == "squash":
            sh, sw = (scale, scale) if isinstance(scale, int) else scale
            return max(int(sh), 1), max(int(sw), 1)
        if self.resize_mode == "shortest" and isinstance(scale, int):
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = scale, int(scale * long / short)
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        else:
            sh, sw = (scale, scale) if isinstance(scale, int) else scale
            ratio_h, ratio_w = h / sh, w / sw
            ratio = max(ratio_h, ratio_w) if self.resize_mode == "border" else min(ratio_h, ratio_w)
            new_h, new_w = round(h / ratio), round(w / ratio)
        return max(int(new_h), 1), max(int(new_w), 1)

    def _crop_origin(self, h: int, w: int) -> tuple[int, int]:
        """``(top, left)`` of ``_cropped``'s window in the coordinates of its ``h x w`` input
        (negative where the window reaches into the padding)."""
        ch, cw = self.size
        oy = ox = 0
        if cw > w or ch > h:
            pw, ph = max(cw, w), max(ch, h)
            ox, oy = ((pw - w) // 2 if cw > w else 0), ((ph - h) // 2 if ch > h else 0)
            w, h = pw, ph
        if (w, h) == (cw, ch):
            return -oy, -ox
        if self.crop_offset == "round":
            top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
        else:
            top, left = (h - ch) // 2, (w - cw) // 2
        return top - oy, left - ox

    def region(self, image: Any) -> tuple[float, float, float, float]:
        """Where the model's view lies on the original image, in its pixels.

        The centre crop (or pad) of :meth:`view` mapped back through the resize: the view's
        pixel ``(x, y)`` covers the original's ``left + x * (right - left) / W``. With padding
        the box reaches outside the image; with ``"squash"`` it is the whole image.

        Args:
            image: anything :func:`~vitviz.models._image.load_image` takes, or its
                ``(width, height)``.

        Returns:
            ``(left, top, right, bottom)`` floats, as ``PIL.Image.crop`` boxes.

        Example:
            >>> Preprocess(size=224, resize_mode="shortest", crop_pct=0.875).region((600, 400))
            (125.0, 25.0, 475.0, 375.0)
        """
        if isinstance(image, tuple) and len(image) == 2 and all(isinstance(v, (int, np.integer)) for v in image):
            w, h = int(image[0]), int(image[1])
        else:
            w, h = load_image(image).size
        rh, rw = self._resized_hw(h, w)
        top, left = self._crop_origin(rh, rw)
        ch, cw = self.size
        sx, sy = w / rw, h / rh  # original pixels per resized pixel
        return (left * sx, top * sy, (left + cw) * sx, (top + ch) * sy)

    def view(self, image: Any) -> np.ndarray:
        """The resized and cropped RGB image, exactly as the model sees it (before normalisation).

        Args:
            image: anything :func:`~vitviz.models._image.load_image` takes.

        Returns:
            ``np.ndarray`` ``[H, W, 3]`` uint8, ``(H, W) == self.size``.
        """
        im = self._cropped(self._resized(load_image(image)))
        return np.array(im, dtype=np.uint8)  # [H, W, 3]

    def normalize(self, rgb: np.ndarray) -> torch.Tensor:
        """Normalise an image that is already resized and cropped: ``(x / 255 - mean) / std``.

        The operations are torchvision's ``to_tensor`` and ``Normalize`` in the same order
        and dtype, so the result is bit-identical to timm's transform.

        Args:
            rgb: ``[H, W, 3]`` uint8 RGB (what :meth:`view` returns).

        Returns:
            ``[3, H, W]`` float32.

        Raises:
            PreprocessError: ``rgb`` is not an ``HxWx3`` uint8 array.
        """
        if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3
                and rgb.shape[-1] == 3):
            raise PreprocessError(
                f"normalize() takes an HxWx3 uint8 array, got {type(rgb).__name__} "
                f"{getattr(rgb, 'shape', '')} {getattr(rgb, 'dtype', '')}; use __call__ for images")
        if not (rgb.flags.c_contiguous and rgb.flags.writeable):
            rgb = np.array(rgb, order="C")  # torch.from_numpy needs a writable array
        x = torch.from_numpy(rgb).permute(2, 0, 1)  # [3, H, W] uint8
        x = x.to(torch.float32).div(255)  # [3, H, W]
        # torchvision's Normalize uses float32 tensors of mean and std; so do we (bit-equal output)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)  # [3, 1, 1]
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)  # [3, 1, 1]
        return x.sub_(mean).div_(std)  # [3, H, W]

    def __call__(self, image: Any) -> torch.Tensor:
        """Preprocess one image.

        Args:
            image: a path, a ``PIL.Image`` or an ``HxWx3`` uint8 RGB array (anything
                :func:`~vitviz.models._image.load_image` takes).

        Returns:
            ``torch.Tensor`` ``[1, 3, H, W]`` float32 on the CPU.

        Raises:
            ImageError: the image cannot be read (the message names it).
        """
        return self.normalize(self.view(image)).unsqueeze(0)  # [1, 3, H, W]

    def batch(self, images: Iterable[Any]) -> torch.Tensor:
        """Preprocess several images into one batch.

        Args:
            images: an iterable of anything :func:`load_image` takes.

        Returns:
            ``torch.Tensor`` ``[B, 3, H, W]`` float32.

        Raises:
            PreprocessError: no images.
            ImageError: an image cannot be read (the message names it).
        """
        xs = [self.normalize(self.view(im)) for im in images]  # B x [3, H, W]
        if not xs:
            raise PreprocessError("batch() needs at least one image, got none")
        return torch.stack(xs)  # [B, 3, H, W]

    # -- constructors from the model libraries -----------------------------------------------
    @classmethod
    def from_timm(cls, model_or_config: Any, *, size: SizeLike | None = None) -> Preprocess:
        """The evaluation transform of a timm model (``timm.data.resolve_model_data_config``).

        Equals ``timm.data.create_transform(**cfg)`` on PIL images, bit for bit. Every timm
        model has a pretrained config, with or without a ``patch_embed`` (MaxViT, LeViT,
        MobileViT, CoAtNet, Twins, ... too). When the model was built at another size than
        its pretrained config states (e.g. ``create_model(..., img_size=384)`` on a 224
        config, whose data config still says 224), the size the model records
        (``patch_embed.img_size``, its own ``img_size``) wins, as the model cannot run on the
        other size; ``crop_pct`` and the rest are kept.

        Args:
            model_or_config: a timm model, or a data-config dict with ``input_size``,
                ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``.
            size: the input size the model was built for, when it does not record it
                (``(H, W)`` or an int); overrides the config's ``input_size``.

        Returns:
            The :class:`Preprocess` of the model's evaluation transform.

        Raises:
            PreprocessError: a crop mode vitviz does not implement, or a malformed size.
        """
        if isinstance(model_or_config, Mapping):
            cfg = dict(model_or_config)
        else:
            import timm.data

            cfg = timm.data.resolve_model_data_config(model_or_config)
            built = _timm_built_size(model_or_config)
            if built is not None:
                cfg["input_size"] = (cfg.get("input_size", (3,) + built)[0],) + built
        if size is not None:
            cfg["input_size"] = (3,) + _hw(size, "size")
        input_size = cfg.get("input_size", (3, 224, 224))
        size = _hw(tuple(input_size[-2:]), "input_size")
        crop_mode = cfg.get("crop_mode") or "center"
        modes = {"center": "shortest", "squash": "squash", "border": "border"}
        if crop_mode not in modes:
            raise PreprocessError(f"timm crop_mode {crop_mode!r} is not supported; expected one of "
                                  f"{', '.join(modes)}")
        return cls(size=size, resize_mode=modes[crop_mode],
                   crop_pct=cfg.get("crop_pct") or TIMM_DEFAULT_CROP_PCT,
                   interpolation=cfg.get("interpolation") or "bilinear",
                   mean=tuple(cfg.get("mean", IMAGENET_DEFAULT_MEAN)),
                   std=tuple(cfg.get("std", IMAGENET_DEFAULT_STD)),
                   crop_offset="round")

    @classmethod
    def from_hf_processor(cls, processor: Any) -> Preprocess:
        """The transform of a transformers image processor (or its ``preprocessor_config.json`` dict).

        Reads ``do_resize``, ``size`` (``{"height", "width"}`` → squash, ``{"shortest_edge"}``
        → shorter side), ``resample``, ``do_center_crop`` / ``crop_size``, ``do_rescale`` /
        ``rescale_factor`` (and ViViT's ``offset``, 1 subtracted after the rescale),
        ``do_normalize`` / ``image_mean`` / ``image_std``. A rescale factor other than 1/255 and
        an offset are folded into mean and std. Sizes that depend on each image
        (a shortest edge without a crop, ``longest_edge``, no resize at all) are refused:
        attention maps need one fixed patch grid.

        Args:
            processor: an image processor instance, or a dict of its settings.

        Returns:
            The :class:`Preprocess` that does what the processor does.

        Raises:
            PreprocessError: not a processor, or a size that depends on each image.
        """
        if isinstance(processor, Mapping):
            d = dict(processor)
        elif hasattr(processor, "to_dict"):
            d = processor.to_dict()
        else:
            raise PreprocessError(
                f"expected a transformers image processor or a dict of its settings, got "
                f"{type(processor).__name__}")
        where = d.get("image_processor_type") or "the image processor"
        size = _hf_size(d.get("size"), int_is_shortest_edge=bool(d.get("do_center_crop")))
        if not d.get("do_resize", True) or size is None:
            raise PreprocessError(
                f"{where} does not resize images (do_resize=False or no size): every image would "
                "give another patch grid; set a size, e.g. size={'height': 224, 'width': 224}")
        crop = (_hf_size(d.get("crop_size"), int_is_shortest_edge=False)
                if d.get("do_center_crop") else None)
        if crop is not None and not {"height", "width"} <= crop.keys():
            raise PreprocessError(f"{where}: crop_size must give height and width, got {crop}")
        if "longest_edge" in size or any(k.startswith("max_") for k in size):
            raise PreprocessError(f"{where} resizes by {sorted(size)}: the input size varies with "
                                  "the image; vitviz supports height/width or shortest_edge sizes")
        if "shortest_edge" in size:
            if crop is None:
                raise PreprocessError(
                    f"{where} resizes the shortest edge to {size['shortest_edge']} without a centre "
                    "crop, so the input size varies with the image's aspect ratio; set "
                    "do_center_crop=True with a crop_size")
            mode, resize_size = "shortest", int(size["shortest_edge"])
        else:
            mode, resize_size = "squash", (int(size["height"]), int(size["width"]))
        out_size = (int(crop["height"]), int(crop["width"])) if crop is not None else resize_size
        interp = _interp_name(d.get("resample", Image.Resampling.BILINEAR))
        if d.get("do_normalize", True):
            mean = _triple(d.get("image_mean", HF_VIT_MEAN), "image_mean")
            std = _triple(d.get("image_std", HF_VIT_STD), "image_std")
        else:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        factor = float(d.get("rescale_factor", 1 / 255)) if d.get("do_rescale", True) else 1.0
        # ViViT's processor subtracts 1 after the rescale (offset=True: [0, 255] -> [-1, 1])
        shift = 1.0 if d.get("do_rescale", True) and d.get("offset", False) else 0.0
        if not math.isclose(factor * 255.0, 1.0, rel_tol=1e-9) or shift:
            # x * factor - shift == (x / 255) * (255 * factor) - shift: fold both into mean and std,
            # ((x / 255) * k - shift - m) / s == ((x / 255) - (m + shift) / k) / (s / k)
            k = 255.0 * factor
            mean = tuple((m + shift) / k for m in mean)
            std = tuple(s / k for s in std)
        return cls(size=out_size, resize_mode=mode, crop_pct=1.0, interpolation=interp,
                   mean=mean, std=std, resize_size=resize_size, crop_offset="floor")

    @classmethod
    def from_hf_config(cls, config: Any) -> Preprocess:
        """Defaults for a transformers model known only by its config (no processor file).

        The settings come from the image-processor class transformers associates with the
        config's ``model_type`` (built with its defaults, no download); its size is
        replaced by ``config.image_size`` (resized straight to it) unless the class's
        output already has that size. When no such class is known, the defaults are
        ``ViTImageProcessor``'s: squash to ``image_size`` with bilinear resampling and
        mean = std = 0.5 — the normalisation of most ViT checkpoints on the Hub (Google's
        ``vit-base-patch16-224`` and its fine-tunes), but not all: pass the model's real
        processor to :meth:`from_hf_processor` when you have it.

        Args:
            config: a transformers ``PretrainedConfig``; for encoder-decoder models the
                vision encoder's config is used.

        Returns:
            The :class:`Preprocess` for ``config.image_size``.

        Raises:
            PreprocessError: the config states no ``image_size``.
        """
        vcfg = hf_vision_config(config)
        image_size = getattr(vcfg, "image_size", None)
        if image_size is None:
            raise PreprocessError(
                f"{type(config).__name__} states no image_size; build the preprocessing with "
                "Preprocess.from_hf_processor(processor) or Preprocess(size=(H, W))")
        size = _hw(tuple(image_size) if isinstance(image_size, (list, tuple)) else image_size,
                   "image_size")
        base = _hf_default_processor(getattr(vcfg, "model_type", None))
        if base is not None and base.size == size:
            return base
        if base is not None:
            return cls(size=size, resize_mode="squash", interpolation=base.interpolation,
                       mean=base.mean, std=base.std, crop_offset="floor")
        return cls(size=size, resize_mode="squash", interpolation="bilinear",
                   mean=HF_VIT_MEAN, std=HF_VIT_STD, crop_offset="floor")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def _interp_name(value: Any) -> str:
    """A resampling filter name from a name, a PIL code / enum or a torchvision mode."""
    if isinstance(value, str):
        name = value.lower()
    elif isinstance(value, (int, np.integer)):  # PIL codes; Image.Resampling is an IntEnum
        name = _RESAMPLE_BY_CODE.get(int(value), str(value))
    else:  # torchvision InterpolationMode: .value is the name
        name = str(getattr(value, "value", value)).lower()
    if name == "antialias":
        name = "lanczos"
    if name not in _RESAMPLE:
        raise PreprocessError(
            f"unknown interpolation {value!r}; expected one of {', '.join(_RESAMPLE)}")
    return name


def _hf_size(value: Any, *, int_is_shortest_edge: bool) -> dict | None:
    """A transformers size setting as a dict (``SizeDict`` objects and old int sizes too)."""
    if value is None:
        return None
    if isinstance(value, (int, np.integer)):
        # old configs: an int is square for ViT-like processors and the shortest edge for
        # processors that centre crop afterwards (CLIP-like)
        return ({"shortest_edge": int(value)} if int_is_shortest_edge
                else {"height": int(value), "width": int(value)})
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": int(value[0]), "width": int(value[1])}
    items = value.items() if isinstance(value, Mapping) else vars(value).items()
    out = {k: v for k, v in items if v is not None}
    if not ({"height", "width"} <= out.keys() or "shortest_edge" in out):
        raise PreprocessError(f"unsupported size setting {value!r}; expected {{'height', 'width'}} "
                              "or {'shortest_edge'}")
    return out


def _timm_built_size(model: Any) -> tuple[int, int] | None:
    """The input size a timm model was built for, where the model records it: its patch
    embedding's ``img_size`` (ViTs, Swin, PiT, ...), the model's own ``img_size`` (MaxViT,
    CoAtNet), the first of its ``patch_embeds`` (Twins) or its ``pixel_embed`` (TNT)."""
    holders = [getattr(model, "patch_embed", None), model]
    embeds = getattr(model, "patch_embeds", None)
    if isinstance(embeds, (list, tuple, torch.nn.ModuleList)) and len(embeds):
        holders.append(embeds[0])
    holders.append(getattr(model, "pixel_embed", None))
    for holder in holders:
        img_size = getattr(holder, "img_size", None) if holder is not None else None
        if img_size is None:
            continue
        if isinstance(img_size, (int, np.integer)):
            return int(img_size), int(img_size)
        if isinstance(img_size, (tuple, list)) and len(img_size) == 2:
            return int(img_size[0]), int(img_size[1])
    return None


def hf_vision_config(config: Any) -> Any:
    """The image encoder's config inside a transformers config (the config itself for a vision model)."""
    for attr in ("vision_config", "encoder"):
        sub = getattr(config, attr, None)
        if sub is not None and (getattr(sub, "image_size", None) is not None
                                or getattr(sub, "patch_size", None) is not None):
            return sub
    return config


def _hf_default_processor(model_type: str | None) -> Preprocess | None:
    """transformers' default image processor for a model type, as a Preprocess (or None)."""
    if not model_type:
        return None
    try:
        from transformers.models.auto import image_processing_auto as auto

        names = auto.IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type)
        if not names:
            return None
        name = (names.get("pil") or names.get("torchvision")) if isinstance(names, Mapping) else names
        if isinstance(name, (tuple, list)):
            name = next((n for n in name if n), None)
        proc_cls = auto.get_image_processor_class_from_name(name) if name else None
        if proc_cls is None:
            return None
        return Preprocess.from_hf_processor(proc_cls())
    except (ImportError, AttributeError, KeyError, TypeError, ValueError):
        # an unknown or unusual processor class: the documented ViT defaults apply
        return None


__all__ = ["Preprocess", "PreprocessError", "IMAGENET_DEFAULT_MEAN", "IMAGENET_DEFAULT_STD",
           "HF_VIT_MEAN", "HF_VIT_STD"]
