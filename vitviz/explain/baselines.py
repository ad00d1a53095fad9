"""Baseline maps that ignore the model: the chance level (random) and the centre bias (centre prior).

A map method that scores no better than these on a metric, or that moves no more than they
do when the model is randomised, explains the image rather than the model. They are
registered as the map methods ``random`` and ``centre`` (:mod:`vitviz.explain`), and
re-exported by :mod:`vitviz.evaluate` with the metrics.

Example:
    >>> random_maps(2, (8, 8), generator=torch.Generator().manual_seed(0)).shape
    torch.Size([2, 8, 8])
    >>> centre_prior((8, 8)).shape
    torch.Size([8, 8])
"""

from __future__ import annotations

import torch


def random_maps(batch: int, grid: tuple[int, int], *, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Uniform random maps: the chance level of every metric.

    Args:
        batch: number of maps.
        grid: ``(gh, gw)``.
        generator: the random generator (seed it for reproducible maps).
        device: where the maps are made.

    Returns:
        ``[batch, gh, gw]`` float32 uniform in ``[0, 1)``.

    Shape:
        ``[batch, gh, gw]`` float32
    """
    return torch.rand(batch, int(grid[0]), int(grid[1]), generator=generator, device=device)


def centre_prior(grid: tuple[int, int], *, sigma: float = 0.25,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """A Gaussian bump at the image centre: the "objects are in the middle" baseline.

    ``exp(-d² / (2 sigma²))`` with ``d`` the distance of each patch centre from the image
    centre in units of the image size.

    Args:
        grid: ``(gh, gw)``.
        sigma: width of the bump, in units of the image size.
        device: where the map is made.

    Returns:
        ``[gh, gw]`` float32.

    Shape:
        ``[gh, gw]`` float32
    """
    gh, gw = int(grid[0]), int(grid[1])
    y = (torch.arange(gh, device=device, dtype=torch.float32) + 0.5) / gh - 0.5  # [gh]
    x = (torch.arange(gw, device=device, dtype=torch.float32) + 0.5) / gw - 0.5  # [gw]
    d2 = y[:, None] ** 2 + x[None, :] ** 2  # [gh, gw]
    return torch.exp(-d2 / (2 * sigma * sigma))


__all__ = ["random_maps", "centre_prior"]
