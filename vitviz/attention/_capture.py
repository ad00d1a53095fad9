"""`vitviz.capture`: read attention at the attention op of a real forward pass.

Inside the ``with`` block, :class:`~vitviz.attention._mode.AttentionOps` (a ``TorchFunctionMode``,
thread-local) sees the model's own attention calls and hands their probabilities to the
capture's internal :class:`_Recorder`. The mode is active for the whole block (not only inside
the modules the adapters know), so that no attention op goes unseen. The hooks on the model are
a forward pre-hook on the root module that marks where a forward pass begins, and a pre- and
post-hook on every module that keep the stack of module calls running: each attention op is
counted in the innermost module call that runs it (one attention layer per module call), and
all are removed on exit. Modules that wrap one function (``nn.Softmax``, ``nn.Dropout``, and
torch.nn's own ``Linear``, ``LayerNorm``, activations, ... whose ``forward`` is not overridden)
get none: no attention op runs in them, and an op in them belongs to their caller. No
implementation flag or config of the model is switched. Adapters
(:mod:`._adapter`) say what only the library knows: which modules are image self-attention,
text self-attention or cross-attention. Calls in modules no adapter claims are decided per
call: square (queries = keys) is image self-attention, otherwise cross-attention. A call is
attributed to a layer by its role and call order.

Every image layer is placed on the image's token grid as it is recorded (:meth:`_Recorder.place`):
the model's own layout for this input, else a stage of a hierarchical model (the patch grid
coarsened by a whole factor); window attention (Swin, SAM, MaxViT, MobileViT: adapters name the
window blocks) stitched into ``[B, H, N, N]`` over its stage's grid; a masked encoder's visible
patches (ViT-MAE) scattered onto the full grid. A video model's clip ``[B, T, C, H, W]`` is one
token grid with a time axis (``TokenLayout.frames``): joint space-time attention (VideoMAE, ViViT)
as the model runs it, TimeSformer's divided attention (a temporal and a spatial attention per
block) placed on the clip as block-sparse matrices (``_divided.py``), VideoMAE pre-training's
visible tubes scattered like ViT-MAE's patches. :attr:`Recording.stages` groups the layers by
their tokens and heads; a layer that cannot be placed is counted and named in the error that
:attr:`Recording.attentions` raises, never guessed (the tokens of other video models, whose order
vitviz does not know, are refused).

Nothing is silent: every attention layer of a pass is recorded, left out on request (``keep=``,
streams, the fused kernel of a layer nothing needs, ``adapters=``), or listed in
:attr:`Recording.skipped` with what it is and why it is not read (attention over channels or
pixels, layers that cannot be placed, weights that are not probabilities).
:attr:`Recording.complete` says whether that holds for every pass; when it does not, the
capture warns once (:class:`~vitviz.errors.IncompleteCaptureWarning`) naming the modules.

With ``grad=True`` the capture also reads the gradient of whatever is backpropagated inside
the block with respect to each attention tensor, by a tensor hook on the exact tensor the
output was computed from (the probabilities, or the tensor the returned weights of
``nn.MultiheadAttention`` are a view of). Tensor hooks are removed on exit.

Streams (``streams=``) see the layers as they happen. One protocol, with the layer's context
passed in, so a stream needs no knowledge of the model in its constructor:

- ``update(attn, *, layer, num_layers, layout)``: every image self-attention layer in the
  forward pass (``attn`` ``[B, H, N, N]``; ``num_layers`` None where the depth is not known
  before the pass ends). A stream that fuses the heads first may say so with a
  ``fused_heads`` attribute (``"mean"``, ``"max"`` or ``"min"``): when every stream says the
  same and nothing else needs the layer, it gets the fused ``[B, 1, N, N]`` instead, computed
  a few heads at a time on the CPU without the ``[B, H, N, N]`` probabilities. A stream that
  reads only some layers may name them in a ``layers`` attribute (indices as ``keep=``,
  negative ones from the end): it is not called for the others, and they are computed only
  as the other streams and ``keep=`` need (on the fused kernel where nothing does);
- ``update_grad(attn, grad, *, layer, num_layers, layout)``: every layer's attention with its
  gradient in the backward pass (``grad=True``; last layer first), e.g.
  :class:`vitviz.analyze.gradient.RelevanceStream`;
- ``reset()`` at every forward pass and ``result(layout)`` for :meth:`Recording.stream`.

With ``keep="none"`` nothing per layer outlives its use.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace

from torch import nn

from ..errors import CaptureError, IncompleteCaptureWarning
from ..models import VisionModel, wrap
from ._adapter import AUTO, CROSS, IMAGE, TEXT, Site, discover
from ._mode import AttentionOps
from ._recorder import _input_hw, _Recorder, needs_call_hooks
from ._recording import Recording
from ._transformers import divided_blocks, masking_embeddings, tube_masking, tube_order, visible_patches, window_blocks

# implementations whose attention runs in kernels that the op level cannot see
_VISIBLE_HF_IMPLEMENTATIONS = (None, "eager", "sdpa")


@dataclass
class _Setup:
    """What a capture needs to know of a model's modules, read once per module tree."""

    key: tuple  # the ids of the modules (and the adapters asked for) it was read from
    sites: list[Site]  # the adapters' sites
    names: dict[int, str]  # id(module) -> dotted name
    modules: dict[int, nn.Module]  # id(module) -> module
    owner: dict[int, Site]  # id(module) -> the site whose module holds it
    num_layers: dict[str, int]  # layers of each role per pass (0: known only after a pass)
    # id(module) -> the window scheme of the window block it is in (transformers Swin layers)
    windows: dict = field(default_factory=dict)
    # embeddings of masked-image-modelling encoders (ViT-MAE) that say which patches are seen
    masking: list = field(default_factory=list)
    # the modules whose calls are tracked (needs_call_hooks), in order
    hooked: list = field(default_factory=list)
    # id(module) -> "time" / "space": inside one of the two attentions of a divided space-time
    # block (TimeSformer), placed on the clip by _divided.py
    divided: dict = field(default_factory=dict)
    # VideoMAE pre-training: the embeddings that drop the masked tubes (bool_masked_pos), and the
    # ids of the modules of its decoder (visible tubes first, then the masked ones)
    tubes: list = field(default_factory=list)
    decoders: set = field(default_factory=set)


def _tree(root: nn.Module) -> list[nn.Module]:
    """The modules of ``root`` in ``named_modules()`` order (each once), without building their
    names: read at every capture to tell whether the tree changed."""
    out: list[nn.Module] = []
    seen: set[int] = set()
    stack: list = [root]
    pop, push, add = stack.pop, stack.extend, seen.add
    while stack:
        m = pop()
        if m is None or id(m) in seen:  # an unset child slot, or a module shared by two parents
            continue
        add(id(m))
        out.append(m)
        children = m._modules
        if children:
            push(reversed(children.values()) if type(children) is dict else reversed(list(children.values())))
    return out


def _setup(vm: VisionModel, tree: list[nn.Module], adapters: list[str] | None) -> _Setup:
    """The model's :class:`_Setup`, kept on the :class:`VisionModel` while its module tree is the
    same (the same modules, by identity, and the same adapters)."""
    key = (tuple(map(id, tree)), tuple(adapters) if adapters else None)
    cached = getattr(vm, "_capture_setup", None)
    if cached is not None and cached.key == key:
        return cached
    root = vm.module
    named = list(root.named_modules())
    windows = window_blocks(root)
    divided = divided_blocks(root)
    sites = []
    for site in discover(root, adapters):
        inner = [m for m in site.module.modules() if id(m) in windows and windows[id(m)].block is m
                 and m is not site.module]
        if inner and id(site.module) not in windows:  # a stage of window blocks: one site per block
            names = {id(m): n for n, m in site.module.named_modules()}
            sites += [replace(site, name=f"{site.name}.{names[id(m)]}", module=m, windows=windows[id(m)])
                      for m in inner]
        else:
            sites.append(replace(site, windows=site.windows or windows.get(id(site.module)),
                                 divided=site.divided or divided.get(id(site.module), "")))
    owner: dict[int, Site] = {}
    for site in sites:  # every module inside a site belongs to that site
        for m in site.module.modules():
            owner.setdefault(id(m), site)
    tubes, decoders = tube_masking(root)
    setup = _Setup(key, sites, {id(m): n for n, m in named}, {id(m): m for _, m in named}, owner,
                   {role: sum(1 for s in sites if s.role in (role, AUTO)) for role in (IMAGE, TEXT, CROSS)},
                   windows, masking_embeddings(root), [m for _, m in named if needs_call_hooks(m)],
                   divided=divided, tubes=tubes, decoders=decoders)
    vm._capture_setup = setup
    return setup


def _refuse_unseeable(vm: VisionModel, tree: list[nn.Module]) -> None:
    """A :class:`CaptureError` for attention the op level cannot see: a ``torch.compile``d
    module, or a transformers model set to an external kernel (flash-attention, flex, ...)."""
    for m in tree:
        attrs = m.__dict__  # plain attributes: no Module.__getattr__ miss per module
        if attrs.get("_compiled_call_impl") is not None or type(m).__name__ == "OptimizedModule":
            where = _where(vm, m)
            raise CaptureError(
                f"{where} ({type(m).__name__}) is compiled with torch.compile: its attention runs "
                "inside a compiled graph that vitviz cannot see; capture the uncompiled model "
                "(for torch.compile(model), its ._orig_mod) and compile again afterwards")
        config = attrs.get("config")
        if config is None:
            continue
        impl = getattr(config, "_attn_implementation_internal", None)
        if type(config).__module__.startswith("transformers") and isinstance(impl, str) \
                and impl not in _VISIBLE_HF_IMPLEMENTATIONS:
            where = _where(vm, m)
            raise CaptureError(
                f"{where} ({type(m).__name__}) runs attention with the external kernel {impl!r}, "
                "which vitviz cannot see; select a torch implementation first: "
                "model.set_attn_implementation('sdpa') (or 'eager')")


def _where(vm: VisionModel, module: nn.Module) -> str:
    """``model.dotted.name`` of a module of the model, for a message."""
    name = next((n for n, m in vm.module.named_modules() if m is module), "")
    return f"{vm.name}.{name}" if name else vm.name


@contextmanager
def capture(model, *, adapters: list[str] | None = None, grad: bool = False, keep="all",
            streams: dict | None = None, rows=None) -> Iterator[Recording]:
    """Capture attention probabilities from every forward pass run inside the block.

    The model's own attention calls (``F.scaled_dot_product_attention``, a softmax whose result
    multiplies the values, ``F.multi_head_attention_forward``) are seen at the torch-function
    level on this thread and answered by the op's definition from the exact inputs the model
    passed; nothing on the model is switched. On exit, also after an exception, the mode and
    the hooks are removed.

    Args:
        model: a :class:`VisionModel` or any ``torch.nn.Module`` (wrapped with :func:`wrap`).
        adapters: only record the attention of the modules these adapters find (see
            ``vitviz.attention.list_adapters()``); default: every attention call of the model.
        grad: also record the gradient of what is backpropagated inside the block with
            respect to every attention tensor (``rec.attention_grads``): one forward and one
            backward, read by tensor hooks that are removed on exit.
        keep: which layers to store: ``"all"`` (default), ``"none"`` (only ``streams`` run:
            memory ``O(B*N^2)`` instead of ``O(L*B*H*N^2)``), or layer indices per role, e.g.
            ``[-1]`` for the last layer only (``rec.attentions`` then holds the kept layers).
            Layers whose probabilities nothing needs run the model's fused kernel.
        streams: name -> streaming analysis (``reset()``, ``result(layout)`` and
            ``update(attn, *, layer, num_layers, layout)``, e.g.
            :class:`vitviz.analyze.RolloutStream`, fed every image self-attention layer as it
            runs, and/or, with ``grad=True``, ``update_grad(attn, grad, *, layer, num_layers,
            layout)``, e.g. :class:`vitviz.analyze.RelevanceStream`, fed every layer's attention
            and gradient as the backward pass reaches it); read with ``rec.stream(name)``.
        rows: keep only these query rows of the kept image self-attention layers: ``"cls"``
            (token 0; the model must have a CLS token) or token indices (negative count from the
            end). The model's fused kernel computes the output and vitviz only
            ``softmax(q_rows·kᵀ·scale + mask)``, so no ``[N, N]`` map is formed where the model
            calls ``F.scaled_dot_product_attention`` (eager models compute their full ``A``
            anyway: its rows are kept). ``rec.attentions`` is then ``[L, B, H, R, N]`` with
            ``.rows`` naming the tokens; :func:`vitviz.cls_maps` and :func:`vitviz.query_maps`
            read it, analyses that chain layers (rollout, flow) refuse it. Layers whose keys
            are reduced to a coarser grid keep every row. Not with ``grad=True``.

    Returns:
        A :class:`Recording` (``rec.attentions``, ``rec.cross``, ``rec.attention_grads``).

    Raises:
        CaptureError: the model's attention cannot be seen (compiled, external kernels), or a
            forward pass ran and no attention call was seen.

    Example:
        >>> with vitviz.capture(m) as rec:
        ...     logits = m(x)
        >>> rec.attentions.tensor.shape  # [L, B, H, N, N]
        torch.Size([12, 1, 12, 197, 197])
        >>> with vitviz.capture(m, grad=True) as rec:
        ...     m(x)[0, 3].backward()
        >>> rec.attention_grads.tensor.shape  # d logit_3 / d attention
        torch.Size([12, 1, 12, 197, 197])
        >>> with vitviz.capture(m, keep=[-1], rows="cls") as rec:  # the CLS row of the last layer only
        ...     m(x)
        >>> rec.attentions.tensor.shape  # [L, B, H, R, N]
        torch.Size([1, 1, 12, 1, 197])
    """
    vm = model if isinstance(model, VisionModel) else wrap(model)
    root: nn.Module = vm.module
    tree = _tree(root)
    _refuse_unseeable(vm, tree)  # compile and implementation settings may change between captures
    setup = _setup(vm, tree, adapters)
    recorder = _Recorder(vm, setup, restricted=adapters is not None, grad=grad, keep=keep, streams=streams,
                         rows=rows)
    ops = AttentionOps(recorder, recorder.modules)
    thread = threading.get_ident()

    def on_root(_module, args, kwargs):
        if threading.get_ident() == thread:  # another thread's forward is not this capture's
            ops.forget()
            recorder.begin(*_input_hw(args, kwargs))

    with ExitStack() as stack:
        stack.callback(recorder.close)  # last undo: tensor hooks of this forward removed
        handle = root.register_forward_pre_hook(on_root, with_kwargs=True)
        stack.callback(handle.remove)
        for module in setup.masking:  # ViT-MAE: which patches the encoder sees
            def seen(_module, _args, output):
                if threading.get_ident() == thread:
                    recorder.current().visible = visible_patches(output)

            stack.callback(module.register_forward_hook(seen).remove)
        for module in setup.tubes:  # VideoMAE pre-training: the tubes its encoder sees (bool_masked_pos)
            def tubes_seen(_module, args, kwargs):
                if threading.get_ident() == thread:
                    found = tube_order(args, kwargs)
                    p = recorder.current()
                    p.visible, p.order = found if found is not None else (None, None)

            stack.callback(module.register_forward_pre_hook(tubes_seen, with_kwargs=True).remove)
        schemes = {id(w): w for w in [s.windows for s in setup.sites] + list(setup.windows.values()) if w}
        for windows in schemes.values():  # window attention: the grid each windowed block cuts
            def read(_module, args, kwargs, windows=windows):
                if threading.get_ident() == thread:
                    windows.grid = windows.read_grid(args, kwargs)

            stack.callback(windows.block.register_forward_pre_hook(read, with_kwargs=True).remove)
        # every module call of the model, so that each attention op is counted in the module call
        # (the layer) that ran it; the mode itself sees the whole block, not only the modules the
        # adapters know, so that no attention op goes unseen
        def call_in(module, _args):
            if threading.get_ident() == thread:
                recorder.enter_call(module)

        def call_out(module, _args, _output):  # always_call: also when the forward raises
            if threading.get_ident() == thread:
                recorder.leave_call(module)

        handles = []
        stack.callback(lambda: [h.remove() for h in handles])
        for m in setup.hooked:
            handles += [m.register_forward_pre_hook(call_in), m.register_forward_hook(call_out, always_call=True)]
        stack.enter_context(ops)
        stack.callback(ops.forget)
        stack.callback(recorder.call_stack.clear)
        yield Recording(recorder)
    accounts = [recorder.accounting(p) for p in recorder.passes]
    if recorder.passes and not any(p.seen for p in recorder.passes):
        notes = recorder.notes()
        if notes:
            raise CaptureError(f"{vm.name} ran inside the capture but has no attention over its image tokens: "
                               + "; ".join(notes))
        unread = list(dict.fromkeys(c.name for p in recorder.passes for c in p.calls))
        if unread:
            reasons = list(dict.fromkeys(f"{why}" for skipped, _ in accounts for _, _, why in skipped))
            raise CaptureError(
                f"{vm.name} ran attention in {_names(unread)}, but vitviz could read none of it: "
                + ("; ".join(reasons) if reasons else _UNREAD))
        known = ", ".join(f"{s.name} ({s.adapter.name})" for s in recorder.sites[:6] if s.adapter)
        raise CaptureError(
            f"{vm.name} ran inside the capture but no attention call was seen"
            + (f" (attention modules: {known})" if known else "")
            + ": no F.scaled_dot_product_attention, no softmax over the last dimension of a 3-D or larger "
            "tensor and no nn.MultiheadAttention ran in its forward pass. If the model has attention, it "
            "runs where vitviz cannot see it, in an external kernel (xformers, flash-attn called directly) "
            "or a torch.compile'd function: run the model with torch's own attention (e.g. "
            "model.set_attn_implementation('sdpa')) and uncompiled")
    unaccounted = list(dict.fromkeys(name for _, names in accounts for name in names))
    if unaccounted:
        warnings.warn(
            f"{vm.name}: {len(unaccounted)} attention layer(s) ran that vitviz neither read nor can explain: "
            f"{_names(unaccounted)}; {_UNREAD}. The Recording is incomplete (rec.complete is False; "
            "rec.unaccounted names them)", IncompleteCaptureWarning, stacklevel=3)


# why an attention op that is neither read nor explained was not read
_UNREAD = ("vitviz reads F.scaled_dot_product_attention, nn.MultiheadAttention and a softmax over the last "
           "dimension (or a mixture of softmaxes whose rows sum to 1) that multiplies the values as A @ v or "
           "v @ Aᵀ; these softmaxes never did")


def _names(names: list[str], most: int = 8) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")
