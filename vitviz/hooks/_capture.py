"""`vitviz.capture`: read attention from a real forward pass, inside a ``with`` block.

With ``grad=True`` the capture also reads the gradient of whatever is backpropagated inside
the block with respect to each attention tensor: a tensor hook (``Tensor.register_hook``)
sits on the exact tensor that the model multiplies with ``V`` (the post-softmax
probabilities, as adapters emit them; for ``nn.MultiheadAttention`` the tensor that its
returned weights are a view of). Tensor hooks are removed on exit like module hooks.

Streams (``streams=``) see the layers as they happen instead of after the pass: an object
with ``update(attn)`` is fed every image self-attention layer in the forward pass, one with
``update_grad(attn, grad, *, layer, num_layers, layout)`` every layer's attention with its
gradient in the backward pass (``grad=True``; in the order the gradients arrive, last layer
first), e.g. :class:`vitviz.analyze.relevance.RelevanceStream`. Neither needs the ``[L, B, H, N, N]``
stacks, so with ``keep="none"`` nothing per layer outlives its use.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from torch import nn

from ..errors import CaptureError
from ..models._vision_model import VisionModel, wrap
from ..types import AttentionMaps, CrossAttentionMaps
from ._registry import AUTO, CROSS, IMAGE, TEXT, Site, discover, named_attention_like


@dataclass
class Pass:
    """What one forward pass of the root module produced."""

    input_hw: Optional[tuple[int, int]] = None
    # (role, site, attention, layer index within the role) of the kept layers
    records: list[tuple[str, Site, torch.Tensor, int]] = field(default_factory=list)
    # with capture(grad=True), keyed by (role, layer): the layers whose tensor carried a
    # gradient hook, the gradients received so far (float32, shaped like the attention,
    # summed over backward calls), and the hooked graph tensors (only while the block runs)
    hooked: set[tuple[str, int]] = field(default_factory=set)
    grads: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    graph: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    # per role: layers seen in this pass (kept or not) and their key count N
    seen: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)

    def of(self, role: str) -> list[torch.Tensor]:
        return [t for r, _, t, _ in self.records if r == role]

    def layers(self, role: str) -> list[int]:
        return [i for r, _, _, i in self.records if r == role]


def _input_hw(args: tuple, kwargs: dict) -> Optional[tuple[int, int]]:
    """Height and width of the first image-like tensor ([B, C, H, W]) among a call's inputs."""
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() == 4 and value.is_floating_point():
            return int(value.shape[-2]), int(value.shape[-1])
    return None


def _stack(tensors: list[torch.Tensor], what: str) -> torch.Tensor:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise CaptureError(
            f"{what} layers have different shapes {sorted(shapes)}; capture one model call per "
            "`with vitviz.capture(...)` block, or pass adapters= to select the attention modules"
        )
    return torch.stack(tensors)  # [L, B, H, Q, K]


def _keep_spec(keep):
    if isinstance(keep, str):
        if keep not in ("all", "none"):
            raise ValueError(f"keep must be 'all', 'none' or a list of layer indices, got {keep!r}")
        return keep
    if keep is None:
        return "none"
    try:
        return tuple(int(k) for k in keep)
    except TypeError:
        raise ValueError(f"keep must be 'all', 'none' or a list of layer indices, got {keep!r}") from None


class Recording:
    """What :func:`capture` read. Filled while the ``with`` block runs.

    Attributes:
        attentions: :class:`AttentionMaps` ``[L, B, H, N, N]`` of the image encoder in the
            last forward pass that ran it, or ``None``.
        cross: :class:`CrossAttentionMaps` ``[L, B, H, T, Ni]`` of the last pass with
            cross-attention, or ``None``.
        text: decoder self-attention ``[L, B, H, T, T]`` of the last pass with it, or ``None``.
        attention_grads: with ``capture(model, grad=True)``, :class:`AttentionMaps`-shaped
            ``[L, B, H, N, N]`` gradients of what was backpropagated inside the block with
            respect to the attention probabilities of :attr:`attentions`.
        passes: every forward pass of the model, in order.
        sites: the attention modules that were hooked.
    """

    def __init__(self, model: VisionModel, sites: list[Site], grad: bool = False,
                 keep="all", streams: Optional[dict] = None):
        self.model = model
        self.sites = sites
        self.grad = grad
        self.keep = _keep_spec(keep)
        self.streams = dict(streams or {})
        self._grad_streams = [s for s in self.streams.values() if hasattr(s, "update_grad")]
        if self._grad_streams and not grad:
            raise CaptureError("streams with update_grad need capture(..., grad=True)")
        if grad and self.keep != "all" and not self._grad_streams:
            raise CaptureError("capture(grad=True) needs keep='all' (gradients are matched to kept "
                               "layers) or streams that take the gradients as they arrive")
        # layers of each role per pass, for negative indices in keep=[...]
        self._num_layers = {role: sum(1 for s in sites if s.role in (role, AUTO)) for role in (IMAGE, TEXT, CROSS)}
        self.passes: list[Pass] = []
        self._selected = self._selection()  # image sites switched to eager, when not all
        self._grad_handles: list = []  # RemovableHandles of the tensor hooks
        self._open = True

    # -- filled by hooks -------------------------------------------------------------------
    def _begin(self, hw: Optional[tuple[int, int]]) -> None:
        self.passes.append(Pass(input_hw=hw))
        for stream in self.streams.values():
            stream.reset()

    def _selection(self) -> Optional[dict[int, int]]:
        """With ``keep=[layers]``, no streams and no gradients, when every image site can be
        switched on its own: ``{id(module): layer}`` of the image sites that must run their
        eager path (the others keep their fused attention); otherwise None (all must)."""
        if not isinstance(self.keep, tuple) or self.streams or self.grad:
            return None
        image = [s for s in self.sites if s.role in (IMAGE, AUTO)]
        if not image or any(s.role != IMAGE or not s.adapter.selectable for s in image):
            return None
        n = len(image)
        wanted = {k % n for k in self.keep if -n <= k < n}
        return {id(s.module): i for i, s in enumerate(image) if i in wanted}

    def _skip(self, site: Site) -> None:
        """Count an image layer left on its fast path (nothing recorded), keeping indices right."""
        if not self.passes:
            self._begin(None)
        p = self.passes[-1]
        p.seen[IMAGE] = p.seen.get(IMAGE, 0) + 1

    def _keeps(self, role: str, index: int) -> bool:
        if self.keep == "all":
            return True
        if self.keep == "none":
            return False
        n = self._num_layers[role]
        return any(k == index or (k < 0 and n and k % n == index) for k in self.keep)

    def _emit(self, site: Site, attn: torch.Tensor, role: Optional[str] = None,
              graph: Optional[torch.Tensor] = None) -> None:
        """Record one attention call.

        Args:
            site: the attention module.
            attn: ``[B, H, Q, K]`` post-softmax probabilities.
            role: IMAGE / TEXT / CROSS, or None for the site's role.
            graph: the tensor of the autograd graph whose gradient is the gradient with
                respect to ``attn`` (same number of elements, e.g. ``[B*H, Q, K]``), when
                ``attn`` itself is a view the model does not compute with; default ``attn``.
        """
        role = role or site.role
        if role == AUTO:
            role = IMAGE if attn.shape[-1] == attn.shape[-2] else CROSS
        if not self.passes:  # a submodule was called directly
            self._begin(None)
        p = self.passes[-1]
        index = p.seen.get(role, 0)
        p.seen[role] = index + 1
        if self._selected is not None and role == IMAGE and self._selected.get(id(site.module)) != index:
            raise CaptureError(
                f"{site.name} ran as image attention layer {index}, not as layer "
                f"{self._selected.get(id(site.module))} of the module order that keep={list(self.keep)} "
                "was resolved with; use capture(..., keep='all') for this model")
        p.tokens[role] = int(attn.shape[-1])
        if role == IMAGE:
            for stream in self.streams.values():  # streaming analyses see every layer
                if hasattr(stream, "update"):
                    stream.update(attn.detach())  # [B, H, N, N]
        kept = self._keeps(role, index)
        if kept:  # [B, H, Q, K]; detached float32 copy-free view when already float32
            p.records.append((role, site, attn.detach().float(), index))
        streamed = role == IMAGE and bool(self._grad_streams)
        if self.grad and (kept or streamed):
            self._hook_grad(p, (role, index), attn if graph is None else graph, attn, store=kept)
        # not kept: freed as soon as the model (and the backward pass) is done with it

    def _hook_grad(self, p: Pass, key: tuple[str, int], tensor: torch.Tensor, attn: torch.Tensor,
                   store: bool) -> None:
        """Put a tensor hook on ``tensor`` that receives ``d score / d attn`` of layer ``key``:
        stored in ``p.grads`` when ``store``, and given to the gradient streams (image layers)."""
        shape = attn.shape
        if not tensor.requires_grad or tensor.numel() != shape.numel():
            return  # no graph (torch.no_grad, nothing requires grad): reported by attention_grads
        role, layer = key
        streams = self._grad_streams if role == IMAGE else []
        # the attention for the streams: an alias of what autograd keeps anyway, dropped (with
        # the graph tensor) once the streams have it, so that a layer's attention is freed as
        # the backward pass leaves it instead of when the block ends
        held = {"attn": attn.detach()} if streams else {}

        def on_grad(g: torch.Tensor) -> None:
            g = g.detach().reshape(shape)  # [B, H, Q, K]
            if streams:
                if "attn" not in held:
                    raise CaptureError(
                        f"layer {layer} received a second gradient: gradient streams take one "
                        "backward pass per forward pass (to sum several, use keep='all' and "
                        "rec.attention_grads without streams)")
                value = held.pop("attn")
                layout = self.model.layout_for(p.input_hw, shape[-1])
                for stream in streams:
                    stream.update_grad(value, g, layer=layer, num_layers=p.seen.get(role, 0), layout=layout)
                if not store:
                    p.graph.pop(key, None)
            if store:
                prev = p.grads.get(key)
                g = g.to(torch.float32, copy=True)
                p.grads[key] = g if prev is None else prev + g  # summed over backward calls

        self._grad_handles.append(tensor.register_hook(on_grad))
        p.hooked.add(key)
        p.graph[key] = tensor

    def _close(self) -> None:
        """Remove every tensor hook and drop the graph tensors (on exit, also after an error)."""
        for h in self._grad_handles:
            h.remove()
        self._grad_handles.clear()
        for p in self.passes:
            p.graph.clear()
        self._open = False

    # -- results ---------------------------------------------------------------------------
    def _last_with(self, role: str) -> Optional[Pass]:
        """The last pass that kept ``role`` attention; an error if it ran but was not kept."""
        for p in reversed(self.passes):
            if p.of(role):
                return p
        if any(p.seen.get(role) for p in self.passes):
            raise CaptureError(
                f"{role} attention ran but no layer of it was kept (keep={self.keep!r}); use "
                "capture(..., keep='all') or read the streams with rec.stream(name)")
        return None

    @property
    def attentions(self) -> Optional[AttentionMaps]:
        p = self._last_with(IMAGE)
        if p is None:
            return None
        tensor = _stack(p.of(IMAGE), "image self-attention")  # [L, B, H, N, N]
        return AttentionMaps(tensor, self.model.layout_for(p.input_hw, tensor.shape[-1]))

    @property
    def cross(self) -> Optional[CrossAttentionMaps]:
        p = self._last_with(CROSS)
        if p is None:
            return None
        tensor = _stack(p.of(CROSS), "cross-attention")  # [L, B, H, T, Ni]
        return CrossAttentionMaps(tensor, self.model.layout_for(p.input_hw, tensor.shape[-1]))

    def stream(self, name: str) -> torch.Tensor:
        """The result of the streaming analysis ``name`` for the last pass with image attention.

        Example:
            >>> with vitviz.capture(m, keep="none", streams={"rollout": RolloutStream()}) as rec:
            ...     m(x)
            >>> rec.stream("rollout").shape  # [B, gh, gw]
        """
        if name not in self.streams:
            raise KeyError(f"no stream {name!r}; streams: {', '.join(self.streams) or 'none'}")
        p = next((q for q in reversed(self.passes) if q.seen.get(IMAGE)), None)
        if p is None:
            raise CaptureError("no image self-attention ran inside the capture block")
        return self.streams[name].result(self.model.layout_for(p.input_hw, p.tokens[IMAGE]))

    @property
    def text(self) -> Optional[torch.Tensor]:
        p = self._last_with(TEXT)
        return None if p is None else _stack(p.of(TEXT), "text self-attention")

    def grad_inputs(self, role: str = IMAGE) -> list[torch.Tensor]:
        """The hooked graph tensors of the last pass with ``role`` attention, in layer order.

        Pass them as ``inputs`` to ``torch.autograd.grad`` (or ``backward(inputs=...)``) to
        compute only the gradients the capture needs: parameter gradients are then neither
        computed nor accumulated into ``.grad``. Only inside the ``with`` block.

        Returns:
            Tensors of the autograd graph (the attention tensors, or what they are views of).
        """
        if not self.grad:
            raise CaptureError("gradients are not recorded: use vitviz.capture(model, grad=True)")
        if not self._open:
            raise CaptureError("grad_inputs() is only available inside the `with vitviz.capture(...)` "
                               "block: compute the gradients there")
        p = next((q for q in reversed(self.passes) if q.seen.get(role)), None)  # last pass with it
        if p is None:
            return []
        return [p.graph[k] for k in sorted(p.graph) if k[0] == role]

    def _grads_of(self, role: str, what: str) -> Optional[torch.Tensor]:
        """``[L, B, H, Q, K]`` gradients of the last pass with ``role`` attention, or None."""
        if not self.grad:
            raise CaptureError(
                "gradients were not recorded: use `with vitviz.capture(model, grad=True) as rec:` and "
                "backpropagate a score inside the block")
        p = self._last_with(role)
        if p is None:
            return None
        idx = [(role, i) for i in p.layers(role)]
        missing = [i for i in idx if i not in p.hooked]
        if missing:
            raise CaptureError(
                f"{len(missing)} of {len(idx)} {what} layers ran without an autograd graph, so no "
                "gradient can reach them; run the forward pass with gradients enabled (not under "
                "torch.no_grad() or torch.inference_mode()) and with parameters or the input "
                "requiring grad (e.g. x.requires_grad_())")
        if not any(i in p.grads for i in idx):
            raise CaptureError(
                f"no gradient reached the {what}: call score.backward() (or torch.autograd.grad("
                "score, rec.grad_inputs())) inside the `with vitviz.capture(..., grad=True)` block, "
                "on a score computed from this forward pass")
        # a layer that the score does not depend on receives no gradient at all: zero
        tensors = [p.grads[i] if i in p.grads else torch.zeros_like(t) for i, t in zip(idx, p.of(role))]
        return _stack(tensors, f"{what} gradient")  # [L, B, H, Q, K]

    @property
    def attention_grads(self) -> Optional[AttentionMaps]:
        """Gradients w.r.t. the image self-attention probabilities of :attr:`attentions`.

        Requires ``capture(model, grad=True)`` and a backward pass inside the block. Gradients
        of several backward calls are summed, as ``.grad`` is. A layer the score does not
        depend on gets zeros.

        Returns:
            :class:`AttentionMaps` whose tensor ``[L, B, H, N, N]`` float32 holds
            ``d score / d A`` (rows do not sum to 1), with the layout of :attr:`attentions`;
            None when no image self-attention ran.

        Raises:
            CaptureError: not recorded with ``grad=True``; the forward ran without an autograd
                graph; or no backward pass reached the attention.

        Example:
            >>> with vitviz.capture(m, grad=True) as rec:
            ...     logits = m(x)
            ...     logits[0, 3].backward()
            >>> rec.attention_grads.tensor.shape  # [L, B, H, N, N]
            torch.Size([12, 1, 12, 197, 197])
        """
        p = self._last_with(IMAGE)
        tensor = self._grads_of(IMAGE, "image self-attention")
        if tensor is None:
            return None
        return AttentionMaps(tensor, self.model.layout_for(p.input_hw, tensor.shape[-1]))

    def __repr__(self) -> str:
        counts = [len(p.records) for p in self.passes]
        return f"Recording(sites={len(self.sites)}, passes={len(self.passes)}, records={counts})"


@contextmanager
def capture(model, *, adapters: Optional[list[str]] = None, grad: bool = False, keep="all",
            streams: Optional[dict] = None) -> Iterator[Recording]:
    """Capture attention probabilities from every forward pass run inside the block.

    Hooks and implementation switches (timm's ``fused_attn``, transformers' attention
    implementation, torch's MHA fast path) exist only inside the block; on exit, also after
    an exception, every hook is removed and every switch restored.

    Args:
        model: a :class:`VisionModel` or any ``torch.nn.Module`` (wrapped with :func:`wrap`).
        adapters: restrict to these adapter names (see ``vitviz.hooks.list_adapters()``).
        grad: also record the gradient of what is backpropagated inside the block with
            respect to every attention tensor (``rec.attention_grads``): one forward and one
            backward, read by tensor hooks that are removed on exit.
        keep: which layers to store: ``"all"`` (default), ``"none"`` (only ``streams`` run:
            memory ``O(B*N^2)`` instead of ``O(L*B*H*N^2)``), or layer indices per role, e.g.
            ``[-1]`` for the last layer only (``rec.attentions`` then holds the kept layers).
            With layer indices and no streams or gradients, sites that can be switched one by
            one (timm) leave the other layers on their fused attention path; a model whose
            layers run in another order than its modules are registered is then refused.
        streams: name -> streaming analysis (``reset()``, ``result(layout)`` and
            ``update(attn [B, H, N, N])``, e.g. :class:`vitviz.analyze.RolloutStream`, fed every
            image self-attention layer as it runs, and/or, with ``grad=True``,
            ``update_grad(attn, grad, *, layer, num_layers, layout)``, e.g.
            :class:`vitviz.analyze.RelevanceStream`, fed every layer's attention and gradient
            as the backward pass reaches it); read with ``rec.stream(name)``. With gradient
            streams, ``grad=True`` works with any ``keep``.

    Returns:
        A :class:`Recording` (``rec.attentions``, ``rec.cross``, ``rec.attention_grads``).

    Raises:
        CaptureError: no attention module was found, or a forward pass ran and no attention
            was recorded.

    Example:
        >>> with vitviz.capture(m) as rec:
        ...     logits = m(x)
        >>> rec.attentions.tensor.shape  # [L, B, H, N, N]
        torch.Size([12, 1, 12, 197, 197])
        >>> with vitviz.capture(m, grad=True) as rec:
        ...     m(x)[0, 3].backward()
        >>> rec.attention_grads.tensor.shape  # d logit_3 / d attention
        torch.Size([12, 1, 12, 197, 197])
    """
    vm = model if isinstance(model, VisionModel) else wrap(model)
    root: nn.Module = vm.module
    sites = discover(root, adapters)
    if not sites:
        seen = named_attention_like(root)
        raise CaptureError(
            f"no attention module that vitviz can read was found in {vm.name}"
            + (f" (attention-like modules: {', '.join(seen)})" if seen else "")
            + "; supported: timm ViTs, transformers models, torch.nn.MultiheadAttention, "
            "pytorch_pretrained_vit, and modules returning (output, attention) or using nn.Softmax"
        )
    rec = Recording(vm, sites, grad=grad, keep=keep, streams=streams)
    with ExitStack() as stack:
        stack.callback(rec._close)  # last undo: tensor hooks of this forward removed
        def on_root(_module, args, kwargs):
            rec._begin(_input_hw(args, kwargs))

        handle = root.register_forward_pre_hook(on_root, with_kwargs=True)
        stack.callback(handle.remove)
        by_adapter: dict[int, list[Site]] = {}
        for s in sites:
            by_adapter.setdefault(id(s.adapter), []).append(s)
        for group in by_adapter.values():
            adapter = group[0].adapter
            if rec._selected is not None and adapter.selectable:
                # layers that are not kept stay on their fast (fused) path; a forward hook only
                # counts them, so that the kept layers get their right index
                for s in group:
                    if id(s.module) not in rec._selected:
                        h = s.module.register_forward_hook(lambda *_a, _s=s: rec._skip(_s))
                        stack.callback(h.remove)
                group = [s for s in group if id(s.module) in rec._selected]
            if group:
                adapter.attach(group, rec._emit, stack)
        yield rec
    if rec.passes and not any(p.seen for p in rec.passes):
        names = ", ".join(f"{s.name} ({s.adapter.name})" for s in sites[:6])
        raise CaptureError(
            f"the forward pass ran but none of the {len(sites)} hooked attention modules "
            f"reported attention ({names}); the model may use a fused attention path that no "
            "adapter could switch off: report it, or call vitviz.wrap with a model whose attention "
            "module returns (output, attention)"
        )
