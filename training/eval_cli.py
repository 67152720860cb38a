"""``rag-eval``: answer a question file with a trained RagModel and an index; write predictions and metrics.

    rag-eval checkpoint=runs/demo/<time>/model questions=world/v1/test.jsonl index.path=runs/demo/index
    rag-eval ... decoding=beam n_docs=50                  # test-time docs may differ from training
    rag-eval ... index.path=other_index                   # swap the index, no retraining
    rag-eval ... trainer.devices=4                        # 4 processes (gloo on CPU, nccl on GPUs)
    torchrun --nproc_per_node 8 -m training.eval_cli ... index.sharded=true

From Python (rag-demo does this): ``evaluate(compose_config([...], config_name="eval"))`` or
``evaluate(checkpoint=..., questions=..., index_path=..., out_dir=...)``. With N processes each
decodes a contiguous share of the questions with its own retriever (a replica, or its slice of
a sharded index) and rank 0 gathers the records in question order: the same files as one process.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import DictConfig

from rag_models.errors import InputError
from training.evaluation import (
    EvalJob,
    check_job,
    decode_share,
    job_from_config,
    load_examples,
    load_parts,
    metrics_from_records,
    write_outputs,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
SHOWN = ("exact_match", "f1", "recall@1", "recall@5", "recall@20", "recall@100", "exact_match_stale", "num_total")


def share_bounds(total: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of the contiguous share of ``rank``: sizes differ by at most one, order is kept."""
    return total * rank // world, total * (rank + 1) // world


def uses_gpu(accelerator: str) -> bool:
    """Whether the ranks run on GPUs: asked for (gpu), or ``auto`` and present; InputError if asked but absent."""
    wanted = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if wanted and not torch.cuda.is_available():
        raise InputError("a GPU was asked for but CUDA is not available", setting="trainer.accelerator",
                         fix="Use trainer.accelerator=cpu")
    return wanted


def rank_device(accelerator: str, local_rank: int) -> torch.device:
    """cuda:local_rank (made the current device) when the ranks run on GPUs, else cpu."""
    if not uses_gpu(accelerator):
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def run_rank(job: EvalJob, rank: int = 0, world: int = 1, local_rank: int = 0) -> dict[str, Any] | None:
    """What every process runs: decode this rank's share; rank 0 gathers, scores and writes the files.

    Returns the metrics on rank 0 and None elsewhere. With world > 1 the process group must exist.
    """
    started = time.perf_counter()
    device = rank_device(job.accelerator, local_rank)
    examples = load_examples(job)
    parts = load_parts(job, device)
    start, end = share_bounds(len(examples), rank, world)
    # A sharded index searches collectively: every rank runs as many batches as the largest share.
    sharded = world > 1 and bool(job.index_options.get("sharded"))
    bounds = [share_bounds(len(examples), r, world) for r in range(world)]
    n_batches = max(-(-(e - s) // job.batch_size) for s, e in bounds) if sharded else None  # ceil, largest share
    records = decode_share(examples[start:end], parts, job, device=device, rank=rank, n_batches=n_batches)
    if world > 1:
        shares: list[Any] = [None] * world
        dist.all_gather_object(shares, records)  # rank order = question order (contiguous shares)
        records = [record for share in shares for record in share]
    if rank != 0:
        return None
    metrics = metrics_from_records(records, job, parts, world)
    metrics["seconds"] = round(time.perf_counter() - started, 3)
    write_outputs(job, records, metrics)
    return metrics


def _free_port() -> int:
    """A TCP port free on this host for the spawned ranks' rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _backend(job: EvalJob) -> str:
    """nccl when the ranks run on GPUs, gloo otherwise."""
    return "nccl" if uses_gpu(job.accelerator) else "gloo"


def _spawned_rank(rank: int, job: EvalJob, port: int, errors: Any) -> None:
    """Body of one spawned process: join the group, evaluate its share, report an InputError to the parent."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // job.devices))  # the ranks share the cores
    try:
        dist.init_process_group(_backend(job), init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=job.devices)
        run_rank(job, rank, job.devices, local_rank=rank)
    except InputError as err:
        errors.put(str(err))  # the parent re-raises it: a user error must read as one, not as a traceback
        raise SystemExit(2) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawn(job: EvalJob) -> dict[str, Any]:
    """Run ``job.devices`` processes on this host and return rank 0's metrics."""
    context = mp.get_context("spawn")
    errors = context.SimpleQueue()
    try:
        mp.start_processes(_spawned_rank, args=(job, _free_port(), errors), nprocs=job.devices, join=True,
                           start_method="spawn")
    except mp.ProcessExitedException:
        if not errors.empty():
            raise InputError(errors.get()) from None
        raise
    return json.loads((job.out_dir / "metrics.json").read_text(encoding="utf-8"))


def launch(job: EvalJob) -> dict[str, Any]:
    """One process, N spawned ones, or this process as one rank of torchrun (WORLD_SIZE in the environment)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # under torchrun: the launcher made the processes, we only join the group
        if not dist.is_initialized():
            dist.init_process_group(_backend(job))
        metrics = run_rank(job, dist.get_rank(), world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
        dist.barrier()
        return metrics or {}
    if job.devices > 1:
        return _spawn(job)
    return run_rank(job) or {}


def evaluate(cfg: DictConfig | EvalJob | None = None, **settings: Any) -> dict[str, Any]:
    """Evaluate a checkpoint on a question file; returns the metrics (also in ``out_dir/metrics.json``).

    Pass a composed ``eval`` config, an :class:`EvalJob`, or EvalJob's fields as keywords
    (``checkpoint``, ``questions``, ``out_dir``, ``index_path``, ``decoding``, ``n_docs``, ...).
    """
    if isinstance(cfg, DictConfig):
        job = job_from_config(cfg)
    elif isinstance(cfg, EvalJob):
        job = cfg
    else:
        paths = {k: Path(v) for k, v in settings.items() if k in ("checkpoint", "out_dir", "index_path") and v}
        job = EvalJob(**{**settings, **paths})
    check_job(job)
    load_examples(job)  # a bad question file fails here, before any process or model starts
    return launch(job)


def compose_eval_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The config ``rag-eval OVERRIDES`` would use, composed without running Hydra's app (tests, rag-demo)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name="eval", overrides=list(overrides))


def summary_line(metrics: dict[str, Any]) -> str:
    """The headline numbers of a run, one line."""
    shown = [f"{key} {metrics[key]:.4f}" if isinstance(metrics[key], float) else f"{key} {metrics[key]}"
             for key in SHOWN if key in metrics]
    return ", ".join(shown)


@hydra.main(config_path=str(CONFIG_DIR), config_name="eval", version_base=None)
def _app(cfg: DictConfig) -> None:
    """The Hydra application: evaluate and print where the files went."""
    try:
        metrics = evaluate(cfg)
    except InputError as err:
        print(f"rag-eval: error: {err}", file=sys.stderr)
        sys.exit(2)
    if metrics:  # rank 0 (under torchrun the other ranks have nothing to print)
        print(f"{summary_line(metrics)} ({metrics['seconds']:.1f} s)")
        print(f"wrote {cfg.out_dir}/predictions.jsonl, metrics.json, report.md")


def main() -> None:
    """Console entry point ``rag-eval``; Hydra overrides as arguments."""
    _app()


if __name__ == "__main__":
    main()
