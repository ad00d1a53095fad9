"""Text -> image maps of contrastive image-text models (CLIP, SigLIP): the pure parts.

Two formulas, each a function of tensors only (the model side lives in ``vitviz.explain.text``):

- **LeGrad**, Bousselham et al. 2024, "LeGrad: An Explainability Method for Vision Transformers
  via Feature Formation Sensitivity": for every layer ``l`` from a start layer, the text score
  ``s_l`` of that layer's pooled token (through the model's final norm and projection, or its
  attention-pool head) is differentiated with respect to that layer's attention probabilities
  ``A_l`` only; the map is ``Σ_l mean_{h, q} ReLU(∂s_l / ∂A_l)[h, q, k]`` over the patch keys
  ``k`` (prefix keys dropped). :class:`LeGradStream` folds each layer in as its gradient arrives.
- **MaskCLIP**, Zhou et al. 2022, "Extract Free Dense Labels from CLIP" (ECCV 2022): dense
  patch embeddings (the last layer's value path, computed by the caller) compared with the text
  embedding by the model's own logit (:func:`patch_text_logits`). No gradients.

Chefer et al. 2021's rule for CLIP is :class:`vitviz.analyze.RelevanceStream` as it is.
"""

from __future__ import annotations

import torch

from ..errors import LayoutError
from ..types import TokenLayout


def _start(num_layers: int, start_layer: int) -> int:
    if not -num_layers <= start_layer < num_layers:
        raise ValueError(f"start_layer {start_layer} is out of range for {num_layers} layers")
    return start_layer % num_layers


def legrad_layer(grad_l: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """One layer's LeGrad term: ``mean_{h, q} ReLU(dA)`` over the patch keys.

    Args:
        grad_l: ``∂s_l / ∂A_l`` of one layer, ``[B, H, N, N]`` (queries, then keys).
        layout: the token layout of the ``N`` tokens.

    Returns:
        ``[B, gh, gw]`` float32.

    Shape:
        grad_l: ``[B, H, N, N]`` -> ``[B, gh, gw]``

    Example:
        >>> g = torch.ones(1, 2, 5, 5)
        >>> legrad_layer(g, TokenLayout(1, (2, 2)))  # every key gets mean(1) = 1
        tensor([[[1., 1.],
                 [1., 1.]]])
    """
    n = grad_l.shape[-1]
    if n != layout.num_tokens:
        raise LayoutError(f"{n} tokens do not fit the layout {layout}")
    keys = grad_l.float().clamp(min=0).mean(dim=(-3, -2))  # [B, N] mean over heads and queries
    p = layout.num_prefix
    return keys[:, p:].reshape(keys.shape[0], *layout.grid)  # [B, gh, gw]


class LeGradStream:
    """LeGrad (Bousselham et al. 2024) as a gradient stream of :func:`vitviz.capture`.

    Each backward pass must carry the gradient of that layer's own score ``s_l`` to layer
    ``l`` only (``torch.autograd.grad(s_l, [rec.grad_inputs()[l]])``): the stream adds the
    layer's :func:`legrad_layer` term to the sum as it arrives. Layers before ``start_layer``
    are ignored.

    Args:
        start_layer: first layer summed (negative counts from the end).

    Example:
        >>> s = LeGradStream(start_layer=-2)
        >>> with vitviz.capture(tower, grad=True, keep="none", streams={"legrad": s}) as rec:
        ...     ...  # one autograd.grad per layer, s_l -> A_l
        >>> rec.stream("legrad").shape  # [B, gh, gw]
    """

    def __init__(self, start_layer: int = 0) -> None:
        self.start_layer = int(start_layer)
        self.reset()

    def reset(self) -> None:
        """Forget the layers seen so far (a new forward pass)."""
        self.terms: dict[int, torch.Tensor] = {}  # layer -> [B, gh, gw] float32

    def update_grad(self, attn_l: torch.Tensor, grad_l: torch.Tensor, *, layer: int, num_layers: int,
                    layout: TokenLayout) -> None:
        """Add layer ``layer``'s term from its gradient ``[B, H, N, N]`` (``attn_l`` is unused)."""
        if num_layers and layer < _start(num_layers, self.start_layer):
            return
        if layer in self.terms:
            raise ValueError(f"layer {layer} received a second gradient: LeGrad takes one gradient "
                             "per layer, that of the layer's own score")
        self.terms[layer] = legrad_layer(grad_l, layout)

    def result(self, layout: TokenLayout) -> torch.Tensor:
        """The sum of the layer terms ``[B, gh, gw]`` float32 (not rescaled)."""
        if not self.terms:
            raise ValueError("no gradient reached the attention: backpropagate each layer's score "
                             "inside the `with vitviz.capture(..., grad=True)` block")
        total = torch.stack([self.terms[layer] for layer in sorted(self.terms)]).sum(dim=0)  # [B, gh, gw]
        if tuple(total.shape[-2:]) != tuple(layout.grid):
            raise LayoutError(f"maps of grid {tuple(total.shape[-2:])} do not fit the layout {layout}")
        return total


def patch_text_logits(patches: torch.Tensor, text: torch.Tensor, layout: TokenLayout, *,
                      scale: float | torch.Tensor = 1.0, bias: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Dense image-text logits: ``scale · cos(patch_p, text_t) + bias`` for every patch.

    The logit of CLIP (``bias = 0``) and SigLIP (a learnt bias) applied to each patch
    embedding instead of the pooled one (MaskCLIP, Zhou et al. 2022).

    Args:
        patches: ``[B, gh*gw, D]`` patch embeddings in the joint space (prefix tokens dropped).
        text: ``[T, D]`` text embeddings; ``B`` is 1 (one image, every text) or ``T`` (pairs).
        layout: the token layout (for the grid).
        scale, bias: the model's logit scale (already exponentiated) and bias.

    Returns:
        ``[T, gh, gw]`` float32.

    Example:
        >>> p = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # two patches
        >>> patch_text_logits(p, torch.tensor([[2.0, 0.0]]), TokenLayout(0, (1, 2)), scale=10.0)
        tensor([[[10.,  0.]]])
    """
    gh, gw = layout.grid
    if patches.dim() != 3 or patches.shape[1] != gh * gw:
        raise LayoutError(f"patch embeddings {tuple(patches.shape)} do not fit the grid {gh}x{gw} "
                          "([B, gh*gw, D] expected)")
    if patches.shape[0] not in (1, text.shape[0]):
        raise ValueError(f"{patches.shape[0]} images for {text.shape[0]} texts: give one image or one per text")
    p = torch.nn.functional.normalize(patches.float(), dim=-1)  # [B, P, D]
    t = torch.nn.functional.normalize(text.float(), dim=-1)  # [T, D]
    cos = torch.einsum("bpd,td->tp", p, t) if p.shape[0] == 1 else torch.einsum("tpd,td->tp", p, t)  # [T, P]
    out = cos * torch.as_tensor(scale, dtype=torch.float32, device=cos.device) \
        + torch.as_tensor(bias, dtype=torch.float32, device=cos.device)
    return out.reshape(text.shape[0], gh, gw)
