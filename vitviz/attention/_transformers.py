"""transformers attention (ViT, DeiT, DINOv2, BEiT, CLIP, BLIP, GPT-2, VisionEncoderDecoder, ...).

The attention itself is read at the op (:mod:`._mode`): transformers' ``sdpa`` implementation
calls ``F.scaled_dot_product_attention``, ``eager`` a softmax multiplied with the values. No
config is switched. What this adapter adds is the role of each attention module.

Which modules produce attention is data that every transformers model declares: its
``_can_record_outputs`` maps output names (``"attentions"``, ``"cross_attentions"``, ...) to
module classes, class-name suffixes or ``OutputRecorder`` specs. transformers itself reads
it in ``utils/output_capturing.py`` (``install_all_output_capturing_hooks`` /
``recursively_install_hooks``) to serve ``output_attentions=True``; this adapter walks the
module tree the same way -- each ``PreTrainedModel`` (sub-)model dispatches its own specs
to its descendants that are not themselves ``PreTrainedModel`` s -- and gives every module
it names the role CROSS (a cross-attention key), IMAGE (in an image encoder) or TEXT.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._adapter import AUTO, CROSS, IMAGE, TEXT, Adapter, Site, Windows, register_adapter

# attributes that only the config of an image (or patch) encoder has
_VISION_CONFIG_ATTRS = ("patch_size", "image_size", "num_channels")


@dataclass
class HFSite(Site):
    """A transformers attention module.

    Attributes:
        index: position of the attention probabilities in the module's output tuple.
        key: the ``_can_record_outputs`` key that named the module (e.g. ``"cross_attentions"``).
    """

    index: int = 1
    key: str = "attentions"


@dataclass(frozen=True)
class _Task:
    """One normalised ``_can_record_outputs`` entry (cf. transformers' ``OutputRecorder``)."""

    key: str
    target_class: type | None
    class_name: str | None
    layer_name: str | None
    index: int

    def matches(self, module: nn.Module, dotted: str) -> bool:
        """Whether ``module``, at transformers-style name ``dotted`` (``".a.b"``), is recorded.

        The same test as transformers' ``recursively_install_hooks``.
        """
        hit = (isinstance(self.target_class, type) and isinstance(module, self.target_class)) or (
            self.class_name is not None and dotted.endswith(self.class_name))
        if not hit:
            return False
        if self.layer_name is not None:
            return "." + self.layer_name.strip(".") + "." in dotted + "."
        return True


def _transformers():
    """``(PreTrainedModel, PreTrainedConfig, OutputRecorder, registry)``, or None.

    A model built by transformers implies ``transformers.modeling_utils`` is imported; when it
    is not, there is nothing to find, and importing transformers (slow) is avoided.
    """
    if "transformers.modeling_utils" not in sys.modules:
        return None
    from transformers.configuration_utils import PreTrainedConfig
    from transformers.modeling_utils import PreTrainedModel

    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY as registry
        from transformers.utils.output_capturing import OutputRecorder as recorder
    except ImportError:  # other layouts: read the class attribute instead of the registry
        registry = None
        try:
            from transformers.utils.generic import OutputRecorder as recorder  # type: ignore
        except ImportError:
            recorder = ()  # isinstance(x, ()) is always False
    return PreTrainedModel, PreTrainedConfig, recorder, registry


def _attention_tasks(model: nn.Module, recorder_cls: type, registry: Any) -> list[_Task]:
    """The attention entries of ``model``'s ``_can_record_outputs``, normalised.

    As in transformers' ``install_all_output_capturing_hooks``: an entry is a class, a
    class-name string, an ``OutputRecorder`` or a list of those; a bare class or string
    records ``output[1]`` for every key that is not a hidden-states key.
    """
    flags = registry.get(model) if registry is not None else None
    if not flags:
        flags = getattr(model, "_can_record_outputs", None) or {}
    tasks: list[_Task] = []
    for key, specs in flags.items():
        if "attentions" not in key:
            continue
        for spec in specs if isinstance(specs, (list, tuple)) else [specs]:
            if isinstance(spec, recorder_cls):
                tasks.append(_Task(key, spec.target_class, spec.class_name, spec.layer_name,
                                   int(spec.index)))
            elif isinstance(spec, str):
                tasks.append(_Task(key, None, spec, None, 1))
            else:
                tasks.append(_Task(key, spec, None, None, 1))
    return tasks


def _nearest_config(module: nn.Module, ancestors: list[nn.Module], config_cls: type):
    """The transformers config of ``module`` or of its nearest ancestor holding one."""
    for m in [module] + ancestors[::-1]:
        cfg = getattr(m, "config", None)
        if isinstance(cfg, config_cls):
            return cfg
    return None


def _is_vision_config(cfg) -> bool:
    return cfg is not None and any(getattr(cfg, a, None) is not None for a in _VISION_CONFIG_ATTRS)


def _role(key: str, cfg) -> str:
    """CROSS for a cross-attention key; else IMAGE in an image encoder, TEXT elsewhere."""
    if "cross" in key:
        return CROSS
    return IMAGE if _is_vision_config(cfg) else TEXT


@register_adapter
class TransformersAdapter(Adapter):
    """Attention of any transformers model, read from its real (eager) forward pass."""

    name = "transformers"
    priority = 20
    scoped = True

    def find(self, root: nn.Module, is_free: Callable[[str], bool]) -> list[Site]:
        """The modules named by the attention keys of each (sub-)model's ``_can_record_outputs``.

        Args:
            root: any module; the transformers models may be nested anywhere in it.
            is_free: ``is_free(name)`` is False for modules another adapter claimed.

        Returns:
            :class:`HFSite` s in module order: role CROSS for a key containing ``"cross"``,
            else IMAGE when the nearest config (of the module or its nearest ancestor holding
            one) describes an image encoder (``patch_size`` / ``image_size`` / ``num_channels``),
            TEXT otherwise.
        """
        lib = _transformers()
        if lib is None:
            return []
        pretrained_cls, config_cls, recorder_cls, registry = lib
        found: dict[int, HFSite] = {}

        def walk(module: nn.Module, dotted: str, rel: str, tasks: list[_Task],
                 ancestors: list[nn.Module]) -> None:
            # children first, as transformers does; a PreTrainedModel child brings its own tasks
            for child_name, child in module.named_children():
                child_dotted = f"{dotted}.{child_name}"
                child_rel = f"{rel}.{child_name}" if rel else child_name
                if isinstance(child, pretrained_cls):
                    walk(child, child_dotted, child_rel, _attention_tasks(child, recorder_cls, registry),
                         ancestors + [module])
                else:
                    walk(child, child_dotted, child_rel, tasks, ancestors + [module])
            for task in tasks:
                if not task.matches(module, dotted) or not is_free(rel):
                    continue
                role = _role(task.key, _nearest_config(module, ancestors, config_cls))
                prev = found.get(id(module))
                if prev is None:
                    found[id(module)] = HFSite(rel, module, role, self, index=task.index,
                                               key=task.key)
                elif prev.role != role:  # named by a self- and a cross-attention key alike
                    prev.role = AUTO

        if isinstance(root, pretrained_cls):
            walk(root, "", "", _attention_tasks(root, recorder_cls, registry), [])
        else:
            walk(root, "", "", [], [])
        if not found and isinstance(root, pretrained_cls) and _is_vision_config(getattr(root, "config", None)):
            found = self._by_class_name(root, is_free)
        # module order (transformers' walk visits children before their parents)
        order = {id(m): i for i, m in enumerate(root.modules())}
        sites = sorted(found.values(), key=lambda s: order.get(id(s.module), len(order)))
        # one site per module tree branch: drop a site nested in another one
        kept: list[Site] = []
        for s in sites:
            if not any(s.name.startswith(k.name + ".") for k in kept):
                kept.append(s)
        return kept


    def _by_class_name(self, root: nn.Module, is_free: Callable[[str], bool]) -> dict[int, HFSite]:
        """Image models that declare no attention outputs at all (LeViT): their innermost modules
        whose class name ends with ``Attention`` are image self-attention, and those ending with
        ``AttentionSubsample`` pool their queries onto a coarser grid than their keys."""
        named = [(n, m) for n, m in root.named_modules() if type(m).__module__.startswith("transformers.")
                 and type(m).__name__.endswith(_ATTENTION_SUFFIXES) and is_free(n)]
        names = [n for n, _ in named]
        return {id(m): HFSite(n, m, IMAGE, self, coarse_queries=type(m).__name__.endswith("AttentionSubsample"))
                for n, m in named if not any(o.startswith(n + ".") for o in names)}


_ATTENTION_SUFFIXES = ("Attention", "AttentionSubsample")


def masking_embeddings(root: nn.Module) -> list[nn.Module]:
    """The embeddings of masked-image-modelling encoders (ViT-MAE) that return
    ``(embeddings, mask, ids_restore)``: which patches the encoder sees."""
    if _transformers() is None:
        return []
    return [m for m in root.modules() if type(m).__module__.startswith("transformers.")
            and type(m).__name__.endswith("MAEEmbeddings") and hasattr(m, "random_masking")]


def visible_patches(output: Any) -> Any:
    """``[B, V]`` grid indices of the patches kept by ViT-MAE's random masking, in sequence order
    (``ids_keep = argsort(ids_restore)[:, :V]``, V the unmasked count), from the embeddings'
    ``(embeddings, mask, ids_restore)`` output."""
    _, mask, ids_restore = output[:3]
    kept = int((mask[0] == 0).sum())
    return ids_restore.argsort(dim=1)[:, :kept]


def window_blocks(root: nn.Module) -> dict[int, Windows]:
    """``id(module) -> Windows`` for every module inside a transformers Swin-style layer (the
    innermost one), e.g. SwinLayer, Swinv2Layer, DonutSwinLayer."""
    if _transformers() is None:
        return {}
    found: dict[int, Windows] = {}
    for _, block in root.named_modules():  # outer blocks first: inner ones override
        if type(block).__module__.startswith("transformers."):
            windows = _windows(block)
            if windows is not None:
                for m in block.modules():
                    found[id(m)] = windows
    return found


def _windows(block: nn.Module) -> Windows | None:
    """The window scheme of a Swin-style layer (``window_size``, ``shift_size`` and a forward
    taking ``input_dimensions``; it pads its grid, then shifts it), or None."""
    if not (hasattr(block, "window_size") and hasattr(block, "shift_size")):
        return None
    try:
        params = list(inspect.signature(block.forward).parameters)
    except (TypeError, ValueError):
        return None
    if "input_dimensions" not in params:
        return None
    at = params.index("input_dimensions")

    def read_grid(args: tuple, kwargs: dict) -> tuple[int, int]:
        dims = kwargs["input_dimensions"] if "input_dimensions" in kwargs else args[at]
        return int(dims[0]), int(dims[1])

    return Windows(block, read_grid, pad_first=True)


def divided_blocks(root: nn.Module) -> dict[int, str]:
    """``id(module) -> "time" | "space"`` for every module inside the two attentions of a
    transformers divided space-time block (``TimesformerLayer`` with ``attention_type
    "divided_space_time"``: ``temporal_attention`` over the frames of each patch, ``attention``
    over each frame's patches), placed on the clip by :mod:`._divided`."""
    if _transformers() is None:
        return {}
    found: dict[int, str] = {}
    for block in root.modules():
        if (type(block).__module__.startswith("transformers.")
                and getattr(block, "attention_type", None) == "divided_space_time"
                and isinstance(getattr(block, "temporal_attention", None), nn.Module)
                and isinstance(getattr(block, "attention", None), nn.Module)):
            for kind, part in (("time", block.temporal_attention), ("space", block.attention)):
                for m in part.modules():
                    found[id(m)] = kind
    return found


def tube_masking(root: nn.Module) -> tuple[list[nn.Module], set[int]]:
    """VideoMAE's masked pre-training: ``(embeddings, decoder modules)``. The embeddings
    (``VideoMAEEmbeddings``) keep only the tubes that ``bool_masked_pos`` does not mask, in
    sequence order, and ``VideoMAEForPreTraining``'s decoder runs over the visible tubes followed
    by the masked ones (``x_full = cat([visible, mask tokens])``, not put back in order): the ids
    of every module inside a ``VideoMAEDecoder``."""
    if _transformers() is None:
        return [], set()
    embeddings = [m for m in root.modules() if type(m).__module__.startswith("transformers.")
                  and type(m).__name__ == "VideoMAEEmbeddings"]
    decoders = {id(m) for d in root.modules() if type(d).__module__.startswith("transformers.")
                and type(d).__name__ == "VideoMAEDecoder" for m in d.modules()}
    return embeddings, decoders


def tube_order(args: tuple, kwargs: dict) -> tuple[Any, Any] | None:
    """``(visible, order)`` from a ``VideoMAEEmbeddings`` call's ``bool_masked_pos`` ``[B, N]``
    (True: masked): ``[B, V]`` sequence indices of the visible tubes in order, and ``[B, N]`` the
    decoder's token order (the visible tubes, then the masked ones); None without a mask."""
    mask = kwargs["bool_masked_pos"] if "bool_masked_pos" in kwargs else (args[1] if len(args) > 1 else None)
    if mask is None or getattr(mask, "dim", lambda: 0)() != 2:
        return None
    mask = mask.to(dtype=bool)
    b = mask.shape[0]
    shown = (~mask).sum(1)
    if bool((shown != shown[0]).any()):
        return None  # VideoMAE itself refuses clips with different counts of masked tubes
    v = int(shown[0]) if b else 0
    visible = (~mask).nonzero()[:, 1].view(b, v)  # row-major: each clip's visible tubes in order
    masked = mask.nonzero()[:, 1].view(b, mask.shape[1] - v)
    return visible, torch.cat([visible, masked], dim=1)
