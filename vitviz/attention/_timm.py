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

# class names of timm attention modules that have no ``fused_attn`` attribute
_ATTENTION_CLASS = re.compile(r"(Attention|Attn|Attention2d|AttentionCl)$")

# attention that is not a token-to-token probability matrix over the image: (timm module,
# class) -> why. Their calls run untouched; the reason is given when nothing else is captured.
_NOT_OVER_TOKENS = {
    ("xcit", "XCA"): "XCiT's cross-covariance attention is a softmax over feature channels (a d x d "
                     "matrix per head), not over tokens, so it has no map on the image (its class-"
                     "attention layers are read: rec.pool)",
    ("cait", "TalkingHeadAttn"): "CaiT's talking-heads attention mixes the heads after the softmax, so "
                                 "its weights are not probabilities over the tokens (its class-attention "
                                 "layers are read: rec.pool)",
    ("volo", "OutlookAttention"): "VOLO's outlook attention predicts each token's weights over its k x k "
                                  "neighbourhood from the token alone (no query-key product)",
    ("hiera", "MaskUnitAttention"): "Hiera attends within mask units in its unrolled token order, which "
                                    "vitviz does not map back to the image grid",
    ("davit", "ChannelAttention"): "DaViT's channel attention is a softmax over feature channels, not tokens",
    ("efficientvit_mit", "LiteMLA"): "EfficientViT's ReLU linear attention never forms attention probabilities",
    ("coat", "FactorAttnConvRelPosEnc"): "CoaT's factorised attention normalises the keys alone "
                                         "(softmax(K)ᵀV), so no token-to-token matrix exists",
}


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
}


def _key(m: nn.Module) -> tuple[str, str]:
    return type(m).__module__.rsplit(".", 1)[-1], type(m).__name__


def _is_timm(m: nn.Module) -> bool:
    return type(m).__module__.startswith("timm.")


def _is_attention(m: nn.Module) -> bool:
    return _is_timm(m) and (hasattr(m, "fused_attn") or bool(_ATTENTION_CLASS.search(type(m).__name__))
                            or _key(m) in _NOT_OVER_TOKENS)


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
            note = _NOT_OVER_TOKENS.get(_key(m), "")
            if not note and _key(m) == ("tnt", "Attention") and n.endswith("attn_in"):
                note = "TNT's inner attention is among the pixels inside each patch, not over the image's patches"
            windows = None
            parts = n.split(".")
            for depth in range(len(parts) - 1, 0, -1):  # the nearest window block around the site
                block = parents.get(".".join(parts[:depth]))
                if block is not None and _key(block) in _WINDOW_BLOCKS:
                    read, make = _WINDOW_BLOCKS[_key(block)]
                    windows = Windows(block, read, pad_first=False, make=make)
                    break
            sites.append(Site(n, m, INNER if note else IMAGE, self, windows=windows, note=note))
        return sites
