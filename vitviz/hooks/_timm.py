"""timm attention (ViT, DeiT, DINO, DINOv2, EVA, BEiT, ...).

timm's attention modules read ``self.fused_attn`` at every forward. When it is True,
``F.scaled_dot_product_attention`` runs and the probabilities never exist, so inside the
capture it is set to False on each instance (restored on exit). In the eager path, the
*input* of ``attn_drop`` is the post-softmax attention ``[B, H, N, N]``.
"""

from __future__ import annotations

from contextlib import ExitStack

from torch import nn

from ._registry import IMAGE, Adapter, Emit, Site, register_adapter


def _is_timm_attention(m: nn.Module) -> bool:
    return (type(m).__module__.startswith("timm.")
            and hasattr(m, "fused_attn")
            and isinstance(getattr(m, "attn_drop", None), nn.Module))


@register_adapter
class TimmAdapter(Adapter):
    name = "timm"
    priority = 10
    selectable = True  # fused_attn and the hook are per attention module

    def find(self, root, is_free):
        return [Site(n, m, IMAGE, self) for n, m in root.named_modules()
                if _is_timm_attention(m) and is_free(n)]

    def attach(self, sites: list[Site], emit: Emit, stack: ExitStack) -> None:
        for site in sites:
            attn_mod = site.module
            old = attn_mod.fused_attn
            # the attribute is declared Final for TorchScript but is a plain instance attribute
            attn_mod.fused_attn = False
            stack.callback(setattr, attn_mod, "fused_attn", old)

            def pre_hook(_mod, args, _site=site):
                attn = args[0]  # [B, H, Q, K] post-softmax
                if attn.shape[-1] == attn.shape[-2]:  # skip latent-query pooling attention
                    emit(_site, attn, None)

            handle = attn_mod.attn_drop.register_forward_pre_hook(pre_hook)
            stack.callback(handle.remove)
