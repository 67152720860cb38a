"""rag-compare: exact McNemar, seeded bootstrap intervals, question-by-question differences, refusals."""
from __future__ import annotations

import json
import math
from itertools import product
from pathlib import Path

import pytest

from rag_models.errors import InputError
from training.evaluation.compare_cli import compare, main
from training.evaluation.paired_stats import bootstrap_interval, mcnemar_exact


def test_mcnemar_exact_against_enumeration():
    assert mcnemar_exact(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 2**12)
    for b, c in product(range(7), range(7)):
        n = b + c
        # Two-sided: the probability, under Binomial(n, 1/2), of outcomes no more likely than the one seen.
        outcomes = [math.comb(n, k) / 2**n for k in range(n + 1)]
        brute = min(1.0, sum(p for k, p in enumerate(outcomes) if min(k, n - k) <= min(b, c)))
        assert mcnemar_exact(b, c) == pytest.approx(brute) and mcnemar_exact(b, c) == mcnemar_exact(c, b)
    assert mcnemar_exact(0, 0) == 1.0 and 0 < mcnemar_exact(3000, 2600) < 1e-4  # large n, exact integers


def test_bootstrap_interval_is_seeded_and_holds_the_em():
    correct = [True] * 70 + [False] * 30
    low, high = bootstrap_interval(correct, seed=3)
    assert (low, high) == bootstrap_interval(correct, seed=3)
    half = 1.96 * math.sqrt(0.7 * 0.3 / 100)  # the normal approximation's half-width
    assert low == pytest.approx(0.7 - half, abs=0.02) and high == pytest.approx(0.7 + half, abs=0.02)
    assert bootstrap_interval([True] * 5) == (1.0, 1.0)


def _run(directory: Path, questions: str, rows: list[tuple[str, str, bool]]) -> Path:
    directory.mkdir(parents=True)
    records = [{"question": q, "prediction": p, "answers": ["x"], "correct": c} for q, p, c in rows]
    (directory / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    em = sum(c for _, _, c in rows) / len(rows)
    (directory / "metrics.json").write_text(json.dumps({"questions": questions, "exact_match": em, "f1": em,
                                                        "num_total": len(rows), "strategy": "greedy"}))
    return directory


def test_compare_lists_the_questions_that_differ(tmp_path, capsys):
    a = _run(tmp_path / "seq", "test.jsonl", [("q1", "x", True), ("q2", "y", False), ("q3", "x", True)])
    b = _run(tmp_path / "tok", "test.jsonl", [("q1", "z", False), ("q2", "x", True), ("q3", "w", False)])
    result = compare([a, b])
    pair = result["pairs"][0]
    assert (pair["a"], pair["b"], pair["a_right_b_wrong"], pair["a_wrong_b_right"]) == ("seq", "tok", 2, 1)
    assert pair["only_a_right"][0] == {"question": "q1", "answers": ["x"], "seq": "x", "tok": "z"}
    assert pair["mcnemar_p"] == mcnemar_exact(2, 1) and pair["em_difference"] == pytest.approx(1 / 3)
    assert result["metrics"]["seq"]["exact_match"] == pytest.approx(2 / 3)
    assert main([str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    text = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| exact_match | 0.6667 | 0.3333 |" in text and "exact McNemar p" in text and "| q1 | x | x | z |" in text
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["pairs"][0]["a_right_b_wrong"] == 2
    assert "EM 95% interval" in capsys.readouterr().out


def test_compare_refuses_other_questions(tmp_path, capsys):
    a = _run(tmp_path / "a", "test.jsonl", [("q1", "x", True)])
    b = _run(tmp_path / "b", "dev.jsonl", [("q1", "x", True)])
    with pytest.raises(InputError, match=r"answered dev.jsonl, but .* answered test.jsonl"):
        compare([a, b])
    c = _run(tmp_path / "c", "test.jsonl", [("q1", "x", True), ("q2", "x", True)])
    with pytest.raises(InputError, match="different questions"):
        compare([a, c])
    assert main([str(a), str(tmp_path / "nothing")]) == 2
    assert "not a finished rag-eval run" in capsys.readouterr().err


def test_compare_accepts_the_same_question_file_under_another_name(tmp_path, capsys):
    (tmp_path / "test.jsonl").write_text('{"question": "q1", "answer": ["x"]}\n')
    (tmp_path / "copy.jsonl").write_text('{"question": "q1", "answer": ["x"]}\n')
    (tmp_path / "edited.jsonl").write_text('{"question": "q1", "answer": ["y"]}\n')
    a = _run(tmp_path / "a", str(tmp_path / "test.jsonl"), [("q1", "x", True)])
    b = _run(tmp_path / "b", str(tmp_path / "copy.jsonl"), [("q1", "y", False)])
    assert "has the content of" in compare([a, b])["notes"][0]
    assert main([str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    assert "same size and SHA-256" in capsys.readouterr().out
    c = _run(tmp_path / "c", str(tmp_path / "edited.jsonl"), [("q1", "x", True)])
    with pytest.raises(InputError, match="another content"):
        compare([a, c])


def test_compare_says_when_a_question_file_was_edited_in_between(tmp_path):
    a = _run(tmp_path / "a", "test.jsonl", [("q1", "x", True), ("q2", "x", True)])
    b = _run(tmp_path / "b", "test.jsonl", [("q1", "x", True), ("q9", "x", True)])
    with pytest.raises(InputError, match="the question files differ") as refused:
        compare([a, b])
    assert "same limit" not in str(refused.value)


def test_compare_refuses_a_directory_twice_a_negative_show_and_a_file_as_out(tmp_path, capsys):
    a = _run(tmp_path / "a", "test.jsonl", [("q1", "x", True)])
    b = _run(tmp_path / "b", "test.jsonl", [("q1", "y", False)])
    with pytest.raises(InputError, match="given twice"):
        compare([a, tmp_path / "x" / ".." / "a"])
    with pytest.raises(SystemExit) as exited:
        main([str(a), str(b), "--show", "-1"])
    assert exited.value.code == 2 and "--show" in capsys.readouterr().err
    taken = tmp_path / "taken.md"
    taken.write_text("keep me")
    assert main([str(a), str(b), "--out", str(taken)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rag-compare: error: ") and "taken.md" in err and "existing file" in err
    assert taken.read_text() == "keep me"
