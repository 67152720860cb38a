"""A new evaluation into an old out_dir leaves none of the earlier run's results beside its own; warnings read
as ``COMMAND: warning: ...`` like errors do."""
from __future__ import annotations

import warnings
from pathlib import Path

from rag_models.cli_errors import command
from training.evaluation.report import remove_earlier_outputs


def test_an_earlier_evaluations_files_go_and_nothing_else(tmp_path: Path):
    for name in ("metrics.json", "predictions.jsonl", "summary.md", "risk_coverage.png", "threshold.json",
                 "notes.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "n_docs=5").mkdir()
    (tmp_path / "n_docs=5" / "eval_job.json").write_text("{}")
    (tmp_path / "n_docs=mine").mkdir()  # not an evaluation's directory: no eval_job.json
    removed = remove_earlier_outputs(tmp_path, keep=[tmp_path / "threshold.json"])  # a threshold this run reads
    assert removed == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n_docs=mine", "notes.txt", "threshold.json"]


def test_a_python_warning_reads_as_one_line_of_the_command(capsys, monkeypatch):
    monkeypatch.delenv("RAG_DEBUG", raising=False)

    @command("rag-x")
    def main(argv: list[str] | None = None) -> int:
        warnings.warn("3 passages have a blank text (lines 4, 9, 12)", UserWarning, stacklevel=1)
        return 0

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main([]) == 0
    err = capsys.readouterr().err
    assert err == "rag-x: warning: 3 passages have a blank text (lines 4, 9, 12)\n"
