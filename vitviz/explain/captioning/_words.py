"""Words of a caption: sub-word pieces merged for display, punctuation kept apart."""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

_PUNCT = set(string.punctuation) | {"…", "“", "”", "‘", "’", "«", "»"}


@dataclass(frozen=True)
class Word:
    """A displayed word: the tokens ``start <= t < stop`` of a caption, and its text."""

    text: str
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


def _is_punct(text: str) -> bool:
    s = text.strip()
    return bool(s) and all(c in _PUNCT for c in s)


def split_words(token_ids: Sequence[int], tokenizer: Any = None) -> tuple[list[str], list[Word]]:
    """The display pieces of the tokens, and the words they form.

    The rule, the same for every tokenizer (GPT-2's byte-level BPE, BERT's WordPiece,
    SentencePiece): decode the first ``i + 1`` tokens for every ``i``; token ``i`` starts a new
    word when the text it adds begins with white space, and continues the previous word
    otherwise (``"run" + "##ning"``, ``"piz" + "za"``). Pieces that are punctuation only
    (``"."``, ``","``) are words of their own, and so is the piece after one, so that the
    end-of-sentence period gets its own panel. A piece whose text cannot be decoded on its own
    (part of a multi-byte character) continues the previous word.

    Without a tokenizer each token is its own word, shown as its id.

    Args:
        token_ids: the predicted token ids.
        tokenizer: a transformers tokenizer (``decode``, ``convert_ids_to_tokens``) or None.

    Returns:
        ``(pieces, words)``: one string per token, and the :class:`Word` s.
    """
    ids = [int(i) for i in token_ids]
    if tokenizer is None:
        pieces = [str(i) for i in ids]
        return pieces, [Word(p, i, i + 1) for i, p in enumerate(pieces)]
    pieces = [str(p) for p in tokenizer.convert_ids_to_tokens(ids)]

    def dec(part: list[int]) -> str:
        return tokenizer.decode(part, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    starts: list[int] = []
    prev_text, prev_punct = "", False
    for i in range(len(ids)):
        text = dec(ids[:i + 1])
        added = text[len(prev_text):] if text.startswith(prev_text) else None
        if i == 0:
            new = True
        elif added is None or "\ufffd" in added:  # a partial multi-byte character
            new = False
        else:
            new = added[:1].isspace() or _is_punct(added) or prev_punct
        if new:
            starts.append(i)
        prev_punct = added is not None and _is_punct(added)
        prev_text = text
    bounds = starts + [len(ids)]
    words = [Word(dec(ids[a:b]).strip(), a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    return pieces, words
