"""Pointing game of ``shapes-clip``'s text maps on held-out caption scenes.

Every held-out caption scene holds two objects; the phrase of each (``"a red star"``) is
explained by every method of :func:`vitviz.explain_text`, and the map's maximum must fall on
the object the phrase names: the centre of the maximal patch within ``tolerance`` pixels
(default 4) of the object's mask. A random map and a centre prior are the baselines. Also
reported: phrase retrieval, the share of objects whose phrase outscores every phrase of an
object not in the image.

Used by ``vitviz benchmark-maps --model shapes-clip`` and by ``python -m tools.train.train_clip eval``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..evaluate import Table
from ..evaluate.metrics import centre_prior, random_maps
from ..explain.text import METHODS  # the text-map methods: the "method" option of the registered method "text"
from .scenes import COLOURS, HELDOUT_SEEDS, SHAPES, make_dataset

TOLERANCE_PX = 4.0


def pointing_within(maps: torch.Tensor, masks: torch.Tensor, *, tolerance: float = TOLERANCE_PX) -> torch.Tensor:
    """Pointing game with a pixel tolerance: is the maximal patch's centre within ``tolerance``
    pixels of the mask? Tied maxima score the share of them that hit.

    Args:
        maps: ``[B, gh, gw]`` patch maps, any scale.
        masks: ``[B, H, W]`` bool masks; ``H`` and ``W`` multiples of ``gh`` and ``gw``.
        tolerance: distance in pixels between the patch centre and the nearest mask pixel centre.

    Returns:
        ``[B]`` float32 in ``[0, 1]``.

    Example:
        >>> m = torch.zeros(1, 2, 2); m[0, 0, 1] = 1.0
        >>> mask = torch.zeros(1, 16, 16, dtype=torch.bool); mask[0, 0, 12] = True
        >>> pointing_within(m, mask, tolerance=4.0)  # centre (x 11.5, y 3.5) to (12, 0): 3.54 px
        tensor([1.])
    """
    b, gh, gw = maps.shape
    h, w = masks.shape[-2:]
    ph, pw = h / gh, w / gw
    cy = (torch.arange(gh, dtype=torch.float32) + 0.5) * ph - 0.5  # [gh] pixel-centre coordinates
    cx = (torch.arange(gw, dtype=torch.float32) + 0.5) * pw - 0.5  # [gw]
    ys, xs = torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32)
    dy = (cy[:, None] - ys[None, :]) ** 2  # [gh, H]
    dx = (cx[:, None] - xs[None, :]) ** 2  # [gw, W]
    d2 = dy[:, None, :, None] + dx[None, :, None, :]  # [gh, gw, H, W]
    near = d2 <= tolerance ** 2  # [gh, gw, H, W]
    m = masks.to(torch.bool).cpu()
    hit = torch.einsum("ijhw,bhw->bij", near.float(), m.float()) > 0  # [B, gh, gw]
    flat = maps.detach().float().cpu().flatten(1)  # [B, G]
    top = flat == flat.amax(dim=1, keepdim=True)
    return (top & hit.flatten(1)).sum(1).float() / top.sum(1).float()


def all_phrases() -> list[str]:
    return [f"a {c} {s}" for c in COLOURS for s in SHAPES]


def benchmark_clip(model=None, *, n: int = 200, seeds: Sequence[int] | None = None,
                   methods: Sequence[str] = METHODS, tolerance: float = TOLERANCE_PX,
                   progress: Callable[[int, int], None] | None = None) -> Table:
    """Pointing game of each text-map method of ``shapes-clip`` on held-out caption scenes.

    Returns:
        :class:`~vitviz.evaluate.Table` with a ``"pointing"`` column per method and
        baseline; ``extra["retrieval"]`` is the phrase-retrieval accuracy.
    """
    from ..explain.text import text_maps, towers
    from ..models.bundled.shapes import to_input

    if model is None:
        from ..models import load_model

        model = load_model("shapes-clip")
    seeds = list(seeds) if seeds is not None else list(HELDOUT_SEEDS)[:n]
    scenes = make_dataset("caption", seeds)
    tw = towers(model)
    phrases = all_phrases()
    ids, mask, _ = tw.tokenize(phrases)
    with torch.no_grad():
        bank = tw.encode_text(ids.to(model.device), mask.to(model.device) if mask is not None else None)  # [P, D]
    hits: dict[str, list[float]] = {}
    retrieved = 0
    g = torch.Generator(device="cpu").manual_seed(0)
    for i, s in enumerate(scenes):
        x = to_input(s.image, device=model.device, dtype=model.dtype)  # [1, 3, H, W]
        texts = [f"a {o.colour} {o.shape}" for o in s.objects]
        masks = torch.from_numpy(s.masks)  # [2, H, W]
        for method in methods:
            res = text_maps(model, x, texts, method=method)
            hits.setdefault(method, []).extend(pointing_within(res.maps, masks, tolerance=tolerance).tolist())
        grid = res.maps.shape[-2:]
        hits.setdefault("baseline: random", []).extend(
            pointing_within(random_maps(2, tuple(grid), generator=g), masks, tolerance=tolerance).tolist())
        hits.setdefault("baseline: centre prior", []).extend(
            pointing_within(centre_prior(tuple(grid)).expand(2, *grid), masks, tolerance=tolerance).tolist())
        with torch.no_grad():
            img = tw.encode_image(x)  # [1, D]
            scores = tw.logits(img.expand(len(phrases), -1), bank)  # [P]
        present = {phrases.index(t) for t in texts}
        absent = torch.tensor([j for j in range(len(phrases)) if j not in present])
        best_absent = scores[absent].max()
        retrieved += sum(int(scores[j] > best_absent) for j in present)
        if progress is not None:
            progress(i + 1, len(scenes))
    rows = {name: {"pointing": float(np.mean(v))} for name, v in hits.items()}
    table = Table(rows, {"pointing": (f"pointing game ({tolerance:g} px) ↑", True)}, len(scenes))
    table.extra["retrieval"] = retrieved / (2 * len(scenes))
    return table
