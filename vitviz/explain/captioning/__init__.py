"""`vitviz.caption`: generate a caption and read which image tokens each word looked at.

How it works, and why it is exact:

1. **Generate once**, with the model's own decoding (greedy or beam search; transformers'
   ``generate`` for ``VisionEncoderDecoderModel`` and BLIP, the model's ``generate`` or a
   ``decode=`` function for other models, or a built-in greedy loop). Nothing is hooked: the
   fast attention paths run.
2. **One teacher-forced forward** over the final sequence (for beam search: the chosen
   hypothesis) inside :func:`vitviz.capture`, which reads the cross-attention of every
   decoder layer for all positions at once.

A decoder is causal, so the query at position ``p`` of the teacher-forced input sees exactly
the tokens it saw when it was the last position during generation: its cross-attention
equals generation's step-by-step attention (tested against
``generate(output_attentions=True)``, beams included, within 1e-5).

The off-by-one: the generated sequence is ``[s_0 … s_{P-1}, w_0 … w_{T-1}, (eos)]`` where
the ``P`` given tokens are the start token (and a prompt). Word ``w_t`` is *predicted* by
the query at position ``P - 1 + t`` (the query reading ``s_{P-1}`` predicts ``w_0``). So
``Caption.cross`` row ``t`` is teacher-forced row ``P - 1 + t``: what the model looked at
while choosing word ``t``. The end token is not a word and has no row.

Decoder-only vision-language models (LLaVA-1.5 / NeXT, PaliGemma, Qwen2-VL, Idefics3, BLIP-2, ...) have no
cross-attention:
their row ``t`` is the language model's self-attention from the same position, over the
image-token positions, read rows-only at the op (``_vlm.py``, ``_vlm_rows.py``).
"""

from ._caption import Caption, caption
from ._decoding import decodes_without_help, greedy_decode
from ._vlm import ImageGrid, load_processor, vlm_family
from ._words import Word, split_words

__all__ = ["caption", "Caption", "Word", "split_words", "greedy_decode", "decodes_without_help", "ImageGrid",
           "vlm_family", "load_processor"]
