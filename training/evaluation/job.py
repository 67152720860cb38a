"""What one `rag-eval` run evaluates: the typed job composed from configs/eval.yaml, checked before any model loads."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from decoding.abstain import transfer_warning
from decoding.answer import DecodingSettings
from index.settings import IndexSettings
from rag_models.checkpoint import MODES, saved_mode
from rag_models.errors import InputError
from training.config import instantiate
from training.data.questions import QAExample, read_questions, refuse_repeats
from training.evaluation.selective import check_settings

LENGTH_SETTINGS = ("max_source_length", "max_question_length", "max_target_length")  # rag-eval may override these


@dataclass(frozen=True)
class EvalJob:
    """Everything one evaluation needs; ``configs/eval.yaml`` fills it (see :func:`job_from_config`).

    Fields:
        checkpoint: a saved RagModel directory (rag-train's <run_dir>/model).
        questions: any file `read_questions` reads, or hf:name[:config].
        out_dir: where predictions.jsonl, metrics.json, report.md and eval_job.json go.
        index: the `index` group (its ``path`` is needed in rag mode, unused closed-book).
        decoding: the `decoding` group (strategy and its knobs); its n_docs is replaced by ``n_docs``.
        mode: "rag", or "closed_book" (the generator reads the question alone).
        n_docs: docs read per answer; None = the checkpoint's training n_docs.
        split: hub split, or {split}.source inside a directory.
        batch_size: questions retrieved and decoded together (per process).
        recall_depth: passages retrieved per question for recall@k (k in RECALL_KS up to this depth).
        limit: the first N questions only (smoke runs); None = all.
        devices: processes, each answering a contiguous share of the questions.
        accelerator: "auto" (GPUs when present), "cpu" or "gpu".
        precision: "32-true", or "bf16-mixed" / "16-mixed": encoders and generator under autocast, scores and
            log-likelihoods still float32 (rag_models/precision.py); a key of `AUTOCAST_DTYPES`.
        report_examples: answered questions shown in report.md.
        progress: a progress bar over the questions (rank 0).
        verify: hash every file of the checkpoint and the index against their checksums.json (sizes are always
            checked; rag_models/file_manifest.py).
        max_source_length, max_question_length, max_target_length: replace the checkpoint's length settings
            (`load_rag_model` overrides); None = as saved. Longer questions are cut to fit, never refused.
        abstain_below: answers whose confidence is under this are marked abstained: a number, or a
            threshold.json written by ``abstain_coverage`` (training/evaluation/selective.py); None: none.
        abstain_on: the confidence, "score" or "posterior" (top doc posterior); None: score, or the file's.
        abstain_coverage: choose the threshold that answers this fraction of the questions, write threshold.json.
        figures: draw the figures (PNG, SVG) and write report.html beside report.md.
    """

    checkpoint: Path
    questions: str
    out_dir: Path
    index: IndexSettings = field(default_factory=IndexSettings)
    decoding: DecodingSettings = field(default_factory=DecodingSettings)
    mode: str = "rag"
    n_docs: int | None = None
    split: str = "validation"
    batch_size: int = 16
    recall_depth: int = 100
    limit: int | None = None
    devices: int = 1
    accelerator: str = "auto"
    precision: str = "32-true"
    report_examples: int = 5
    progress: bool = True
    verify: bool = False
    max_source_length: int | None = None
    max_question_length: int | None = None
    max_target_length: int | None = None
    abstain_below: float | str | None = None
    abstain_on: str | None = None
    abstain_coverage: float | None = None
    figures: bool = True

    @property
    def model_overrides(self) -> dict[str, int]:
        """The checkpoint settings this job replaces (lengths and n_docs), for `load_rag_model`."""
        names = ("max_source_length", "max_question_length", "max_target_length", "n_docs")
        return {name: int(getattr(self, name)) for name in names if getattr(self, name) is not None}

    @property
    def index_path(self) -> Path | None:
        """The index directory, or None (closed-book)."""
        return None if self.index.path is None else Path(self.index.path)


# Lightning's precision names -> the autocast dtype rag-eval decodes under (None: no autocast)
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"32-true": None, "32": None, "bf16-mixed": torch.bfloat16,
                                                  "16-mixed": torch.float16}


def _precision(name: str) -> str:
    """A precision name of `AUTOCAST_DTYPES`, or InputError naming trainer.precision."""
    if name not in AUTOCAST_DTYPES:
        raise InputError(f"unknown precision {name!r}", setting="trainer.precision",
                         fix=f"use one of {sorted(AUTOCAST_DTYPES)}")
    return name


def _required(value: Any, setting: str, example: str) -> Any:
    """The value of a required setting, or InputError naming it."""
    if value is None or value == "???":
        raise InputError("is required", setting=setting, fix=f"Pass {setting}=... (e.g. {example})")
    return value


def job_from_config(cfg: DictConfig) -> EvalJob:
    """The typed job of a composed ``eval`` config (groups index and decoding, key trainer.devices, ...)."""
    checkpoint = Path(_required(cfg.get("checkpoint"), "checkpoint", "runs/demo-<time>/rag_sequence/model"))
    decoding: DecodingSettings = instantiate(cfg.decoding)
    trainer = cfg.get("trainer") or {}
    return EvalJob(
        checkpoint=checkpoint,
        questions=str(_required(cfg.get("questions"), "questions", "data/nq-test.jsonl")),
        out_dir=Path(_required(cfg.get("out_dir"), "out_dir", "runs/eval")),
        index=instantiate(cfg.index),
        # The top-level n_docs wins; one added to the decoding group (+decoding.n_docs=N) counts too.
        decoding=replace(decoding, n_docs=None),
        mode=cfg.get("mode") or saved_mode(checkpoint),  # null: as the checkpoint was trained
        n_docs=cfg.get("n_docs") if cfg.get("n_docs") is not None else decoding.n_docs,  # 0 is refused, not None
        split=cfg.get("split", "validation"),
        batch_size=int(cfg.get("batch_size", 16)),
        recall_depth=int(cfg.get("recall_depth", 100)),
        limit=cfg.get("limit"),
        devices=int(trainer.get("devices", 1)),
        accelerator=str(trainer.get("accelerator", "auto")),
        precision=_precision(str(trainer.get("precision", "32-true"))),
        report_examples=int(cfg.get("report_examples", 5)),
        progress=bool(cfg.get("progress", True)),
        verify=bool(cfg.get("verify", False)),
        **{name: cfg.get(name) for name in LENGTH_SETTINGS},
        abstain_below=cfg.get("abstain_below"), abstain_on=cfg.get("abstain_on"),
        abstain_coverage=cfg.get("abstain_coverage"), figures=bool(cfg.get("figures", True)),
    )


def check_job(job: EvalJob) -> None:
    """Refuse bad settings and missing files before any model is loaded (the cheap checks first)."""
    if job.mode not in MODES:
        raise InputError(f"unknown mode {job.mode!r}", setting="mode", fix=f"Use one of {', '.join(MODES)}")
    if not job.checkpoint.is_dir():
        raise InputError("checkpoint directory not found", path=job.checkpoint,
                         fix="Pass checkpoint=DIR written by save_rag_model (rag-train's <run_dir>/model)")
    if job.mode == "rag" and job.index_path is None:
        raise InputError("no index given", setting="index.path",
                         fix="Pass index.path=DIR (a rag-build-index output), or mode=closed_book")
    if job.mode == "rag" and not job.index_path.exists():
        raise InputError("index directory not found", path=job.index_path,
                         fix="Build it with `rag-build-index --out DIR`, or correct index.path")
    for setting, value in (("batch_size", job.batch_size), ("recall_depth", job.recall_depth),
                           ("trainer.devices", job.devices), ("n_docs", job.n_docs), ("limit", job.limit),
                           *((name, getattr(job, name)) for name in LENGTH_SETTINGS)):
        if value is not None and int(value) < 1:
            raise InputError(f"{value} must be at least 1", setting=setting, fix="Give 1 or more")
    check_abstention(job)


def check_abstention(job: EvalJob) -> None:
    """Refuse abstention settings that cannot apply: closed-book answers, an unreadable or non-finite threshold,
    both ways, ``abstain_on`` alone. Warns (stderr) when a threshold file was chosen with another checkpoint or
    decoder (`decoding.abstain.transfer_warning`)."""
    if job.abstain_below is None and job.abstain_coverage is None:
        check_settings(None, job.abstain_on, None)  # abstain_on alone is refused
        return
    if job.mode == "closed_book":
        raise InputError("closed-book answers carry no confidence to abstain on", setting="abstain_below",
                         fix="Drop abstain_below / abstain_coverage, or evaluate in rag mode")
    check_settings(job.abstain_below, job.abstain_on, job.abstain_coverage)
    if job.abstain_below is not None:
        decoder = {"strategy": job.decoding.strategy, "n_docs": job.n_docs}  # None: the checkpoint's, not known yet
        warning = transfer_warning(job.abstain_below, job.checkpoint, decoder)
        if warning:
            print(f"rag-eval: warning: {warning}", file=sys.stderr)


def load_examples(job: EvalJob) -> list[QAExample]:
    """The questions to answer (the first ``limit``); InputError when empty or when a question repeats."""
    examples = read_questions(job.questions, split=job.split)[: job.limit]
    if not examples:
        raise InputError("no questions", path=job.questions, fix="Pass a file with at least one question")
    refuse_repeats(examples, job.questions)  # predictions are keyed by question text, as in NQ-Open
    return examples
