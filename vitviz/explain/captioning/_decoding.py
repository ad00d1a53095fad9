"""Decoding a caption once, with the model's own generate() or a plain greedy loop; which
tokens end it."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ...errors import CaptureError, VitvizError


def _hf_kind(module: nn.Module) -> str | None:
    """``"encoder-decoder"`` (VisionEncoderDecoderModel and other encoder-decoders), ``"blip"``."""
    if "transformers.modeling_utils" not in sys.modules:
        return None
    from transformers.modeling_utils import PreTrainedModel

    if not isinstance(module, PreTrainedModel):
        return None
    if type(module).__name__ == "BlipForConditionalGeneration":
        return "blip"
    if getattr(module.config, "is_encoder_decoder", False):
        return "encoder-decoder"
    return None


def decodes_without_help(module: nn.Module) -> bool:
    """Whether :func:`vitviz.caption` decodes ``module`` without the Python-only ``decode=`` /
    ``start_ids=`` options: a transformers encoder-decoder or BLIP captioner, or a module with
    ``generate()``.

    Args:
        module: the captioning model's ``torch.nn.Module``.

    Returns:
        True when the command line can caption with this model as it is.
    """
    return _hf_kind(module) is not None or callable(getattr(module, "generate", None))


def _as_list(x) -> list[int]:
    if x is None:
        return []
    if isinstance(x, (list, tuple, set)):
        return [int(v) for v in x if v is not None]
    return [int(x)]


def _hf_end_ids(module: nn.Module, kind: str) -> list[int]:
    gen = getattr(module, "generation_config", None)
    ids = _as_list(getattr(gen, "eos_token_id", None))
    if kind == "blip":  # BLIP's generate stops at the [SEP] token
        ids += _as_list(getattr(module.config.text_config, "sep_token_id", None))
    return ids


def _sequences(out) -> torch.Tensor:
    seq = getattr(out, "sequences", out)
    if isinstance(seq, (tuple, list)):
        seq = seq[0]
    if not isinstance(seq, torch.Tensor) or seq.dim() not in (1, 2):
        raise CaptureError(f"the decoding function must return token ids [1, S], got {type(out).__name__}")
    return seq if seq.dim() == 2 else seq.unsqueeze(0)  # [1, S]


def _logits(out: Any) -> torch.Tensor:
    from ...models import output_logits

    logits = output_logits(out)
    if logits is None or logits.dim() != 3:
        raise CaptureError(
            "the model's forward(pixel_values, ids) must return logits [B, S, V] (or an output with "
            f".logits) for the built-in greedy decoding, got {type(out).__name__}; pass decode=")
    return logits  # [B, S, V]


def greedy_decode(forward: Callable[[torch.Tensor, torch.Tensor], Any], pixel_values: torch.Tensor, *,
                  start_ids: Sequence[int], end_ids: Sequence[int] = (), max_new_tokens: int = 20
                  ) -> torch.Tensor:
    """Plain greedy decoding: feed the sequence, append the arg-max of the last position.

    No cache (each step re-runs the decoder over the whole prefix): simple and exact, made
    for small captioners built from ``nn.TransformerDecoder`` (CATR-style).

    Args:
        forward: ``forward(pixel_values, ids [1, S]) -> logits [1, S, V]``.
        pixel_values: ``[1, 3, H, W]``.
        start_ids: the given tokens (the start token, and a prompt).
        end_ids: tokens that end the caption (kept in the output).
        max_new_tokens: most tokens to add.

    Returns:
        ``[1, S]`` ids: the given tokens, then the predicted ones.
    """
    ids = torch.tensor([list(start_ids)], dtype=torch.long, device=pixel_values.device)  # [1, P]
    end = set(int(e) for e in end_ids)
    for _ in range(max_new_tokens):
        nxt = _logits(forward(pixel_values, ids))[:, -1].argmax(dim=-1, keepdim=True)  # [1, 1]
        ids = torch.cat([ids, nxt], dim=1)  # [1, S + 1]
        if int(nxt) in end:
            break
    return ids


def _tokenizer_end_ids(tok) -> list[int]:
    if tok is None:
        return []
    return _as_list(getattr(tok, "eos_token_id", None)) + _as_list(getattr(tok, "sep_token_id", None))


def decode_once(vm: Any, x: torch.Tensor, kind: str | None, *, max_new_tokens: int, num_beams: int,
                tokenizer: Any, decode: Any, forward: Any, start_ids: Sequence[int] | None,
                end_ids: Sequence[int] | None, generate_kwargs: dict[str, Any]) -> tuple[torch.Tensor, int, list[int]]:
    """Generate once, nothing hooked (the fast attention paths run).

    Returns:
        ``(ids [1, S], number of given tokens, end token ids)``.
    """
    module = vm.module
    tok = tokenizer
    with torch.no_grad():
        if kind is not None:
            kw = dict(max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
            kw.update(generate_kwargs)
            seq = _sequences(module.generate(pixel_values=x, **kw))
            given = 1  # the decoder start token (encoder-decoder) or [BOS] (BLIP)
            ends = _hf_end_ids(module, kind)
        else:
            call = forward or (lambda mod, px, ids: mod(px, ids))
            given = 1
            if decode is not None:
                seq = _sequences(decode(module, x, max_new_tokens=max_new_tokens))
            elif callable(getattr(module, "generate", None)):
                extra = dict(generate_kwargs)
                if num_beams != 1:
                    extra["num_beams"] = num_beams
                seq = _sequences(module.generate(x, max_new_tokens=max_new_tokens, **extra))
            elif start_ids is not None:
                if num_beams != 1:
                    raise VitvizError("beam search needs the model's own generate() or decode=; the "
                                      "built-in decoding is greedy (num_beams=1)")
                seq = greedy_decode(lambda px, ids: call(module, px, ids), x, start_ids=start_ids,
                                    end_ids=end_ids if end_ids is not None else _tokenizer_end_ids(tok),
                                    max_new_tokens=max_new_tokens)
                given = len(start_ids)
            else:
                raise VitvizError(
                    f"{vm.name} is not a captioner vitviz knows how to decode: it is neither a "
                    "transformers VisionEncoderDecoderModel / BLIP captioner nor has a generate() "
                    "method; pass decode=fn(module, pixel_values, max_new_tokens=N) or "
                    "start_ids=[bos_id] (and forward=fn(module, pixel_values, ids) if the model is "
                    "not called as module(pixel_values, ids))")
            ends = _tokenizer_end_ids(tok)
    if end_ids is not None:
        ends = list(end_ids)
    return seq, given, ends
