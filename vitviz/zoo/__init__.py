"""Bundled offline models (trained on procedurally generated scenes) and sample images.

``ZOO`` maps a model name to a :class:`ZooEntry`; ``vitviz.load_model(name)`` loads it with no
network. The sample images under ``vitviz/assets`` are what `vitviz demo` runs on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

ASSETS = Path(__file__).resolve().parent.parent / "assets"


@dataclass
class ZooEntry:
    """A bundled model: how to build it and where its weights live in the package."""

    name: str
    about: str
    build: Callable[[], object]  # -> VisionModel with untrained weights
    weights_file: Optional[str] = None

    def weights_path(self) -> Optional[str]:
        if self.weights_file is None:
            return None
        p = Path(__file__).resolve().parent / "weights" / self.weights_file
        return str(p) if p.is_file() else None

    def load(self, weights=None, pretrained: bool = True):
        vm = self.build()
        path = weights or (self.weights_path() if pretrained else None)
        if pretrained and path is None:
            from ..errors import WeightsNotFoundError

            raise WeightsNotFoundError(
                f"the bundled weights of {self.name} are missing from the installed package; "
                "reinstall vitviz, pass --weights FILE, or use --random")
        if path is not None:
            from ..models._checkpoint import read_state_dict

            vm.module.load_state_dict(read_state_dict(path))
        return vm


ZOO: dict[str, ZooEntry] = {}


def sample_images() -> list[Path]:
    """The sample images shipped with vitviz."""
    return sorted(p for p in ASSETS.glob("*.png"))
