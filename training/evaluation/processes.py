"""How an evaluation runs on N processes: one, N spawned on this host, or the ranks of torchrun.

Each process answers a contiguous share of the questions with its own retriever
(a replica, or its slice of a sharded index) and rank 0 gathers the records in
question order, scores them and writes the files: the same files as one process.
Spawned processes die with the parent (rag_models/lifeline.py): after a ``kill -9``
of the run no worker goes on to write predictions or metrics.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rag_models.errors import InputError
from rag_models.lifeline import die_with_parent, tie_to_launcher
from training.data.questions import QAExample
from training.evaluation.job import AUTOCAST_DTYPES, EvalJob, load_examples
from training.evaluation.records import cut_questions, decode_share, load_parts
from training.evaluation.report import metrics_from_records, write_outputs


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


def run_rank(job: EvalJob, rank: int = 0, world: int = 1, local_rank: int = 0,
             examples: list[QAExample] | None = None) -> dict[str, Any] | None:
    """What every process runs: decode this rank's share; rank 0 gathers, scores and writes the files.

    ``examples``: the job's questions when the caller has read them already (None: read them here).
    Returns the metrics on rank 0 and None elsewhere. With world > 1 the process group must exist.
    """
    started = time.perf_counter()
    device = rank_device(job.accelerator, local_rank)
    examples = load_examples(job) if examples is None else examples
    parts = load_parts(job, device, world_size=world)
    cut = cut_questions(examples, parts.model, job) if rank == 0 else {}
    for warning in cut.values():
        print(f"rag-eval: warning: {warning}", file=sys.stderr)
    start, end = share_bounds(len(examples), rank, world)
    # A sharded index searches collectively: every rank runs as many batches as the largest share.
    sharded = world > 1 and job.index.sharded
    bounds = [share_bounds(len(examples), r, world) for r in range(world)]
    n_batches = max(-(-(e - s) // job.batch_size) for s, e in bounds) if sharded else None  # ceil, largest share
    dtype = AUTOCAST_DTYPES[job.precision]
    with torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        records = decode_share(examples[start:end], parts, job, rank=rank, n_batches=n_batches)
    if world > 1:
        shares: list[Any] = [None] * world
        dist.all_gather_object(shares, records)  # rank order = question order (contiguous shares)
        records = [record for share in shares for record in share]
    if rank != 0:
        return None
    metrics = metrics_from_records(records, job, parts, world, truncated=sorted(cut))
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


def _spawned_rank(rank: int, job: EvalJob, port: int, errors: Any, parent_pid: int) -> None:
    """Body of one spawned process: join the group, evaluate its share, report an InputError to the parent.

    It dies with ``parent_pid`` (the process that spawned it), SIGKILL included.
    """
    die_with_parent(parent_pid)
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
        mp.start_processes(_spawned_rank, args=(job, _free_port(), errors, os.getpid()), nprocs=job.devices,
                           join=True, start_method="spawn")
    except mp.ProcessExitedException:
        if not errors.empty():
            raise InputError(errors.get()) from None
        raise
    return json.loads((job.out_dir / "metrics.json").read_text(encoding="utf-8"))


def launch(job: EvalJob, examples: list[QAExample] | None = None) -> dict[str, Any]:
    """One process, N spawned ones, or this process as one rank of torchrun (WORLD_SIZE in the environment).

    ``examples``: the questions, already read by the caller (None: each process reads them).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # under torchrun: the launcher made the processes, we only join the group
        tie_to_launcher()  # each rank dies with torchrun's agent
        if not dist.is_initialized():
            dist.init_process_group(_backend(job))
        metrics = run_rank(job, dist.get_rank(), world, local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                           examples=examples)
        dist.barrier()
        return metrics or {}
    if job.devices > 1:
        return _spawn(job)
    return run_rank(job, examples=examples) or {}
