"""The models vitviz bundles: small networks trained on procedurally generated scenes, with
their weights in the package, so that ``vitviz.load_model(name)`` works with no network.

``ZOO`` maps a model name to a :class:`ZooEntry`:

* ``shapes-vit``: a timm ``VisionTransformer`` (64 px, 8 px patches, 4 blocks, width 128)
  that names the shape in a :func:`vitviz.zoo.scenes.classification_scene`.
* ``shapes-captioner``: a transformers ``VisionEncoderDecoderModel`` (ViT encoder, GPT-2
  decoder with cross-attention, word-level tokenizer) that captions a
  :func:`vitviz.zoo.scenes.caption_scene` (``"a red star above a blue circle"``).
* ``shapes-clip``: a transformers ``CLIPModel`` (64 px, 8 px patches, 4 layers, width 96) that
  matches scenes with object phrases and captions, for text -> image maps (``vitviz text``).

The builders live in :mod:`vitviz.models.bundled.shapes` and
:mod:`vitviz.models.bundled.shapes_clip`; the weights (float16 safetensors) and tokenizers in
``vitviz/models/bundled/weights``. The scripts that trained them are in ``tools/train/`` of the
repository (not in the wheel): ``python -m tools.train.train`` and ``python -m tools.train.train_clip``.

Nothing here imports torch until a model is built, so ``vitviz models`` stays fast.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

WEIGHTS = Path(__file__).resolve().parent / "weights"


@dataclass
class ZooEntry:
    """A bundled model: how to build it and where its weights live in the package.

    Attributes:
        name: the name users pass to ``vitviz.load_model``.
        about: one line for ``vitviz models``.
        build: returns a :class:`~vitviz.models.VisionModel` with untrained weights.
        weights_file: file name under ``vitviz/models/bundled/weights``; the training script writes its
            settings and held-out numbers next to it (same name, ``.json``).
    """

    name: str
    about: str
    build: Callable[[], object]  # -> VisionModel with untrained weights
    weights_file: str | None = None

    def info(self) -> dict:
        """The training settings and held-out numbers of the shipped weights (``{}`` if absent)."""
        if self.weights_file is None:
            return {}
        p = WEIGHTS / (Path(self.weights_file).stem + ".json")
        return json.loads(p.read_text()) if p.is_file() else {}

    def weights_path(self) -> str | None:
        if self.weights_file is None:
            return None
        p = WEIGHTS / self.weights_file
        return str(p) if p.is_file() else None

    def load(self, weights=None, pretrained: bool = True):
        """Build the model and load the shipped weights (or ``weights``); float32 in eval mode.

        Raises:
            WeightsNotFoundError: the shipped weights are missing from the installation.
            CheckpointError: ``weights`` does not fit the architecture.
        """
        vm = self.build()
        path = weights or (self.weights_path() if pretrained else None)
        if pretrained and path is None:
            from ...errors import WeightsNotFoundError

            raise WeightsNotFoundError(
                f"the bundled weights of {self.name} ({WEIGHTS / str(self.weights_file)}) are missing "
                "from the installed package; reinstall vitviz, pass --weights FILE, or use --random")
        if path is not None:
            from ...errors import CheckpointError
            from .._checkpoint_read import read_state_dict

            sd = read_state_dict(path)  # float16 on disk: copied into the float32 parameters
            try:
                vm.module.load_state_dict(sd)
            except RuntimeError as e:
                first = str(e).strip().splitlines()
                raise CheckpointError(
                    f"{path} does not fit the {self.name} architecture ({first[0] if first else e}); "
                    f"pass weights saved from {self.name}, e.g. by `python -m tools.train.train`") from None
        return vm


def _build_shapes_vit():
    from .shapes import build_shapes_vit

    return build_shapes_vit()


def _build_shapes_captioner():
    from .shapes import build_shapes_captioner

    return build_shapes_captioner()


def _build_shapes_clip():
    from .shapes_clip import build_shapes_clip

    return build_shapes_clip()


ZOO: dict[str, ZooEntry] = {}


def register(entry: ZooEntry) -> ZooEntry:
    """Add a bundled model to :data:`ZOO`."""
    ZOO[entry.name] = entry
    return entry


# held-out numbers: seeds 1_000_000 .. 1_000_999 (`python -m tools.train.train eval`)
register(ZooEntry(
    "shapes-vit",
    "timm ViT, 64 px, patch 8: names the shape in synthetic scenes (96.6% held-out)",
    _build_shapes_vit, "shapes-vit.safetensors"))
register(ZooEntry(
    "shapes-captioner",
    "ViT + GPT-2 (transformers) captioning synthetic scenes (97.6% exact captions held-out)",
    _build_shapes_captioner, "shapes-captioner.safetensors"))
register(ZooEntry(
    "shapes-clip",
    "small CLIP (transformers), 64 px: text -> image maps of phrases (chefer pointing game 99.8% held-out)",
    _build_shapes_clip, "shapes-clip.safetensors"))

__all__ = ["ZOO", "ZooEntry", "register", "WEIGHTS"]
