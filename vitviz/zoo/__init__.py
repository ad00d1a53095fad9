"""Ground-truth scenes, the scores of maps against them, and the offline demo.

* :mod:`vitviz.zoo.scenes`: procedurally generated scenes with known object masks;
* :mod:`vitviz.zoo.benchmark`: map quality of the bundled models on held-out scenes
  (``vitviz benchmark-maps``); :mod:`vitviz.zoo.benchmark_clip`: the same for text maps;
* :mod:`vitviz.zoo.demo`: the offline demo (``vitviz demo``), which also runs on the sample
  images in ``vitviz/assets``.

The bundled models themselves (``shapes-vit``, ``shapes-captioner``, ``shapes-clip``) are built
and loaded by :mod:`vitviz.models.bundled`; ``ZOO`` is re-exported here.
"""

from __future__ import annotations

from pathlib import Path

from ..models.bundled import WEIGHTS, ZOO, ZooEntry, register

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def sample_images() -> list[Path]:
    """The sample images shipped with vitviz."""
    return sorted(p for p in ASSETS.glob("*.png"))


def demo_scenes(n: int = 4, kind: str = "classification", start: int = 3_000_000):
    """A few scenes for demos and docs (seeds ``start .. start + n - 1``, outside the training range)."""
    from .scenes import make_dataset

    return make_dataset(kind, range(start, start + n))

__all__ = ["ZOO", "ZooEntry", "register", "WEIGHTS", "ASSETS", "sample_images", "demo_scenes"]
