"""Short model names users type, and where each comes from.

Kept free of heavy imports so that `vitviz models` and `vitviz --help` stay fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Alias:
    """A short name for a model.

    Attributes:
        name: what users type (``b16``).
        source: ``"timm"`` or ``"transformers"``.
        ids: image size -> model id; the first entry is the default size.
        about: one line for `vitviz models`.
    """

    name: str
    source: str
    ids: dict = field(default_factory=dict)
    about: str = ""

    @property
    def default_id(self) -> str:
        return next(iter(self.ids.values()))

    def resolve(self, image_size=None) -> tuple[str, bool]:
        """The model id for an image size, and whether that id was made for that size.

        When no model exists for the size, the default id is returned and the caller
        interpolates the position embeddings.
        """
        if image_size is None:
            return self.default_id, True
        size = image_size if isinstance(image_size, int) else (
            image_size[0] if image_size[0] == image_size[-1] else None)
        if size in self.ids:
            return self.ids[size], True
        return self.default_id, False


_TABLE = [
    # name, timm id pattern, image sizes with their own weights, description
    ("ti16", "vit_tiny_patch16_{s}", (224, 384), "ViT-Ti/16, ImageNet-1k (AugReg)"),
    ("s16", "vit_small_patch16_{s}", (224, 384), "ViT-S/16, ImageNet-1k (AugReg)"),
    ("s32", "vit_small_patch32_{s}", (224, 384), "ViT-S/32, ImageNet-1k (AugReg)"),
    ("b16", "vit_base_patch16_{s}", (224, 384),
     "ViT-B/16, ImageNet-1k (AugReg); --image-size 384 for the 384 px model"),
    ("b32", "vit_base_patch32_{s}", (224, 384), "ViT-B/32, ImageNet-1k (AugReg)"),
    ("l16", "vit_large_patch16_{s}", (224, 384), "ViT-L/16, ImageNet-1k (AugReg)"),
    ("deit-ti", "deit_tiny_patch16_{s}", (224,), "DeiT-Ti, ImageNet-1k"),
    ("deit-s", "deit_small_patch16_{s}", (224,), "DeiT-S, ImageNet-1k"),
    ("deit-b", "deit_base_patch16_{s}", (224, 384), "DeiT-B, ImageNet-1k"),
    ("deit-ti-distilled", "deit_tiny_distilled_patch16_{s}", (224,), "DeiT-Ti distilled (CLS + distillation token)"),
    ("deit-s-distilled", "deit_small_distilled_patch16_{s}", (224,), "DeiT-S distilled (CLS + distillation token)"),
    ("deit-b-distilled", "deit_base_distilled_patch16_{s}", (224, 384), "DeiT-B distilled (CLS + distillation token)"),
]

ALIASES: dict[str, Alias] = {}
for _name, _pattern, _sizes, _about in _TABLE:
    ALIASES[_name] = Alias(_name, "timm", {s: _pattern.format(s=s) for s in _sizes}, _about)
ALIASES["b16-384"] = Alias("b16-384", "timm", {384: "vit_base_patch16_384"}, "ViT-B/16 at 384 px, ImageNet-1k")
ALIASES["b32-384"] = Alias("b32-384", "timm", {384: "vit_base_patch32_384"}, "ViT-B/32 at 384 px, ImageNet-1k")
for _name, _id, _about in [
    ("dino-s16", "vit_small_patch16_224.dino", "DINO ViT-S/16 (self-supervised, no classifier)"),
    ("dino-s8", "vit_small_patch8_224.dino", "DINO ViT-S/8 (self-supervised, no classifier)"),
    ("dino-b16", "vit_base_patch16_224.dino", "DINO ViT-B/16 (self-supervised, no classifier)"),
    ("dino-b8", "vit_base_patch8_224.dino", "DINO ViT-B/8 (self-supervised, no classifier)"),
    ("dinov2-s-reg", "vit_small_patch14_reg4_dinov2.lvd142m", "DINOv2 ViT-S/14 with 4 registers"),
    ("dinov2-b-reg", "vit_base_patch14_reg4_dinov2.lvd142m", "DINOv2 ViT-B/14 with 4 registers"),
    ("dinov2-l-reg", "vit_large_patch14_reg4_dinov2.lvd142m", "DINOv2 ViT-L/14 with 4 registers"),
]:
    ALIASES[_name] = Alias(_name, "timm", {518: _id}, _about)
# image captioners (transformers): cross-attention of every generated word, `vitviz caption`
for _name, _size, _id, _about in [
    ("vit-gpt2", 224, "nlpconnect/vit-gpt2-image-captioning", "ViT-B/16 encoder + GPT-2 decoder captioner (COCO)"),
    ("blip-base", 384, "Salesforce/blip-image-captioning-base", "BLIP base image captioner (COCO)"),
]:
    ALIASES[_name] = Alias(_name, "transformers", {_size: _id}, _about)
del _name, _pattern, _sizes, _about, _id, _size


def alias_names() -> list[str]:
    return list(ALIASES)
