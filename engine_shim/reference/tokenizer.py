"""A deterministic toy tokenizer: one token per whitespace-separated word.

Words seen before map to stable ids (a hash of the word), and generated ids decode to
pronounceable pseudo-words, so prompts are text and prefix sharing works on text.
"""

from __future__ import annotations

import hashlib

_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def encode(text: str, vocab_size: int) -> list[int]:
    return [
        int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "little")
        % vocab_size
        for word in text.split()
    ]


def decode_token(token: int) -> str:
    n = len(_SYLLABLES)
    return _SYLLABLES[token % n] + _SYLLABLES[(token // n) % n]


def decode(tokens: list[int]) -> str:
    return " ".join(decode_token(t) for t in tokens)
