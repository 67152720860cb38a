"""``rag-eval``: answer a question file with a trained RagModel and an index; write predictions and metrics.

    rag-eval checkpoint=runs/demo-<time>/rag_sequence/model questions=runs/demo-<time>/world/v1/test.jsonl \\
             index.path=runs/demo-<time>/index
    rag-eval ... decoding=beam n_docs=50                  # test-time docs may differ from training
    rag-eval ... index.path=other_index                   # swap the index, no retraining
    rag-eval ... trainer.devices=4                        # 4 processes (gloo on CPU, nccl on GPUs)
    rag-eval ... n_docs=[1,5,10,20,50]                    # a sweep: one retrieval, one model load, a dir each
    torchrun --nproc_per_node 8 -m training.evaluation.eval_cli ... index.sharded=true

From Python (rag-demo does this): ``evaluate(compose([...], config_name="eval"))`` with
`training.config.compose`, or ``evaluate(EvalJob(...))``. The job is read and checked
here (training/evaluation/job.py); the processes run in training/evaluation/processes.py.
"""
from __future__ import annotations

import os
import sys
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from rag_models.cli_errors import command, reported
from rag_models.file_manifest import request_verify
from rag_models.leftovers import sweep_stale
from training.config import CONFIG_DIR
from training.evaluation.job import EvalJob, check_job, job_from_config, load_examples
from training.evaluation.processes import launch
from training.evaluation.report import remove_earlier_outputs
from training.hydra_cli import precheck
from training.settings_check import check_settings

SHOWN = ("exact_match", "f1", "recall@1", "recall@5", "recall@20", "recall@100", "exact_match_stale", "num_total")


def evaluate(job: DictConfig | EvalJob) -> dict[str, Any]:
    """Evaluate a checkpoint on a question file; returns the metrics (also in ``out_dir/metrics.json``).

    ``job``: a composed ``eval`` config or an :class:`EvalJob`. A list ``n_docs`` in the config is a
    sweep (training/evaluation/sweep.py): returns its summary (``out_dir/summary.json``). Raises
    InputError for bad settings or input files, before any model is loaded or any process started.
    """
    from training.evaluation.sweep import evaluate_sweep, sweep_values

    values = None
    if isinstance(job, DictConfig):
        check_settings(job, "eval")
        values = sweep_values(job.get("n_docs"))
        job = job_from_config(OmegaConf.merge(job, {"n_docs": max(values)}) if values else job)
    check_job(job)
    request_verify(job.verify)  # the processes started below inherit it
    examples = load_examples(job)  # a bad question file fails here, before any process or model starts
    if int(os.environ.get("RANK", "0")) == 0:
        sweep_stale(job.out_dir, command="rag-eval", recursive=False)  # files of a killed evaluation
        inputs = [job.abstain_below] if isinstance(job.abstain_below, str) else []  # a threshold.json it reads
        if job.out_dir.is_dir() and (removed := remove_earlier_outputs(job.out_dir, keep=inputs)):
            print(f"rag-eval: note: removed {removed} files of an earlier evaluation in {job.out_dir}",
                  file=sys.stderr)
    # one process, or torchrun's ranks, reuse the questions read here: no second pass over the file
    return evaluate_sweep(job, values) if values else launch(job, examples)


def summary_line(metrics: dict[str, Any]) -> str:
    """The headline numbers of a run, one line."""
    shown = [f"{key} {metrics[key]:.4f}" if isinstance(metrics[key], float) else f"{key} {metrics[key]}"
             for key in SHOWN if key in metrics]
    return ", ".join(shown)


@hydra.main(config_path=str(CONFIG_DIR), config_name="eval", version_base=None)
def _app(cfg: DictConfig) -> None:
    """The Hydra application: evaluate and print where the files went."""
    with reported("rag-eval"):
        metrics = evaluate(cfg)
    if metrics.get("sweep"):
        for run in metrics["runs"]:
            print(f"n_docs {run['n_docs']}: {summary_line(run)}")
        print(f"wrote {cfg.out_dir}/n_docs=K/ for K in {metrics['values']}, summary.json, summary.md")
    elif metrics:  # rank 0 (under torchrun the other ranks have nothing to print)
        print(f"decoding: {metrics['decoding_summary']}")
        print(f"{summary_line(metrics)} ({metrics['seconds']:.1f} s)")
        views = ", report.html, figures (PNG, SVG)" if cfg.get("figures", True) else ""
        print(f"wrote {cfg.out_dir}/predictions.jsonl, metrics.json, report.md{views}")


@command("rag-eval")
def main() -> None:
    """Console entry point ``rag-eval``; Hydra overrides as arguments, checked before Hydra starts."""
    precheck(sys.argv[1:], "eval")
    _app()


if __name__ == "__main__":
    main()
