"""`VisionModel`: a torch module plus what vitviz needs to know about its tokens.

The token layout is data that the model reports (timm's ``num_prefix_tokens`` and
``patch_embed``, a transformers config's ``patch_size``, a hand-written model's
``cls_token``), completed by the input's height and width at capture time. It is
never guessed from ``sqrt(N)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import LayoutError
from ..types import TokenLayout

_PREFIX_PARAM_NAMES = ("cls_token", "class_token", "class_embedding", "dist_token", "distillation_token",
                       "reg_token", "register_tokens")
_CLS_PARAM_NAMES = ("cls_token", "class_token", "class_embedding")


def _pair(x) -> tuple[int, int]:
    if isinstance(x, (tuple, list)):
        return int(x[0]), int(x[-1])
    return int(x), int(x)


class VisionModel:
    """A torch module in eval mode with its token layout and preprocessing.

    Build one with :func:`vitviz.load_model` or :func:`vitviz.wrap`; call it like the
    module itself.

    Attributes:
        module: the ``torch.nn.Module`` (in eval mode).
        layout: :class:`TokenLayout` at the model's default input size.
        patch_size: ``(ph, pw)`` when known; with the input size it gives the grid.
        labels: class names, when the model has them.
        tokenizer: a tokenizer for captioning models, when available.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        patch_size: tuple[int, int] | None = None,
        grid: tuple[int, int] | None = None,
        num_prefix: int | None = None,
        has_cls: bool | None = None,
        pad_to_patch: bool = False,
        preprocessor: Callable[..., torch.Tensor] | None = None,
        preprocessor_factory: Callable[[], Any] | None = None,
        labels: Sequence[str] | None = None,
        tokenizer: Any = None,
        name: str | None = None,
        grid_fixed: bool = False,
        num_suffix: int = 0,
        num_frames: int | None = None,
        tubelet: int = 1,
        time_major: bool = True,
    ):
        self.module = module.eval()
        self.patch_size = _pair(patch_size) if patch_size is not None else None
        self.num_prefix = num_prefix
        self.num_suffix = int(num_suffix)  # tokens after the patches (YOLOS detection tokens)
        # a video model: the input frames it takes ([B, T, C, H, W]), the frames per temporal
        # token position, and the order of its patch tokens ((frame, row, col) when time-major)
        self.num_frames = int(num_frames) if num_frames is not None else None
        self.tubelet = int(tubelet)
        self.time_major = bool(time_major)
        self.has_cls = has_cls
        self.pad_to_patch = pad_to_patch
        self._preprocessor = preprocessor
        self._preprocessor_factory = preprocessor_factory
        self.labels = list(labels) if labels is not None else None
        self.tokenizer = tokenizer
        self.name = name or type(module).__name__
        self._grid = _pair(grid) if grid is not None else None
        # grid_fixed: the user stated the grid (e.g. a CNN feature map); use it for every input
        self._grid_fixed = grid_fixed and grid is not None
        self._capture_setup = None  # what vitviz.capture read of the module tree, while it is the same

    # -- calling ---------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @property
    def device(self) -> torch.device:
        for p in self.module.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for p in self.module.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def to(self, *args, **kwargs) -> VisionModel:
        """Move or cast the module in place, as ``nn.Module.to``.

        Args:
            *args: ``nn.Module.to``'s arguments (a device, a dtype, a tensor).
            **kwargs: its keyword arguments.

        Returns:
            This :class:`VisionModel` (its inputs follow: :meth:`preprocess` uses the new device
            and dtype).
        """
        self.module.to(*args, **kwargs)
        return self

    # -- preprocessing ---------------------------------------------------------------------
    @property
    def preprocessor(self):
        """The callable image -> ``[1, 3, H, W]`` tensor (built on first use), or None."""
        if self._preprocessor is None and self._preprocessor_factory is not None:
            self._preprocessor = self._preprocessor_factory()
            self._preprocessor_factory = None
        return self._preprocessor

    @preprocessor.setter
    def preprocessor(self, value) -> None:
        self._preprocessor, self._preprocessor_factory = value, None

    @property
    def input_size(self) -> tuple[int, int] | None:
        """``(H, W)`` of the preprocessed input, when known."""
        size = getattr(self.preprocessor, "size", None)
        if size is not None:
            return _pair(size)
        if self._grid is not None and self.patch_size is not None:
            return self._grid[0] * self.patch_size[0], self._grid[1] * self.patch_size[1]
        return None

    def preprocess(self, image) -> torch.Tensor:
        """Turn an image into the model's input tensor ``[1, 3, H, W]`` on the model's device.

        Args:
            image: a path, a ``PIL.Image``, an ``HxWx3`` uint8 RGB array, or an already
                preprocessed tensor (``[3, H, W]`` or ``[B, 3, H, W]``), passed through.

        Returns:
            ``[1, 3, H, W]`` (``[B, 3, H, W]`` for a batch tensor) on the model's device and dtype.

        Raises:
            LayoutError: an image for a model without a preprocessing configuration.
            ImageError: the image cannot be read.
        """
        if isinstance(image, torch.Tensor):
            batched = 5 if self.is_video else 4  # a clip is [T, C, H, W], a batch of clips [B, T, C, H, W]
            if image.dim() not in (batched - 1, batched):
                what = "clips [T, C, H, W] or [B, T, C, H, W]" if self.is_video else "images [C, H, W] or [B, C, H, W]"
                hint = ("; a video clip needs a video model (VideoMAE, ViViT, TimeSformer)"
                        if image.dim() == 5 else "")
                raise LayoutError(f"{self.name} takes {what}, got a {image.dim()}-D tensor of shape "
                                  f"{tuple(image.shape)}{hint}")
            x = image if image.dim() == batched else image.unsqueeze(0)
        else:
            if self.preprocessor is None:
                raise LayoutError(
                    f"{self.name} has no preprocessing configuration; pass a preprocessed tensor "
                    "or give one with vitviz.wrap(module, preprocess=vitviz.Preprocess(...))"
                )
            x = self.preprocessor(image)
        return x.to(device=self.device, dtype=self.dtype)

    # -- layout ----------------------------------------------------------------------------
    @property
    def is_video(self) -> bool:
        """Whether the model takes video clips ``[B, T, C, H, W]`` (VideoMAE, ViViT, TimeSformer)."""
        return self.num_frames is not None

    def _time(self, frames: int | None) -> dict:
        """The time-axis fields of a layout for an input of ``frames`` frames (None: the model's
        default clip length); nothing for an image model."""
        if not self.is_video:
            return {}
        frames = self.num_frames if frames is None else int(frames)
        if frames < self.tubelet or frames % self.tubelet:
            raise LayoutError(f"{self.name}: a clip of {frames} frames does not split into tubelets of "
                              f"{self.tubelet} frames; give a multiple of {self.tubelet} "
                              f"(the model was built for {self.num_frames})")
        return dict(frames=frames // self.tubelet, tubelet=self.tubelet, time_major=self.time_major)

    @property
    def layout(self) -> TokenLayout:
        """The token layout at the default input size."""
        grid = self._grid
        if grid is None:
            size = self.input_size
            if size is None or self.patch_size is None:
                raise LayoutError(
                    f"{self.name}: the patch grid is unknown; pass grid=(rows, cols) to vitviz.wrap"
                )
            grid = self._grid_from_hw(size)
        if self.num_prefix is None:
            raise LayoutError(
                f"{self.name}: the number of prefix tokens is not known before a capture (it is "
                "read off the captured attention); pass num_prefix= to vitviz.wrap")
        return TokenLayout(self.num_prefix, grid, has_cls=self.has_cls if self.num_prefix else None,
                           num_suffix=self.num_suffix, **self._time(None))

    def layout_at(self, input_hw: tuple[int, int] | None, frames: int | None = None) -> TokenLayout:
        """The layout of every patch of an input of another size.

        Args:
            input_hw: ``(H, W)`` of the input, or None for the default size.
            frames: the input frames of a video model's clip (None: the model's clip length).

        Returns:
            The :class:`TokenLayout` of the input's patch grid (the default layout when the grid
            is fixed or the patch size unknown).

        Raises:
            LayoutError: the default grid is unknown, or the frames do not split into tubelets.
        """
        layout = self.layout
        if frames is not None and self.is_video:
            layout = TokenLayout(layout.num_prefix, layout.grid, has_cls=layout.has_cls,
                                 num_suffix=self.num_suffix, **self._time(frames))
        if input_hw is None or self._grid_fixed or self.patch_size is None:
            return layout
        return TokenLayout(layout.num_prefix, self._grid_from_hw(input_hw), has_cls=layout.has_cls,
                           num_suffix=self.num_suffix, **self._time(frames))

    def _grid_from_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
        ph, pw = self.patch_size
        rnd = math.ceil if self.pad_to_patch else math.floor
        return int(rnd(hw[0] / ph)), int(rnd(hw[1] / pw))

    def layout_for(self, input_hw: tuple[int, int] | None, num_tokens: int,
                   frames: int | None = None) -> TokenLayout:
        """The token layout of a sequence of ``num_tokens`` produced from an input of ``input_hw``
        (of ``frames`` input frames, for a video model; None: its clip length).

        The grid comes from a fixed grid the user stated, else from the input size and the
        patch size, else from the default grid. The number of prefix tokens comes from the
        model, else from ``num_tokens - gh*gw``.

        Args:
            input_hw: ``(H, W)`` of the input, or None when unknown.
            num_tokens: the length of the token sequence.
            frames: the input frames of a video model's clip, when known.

        Returns:
            The :class:`TokenLayout` of the sequence.

        Raises:
            LayoutError: the grid cannot be told, or ``num_tokens`` does not fit it.
        """
        if self._grid_fixed:
            grid = self._grid
        elif input_hw is not None and self.patch_size is not None:
            grid = self._grid_from_hw(input_hw)
        elif self._grid is not None:
            grid = self._grid
        else:
            raise LayoutError(
                f"{self.name}: cannot tell the patch grid of a {num_tokens}-token sequence; "
                "pass grid=(rows, cols) (and num_prefix=) to vitviz.wrap"
            )
        num_prefix = self.num_prefix
        if num_prefix is None:  # never read off the count: N - gh*gw could be anything (a video's frames)
            raise LayoutError(
                f"{self.name}: the model does not say how many tokens precede its {grid[0]}x{grid[1]} patch grid "
                f"in a {num_tokens}-token sequence (several CLS / register parameters at one depth); pass "
                "num_prefix= (and grid=(rows, cols)) to vitviz.wrap")
        layout = TokenLayout(num_prefix, grid, has_cls=self.has_cls if num_prefix else None,
                             num_suffix=self.num_suffix, **self._time(frames))
        # other tokens (a video's time steps, tokens the model adds without a parameter) are refused,
        # never taken for prefix tokens
        layout.check_tokens(num_tokens, f"{self.name}'s token sequence")
        return layout

    def stage_layout(self, input_hw: tuple[int, int] | None, num_tokens: int) -> TokenLayout:
        """The layout of ``num_tokens`` in a stage of a hierarchical model (PiT, LeViT, PVT,
        Swin after patch merging, ...): the model's prefix tokens, then a grid that tiles the
        same image more coarsely than the patch grid.

        The grid is the factorisation ``gh * gw`` of the patch tokens whose aspect is nearest
        to the input's, accepted only when one stride ``s`` explains both sides up to the
        rounding of strided convolutions and pooling (``gh = H/s``, ``gw = W/s`` within one
        token).

        Args:
            input_hw: ``(H, W)`` of the input.
            num_tokens: the stage's sequence length.

        Returns:
            The stage's :class:`TokenLayout`.

        Raises:
            LayoutError: the input size is unknown, or no coarser grid of the input explains
                ``num_tokens``.
        """
        name = self.name
        if input_hw is None:
            raise LayoutError(f"{name}: a {num_tokens}-token stage cannot be placed without the input size; "
                              "call the model itself inside the capture (not a submodule)")
        h, w = input_hw
        # the model's prefix tokens; when it does not say, none, else a CLS (+ distillation) token
        # (a stage may drop them: VOLO's and CaiT's patch stages run before the class token joins)
        # with a known patch size, a stage is the patch grid coarsened by a whole factor (so a
        # subset of the patches, e.g. ViT-MAE's visible ones, is not taken for a stage)
        base = self._grid_from_hw(input_hw) if self.patch_size is not None else None
        for prefix in dict.fromkeys((self.num_prefix, 0)) if self.num_prefix is not None else (0, 1, 2):
            grid = _stage_grid(h, w, num_tokens - prefix)
            if grid is not None and (base is None or any(
                    abs(base[0] / k - grid[0]) < 1 and abs(base[1] / k - grid[1]) < 1
                    for k in range(1, max(base) + 1))):
                return TokenLayout(prefix, grid, has_cls=self.has_cls if prefix else None)
        raise LayoutError(
            f"{name}: {num_tokens} tokens do not tile a {h}x{w} input as the patch grid or a coarser stage of it "
            "(a subset of the patches, e.g. masked image modelling, or extra tokens after the patches) (after "
            f"{self.num_prefix if self.num_prefix is not None else '0-2'} prefix tokens); pass "
            "grid=(rows, cols) (and num_prefix=) to vitviz.wrap")

    def __repr__(self) -> str:
        try:
            layout = self.layout
        except LayoutError:
            layout = "unknown"
        return f"VisionModel({self.name}, layout={layout}, patch_size={self.patch_size})"


def _stage_grid(h: int, w: int, patches: int) -> tuple[int, int] | None:
    """The ``(gh, gw)`` with ``gh * gw = patches`` nearest to the aspect of an ``h x w`` input for
    which one stride ``s`` gives both sides within one token (``|h/s - gh| < 1``,
    ``|w/s - gw| < 1``), or None."""
    best = None
    for gh in range(1, patches + 1):
        if patches % gh:
            continue
        gw = patches // gh
        lo = max(h / (gh + 1), w / (gw + 1))  # the strides s that explain both sides overlap
        hi = min(h / (gh - 1) if gh > 1 else math.inf, w / (gw - 1) if gw > 1 else math.inf)
        if lo < hi:
            err = abs(math.log(gh / gw) - math.log(h / w))
            if best is None or err < best[0]:
                best = (err, (gh, gw))
    return None if best is None else best[1]


# --------------------------------------------------------------------------------------------
# wrap(): describe any module
# --------------------------------------------------------------------------------------------

def _find_patch_conv(module: nn.Module) -> nn.Conv2d | None:
    """The first Conv2d on the image (3 input channels) whose kernel equals its stride: a ViT
    patch embedding (not, e.g., PVT's spatial-reduction convolutions over features)."""
    for m in module.modules():
        if (isinstance(m, nn.Conv2d) and m.in_channels == 3 and tuple(m.kernel_size) == tuple(m.stride)
                and m.kernel_size[0] > 1):
            return m
    return None


def _count_prefix_params(module: nn.Module) -> int | None:
    """Count CLS / distillation / register tokens held as parameters, or None if unknown.

    Only the shallowest parameters with those names count. No such parameter means no prefix
    tokens (0): a sequence longer than the patch grid is then refused, never read as prefix
    tokens (a video's second time step is not 16 register tokens). When one name appears twice
    at that depth (a container of several models), the count is unknown (None) and the user
    states it (``vitviz.wrap(..., num_prefix=)``).

    Args:
        module: the model.

    Returns:
        The number of prefix tokens, or None when the parameters do not tell.
    """
    found = [(n.count("."), n.rsplit(".", 1)[-1], p) for n, p in module.named_parameters()
             if n.rsplit(".", 1)[-1] in _PREFIX_PARAM_NAMES
             and (p.dim() >= 2 or n.endswith("class_embedding"))]  # CLIP: class_embedding is [D]
    if not found:
        return 0
    depth = min(d for d, _, _ in found)
    top = [(leaf, p) for d, leaf, p in found if d == depth]
    if len({leaf for leaf, _ in top}) != len(top):
        return None
    return sum(p.shape[-2] if p.dim() == 3 else 1 for _, p in top)


def _describe_timm(module: nn.Module) -> dict:
    """What a timm model says of its tokens; hierarchical models whose patch embedding lacks
    ``patch_size`` / ``grid_size`` (MViTv2, XCiT) give what they have."""
    pe = module.patch_embed
    info: dict = dict(num_prefix=int(module.num_prefix_tokens),
                      has_cls=bool(getattr(module, "cls_token", None) is not None),
                      pad_to_patch=bool(getattr(pe, "dynamic_img_pad", False)))
    if getattr(pe, "patch_size", None) is not None:
        info["patch_size"] = _pair(pe.patch_size)
    if getattr(pe, "grid_size", None) is not None:
        info["grid"] = _pair(pe.grid_size)
    if info["num_prefix"] == 0:
        info["has_cls"] = None
    return info


# transformers video families whose token order is known: model_type -> time-major. VideoMAE
# (Conv3d tubelets, flattened (t, h, w)) and ViViT (the same) run (frame, row, col); TimeSformer
# keeps (row, col, frame) (its embeddings: per-patch time sequences, TimesformerEmbeddings)
_VIDEO_FAMILIES = {"videomae": True, "vivit": True, "timesformer": False}


def _describe_hf(module: nn.Module) -> dict:
    from ._preprocess import hf_vision_config

    cfg = hf_vision_config(module.config)
    video = _VIDEO_FAMILIES.get(getattr(cfg, "model_type", None))
    tubelet = getattr(cfg, "tubelet_size", None)
    if video is not None and isinstance(tubelet, (list, tuple)) and len(tubelet) == 3:
        patch: Any = tubelet[1:]  # ViViT: tubelet_size [t, h, w] is the patch
        tubelet = tubelet[0]
    else:
        patch = getattr(cfg, "patch_size", None)
    if patch is None:
        return {}
    info: dict = dict(patch_size=_pair(patch))
    if video is not None:  # a video model whose token order vitviz knows
        info.update(num_frames=int(cfg.num_frames), tubelet=int(tubelet or 1), time_major=video)
    if getattr(cfg, "image_size", None) is not None:
        size = _pair(cfg.image_size)
        info["grid"] = (size[0] // info["patch_size"][0], size[1] // info["patch_size"][1])
    # CLS (+ distillation / register tokens) parameters; none: no prefix tokens
    prefix = _count_prefix_params(module)
    if prefix is not None:
        info["num_prefix"] = prefix
    info["has_cls"] = True  # all these models put CLS first
    suffix = getattr(cfg, "num_detection_tokens", None)  # YOLOS: detection tokens after the patches
    if isinstance(suffix, int) and suffix > 0:
        info["num_suffix"] = suffix
    return info


def describe(module: nn.Module) -> dict:
    """What can be read off a module about its tokens.

    Args:
        module: a timm, transformers or hand-written vision model.

    Returns:
        A dict with what was found of ``patch_size``, ``grid``, ``num_prefix``, ``has_cls``
        (a key is missing when the module does not tell).
    """
    if hasattr(module, "patch_embed") and hasattr(module, "num_prefix_tokens"):
        return _describe_timm(module)
    config = getattr(module, "config", None)
    if config is not None and type(config).__module__.startswith("transformers"):
        return _describe_hf(module)
    info: dict = {}
    conv = _find_patch_conv(module)
    if conv is not None:
        info["patch_size"] = _pair(conv.stride)
    prefix = _count_prefix_params(module)
    if prefix is not None:
        info["num_prefix"] = prefix
        info["has_cls"] = prefix > 0 and any(
            n.rsplit(".", 1)[-1] in _CLS_PARAM_NAMES for n, _ in module.named_parameters())
    image_size = getattr(module, "image_size", None)
    if image_size is not None and "patch_size" in info:
        size = _pair(image_size)
        info["grid"] = (size[0] // info["patch_size"][0], size[1] // info["patch_size"][1])
    return info


def wrap(
    module: nn.Module,
    *,
    grid: tuple[int, int] | None = None,
    num_prefix: int | None = None,
    tokenizer: Any = None,
    patch_size: int | tuple[int, int] | None = None,
    has_cls: bool | None = None,
    preprocess: Callable[..., torch.Tensor] | None = None,
    labels: Sequence[str] | None = None,
    name: str | None = None,
) -> VisionModel:
    """Describe any torch module (timm, transformers, hand-written) as a :class:`VisionModel`.

    The layout is read from the model where possible; ``grid`` and ``num_prefix`` state it
    where the model cannot tell (e.g. a captioner whose encoder is a CNN with a 12x20 feature
    map: ``wrap(catr, grid=(12, 20), num_prefix=0)``). A stated ``grid`` is used for every input.

    Args:
        module: the model; it is put in eval mode.
        grid: ``(rows, cols)`` of the patch grid, for every input.
        num_prefix: number of tokens before the patches (CLS, distillation, registers).
        tokenizer: tokenizer for captioning models.
        patch_size: patch size, when no patch-embedding convolution reveals it.
        has_cls: whether token 0 is a CLS token (default: ``num_prefix > 0``).
        preprocess: callable turning an image into ``[1, 3, H, W]``.
        labels: class names.

    Returns:
        VisionModel

    Example:
        >>> m = vitviz.wrap(timm.create_model("vit_tiny_patch16_224"))
        >>> m.layout
        TokenLayout(num_prefix=1, grid=(14, 14), has_cls=True)
    """
    if isinstance(module, VisionModel):
        module = module.module
    info = describe(module)
    if patch_size is not None:
        info["patch_size"] = _pair(patch_size)
    if num_prefix is not None:
        info["num_prefix"] = int(num_prefix)
        if has_cls is None and int(num_prefix) == 0:
            info["has_cls"] = None
    if has_cls is not None:
        info["has_cls"] = has_cls
    if labels is None:
        labels = _labels_of(module)
    return VisionModel(
        module,
        patch_size=info.get("patch_size"),
        grid=grid if grid is not None else info.get("grid"),
        grid_fixed=grid is not None,
        num_prefix=info.get("num_prefix"),
        has_cls=info.get("has_cls"),
        pad_to_patch=info.get("pad_to_patch", False),
        num_suffix=info.get("num_suffix", 0),
        num_frames=info.get("num_frames"),
        tubelet=info.get("tubelet", 1),
        time_major=info.get("time_major", True),
        preprocessor=preprocess,
        preprocessor_factory=None if preprocess is not None else (lambda: _default_preprocess(module, info)),
        labels=labels,
        tokenizer=tokenizer,
        name=name,
    )


def _default_preprocess(module: nn.Module, info: dict):
    from ._preprocess import Preprocess

    if _is_timm(module):  # with or without a patch_embed (MaxViT, LeViT, MobileViT, Twins, ...)
        return Preprocess.from_timm(module)
    config = getattr(module, "config", None)
    if config is not None and type(config).__module__.startswith("transformers"):
        return Preprocess.from_hf_config(config)
    if "grid" in info and "patch_size" in info:
        g, p = info["grid"], info["patch_size"]
        return Preprocess(size=(g[0] * p[0], g[1] * p[1]))
    return None


def _is_timm(module: nn.Module) -> bool:
    """A timm model: built by timm (its class comes from ``timm.``) and carrying the pretrained
    config timm's data config is read from."""
    return isinstance(getattr(module, "pretrained_cfg", None), dict) and any(
        c.__module__.startswith("timm.") for c in type(module).__mro__)


def _labels_of(module: nn.Module) -> list[str] | None:
    config = getattr(module, "config", None)
    id2label = getattr(config, "id2label", None) if config is not None else None
    if id2label and getattr(module, "num_labels", None):
        names = [str(id2label.get(i, i)) for i in range(len(id2label))]
        if not all(n.startswith("LABEL_") for n in names):
            return names
    return None
