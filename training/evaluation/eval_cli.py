"""``rag-eval``: answer a question file with a trained RagModel and an index; write predictions and metrics.

    rag-eval checkpoint=runs/demo-<time>/rag_sequence/model questions=runs/demo-<time>/world/v1/test.jsonl \\
             index.path=runs/demo-<time>/index
    rag-eval ... decoding=beam n_docs=50                  # test-time docs may differ from training
    rag-eval ... index.path=other_index                   # swap the index, no retraining
    rag-eval ... trainer.devices=4                        # 4 processes (gloo on CPU, nccl on GPUs)
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
from omegaconf import DictConfig

from rag_models.cli_errors import command, reported
from rag_models.file_manifest import request_verify
from rag_models.leftovers import sweep_stale
from training.config import CONFIG_DIR
from training.evaluation.job import EvalJob, check_job, job_from_config, load_examples
from training.evaluation.processes import launch
from training.hydra_cli import precheck
from training.settings_check import check_settings

SHOWN = ("exact_match", "f1", "recall@1", "recall@5", "recall@20", "recall@100", "exact_match_stale", "num_total")


def evaluate(job: DictConfig | EvalJob) -> dict[str, Any]:
    """Evaluate a checkpoint on a question file; returns the metrics (also in ``out_dir/metrics.json``).

    ``job``: a composed ``eval`` config or an :class:`EvalJob`. Raises InputError for bad
    settings or input files, before any model is loaded or any process started.
    """
    if isinstance(job, DictConfig):
        check_settings(job, "eval")
        job = job_from_config(job)
    check_job(job)
    request_verify(job.verify)  # the processes started below inherit it
    examples = load_examples(job)  # a bad question file fails here, before any process or model starts
    if int(os.environ.get("RANK", "0")) == 0:
        sweep_stale(job.out_dir, command="rag-eval", recursive=False)  # files of a killed evaluation
    return launch(job, examples)  # one process, or torchrun's ranks, reuse them: no second pass over the file


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
    if metrics:  # rank 0 (under torchrun the other ranks have nothing to print)
        print(f"decoding: {metrics['decoding_summary']}")
        print(f"{summary_line(metrics)} ({metrics['seconds']:.1f} s)")
        print(f"wrote {cfg.out_dir}/predictions.jsonl, metrics.json, report.md")


@command("rag-eval")
def main() -> None:
    """Console entry point ``rag-eval``; Hydra overrides as arguments, checked before Hydra starts."""
    precheck(sys.argv[1:], "eval")
    _app()


if __name__ == "__main__":
    main()
