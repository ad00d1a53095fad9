"""The read-only result of a capture: :class:`Recording` (``rec.attentions``, ``rec.stages``,
``rec.cross``, ``rec.pool``, ``rec.skipped``, ``rec.complete``, streams and gradients), a view
over what the internal recorder (``_recorder.py``) wrote during the ``with`` block.
"""

from __future__ import annotations

import torch

from ..errors import CaptureError, UnplacedAttentionError
from ..models import VisionModel
from ..types import AttentionMaps, CrossAttentionMaps
from ._adapter import CROSS, IMAGE, POOL, TEXT, Site
from ._recorder import Pass, _Recorder, _stack
from ._windows import WindowedAttentionMaps, WindowedLayer


class Recording:
    """What :func:`capture` read: a read-only view, filled while the ``with`` block runs.

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
        sites: the modules whose attention calls were recorded or are known to the adapters.
        skipped: ``(module, what, why)`` of every attention layer not read, with its reason.
        complete: whether every attention layer was recorded, left out on request or skipped.
        unaccounted: the modules of attention layers neither read nor explained.
    """

    def __init__(self, recorder: _Recorder):
        self._rec = recorder

    @property
    def model(self) -> VisionModel:
        return self._rec.model

    @property
    def sites(self) -> list[Site]:
        return list(self._rec.sites)

    @property
    def passes(self) -> list[Pass]:
        return list(self._rec.passes)

    @property
    def grad(self) -> bool:
        return self._rec.grad

    @property
    def keep(self):
        return self._rec.keep

    def _last_with(self, role: str) -> Pass | None:
        """The last pass that kept ``role`` attention; an error if it ran but was not kept."""
        for p in reversed(self._rec.passes):
            if self._rec.kept(p, role):
                return p
        ran = [p for p in self._rec.passes if p.seen.get(role)]
        if ran:
            self._refuse(ran[-1], f"{role} attention")  # layers that could not be placed: why
            raise CaptureError(
                f"{role} attention ran but no layer of it was kept (keep={self.keep!r}); use "
                "capture(..., keep='all') or read the streams with rec.stream(name)")
        return None

    def _stacked(self, p: Pass, role: str, what: str) -> torch.Tensor:
        """``[L, B, H, Q, K]`` of the kept layers: the stack they were computed into, or a copy."""
        tensors = [t for _, t in self._rec.kept(p, role)]
        stack = p.stacks.get(role)
        if (stack is not None and len(tensors) == stack.shape[0]
                and all(t.shape == stack.shape[1:] and t.data_ptr() == stack[i].data_ptr()
                        for i, t in enumerate(tensors))):
            return stack
        return _stack(tensors, what)

    def _stages(self, p: Pass) -> list[AttentionMaps]:
        """The kept image layers of pass ``p``, grouped by their tokens, in order of appearance."""
        groups: dict = {}
        for i, t in self._rec.kept(p, IMAGE):  # a stage: one token grid (queries, keys) and head count
            groups.setdefault((*p.layouts[(IMAGE, i)], t.shape[1], p.rows.get((IMAGE, i))), []).append((i, t))
        stages: list[AttentionMaps] = []
        for (query, key, _, rows), layers in groups.items():
            if any(isinstance(t, WindowedLayer) for _, t in layers):  # window layers kept as windows
                stages.append(WindowedAttentionMaps([t for _, t in layers], query, layers=tuple(i for i, _ in layers)))
                continue
            if len(groups) == 1:  # every kept layer: the stack they were computed into, where they were
                tensor = self._stacked(p, IMAGE, "image self-attention")
            else:
                tensor = _stack([t for _, t in layers], "image self-attention")
            stages.append(AttentionMaps(tensor, query, key, layers=tuple(i for i, _ in layers), rows=rows))
        return stages

    def _refuse(self, p: Pass | None, what: str) -> None:
        """A :class:`CaptureError` when image layers ran that could not be placed (or the model's
        attention is not over its tokens): ``what`` is then incomplete."""
        notes = self._rec.notes(p)
        unplaced = p.unplaced if p is not None else []
        if unplaced:
            raise UnplacedAttentionError(
                f"{len(unplaced)} image attention layer(s) of {self.model.name} could not be placed on the image "
                f"grid, so {what} would be incomplete: " + "; ".join(notes))
        # attention beside the image's (TNT's inner, DaViT's channel attention) is in rec.skipped;
        # it makes the result incomplete only when no image layer was placed at all (kept or streamed)
        placed = p is not None and any(r == IMAGE for r, _ in p.layouts)  # kept or streamed: placed first
        if notes and not placed:
            raise CaptureError(f"{self.model.name} has no attention over its image tokens, so {what} would be "
                               "incomplete: " + "; ".join(notes))

    def _last_pass_with_attention(self) -> Pass | None:
        return next((q for q in reversed(self._rec.passes) if q.calls), None)

    @property
    def skipped(self) -> list[tuple[str, str, str]]:
        """``(module, what, why)`` of every attention layer of the last pass that ran attention
        and that vitviz did not read, with its reason, e.g. ``("blocks.0.attn", "channel
        attention", "DaViT's channel attention is a softmax over feature channels, not tokens")``:
        attention that is not over the image's tokens, layers that cannot be placed on the
        image, weights that are not probabilities. (Every pass: ``rec.passes[i]`` via
        :meth:`accounting`.) A layer is a module call inside which attention ops ran."""
        p = self._last_pass_with_attention()
        return [] if p is None else self._rec.accounting(p)[0]

    @property
    def unaccounted(self) -> list[str]:
        """The module names of the attention layers of the last pass that ran attention which
        vitviz neither read nor left out on request nor can explain (not in :attr:`skipped`)."""
        p = self._last_pass_with_attention()
        return [] if p is None else self._rec.accounting(p)[1]

    def accounting(self, p: Pass) -> tuple[list[tuple[str, str, str]], list[str]]:
        """What one forward pass left unread, and why (see :attr:`skipped`).

        Args:
            p: one of :attr:`passes`.

        Returns:
            ``(skipped, unaccounted)``: ``(module, what, why)`` of every layer seen and not read,
            and the names of the layers neither read nor explained.
        """

        return self._rec.accounting(p)

    @property
    def complete(self) -> bool:
        """True when every attention layer of every pass in the block was recorded, left out on
        request (``keep=``, streams, the fused kernel of a layer nothing needs, ``adapters=``),
        or is in :attr:`skipped` with its reason. False: some attention ran that vitviz could
        not read and cannot explain (:attr:`unaccounted`; the capture warned)."""
        return not any(self._rec.accounting(p)[1] for p in self._rec.passes)

    @property
    def stages(self) -> list[AttentionMaps]:
        """The image self-attention of the last pass that ran it, one :class:`AttentionMaps` per
        stage: the layers that attend over the same tokens with the same number of heads (a stage
        of PiT, LeViT, Swin or PVT, a branch of CrossViT; CoAtNet's layers on one grid with two
        head counts are two stages), each with its own layout, ``key_layout`` (keys reduced to a
        coarser grid) and ``layers`` (their indices among all image layers). Window attention
        (Swin) is kept as its windows and stitched into ``[N, N]`` over its stage's grid when the
        stage's ``tensor`` is first read (CLS-row and query maps read the windows). A plain ViT has one stage,
        equal to :attr:`attentions`. Empty when no image attention ran."""
        p = self._last_with(IMAGE)
        self._refuse(p, "rec.stages")
        return [] if p is None else self._stages(p)

    @property
    def attentions(self) -> AttentionMaps | None:
        p = self._last_with(IMAGE)
        self._refuse(p, "rec.attentions")
        if p is None:
            return None
        stages = self._stages(p)
        if len(stages) > 1:
            grids = ", ".join(f"layers {s.layers[0]}-{s.layers[-1]}: {s.layout.grid[0]}x{s.layout.grid[1]}"
                              + (f" over keys {s.keys.grid[0]}x{s.keys.grid[1]}" if not s.square else "")
                              + f" ({s.num_heads} heads)" for s in stages)
            raise CaptureError(
                f"{self.model.name} attends over {len(stages)} token grids or head counts ({grids}); "
                "rec.attentions holds one grid: read rec.stages, one AttentionMaps per stage (maps per layer "
                "on that layer's grid; rollout within a stage)")
        s = stages[0]
        if isinstance(s, WindowedAttentionMaps):
            return WindowedAttentionMaps(s.parts, s.layout)
        return AttentionMaps(s.tensor, s.layout, s.key_layout, rows=s.rows)

    @property
    def pool(self) -> CrossAttentionMaps | None:
        """Attention of the few queries that pool the image tokens (CaiT/XCiT class attention, the
        latent of an attention-pool head as in SigLIP, CrossViT's cross-branch class token), in
        the last pass that ran it: ``[L, B, H, Q, N]`` over the keys' layout, or None.
        :func:`vitviz.word_grids` style maps: ``pool.tensor[..., pool.layout.num_prefix:]``."""
        p = next((q for q in reversed(self._rec.passes) if self._rec.kept(q, POOL)), None)
        if p is None:
            return None
        layers = self._rec.kept(p, POOL)
        keys = {p.layouts[(POOL, i)][1] for i, _ in layers}
        shapes = {tuple(t.shape) for _, t in layers}
        if len(keys) != 1 or len(shapes) != 1:
            raise CaptureError(f"{self.model.name}: its pooling layers attend over {len(keys) or len(shapes)} "
                               f"different token sets {sorted(shapes)} (e.g. CrossViT's two branches); rec.pool "
                               "holds one: read rec.passes[-1].records")
        return CrossAttentionMaps(torch.stack([t for _, t in layers]), keys.pop())

    @property
    def cross(self) -> CrossAttentionMaps | None:
        p = self._last_with(CROSS)
        if p is None:
            return None
        tensor = self._stacked(p, CROSS, "cross-attention")  # [L, B, H, T, Ni]
        return CrossAttentionMaps(tensor, self._rec.layout(p, tensor.shape[-1]))

    @property
    def text(self) -> torch.Tensor | None:
        p = self._last_with(TEXT)
        return None if p is None else self._stacked(p, TEXT, "text self-attention")

    def stream(self, name: str) -> torch.Tensor:
        """The result of a streaming analysis for the last pass with image attention.

        Args:
            name: the stream's key in ``capture(..., streams=)``.

        Returns:
            What the stream's ``result(layout)`` returns (``[B, gh, gw]`` for rollout and relevance).

        Raises:
            CaptureError: no such stream, no image self-attention ran, or its layers could not be
                placed on the image grid.

        Example:
            >>> with vitviz.capture(m, keep="none", streams={"rollout": RolloutStream()}) as rec:
            ...     m(x)
            >>> rec.stream("rollout").shape  # [B, gh, gw]
        """
        streams = self._rec.streams
        if name not in streams:
            raise CaptureError(f"no stream {name!r}; streams: {', '.join(streams) or 'none'}")
        p = next((q for q in reversed(self._rec.passes) if q.tokens.get(IMAGE)), None)
        if p is None:
            self._refuse(next((q for q in reversed(self._rec.passes) if q.unplaced), None), "the stream")
            raise CaptureError("no image self-attention ran inside the capture block")
        self._refuse(p, "the stream")
        last = max(i for r, i in p.layouts if r == IMAGE)
        return streams[name].result(p.layouts[(IMAGE, last)][0])

    def grad_inputs(self, role: str = IMAGE) -> list[torch.Tensor]:
        """The hooked graph tensors of the last pass with ``role`` attention, in layer order.

        Pass them as ``inputs`` to ``torch.autograd.grad`` (or ``backward(inputs=...)``) to
        compute only the gradients the capture needs: parameter gradients are then neither
        computed nor accumulated into ``.grad``. Only inside the ``with`` block.

        Args:
            role: the attention whose tensors to return (default: image self-attention).

        Returns:
            Tensors of the autograd graph (the attention tensors, or what they are views of).

        Raises:
            CaptureError: the capture has no ``grad=True``, the block has ended, or no attention of
                ``role`` ran.
        """
        if not self.grad:
            raise CaptureError("gradients are not recorded: use vitviz.capture(model, grad=True)")
        if not self._rec.open:
            raise CaptureError("grad_inputs() is only available inside the `with vitviz.capture(...)` "
                               "block: compute the gradients there")
        p = next((q for q in reversed(self._rec.passes) if q.seen.get(role)), None)  # last pass with it
        if p is None:
            return []
        out: list[torch.Tensor] = []
        for k in sorted(p.graph):
            if k[0] == role:
                tensors = p.graph[k]
                out += tensors if isinstance(tensors, list) else [tensors]
        return out

    def _grads_of(self, role: str, what: str) -> torch.Tensor | None:
        """``[L, B, H, Q, K]`` gradients of the last pass with ``role`` attention, or None."""
        if not self.grad:
            raise CaptureError(
                "gradients were not recorded: use `with vitviz.capture(model, grad=True) as rec:` and "
                "backpropagate a score inside the block")
        p = self._last_with(role)
        if p is None:
            return None
        layers = self._rec.kept(p, role)
        idx = [(role, i) for i, _ in layers]
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
        tensors = [p.grads[i] if i in p.grads else torch.zeros_like(t) for i, (_, t) in zip(idx, layers)]
        return _stack(tensors, f"{what} gradient")  # [L, B, H, Q, K]

    @property
    def attention_grads(self) -> AttentionMaps | None:
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
        maps = self.attentions  # one grid, or the error that says why not
        tensor = self._grads_of(IMAGE, "image self-attention")
        if tensor is None or maps is None:
            return None
        return AttentionMaps(tensor, maps.layout, maps.key_layout)

    def __repr__(self) -> str:
        counts = [len(p.records) for p in self._rec.passes]
        return f"Recording(sites={len(self._rec.sites)}, passes={len(self._rec.passes)}, records={counts})"
