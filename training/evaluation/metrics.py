"""Open-domain QA scoring as the field does it: normalized exact match, token F1, regex match, answer recall.

Exact match follows the convention of the reference NQ-Open evaluator (Lee et al.
2019), which RAG, DPR and ORQA report: a prediction is correct when, after
normalization, it equals any reference answer. Normalization = Unicode NFD,
lower-case, drop ASCII punctuation, drop the articles a/an/the, collapse
whitespace. CuratedTrec references are regular expressions instead (regex mode).

Retrieval recall@k counts ranks from `training.evaluation.answer_match` (DPR's answer-in-passage check,
which tokenizes differently from the normalization here, as DPR does).
"""
from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from rag_models.errors import InputError
from training.evaluation.answer_match import compile_pattern

# ASCII punctuation only, as the reference evaluator: a Unicode dash or quote survives normalization.
_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")


def normalize_answer(s: str) -> str:
    """NFD, lower-case, no ASCII punctuation, no a/an/the, single spaces: the NQ-Open evaluator's normal form."""
    # NFD first so that a precomposed "é" and "e" + combining accent compare equal; the accent itself stays.
    text = unicodedata.normalize("NFD", s).lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    # Articles are removed after punctuation, so "the-end" -> "theend" keeps its letters (no article there).
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _tokens(s: str) -> list[str]:
    """Whitespace tokens of the normalized string."""
    return normalize_answer(s).split()


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    """True when the normalized prediction equals any normalized reference answer."""
    normalized = normalize_answer(prediction)
    return any(normalized == normalize_answer(answer) for answer in answers)


def _token_f1(prediction_tokens: list[str], answer_tokens: list[str]) -> float:
    """SQuAD-style token F1 between two token lists (multiset overlap)."""
    if not prediction_tokens or not answer_tokens:
        # Both empty (e.g. the answer "The" normalizes to nothing) is a match, as exact match says.
        return float(prediction_tokens == answer_tokens)
    overlap = sum((Counter(prediction_tokens) & Counter(answer_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(prediction_tokens)
    recall = overlap / len(answer_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, answers: Sequence[str]) -> float:
    """Token F1 of the normalized prediction against each answer; the best one (0.0 when no answers)."""
    prediction_tokens = _tokens(prediction)
    return max((_token_f1(prediction_tokens, _tokens(answer)) for answer in answers), default=0.0)


def regex_match(prediction: str, patterns: Sequence[str]) -> bool:
    """True when the prediction matches any pattern from its start (case-insensitive), as DPR scores CuratedTrec."""
    # Anchored at the start like DPR's CuratedTrec scoring (re.match), so published numbers are comparable.
    text = prediction.strip()
    return any(compile_pattern(pattern).match(text) is not None for pattern in patterns)


def _question_key(question: str) -> str:
    """The key a prediction is matched by: the question with outer whitespace removed."""
    return question.strip()


def _reference_of(item: Any) -> tuple[str, Sequence[str]]:
    """(question, answers) of a QAExample-like object or an NQ-Open dict ``{"question", "answer"}``."""
    if isinstance(item, Mapping):
        answers = item.get("answer", item.get("answers"))
        return str(item["question"]), list(answers or [])
    return str(item.question), list(item.answers)


def score_predictions(references: Sequence[Any], predictions: Mapping[str, str], *, regex: bool = False) -> dict:
    """Score ``{question: prediction}`` against the references, the way the NQ-Open evaluator does.

    A question without a prediction counts as wrong and is counted in
    ``missing_predictions``; a prediction for a question not in the references is an
    InputError (the questions are the keys, so it would silently score nothing).
    Returns ``exact_match``, ``num_correct``, ``num_total``, ``missing_predictions``
    and ``f1`` (mean token F1; ``None`` in regex mode, where references are patterns).
    """
    pairs = [_reference_of(item) for item in references]
    by_question = {_question_key(question): answers for question, answers in pairs}
    cleaned = {_question_key(q): p for q, p in predictions.items()}
    unknown = [q for q in cleaned if q not in by_question]
    if unknown:
        raise InputError(f"{len(unknown)} prediction(s) for questions not in the references, e.g. {unknown[0]!r}",
                         setting="predictions", fix="Score against the reference file the predictions were made for")
    num_correct, f1_total, missing = 0, 0.0, 0
    for question, answers in by_question.items():
        prediction = cleaned.get(question)
        if prediction is None:
            missing += 1
            continue
        num_correct += regex_match(prediction, answers) if regex else exact_match(prediction, answers)
        if not regex:
            f1_total += f1_score(prediction, answers)
    total = len(by_question)
    return {
        "exact_match": num_correct / total if total else 0.0,
        "num_correct": num_correct,
        "num_total": total,
        "missing_predictions": missing,
        "f1": None if regex else (f1_total / total if total else 0.0),
    }


def recall_hits(ranks: Sequence[int | None], ks: Sequence[int], depth: int) -> dict[str, int]:
    """``{"recall@k": questions with an answer in their top k}`` for each k up to the retrieved ``depth``.

    Divide by the number of questions for recall@k (top-k retrieval accuracy, as DPR and
    RAG report it); a k deeper than what was retrieved is left out rather than reported
    optimistically. Counts, not fractions, so that ranks of several processes add up exactly.
    """
    return {f"recall@{k}": sum(rank is not None and rank < k for rank in ranks) for k in ks if k <= depth}


def recall_hit_curve(ranks: Sequence[int | None], depth: int) -> list[int]:
    """Questions with an answer in their top k, for every k = 1..depth: `recall_hits` at each k, in one pass."""
    first = [0] * depth  # first[r]: questions whose first answer-holding passage is at rank r
    for rank in ranks:
        if rank is not None and rank < depth:
            first[rank] += 1
    curve, total = [], 0
    for count in first:
        total += count
        curve.append(total)
    return curve


def batch_sums(predictions: Sequence[str], references: Sequence[Sequence[str]], ranks: Sequence[int | None] | None,
               recall_ks: Sequence[int], depth: int) -> dict[str, float]:
    """Sums over a batch of questions: ``em``, ``f1``, ``count`` and (with ``ranks``) each ``recall@k`` hit count.

    Dividing each by the summed ``count`` (after adding the sums of every batch and rank)
    gives training's val/em, val/f1 and val/recall@k.
    """
    sums = {"em": 0.0, "f1": 0.0, "count": float(len(predictions))}
    for prediction, answers in zip(predictions, references):
        sums["em"] += float(exact_match(prediction, answers))
        sums["f1"] += f1_score(prediction, answers)
    if ranks is not None:
        sums.update({key: float(hits) for key, hits in recall_hits(ranks, recall_ks, depth).items()})
    return sums
