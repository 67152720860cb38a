"""The QA scorer: NQ-Open normalization and edge cases, F1, regex mode, recall, and the rag-score command."""
from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest

from conftest import require_nq_dev
from rag_models.errors import InputError
from training.data.questions import QAExample, read_questions
from training.evaluation.answer_match import answer_in_text, answer_ranks, first_answer_rank
from training.evaluation.metrics import (
    batch_sums,
    exact_match,
    f1_score,
    normalize_answer,
    recall_hits,
    regex_match,
    score_predictions,
)
from training.evaluation.score_cli import main as score_main
from training.evaluation.score_cli import score_files


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = score_main(list(argv))
    except SystemExit as stop:  # a bad input: one line on stderr, SystemExit(2), as every command
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- normalization edge cases ---------------------------------------------------------------------------


def test_accents_compare_under_nfd_but_are_not_stripped():
    precomposed, decomposed = "Beyonc\u00e9", "Beyonce\u0301"
    assert precomposed != decomposed
    assert normalize_answer(precomposed) == normalize_answer(decomposed)
    assert exact_match(decomposed, [precomposed])
    # The reference evaluator keeps the combining accent: "Beyonce" is not "Beyoncé".
    assert not exact_match("Beyonce", [precomposed])


def test_articles_are_whole_words_only():
    assert normalize_answer("The Beatles") == "beatles"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("Theatre and anthem") == "theatre and anthem"  # no article inside words
    assert exact_match("the Who", ["Who"])
    assert not exact_match("Who Else", ["Who"])


def test_punctuation_is_ascii_only():
    assert normalize_answer("U.S.A.") == "usa"
    assert exact_match("Washington, D.C.", ["washington dc"])
    assert normalize_answer("R2-D2") == "r2d2"
    # A Unicode en dash is not ASCII punctuation: it survives, as in the reference evaluator.
    assert normalize_answer("1939\u20131945") == "1939\u20131945"
    assert not exact_match("1939 1945", ["1939\u20131945"])


def test_whitespace_and_case():
    assert normalize_answer("  New\tYork \n City ") == "new york city"
    assert exact_match("NEW   york", ["New York"])
    assert normalize_answer("") == ""


def test_exact_match_is_max_over_answers():
    assert exact_match("December 1972", ["14 December 1972 UTC", "December 1972"])
    assert not exact_match("1972", ["14 December 1972 UTC", "December 1972"])
    assert not exact_match("anything", [])


def test_f1_values():
    assert f1_score("the big cat", ["big dog"]) == pytest.approx(0.5)
    assert f1_score("Paris", ["paris", "Lyon"]) == 1.0
    assert f1_score("red green blue", ["green"]) == pytest.approx(0.5)  # p 1/3, r 1 -> 0.5
    assert f1_score("x y", ["z"]) == 0.0
    assert f1_score("the", ["a"]) == 1.0  # both normalize to nothing: consistent with exact match
    assert f1_score("cat cat", ["cat"]) == pytest.approx(2 * 0.5 * 1 / 1.5)


def test_regex_match_is_case_insensitive_and_anchored_at_start():
    patterns = [r"Bill Clinton|William (Jefferson )?Clinton"]
    assert regex_match("bill clinton", patterns)
    assert regex_match("William Clinton", patterns)
    assert not regex_match("President Bill Clinton", patterns)
    assert regex_match("  1,000 ", [r"1,?000"])
    with pytest.raises(InputError, match="not a valid regular expression"):
        regex_match("x", ["(unclosed"])


def test_answer_in_text_needs_whole_tokens():
    text = "The Eiffel Tower is in Paris, France; it opened in 1889."
    assert answer_in_text(["paris"], text)
    assert answer_in_text(["Eiffel tower"], text)
    assert answer_in_text(["nowhere", "1889"], text)
    assert not answer_in_text(["Pari"], text)  # a piece of a token is not the answer
    assert not answer_in_text(["tower paris"], text)  # tokens must be contiguous
    assert answer_in_text(["the"], text)  # DPR's check keeps articles (only exact match drops them)
    assert not answer_in_text([" "], text)  # an answer without tokens is no evidence
    assert answer_in_text([r"eiffel\s+tower"], text, regex=True)


def test_recall_at_k_counts_first_hit_and_skips_deeper_k():
    answers = [["a1"], ["b1"], ["c1"]]
    texts = [["a1 here", "x", "y"], ["x", "y", "b1 there"], ["x", "y", "z"]]
    ranks = answer_ranks(answers, texts)
    assert ranks == [0, 2, None]
    assert recall_hits(ranks, ks=(1, 2, 3, 5), depth=3) == {"recall@1": 1, "recall@2": 1, "recall@3": 2}


def test_first_answer_rank_reads_the_text_not_the_title():
    """DPR's convention, shared by rag-eval and training's val/recall@k: a title naming the answer is no evidence."""
    assert first_answer_rank(["Paris"], ["the capital of France", "Paris is large"]) == 1
    assert first_answer_rank(["Paris"], ["no", "none"]) is None
    assert first_answer_rank([r"par.s"], ["x", "paris"], regex=True) == 1


# --- score_predictions ------------------------------------------------------------------------------------


def test_missing_predictions_count_as_wrong():
    refs = [QAExample("q1", ("a",)), QAExample("q2", ("b",)), QAExample("q3", ("c",)), QAExample("q4", ("d",))]
    scores = score_predictions(refs, {"q1": "A", "q2": "wrong"})
    assert scores["num_total"] == 4
    assert scores["num_correct"] == 1
    assert scores["missing_predictions"] == 2
    assert scores["exact_match"] == pytest.approx(0.25)
    assert scores["f1"] == pytest.approx(0.25)


def test_unknown_question_in_predictions_raises():
    with pytest.raises(InputError, match="not in the references"):
        score_predictions([QAExample("q1", ("a",))], {"q1": "a", "other": "b"})


def test_regex_mode_scores_patterns_and_reports_no_f1():
    refs = [{"question": "q1", "answer": ["colou?r"]}, {"question": "q2", "answer": ["42|forty[- ]two"]}]
    scores = score_predictions(refs, {"q1": "Color", "q2": "forty two"}, regex=True)
    assert scores["num_correct"] == 2 and scores["f1"] is None
    assert score_predictions(refs, {"q1": "Color", "q2": "43"}, regex=True)["num_correct"] == 1


# --- the real NQ-Open dev set -------------------------------------------------------------------------


def test_real_nq_dev_gold_predictions_score_one(tmp_path, capsys):
    dev = require_nq_dev()
    examples = read_questions(dev)
    assert len(examples) == 3610
    # The *last* answer, decomposed (NFD), in upper case, with extra spaces: normalization is exercised.
    preds = [{"question": e.question, "prediction": "  " + unicodedata.normalize("NFD", e.answers[-1]).upper() + " "}
             for e in examples]
    assert sum(p["prediction"].strip() != e.answers[-1].upper() for p, e in zip(preds, examples)) == 29  # decomposed
    path = _write_jsonl(tmp_path / "gold.jsonl", preds)
    code, out, _ = _run_cli(capsys, "--references", str(dev), "--predictions", str(path))
    scores = json.loads(out)
    assert code == 0
    assert scores == {"exact_match": 1.0, "num_correct": 3610, "num_total": 3610, "missing_predictions": 0,
                      "f1": 1.0}


def test_real_nq_dev_shifted_predictions_mostly_wrong(tmp_path):
    dev = require_nq_dev()
    examples = read_questions(dev)
    # Each question gets the next question's answer: a correct scorer gives almost nothing.
    preds = [{"question": e.question, "prediction": examples[(i + 1) % len(examples)].answers[0]}
             for i, e in enumerate(examples)]
    scores = score_files(dev, _write_jsonl(tmp_path / "shifted.jsonl", preds))
    assert scores["num_total"] == 3610
    assert scores["exact_match"] < 0.02  # only coincidences such as two "one" answers in a row
    assert scores["f1"] < 0.1


def test_real_nq_dev_missing_half(tmp_path):
    dev = require_nq_dev()
    examples = read_questions(dev)
    preds = [{"question": e.question, "prediction": e.answers[0]} for e in examples[::2]]
    scores = score_files(dev, _write_jsonl(tmp_path / "half.jsonl", preds))
    assert scores["missing_predictions"] == 1805
    assert scores["num_correct"] == 1805
    assert scores["exact_match"] == pytest.approx(0.5)


# --- the command: clear errors ----------------------------------------------------------------------


@pytest.fixture()
def refs_file(tmp_path: Path) -> Path:
    return _write_jsonl(tmp_path / "refs.jsonl", [{"question": "who is here", "answer": ["Ann"]},
                                                  {"question": "what is there", "answer": ["a box", "box"]}])


def test_cli_unknown_question_names_file_and_line(tmp_path, refs_file, capsys):
    preds = _write_jsonl(tmp_path / "p.jsonl", [{"question": "who is here", "prediction": "ann"},
                                                {"question": "a stranger", "prediction": "x"}])
    code, out, err = _run_cli(capsys, "--references", str(refs_file), "--predictions", str(preds))
    assert code == 2 and out == ""
    assert f"{preds}, line 2" in err and "a stranger" in err and "refs.jsonl" in err


def test_cli_duplicate_prediction_names_both_lines(tmp_path, refs_file, capsys):
    preds = _write_jsonl(tmp_path / "p.jsonl", [{"question": "who is here", "prediction": "ann"},
                                                {"question": "what is there", "prediction": "box"},
                                                {"question": "who is here", "prediction": "bob"}])
    code, _, err = _run_cli(capsys, "--references", str(refs_file), "--predictions", str(preds))
    assert code == 2 and "line 3" in err and "first on line 1" in err


def test_cli_malformed_lines(tmp_path, refs_file, capsys):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"question": "who is here", "prediction": "ann"}\n{oops\n', encoding="utf-8")
    code, _, err = _run_cli(capsys, "--references", str(refs_file), "--predictions", str(bad_json))
    assert code == 2 and f"{bad_json}, line 2" in err and "bad JSON" in err
    no_pred = _write_jsonl(tmp_path / "nopred.jsonl", [{"question": "who is here", "answer": "ann"}])
    code, _, err = _run_cli(capsys, "--references", str(refs_file), "--predictions", str(no_pred))
    assert code == 2 and "line 1" in err and "prediction" in err
    code, _, err = _run_cli(capsys, "--references", str(refs_file), "--predictions", str(tmp_path / "nope.jsonl"))
    assert code == 2 and "file not found" in err


def test_cli_missing_and_regex(tmp_path, refs_file, capsys):
    preds = _write_jsonl(tmp_path / "p.jsonl", [{"question": "what is there", "prediction": "The Box"}])
    code, out, _ = _run_cli(capsys, "--references", str(refs_file), "--predictions", str(preds))
    assert code == 0
    assert json.loads(out) == {"exact_match": 0.5, "num_correct": 1, "num_total": 2, "missing_predictions": 1,
                               "f1": 0.5}
    bad_regex = _write_jsonl(tmp_path / "r.jsonl", [{"question": "who is here", "answer": ["(Ann"]}])
    code, _, err = _run_cli(capsys, "--references", str(bad_regex), "--predictions", str(preds), "--regex")
    assert code == 2 and "r.jsonl" in err and "not a valid regular expression" in err


def test_validation_recall_ignores_titles_as_rag_eval_does():
    """Training's val/recall@k (batch_sums) counts a hit only in the passage text, like rag-eval's recall@k."""
    titles, texts = ["Paris", "Lyon"], ["a city on a river", "Paris is near"]
    ranks = answer_ranks([["Paris"]], [texts])
    assert ranks == [1] and first_answer_rank(["Paris"], titles) == 0  # the title alone would count at rank 0
    sums = batch_sums(["Paris"], [["Paris"]], ranks, (1, 2, 5), depth=2)
    assert sums == {"em": 1.0, "f1": 1.0, "count": 1.0, "recall@1": 0.0, "recall@2": 1.0}
