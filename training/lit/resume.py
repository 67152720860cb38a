"""Exact mid-epoch resume: the sampler position and every random stream, saved in each checkpoint.

A run killed mid-epoch and resumed from its last checkpoint must end with the same
weights as a run never interrupted. Lightning restores weights, optimizer,
scheduler and loop counters; two things it leaves to us:

- which examples the rest of the epoch holds: the datamodule's `ResumableSampler`
  (training/data/sampler.py), positioned through ``datamodule.resume_at``;
- the random streams (dropout masks): `capture_rng_state` / `restore_rng_state`.

`ResumeCallback` records both in the checkpoint and puts them back on resume.
The position counts batches the training step *finished*, not batches the
DataLoader fetched (Lightning prefetches one ahead).
"""
from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist

from rag_models.errors import InputError
from training.lit.resume_check import check_same_run, run_identity


def capture_rng_state() -> dict[str, Any]:
    """Every random stream training draws from, in a form `torch.load(weights_only=True)` accepts."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": _plain(random.getstate()),
        "numpy": _numpy_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back the streams saved by `capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(value: Any) -> Any:
    """Tuples -> lists, recursively: the safe unpickler of weights_only loads lists of ints."""
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def _numpy_state() -> list[Any]:
    """numpy's legacy global state with its key array as a plain list (no ndarray in checkpoints)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _gather(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's state, in rank order (a collective under DDP; the state itself when alone)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [state]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


class ResumeCallback(pl.Callback):
    """Saves the sampler position and every rank's RNG state in checkpoints; restores them on resume.

    The datamodule must implement ``resume_at(epoch, consumed_batches)``, which positions
    its `ResumableSampler` before the train dataloader is first iterated. Takes no constructor arguments.

    Raises InputError on resume when the datamodule has no ``resume_at``, or when the checkpoint was
    written with other training data, batch size or seed (`training.lit.resume_check`).
    """

    def __init__(self) -> None:
        self._epoch = 0
        self._consumed_batches = 0
        self._datamodule: Any = None
        self._rng_pending: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return "ResumeCallback"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remember the datamodule and this rank (Lightning restores callback state after setup)."""
        self._datamodule = trainer.datamodule
        self._rank, self._world = trainer.global_rank, trainer.world_size

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Count finished batches (runs before ModelCheckpoint, which Lightning always calls last)."""
        self._epoch = trainer.current_epoch
        self._consumed_batches = batch_idx + 1

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """An epoch-end checkpoint resumes at the start of the next epoch."""
        self._epoch = trainer.current_epoch + 1
        self._consumed_batches = 0

    def state_dict(self) -> dict[str, Any]:
        """Position and RNG of every rank, taken when the checkpoint is written (all ranks call this)."""
        rank_states = _gather(capture_rng_state())
        run = run_identity(self._datamodule, self._world) if self._datamodule is not None else {}
        return {"epoch": self._epoch, "consumed_batches": self._consumed_batches, "rng": rank_states, "run": run}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Position the datamodule's sampler now; keep the RNG until the first resumed batch."""
        self._epoch = state_dict["epoch"]
        self._consumed_batches = state_dict["consumed_batches"]
        if self._datamodule is None or not hasattr(self._datamodule, "resume_at"):
            raise InputError("exact resume needs a datamodule with resume_at(epoch, consumed_batches)",
                             setting="data._target_",
                             fix="use training.data.qa_datamodule.QADataModule or DprDataModule")
        check_same_run(state_dict.get("run"), run_identity(self._datamodule, self._world))
        self._datamodule.resume_at(self._epoch, self._consumed_batches)
        states = state_dict["rng"]
        # A resume on another world size cannot be exact; each rank then takes rank 0's streams.
        self._rng_pending = states[self._rank] if len(states) == self._world else states[0]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        """Restore RNG right before the first resumed step: nothing in between may draw from it."""
        if self._rng_pending is not None:
            restore_rng_state(self._rng_pending)
            self._rng_pending = None
