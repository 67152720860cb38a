"""rag-demo: the quick smoke run of every stage, and the results table / targets logic."""
from __future__ import annotations

import json

import pytest

from rag_models.errors import InputError
from training.demo.demo_cli import TARGETS, collect_results, render_table, run_demo
from training.demo.stages import FULL, override

RESULT_KEYS = ("recall@5", "em_rag_sequence", "em_rag_token", "em_closed_book", "em_swap_matched", "em_swap_stale",
               "em_before_swap_matched", "em_before_swap_stale", "seconds", "stage_seconds", "targets")
STAGES = ("world", "tiny_models", "dpr", "index_v1", "train", "index_v2", "evaluate", "views")


def _metrics(em: float, stale: float | None = None, recall: float | None = 0.9) -> dict:
    metrics = {"exact_match": em, "f1": em, "num_total": 10, "n_docs": 3}
    if recall is not None:
        metrics.update({"recall@1": recall, "recall@5": recall})
    if stale is not None:
        metrics["exact_match_stale"] = stale
    return metrics


def test_targets_and_table_from_metrics():
    metrics = {"rag_sequence": _metrics(0.95), "rag_token": _metrics(0.85), "closed_book": _metrics(0.4, recall=None),
               "before_swap": _metrics(0.0, 1.0), "swap": _metrics(0.9, 0.05), "swap_rag_token": _metrics(0.8, 0.1)}
    results = collect_results(metrics, {"world": 1.0}, seconds=600.0, plan=FULL, quick=False, seed=0)
    assert results["rag_minus_closed_book"] == pytest.approx(0.45)
    met = {key: value["met"] for key, value in results["targets"].items()}
    assert met == {"em_rag_sequence": True, "em_rag_token": True, "rag_minus_closed_book": False,
                   "em_swap_matched": True, "em_swap_stale": True, "minutes": True}
    assert set(results["targets"]) == {key for key, *_ in TARGETS}
    table = render_table(results)
    assert "RAG-Sequence test EM" in table and "0.950" in table and "NO" in table
    assert "0.800/0.100" in table  # RAG-Token after the swap, new / old answers


def test_override_quotes_only_when_needed():
    assert override("out_dir", "runs/demo-1/eval") == "out_dir=runs/demo-1/eval"
    assert override("out_dir", "my runs/it's") == "out_dir='my runs/it\\'s'"


def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    results = run_demo(out, quick=True, seed=0)
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    for key in RESULT_KEYS:
        assert key in saved, key
    for key in ("recall@5", "em_rag_sequence", "em_rag_token", "em_closed_book", "em_swap_matched", "em_swap_stale"):
        assert 0.0 <= saved[key] <= 1.0, key
    assert tuple(saved["stage_seconds"]) == STAGES
    assert 0 < sum(saved["stage_seconds"].values()) <= saved["seconds"] + 1
    assert saved["quick"] is True and saved["num_test"] > 0 and saved["num_changed"] > 0
    assert set(saved["train_seconds"]) == {"rag_sequence", "rag_token", "closed_book"}
    # Every stage left what a user would look at: exported models, both indexes, every evaluation's files.
    for name in ("rag_sequence", "rag_token", "closed_book"):
        assert (out / name / "model" / "rag_config.json").is_file()
        assert "max_steps=3" in (out / name / "train.log").read_text()  # each process logs to its run dir
    assert (out / "dpr" / "model" / "context_encoder").is_dir()
    assert (out / "index" / "index" / "manifest.json").is_file() and (out / "index_v2" / "index").is_dir()
    for name in ("rag_sequence", "rag_token", "closed_book", "before_swap", "swap", "swap_rag_token"):
        metrics = json.loads((out / "eval" / name / "metrics.json").read_text())
        lines = (out / "eval" / name / "predictions.jsonl").read_text().splitlines()
        assert len(lines) == metrics["num_total"]
    assert json.loads((out / "eval" / "swap" / "metrics.json").read_text())["index_path"].endswith("index_v2")
    # What a researcher looks at: figures, report.html, the sweeps and RAG-Sequence vs RAG-Token.
    views = saved["views"]
    for name in ("eval/figures/em_vs_n_docs.png", "eval/figures/index_swap.svg", "eval/rag_sequence/recall_at_k.png",
                 "eval/rag_token/risk_coverage.png", "eval/rag_sequence/report.html", "eval/compare/compare.md"):
        assert (out / name).is_file(), name
    assert "eval/figures/em_vs_n_docs.png" in views["figures"] and views["sweep_n_docs"] == [1, 2, 3]
    assert set(views["sweep_em"]) == {"rag_sequence", "rag_token"}
    sweep = json.loads((out / "eval" / "sweep_rag_sequence" / "n_docs=3" / "metrics.json").read_text())
    assert sweep["exact_match"] == saved["em_rag_sequence"]  # the sweep at the trained n_docs = the test run
    assert "| exact_match |" in (out / "eval" / "compare" / "compare.md").read_text()
    assert "RAG-Sequence vs RAG-Token" in render_table(saved)
    # A finished run directory is never overwritten.
    with pytest.raises(InputError, match="already holds a finished demo"):
        run_demo(out, quick=True)
    # A killed run (no results.json yet) resumes: trained stages are reused, the evaluation runs again.
    (out / "results.json").unlink()
    resumed = run_demo(out, quick=True, seed=0)
    assert resumed["resumed_stages"] == ["world", "tiny_models", "dpr", "train"]
    assert resumed["em_rag_sequence"] == results["em_rag_sequence"]


def test_unfinished_run_with_other_settings_is_refused(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "demo_settings.json").write_text(json.dumps({"plan": {}, "seed": 1}))
    with pytest.raises(InputError, match="other settings"):
        run_demo(out, quick=True, seed=0)
