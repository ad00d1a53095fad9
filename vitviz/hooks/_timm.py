"""timm attention (ViT, DeiT, DINO, DINOv2, EVA, BEiT, ...): image self-attention sites.

timm's attention modules call ``F.scaled_dot_product_attention`` (``fused_attn``, the default)
or compute ``softmax(q kᵀ)`` and multiply it with ``v``; both are read at the op, whichever
the module's own setting selects. This adapter only says that their calls are image
self-attention (an attention-pool head's latent queries are non-square: role POOL).
"""

from __future__ import annotations

from torch import nn

from ._registry import IMAGE, Adapter, Site, register_adapter


def _is_timm_attention(m: nn.Module) -> bool:
    return type(m).__module__.startswith("timm.") and hasattr(m, "fused_attn")


@register_adapter
class TimmAdapter(Adapter):
    name = "timm"
    priority = 10
    scoped = True

    def find(self, root, is_free):
        return [Site(n, m, IMAGE, self) for n, m in root.named_modules()
                if _is_timm_attention(m) and is_free(n)]
