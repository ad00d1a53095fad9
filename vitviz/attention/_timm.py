"""timm attention (ViT, DeiT, DINOv2, EVA, BEiT, Swin, PiT, PVT, LeViT, CaiT, ...): image sites.

timm's attention modules call ``F.scaled_dot_product_attention`` (``fused_attn``) or compute
``softmax(q kᵀ)`` and multiply it with ``v``; both are read at the op, whichever the module's
own setting selects. This adapter says which timm modules are attention (every one is over
image tokens: role IMAGE), which blocks cut their grid into windows (Swin: ``windows``), and
which attention modules are not over the image's tokens at all (role INNER, with the reason).
"""

from __future__ import annotations

import re

from torch import nn

from ._adapter import IMAGE, INNER, Adapter, Site, Windows, register_adapter
from ._windows import WindowScheme

# class names of timm attention modules that have no ``fused_attn`` attribute (ConViT's GPSA and
# MHSA, LeViT's subsampling AttentionDownsample included)
_ATTENTION_CLASS = re.compile(r"(Attention|Attn|Attention2d|AttentionCl|AttentionDownsample|Attention2dDownsample"
                             r"|GPSA|MHSA)$")

# attention that is not a token-to-token probability matrix over the image: (timm module,
# class) -> (what it is, why it is not read). Their calls run untouched and are listed in
# rec.skipped with these words.
_NOT_OVER_TOKENS = {
    ("xcit", "XCA"): ("cross-covariance attention",
                      "XCiT's cross-covariance attention is a softmax over feature channels (a d x d "
                      "matrix per head), not over tokens, so it has no map on the image (its class-"
                      "attention layers are read: rec.pool)"),
    ("cait", "TalkingHeadAttn"): ("talking-heads attention",
                                  "CaiT's talking-heads attention mixes the heads after the softmax, so "
                                  "its weights are not probabilities over the tokens (its class-attention "
                                  "layers are read: rec.pool)"),
    ("volo", "OutlookAttention"): ("outlook attention",
                                   "VOLO's outlook attention predicts each token's weights over its k x k "
                                   "neighbourhood from the token alone (no query-key product)"),
    ("hiera", "MaskUnitAttention"): ("mask-unit attention",
                                     "Hiera attends within mask units in its unrolled token order, which "
                                     "vitviz does not map back to the image grid"),
    ("davit", "ChannelAttention"): ("channel attention",
                                    "DaViT's channel attention is a softmax over feature channels, not tokens"),
    ("efficientvit_mit", "LiteMLA"): ("linear attention",
                                      "EfficientViT's ReLU linear attention never forms attention probabilities"),
    ("coat", "FactorAttnConvRelPosEnc"): ("factorised attention",
                                          "CoaT's factorised attention normalises the keys alone "
                                          "(softmax(K)ᵀV), so no token-to-token matrix exists"),
    ("efficientformer_v2", "Attention2d"): ("talking-heads attention",
                                            "EfficientFormerV2's attention mixes the heads after the softmax "
                                            "(talking heads), so its weights are not probabilities over the tokens"),
    ("edgenext", "CrossCovarianceAttn"): ("cross-covariance attention",
                                          "EdgeNeXt's cross-covariance attention is a softmax over feature "
                                          "channels (a d x d matrix per head), not over tokens"),
    ("mobilevit", "LinearSelfAttention"): ("separable self-attention",
                                           "MobileViTv2's separable self-attention weighs the tokens against one "
                                           "latent query and sums them; it never forms token-to-token probabilities"),
    ("global_context", "GlobalContext"): ("global context attention",
                                          "GCNet's global context pools the pixels with one softmax per image (no "
                                          "query-key product), not token-to-token attention"),
}
_TNT_INNER = ("inner attention",
              "TNT's inner attention is among the pixels inside each patch, not over the image's patches")


def _nhwc_grid(args: tuple, kwargs: dict) -> tuple[int, int]:
    x = args[0] if args else kwargs["x"]
    return int(x.shape[1]), int(x.shape[2])


def _nchw_grid(args: tuple, kwargs: dict) -> tuple[int, int]:
    x = args[0] if args else kwargs["x"]
    return int(x.shape[2]), int(x.shape[3])


def _maxvit(block: nn.Module, grid: tuple[int, int]) -> WindowScheme:
    """MaxViT: block attention (windows) or grid attention (dilated windows)."""
    size = tuple(block.partition_size)
    return WindowScheme(grid, (int(size[0]), int(size[-1])), dilated=not block.partition_block)


def _twins(block: nn.Module, grid: tuple[int, int]) -> WindowScheme:
    """Twins' locally-grouped attention: ``ws x ws`` windows of the grid, padded at the bottom and
    right to whole windows, no shift (each window one sequence: ``[B, windows, heads, T, d]``)."""
    return WindowScheme(grid, (int(block.ws), int(block.ws)))


def _twins_grid(args: tuple, kwargs: dict) -> tuple[int, int]:
    size = args[1] if len(args) > 1 else kwargs["size"]
    return int(size[0]), int(size[1])


def _efficientvit_msra(block: nn.Module, grid: tuple[int, int]) -> WindowScheme | None:
    """EfficientViT-MSRA's local window attention: ``r x r`` windows (padded at the bottom and
    right) once the grid is larger than one window; a grid that fits one window is attended as
    a whole (None: global attention)."""
    r = int(block.window_resolution)
    if grid[0] <= r and grid[1] <= r:
        return None
    return WindowScheme(grid, (r, r))


def _mobilevit(block: nn.Module, grid: tuple[int, int]) -> WindowScheme:
    """MobileViT unfolds its (resized to whole patches) feature map into one sequence per pixel
    offset inside a patch: the patches' tokens at that offset, a dilated window over the grid."""
    ph, pw = (int(v) for v in block.patch_size)
    h, w = -(-grid[0] // ph) * ph, -(-grid[1] // pw) * pw
    return WindowScheme((h, w), (h // ph, w // pw), dilated=True)


# blocks that partition their token grid (read from their input) into windows and call their
# attention on each: (grid reader, scheme maker or None for Swin-like blocks that pad to whole
# windows and shift cyclically; window_size 0 (SAM's global blocks) or one window over the
# whole grid (TinyViT) is global attention)
_WINDOW_BLOCKS = {
    ("swin_transformer", "SwinTransformerBlock"): (_nhwc_grid, None),
    ("swin_transformer_v2", "SwinTransformerV2Block"): (_nhwc_grid, None),
    ("vision_transformer_sam", "Block"): (_nhwc_grid, None),  # SAM / ViTDet windowed blocks
    ("tiny_vit", "TinyVitBlock"): (_nhwc_grid, None),
    ("davit", "SpatialBlock"): (_nchw_grid, None),
    ("maxxvit", "PartitionAttentionCl"): (_nhwc_grid, _maxvit),
    ("mobilevit", "MobileVitBlock"): (_nchw_grid, _mobilevit),
    ("twins", "LocallyGroupedAttn"): (_twins_grid, _twins),  # the attention module cuts the windows itself
    ("efficientvit_msra", "LocalWindowAttention"): (_nchw_grid, _efficientvit_msra),
}


def _key(m: nn.Module) -> tuple[str, str]:
    return type(m).__module__.rsplit(".", 1)[-1], type(m).__name__


def _is_timm(m: nn.Module) -> bool:
    return type(m).__module__.startswith("timm.")


def _is_attention(m: nn.Module) -> bool:
    return _is_timm(m) and (hasattr(m, "fused_attn") or bool(_ATTENTION_CLASS.search(type(m).__name__))
                            or _key(m) in _NOT_OVER_TOKENS)


def _coarse_queries(m: nn.Module) -> bool:
    """Whether ``m`` pools its queries onto a coarser grid than its keys: LeViT's
    AttentionDownsample (queries on every other token of each row and column), EfficientFormerV2's
    Attention2dDownsample, MViTv2's attention with a query pooling (``pool_q``, at the stage
    transitions)."""
    return (type(m).__name__ in ("AttentionDownsample", "Attention2dDownsample")
            or getattr(m, "pool_q", None) is not None)


@register_adapter
class TimmAdapter(Adapter):
    name = "timm"
    priority = 10
    scoped = True

    def find(self, root, is_free):
        named = [(n, m) for n, m in root.named_modules() if _is_attention(m) and is_free(n)]
        # the innermost attention modules: a container of attention (a block named "...Attention")
        # is not itself a site
        names = [n for n, _ in named]
        sites = []
        parents = dict(root.named_modules())
        for n, m in named:
            if any(o.startswith(n + ".") for o in names):
                continue
            what, note = _NOT_OVER_TOKENS.get(_key(m), ("", ""))
            if not note and _key(m) == ("tnt", "Attention") and n.endswith("attn_in"):
                what, note = _TNT_INNER
            windows = None
            parts = n.split(".")
            for depth in range(len(parts), 0, -1):  # the nearest window block around (or at) the site
                block = parents.get(".".join(parts[:depth]))
                if block is not None and _key(block) in _WINDOW_BLOCKS:
                    read, make = _WINDOW_BLOCKS[_key(block)]
                    windows = Windows(block, read, pad_first=False, make=make)
                    break
            sites.append(Site(n, m, INNER if note else IMAGE, self, windows=windows, note=note, what=what,
                              coarse_queries=_coarse_queries(m)))
        return sites
