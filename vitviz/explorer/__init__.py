"""The attention explorer of one image: model -> capture -> analyzers -> one HTML page.

:func:`explore` runs the model once on the image inside ``vitviz.capture(m, grad=True)``;
when the model is a classifier, one backward pass of the predicted class's logit gives the
gradients for Chefer et al. 2021 relevance. The analyzers then give the rollout up to every
layer (:func:`vitviz.analyze.rollout_matrices`) and the relevance matrix
(:func:`vitviz.analyze.relevance_matrix`), and :func:`vitviz.explorer._view.render_explore`
writes the page. (The module is ``explorer``, not ``explore``: a submodule named like the
function ``vitviz.explore`` would replace it as an attribute of the package once imported.)
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._util.files import atomic_write_bytes
from ..analyze import relevance_matrix, rollout_matrices
from ..errors import VitvizError
from ..explain import Target, as_vision_model, attentions_of, captured, logits_of, resolve_targets
from ..models import VisionModel
from ._view import DEFAULT_MAX_BYTES, ExploreData, render_explore


class Explorer:
    """An explorer page: shows itself in Jupyter and saves itself as one HTML file.

    Attributes:
        data: the :class:`vitviz.explorer._view.ExploreData` the page was built from.
        html: the page, one self-contained HTML document.
    """

    def __init__(self, data: ExploreData, page: str):
        self.data = data
        self.html = page

    def save(self, path: Any) -> Path:
        """Write the page to ``path`` (through a temporary file, then renamed); returns the path.

        The page is written as UTF-8; a missing parent folder is created, and an existing file
        is replaced whole (never left half-written). The file gets the mode a plain ``open``
        would give it (``0o666`` less the umask).

        Args:
            path: where the HTML file goes (``str`` or ``os.PathLike``).

        Returns:
            ``path`` as a :class:`pathlib.Path`.

        Raises:
            OSError: the folder cannot be created or the file cannot be written.
        """
        return atomic_write_bytes(path, self.html.encode("utf-8"))

    def _repr_html_(self) -> str:
        return (f'<iframe srcdoc="{html.escape(self.html, quote=True)}" style="width:100%;height:820px;border:0" '
                'sandbox="allow-scripts" title="vitviz explorer"></iframe>')

    def __repr__(self) -> str:
        d = self.data
        return (f"Explorer({d.title!r}, layers={d.attention.shape[0]}, heads={d.attention.shape[1]}, "
                f"grid={d.grid}, {len(self.html) / 1e6:.1f} MB)")


def _classifier_logits(vm: VisionModel, output: Any) -> torch.Tensor | None:
    """``[B, C]`` logits when the output is a classifier's (two classes or more), else None.

    A model that states its number of classes (timm's ``num_classes``; 0 for a feature
    extractor, whose ``[B, D]`` features are not logits) must agree with ``C``.
    """
    try:
        t = logits_of(output)
    except VitvizError:
        return None
    stated = getattr(vm.module, "num_classes", None)
    if isinstance(stated, int) and not isinstance(stated, bool) and stated != t.shape[-1]:
        return None
    return t if t.shape[-1] >= 2 else None


def _inputs(vm: VisionModel, image: Any) -> tuple[np.ndarray | None, torch.Tensor, str]:
    """The view ``[H, W, 3]`` uint8 (None for a tensor: see :func:`_tensor_view`), the input
    ``[1, 3, H, W]`` and a title for ``image``."""
    if isinstance(image, torch.Tensor):
        x = vm.preprocess(image)  # [B, 3, H, W]
        if x.shape[0] != 1:
            raise VitvizError(f"explore shows one image; got a batch of {x.shape[0]}: pass x[i:i + 1]")
        return None, x, "image"
    pre = vm.preprocessor
    if pre is None:
        vm.preprocess(image)  # raises the model's clear error (no preprocessing configuration)
    rgb = pre.view(image)  # [H, W, 3] uint8; ImageError naming the file
    x = pre.normalize(rgb).unsqueeze(0).to(device=vm.device, dtype=vm.dtype)  # [1, 3, H, W]
    title = Path(str(image)).name if isinstance(image, (str, Path)) else "image"
    return rgb, x, title


def _tensor_view(vm: VisionModel, x: torch.Tensor) -> np.ndarray:
    """``[H, W, 3]`` uint8 picture of a preprocessed ``[1, 3, H, W]`` input: the model's
    normalisation undone, or each channel stretched to 0..255 when it is unknown."""
    v = x[0].detach().float().cpu()  # [3, H, W], once, for the picture
    pre = vm.preprocessor
    if pre is not None and getattr(pre, "mean", None) is not None:
        v = v * torch.tensor(pre.std).view(3, 1, 1) + torch.tensor(pre.mean).view(3, 1, 1)
    else:
        lo, hi = v.amin(dim=(1, 2), keepdim=True), v.amax(dim=(1, 2), keepdim=True)
        v = (v - lo) / (hi - lo).clamp_min(1e-12)
    return (v.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()


def _prefix_names(vm: VisionModel, num_prefix: int, has_cls: bool) -> list[str]:
    """Display names of the prefix tokens: CLS, the distillation token, then registers ``reg 0``, ..."""
    names = ["CLS"] if has_cls and num_prefix else []
    params = (n.rsplit(".", 1)[-1] for n, _ in vm.module.named_parameters())
    if len(names) < num_prefix and any(n in ("dist_token", "distillation_token") for n in params):
        names.append("dist")
    names += [f"reg {i}" for i in range(num_prefix - len(names))]  # numbered from 0, as layers and heads
    return names


def explore(model: Any, image: Any, *, target: Target = None, title: str | None = None,
            max_bytes: int = DEFAULT_MAX_BYTES) -> Explorer:
    """An interactive attention explorer for one image, as one self-contained HTML page.

    Click a patch (or pick the CLS, distillation or a register token) to see where it looks:
    this layer's attention row (mean, max or one head), the rollout up to the layer, or the
    Chefer et al. 2021 relevance of the explained class; beside it the share of its attention on
    prefix tokens per layer and the top-5 prediction.

    Args:
        model: a :class:`vitviz.VisionModel` or any module vitviz can capture.
        image: a path, ``PIL.Image``, ``HxWx3`` uint8 array, or a preprocessed ``[1, 3, H, W]`` tensor.
        target: the class the relevance explains (default: the predicted class).
        title: the page title (default: the file name).
        max_bytes: size the page stays under; the per-head rows of the earliest layers are left
            out when needed (the page says which).

    Returns:
        :class:`Explorer`: ``.save("page.html")``; shows itself inline in Jupyter.

    Raises:
        ImageError: the image cannot be read (the message names it).
        CaptureError: the model's attention cannot be captured.

    Example:
        >>> m = vitviz.load_model("shapes-vit")
        >>> vitviz.explore(m, "scene.png").save("scene.html")
    """
    vm = as_vision_model(model)
    if vm.is_video:
        raise VitvizError(f"{vm.name} is a video model and the explorer shows one image; for a clip use "
                          "`vitviz rollout clip.mp4 --model ...` (an overlay video and a frame strip) or "
                          "vitviz.rollout / vitviz.cls_maps in Python")
    rgb, x, name = _inputs(vm, image)
    grads = None
    explained: int | None = None
    logits: torch.Tensor | None = None

    def score(output, rec):
        nonlocal logits, explained
        attentions_of(rec, vm)  # no attention over image tokens: nothing to explore, nothing to explain
        logits = _classifier_logits(vm, output)  # [1, C] or None
        if logits is None:
            return None  # not a classifier: attention only, no backward pass
        explained = int(resolve_targets(logits, target)[0])
        return logits[0, explained]

    _, rec = captured(vm, x, grad=True, score=score)
    attn = attentions_of(rec, vm)
    if rgb is None:
        rgb = _tensor_view(vm, x)
    if logits is not None:
        grads = rec.attention_grads
    layout = attn.layout
    a = attn.tensor.detach()  # [L, 1, H, N, N]
    roll = rollout_matrices(attn)[:, 0]  # [L, N, N]
    rel = None
    if grads is not None:
        # R = I + (non-negative terms): the identity is each token's own residual path. Without
        # it a patch's row shows the tokens it draws on rather than mostly itself; the CLS row
        # over the patches, vitviz.relevance's map, is unchanged.
        rel = relevance_matrix(attn, grads)[0]  # [N, N]
        rel.diagonal().sub_(1.0)
    top5: list[tuple[str, float]] = []
    rel_class = ""
    if logits is not None:
        labels = vm.labels
        prob = logits.detach()[0].float().softmax(-1)  # [C]
        vals, idx = prob.topk(min(5, prob.numel()))
        top5 = [(_label(labels, c), float(v)) for c, v in zip(idx.tolist(), vals.tolist(), strict=True)]
        rel_class = _label(labels, explained) if explained is not None else ""
    data = ExploreData(
        image=rgb, attention=a[:, 0].float().cpu().numpy(), num_prefix=layout.num_prefix, grid=layout.grid,
        prefix_names=_prefix_names(vm, layout.num_prefix, bool(layout.has_cls)),
        rollout=roll.cpu().numpy(), relevance=None if rel is None else rel.cpu().numpy(),
        relevance_class=rel_class, top5=top5, title=title if title is not None else name,
        model_name=f"{vm.name} · input {rgb.shape[1]}×{rgb.shape[0]} px",
        notes=["Relevance rows are Chefer et al.'s R minus the identity (each token's own residual path); "
               "the CLS row is the map of vitviz.relevance."] if logits is not None else
              ["The model's output is not classifier logits: no prediction and no class relevance."])
    return Explorer(data, render_explore(data, max_bytes=max_bytes))


def _label(labels: list[str] | None, c: int) -> str:
    return labels[c] if labels and 0 <= c < len(labels) else f"class {c}"
