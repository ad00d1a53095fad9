"""The internal recorder of a capture: what the op-level mode hands each attention call to.

:class:`_Recorder` keeps the passes (:class:`Pass`), attributes every attention op to the module
call that runs it, places every image layer on the image's token grid as it is recorded
(:meth:`_Recorder.place`: the model's layout, a stage of a hierarchical model, windows stitched,
a masked encoder's visible patches scattered), feeds the streams, and keeps the accounting of
what was read, left out on request or skipped with a reason. Users never touch it: they read
the :class:`~vitviz.attention.Recording` it fills (``_recording.py``); :func:`vitviz.capture`
(``_capture.py``) wires both to a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import CaptureError, LayoutError
from ..models import VisionModel
from ..types import TokenLayout
from ._adapter import AUTO, CROSS, IMAGE, INNER, POOL, TEXT, Site
from ._divided import DividedPlacer, DividedScheme
from ._windows import Stitch, WindowedLayer, scatter_visible

if TYPE_CHECKING:  # the setup is built by capture(); only its type is named here
    from ._capture import _Setup



@dataclass
class Pass:
    """What one forward pass of the root module produced."""

    input_hw: tuple[int, int] | None = None
    batch: int | None = None  # images in the input
    # (role, site, attention, layer index within the role) of the kept layers; a window layer's
    # attention is its windows (WindowedLayer) until it is read dense (records)
    entries: list[tuple[str, Site, torch.Tensor | WindowedLayer, int]] = field(default_factory=list)
    # with capture(grad=True), keyed by (role, layer): the layers whose tensor carried a
    # gradient hook, the gradients received so far (float32, shaped like the attention,
    # summed over backward calls), and the hooked graph tensors (only while the block runs)
    hooked: set[tuple[str, int]] = field(default_factory=set)
    grads: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    graph: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    # per role: layers seen in this pass (kept or not) and their key count N
    seen: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    # per role: the [L, B, H, Q, K] float32 stack that the layers were computed into, when the
    # probabilities were computed by vitviz and every layer is kept (no copy, no torch.stack)
    stacks: dict[str, torch.Tensor] = field(default_factory=dict)
    # (role, layer) -> (query layout, key layout or None when keys = queries) of image and pool
    # layers, each placed on its own token grid (stages of hierarchical models, windows)
    layouts: dict[tuple[str, int], tuple[TokenLayout | None, TokenLayout | None]] = field(
        default_factory=dict)
    # image layers that could not be placed on the image grid: (layer, why)
    unplaced: list[tuple[int, str]] = field(default_factory=list)
    # [B, V] grid indices of the patches a masked-image-modelling encoder sees (ViT-MAE), or None
    visible: torch.Tensor | None = None
    # [B, N] VideoMAE pre-training's decoder token order (the visible tubes, then the masked ones)
    order: torch.Tensor | None = None
    # frames of a video input ([B, T, C, H, W]), or None for images
    frames: int | None = None
    # the module calls of this pass inside which attention ops ran (the layers the pass ran), in order
    calls: list[_Call] = field(default_factory=list)
    # (role, layer) -> the token indices of the query rows kept (capture(rows=...)); absent: every row
    rows: dict[tuple[str, int], tuple[int, ...]] = field(default_factory=dict)

    @property
    def records(self) -> list[tuple[str, Site, torch.Tensor, int]]:
        """``(role, site, attention, layer index within the role)`` of the kept layers, in the
        order they ran; each attention ``[B, H, Q, K]`` on the image's token grid (window layers
        stitched now, and kept stitched)."""
        for k, (role, site, t, i) in enumerate(self.entries):
            if isinstance(t, WindowedLayer):
                self.entries[k] = (role, site, t.dense(), i)
        return list(self.entries)  # type: ignore[arg-type]

    def of(self, role: str) -> list[torch.Tensor]:
        """The kept layers of one role.

        Args:
            role: ``IMAGE``, ``TEXT``, ``CROSS`` or ``POOL``.

        Returns:
            Their attention tensors, in the order they ran.
        """
        return [t for r, _, t, _ in self.records if r == role]

    def layers(self, role: str) -> list[int]:
        """The indices of the kept layers of one role.

        Args:
            role: ``IMAGE``, ``TEXT``, ``CROSS`` or ``POOL``.

        Returns:
            Each kept layer's index among the layers of that role, in the order they ran.
        """
        return [i for r, _, _, i in self.entries if r == role]


# statuses of an attention op: read (kept, streamed or counted), left out on the user's request,
# or skipped with its reason (what it is, why it is not read)
RECORDED, REQUESTED, SKIPPED = "recorded", "requested", "skipped"


@dataclass(eq=False)
class _Op:
    """One attention op the mode saw: an SDPA call, a softmax over the last dimension of a 3-D or
    larger tensor, or an ``F.multi_head_attention_forward`` call. ``status`` None: not accounted
    for (yet)."""

    kind: str
    call: _Call | None
    status: str | None = None
    what: str = ""
    why: str = ""


@dataclass(eq=False)
class _Call:
    """A module call inside which attention ops ran: one attention layer of the pass."""

    name: str
    module: nn.Module = field(repr=False)
    ops: list[_Op] = field(default_factory=list)
    # 3-D attentions ([B, Q, K]) read in this call, recorded together at its end: several of
    # them in one call are the heads of one layer (EfficientViT-MSRA's cascaded group attention)
    pending: list = field(default_factory=list, repr=False)


# modules that wrap one function: an op inside them belongs to the module that called them
_LEAF_MODULES = (nn.Softmax, nn.Dropout, nn.Identity)
# torch.nn's own modules whose forward (not overridden) is one function on tensors: no attention
# op can run in them and they hold no modules, so their calls need no hooks (a module call with
# hooks takes torch's slow path; a ViT block has ~10 such calls)
_FUNCTION_FORWARDS = frozenset(c.forward for c in (
    nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
    nn.ConvTranspose3d, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.Embedding, nn.GELU, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid,
    nn.LeakyReLU, nn.ELU, nn.Softplus, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.MaxPool1d, nn.MaxPool2d, nn.Flatten, nn.Unflatten))


def needs_call_hooks(module: nn.Module) -> bool:
    """Whether a module's calls are tracked (pre- and post-hook): not for leaves that wrap one
    function (their ops belong to the module that called them) nor for TorchScript modules."""
    return not (isinstance(module, (_LEAF_MODULES, torch.jit.ScriptModule))
                or type(module).forward in _FUNCTION_FORWARDS)


def _input_hw(args: tuple, kwargs: dict) -> tuple[tuple[int, int] | None, int | None, int | None]:
    """Height and width, batch size and frames of the first image-like tensor ([B, C, H, W], or
    a video [B, T, C, H, W]) among a call's inputs."""
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() in (4, 5) and value.is_floating_point():
            frames = int(value.shape[1]) if value.dim() == 5 else None
            return (int(value.shape[-2]), int(value.shape[-1])), int(value.shape[0]), frames
    return None, None, None


def _video_frames(module: nn.Module) -> int | None:
    """The frames a video model's config states (VideoMAE, ViViT, TimeSformer: ``num_frames``)."""
    config = getattr(module, "config", None)
    frames = getattr(config, "num_frames", None) if config is not None else None
    return frames if isinstance(frames, int) and frames > 1 else None


def _num_heads(module: nn.Module) -> int | None:
    """The head count an attention module states, if any."""
    for name in ("num_heads", "num_attention_heads", "n_heads", "heads"):
        value = getattr(module, name, None)
        if isinstance(value, int) and value > 0:
            return value
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


def _rows_spec(rows):
    """``capture(rows=)`` checked: None, ``"cls"`` or a tuple of token indices."""
    if rows is None or rows == "cls":
        return rows
    if isinstance(rows, (str, bytes)) or not hasattr(rows, "__iter__"):
        raise CaptureError(f"rows must be 'cls' or a list of token indices, got {rows!r}")
    out = tuple(rows)
    if not out or not all(isinstance(r, int) and not isinstance(r, bool) for r in out):
        raise CaptureError(f"rows must be 'cls' or a non-empty list of int token indices, got {rows!r}")
    return out


def _selected(keep, index: int, num_layers: int) -> bool:
    """Whether layer ``index`` of ``num_layers`` (0: not known yet) is one that ``keep`` names."""
    if keep == "all":
        return True
    if keep == "none":
        return False
    return any(k == index or (k < 0 and (not num_layers or k % num_layers == index)) for k in keep)


def _folded(f, shape: tuple):
    """``f`` with its result reshaped to ``shape`` (batch dimensions folded into one)."""
    return lambda *args: f(*args).reshape(shape)


class _PlacedLater:
    """A divided layer's probabilities, placed on the clip when called (for a gradient stream,
    in the backward pass), or never: streams that read only ``fuse_h(A ⊙ dA)`` get the product
    placed from the per-sequence tensors (:meth:`DividedScheme.product`)."""

    def __init__(self, placer: DividedPlacer, attn: torch.Tensor):
        self.placer, self.attn = placer, attn.detach()

    def __call__(self) -> torch.Tensor:
        return self.placer(self.attn)


def _head_placer(i: int, heads: int, place):
    """The gradient of head ``i`` of ``heads`` (``[B, Q, K]``) as a gradient of the whole layer
    (``[B, heads, Q, K]``, zero elsewhere), then put on the grid by ``place``."""
    def placed(g: torch.Tensor) -> torch.Tensor:
        full = g.new_zeros(g.shape[0], heads, *g.shape[1:])
        full[:, i] = g
        return place(full) if place is not None else full
    return placed


class _Recorder:
    """The machinery that fills a :class:`Recording`: called by the op-level mode and by the
    root module's pre-hook. Internal; users read the :class:`Recording`."""

    def __init__(self, model: VisionModel, setup: _Setup, *, restricted: bool, grad: bool,
                 keep, streams: dict | None, rows=None):
        sites = setup.sites
        self.model = model
        self.sites = list(sites)
        self.restricted = restricted  # adapters= given: calls outside their sites are ignored
        self.grad = grad
        self.keep = _keep_spec(keep)
        self.rows = _rows_spec(rows)
        if self.rows is not None and grad:
            raise CaptureError("capture(rows=...) keeps some query rows without their gradients; "
                               "use grad=True without rows= (gradients need every row)")
        self.row_index: dict = {}  # (rows, device) -> index tensor, made once
        self.streams = dict(streams or {})
        self.forward_streams = [s for s in self.streams.values() if hasattr(s, "update")]
        self.grad_streams = [s for s in self.streams.values() if hasattr(s, "update_grad")]
        if self.grad_streams and not grad:
            raise CaptureError("streams with update_grad need capture(..., grad=True)")
        if grad and self.keep != "all" and not self.grad_streams:
            raise CaptureError("capture(grad=True) needs keep='all' (gradients are matched to kept "
                               "layers) or streams that take the gradients as they arrive")
        self.names, self.modules, self.windows = setup.names, setup.modules, setup.windows
        self.divided, self.decoders = setup.divided, setup.decoders
        # the model has a text side (its cross-attention may have more queries than keys)
        self.text_side = model.tokenizer is not None or any(s.role in (TEXT, CROSS) for s in sites)
        self.owner = dict(setup.owner)  # generic sites are added as their calls are seen
        self.num_layers = setup.num_layers
        self.passes: list[Pass] = []
        self.grad_handles: list = []  # RemovableHandles of the tensor hooks
        self.open = True
        # the module calls running now, innermost last: [module, its _Call once an attention op ran in it]
        self.call_stack: list[list] = []
        self.video_frames = _video_frames(model.module)  # a video model (config: num_frames)

    # -- accounting: every attention op the mode sees ------------------------------------
    def enter_call(self, module: nn.Module) -> None:
        """A module of the model is called (its forward pre-hook)."""
        self.call_stack.append([module, None])

    def leave_call(self, module: nn.Module) -> None:
        """A module call ends (its forward hook, also when the forward raised): record what was
        read in it together (:meth:`flush`)."""
        if not any(m is module for m, _ in self.call_stack):
            return  # called before the capture began
        while self.call_stack:
            m, call = self.call_stack.pop()
            if call is not None and call.pending:
                self.flush(call)
            if m is module:
                return

    def op(self, kind: str, module: nn.Module | None) -> _Op | None:
        """Count an attention op run by ``module`` inside the innermost module call running now;
        None when no module of the model is being called (the user's own code in the block).
        Ops of sites that are not attention over the image's tokens are skipped with the site's
        reason at once; with ``adapters=``, ops outside their sites are left out on request."""
        if not self.call_stack:
            return None
        entry = self.call_stack[-1]
        call = entry[1]
        if call is None:
            m = entry[0]
            call = entry[1] = _Call(self.names.get(id(m)) or type(m).__name__, m)
            self.current().calls.append(call)
        op = _Op(kind, call)
        call.ops.append(op)
        site = self.owner.get(id(module)) if module is not None else None
        if site is not None and site.role == INNER:
            self.resolve([op], SKIPPED, site.what or "attention", site.note)
        elif site is None and self.restricted:
            self.resolve([op], REQUESTED)
        return op

    @staticmethod
    def resolve(ops, status: str, what: str = "", why: str = "") -> None:
        """Account for ``ops`` (those not yet accounted for): ``status`` with ``what`` / ``why``."""
        for op in ops:
            if op is not None and op.status is None:
                op.status, op.what, op.why = status, what, why

    def unread(self, ops, module: nn.Module | None) -> None:
        """Ops that :meth:`site_for` did not give a site: skipped with an INNER site's reason, or
        left out on request when ``adapters=`` chose other modules."""
        site = self.owner.get(id(module)) if module is not None else None
        if site is not None and site.role == INNER:
            self.resolve(ops, SKIPPED, site.what or "attention", site.note)
        elif self.restricted:
            self.resolve(ops, REQUESTED)

    def record_consumed(self, site: Site, role: str, attn: torch.Tensor, ops) -> None:
        """Record a softmax output (or mixture of them) that multiplies values: 3-D ones at the
        end of their module call (several in one call are the heads of one layer), tensors with
        more than one batch dimension (``[B, windows, H, Q, K]``) with those folded."""
        if attn.dim() == 3:
            call = next((op.call for op in ops if op is not None and op.call is not None), None)
            if call is not None and any(m[1] is call for m in self.call_stack):
                call.pending.append((site, role, attn, tuple(ops)))
                return
        if attn.dim() > 4:
            self.record(site, role, attn.reshape(-1, *attn.shape[-3:]), graph=attn, ops=ops)
        else:
            self.record(site, role, attn, ops=ops)

    def flush(self, call: _Call) -> None:
        """Record the 3-D attentions read in ``call``: one layer, or one layer whose heads they
        are when there are several of one shape (EfficientViT-MSRA runs one attention per head)."""
        pending, call.pending = call.pending, []
        if len(pending) == 1:
            self.record(*pending[0][:3], ops=pending[0][3])
            return
        same = len({(id(site), role, tuple(a.shape)) for site, role, a, _ in pending}) == 1
        if not same:  # unrelated attentions in one call: each its own layer
            for site, role, a, ops in pending:
                self.record(site, role, a, ops=ops)
            return
        site, role = pending[0][:2]
        heads = [a for _, _, a, _ in pending]
        self.record(site, role, torch.stack(heads, dim=1), graph=heads,  # [B, H, Q, K]
                    ops=[op for *_, ops in pending for op in ops])

    def accounting(self, p: Pass) -> tuple[list[tuple[str, str, str]], list[str]]:
        """``(skipped, unaccounted)`` of pass ``p``: ``(module, what, why)`` of every layer seen
        and not read (one per reason), and the names of the layers neither read nor explained.

        A layer is a module call inside which attention ops ran: it is read when one of its ops
        was (recorded, or left out on request), skipped when none was and one was skipped with
        its reason, and unaccounted otherwise."""
        skipped: list[tuple[str, str, str]] = []
        unaccounted: list[str] = []
        for call in p.calls:
            statuses = {op.status for op in call.ops}
            if statuses & {RECORDED, REQUESTED}:
                continue
            if SKIPPED in statuses:
                skipped += dict.fromkeys((call.name, op.what, op.why) for op in call.ops if op.status == SKIPPED)
            else:
                unaccounted.append(call.name)
        return skipped, unaccounted

    # -- where a call belongs --------------------------------------------------------------
    def site_for(self, module: nn.Module | None, queries: int, keys: int,
                 same_tokens: bool | None = None) -> tuple[Site, str] | None:
        """The site and role of an attention call of ``queries`` over ``keys`` tokens run by
        ``module`` (``same_tokens``: whether queries and keys are known to be the same tokens;
        default: equal counts); None to ignore it."""
        if module is None:
            return None  # not run by the model (the user's own code inside the block)
        site = self.owner.get(id(module))
        if site is None:
            if self.restricted:
                return None
            site = Site(self.names.get(id(module), type(module).__name__) or "<root>", module, AUTO, None,
                        windows=self.windows.get(id(module)), divided=self.divided.get(id(module), ""))
            self.owner[id(module)] = site
            self.sites.append(site)
        role = site.role
        if role == INNER:
            return None  # not attention over the image's tokens (site.note says why)
        if role == AUTO:
            if same_tokens is not None:
                role = IMAGE if same_tokens else CROSS
            elif queries == keys or (queries > keys and not self.text_side):
                role = IMAGE  # more queries than keys in a model without text: reduced keys (HF PVT)
            else:
                role = CROSS
        elif role == IMAGE and queries < keys and not site.coarse_queries:
            role = POOL  # class token or latents pooling image tokens (CaiT, attention-pool heads)
        # IMAGE with more queries than keys: keys reduced to a coarser grid (PVT, Segformer); with
        # fewer at a site that pools its queries: queries on a coarser grid (LeViT, MViTv2)
        return site, role

    def current(self) -> Pass:
        if not self.passes:  # a submodule was called directly
            self.begin(None)
        return self.passes[-1]

    def begin(self, hw: tuple[int, int] | None, batch: int | None = None, frames: int | None = None) -> None:
        self.passes.append(Pass(input_hw=hw, batch=batch, frames=frames))
        for stream in self.streams.values():
            stream.reset()

    def needs(self, role: str, site: Site | None = None) -> bool:
        """Whether the next layer of ``role`` (run by ``site``) needs its probabilities in the
        forward pass (else the fused kernel runs)."""
        p = self.current()
        read = role == IMAGE and bool(self.readers(p.seen.get(role, 0)))
        if (self.grad_streams or read) and (
                (site is not None and (site.windows is not None or site.divided)) or p.visible is not None):
            return True  # placed on the grid from the probabilities (windows, divided, visible patches)
        if role == POOL:
            return self.keep == "all"
        return read or _selected(self.keep, p.seen.get(role, 0), self.num_layers.get(role, 0))

    def readers(self, index: int) -> list:
        """The forward streams that read image layer ``index``: those without a ``layers``
        attribute read every layer; ``layers`` names the others' layers as ``keep=`` does
        (negative indices count from the end; every layer is read while the depth is not known)."""
        n = self.num_layers.get(IMAGE, 0)
        return [s for s in self.forward_streams if _selected(getattr(s, "layers", "all"), index, n)]

    def fused_heads(self, role: str, query: torch.Tensor) -> str | None:
        """The head fusion (``"mean"``/``"max"``/``"min"``) that is all the next layer of
        ``role`` is needed for, or None: on the CPU, when every forward stream that reads the
        layer declares the same ``fused_heads`` and the layer is neither kept nor needed by a
        gradient."""
        if (role != IMAGE or not self.forward_streams or self.grad or query.device.type != "cpu"
                or query.dtype != torch.float32):
            return None
        p = self.current()
        fusions = {getattr(s, "fused_heads", None) for s in self.readers(p.seen.get(role, 0))}
        if len(fusions) != 1 or None in fusions:
            return None
        if _selected(self.keep, p.seen.get(role, 0), self.num_layers.get(role, 0)):
            return None
        return fusions.pop()

    def wants_gradient(self, role: str) -> bool:
        """Whether the gradient streams need this role's layers (with grad=True, image layers)."""
        return role == IMAGE and bool(self.grad_streams) and torch.is_grad_enabled()

    def record_from_output(self, site: Site, role: str, out: torch.Tensor, grad_of, recompute,
                           num_keys: int, num_queries: int | None = None, ops=(), backward=None) -> None:
        """Count a layer that ran the fused kernel and hook its output: ``grad_of(dOut)`` is the
        gradient with respect to the probabilities, ``recompute()`` the probabilities; or, with
        ``backward`` (a :class:`~._mode.FusedCall`), ``backward.read(dOut, ...)`` gives both
        from the one recomputation that also answers the call's own backward pass."""
        p = self.current()
        if out.dim() > 4:  # more than one batch dimension ([B, windows, H, L, dv]): folded
            shape = (-1, *out.shape[-3:-1], num_keys)
            grad_of, recompute = _folded(grad_of, shape), _folded(recompute, shape)
        batch = out.shape[:-3].numel() if out.dim() >= 4 else out.shape[0]
        queries = num_queries if num_queries is not None else num_keys
        try:
            scheme, layouts = self.place(p, site, role, (batch, 0, queries, num_keys))
        except LayoutError as e:
            _, index = self.next_layer(role)
            self._unplaced(p, role, index, e, ops)
            return
        p, index = self.next_layer(role, num_keys)
        p.layouts[(role, index)] = layouts
        self.resolve(ops, RECORDED)
        self.hook_grad(p, (role, index), out, recompute, store=False, grad_of=grad_of, backward=backward)

    def skip(self, role: str, ops=()) -> None:
        """Count a layer that ran on the fused kernel (nothing needs its probabilities: left out
        on request), so that the next ones get their index."""
        self.next_layer(role)
        self.resolve(ops, REQUESTED)

    def _unplaced(self, p: Pass, role: str, index: int, error: LayoutError, ops) -> None:
        """A layer that cannot be placed on the image: named in the error that ``rec.stages``
        raises (image layers; a pooling layer is only left out of ``rec.pool``) and skipped."""
        if role == IMAGE:
            p.unplaced.append((index, str(error)))
        what = {IMAGE: "image attention", POOL: "pooling attention"}.get(role, "attention")
        if p.frames is not None or self.video_frames is not None:
            what = "attention over video tokens"
        self.resolve(ops, SKIPPED, what, str(error))

    def next_layer(self, role: str, num_keys: int | None = None) -> tuple[Pass, int]:
        """Count the next layer of ``role`` (over ``num_keys`` tokens, when known): its pass and index."""
        p = self.current()
        index = p.seen.get(role, 0)
        p.seen[role] = index + 1
        if num_keys is not None:
            p.tokens[role] = int(num_keys)
        return p, index

    def resolve_rows(self, num_tokens: int) -> tuple[int, ...]:
        """The non-negative token indices of ``capture(rows=)`` in a sequence of ``num_tokens``."""
        if self.rows == "cls":
            if not self.model.layout.has_cls:
                raise CaptureError(f"{self.model.name} has no CLS token ({self.model.layout}): "
                                   "capture(rows='cls') has no row to keep; pass token indices, e.g. rows=[0]")
            return (0,)
        rows = tuple(r % num_tokens if -num_tokens <= r < num_tokens else r for r in self.rows)
        if any(not 0 <= r < num_tokens for r in rows) or len(set(rows)) != len(rows):
            raise CaptureError(f"capture(rows={list(self.rows)}): rows must be distinct token indices within "
                               f"the {num_tokens} tokens of {self.model.name}'s attention")
        return rows

    def rows_only(self, role: str, site: Site, queries: int, keys: int) -> tuple[int, ...] | None:
        """The rows to compute of the next layer of ``role`` when only those are needed (the
        layer is kept with ``rows=``, on the image grid as it is, nothing else reads it); else None."""
        if (self.rows is None or role != IMAGE or queries != keys or self.forward_streams or self.grad
                or site.windows is not None or site.divided or self.current().visible is not None):
            return None
        return self.resolve_rows(keys)

    def row_selector(self, rows: tuple[int, ...], device):
        """A slice (consecutive rows) or a cached index tensor on ``device`` that selects ``rows``."""
        if rows == tuple(range(rows[0], rows[0] + len(rows))):
            return slice(rows[0], rows[0] + len(rows))
        key = (rows, str(device))
        index = self.row_index.get(key)
        if index is None:
            index = self.row_index[key] = torch.tensor(rows, device=device)
        return index

    def buffer(self, role: str, shape: tuple, device) -> torch.Tensor | None:
        """Where the next layer of ``role`` may compute its probabilities ``shape`` (float32):
        its slice of the pass's ``[L, *shape]`` stack, allocated at the first layer, when every
        layer is kept, the depth is known and no gradient is read; else None."""
        n = self.num_layers.get(role, 0)
        p = self.current()
        if (self.keep != "all" or self.grad or role == POOL or not n or self.rows is not None
                or (p.batch is not None and shape[0] != p.batch)):
            return None
        index = p.seen.get(role, 0)
        stack = p.stacks.get(role)
        if index == 0 and stack is None:
            stack = p.stacks[role] = torch.empty((n, *shape), dtype=torch.float32, device=device)
        if stack is None or index >= n or tuple(stack.shape[1:]) != tuple(shape):
            return None
        return stack[index]

    def layout(self, p: Pass, num_tokens: int) -> TokenLayout:
        return self.model.layout_for(p.input_hw, num_tokens, frames=p.frames)

    def notes(self, p: Pass | None = None) -> list[str]:
        """Why attention of this model is not on the image: its INNER sites' notes and the
        layers of pass ``p`` that could not be placed."""
        out = list(dict.fromkeys(s.note for s in self.sites if s.role == INNER and s.note))
        if p is not None:
            out += list(dict.fromkeys(why for _, why in p.unplaced))
        return out

    def record(self, site: Site, role: str, attn: torch.Tensor, graph=None, ops=(), rows=None,
               queries: int | None = None) -> None:
        """Record one attention call.

        Args:
            site, role: where the call belongs (:meth:`site_for`).
            attn: ``[B, H, Q, K]`` (or ``[B, Q, K]``) post-softmax probabilities.
            graph: the tensor of the autograd graph whose gradient is the gradient with
                respect to ``attn`` (same number of elements, e.g. ``[B*H, Q, K]``), when
                ``attn`` itself is a view the model does not compute with; default ``attn``.
                A list: the heads of ``attn``, each ``[B, Q, K]``, computed separately by the
                model (EfficientViT-MSRA).
            ops: the mode's entries of the ops this layer was read from (accounted for here).
            rows: ``attn`` holds only the rows of these tokens (``[B, H, R, K]``, of ``queries``
                query tokens): a rows-only capture's layer, computed without its ``[Q, K]``.
        """
        p = self.current()
        if graph is None:
            graph = attn  # the tensor the model computes with (not the views made below)
        if attn.dim() == 3:
            heads = _num_heads(site.module)
            if heads and heads > 1 and p.batch and attn.shape[0] % (p.batch * heads) == 0:
                # heads folded into the batch, [(B * windows) * H, Q, K] (SAM)
                attn = attn.view(attn.shape[0] // heads, heads, *attn.shape[1:])
            else:
                attn = attn.unsqueeze(1)  # [B, 1, Q, K]
        placed, placer = attn, None
        if role in (IMAGE, POOL):
            try:
                shape = tuple(attn.shape) if rows is None else (*attn.shape[:-2], queries, attn.shape[-1])
                placer, layouts = self.place(p, site, role, shape)
            except LayoutError as e:  # counted, so that the other layers keep their indices
                _, index = self.next_layer(role)
                self._unplaced(p, role, index, e, ops)
                return
            if placer is not None and not isinstance(placer, (DividedPlacer, Stitch)):
                placed = placer(attn)  # [B, H, N, N] on the image's token grid
        # divided attention (a clip's [N, N] is mostly zeros) is placed only when it is read: at
        # once when kept or streamed forward, else in the backward pass of the layer
        deferred = isinstance(placer, DividedPlacer)
        windowed = isinstance(placer, Stitch)
        p, index = self.next_layer(role, layouts[0].num_tokens if deferred or windowed else placed.shape[-1])
        if role in (IMAGE, POOL):
            p.layouts[(role, index)] = layouts
        kept = _selected(self.keep, index, self.num_layers.get(role, 0)) if role != POOL else self.keep == "all"
        readers = self.readers(index) if role == IMAGE else []
        if windowed and kept and role == IMAGE and not (readers or self.grad or self.rows is not None):
            # a window layer that only is kept: its windows, a 1/nW of the block-sparse [N, N],
            # stitched when a dense map is read (Recording.stages gives WindowedAttentionMaps)
            placed = WindowedLayer(attn.detach().float(), placer.scheme)  # [B * nW, H, T, T]
        elif windowed:
            placed = placer(attn)  # [B, H, N, N] on the stage's grid
        if deferred and not kept and readers and not self.grad_streams and all(
                getattr(s, "fused_heads", None) == "mean" for s in readers):
            # streams that read only the mean over heads: placing is linear, so the mean of the
            # placed heads is the placed mean ([B, 1, N, N]: one [N, N] per clip instead of H)
            placed = placer(attn.mean(dim=1, keepdim=True))
        elif deferred and (kept or readers):
            placed = placer(attn)  # [B, H, N, N] on the clip's tokens
        elif deferred:
            placed = _PlacedLater(placer, attn)
        if readers:
            layout = self.stream_layout(p, index, layouts)
            for stream in readers:  # streaming analyses see the layers they read
                stream.update(placed.detach(), layer=index, num_layers=self.num_layers[IMAGE] or None,
                              layout=layout)  # [B, H, N, N]
        if kept and rows is None and self.rows is not None and role == IMAGE and layouts[1] is None:
            rows = self.resolve_rows(placed.shape[-1])  # rows= of a layer computed whole: keep those rows
            placed = placed[..., self.row_selector(rows, placed.device), :]  # [B, H, R, N]
        if kept:  # [B, H, Q, K]; detached float32 (no copy when already float32)
            p.entries.append((role, site, placed if isinstance(placed, WindowedLayer) else placed.detach().float(),
                              index))
            if rows is not None:
                p.rows[(role, index)] = rows
        streamed = role == IMAGE and bool(self.grad_streams)
        self.resolve(ops, RECORDED if kept or streamed or readers else REQUESTED)
        if self.grad and role != POOL and (kept or streamed):
            # the gradient placed on the grid as the gradient of the placed matrix (divided
            # attention scales its CLS row; elsewhere the same placement as the probabilities)
            grad_placer = getattr(placer, "grad", placer)
            if isinstance(graph, list):  # heads computed separately: a hook on each
                if streamed:
                    raise CaptureError(
                        f"{site.name} ({type(site.module).__name__}) computes each head's attention separately; "
                        "gradient streams need one tensor per layer: use vitviz.capture(..., grad=True) with "
                        "keep='all' and read rec.attention_grads")
                for i, head in enumerate(graph):
                    self.hook_grad(p, (role, index), head, placed, store=kept, shape=head.shape,
                                   place=_head_placer(i, len(graph), grad_placer))
            else:
                self.hook_grad(p, (role, index), graph, placed, store=kept, place=grad_placer, shape=attn.shape)
        # not kept: freed as soon as the model (and the backward pass) is done with it

    def place(self, p: Pass, site: Site, role: str, shape: tuple):
        """Where an image (or pool) layer's ``[B', H, Q, K]`` attention lies on the image.

        Returns:
            ``(placer, (query layout, key layout))``: ``placer(attn)`` puts the layer on the
            image's token grid (window attention stitched into ``[B, H, N, N]`` over its
            stage's grid; a masked encoder's visible patches scattered onto the full grid), or
            None when it is already there; the key layout is None when keys are the queries; a
            pool layer's query layout is None (its queries are a class token or latents).

        Raises:
            LayoutError: the layer's tokens cannot be placed on the image (windows or groups of
                a scheme vitviz does not know, tokens that tile no grid).
        """
        batch, queries, keys = shape[0], shape[-2], shape[-1]
        if site.divided and self.model.is_video:
            return self.place_divided(p, site, shape)
        if p.visible is not None and queries == keys:
            full = self.model.layout_at(p.input_hw, frames=p.frames)
            visible = p.visible
            if keys == full.num_prefix + visible.shape[1] and batch == visible.shape[0]:
                return (lambda a: scatter_visible(a, visible, full.num_prefix, full.num_patches)), (full, None)
            order = p.order
            if order is not None and keys == full.num_tokens:
                if id(site.module) not in self.decoders:
                    raise LayoutError(
                        f"{self.model.name}: {site.name} ({type(site.module).__name__}) attends over every tube of a "
                        "clip with masked tubes, outside VideoMAE's decoder: vitviz does not know their order")
                # VideoMAE's decoder: the visible tubes, then the masked ones (a permutation of the grid)
                return (lambda a: scatter_visible(a, order, full.num_prefix, full.num_patches)), (full, None)
        if self.model.is_video and p.frames is not None and batch == p.batch and queries == keys:
            # joint space-time attention (VideoMAE, ViViT): every token of the clip, in the model's order
            return None, (self.token_layout(p, keys), None)
        if self.video_frames is not None or p.frames is not None:
            what = (f"the tokens of a video ({self.video_frames or p.frames} frames)" if self.video_frames is not None
                    else f"the tokens of a 5-D input ({p.frames} frames or tiles)")
            raise LayoutError(
                f"{self.model.name}: {site.name} ({type(site.module).__name__}) attends over {what} in a way vitviz "
                "does not place (it reads joint space-time attention of VideoMAE and ViViT and TimeSformer's divided "
                "attention; this model's token order is not known), so no image or clip layout is guessed")
        windows = site.windows
        scheme = windows.scheme() if windows is not None else None
        if scheme is not None and (p.batch is None or batch == p.batch * scheme.num_windows):
            return Stitch(scheme), (TokenLayout(0, scheme.grid), None)
        if p.batch is not None and batch != p.batch:
            raise LayoutError(
                f"{site.name} ({type(site.module).__name__}) attends within {batch // max(p.batch, 1)} "
                f"windows or groups of tokens per image ({batch} sequences for {p.batch} images), which "
                "vitviz cannot place on the image grid for this model")
        key_layout = self.token_layout(p, keys)
        if role == POOL:
            return None, (None, key_layout)
        if queries == keys:
            return None, (key_layout, None)
        return None, (self.token_layout(p, queries), key_layout)

    def place_divided(self, p: Pass, site: Site, shape: tuple):
        """Where a divided space-time layer (TimeSformer's temporal or spatial attention) lies on
        the clip: ``(placer, (layout, None))`` (:mod:`._divided`).

        Raises:
            LayoutError: the input is not a clip, or the layer's sequences are not the clip's
                (``B*gh*gw`` sequences of ``T`` tokens, or ``B*T`` of ``1 + gh*gw``).
        """
        where = f"{self.model.name}: {site.name} ({type(site.module).__name__}, divided {site.divided} attention)"
        if p.frames is None or p.batch is None:
            raise LayoutError(f"{where} ran without a clip [B, T, C, H, W] as the model's input; call the model "
                              "itself with the clip inside the capture")
        layout = self.model.layout_at(p.input_hw, frames=p.frames)
        scheme = DividedScheme(site.divided, layout.grid, layout.frames)
        if layout.num_prefix != 1 or layout.num_suffix or layout.time_major or not scheme.fits(shape, p.batch):
            sequences, length = scheme.sequences(p.batch)
            raise LayoutError(
                f"{where} attends in {shape[0]} sequences of {shape[-2]}x{shape[-1]} tokens, not the {sequences} "
                f"sequences of {length} tokens of {p.batch} clip(s) of {layout}; vitviz does not place them")
        return DividedPlacer(scheme), (layout, None)

    def token_layout(self, p: Pass, num_tokens: int) -> TokenLayout:
        """The layout of ``num_tokens`` image tokens: the model's own layout for this input, else
        a stage of a hierarchical model (:meth:`VisionModel.stage_layout`)."""
        try:
            return self.model.layout_for(p.input_hw, num_tokens, frames=p.frames)
        except LayoutError:
            if self.model.is_video:
                raise
            return self.model.stage_layout(p.input_hw, num_tokens)

    def stream_layout(self, p: Pass, index: int, layouts, grad: bool = False) -> TokenLayout:
        """The layout a stream is given for image layer ``index`` (in the backward pass with
        ``grad``): streams chain the layers, so every layer must be over the same tokens, unless
        every stream reads each layer on its own grid (``per_layer_layouts``)."""
        query, key = layouts
        streams = self.grad_streams if grad else self.forward_streams
        if key is None and all(getattr(s, "per_layer_layouts", False) for s in streams):
            return query  # streams that read each layer on its own grid (one layer's map)
        first = next((v for (r, _), v in p.layouts.items() if r == IMAGE), None)  # the pass's first image layer
        if key is not None or (first is not None and first != layouts):
            raise CaptureError(
                f"{self.model.name} does not attend over one set of tokens in every layer (layer {index}: queries "
                f"{query.grid[0]}x{query.grid[1]}" + (f", keys {key.grid[0]}x{key.grid[1]}" if key else "")
                + (f", after {first[0].grid[0]}x{first[0].grid[1]} before" if first is not None else "")
                + "): rollout and relevance chain the "
                "layers over one set of tokens, so they exist only within a stage; per-layer maps on each "
                "stage's grid: `vitviz cls`, or in Python vitviz.rollout(stage) / vitviz.cls_maps(stage) for "
                "each stage of rec.stages (vitviz.capture(m) keeps every layer)")
        return query

    def grad_fusion(self, streams) -> tuple[str, bool] | None:
        """The ``(head_fusion, clamp_first)`` that every gradient stream declares it needs of a
        layer (``grad_fusion``: ``fuse_h`` of ``A ⊙ dA``, each head clamped at 0 first or not),
        or None when one of them needs the heads."""
        fusions = {getattr(s, "grad_fusion", None) for s in streams}
        if len(fusions) != 1 or None in fusions or not all(hasattr(s, "update_grad_fused") for s in streams):
            return None
        return fusions.pop()

    def hook_grad(self, p: Pass, key: tuple[str, int], tensor: torch.Tensor, attn, store: bool,
                  grad_of=None, place=None, shape=None, backward=None) -> None:
        """Put a tensor hook on ``tensor`` that receives ``d score / d attn`` of layer ``key``:
        stored in ``p.grads`` when ``store``, and given to the gradient streams (image layers).

        ``tensor`` is the attention (or what it is a view of) as the model computed it (of
        ``shape``, default ``attn.shape``; ``place`` maps its gradient onto ``attn``, e.g. window
        attention stitched on the grid), or, with ``grad_of``, the output of a fused call: then
        ``grad_of(gradient of tensor)`` is the gradient with respect to the attention and
        ``attn`` a function recomputing the attention; or, with ``backward`` (a fused call whose
        backward pass vitviz answers), ``backward.read(gradient of tensor)`` gives the streams
        the attention and its gradient, or only their head fusion where every stream declares
        one (:meth:`grad_fusion`), without a ``[B, H, N, N]`` tensor."""
        shape = shape if shape is not None else (None if grad_of is not None or backward is not None else attn.shape)
        if not tensor.requires_grad or (grad_of is None and backward is None and tensor.numel() != shape.numel()):
            return  # no graph (torch.no_grad, nothing requires grad): reported by attention_grads
        role, layer = key
        streams = self.grad_streams if role == IMAGE else []
        # the attention for the streams: an alias of what autograd keeps anyway (or the
        # function recomputing it), dropped (with the graph tensor) once the streams have it,
        # so that a layer's attention is freed as the backward pass leaves it instead of when
        # the block ends
        held = {"attn": attn if grad_of is not None or backward is not None or callable(attn)
                else attn.detach()} if streams else {}
        fusion = self.grad_fusion(streams) if backward is not None else None  # of a fused call's backward

        def on_grad(g: torch.Tensor) -> None:
            if backward is not None:
                if "attn" not in held:
                    raise CaptureError(
                        f"layer {layer} received a second gradient: gradient streams take one "
                        "backward pass per forward pass (to sum several, use keep='all' and "
                        "rec.attention_grads without streams)")
                held.pop("attn")
                layout = self.stream_layout(p, layer, p.layouts[key], grad=True)
                n = p.seen.get(role, 0)
                if fusion is not None:  # [B, N, N]: fuse_h(A ⊙ dA), the heads never stored
                    fused = backward.read(g.detach(), fusion=fusion)
                    for stream in streams:
                        stream.update_grad_fused(fused, layer=layer, num_layers=n, layout=layout)
                else:  # [B, H, N, N] each
                    value, grad = backward.read(g.detach(), keep=True)
                    for stream in streams:
                        stream.update_grad(value, grad, layer=layer, num_layers=n, layout=layout)
                p.graph.pop(key, None)
                return
            g = grad_of(g) if grad_of is not None else g.detach().reshape(shape)  # [B, (H,) Q, K]
            later = held.get("attn")
            divided_fusion = self.grad_fusion(streams) if isinstance(later, _PlacedLater) and not store else None
            if divided_fusion is not None:
                held.pop("attn")  # a divided layer read only as fuse_h(A ⊙ dA): [B, N, N], no [B, H, N, N]
                fused = later.placer.scheme.product(later.attn, g, divided_fusion)
                layout = self.stream_layout(p, layer, p.layouts[key], grad=True)
                for stream in streams:
                    stream.update_grad_fused(fused, layer=layer, num_layers=p.seen.get(role, 0), layout=layout)
                p.graph.pop(key, None)
                return
            if place is not None:
                g = place(g)  # [B, H, N, N] on the grid
            if g.dim() == 3:
                g = g.unsqueeze(1)  # [B, 1, Q, K]
            if streams:
                if "attn" not in held:
                    raise CaptureError(
                        f"layer {layer} received a second gradient: gradient streams take one "
                        "backward pass per forward pass (to sum several, use keep='all' and "
                        "rec.attention_grads without streams)")
                value = held.pop("attn")
                if callable(value):
                    value = value()  # recomputed from the call's q and k, or placed now
                if value.dim() == 3:
                    value = value.unsqueeze(1)
                layout = self.stream_layout(p, layer, p.layouts[key], grad=True)
                for stream in streams:
                    stream.update_grad(value, g, layer=layer, num_layers=p.seen.get(role, 0), layout=layout)
                if not store:
                    p.graph.pop(key, None)
            if store:
                prev = p.grads.get(key)
                g = g.to(torch.float32, copy=True)
                p.grads[key] = g if prev is None else prev + g  # summed over backward calls

        self.grad_handles.append(tensor.register_hook(on_grad))
        p.hooked.add(key)
        if key in p.graph:  # heads computed separately (EfficientViT-MSRA): every head's tensor
            prev = p.graph[key]
            p.graph[key] = (prev if isinstance(prev, list) else [prev]) + [tensor]
        else:
            p.graph[key] = tensor

    def close(self) -> None:
        """Remove every tensor hook and drop the graph tensors (on exit, also after an error)."""
        for h in self.grad_handles:
            h.remove()
        self.grad_handles.clear()
        for p in self.passes:
            p.graph.clear()
        self.open = False

    def kept(self, p: Pass, role: str) -> list[tuple[int, torch.Tensor | WindowedLayer]]:
        """``(layer, attention)`` of the layers of ``role`` that ``keep`` names, now that the
        pass has shown how many there are (window layers kept as windows are :class:`WindowedLayer`)."""
        n = p.seen.get(role, 0)
        return [(i, t) for r, _, t, i in p.entries if r == role and _selected(self.keep, i, n)]
