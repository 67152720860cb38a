"""What an evaluation leaves behind: metrics from the records, report.md, and the files, written atomically.

Rank 0 scores the gathered records with rag-score's scorer and writes
``predictions.jsonl``, ``report.md``, ``eval_job.json`` and, last,
``metrics.json``: a killed run never leaves a complete-looking metrics file.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from decoding.abstain import THRESHOLD_FILE
from rag_models.atomic import atomic_text_writer, atomic_write_text
from rag_models.file_manifest import write_file_manifest
from training.evaluation.job import EvalJob
from training.evaluation.metrics import recall_hits, score_predictions
from training.evaluation.records import EvalParts
from training.evaluation.selective import abstention, threshold_record

OUTPUT_FILES = ("predictions.jsonl", "report.md", "eval_job.json", "metrics.json")  # listed in checksums.json

# Every file an evaluation (or a sweep) writes into its out_dir, besides the per-value `n_docs=K/` directories:
# a new run into the same out_dir removes those of the earlier run first (`remove_earlier_outputs`).
EARLIER_OUTPUTS = (*OUTPUT_FILES, "checksums.json", "report.html", "threshold.json", "summary.json", "summary.md",
                   *(f"{name}.{suffix}" for name in ("recall_at_k", "risk_coverage", "em_vs_n_docs")
                     for suffix in ("png", "svg")))

RECALL_KS = (1, 5, 20, 100)


def remove_earlier_outputs(out_dir: Path, keep: Sequence[str | Path] = ()) -> int:
    """Remove what an earlier evaluation wrote into ``out_dir`` (files by name, and `n_docs=K/` directories
    holding an eval_job.json), so that no stale metrics, threshold or sweep summary sits beside the new ones;
    returns how many files and directories went. Files of other names, and the inputs in ``keep`` (a
    threshold.json this run reads), are never touched."""
    kept = {Path(path).resolve() for path in keep}
    removed = 0
    for name in EARLIER_OUTPUTS:
        path = out_dir / name
        if path.is_file() and path.resolve() not in kept:
            path.unlink()
            removed += 1
    for path in out_dir.glob("n_docs=*"):
        if path.is_dir() and (path / "eval_job.json").is_file():
            shutil.rmtree(path)
            removed += 1
    return removed
IN_MEMORY_ONLY = ("passage_texts",)  # record keys for report.html, not written to predictions.jsonl


def metrics_from_records(records: list[dict[str, Any]], job: EvalJob, parts: EvalParts, world: int,
                         truncated: Sequence[int] = ()) -> dict[str, Any]:
    """EM / F1 (rag-score's scorer), recall@k, stale-answer EM, the questions cut to fit, and what was run.

    ``truncated``: the file lines (rows for hub data) of the questions cut to fit the length settings.
    """
    scores = score_predictions([{"question": r["question"], "answer": r["answers"]} for r in records],
                               {r["question"]: r["prediction"] for r in records})
    metrics: dict[str, Any] = dict(scores)
    if parts.retriever is not None:
        hits = recall_hits([r["answer_rank"] for r in records], RECALL_KS, parts.depth)
        metrics.update({key: count / len(records) for key, count in hits.items()})
    stale = [r for r in records if "stale_answers" in r]
    if stale:  # the changed questions of a swapped world: does the model still say the old answer?
        metrics["exact_match_stale"] = sum(r["correct_stale"] for r in stale) / len(stale)
        metrics["num_stale"] = len(stale)
    metrics.update(truncated_questions=len(truncated), truncated_question_lines=list(truncated))
    # Marks abstained records; adds coverage and EM on the answered (and the EM-coverage area in rag mode).
    metrics.update(abstention(records, below=job.abstain_below, on=job.abstain_on, coverage=job.abstain_coverage))
    if job.mode == "closed_book":  # the generator's own beam search over the question alone: no strategy
        beams = job.decoding.search_kwargs()["num_beams"]
        decoding = replace(job.decoding, strategy="closed_book", n_docs=0, num_beams=beams)
        summary = f"closed_book (the generator alone), {beams} beams, max_length {decoding.max_length}"
    else:
        decoding = replace(job.decoding, n_docs=parts.n_docs).for_model(parts.model)
        summary = decoding.summary()
    metrics.update(mode=job.mode, strategy=decoding.strategy, decoding=decoding.describe(),
                   decoding_summary=summary, n_docs=parts.n_docs, retrieval_depth=parts.depth,
                   index_path=None if job.index_path is None else str(job.index_path),
                   checkpoint=str(job.checkpoint), questions=job.questions, devices=world)
    return metrics


def render_report(metrics: dict[str, Any], records: list[dict[str, Any]], n_examples: int,
                  views: Sequence[str] = ()) -> str:
    """A short markdown report: what was run, the metrics table, ``views`` (figures' lines), a few questions."""
    lines = ["# Evaluation report", "",
             f"- checkpoint: `{metrics['checkpoint']}`", f"- questions: `{metrics['questions']}`",
             f"- index: `{metrics['index_path']}`",
             f"- mode: {metrics['mode']}, decoding: {metrics['decoding_summary']}, n_docs: {metrics['n_docs']}, "
             f"processes: {metrics['devices']}"]
    if metrics.get("truncated_questions"):
        shown = ", ".join(str(n) for n in metrics["truncated_question_lines"])
        lines.append(f"- truncated questions: {metrics['truncated_questions']} (cut to fit the length settings, "
                     f"their beginning answered; lines {shown})")
    lines += ["", "| metric | value |", "|---|---|"]
    for key, value in metrics.items():
        if key in ("exact_match", "f1", "exact_match_stale", "num_correct", "num_total", "num_stale",
                   "missing_predictions", "truncated_questions", "seconds", "em_coverage_area", "coverage",
                   "num_answered", "exact_match_answered", "abstain_below") or key.startswith("recall@"):
            shown = f"{value:.4f}" if isinstance(value, float) and key != "seconds" else value
            lines.append(f"| {key} | {shown} |")
    lines += ["", *views] if views else []
    lines += ["", f"## First {min(n_examples, len(records))} questions", ""]
    for record in records[:n_examples]:
        mark = "correct" if record["correct"] else "wrong"
        lines.append(f"- **{record['question']}** -> `{record['prediction']}` ({mark}; "
                     f"references: {', '.join(record['answers'])})")
        if record.get("titles"):
            docs = ", ".join(f"{t} ({p:.2f})" for t, p in zip(record["titles"], record["doc_posteriors"]))
            lines.append(f"  - documents (posterior): {docs}")
    return "\n".join(lines) + "\n"


def write_outputs(job: EvalJob, records: list[dict[str, Any]], metrics: dict[str, Any]) -> None:
    """predictions.jsonl, figures and report.html (``job.figures``), report.md, eval_job.json,
    threshold.json (``job.abstain_coverage``), then metrics.json: its presence means the run completed.

    Then checksums.json lists the files read back later (predictions, report, job, threshold, metrics) with their
    sizes and hashes (rag_models/file_manifest.py): rag-score refuses a predictions file cut or changed since.
    """
    job.out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = job.out_dir / "metrics.json"
    metrics_path.unlink(missing_ok=True)  # an old metrics.json must not vouch for new predictions
    with atomic_text_writer(job.out_dir / "predictions.jsonl") as out:
        for record in records:
            kept = {key: value for key, value in record.items() if key not in IN_MEMORY_ONLY}
            out.write(json.dumps(kept, ensure_ascii=False) + "\n")
    views: list[str] = []
    if job.figures:  # matplotlib and jinja2 are imported here only
        from training.evaluation.views import write_views

        views = write_views(job.out_dir, records, metrics)
    atomic_write_text(job.out_dir / "report.md", render_report(metrics, records, job.report_examples, views))
    if job.abstain_coverage is not None:
        chosen = threshold_record(metrics, float(job.abstain_coverage))
        atomic_write_text(job.out_dir / THRESHOLD_FILE, json.dumps(chosen, indent=2) + "\n")
    atomic_write_text(job.out_dir / "eval_job.json", json.dumps(asdict(job), indent=2, default=str) + "\n")
    atomic_write_text(metrics_path, json.dumps(metrics, indent=2) + "\n")
    listed = OUTPUT_FILES + ((THRESHOLD_FILE,) if job.abstain_coverage is not None else ())
    write_file_manifest(job.out_dir, files=listed)
