"""Similarity of position embeddings: the ViT paper's figure of one small grid per patch.

Pure tensor functions. Finding the embeddings of a model is :mod:`vitviz.models._pos_params`
(``vitviz.pos_similarity(m)``), which calls these.
"""

from __future__ import annotations

import torch

from ..errors import LayoutError


def pos_similarity_matrix(embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Cosine similarity of every patch position embedding with all others.

    Args:
        embed: ``[gh*gw, D]`` (or ``[1, gh*gw, D]``) patch position embeddings in row-major
            patch order, prefix positions already removed.
        grid: ``(gh, gw)`` of the patch grid.

    Returns:
        ``[gh*gw, gh, gw]`` float32: ``out[i]`` is the similarity of patch ``i``'s embedding
        with every patch, laid out on the grid (the ViT paper, Fig. 7 centre).

    Raises:
        LayoutError: the embeddings do not hold the grid's positions.

    Shape:
        embed ``[P, D]`` -> ``[P, gh, gw]``

    Example:
        >>> pe = torch.randn(196, 768)
        >>> pos_similarity_matrix(pe, (14, 14)).shape
        torch.Size([196, 14, 14])
    """
    gh, gw = int(grid[0]), int(grid[1])
    e = embed.detach()
    if e.dim() == 3 and e.shape[0] == 1:
        e = e[0]
    if e.dim() != 2 or e.shape[0] != gh * gw:
        raise LayoutError(f"position embeddings of shape {tuple(embed.shape)} do not hold the "
                          f"{gh}x{gw} = {gh * gw} patch positions; expected [{gh * gw}, D]")
    e = e.float()  # [P, D]
    e = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # [P, D]
    sim: torch.Tensor = e @ e.T  # [P, P]
    return sim.reshape(gh * gw, gh, gw)


def resample_grid(embed: torch.Tensor, grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Interpolate patch position embeddings to another patch grid (another image size).

    Bicubic interpolation with antialiasing, as timm's ``resample_abs_pos_embed`` does when a
    model runs at a size it was not trained at.

    Args:
        embed: ``[gh*gw, D]`` patch position embeddings (row-major).
        grid: ``(gh, gw)`` of ``embed``.
        new_grid: ``(gh', gw')`` wanted.

    Returns:
        ``[gh'*gw', D]`` in the dtype of ``embed``.
    """
    gh, gw = int(grid[0]), int(grid[1])
    nh, nw = int(new_grid[0]), int(new_grid[1])
    if embed.dim() != 2 or embed.shape[0] != gh * gw:
        raise LayoutError(f"expected [{gh * gw}, D] patch position embeddings, got {tuple(embed.shape)}")
    if (nh, nw) == (gh, gw):
        return embed
    d = embed.shape[-1]
    x = embed.detach().float().reshape(1, gh, gw, d).permute(0, 3, 1, 2)  # [1, D, gh, gw]
    x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True)  # [1, D, nh, nw]
    return x.permute(0, 2, 3, 1).reshape(nh * nw, d).to(embed.dtype)  # [nh*nw, D]
