"""Selective answering: answer when confident, abstain otherwise; the risk-coverage curve and its threshold.

A record's confidence is its answer's ``score`` (the decoder's log-probability, see
`decoding.results.GenerationResult.scores`) or its top document posterior max_k p(z_k|x,y)
(``abstain_on``). Ordering the questions by confidence, most confident first, and answering
only the first i of n gives coverage i/n and the EM of those i answers: the risk-coverage
curve (Geifman & El-Yaniv 2017, EM instead of risk). Its area, the mean of those EMs over
i = 1..n, is 1 for a model whose right answers all come first and the overall EM for a
confidence that says nothing.

``abstain_below=X`` marks every answer whose confidence is under X as abstained (the best
guess is kept in ``prediction``); ``abstain_coverage=c`` picks X on this run's questions so
that a fraction c of them is answered, and stores it in ``threshold.json``, which a later run
reads back with ``abstain_below=path/to/threshold.json``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from decoding.abstain import CONFIDENCES, read_threshold
from rag_models.errors import InputError


def confidence(record: dict[str, Any], on: str) -> float | None:
    """The record's answer score, or its top document posterior; None when the record has none (closed-book)."""
    if on == "score":
        return record.get("score")
    posteriors = record.get("doc_posteriors")
    return max(posteriors) if posteriors else None


def risk_coverage(records: Sequence[dict[str, Any]], on: str = "score") -> tuple[list[float], list[float], float]:
    """(coverage, EM of the answered, area) with the questions answered in decreasing confidence.

    Point i (1-based) answers the i most confident questions: coverage i/n, EM = right answers among them / i.
    Ties keep question order. Returns empty lists and NaN when a record has no confidence (closed-book).
    """
    values = [confidence(r, on) for r in records]
    if not records or any(v is None for v in values):
        return [], [], math.nan
    order = sorted(range(len(records)), key=lambda i: -values[i])  # stable: ties keep question order
    coverage, em, right = [], [], 0
    for answered, i in enumerate(order, start=1):
        right += bool(records[i]["correct"])
        coverage.append(answered / len(records))
        em.append(right / answered)
    return coverage, em, sum(em) / len(em)


def threshold_for_coverage(records: Sequence[dict[str, Any]], coverage: float, on: str) -> float:
    """The confidence threshold that answers ceil(coverage * n) of the records (more on ties).

    Raises InputError when a record has no confidence or ``coverage`` is not in (0, 1].
    """
    if not 0 < coverage <= 1:
        raise InputError(f"abstain_coverage={coverage} is not in (0, 1]", setting="abstain_coverage",
                         fix="Give the fraction of questions to answer, e.g. abstain_coverage=0.8")
    values = sorted((confidence(r, on) for r in records), key=lambda v: -math.inf if v is None else -v)
    if not values or values[-1] is None:
        raise InputError("the answers carry no confidence (closed-book)", setting="abstain_coverage",
                         fix="Abstention needs a rag-mode run")
    return float(values[max(1, math.ceil(coverage * len(values))) - 1])


def check_settings(below: float | str | None, on: str | None, coverage: float | None) -> None:
    """Refuse abstention settings before any model loads: both ways at once, a bad coverage, ``on`` or file,
    a non-finite threshold or a posterior one outside [0, 1], and ``on`` alone (it would do nothing)."""
    if on is not None and below is None and coverage is None:
        raise InputError(f"abstain_on={on} is given without a threshold", setting="abstain_on",
                         fix="Add abstain_below=X or abstain_coverage=C, or drop abstain_on")
    if below is not None and coverage is not None:
        raise InputError("abstain_below and abstain_coverage are both given", setting="abstain_coverage",
                         fix="Choose a threshold (abstain_coverage) or use one (abstain_below), not both")
    if coverage is not None and not 0 < float(coverage) <= 1:
        raise InputError(f"abstain_coverage={coverage} is not in (0, 1]", setting="abstain_coverage",
                         fix="Give the fraction of questions to answer, e.g. abstain_coverage=0.8")
    if below is not None:
        read_threshold(below, on)
    elif on is not None and on not in CONFIDENCES:
        read_threshold(0.0, on)  # refuses the unknown ``on``


def abstention(records: list[dict[str, Any]], *, below: float | str | None, on: str | None,
               coverage: float | None) -> dict[str, Any]:
    """Mark abstained records (``record["abstained"]``) and return the selective-answering metrics.

    Always (when the records carry scores): ``em_coverage_area`` (by score). With a threshold
    (``below``, or chosen for ``coverage``): ``abstain_on``, ``abstain_below``, ``coverage`` (answered
    fraction), ``num_answered`` and ``exact_match_answered`` (EM over the answered questions; None when
    none is answered). Raises InputError as `read_threshold` and `threshold_for_coverage`.
    """
    metrics: dict[str, Any] = {}
    _, _, area = risk_coverage(records, "score")
    if not math.isnan(area):
        metrics["em_coverage_area"] = area
    if below is None and coverage is None:
        return metrics
    check_settings(below, on, coverage)
    if coverage is not None:
        on = on or "score"
        threshold = threshold_for_coverage(records, float(coverage), on)
    else:
        threshold, on = read_threshold(below, on)
    answered = 0
    right = 0
    for record in records:
        value = confidence(record, on)
        if value is None:
            raise InputError("the answers carry no confidence (closed-book)", setting="abstain_below",
                             fix="Abstention needs a rag-mode run")
        record["abstained"] = value < threshold
        answered += not record["abstained"]
        right += not record["abstained"] and bool(record["correct"])
    metrics.update(abstain_on=on, abstain_below=threshold, coverage=answered / len(records) if records else 0.0,
                   num_answered=answered, exact_match_answered=right / answered if answered else None)
    return metrics


def threshold_record(metrics: dict[str, Any], target: float) -> dict[str, Any]:
    """What threshold.json holds: the threshold, its confidence, the coverage asked for and reached, where from
    (questions, checkpoint, decoder: rag-eval and rag-ask warn when they use it with another)."""
    return {"threshold": metrics["abstain_below"], "abstain_on": metrics["abstain_on"], "target_coverage": target,
            "coverage": metrics["coverage"], "exact_match_answered": metrics["exact_match_answered"],
            "questions": metrics.get("questions"), "checkpoint": metrics.get("checkpoint"),
            "num_total": metrics.get("num_total"), "strategy": metrics.get("strategy"),
            "decoding_summary": metrics.get("decoding_summary"), "n_docs": metrics.get("n_docs")}
