"""Open-domain QA evaluation of a trained RagModel, one process's part: questions -> answers -> metrics.

For every batch of questions: retrieve the top ``max(n_docs, recall_depth)``
passages once, decode the answer from the first ``n_docs`` of them (the
configured strategy), and note the rank of the first passage that contains a
reference answer (recall@k). Each answer keeps its provenance: passage ids,
titles, and the posterior p(z|x,y) of each document.

Rank 0 scores the gathered records (the same scorer as ``rag-score``) and writes
``predictions.jsonl``, ``report.md`` and, last, ``metrics.json``, each
atomically: a killed run never leaves a complete-looking metrics file.
Process plumbing (N ranks, torchrun) and the ``rag-eval`` command live in
``training/eval_cli.py``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from rag_models.atomic import atomic_text_writer, atomic_write_text
from decoding.answer import DecodingSettings, answer
from rag_models.checkpoint import MODES, saved_mode
from rag_models.errors import InputError
from rag_models.rag import RagModel
from training.metrics import exact_match, first_answer_rank, score_predictions
from training.questions import QAExample, read_questions
from training.rag_predict import predict_closed_book

RECALL_KS = (1, 5, 20, 100)


@dataclass(frozen=True)
class EvalJob:
    """Everything one evaluation needs; ``configs/eval.yaml`` fills it (see :func:`job_from_config`)."""

    checkpoint: Path  # a RagModel.save_pretrained directory (rag-train's <run_dir>/model)
    questions: str  # any file read_questions reads, or hf:name[:config]
    out_dir: Path
    index_path: Path | None = None  # None only in closed-book mode
    index_options: dict[str, Any] = field(default_factory=dict)  # Retriever.from_dir keywords
    decoding: dict[str, Any] = field(default_factory=dict)  # strategy and its knobs (configs/decoding/)
    mode: str = "rag"  # rag | closed_book (the generator reads the question alone)
    n_docs: int | None = None  # None: the checkpoint's training n_docs
    split: str = "validation"  # hub split, or {split}.source inside a directory
    batch_size: int = 16
    recall_depth: int = 100  # passages retrieved for recall@k, k in RECALL_KS up to this depth
    limit: int | None = None  # first N questions only (smoke runs)
    devices: int = 1
    accelerator: str = "auto"  # auto | cpu | gpu
    report_examples: int = 5
    progress: bool = True


def _plain(node: Any) -> dict[str, Any]:
    """A config group as a plain dict without its ``_target_``."""
    if node is None:
        return {}
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    return {k: v for k, v in values.items() if k != "_target_"}


def _required(value: Any, setting: str, example: str) -> Any:
    """The value of a required setting, or InputError naming it."""
    if value is None or value == "???":
        raise InputError("is required", setting=setting, fix=f"Pass {setting}=... (e.g. {example})")
    return value


def job_from_config(cfg: DictConfig) -> EvalJob:
    """The typed job of a composed ``eval`` config (groups index and decoding, key trainer.devices, ...)."""
    index, trainer = _plain(cfg.get("index")), _plain(cfg.get("trainer"))
    index_path = index.pop("path", None)
    decoding = _plain(cfg.get("decoding"))
    decoding_n_docs = decoding.pop("n_docs", None)  # the top-level n_docs wins; rag-ask's knob is accepted too
    return EvalJob(
        checkpoint=Path(_required(cfg.get("checkpoint"), "checkpoint", "runs/demo/<time>/model")),
        questions=str(_required(cfg.get("questions"), "questions", "data/nq-test.jsonl")),
        out_dir=Path(_required(cfg.get("out_dir"), "out_dir", "runs/eval")),
        index_path=None if index_path is None else Path(index_path),
        index_options=index,
        decoding=decoding,
        mode=cfg.get("mode") or saved_mode(cfg.checkpoint),  # null: as the checkpoint was trained
        n_docs=cfg.get("n_docs") or decoding_n_docs,
        split=cfg.get("split", "validation"),
        batch_size=int(cfg.get("batch_size", 16)),
        recall_depth=int(cfg.get("recall_depth", 100)),
        limit=cfg.get("limit"),
        devices=int(trainer.get("devices", 1)),
        accelerator=str(trainer.get("accelerator", "auto")),
        report_examples=int(cfg.get("report_examples", 5)),
        progress=bool(cfg.get("progress", True)),
    )


def check_job(job: EvalJob) -> None:
    """Refuse bad settings and missing files before any model is loaded (the cheap checks first)."""
    if job.mode not in MODES:
        raise InputError(f"unknown mode {job.mode!r}", setting="mode", fix=f"Use one of {', '.join(MODES)}")
    if not job.checkpoint.is_dir():
        raise InputError("checkpoint directory not found", path=job.checkpoint,
                         fix="Pass checkpoint=DIR written by RagModel.save_pretrained (rag-train's <run_dir>/model)")
    if job.mode == "rag" and job.index_path is None:
        raise InputError("no index given", setting="index.path",
                         fix="Pass index.path=DIR (a rag-build-index output), or mode=closed_book")
    if job.mode == "rag" and not job.index_path.exists():
        raise InputError("index directory not found", path=job.index_path,
                         fix="Build it with `rag-build-index --out DIR`, or correct index.path")
    for setting, value in (("batch_size", job.batch_size), ("recall_depth", job.recall_depth),
                           ("trainer.devices", job.devices), ("n_docs", job.n_docs), ("limit", job.limit)):
        if value is not None and int(value) < 1:
            raise InputError(f"{value} must be at least 1", setting=setting)


def load_examples(job: EvalJob) -> list[QAExample]:
    """The questions to answer (the first ``limit``); InputError when empty or when a question repeats."""
    examples = read_questions(job.questions, split=job.split)[: job.limit]
    if not examples:
        raise InputError("no questions", path=job.questions, fix="Pass a file with at least one question")
    seen: dict[str, int] = {}
    for number, example in enumerate(examples, start=1):
        if example.question in seen:  # predictions are keyed by question text, as in NQ-Open
            raise InputError(f"question {number} repeats question {seen[example.question]}: {example.question!r}",
                             path=job.questions, fix="Remove the duplicate question")
        seen[example.question] = number
    return examples


@dataclass
class EvalParts:
    """The loaded model and retriever of one rank, and the depths they are used at."""

    model: RagModel
    retriever: Any | None  # index.retrieval.Retriever; None in closed-book mode
    n_docs: int  # docs the answer is decoded from (0: closed-book)
    depth: int  # docs retrieved per question: max(n_docs, recall depth), at most the index size


def question_vectors(model: RagModel, questions: list[str], device: torch.device) -> torch.Tensor:
    """Question vectors (B, D) without gradient."""
    enc = model.tokenize_questions(questions)
    with torch.no_grad():
        return model.embed_questions(enc["input_ids"].to(device), enc["attention_mask"].to(device))


def load_parts(job: EvalJob, device: torch.device) -> EvalParts:
    """Load the checkpoint and open the index; check that they fit together before any decoding."""
    model = RagModel.from_pretrained(job.checkpoint).to(device).eval()
    if job.mode == "closed_book":
        return EvalParts(model, None, 0, 0)
    from index.retrieval import Retriever  # faiss only where an index is used

    retriever = Retriever.from_dir(job.index_path, **job.index_options)
    dim = question_vectors(model, ["dimension probe"], device).shape[-1]  # (1, D)
    if dim != retriever.dim:
        raise InputError(
            f"the question encoder of checkpoint {job.checkpoint} gives {dim}-dimensional vectors, but the index "
            f"at {job.index_path} holds {retriever.dim}-dimensional ones", setting="index.path",
            fix="Use the index built with the context encoder this question encoder was trained with "
                "(`rag-build-index --encoder ...`), or the matching checkpoint")
    n_docs = job.n_docs or model.n_docs
    if n_docs > len(retriever):
        raise InputError(f"n_docs={n_docs} but the index holds {len(retriever)} passages", setting="n_docs",
                         fix=f"Use n_docs <= {len(retriever)}")
    return EvalParts(model, retriever, n_docs, min(max(n_docs, job.recall_depth), len(retriever)))


def _decode(questions: list[str], docs: Any, parts: EvalParts, job: EvalJob, device: torch.device) -> list[Any]:
    """Answers (text, score, titles, posteriors) from the first n_docs of ``docs``, or closed-book without docs."""
    if docs is None:  # the generator alone reads the question: plain greedy / beam search
        search = {**DecodingSettings().as_kwargs(), **job.decoding}  # defaults for keys a caller left out
        found = predict_closed_book(parts.model, questions, decoding=search, device=device)
        return [SimpleNamespace(text=p.text, score=None, titles=[], posteriors=[]) for p in found]
    # The same decoding as rag-ask; the docs are ours, so one search serves decoding and recall@k.
    return answer(questions, None, parts.model, docs=docs, n_docs=parts.n_docs, batch_size=len(questions),
                  progress=False, **job.decoding)


def answer_batch(batch: list[QAExample], parts: EvalParts, job: EvalJob, device: torch.device) -> list[dict[str, Any]]:
    """Retrieve once, decode from the first n_docs, and build one provenance record per question."""
    questions = [example.question for example in batch]
    docs = None
    if parts.retriever is not None:
        q = question_vectors(parts.model, questions, device)  # (B, D)
        docs = parts.retriever.retrieve(q.float(), parts.depth)  # (B, depth) ids, vectors, titles, texts
    records = []
    for i, (example, result) in enumerate(zip(batch, _decode(questions, docs, parts, job, device))):
        record = {"question": example.question, "prediction": result.text, "answers": list(example.answers),
                  "correct": exact_match(result.text, example.answers),
                  "score": None if result.score is None else float(result.score)}
        if docs is not None:
            rows = docs.ids[i, : parts.n_docs].tolist()
            record.update(doc_ids=parts.retriever.passages.ids(rows), titles=list(result.titles),
                          doc_posteriors=[round(float(p), 6) for p in result.posteriors],
                          answer_rank=first_answer_rank(example.answers, docs.texts[i]))
        if example.stale_answers:
            record.update(stale_answers=list(example.stale_answers),
                          correct_stale=exact_match(result.text, example.stale_answers))
        records.append(record)
    return records


def decode_share(examples: list[QAExample], parts: EvalParts, job: EvalJob, *, device: torch.device,
                 rank: int = 0, n_batches: int | None = None) -> list[dict[str, Any]]:
    """Records for this rank's questions, in order; a progress bar on rank 0.

    ``n_batches`` (sharded index only): run that many batches even when this rank has
    fewer, searching with no queries, so every rank joins every collective search.
    """
    own = -(-len(examples) // job.batch_size)  # ceil
    records: list[dict[str, Any]] = []
    with tqdm(total=len(examples), desc="eval", unit="q", disable=not job.progress or rank != 0) as bar:
        for start in range(0, len(examples), job.batch_size):
            batch = examples[start:start + job.batch_size]
            records.extend(answer_batch(batch, parts, job, device))
            bar.update(len(batch))
    for _ in range(max(0, (n_batches or 0) - own)):
        parts.retriever.retrieve(torch.zeros(0, parts.retriever.dim), parts.depth)
    return records


def metrics_from_records(records: list[dict[str, Any]], job: EvalJob, parts: EvalParts, world: int) -> dict[str, Any]:
    """EM / F1 (rag-score's scorer), recall@k, stale-answer EM, and what was run."""
    scores = score_predictions([{"question": r["question"], "answer": r["answers"]} for r in records],
                               {r["question"]: r["prediction"] for r in records})
    metrics: dict[str, Any] = dict(scores)
    for k in RECALL_KS:
        if parts.retriever is not None and k <= parts.depth:
            hits = [r["answer_rank"] is not None and r["answer_rank"] < k for r in records]
            metrics[f"recall@{k}"] = sum(hits) / len(hits)
    stale = [r for r in records if "stale_answers" in r]
    if stale:  # the changed questions of a swapped world: does the model still say the old answer?
        metrics["exact_match_stale"] = sum(r["correct_stale"] for r in stale) / len(stale)
        metrics["num_stale"] = len(stale)
    metrics.update(mode=job.mode, strategy=job.decoding.get("strategy"), n_docs=parts.n_docs,
                   index_path=None if job.index_path is None else str(job.index_path),
                   checkpoint=str(job.checkpoint), questions=job.questions, devices=world)
    return metrics


def render_report(metrics: dict[str, Any], records: list[dict[str, Any]], n_examples: int) -> str:
    """A short markdown report: what was run, the metrics table, and a few answered questions."""
    lines = ["# Evaluation report", "",
             f"- checkpoint: `{metrics['checkpoint']}`", f"- questions: `{metrics['questions']}`",
             f"- index: `{metrics['index_path']}`",
             f"- mode: {metrics['mode']}, decoding: {metrics['strategy']}, n_docs: {metrics['n_docs']}, "
             f"processes: {metrics['devices']}", "", "| metric | value |", "|---|---|"]
    for key, value in metrics.items():
        if key in ("exact_match", "f1", "exact_match_stale", "num_correct", "num_total", "num_stale",
                   "missing_predictions", "seconds") or key.startswith("recall@"):
            shown = f"{value:.4f}" if isinstance(value, float) and key != "seconds" else value
            lines.append(f"| {key} | {shown} |")
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
    """predictions.jsonl, report.md, eval_job.json, then metrics.json: its presence means the run completed."""
    job.out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = job.out_dir / "metrics.json"
    metrics_path.unlink(missing_ok=True)  # an old metrics.json must not vouch for new predictions
    with atomic_text_writer(job.out_dir / "predictions.jsonl") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    atomic_write_text(job.out_dir / "report.md", render_report(metrics, records, job.report_examples))
    settings = {f.name: getattr(job, f.name) for f in fields(job)}
    atomic_write_text(job.out_dir / "eval_job.json", json.dumps(settings, indent=2, default=str) + "\n")
    atomic_write_text(metrics_path, json.dumps(metrics, indent=2) + "\n")
