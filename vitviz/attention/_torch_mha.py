"""``torch.nn.MultiheadAttention``, wherever it sits (nn.Transformer* layers, hand-written models).

Its calls are read at ``F.multi_head_attention_forward`` (:mod:`._mode`), asked for per-head
weights; the caller still gets what it asked for. With the capture's mode active, torch skips
the fused fast paths of ``MultiheadAttention`` and ``nn.TransformerEncoderLayer`` by itself
(they refuse inputs that have a torch function), so no flag is switched.

This adapter only says what the call cannot: inside ``nn.TransformerDecoderLayer``,
``self_attn`` is the text self-attention (TEXT) and ``multihead_attn`` the cross-attention
over the encoder tokens (CROSS); inside ``nn.TransformerEncoderLayer`` it is IMAGE. A standalone
MHA is decided per call: IMAGE when ``query is key`` (self-attention), CROSS otherwise. An MHA
whose parent holds a learned ``probe`` query (transformers' SigLIP multihead-attention pooling
head) is a pooling head: POOL, read as ``rec.pool`` like timm's attention-pool heads.
"""

from __future__ import annotations

from torch import nn

from ._adapter import AUTO, CROSS, IMAGE, POOL, TEXT, Adapter, Site, register_adapter

_DECODER_ROLES = {"self_attn": TEXT, "multihead_attn": CROSS}


def _role_of(root: nn.Module, name: str) -> str:
    """The role of the MHA called ``name`` in ``root``, from its parent layer (AUTO if standalone)."""
    if "." in name:
        parent_name, leaf = name.rsplit(".", 1)
        parent = root.get_submodule(parent_name)
    else:
        parent, leaf = (root if name else None), name
    if isinstance(parent, nn.TransformerDecoderLayer) and leaf in _DECODER_ROLES:
        return _DECODER_ROLES[leaf]
    if isinstance(parent, nn.TransformerEncoderLayer) and leaf == "self_attn":
        return IMAGE
    if isinstance(getattr(parent, "probe", None), nn.Parameter):  # a learned query pooling the tokens
        return POOL
    return AUTO


@register_adapter
class TorchMHAAdapter(Adapter):
    """Every ``nn.MultiheadAttention`` (and subclass) of the model."""

    name = "torch_mha"
    priority = 30

    def find(self, root, is_free):
        return [Site(n, m, _role_of(root, n), self) for n, m in root.named_modules()
                if isinstance(m, nn.MultiheadAttention) and is_free(n)]
