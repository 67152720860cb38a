"""One bad question never loses a run: overlong questions are cut to their beginning, answered, and reported.

rag-eval (a warning naming FILE:LINE, ``truncated_questions`` in metrics.json and report.md, length
overrides from the command line), rag-ask (a warning) and a training step (a warning with a count), on
generated questions; and the field case 02-long-question from ../shared when it is there.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from decoding.ask_cli import main as ask_main
from index.build_cli import build_index
from rag_models.errors import InputError
from tiny_setup import TinySetup, save_untrained_rag, tiny_overrides
from training.config import compose
from training.evaluation.eval_cli import evaluate
from training.lit.train_cli import train

FIELD_CASE = Path(__file__).resolve().parents[1].parent / "shared" / "cases" / "field-2026-11-30" / "02-long-question"
# ~3,000 generator tokens: longer than any tiny (or BART's 1,024) input.
LONG_QUESTION = "which river flows through the town, " + " ".join(f"considering detail {n}" for n in range(800))


@pytest.fixture(scope="module")
def checkpoint(tiny_setup: TinySetup, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny RagModel reading 2 docs of at most 128 generator tokens."""
    models = tiny_setup.models
    return save_untrained_rag(models, tmp_path_factory.mktemp("long") / "rag", n_docs=2)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _eval(checkpoint: Path, questions: Path, index: Path, out: Path, *extra: str) -> dict:
    return evaluate(compose([f"checkpoint={checkpoint}", f"questions={questions}", f"index.path={index}",
                             f"out_dir={out}", "batch_size=2", "progress=false", *extra], config_name="eval"))


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def field_index(tiny_setup: TinySetup, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An index of the field case's 3 passages, encoded with the tiny context encoder."""
    if not FIELD_CASE.is_dir():
        pytest.skip("field case 02-long-question not found at ../shared/cases/ (absent in a user's clone)")
    root = build_index(FIELD_CASE / "passages.tsv", tiny_setup.models.context_encoder,
                       tmp_path_factory.mktemp("field") / "index", factory="Flat", max_length=128, progress=False)
    return root.parent


def test_field_case_02_long_question(checkpoint, field_index, tmp_path, capsys):
    questions = FIELD_CASE / "questions.jsonl"
    metrics = _eval(checkpoint, questions, field_index, tmp_path / "eval")
    records = _read_jsonl(tmp_path / "eval" / "predictions.jsonl")
    assert len(records) == 3 and metrics["num_total"] == 3  # lines 1, 2 (cut) and 3 answered and scored
    assert all(isinstance(r["prediction"], str) and len(r["doc_ids"]) == 2 for r in records)
    assert metrics["truncated_questions"] == 1 and metrics["truncated_question_lines"] == [2]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["truncated_question_lines"] == [2]
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and f"{questions}:2: question cut to fit" in warnings[0]
    assert "max_source_length" in warnings[0] and "max_question_length" in warnings[0]
    assert "truncated questions: 1" in (tmp_path / "eval" / "report.md").read_text()


def test_eval_cuts_a_generated_long_question_and_takes_length_overrides(checkpoint, tiny_setup, tmp_path, capsys):
    world = _read_jsonl(tiny_setup.world.test)[:2]
    rows = [world[0], {"question": LONG_QUESTION, "answer": ["Selk"]}, world[1]]
    questions = _write_jsonl(tmp_path / "q.jsonl", rows)
    metrics = _eval(checkpoint, questions, tiny_setup.index_dir, tmp_path / "eval")
    assert metrics["num_total"] == 3 and metrics["truncated_question_lines"] == [2]
    assert f"{questions}:2: question cut to fit max_question_length" in capsys.readouterr().err
    # The checkpoint's lengths from the command line: a question encoder reading 4 tokens cuts every question.
    metrics = _eval(checkpoint, questions, tiny_setup.index_dir, tmp_path / "short", "max_question_length=4",
                    "max_source_length=64", "max_target_length=8", "n_docs=1")
    assert metrics["truncated_question_lines"] == [1, 2, 3] and metrics["n_docs"] == 1
    with pytest.raises(InputError, match="max_source_length"):  # above the tiny BART's 256 positions
        _eval(checkpoint, questions, tiny_setup.index_dir, tmp_path / "bad", "max_source_length=4096")
    with pytest.raises(InputError, match="max_question_length"):
        _eval(checkpoint, questions, tiny_setup.index_dir, tmp_path / "bad", "max_question_length=0")


def test_eval_closed_book_cuts_at_max_source_length(checkpoint, tiny_setup, tmp_path):
    questions = _write_jsonl(tmp_path / "q.jsonl", [{"question": "short?", "answer": ["a"]},
                                                    {"question": LONG_QUESTION, "answer": ["b"]}])
    metrics = _eval(checkpoint, questions, tiny_setup.index_dir, tmp_path / "eval", "mode=closed_book")
    assert metrics["num_total"] == 2 and metrics["truncated_question_lines"] == [2]


def test_duplicate_question_error_names_its_line(checkpoint, tiny_setup, tmp_path):
    row = {"question": "who founded it?", "answer": ["x"]}
    questions = _write_jsonl(tmp_path / "q.jsonl", [row, {"question": "other?", "answer": ["y"]}, row])
    with pytest.raises(InputError, match=r"q\.jsonl:3: the question repeats .*q\.jsonl:1"):
        _eval(checkpoint, questions, tiny_setup.index_dir, tmp_path / "eval")


def test_ask_cuts_a_long_question_with_a_warning(checkpoint, tiny_setup, capsys):
    code = ask_main(["--checkpoint", str(checkpoint), "--index", str(tiny_setup.index_dir), "--device", "cpu",
                     "--strategy", "greedy", "--max-length", "8", LONG_QUESTION])
    captured = capsys.readouterr()
    assert code == 0 and "\nA: " in captured.out
    assert "rag-ask: warning: question cut to fit max_question_length" in captured.err
    assert "max_source_length" in captured.err


def test_training_step_cuts_long_questions_and_answers(tiny_setup, tmp_path, capsys):
    rows = _read_jsonl(tiny_setup.world.train)[:6]
    rows[3] = {"question": LONG_QUESTION, "answer": [" ".join(["Selk"] * 300)]}  # and an answer over T
    train_file = _write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = compose(["experiment=demo", *tiny_overrides(tiny_setup, tmp_path / "run"), f"data.train_file={train_file}",
                   "trainer.fast_dev_run=true"])
    result = train(cfg)
    loss = result.metrics["train/loss"]
    assert loss == loss and loss > 0  # finite
    warnings = [line for line in capsys.readouterr().err.splitlines() if "training questions" in line]
    assert len(warnings) == 1 and "1 of 6 training questions" in warnings[0] and f"{train_file}:4" in warnings[0]
