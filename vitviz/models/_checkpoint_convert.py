"""Checkpoint conversion: pytorch_pretrained_vit keys to timm, timm arguments read from the
weights, and loading a state dict into a timm model with errors that say what does not fit.

Checkpoints saved from ``pytorch_pretrained_vit`` (https://github.com/lukemelas/PyTorch-Pretrained-ViT)
hold the same ViT as timm's ``VisionTransformer`` under other names, with the query, key
and value projections kept apart; :func:`convert_pytorch_pretrained_vit` renames them and
concatenates q, k, v into timm's fused ``qkv``.

Example:
    >>> sd = read_state_dict("B_16_imagenet1k_finetuned.pth")
    >>> if is_pytorch_pretrained_vit(sd):
    ...     sd = convert_pytorch_pretrained_vit(sd)
    >>> model = timm.create_model("vit_base_patch16_384", pretrained=False, num_classes=37)
    >>> load_into_timm(model, sd, source="B_16_imagenet1k_finetuned.pth")
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from torch import nn

from ..errors import CheckpointError

# pytorch_pretrained_vit -> timm
# --------------------------------------------------------------------------------------------

_PPVIT_BLOCK = re.compile(r"^transformer\.blocks\.(\d+)\.(.+)$")
# block-level renames (the q/k/v projections are fused separately)
_PPVIT_BLOCK_RENAMES = {
    "proj.weight": "attn.proj.weight", "proj.bias": "attn.proj.bias",
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "pwff.fc1.weight": "mlp.fc1.weight", "pwff.fc1.bias": "mlp.fc1.bias",
    "pwff.fc2.weight": "mlp.fc2.weight", "pwff.fc2.bias": "mlp.fc2.bias",
}
_PPVIT_TOP_RENAMES = {
    "class_token": "cls_token",
    "patch_embedding.weight": "patch_embed.proj.weight",
    "patch_embedding.bias": "patch_embed.proj.bias",
    "positional_embedding.pos_embedding": "pos_embed",
    "norm.weight": "norm.weight", "norm.bias": "norm.bias",
    "fc.weight": "head.weight", "fc.bias": "head.bias",
}
_QKV = ("proj_q", "proj_k", "proj_v")


def is_pytorch_pretrained_vit(sd: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict was saved from ``pytorch_pretrained_vit.ViT``.

    Recognised by its patch embedding, position embedding and transformer-block key names.
    """
    return ("patch_embedding.weight" in sd and "positional_embedding.pos_embedding" in sd
            and any(k.startswith("transformer.blocks.") for k in sd))


def convert_pytorch_pretrained_vit(sd: Mapping[str, torch.Tensor], *,
                                   drop_pre_logits: bool = False) -> dict[str, torch.Tensor]:
    """Rename a ``pytorch_pretrained_vit.ViT`` state dict into timm ``VisionTransformer`` keys.

    ``class_token`` → ``cls_token``, ``patch_embedding`` → ``patch_embed.proj``,
    ``positional_embedding.pos_embedding`` → ``pos_embed``,
    ``transformer.blocks.i.attn.proj_{q,k,v}`` → ``blocks.i.attn.qkv`` (q, k, v concatenated
    along dim 0, weights and biases: timm splits its ``qkv`` output as
    ``reshape(B, N, 3, H, D)``, so rows ``[0:C]`` are q, ``[C:2C]`` k and ``[2C:3C]`` v),
    ``transformer.blocks.i.proj`` → ``blocks.i.attn.proj``, ``norm1``/``norm2`` unchanged,
    ``pwff.fc1``/``fc2`` → ``mlp.fc1``/``fc2``, ``norm`` → ``norm``, ``fc`` → ``head``.
    Both libraries use LayerNorm eps 1e-6, exact GELU and the same head split, so the
    converted model computes the same function.

    ``pre_logits`` (the "representation layer" of the ImageNet-21k ``B_16``/``B_32``/``L_32``
    release files) has no counterpart in timm's ``VisionTransformer``: pytorch_pretrained_vit
    applies ``tanh(pre_logits(x))`` to every token *before* the final norm, and only when the
    model is built with ``load_repr_layer=True``; by default (``load_repr_layer=False``) its
    loader drops these weights. A file that holds them is refused unless
    ``drop_pre_logits=True``, which reproduces the library's default model.

    Args:
        sd: the state dict (keys as ``pytorch_pretrained_vit.ViT.state_dict()`` names them).
        drop_pre_logits: drop ``pre_logits.*`` as ``pytorch_pretrained_vit`` does by default.

    Returns:
        a new dict with timm keys; tensors are shared with ``sd`` except the fused ``qkv``.

    Raises:
        CheckpointError: keys the converter does not know, incomplete q/k/v projections,
            no class token, or ``pre_logits`` without ``drop_pre_logits=True``.

    Shape:
        ``blocks.i.attn.qkv.weight``: ``[3C, C]`` from three ``[C, C]``;
        ``blocks.i.attn.qkv.bias``: ``[3C]`` from three ``[C]``.
    """
    if not is_pytorch_pretrained_vit(sd):
        raise CheckpointError(
            "the state dict is not from pytorch_pretrained_vit (no 'patch_embedding.weight', "
            "'positional_embedding.pos_embedding' and 'transformer.blocks.*' keys); load it "
            "without conversion")
    if "class_token" not in sd:
        raise CheckpointError(
            "the pytorch_pretrained_vit checkpoint has no 'class_token' (a model built with "
            "classifier != 'token'); pytorch_pretrained_vit then still classifies from token 0, "
            "which timm's VisionTransformer cannot reproduce. Only classifier='token' models "
            "(all the library's released ones) can be converted")
    pre_logits = [k for k in sd if k.startswith("pre_logits.")]
    if pre_logits and not drop_pre_logits:
        raise CheckpointError(
            "the pytorch_pretrained_vit checkpoint has a representation layer "
            f"({', '.join(sorted(pre_logits))}); timm's VisionTransformer has no such layer "
            "(pytorch_pretrained_vit applies tanh(pre_logits(x)) before the final norm, only when "
            "built with load_repr_layer=True). Its default model (load_repr_layer=False) drops "
            "these weights: pass drop_pre_logits=True to do the same, or use an *_imagenet1k "
            "checkpoint, which has none")

    out: dict[str, torch.Tensor] = {}
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        if key in _PPVIT_TOP_RENAMES:
            out[_PPVIT_TOP_RENAMES[key]] = value
            continue
        if key.startswith("pre_logits."):
            continue  # dropped on request, checked above
        m = _PPVIT_BLOCK.match(key)
        if m is None:
            unknown.append(key)
            continue
        i, rest = int(m.group(1)), m.group(2)
        if rest in _PPVIT_BLOCK_RENAMES:
            out[f"blocks.{i}.{_PPVIT_BLOCK_RENAMES[rest]}"] = value
        elif rest.startswith("attn.") and rest[5:].split(".")[0] in _QKV and \
                rest.rsplit(".", 1)[-1] in ("weight", "bias"):
            qkv.setdefault(i, {})[rest[5:]] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"the pytorch_pretrained_vit checkpoint has {len(unknown)} keys the converter does not "
            f"know, e.g. {unknown[:5]}; it was not saved from pytorch_pretrained_vit.ViT — load it "
            "with the model class that wrote it")

    for i in sorted(qkv):
        parts = qkv[i]
        for kind in ("weight", "bias"):
            names = [f"{p}.{kind}" for p in _QKV]
            missing = [n for n in names if n not in parts]
            if missing:
                raise CheckpointError(
                    f"block {i} of the pytorch_pretrained_vit checkpoint lacks "
                    f"{[f'transformer.blocks.{i}.attn.{n}' for n in missing]}; the file is "
                    "incomplete: re-save the model's full state_dict()")
            shapes = {tuple(parts[n].shape) for n in names}
            if len(shapes) != 1:
                raise CheckpointError(
                    f"block {i}: proj_q/proj_k/proj_v {kind}s have different shapes {sorted(shapes)}; "
                    "the file is not a consistent pytorch_pretrained_vit checkpoint")
            # [3C, C] (weight) or [3C] (bias): q rows, then k rows, then v rows
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts[n] for n in names], dim=0)
    return out


def infer_timm_args(sd: Mapping[str, torch.Tensor]) -> dict:
    """Read ``timm.create_model`` keyword arguments of a ViT off its weights.

    Works on timm-keyed state dicts and on ``pytorch_pretrained_vit`` ones (converted
    first). Returns ``embed_dim``, ``depth``, ``num_classes`` (rows of ``head.weight``; 0
    without a head), ``mlp_ratio``, ``patch_size``, ``in_chans``, ``qkv_bias``,
    ``class_token`` and, when it can be told, ``img_size``.

    **num_heads is not in the weights**: the q, k and v projections are ``[C, C]`` whatever
    the number of heads, so the caller must supply it (ViT-B: 12, ViT-L: 16, ViT-S: 6,
    ViT-Ti: 3 — all with 64-dimensional heads).

    ``img_size`` assumes a **square patch grid**: ``pos_embed`` holds ``N = P + gh*gw``
    rows (``P`` = CLS and register tokens found in the weights), and when ``N - P`` is a
    perfect square ``s*s`` the grid is taken as ``s x s`` and ``img_size = s * patch``. A
    checkpoint trained on non-square inputs whose patch count happens to be square (4x16 =
    8x8) would be misread; when ``N - P`` is not a perfect square ``img_size`` is left out.

    Args:
        sd: the state dict.

    Returns:
        dict of ``timm.create_model`` keyword arguments (without ``num_heads``).

    Raises:
        CheckpointError: the weights are not a ViT (no ``patch_embed.proj.weight`` or no blocks).

    Example:
        >>> args = infer_timm_args(sd)
        >>> model = timm.create_model("vit_base_patch16_224", pretrained=False, num_heads=12, **args)
    """
    if is_pytorch_pretrained_vit(sd):
        sd = convert_pytorch_pretrained_vit(sd, drop_pre_logits=True)
    w = sd.get("patch_embed.proj.weight")
    depth = len({int(m.group(1)) for k in sd for m in [re.match(r"^blocks\.(\d+)\.", k)] if m})
    if w is None or w.dim() != 4 or depth == 0:
        raise CheckpointError(
            "cannot read ViT arguments off these weights: no 4-d 'patch_embed.proj.weight' or no "
            "'blocks.N.*' keys; they are not a timm VisionTransformer (or pytorch_pretrained_vit) "
            "checkpoint")
    embed_dim, in_chans, ph, pw = (int(s) for s in w.shape)  # [C, in_chans, ph, pw]
    args: dict = dict(embed_dim=embed_dim, depth=depth, in_chans=in_chans,
                      patch_size=ph if ph == pw else (ph, pw))
    fc1 = sd.get("blocks.0.mlp.fc1.weight")  # [hidden, C]
    if fc1 is not None:
        args["mlp_ratio"] = fc1.shape[0] / embed_dim
    head = sd.get("head.weight")  # [num_classes, C]
    args["num_classes"] = int(head.shape[0]) if head is not None else 0
    args["qkv_bias"] = "blocks.0.attn.qkv.bias" in sd
    args["class_token"] = "cls_token" in sd
    pos = sd.get("pos_embed")  # [1, N, C]
    if pos is not None and pos.dim() == 3:
        num_prefix = int(args["class_token"]) + (int(sd["reg_token"].shape[1]) if "reg_token" in sd else 0)
        side = _square_side(int(pos.shape[1]) - num_prefix)
        if side is not None:
            args["img_size"] = side * ph if ph == pw else (side * ph, side * pw)
    return args


def _square_side(n: int) -> int | None:
    side = math.isqrt(n) if n > 0 else 0
    return side if side > 0 and side * side == n else None


# --------------------------------------------------------------------------------------------
# loading into timm
# --------------------------------------------------------------------------------------------

def _list(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys) - limit} more)" if len(keys) > limit else shown


def _arch_hint(sd: Mapping[str, torch.Tensor]) -> str:
    try:
        args = infer_timm_args(sd)
    except CheckpointError:
        return ""
    shown = ", ".join(f"{k}={v}" for k, v in args.items())
    return f" The checkpoint looks like a ViT with {shown} (num_heads is not stored in weights)."


def load_into_timm(model: nn.Module, sd: Mapping[str, torch.Tensor], *, source: str,
                   checkpoint_grid: tuple[int, int] | None = None,
                   drop_pre_logits: bool = False) -> list[str]:
    """Load a state dict into a timm ``VisionTransformer``, checking every key and shape.

    A ``pytorch_pretrained_vit`` state dict is converted first
    (:func:`convert_pytorch_pretrained_vit`). When the checkpoint's position embedding was
    trained for another patch grid than the model's (a model built with another
    ``img_size`` / ``--image-size``), it is resampled with timm's own
    ``timm.layers.resample_abs_pos_embed`` (bicubic, prefix-token rows kept as they are).
    The checkpoint's grid is ``checkpoint_grid`` when given, else assumed square (see
    :func:`infer_timm_args`).

    Args:
        model: a timm ``VisionTransformer`` (or any module; pos-embed resampling needs
            ``pos_embed`` and ``patch_embed.grid_size``).
        sd: the state dict (timm or pytorch_pretrained_vit keys); not modified.
        source: where the weights come from (a file name), for messages.
        checkpoint_grid: ``(gh, gw)`` the checkpoint was trained at, when not square.
        drop_pre_logits: see :func:`convert_pytorch_pretrained_vit`.

    Returns:
        notes on what was adapted (conversion, resampling), for the user; empty when the
        weights loaded as they were.

    Raises:
        CheckpointError: a classifier with another number of classes than the model (the
            message says which ``--num-classes`` to pass), missing or unexpected keys (up to
            5 of each listed, with counts), shapes that do not fit, or a position embedding
            whose grid cannot be told.
    """
    notes: list[str] = []
    if is_pytorch_pretrained_vit(sd):
        sd = convert_pytorch_pretrained_vit(sd, drop_pre_logits=drop_pre_logits)
        notes.append(f"{source}: converted pytorch_pretrained_vit keys to timm")
    else:
        sd = dict(sd)
    own = model.state_dict()

    # 1. the classifier: the most common mismatch, with the most useful fix
    head_w = sd.get("head.weight")  # [K, C]
    model_head = own.get("head.weight")  # [M, C]
    if head_w is not None and (model_head is None or model_head.shape[0] != head_w.shape[0]):
        have = 0 if model_head is None else int(model_head.shape[0])
        raise CheckpointError(
            f"{source}: the checkpoint's classifier has {int(head_w.shape[0])} classes but the model "
            f"was built with {have}; pass --num-classes {int(head_w.shape[0])} "
            f"(num_classes={int(head_w.shape[0])} in Python)")

    # 2. the position embedding: resample to the model's grid with timm's own function
    if "pos_embed" in sd and own.get("pos_embed") is not None and hasattr(model, "patch_embed"):
        note = _fit_pos_embed(model, sd, own["pos_embed"], source, checkpoint_grid)
        if note:
            notes.append(note)

    # 3. strict key and shape checks, with messages a user can act on
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_list(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_list(unexpected)})")
        raise CheckpointError(
            f"{source}: the weights do not fit the model {type(model).__name__}: "
            f"{' and '.join(parts)}. Build the model with the checkpoint's architecture, or pass "
            f"the weights of this architecture.{_arch_hint(sd)}")
    bad = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
           for k in own if tuple(sd[k].shape) != tuple(own[k].shape)]
    if bad:
        raise CheckpointError(
            f"{source}: {len(bad)} weights have other shapes than the model's: {_list(bad)}. Build "
            f"the model with the checkpoint's architecture.{_arch_hint(sd)}")

    model.load_state_dict(sd, strict=True)
    return notes


def _fit_pos_embed(model: nn.Module, sd: dict, own_pos: torch.Tensor, source: str,
                   checkpoint_grid: tuple[int, int] | None) -> str | None:
    """Resample ``sd["pos_embed"]`` in place to the model's grid; return a note, or None."""
    from timm.layers import resample_abs_pos_embed

    pos = sd["pos_embed"]  # [1, N_ckpt, C]
    if pos.dim() != 3 or pos.shape[-1] != own_pos.shape[-1]:
        return None  # another embed_dim: reported by the shape check
    # rows of pos_embed before the patch positions (none when timm's no_embed_class is set)
    num_prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    new_grid = tuple(int(g) for g in model.patch_embed.grid_size)
    n_patches = int(pos.shape[1]) - num_prefix
    if checkpoint_grid is not None:
        old_grid = (int(checkpoint_grid[0]), int(checkpoint_grid[1]))
        if old_grid[0] * old_grid[1] != n_patches:
            raise CheckpointError(
                f"{source}: checkpoint_grid={old_grid} holds {old_grid[0] * old_grid[1]} patches but "
                f"the checkpoint's pos_embed has {n_patches} patch rows (after {num_prefix} prefix "
                "rows); give the grid the checkpoint was trained at")
    elif n_patches == new_grid[0] * new_grid[1] and tuple(pos.shape) == tuple(own_pos.shape):
        return None  # same number of positions: the same grid
    else:
        side = _square_side(n_patches)
        if side is None:
            raise CheckpointError(
                f"{source}: cannot tell the patch grid of the checkpoint's position embedding: "
                f"{n_patches} patch rows (after {num_prefix} prefix rows) is not a square grid; "
                "pass checkpoint_grid=(rows, cols), or build the model at the checkpoint's image size")
        old_grid = (side, side)
    if old_grid == new_grid:
        return None
    # timm's resampling (bicubic, antialiased), prefix rows copied unchanged
    sd["pos_embed"] = resample_abs_pos_embed(pos, new_size=list(new_grid), old_size=list(old_grid),
                                             num_prefix_tokens=num_prefix)  # [1, P + gh*gw, C]
    return (f"{source}: resampled the position embedding from a {old_grid[0]}x{old_grid[1]} to a "
            f"{new_grid[0]}x{new_grid[1]} patch grid (timm resample_abs_pos_embed, bicubic)")
