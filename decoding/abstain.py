"""When an answer is not confident enough to give: its confidence, and the threshold (a number or threshold.json).

An answer's confidence is its ``score`` (the decoder's log-probability, see
`decoding.results.GenerationResult.scores`) or its top document posterior max_k p(z_k|x,y).
``rag-eval ... abstain_coverage=C`` chooses a threshold on a question file and stores it in
``threshold.json`` (training/evaluation/selective.py); rag-ask and rag-eval read it back here.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

from decoding.answer import Answer
from rag_models.errors import InputError

CONFIDENCES = ("score", "posterior")  # abstain_on: what an answer's confidence is
THRESHOLD_FILE = "threshold.json"


def answer_confidence(found: Answer, on: str) -> float:
    """The answer's score, or its top document posterior (``on`` = "score" | "posterior")."""
    return found.score if on == "score" else max(found.posteriors, default=0.0)


def check_threshold(threshold: float, on: str, where: str | Path) -> float:
    """``threshold`` when usable: finite, and in [0, 1] for a posterior (a probability).

    ``where``: the setting (a str) or the threshold file (a Path) named in the error. Raises InputError otherwise.
    """
    path, setting = (where, None) if isinstance(where, Path) else (None, where)
    if not math.isfinite(threshold):
        raise InputError(f"the threshold {threshold} is not a finite number", path=path, setting=setting,
                         fix="Give a finite number, e.g. abstain_below=-2.5 (a score) or 0.5 (a posterior)")
    if on == "posterior" and not 0 <= threshold <= 1:
        raise InputError(f"the threshold {threshold} is not in [0, 1], the range of a posterior", path=path,
                         setting=setting, fix="Give a probability with abstain_on=posterior, e.g. 0.5")
    return threshold


def read_threshold(value: float | str, on: str | None) -> tuple[float, str]:
    """(threshold, abstain_on) from ``abstain_below``: a number, or a threshold.json written by abstain_coverage.

    ``on`` (abstain_on) None means "score", or what the file says; a file chosen on the other confidence is
    refused. Raises InputError for a missing or malformed file or an unknown ``on``.
    """
    if on is not None and on not in CONFIDENCES:
        raise InputError(f"unknown abstain_on {on!r}", setting="abstain_on", fix=f"Use one of {', '.join(CONFIDENCES)}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        pass
    else:
        return check_threshold(number, on or "score", "abstain_below"), on or "score"
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
    return check_threshold(threshold, saved_on, path), saved_on


def transfer_warning(value: float | str, checkpoint: str | Path, decoding: Mapping[str, object]) -> str | None:
    """One line when threshold file ``value`` was chosen with another checkpoint or decoder, else None.

    ``decoding``: this run's ``decoding_summary``, ``strategy`` and ``n_docs`` as far as known (None: unknown),
    compared with what threshold.json recorded; the summary, when both have one, stands for the other two.
    A number, or a file that does not say, gives None: a threshold may be carried over on purpose.
    """
    path = Path(str(value))
    try:
        float(value)
        return None
    except (TypeError, ValueError):
        saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    differ = []
    then = saved.get("checkpoint")
    if then is not None and str(then) != str(checkpoint) and Path(then).resolve() != Path(checkpoint).resolve():
        differ.append(f"checkpoint {then} (this run: {checkpoint})")
    keys = ["decoding_summary"] if saved.get("decoding_summary") and decoding.get("decoding_summary") else []
    for key in keys or ["strategy", "n_docs"]:
        then, now = saved.get(key), decoding.get(key)
        if then is not None and now is not None and then != now:
            differ.append(f"{key.replace('_summary', '')} {then} (this run: {now})")
    if not differ:
        return None
    return (f"{path} was chosen with {'; '.join(differ)}: its coverage may not hold here "
            "(choose one for this model and decoder with abstain_coverage=C, unless the transfer is meant)")
