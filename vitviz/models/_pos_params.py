"""Finding a model's patch position embeddings, and ``vitviz.pos_similarity(m)``.

Where they live:

* timm ViTs: ``pos_embed`` ``[1, R, D]`` on the grid ``patch_embed.grid_size``; its last
  ``gh*gw`` rows are the patches, the first ``num_prefix_tokens`` rows the prefix tokens
  unless ``no_embed_class=True`` (DINOv2 register models), where there are none.
* transformers: ``...embeddings.position_embeddings`` ``[1, 1 + gh*gw (+1 for DeiT), D]``
  (ViT, DeiT, DINOv2, BEiT-style absolute ones) or ``...position_embedding.weight``
  ``[1 + gh*gw, D]`` (CLIP, SigLIP); prefix positions first.
* pytorch_pretrained_vit: ``positional_embedding.pos_embedding`` ``[1, 1 + gh*gw, D]``.
* hand-written models: a parameter or buffer whose name contains ``pos`` and whose shape fits
  the layout: ``[1, N, D]`` / ``[N, D]`` with the prefix positions first, ``[1, gh*gw, D]`` /
  ``[gh*gw, D]``, or ``[1, gh, gw, D]``.

Models with relative or rotary position encodings have no such table: a
:class:`~vitviz.errors.LayoutError` says so.
"""

from __future__ import annotations

import torch
from torch import nn

from ..analyze.posembed import pos_similarity_matrix, resample_grid
from ..errors import LayoutError
from ._vision_model import VisionModel, _pair, wrap

_MAX_UNKNOWN_PREFIX = 16  # prefix rows accepted when the model does not say how many it has


def _timm_table(module: nn.Module) -> tuple[str, torch.Tensor, tuple[int, int], int] | None:
    """timm's ``pos_embed``: (name, [R, D] table, native grid, prefix rows), or None."""
    pe = getattr(module, "pos_embed", None)
    patch_embed = getattr(module, "patch_embed", None)
    if not isinstance(pe, torch.Tensor) or patch_embed is None or not hasattr(module, "num_prefix_tokens"):
        return None
    grid = _pair(getattr(patch_embed, "grid_size", None) or (0, 0))
    table = pe.detach()
    if table.dim() == 3 and table.shape[0] == 1:
        table = table[0]  # [R, D]
    if table.dim() != 2:
        return None
    p = grid[0] * grid[1]
    prefix = 0 if getattr(module, "no_embed_class", False) else int(module.num_prefix_tokens)
    if table.shape[0] != p + prefix:
        raise LayoutError(
            f"timm pos_embed has {table.shape[0]} rows but the {grid[0]}x{grid[1]} grid with "
            f"{prefix} prefix positions needs {p + prefix}")
    return "pos_embed", table, grid, prefix


def _fits(shape: torch.Size, grid: tuple[int, int], num_prefix: int | None) -> int | None:
    """How many prefix rows a table of ``shape`` has on ``grid``, or None when it does not fit."""
    gh, gw = grid
    p = gh * gw
    dims = tuple(shape)
    if len(dims) == 4 and dims[0] == 1 and dims[1:3] == (gh, gw):
        return 0  # [1, gh, gw, D]
    if len(dims) == 3 and dims[0] == 1:
        rows = dims[1]
    elif len(dims) == 2:
        rows = dims[0]
    else:
        return None
    if rows == p:
        return 0
    if num_prefix is not None:
        return num_prefix if rows == p + num_prefix else None
    return rows - p if 0 < rows - p <= _MAX_UNKNOWN_PREFIX else None


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """``[1, R, D]``, ``[R, D]`` or ``[1, gh, gw, D]`` -> ``[R, D]``."""
    t = t.detach()
    if t.dim() == 4:
        return t[0].reshape(-1, t.shape[-1])
    return t[0] if t.dim() == 3 else t


def _grid_of(vm: VisionModel) -> tuple[int, int]:
    """The model's patch grid at its default input size (the prefix count may be unknown)."""
    if vm._grid is not None:
        return vm._grid
    size = vm.input_size
    if size is None or vm.patch_size is None:
        raise LayoutError(f"{vm.name}: the patch grid is unknown; pass grid=(rows, cols) to vitviz.wrap")
    return vm._grid_from_hw(size)


def find_position_table(m) -> tuple[str, torch.Tensor, tuple[int, int], int]:
    """The position-embedding table of a model.

    Args:
        m: a :class:`VisionModel` or a ``torch.nn.Module`` (wrapped with :func:`vitviz.wrap`).

    Returns:
        ``(name, table [R, D], grid (gh, gw), prefix rows)``; the patch rows are the last
        ``gh*gw`` rows of ``table`` in row-major order.

    Raises:
        LayoutError: no table fits the model's layout, or several do and they differ.
    """
    vm = m if isinstance(m, VisionModel) else wrap(m)
    module = vm.module
    timm_found = _timm_table(module)
    if timm_found is not None:
        return timm_found
    grid = _grid_of(vm)
    num_prefix = vm.num_prefix
    candidates = []
    named = list(module.named_parameters()) + list(module.named_buffers())
    for name, t in named:
        if "pos" not in name.lower() or not t.is_floating_point():
            continue
        prefix = _fits(t.shape, grid, num_prefix)
        if prefix is not None:
            # the usual names first, then the shallowest
            usual = any(k in name for k in ("position_embedding", "pos_embed", "pos_embedding"))
            candidates.append((0 if usual else 1, name.count("."), name, t, prefix))
    if not candidates:
        gh, gw = grid
        raise LayoutError(
            f"found no patch position embeddings in {vm.name}: looked for timm's pos_embed, transformers' "
            "embeddings.position_embeddings / position_embedding.weight, pytorch_pretrained_vit's "
            f"positional_embedding.pos_embedding and any parameter or buffer whose name contains 'pos' with "
            f"shape [1, N, D], [1, {gh * gw}, D] or [1, {gh}, {gw}, D] for the {gh}x{gw} patch grid; models "
            "with relative or rotary position encodings have none. Pass a table yourself to "
            "vitviz.analyze.posembed.pos_similarity_matrix")
    candidates.sort(key=lambda c: c[:3])
    best = candidates[0]
    rivals = [c for c in candidates[1:] if c[:2] == best[:2]
              and not torch.equal(_as_rows(c[3])[-grid[0] * grid[1]:], _as_rows(best[3])[-grid[0] * grid[1]:])]
    if rivals:
        names = ", ".join(c[2] for c in [best] + rivals)
        raise LayoutError(f"several position-embedding tables fit {vm.name} ({names}); pass the one you mean "
                          "to vitviz.analyze.posembed.pos_similarity_matrix")
    return best[2], _as_rows(best[3]), grid, best[4]


def patch_position_embeddings(m, *, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """The patch position embeddings of a model, prefix positions dropped.

    Args:
        m: a :class:`VisionModel` or ``torch.nn.Module``.
        grid: ``(gh, gw)`` to interpolate the embeddings to (bicubic, as timm does for another
            image size); default: the model's own grid.

    Returns:
        ``[gh*gw, D]`` (row-major patches).
    """
    _, table, native, _ = find_position_table(m)
    p = native[0] * native[1]
    patches = table[-p:]  # [P, D]
    if grid is not None:
        patches = resample_grid(patches, native, _pair(grid))
    return patches


def pos_similarity(m, *, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Cosine similarity of every patch's position embedding with all others.

    Works with timm ViTs (CLS position or ``no_embed_class``, e.g. DINOv2 with registers),
    transformers ViT/DeiT/DINOv2/CLIP, pytorch_pretrained_vit, and hand-written models with a
    ``pos``-named table (see the module docstring); for models built at another image size
    the table is the interpolated one the model holds, and ``grid=`` interpolates further.

    Args:
        m: a :class:`VisionModel` or ``torch.nn.Module``.
        grid: patch grid to interpolate the embeddings to (default: the model's).

    Returns:
        ``[gh*gw, gh, gw]`` float32 in ``[-1, 1]``; ``[i]`` is patch ``i`` against every patch.

    Raises:
        LayoutError: the model has no absolute position-embedding table, or is a video model
            (its table runs over frames and the grid).

    Example:
        >>> m = vitviz.load_model("b16", pretrained=False)
        >>> vitviz.pos_similarity(m).shape
        torch.Size([196, 14, 14])
    """
    vm = m if isinstance(m, VisionModel) else wrap(m)
    if vm.is_video:
        raise LayoutError(f"{vm.name} is a video model: its position embeddings run over the frames of a clip as "
                          "well as the patch grid, and pos_similarity draws one image grid; it is not supported "
                          "for video models")
    _, _, native, _ = find_position_table(m)
    target = _pair(grid) if grid is not None else native
    return pos_similarity_matrix(patch_position_embeddings(m, grid=target), target)
