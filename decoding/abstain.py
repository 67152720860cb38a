"""When an answer is not confident enough to give: its confidence, and the threshold (a number or threshold.json).

An answer's confidence is its ``score`` (the decoder's log-probability, see
`decoding.results.GenerationResult.scores`) or its top document posterior max_k p(z_k|x,y).
``rag-eval ... abstain_coverage=C`` chooses a threshold on a question file and stores it in
``threshold.json`` (training/evaluation/selective.py); rag-ask and rag-eval read it back here.
"""
from __future__ import annotations

import json
from pathlib import Path

from decoding.answer import Answer
from rag_models.errors import InputError

CONFIDENCES = ("score", "posterior")  # abstain_on: what an answer's confidence is
THRESHOLD_FILE = "threshold.json"


def answer_confidence(found: Answer, on: str) -> float:
    """The answer's score, or its top document posterior (``on`` = "score" | "posterior")."""
    return found.score if on == "score" else max(found.posteriors, default=0.0)


def read_threshold(value: float | str, on: str | None) -> tuple[float, str]:
    """(threshold, abstain_on) from ``abstain_below``: a number, or a threshold.json written by abstain_coverage.

    ``on`` (abstain_on) None means "score", or what the file says; a file chosen on the other confidence is
    refused. Raises InputError for a missing or malformed file or an unknown ``on``.
    """
    if on is not None and on not in CONFIDENCES:
        raise InputError(f"unknown abstain_on {on!r}", setting="abstain_on", fix=f"Use one of {', '.join(CONFIDENCES)}")
    try:
        return float(value), on or "score"
    except (TypeError, ValueError):
        pass
    path = Path(str(value))
    if not path.is_file():
        raise InputError("is neither a number nor a threshold file", path=path,
                         fix="Pass abstain_below=NUMBER, or the threshold.json an abstain_coverage=C run wrote")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        threshold, saved_on = float(saved["threshold"]), str(saved["abstain_on"])
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"not a threshold file ({err})", path=path,
                         fix="Use the threshold.json an abstain_coverage=C run wrote") from None
    if on is not None and on != saved_on:
        raise InputError(f"the threshold was chosen on abstain_on={saved_on}, not {on}", path=path,
                         fix=f"Drop abstain_on or pass abstain_on={saved_on}")
    return threshold, saved_on
