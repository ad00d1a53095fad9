"""Decoder-only vision-language models: which image tokens each generated token looked at.

LLaVA-1.5 / LLaVA-NeXT, PaliGemma, Qwen2-VL / Qwen2.5-VL, Idefics3 / SmolVLM and BLIP-2 /
InstructBLIP put the image into the language model's
sequence as tokens: the prompt holds placeholder ids (``config.image_token_id``), and the
projected vision features replace them. There is no cross-attention: the map of a generated
token is the language model's self-attention from the position whose logits chose it, over
the image-token positions.

1. **Generate once** with ``model.generate`` (greedy or beams), nothing hooked.
2. **One teacher-forced forward** over the prompt and the generated tokens. The language model
   is causal (PaliGemma: bidirectional over the prompt, causal after it, as in generation), so
   the query at position ``P - 1 + t`` sees what it saw when it chose token ``t``. Its
   attention is read at the op, rows only (:mod:`._vlm_rows`): ``[L, 1, H, T, Ni]``, the raw
   weights at the image keys (rows sum to less than 1; the rest went to text tokens). The vision
   tower's own self-attention of the same pass is captured by :func:`vitviz.capture`
   (``Caption.encoder``).

Layout: the grid of image tokens the language model sees, after the projector (LLaVA, PaliGemma:
one token per patch; LLaVA's ``"full"`` feature strategy keeps the CLS token first; Qwen2-VL: one
token per 2x2 merged patches, so the grid is the patch grid halved). :class:`ImageGrid` says
which part of the model's input each grid covers. BLIP-2's image tokens are its Q-Former's
learned queries, not a grid: ``cross`` holds them as they are (a ``1 x Q`` row), and the
Q-Former's cross-attention (``Caption.qformer``, read at the op as well) reads them back to patches
(:func:`vitviz.analyze.cross.query_readback`: the mean over its layers and heads).

Several grids per picture: LLaVA-NeXT's base image and any-resolution tiles (an image-newline
token after each row of the tiles' unpadded grid), Idefics3 / SmolVLM's sub-images and global
image (each pixel-shuffled). Their layout is read by running the model's own packing
(``pack_image_features``, ``connector.pixel_shuffle``) on index features (:func:`anyres_grids`,
:func:`split_grids`), and :func:`vitviz.analyze.cross.place_grids` puts them back on the
picture. InstructBLIP is read as BLIP-2, its Q-Former also given the instruction
(``qformer_input_ids``).

Families whose image tokens vitviz cannot place are refused with their reason (:data:`REFUSED`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ...errors import CaptureError, VitvizError
from ...types import AttentionMaps, CrossAttentionMaps, TokenLayout
from ._vlm_rows import RowsReader

# transformers class name -> family captured here
FAMILIES = {
    "LlavaForConditionalGeneration": "llava",
    "PaliGemmaForConditionalGeneration": "paligemma",
    "Qwen2VLForConditionalGeneration": "qwen2-vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2-vl",
    "Blip2ForConditionalGeneration": "blip2",
    "LlavaNextForConditionalGeneration": "llava-next",
    "Idefics3ForConditionalGeneration": "idefics3",
    "SmolVLMForConditionalGeneration": "idefics3",
    "InstructBlipForConditionalGeneration": "instructblip",
}

# transformers class name -> why it is refused
_TILES = ("any-resolution tiles with image-newline tokens (the base image and each tile are separate grids); "
          "placing the tiles on the picture is not implemented yet")
_QFORMER = ("the language model sees the Q-Former's learned queries, not a patch grid; reading them back to patches "
            "through the Q-Former's cross-attention is not implemented yet")
REFUSED = {
    "LlavaOnevisionForConditionalGeneration": ("LLaVA-OneVision", "any-resolution tiles that are pooled down when "
                                                                  "there are many (max_num_patches), a layout "
                                                                  "vitviz does not place on the picture yet"),
    "LlavaNextVideoForConditionalGeneration": ("LLaVA-NeXT-Video", _TILES),
    "Idefics2ForConditionalGeneration": ("Idefics2", "a perceiver resampler turns the patches into learned "
                                                     "latents, not a grid; reading them back is not implemented"),
}

CAPTURED = ("LLaVA-1.5, LLaVA-NeXT, PaliGemma, Qwen2-VL / Qwen2.5-VL, Idefics3 / SmolVLM, BLIP-2, "
            "InstructBLIP (decoder-only language models)")
DEFAULT_PROMPT = "Describe the image."


@dataclass(frozen=True)
class ImageGrid:
    """One grid of image tokens the language model sees, and the part of the input it covers.

    Attributes:
        start: index of the grid's first token among the ``Ni`` image keys of ``Caption.cross``.
        grid: ``(gh, gw)`` tokens, row-major.
        region: ``(top, left, bottom, right)`` in pixels of the model's input (``pixel_values``;
            LLaVA-NeXT: the canvas its tiles are cut from, at the chosen any-resolution size).
        cell: ``(h, w)`` pixels of the input per token (a patch, or 2x2 merged patches; LLaVA-NeXT's
            base image: the picture's size over its grid, which need not be whole pixels).
        num_prefix: tokens before the grid that are not on it (LLaVA ``"full"``: the CLS token).
        newline: tokens after each row of the grid that are not on it (LLaVA-NeXT's image-newline
            token: 1). Token ``(r, c)`` is image key ``start + num_prefix + r·(gw + newline) + c``.
    """

    start: int
    grid: tuple[int, int]
    region: tuple[int, int, int, int]
    cell: tuple[float, float]
    num_prefix: int = 0
    newline: int = 0

    @property
    def num_tokens(self) -> int:
        """The image keys this grid spans (prefix, rows and their newline tokens)."""
        return self.num_prefix + self.grid[0] * (self.grid[1] + self.newline)

    def keys(self) -> torch.Tensor:
        """``[gh·gw]``: the image key of every grid token, row-major (prefix and newlines skipped)."""
        gh, gw = self.grid
        r = torch.arange(gh)[:, None] * (gw + self.newline)
        return (self.start + self.num_prefix + r + torch.arange(gw)[None, :]).reshape(-1)


def vlm_family(module: nn.Module) -> str | None:
    """The decoder-only vision-language family of ``module`` (``"llava"``, ``"llava-next"``,
    ``"paligemma"``, ``"qwen2-vl"``, ``"idefics3"``, ``"blip2"``, ``"instructblip"``), or None for
    any other model.

    Raises:
        VitvizError: a vision-language model vitviz does not capture yet, with the reason.
    """
    name = type(module).__name__
    if name in FAMILIES:
        if FAMILIES[name] in ("blip2", "instructblip") and not getattr(module.config,
                                                                      "use_decoder_only_language_model", True):
            what = "BLIP-2" if FAMILIES[name] == "blip2" else "InstructBLIP"
            raise VitvizError(f"{name}: vitviz.caption does not capture {what} models with an encoder-decoder language "
                              "model yet (Flan-T5): their image tokens are read by the T5 encoder, not by the "
                              f"decoder that chooses the tokens. Captured decoder-only families: {CAPTURED}")
        return FAMILIES[name]
    if name in REFUSED:
        family, why = REFUSED[name]
        raise VitvizError(f"{name}: vitviz.caption does not capture {family} models yet: {why}. Captured "
                          f"decoder-only families: {CAPTURED}")
    cfg = getattr(module, "config", None)
    if cfg is not None and getattr(cfg, "vision_config", None) is not None and (
            getattr(cfg, "image_token_id", None) is not None or getattr(cfg, "image_token_index", None) is not None):
        raise VitvizError(f"{name}: vitviz.caption does not know this vision-language model's image-token layout "
                          f"(which tokens form which grid of the picture); captured decoder-only families: {CAPTURED}")
    return None


def has_image_input(module: nn.Module) -> bool:
    """Whether a transformers model takes an image at all (a vision config, an image encoder)."""
    cfg = getattr(module, "config", None)
    if cfg is None:
        return True  # not a transformers model: the caller's forward decides
    if getattr(cfg, "is_encoder_decoder", False) or getattr(cfg, "vision_config", None) is not None:
        return True
    if getattr(cfg, "encoder", None) is not None:
        return True
    return any(getattr(cfg, a, None) is not None for a in ("patch_size", "image_size", "num_channels"))


def _parts(module: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(language model, vision tower)`` of a transformers VLM."""
    inner = getattr(module, "model", module)
    lm = getattr(inner, "language_model", None)
    if lm is None:
        lm = getattr(inner, "text_model", None)  # Idefics3 / SmolVLM
    vision = getattr(inner, "vision_tower", None)
    if vision is None:
        vision = getattr(inner, "visual", None)
    if vision is None:
        vision = getattr(inner, "vision_model", None)  # BLIP-2
    if lm is None or vision is None:
        raise VitvizError(f"{type(module).__name__}: its language model and vision tower were not found "
                          "(expected .model.language_model and .model.vision_tower / .model.visual)")
    return lm, vision


def _lm_layers(lm: nn.Module, name: str) -> list[nn.Module]:
    """The language model's attention modules, in the order they run."""
    from ...attention import TEXT, discover

    layers = [s.module for s in discover(lm, ["transformers"]) if s.role == TEXT]
    if not layers:
        raise CaptureError(f"{name}: no attention module was found in its language model "
                           f"({type(lm).__name__}); vitviz.caption cannot read it")
    return layers


def _image_token(module: nn.Module) -> int:
    cfg = module.config
    tid = getattr(cfg, "image_token_id", None)
    if tid is None:
        tid = getattr(cfg, "image_token_index", None)
    if tid is None:
        raise VitvizError(f"{type(module).__name__}: its config states no image_token_id, so the image tokens of "
                          "the prompt cannot be found")
    return int(tid)


def _pair(x) -> tuple[int, int]:
    return (int(x[0]), int(x[-1])) if isinstance(x, (tuple, list)) else (int(x), int(x))


# -- Qwen2-VL's flattened patches -------------------------------------------------------------------

def qwen_patches(x: torch.Tensor, vision_config: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``[1, 3, H, W]`` image as Qwen2-VL's vision tower takes it, as its image processor does:
    the frame repeated ``temporal_patch_size`` times, cut into ``patch_size`` patches ordered by
    2x2 merge blocks (``[t, h/m, w/m, m, m]``), each flattened ``[C, T, p, p]``.

    Returns:
        ``(pixel_values [t·h·w, C·T·p·p], image_grid_thw [1, 3])``.
    """
    p, m = int(vision_config.patch_size), int(vision_config.spatial_merge_size)
    tp = int(vision_config.temporal_patch_size)
    _, c, height, width = x.shape
    if height % (p * m) or width % (p * m):
        raise VitvizError(f"Qwen2-VL takes images whose sides are multiples of {p * m} px (patch {p} x merge {m}); "
                          f"got {height}x{width}: resize the image first, or use the model's processor")
    gh, gw = height // p, width // p
    frames = x.expand(tp, c, height, width)  # [T, C, H, W]
    t = frames.reshape(1, tp, c, gh // m, m, p, gw // m, m, p)
    t = t.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [t, h/m, w/m, m, m, C, T, p, p]
    patches = t.reshape(gh * gw, c * tp * p * p)
    return patches, torch.tensor([[1, gh, gw]], dtype=torch.long, device=x.device)


def qwen_image(patches: torch.Tensor, thw: torch.Tensor, vision_config: Any) -> torch.Tensor:
    """The first frame of Qwen2-VL's flattened patches as a ``[1, 3, H, W]`` image (the inverse of
    :func:`qwen_patches`)."""
    p, m = int(vision_config.patch_size), int(vision_config.spatial_merge_size)
    tp = int(vision_config.temporal_patch_size)
    _, gh, gw = (int(v) for v in thw[0])
    c = patches.shape[-1] // (tp * p * p)
    t = patches[:gh * gw].reshape(gh // m, gw // m, m, m, c, tp, p, p)
    t = t.permute(5, 4, 0, 2, 6, 1, 3, 7)  # [T, C, h/m, m, p, w/m, m, p]
    return t.reshape(tp, c, gh * p, gw * p)[:1]  # [1, C, H, W]


def _block_order(gh: int, gw: int, m: int) -> torch.Tensor:
    """``[gh·gw]``: for every row-major patch, its index in Qwen2-VL's merge-block order."""
    idx = torch.arange(gh * gw).reshape(gh // m, m, gw // m, m).permute(0, 2, 1, 3).reshape(-1)  # block -> row-major
    return torch.argsort(idx)


# -- LLaVA-NeXT's any-resolution tiles ----------------------------------------------------------------

def anyres_tiles(x: torch.Tensor, cfg: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``[1, 3, H, W]`` picture as LLaVA-NeXT takes it, when ``(H, W)`` is one of the model's
    ``image_grid_pinpoints`` (so no resizing or padding is involved): the base image (the picture
    resized to the vision tower's ``image_size`` by torch's antialiased bilinear interpolation; the
    image processor uses PIL's resampling instead), then the tiles of ``image_size`` px, row-major,
    as the image processor cuts them.

    Returns:
        ``(pixel_values [1, 1 + n, 3, s, s], image_sizes [1, 2])``.
    """
    s = int(cfg.vision_config.image_size)
    _, c, height, width = x.shape
    pins = [(int(h), int(w)) for h, w in cfg.image_grid_pinpoints]
    if (height, width) not in pins:
        raise VitvizError(f"LLaVA-NeXT without a processor takes a [1, 3, H, W] picture whose size is one of the "
                          f"model's image_grid_pinpoints {pins}; got {height}x{width}: resize it to one of them, "
                          "or pass prompt= with the model's processor")
    base = torch.nn.functional.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
    tiles = x.reshape(1, c, height // s, s, width // s, s).permute(0, 2, 4, 1, 3, 5).reshape(-1, c, s, s)
    return torch.cat([base, tiles])[None], torch.tensor([[height, width]], device=x.device)


def anyres_canvas(pixel_values: torch.Tensor, image_sizes: torch.Tensor, cfg: Any) -> torch.Tensor:
    """The tiles of LLaVA-NeXT's ``pixel_values`` put back together: the ``[1, 3, Hb, Wb]`` canvas at
    the any-resolution size the model chose for ``image_sizes`` (the inverse of the tiling)."""
    from transformers.image_processing_utils import select_best_resolution

    s = int(cfg.vision_config.image_size)
    hb, wb = select_best_resolution([int(v) for v in image_sizes[0]], [list(p) for p in cfg.image_grid_pinpoints])
    nh, nw = int(hb) // s, int(wb) // s
    t = pixel_values[0, 1:1 + nh * nw]  # [n, 3, s, s]
    c = t.shape[1]
    return t.reshape(nh, nw, c, s, s).permute(2, 0, 3, 1, 4).reshape(1, c, nh * s, nw * s)


def anyres_grids(module: nn.Module, image_size: torch.Tensor, name: str) -> tuple[ImageGrid, ImageGrid]:
    """LLaVA-NeXT's image tokens for one picture: ``(base grid, tile grid)``.

    Found by running the model's own ``pack_image_features`` (the unpadding and the image-newline
    tokens included) on index features: every crop's token ``(r, c)`` carries ``(crop, r, c)``
    and the newline carries ``-1``; where each lands in the packed sequence is the layout, exact
    by construction. The base image's grid comes first (covering the whole picture), then the
    tiles' grid, unpadded, with a newline token after each of its rows; both regions are the
    picture's part of the tile canvas (``anyres_canvas``).

    Raises:
        CaptureError: the packed tokens do not form these two grids (another transformers layout).
    """
    from transformers.image_processing_utils import select_best_resolution

    cfg = module.config
    if getattr(cfg, "vision_feature_select_strategy", "default") != "default":
        raise VitvizError(f"{name}: vitviz.caption reads LLaVA-NeXT with vision_feature_select_strategy='default' "
                          "only (with 'full' the CLS token of every tile enters the grid)")
    vc = cfg.vision_config
    s, p = int(vc.image_size), _pair(vc.patch_size)
    g = s // p[0]
    hb, wb = (int(v) for v in select_best_resolution([int(v) for v in image_size],
                                                      [list(q) for q in cfg.image_grid_pinpoints]))
    nh, nw = hb // s, wb // s
    n = 1 + nh * nw
    crop = torch.arange(n, dtype=torch.float32)[:, None].expand(n, g * g)
    rr = torch.arange(g, dtype=torch.float32).repeat_interleave(g)[None].expand(n, g * g)
    cc = torch.arange(g, dtype=torch.float32).repeat(g)[None].expand(n, g * g)
    feats = torch.stack([crop, rr, cc], dim=-1)  # [n, g·g, 3]
    inner = getattr(module, "model", module)
    packed, _ = inner.pack_image_features([feats], image_size[None].cpu(), "default",
                                          image_newline=torch.full((3,), -1.0))
    tok = packed[0].round().long()  # [Ni, 3]: (crop, row, col) or -1 for a newline
    base = tok[:g * g]
    tiles = tok[g * g:]
    on = tiles[:, 0] >= 0
    k = tiles[on, 0] - 1  # the tile of each token
    rows = (k // nw) * g + tiles[on, 1]  # row on the canvas' patch grid
    cols = (k % nw) * g + tiles[on, 2]
    if not len(rows):
        raise CaptureError(f"{name}: LLaVA-NeXT's packed image tokens hold no tile token")
    r0, c0 = int(rows.min()), int(cols.min())
    gh, gw = int(rows.max()) - r0 + 1, int(cols.max()) - c0 + 1
    base_grid = ImageGrid(0, (g, g), (0, 0, 0, 0), (0.0, 0.0))
    region = (r0 * p[0], c0 * p[1], (r0 + gh) * p[0], (c0 + gw) * p[1])
    tile_grid = ImageGrid(g * g, (gh, gw), region, (float(p[0]), float(p[1])), newline=1)
    expect = torch.full((tile_grid.num_tokens, 3), -1, dtype=torch.long)
    rr_t = torch.arange(gh).repeat_interleave(gw) + r0
    cc_t = torch.arange(gw).repeat(gh) + c0
    tile_of = (rr_t // g) * nw + cc_t // g + 1
    expect[tile_grid.keys() - g * g] = torch.stack([tile_of, rr_t % g, cc_t % g], dim=-1)
    ref_base = torch.stack([torch.zeros(g * g, dtype=torch.long), torch.arange(g).repeat_interleave(g),
                            torch.arange(g).repeat(g)], dim=-1)
    if tiles.shape != expect.shape or not torch.equal(tiles, expect) or not torch.equal(base, ref_base):
        raise CaptureError(f"{name}: LLaVA-NeXT's packed image tokens are not the base grid followed by the tiles' "
                           "grid with one newline per row; this transformers version packs them otherwise")
    h, w = region[2] - region[0], region[3] - region[1]
    base_grid = ImageGrid(0, (g, g), region, (h / g, w / g))
    return base_grid, tile_grid


# -- Idefics3 / SmolVLM's sub-images ----------------------------------------------------------------

def split_image(x: torch.Tensor, cfg: Any) -> tuple[torch.Tensor, tuple[int, int]]:
    """A ``[1, 3, H, W]`` picture as Idefics3 / SmolVLM take it, when ``H`` and ``W`` are multiples of
    the vision tower's ``image_size`` ``s`` (so no resizing is involved): the ``H/s x W/s`` sub-images,
    row-major, then the global image (the picture resized to ``s`` by torch's antialiased bilinear
    interpolation; the image processor uses its own resampling), as the image processor's
    ``split_images`` cuts them. A picture of one sub-image is the global image alone.

    Returns:
        ``(pixel_values [1, n, 3, s, s], (rows, cols))``; ``(0, 0)`` without splitting.
    """
    s = int(cfg.vision_config.image_size)
    _, c, height, width = x.shape
    if height % s or width % s:
        raise VitvizError(f"Idefics3 / SmolVLM without a processor take a [1, 3, H, W] picture whose sides are "
                          f"multiples of the vision tower's image_size {s}; got {height}x{width}: resize it, or pass "
                          "prompt= with the model's processor")
    nr, nc = height // s, width // s
    if nr * nc == 1:
        return x[None], (0, 0)
    crops = x.reshape(1, c, nr, s, nc, s).permute(0, 2, 4, 1, 3, 5).reshape(-1, c, s, s)
    glob = torch.nn.functional.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
    return torch.cat([crops, glob])[None], (nr, nc)


def split_canvas(pixel_values: torch.Tensor, split: tuple[int, int]) -> torch.Tensor:
    """The sub-images of Idefics3's ``pixel_values`` side by side: ``[1, 3, rows·s, cols·s]`` (the
    global image when there are none)."""
    nr, nc = split
    if nr * nc == 0:
        return pixel_values[:, 0]
    t = pixel_values[0, :nr * nc]  # [n, 3, s, s]
    _, c, s, _ = t.shape
    return t.reshape(nr, nc, c, s, s).permute(2, 0, 3, 1, 4).reshape(1, c, nr * s, nc * s)


def split_grids(module: nn.Module, split: tuple[int, int], name: str) -> tuple[ImageGrid, ...]:
    """Idefics3 / SmolVLM's image tokens for one picture: one ``(g/f) x (g/f)`` grid per sub-image
    (row-major, each on its square of the canvas), then the global image's grid over the whole canvas
    (``g`` patches a side, ``f`` the connector's pixel-shuffle ``scale_factor``).

    Each token's patches are found by running the model's own ``connector.pixel_shuffle`` on index
    features (every patch carries its ``(row, col)``): token ``(R, C)`` must hold the ``f x f``
    block of patches at ``(R·f, C·f)``, exact by construction.

    Raises:
        CaptureError: the pixel shuffle groups the patches otherwise (another transformers version).
    """
    cfg = module.config
    vc = cfg.vision_config
    s, p = int(vc.image_size), _pair(vc.patch_size)
    g = s // p[0]
    f = int(cfg.scale_factor)
    k = g // f
    idx = torch.stack([torch.arange(g).repeat_interleave(g), torch.arange(g).repeat(g)], -1).float()  # [g·g, 2]
    inner = getattr(module, "model", module)
    out = inner.connector.pixel_shuffle(idx[None], f)[0].round().long()  # [k·k, 2·f·f]
    rows, cols = out[:, 0::2], out[:, 1::2]  # [k·k, f·f]
    tok = torch.arange(k * k)
    ok = out.shape == (k * k, 2 * f * f)
    ok = ok and bool(((rows // f) == (tok // k)[:, None]).all() and ((cols // f) == (tok % k)[:, None]).all())
    ok = ok and all(len({(int(r), int(c)) for r, c in zip(rows[t], cols[t])}) == f * f for t in range(k * k))
    if not ok:
        raise CaptureError(f"{name}: the connector's pixel shuffle does not put each {f}x{f} block of patches into "
                           "one token, row-major; this transformers version shuffles them otherwise")
    nr, nc = split
    cell = s / k
    grids = [ImageGrid(i * k * k, (k, k), (r * s, c * s, (r + 1) * s, (c + 1) * s), (cell, cell))
             for i, (r, c) in enumerate((r, c) for r in range(nr) for c in range(nc))]
    h, w = max(nr, 1) * s, max(nc, 1) * s
    grids.append(ImageGrid(nr * nc * k * k, (k, k), (0, 0, h, w), (h / k, w / k)))
    return tuple(grids)


# -- inputs ---------------------------------------------------------------------------------------

@dataclass
class _Inputs:
    ids: torch.Tensor  # [1, P]
    model: dict  # pixel_values, image_grid_thw, token_type_ids, ... for generate and the forward
    x: torch.Tensor  # [1, 3, H, W] the image as the model sees it (normalised)
    view: np.ndarray | None  # [H, W, 3] uint8
    split: tuple[int, int] = (0, 0)  # Idefics3: sub-image rows and columns (0, 0: the global image only)


def _view_of(x: torch.Tensor, mean, std) -> np.ndarray:
    """``[1, 3, H, W]`` normalised -> ``[H, W, 3]`` uint8 (``x·std + mean``)."""
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    rgb = (x[0].detach().float().cpu() * s + m).clamp(0, 1)  # [3, H, W]
    return (rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _processor_inputs(vm, family: str, image, prompt: str | None, processor: Any) -> _Inputs:
    """The prompt and the image through the processor. A preprocessed ``[1, 3, H, W]`` tensor (the
    gallery's batches) is given to the processor as the image it shows (its normalisation undone),
    for the prompt's placeholders, and to the model as it is."""
    from PIL import Image

    from ...models import load_image

    ip = getattr(processor, "image_processor", None)
    mean, std = getattr(ip, "image_mean", None), getattr(ip, "image_std", None)
    given = None
    if isinstance(image, torch.Tensor):
        given = vm.preprocess(image)  # [1, 3, H, W]
        if given.shape[0] != 1 or mean is None or std is None:
            raise VitvizError(f"{vm.name}: vitviz.caption takes one image; a preprocessed tensor [1, 3, H, W] needs "
                              "input_ids= or a processor with image_mean / image_std")
        img = Image.fromarray(_view_of(given, mean, std))
    else:
        img = load_image(image)
    text = prompt if prompt is not None else DEFAULT_PROMPT
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
    elif family in ("llava", "llava-next", "idefics3"):
        token = getattr(processor, "image_token", "<image>")
        text = text if token in text else f"{token}\n{text}"
    elif family == "qwen2-vl":  # (PaliGemma's processor puts the image tokens before the prompt itself)
        token = getattr(processor, "image_token", "<|image_pad|>")
        text = text if token in text else f"<|vision_start|>{token}<|vision_end|>{text}"
    out = processor(images=img, text=text, return_tensors="pt")
    ids = out["input_ids"]
    model = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask")}
    dev, dtype = vm.device, vm.dtype
    model = {k: (v.to(dev, dtype) if v.is_floating_point() else v.to(dev)) for k, v in model.items()}
    if given is not None:  # the tensor itself, not the processor's re-preprocessed copy of its picture
        if family == "qwen2-vl":
            patches, thw = qwen_patches(given, vm.module.config.vision_config)
            if not torch.equal(thw.to(dev), model["image_grid_thw"]):
                raise VitvizError(f"{vm.name}: the processor resizes this {given.shape[-2]}x{given.shape[-1]} tensor "
                                  "to another grid; pass the image itself, or input_ids=")
            model["pixel_values"] = patches
        elif family == "idefics3":
            pass  # below, with the split
        elif family == "llava-next":
            tiles, sizes = anyres_tiles(given, vm.module.config)
            if tiles.shape != model["pixel_values"].shape:
                raise VitvizError(f"{vm.name}: the processor cuts this {given.shape[-2]}x{given.shape[-1]} tensor into "
                                  "other tiles; pass the image itself, or input_ids=")
            model["pixel_values"], model["image_sizes"] = tiles.to(dev, dtype), sizes.to(dev)
        elif model["pixel_values"].shape != given.shape:
            raise VitvizError(f"{vm.name}: the processor turns this {given.shape[-2]}x{given.shape[-1]} tensor into "
                              f"{tuple(model['pixel_values'].shape)}; pass the image itself, or input_ids=")
        else:
            model["pixel_values"] = given
    split = (0, 0)
    if family == "idefics3":  # the sub-image rows and columns, from the processor's own image processor
        info = ip(images=img, return_row_col_info=True, return_tensors="pt")
        split = (int(info["rows"][0][0]), int(info["cols"][0][0]))
        if given is not None:
            model["pixel_values"], split = split_image(given.to(dev, dtype), vm.module.config)
            model.pop("pixel_attention_mask", None)
    if family == "qwen2-vl":
        x = qwen_image(model["pixel_values"], model["image_grid_thw"], vm.module.config.vision_config)
    elif family == "idefics3":
        x = split_canvas(model["pixel_values"], split)
    elif family == "llava-next":
        x = anyres_canvas(model["pixel_values"], model["image_sizes"], vm.module.config)
    else:
        x = model["pixel_values"]
    view = _view_of(x, mean, std) if mean is not None and std is not None else None
    return _Inputs(ids.to(dev), model, x, view, split)


def _id_inputs(vm, family: str, image, input_ids) -> _Inputs:
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise VitvizError(f"input_ids must be one prompt's token ids, [S] or [1, S]; got shape {tuple(ids.shape)}")
    view = None
    if isinstance(image, torch.Tensor):
        x = vm.preprocess(image)  # [1, 3, H, W]
    else:
        from ...models import load_image

        img = load_image(image)
        x = vm.preprocess(img)
        pre = vm.preprocessor
        view = pre.view(img) if hasattr(pre, "view") else None
    if x.dim() != 4 or x.shape[0] != 1 or x.shape[1] != 3:
        raise VitvizError(f"vitviz.caption takes one image, [1, 3, H, W]; got shape {tuple(x.shape)}: caption the "
                          "images one by one")
    model: dict = {}
    split = (0, 0)
    if family == "llava-next":
        model["pixel_values"], model["image_sizes"] = anyres_tiles(x, vm.module.config)
    elif family == "idefics3":
        model["pixel_values"], split = split_image(x, vm.module.config)
    elif family == "qwen2-vl":
        model["pixel_values"], model["image_grid_thw"] = qwen_patches(x, vm.module.config.vision_config)
        # which tokens are image tokens (for M-RoPE's 3-D positions), as Qwen2VLProcessor gives them
        model["mm_token_type_ids"] = (ids == _image_token(vm.module)).to(torch.int)
    else:
        model["pixel_values"] = x
    if family == "paligemma":  # the whole prompt is the bidirectional prefix, as PaliGemmaProcessor gives it
        model["token_type_ids"] = torch.zeros_like(ids)
    return _Inputs(ids.to(vm.device), model, x, view, split)


def _grid(vm, family: str, inputs: _Inputs) -> tuple[tuple[ImageGrid, ...], int]:
    """The grids of image tokens one image gives, and its token count."""
    cfg = vm.module.config
    vcfg = cfg.vision_config
    height, width = (int(s) for s in inputs.x.shape[-2:])
    p = _pair(vcfg.patch_size)
    prefix = 0
    if family in ("blip2", "instructblip"):  # the Q-Former's queries: no grid (ImageGrid: their row, 1 x Q)
        q = int(cfg.num_query_tokens)
        return (ImageGrid(0, (1, q), (0, 0, height, width), (height, width), 0),), q
    if family == "llava-next":
        grids = anyres_grids(vm.module, inputs.model["image_sizes"][0], vm.name)
        return grids, sum(g.num_tokens for g in grids)
    if family == "idefics3":
        grids = split_grids(vm.module, inputs.split, vm.name)
        return grids, sum(g.num_tokens for g in grids)
    if family == "qwen2-vl":
        m = int(vcfg.spatial_merge_size)
        _, gh_p, gw_p = (int(v) for v in inputs.model["image_grid_thw"][0])
        gh, gw, cell = gh_p // m, gw_p // m, (p[0] * m, p[1] * m)
    else:
        gh, gw, cell = height // p[0], width // p[1], p
        if family == "llava" and getattr(cfg, "vision_feature_select_strategy", "default") == "full":
            prefix = 1  # the CLS token is kept, first
    region = (0, 0, gh * cell[0], gw * cell[1])
    return (ImageGrid(0, (gh, gw), region, cell, prefix),), prefix + gh * gw


def _check_placeholders(name: str, ids: torch.Tensor, tid: int, per: int, grids: tuple[ImageGrid, ...],
                        tok: Any) -> None:
    n = int((ids == tid).sum())
    what = f"image token id {tid}"
    if tok is not None:
        try:
            what += f" ({tok.convert_ids_to_tokens(tid)!r})"
        except (KeyError, IndexError, TypeError, ValueError):
            pass
    if n == 0:
        raise VitvizError(f"{name}: the prompt has no image token ({what}), so the model would not see the image; "
                          f"put the image's {per} placeholders into input_ids (a processor expands one image token "
                          "into them), or pass prompt= with the model's processor")
    if n != per:
        if n % per == 0:
            raise VitvizError(f"{name}: the prompt has placeholders for {n // per} images ({n} image tokens, {per} "
                              "per image) but vitviz.caption takes one image; keep one image's placeholders")
        shape = " + ".join(f"{g.grid[0]}x{g.grid[1]}" + (" + CLS" if g.num_prefix else "")
                           + (f" + {g.grid[0] * g.newline} newline" if g.newline else "") for g in grids)
        raise VitvizError(f"{name}: the prompt has {n} image tokens ({what}) but the image gives {per} "
                          f"({shape} tokens); put exactly {per} "
                          "placeholders, or pass the image at the size the prompt was made for")


def _qformer_layers(module: nn.Module) -> list[nn.Module]:
    """BLIP-2: the Q-Former's cross-attention modules (queries over the vision tokens), in order."""
    return [m for n, m in module.qformer.named_modules() if n.endswith("crossattention.attention")]


# -- the caption ----------------------------------------------------------------------------------

def vlm_caption(vm, family: str, image, *, prompt: str | None, input_ids, processor: Any, tokenizer: Any,
                max_new_tokens: int, num_beams: int, end_ids, keep_encoder: bool, relevance: bool,
                generate_kwargs: dict) -> dict:
    """Generate once, then read the rows of the teacher-forced pass. Returns the fields of a Caption
    (and ``layout``, ``grids``)."""
    from ._decoding import _as_list, _sequences

    module = vm.module
    name = vm.name
    if processor is None:
        processor = getattr(vm, "processor", None)
    if processor is None and input_ids is None and ("/" in vm.name or Path(vm.name).is_dir()):
        processor = load_processor(vm.name)  # a model loaded from a folder or the Hub: its processor files
    tok = tokenizer if tokenizer is not None else (getattr(processor, "tokenizer", None) or vm.tokenizer)
    if input_ids is not None:
        if prompt is not None:
            raise VitvizError("pass prompt= or input_ids=, not both: input_ids already holds the prompt")
        inputs = _id_inputs(vm, family, image, input_ids)
    elif processor is not None:
        inputs = _processor_inputs(vm, family, image, prompt, processor)
    else:
        raise VitvizError(f"{name}: no processor to build the prompt from; pass processor= (the model's "
                          "transformers AutoProcessor), or input_ids= with the prompt's token ids including the image "
                          "placeholders (and the image as a preprocessed [1, 3, H, W] tensor)")
    if family == "instructblip":  # its Q-Former also reads the instruction, in its own tokenizer's ids
        generate_kwargs = dict(generate_kwargs)
        for key in ("qformer_input_ids", "qformer_attention_mask"):
            if key in generate_kwargs:
                v = torch.as_tensor(generate_kwargs.pop(key), dtype=torch.long)
                inputs.model[key] = (v[None] if v.dim() == 1 else v).to(inputs.ids.device)
        if "qformer_input_ids" not in inputs.model:
            raise VitvizError(f"{name}: InstructBLIP's Q-Former reads the instruction too, tokenized by the "
                              "Q-Former's own tokenizer (not the language model's); pass qformer_input_ids= with "
                              "input_ids=, or prompt= with the model's InstructBlipProcessor")
    tid = _image_token(module)
    grids, per = _grid(vm, family, inputs)
    _check_placeholders(name, inputs.ids, tid, per, grids, tok)
    ids = inputs.ids  # [1, P]
    prompt_len = ids.shape[1]

    # 1. generate once, nothing hooked ----------------------------------------------------------
    kw: dict = dict(max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
    kw.update(generate_kwargs)
    with torch.no_grad():
        seq = _sequences(module.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs.model, **kw))
    seq = seq.to(ids.device)
    if seq.shape[1] < prompt_len or not torch.equal(seq[:, :prompt_len], ids):
        raise CaptureError(f"{name}: generate() did not return the prompt followed by the new tokens; vitviz.caption "
                           "needs the decoder-only layout of generate's output")
    gen = getattr(module, "generation_config", None)
    ends = _as_list(getattr(gen, "eos_token_id", None)) if end_ids is None else [int(e) for e in end_ids]
    predicted = [int(v) for v in seq[0, prompt_len:].tolist()]
    cut = next((i for i, v in enumerate(predicted) if v in set(ends)), len(predicted))
    predicted = predicted[:cut]
    num = len(predicted)

    # 2. one teacher-forced forward: rows of the LM, the vision tower's attention ---------------
    inp = seq[:, :prompt_len + max(num - 1, 0)]  # [1, S']
    rows = torch.arange(prompt_len - 1, prompt_len - 1 + num, device=ids.device)  # [T] the queries that chose
    cols = (inp[0] == tid).nonzero()[:, 0]  # [Ni]
    model_inputs = dict(inputs.model)
    # token types of the generated tokens, as generate() extends them: PaliGemma's causal suffix (1),
    # Qwen2-VL's text tokens (0)
    for key, fill in (("token_type_ids", 1), ("mm_token_type_ids", 0)):
        if key in model_inputs:
            tt = model_inputs[key]
            model_inputs[key] = torch.cat([tt, tt.new_full((1, inp.shape[1] - tt.shape[1]), fill)], dim=1)
    lm, vision = _parts(module)
    reader = RowsReader(_lm_layers(lm, name), rows, cols, grad=relevance and num > 0)
    encoder, note, rel = None, None, None
    qformer = None
    if family in ("blip2", "instructblip"):  # the queries' cross-attention over the vision tokens, all of it
        h, w = (int(s) for s in inputs.x.shape[-2:])
        p = _pair(module.config.vision_config.patch_size)
        vlayout = TokenLayout(1, (h // p[0], w // p[1]))  # CLS, then the patches
        qformer = RowsReader(_qformer_layers(module), torch.arange(per, device=ids.device),
                             torch.arange(vlayout.num_tokens, device=ids.device))
        qformer.attach()
    reader.attach()
    try:
        with torch.enable_grad() if relevance else torch.no_grad():
            with qformer if qformer is not None else contextlib.nullcontext():
                if keep_encoder:
                    encoder, note, out = _forward_with_encoder(vm, family, vision, reader, inp, model_inputs, inputs)
                else:
                    with reader:
                        out = _forward(module, inp, model_inputs, full_logits=relevance)
            if relevance:
                rel = (reader.relevance(out.logits, predicted) if num
                       else torch.zeros(0, len(cols), device=ids.device))  # [T, Ni]
    finally:
        reader.detach()
        reader.saved = [None] * len(reader.saved)  # the graph is freed with them
        if qformer is not None:
            qformer.detach()
    cross = (reader.result() if num
             else torch.zeros(len(reader.layers), 1, 1, 0, len(cols), device=ids.device))  # [L, 1, H, T, Ni]
    if cross.shape[-1] != per:
        raise CaptureError(f"{name}: {cross.shape[-1]} image tokens in the teacher-forced sequence, {per} expected")
    if len(grids) == 1 and not grids[0].newline:
        layout = TokenLayout(grids[0].num_prefix, grids[0].grid, has_cls=bool(grids[0].num_prefix) or None)
    else:  # several grids (LLaVA-NeXT): the keys as one row; word_grids places them with cap.image_grids
        layout = TokenLayout(0, (1, per))
    if qformer is not None:
        qformer = CrossAttentionMaps(qformer.result(), vlayout)  # [Lq, 1, H, Q, N]
    return dict(seq=seq, prompt_len=prompt_len, predicted=predicted, cross=cross, layout=layout, grids=grids,
                qformer=qformer,
                encoder=encoder, view=inputs.view, tokenizer=tok, note=note,
                relevance=None if rel is None else rel.detach().float())


def _forward(module: nn.Module, inp: torch.Tensor, model_inputs: dict, full_logits: bool = False) -> Any:
    """The teacher-forced call; the logits of the last position only unless ``full_logits``
    (relevance explains the logit at every position that chose a token)."""
    extra = {} if full_logits else {"logits_to_keep": 1}
    return module(input_ids=inp, attention_mask=torch.ones_like(inp), use_cache=False, **model_inputs, **extra)


def _forward_with_encoder(vm, family: str, vision: nn.Module, reader: RowsReader, inp: torch.Tensor,
                          model_inputs: dict, inputs: _Inputs) -> tuple[AttentionMaps | None, str | None, Any]:
    """The teacher-forced forward with the vision tower captured: ``(encoder attention, note, output)``."""
    from ...attention import capture
    from ...models import wrap

    if getattr(vm.module.config.vision_config, "fullatt_block_indexes", None):  # Qwen2.5-VL
        with reader:
            out = _forward(vm.module, inp, model_inputs, full_logits=reader.grad)
        return None, ("cap.encoder is None: Qwen2.5-VL's vision tower attends within windows of merged patches in "
                      "its own token order, which vitviz does not place on the patch grid yet"), out
    if family == "qwen2-vl":
        vcfg = vm.module.config.vision_config
        _, gh, gw = (int(v) for v in model_inputs["image_grid_thw"][0])
        tower = wrap(vision, grid=(gh, gw), num_prefix=0, name=f"{vm.name}.visual")
    else:
        tower = wrap(vision, name=f"{vm.name}.vision_tower")
    with reader, capture(tower) as rec:
        out = _forward(vm.module, inp, model_inputs, full_logits=reader.grad)
    try:
        enc = rec.attentions
    except (CaptureError, VitvizError) as e:
        return None, f"the vision tower's attention is not available: {e}", out
    if enc is None:
        return None, None, out
    if family == "qwen2-vl":  # tokens in merge-block order -> row-major on the patch grid
        order = _block_order(gh, gw, int(vcfg.spatial_merge_size)).to(enc.tensor.device)
        t = enc.tensor[..., order, :][..., order]  # [L, 1, H, N, N]
        enc = AttentionMaps(t, TokenLayout(0, (gh, gw)))
    return enc, None, out


def load_processor(model_id: str) -> Any:
    """The transformers ``AutoProcessor`` of a model directory or a cached Hub model, or None.

    Read from local files only (the model's directory or the Hugging Face cache): a model loaded
    with :func:`vitviz.load_model` has its files there already.

    Args:
        model_id: a local model directory or a Hub id.

    Returns:
        The processor (image processor, tokenizer, chat template), or None when there is none.
    """
    try:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(model_id, local_files_only=True)
    except (OSError, ValueError, KeyError, ImportError, TypeError):
        return None
