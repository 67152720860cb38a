"""Does a passage hold an answer? DPR's answer check, the one test behind every retrieval recall here.

rag-eval's ``answer_rank`` and ``recall@k``, training's ``val/recall@k`` and DPR
pre-training's ``val/recall@k`` all call :func:`answer_in_text` (through
:func:`first_answer_rank`), so that one passage is counted alike everywhere.

String mode, as DPR's ``has_answer`` (its ``SimpleTokenizer``): Unicode NFD, lower
case, then tokens = maximal runs of letters, digits and combining marks, plus every
other character that is neither a separator nor a control character, each on its
own. The answer is found when its token list is a contiguous run of the text's.
So "Selk" is in "the Selk-river." (selk - river .) but "US" is not in "the U.S.
army" (u . s .), and "beyonce" is not "Beyoncé" (the accent's mark stays in the token).

Regex mode (CuratedTrec): each answer is a pattern searched anywhere in the text,
case-insensitively.

This is not the answer normalization of exact match / F1 (metrics.py), which drops
punctuation and articles from a *prediction*: the two differ on purpose, as in DPR.
"""
from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from functools import lru_cache

import regex

from rag_models.errors import InputError

# DPR's CuratedTrec scoring compiles the reference patterns with these flags.
_REGEX_FLAGS = re.IGNORECASE | re.UNICODE | re.MULTILINE


@lru_cache(maxsize=4096)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    """Compile one CuratedTrec reference pattern (case-insensitive); InputError if it is not a regex."""
    try:
        return re.compile(pattern, flags=_REGEX_FLAGS)
    except re.error as err:
        raise InputError(f"reference pattern {pattern!r} is not a valid regular expression ({err})",
                         setting="regex", fix="Fix the pattern, or score without --regex") from None


@lru_cache(maxsize=1)
def _token_pattern() -> regex.Pattern[str]:
    """DPR's own pattern, ``[\\p{L}\\p{N}\\p{M}]+|[^\\p{Z}\\p{C}]``, compiled with the ``regex`` module as DPR does.

    Python's re has no \\p{..}: building the classes from unicodedata took a scan of every code point
    (seconds of rag-eval's start-up, before its first record).
    """
    return regex.compile(r"[\p{L}\p{N}\p{M}]+|[^\p{Z}\p{C}]", flags=regex.UNICODE)


def answer_tokens(text: str) -> list[str]:
    """DPR's tokens of ``text``: NFD, lower case, runs of letters/digits/marks and single other characters."""
    return _token_pattern().findall(unicodedata.normalize("NFD", text).lower())


def _contains_run(haystack: list[str], needle: list[str]) -> bool:
    """True when ``needle`` occurs as a contiguous run of whole tokens in ``haystack``."""
    width = len(needle)
    if width == 0:
        # DPR would find an empty answer everywhere; an empty reference is a data slip, never evidence.
        return False
    first = needle[0]
    return any(haystack[i] == first and haystack[i:i + width] == needle
               for i in range(len(haystack) - width + 1))


def answer_in_text(answers: Sequence[str], text: str, *, regex: bool = False) -> bool:
    """True when ``text`` holds any of ``answers``: as a run of DPR tokens, or (regex) as a pattern found in it."""
    if regex:
        return any(compile_pattern(pattern).search(text) is not None for pattern in answers)
    text_tokens = answer_tokens(text)
    return any(_contains_run(text_tokens, answer_tokens(answer)) for answer in answers)


def _normalized_with_origin(text: str) -> tuple[str, list[int]]:
    """``text`` as `answer_tokens` normalizes it (NFD, lower case), and each normalized character's source index."""
    pieces = [unicodedata.normalize("NFD", ch).lower() for ch in text]
    origin = [index for index, piece in enumerate(pieces) for _ in piece]
    whole = unicodedata.normalize("NFD", text).lower()
    # Whole-string NFD may reorder combining marks and lower() knows final sigma; both keep the length, so the
    # tokens come from exactly the string answer_in_text reads and the per-character origins still apply.
    return (whole, origin) if len(whole) == len(origin) else ("".join(pieces), origin)


def answer_spans(answers: Sequence[str], text: str, *, regex: bool = False) -> list[tuple[int, int]]:
    """Where ``text`` holds an answer, as ``[start, end)`` character offsets into ``text``: sorted, merged.

    The occurrences `answer_in_text` finds (the same tokens, or the same patterns), for highlighting:
    ``bool(answer_spans(a, t)) == answer_in_text(a, t)`` (an empty regex match is not shown, and counts
    as found there, as DPR's search does).
    """
    if regex:
        spans = [match.span() for pattern in answers for match in compile_pattern(pattern).finditer(text)
                 if match.end() > match.start()]
    else:
        normalized, origin = _normalized_with_origin(text)
        found = list(_token_pattern().finditer(normalized))
        words = [match.group() for match in found]
        spans = []
        for answer in answers:
            needle = answer_tokens(answer)
            for i in range(len(words) - len(needle) + 1 if needle else 0):
                if words[i] == needle[0] and words[i:i + len(needle)] == needle:
                    spans.append((origin[found[i].start()], origin[found[i + len(needle) - 1].end() - 1] + 1))
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def first_answer_rank(answers: Sequence[str], texts: Sequence[str], *, regex: bool = False) -> int | None:
    """0-based rank of the first passage text that contains a reference answer, or None.

    DPR's convention: the passage text only, not its title (a title that names the
    answer is not evidence).
    """
    return next((rank for rank, text in enumerate(texts) if answer_in_text(answers, text, regex=regex)), None)


def answer_ranks(answers_per_question: Sequence[Sequence[str]], texts_per_question: Sequence[Sequence[str]],
                 *, regex: bool = False) -> list[int | None]:
    """For each question, the rank of its first retrieved passage that holds an answer (None: none does).

    ``texts_per_question[i]`` are question i's passage texts, best first, without titles.
    Training's ``val/recall@k`` and rag-eval's ``answer_rank`` and ``recall@k`` all come from here.
    """
    return [first_answer_rank(answers, texts, regex=regex)
            for answers, texts in zip(answers_per_question, texts_per_question)]
