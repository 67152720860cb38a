"""``rag-eval ... n_docs=[1,5,10,20,50]``: one evaluation per n_docs, one model load and one retrieval.

Each batch of questions is embedded and searched once, as deep as the largest n_docs (or
recall_depth); every value decodes from the first n_docs of those docs. Docs come back
sorted by score, so the first k of a deeper search are what a k-deep search returns (for
exact indexes: Flat, exact; an approximate index may find other docs at another depth), and
the doc scores are recomputed from their vectors (q . d): each value's files equal those of
a separate run with that n_docs. Writes ``<out_dir>/n_docs=K/`` (the files of one run) for
each value, then ``summary.json``, ``summary.md`` and the EM/F1-vs-n_docs figure.
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from omegaconf import ListConfig
from tqdm.auto import tqdm

from decoding.retrieve import retrieve
from rag_models.atomic import atomic_write_text
from rag_models.errors import InputError
from training.evaluation.job import EvalJob, load_examples
from training.evaluation.processes import rank_device
from training.evaluation.records import cut_questions, load_parts, prediction_records
from training.evaluation.report import metrics_from_records, write_outputs

SUMMARY_KEYS = ("n_docs", "exact_match", "f1", "recall@1", "recall@5", "recall@20", "recall@100", "coverage",
                "exact_match_answered", "seconds")


def sweep_values(n_docs: Any) -> tuple[int, ...] | None:
    """The sorted distinct values of a list-valued ``n_docs`` (a sweep), or None for a single value.

    Raises InputError for an empty list or a value under 1.
    """
    if not isinstance(n_docs, (list, tuple, ListConfig)):
        return None
    values = tuple(sorted({int(v) for v in n_docs}))
    if not values or values[0] < 1:
        raise InputError(f"n_docs={list(n_docs)}: a sweep needs values of at least 1", setting="n_docs",
                         fix="Pass e.g. n_docs=[1,5,10,20,50]")
    return values


def value_dir(out_dir: Path, n_docs: int) -> Path:
    """Where the files of one swept value go."""
    return Path(out_dir) / f"n_docs={n_docs}"


def evaluate_sweep(job: EvalJob, values: Sequence[int]) -> dict[str, Any]:
    """Evaluate ``job`` at each n_docs of ``values`` in one process; returns the summary (also summary.json).

    ``job.n_docs`` is ignored. Raises InputError for a closed-book job, several processes, or a value above
    the index size.
    """
    if job.mode == "closed_book":
        raise InputError("closed-book runs read no docs", setting="n_docs", fix="Pass one n_docs, or mode=rag")
    if job.devices != 1:
        raise InputError("an n_docs sweep runs in one process", setting="trainer.devices",
                         fix="Use trainer.devices=1, or one rag-eval per n_docs")
    started = time.perf_counter()
    examples = load_examples(job)
    parts = load_parts(replace(job, n_docs=max(values)), rank_device(job.accelerator, 0))
    cut = cut_questions(examples, parts.model, job)
    size = len(parts.retriever)
    each = {v: (replace(job, n_docs=v, out_dir=value_dir(job.out_dir, v)),
                replace(parts, n_docs=v, depth=min(max(v, job.recall_depth), size))) for v in values}
    records: dict[int, list[dict[str, Any]]] = {v: [] for v in values}
    seconds = dict.fromkeys(values, 0.0)
    with tqdm(total=len(examples), desc=f"sweep n_docs={list(values)}", unit="q", disable=not job.progress) as bar:
        for start in range(0, len(examples), job.batch_size):
            batch = examples[start:start + job.batch_size]
            retrieval = retrieve(parts.model, parts.retriever, [e.question for e in batch], parts.depth)
            for v, (value_job, value_parts) in each.items():
                clock = time.perf_counter()
                records[v].extend(prediction_records(batch, value_parts, value_job, retrieval=retrieval))
                seconds[v] += time.perf_counter() - clock
            bar.update(len(batch))
    rows = []
    for v, (value_job, value_parts) in each.items():
        metrics = metrics_from_records(records[v], value_job, value_parts, 1, truncated=sorted(cut))
        metrics["seconds"] = round(seconds[v], 3)  # decoding this value (the shared retrieval not counted)
        write_outputs(value_job, records[v], metrics)
        rows.append(metrics)
    summary = {"sweep": "n_docs", "values": list(values), "decoding_summary": rows[-1]["decoding_summary"],
               "strategy": rows[-1]["strategy"], "checkpoint": str(job.checkpoint), "questions": job.questions,
               "index_path": str(job.index_path), "seconds": round(time.perf_counter() - started, 3),
               "retrieval_depth": parts.depth,
               "runs": [{key: m[key] for key in SUMMARY_KEYS if key in m} | {"dir": f"n_docs={m['n_docs']}"}
                        for m in rows]}
    write_summary(job.out_dir, summary, figures=job.figures)
    return summary


def write_summary(out_dir: Path, summary: dict[str, Any], *, figures: bool = True) -> None:
    """summary.md (a table of each value, the figure), then summary.json (written last: the sweep completed)."""
    lines = ["# n_docs sweep", "", f"- checkpoint: `{summary['checkpoint']}`", f"- questions: `{summary['questions']}`",
             f"- index: `{summary['index_path']}`",
             f"- decoding at n_docs={max(summary['values'])}: {summary['decoding_summary']} (one retrieval "
             f"{summary['retrieval_depth']} deep, decoded at each n_docs of the table)", ""]
    keys = [key for key in SUMMARY_KEYS if all(key in run for run in summary["runs"])]
    lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for run in summary["runs"]:
        cells = [f"{run[k]:.4f}" if isinstance(run[k], float) and k != "seconds" else str(run[k]) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    if figures:
        from training.evaluation.figures import em_vs_n_docs

        lines += ["", em_vs_n_docs({summary["strategy"]: summary["runs"]}, Path(out_dir)).markdown()]
    lines += ["", "Each value's predictions, metrics, report.md and report.html: "
              + ", ".join(f"[n_docs={v}](n_docs={v}/report.md)" for v in summary["values"])]
    atomic_write_text(Path(out_dir) / "summary.md", "\n".join(lines) + "\n")
    atomic_write_text(Path(out_dir) / "summary.json", json.dumps(summary, indent=2) + "\n")
