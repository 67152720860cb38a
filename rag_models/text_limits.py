"""Cut absurdly long passages before tokenization: the tokenizer would read all of a 20-million-character line.

A passage of a file whose line structure was lost can hold a whole corpus. Tokenizing it whole costs time
and memory in proportion to its length, only for truncation to keep its first ``max_length`` tokens. No
tokenizer in use makes a token of fewer than one character, so the first ``max_length * CHARS_PER_TOKEN``
characters always hold more than ``max_length`` tokens: cutting there first changes nothing for a text of
normal whitespace, and bounds the work. The readers (index/passage_files.py) warn about such lines by number.
"""
from __future__ import annotations

CHARS_PER_TOKEN = 20  # characters kept per token of the limit; 100-word passages are ~600 characters in all


def clip_for_tokens(text: str, max_tokens: int) -> str:
    """``text`` cut to ``max_tokens * CHARS_PER_TOKEN`` characters (unchanged when shorter)."""
    limit = max(1, max_tokens) * CHARS_PER_TOKEN
    return text if len(text) <= limit else text[:limit]


def clip_all(texts: list[str], max_tokens: int) -> list[str]:
    """`clip_for_tokens` of every text."""
    return [clip_for_tokens(text, max_tokens) for text in texts]
