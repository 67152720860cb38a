"""`rag-score`: score a predictions file against NQ-Open references, printing the evaluator's JSON.

    rag-score --references NQ-open.dev.jsonl --predictions predictions.jsonl [--regex]

References are anything ``read_questions`` reads (NQ-Open ``{"question", "answer": [...]}``
JSONL, DPR's CSV, .source/.target); predictions are ``{"question", "prediction"}``
a line, the format of the reference NQ-Open evaluator (``rag-eval`` writes it, with
extra provenance keys that are ignored here). Prints
``{"exact_match", "num_correct", "num_total", "missing_predictions", "f1"}``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from index.passage_files import iter_lines
from rag_models.cli_errors import command
from rag_models.errors import InputError
from rag_models.file_manifest import check_file
from training.data.questions import QAExample, read_questions, refuse_repeats
from training.evaluation.metrics import compile_pattern, score_predictions

PREDICTION_FIX = 'Each line must be one object {"question": "...", "prediction": "..."}'


def _prediction_record(path: Path, number: int, line: str) -> tuple[str, str]:
    """(question, prediction) of one predictions line, or InputError naming the file and line."""
    try:
        record: Any = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"bad JSON ({err.msg}, column {err.colno})", path=path, line=number,
                         fix=PREDICTION_FIX) from None
    if not isinstance(record, dict):
        raise InputError(f"expected a JSON object, got {type(record).__name__}", path=path, line=number,
                         fix=PREDICTION_FIX)
    question, prediction = record.get("question"), record.get("prediction")
    if not isinstance(question, str) or not question.strip():
        raise InputError("missing or empty `question`", path=path, line=number, fix=PREDICTION_FIX)
    if not isinstance(prediction, str):
        problem = "missing key `prediction`" if prediction is None else "`prediction` must be a string"
        raise InputError(problem, path=path, line=number, fix=PREDICTION_FIX)
    return question.strip(), prediction


def read_predictions(path: str | Path, known_questions: set[str] | None = None,
                     references_path: str | Path | None = None) -> dict[str, str]:
    """``{question: prediction}`` from a JSONL file; duplicates and (given ``known_questions``) unknown ones raise.

    Both errors name the file and line: a duplicate would silently overwrite, an unknown
    question would silently score nothing, and both mean the wrong files were paired. Lines are read by
    ``iter_lines`` (BOM dropped, CRLF accepted, blank lines skipped, bad bytes name the line); an empty file
    is no predictions, not an error: every reference then counts in ``missing_predictions``.
    """
    path = Path(path)
    check_file(path, what="evaluation output")  # rag-eval's predictions.jsonl: refused when cut or changed since
    predictions: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for number, line in iter_lines(path):
        question, prediction = _prediction_record(path, number, line)
        if question in first_line:
            raise InputError(f"duplicate prediction for {question!r} (first on line {first_line[question]})",
                             path=path, line=number, fix="Keep one prediction per question")
        if known_questions is not None and question not in known_questions:
            where = f" {references_path}" if references_path is not None else " the references"
            raise InputError(f"question {question!r} is not in{where}", path=path, line=number,
                             fix="Score against the reference file the predictions were made for")
        first_line[question] = number
        predictions[question] = prediction
    return predictions


def check_patterns(references: list[QAExample], path: str | Path) -> None:
    """In regex mode every reference answer must compile; name the file and question otherwise."""
    for number, example in enumerate(references, start=1):
        for pattern in example.answers:
            try:
                compile_pattern(pattern)
            except InputError as err:
                raise InputError(f"reference {number} ({example.question!r}): {err}", path=path,
                                 fix="Fix the pattern, or score without --regex") from None


def score_files(references: str | Path, predictions: str | Path, *, regex: bool = False) -> dict:
    """Read both files and score them (see :func:`training.evaluation.metrics.score_predictions`)."""
    examples = read_questions(references)
    refuse_repeats(examples, references)  # by_question would silently keep one of them
    if regex:
        check_patterns(examples, references)
    known = {example.question.strip() for example in examples}
    by_question = read_predictions(predictions, known, references_path=references)
    return score_predictions(examples, by_question, regex=regex)


def _parser() -> argparse.ArgumentParser:
    """Command-line options of rag-score."""
    parser = argparse.ArgumentParser(prog="rag-score", description=__doc__.split("\n\n")[0])
    parser.add_argument("--references", required=True, help='NQ-Open JSONL {"question", "answer": [...]} '
                        "(or DPR .csv, .source/.target)")
    parser.add_argument("--predictions", required=True, help='JSONL {"question", "prediction"} a line')
    parser.add_argument("--regex", action="store_true",
                        help="references are case-insensitive regular expressions (CuratedTrec)")
    return parser


@command("rag-score")
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``rag-score``: prints the scores as JSON; exit status 2 on bad input."""
    options = _parser().parse_args(argv)
    scores = score_files(options.references, options.predictions, regex=options.regex)
    print(json.dumps(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
