"""Exact mid-epoch resume: a seeded, positionable sampler and the RNG state, saved in every checkpoint.

A run killed mid-epoch and resumed from its last checkpoint must end with the same
weights as a run never interrupted. Lightning restores weights, optimizer,
scheduler and loop counters; two things it leaves to us:

- which examples the rest of the epoch holds: `ResumableSampler` draws epoch e's
  order from ``seed + e`` alone (no global RNG), and can start at any position;
- the random streams (dropout masks): `capture_rng_state` / `restore_rng_state`.

`ResumeCallback` records both in the checkpoint and puts them back on resume.
The position counts batches the training step *finished*, not batches the
DataLoader fetched (Lightning prefetches one ahead).
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from rag_models.errors import InputError


class ResumableSampler(Sampler[int]):
    """Shuffled (or ordered) indices of a dataset, this rank's share, resumable at any position.

    Epoch e's global order is a permutation drawn from ``seed + e``. Rank r of W takes
    positions r, r+W, r+2W, ... of it, so that W ranks with batch b see, step by step,
    exactly the examples one process with batch W*b sees. The order is padded by
    wrapping around (or cut, with ``drop_last``) to a multiple of W, so every rank has
    the same number of examples: DDP needs every rank to take the same number of steps.
    """

    def __init__(self, num_examples: int, *, seed: int = 0, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False) -> None:
        if num_examples < 1:
            raise InputError("the training set is empty", setting="data.train_file", fix="point it at a file with questions")
        if not 0 <= rank < world_size:
            raise InputError(f"rank {rank} outside a world of {world_size}", setting="trainer.devices")
        self.num_examples = num_examples
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self._skip = 0  # examples of `self.epoch` this rank already consumed before a resume

    def __len__(self) -> int:
        """Examples this rank sees in a full epoch (the same on every rank)."""
        if self.drop_last:
            return self.num_examples // self.world_size
        return -(-self.num_examples // self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before each epoch; a pending resume position survives only for its own epoch."""
        if epoch != self.epoch:
            self._skip = 0
        self.epoch = epoch

    def resume_at(self, epoch: int, consumed: int) -> None:
        """Make the next iteration of ``epoch`` start after ``consumed`` examples of this rank."""
        self.epoch = epoch
        self._skip = consumed

    def global_order(self, epoch: int) -> list[int]:
        """The order of all examples in ``epoch``, padded or cut to a multiple of the world size."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_examples, generator=generator).tolist()
        else:
            order = list(range(self.num_examples))
        total = len(self) * self.world_size
        while len(order) < total:  # wrap around: a few examples appear twice in this epoch
            order += order[: total - len(order)]
        return order[:total]

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0  # a resume position is used once
        mine = self.global_order(self.epoch)[self.rank :: self.world_size]
        return iter(mine[skip:])


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
    its `ResumableSampler` before the train dataloader is first iterated.
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
        return {"epoch": self._epoch, "consumed_batches": self._consumed_batches, "rng": rank_states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Position the datamodule's sampler now; keep the RNG until the first resumed batch."""
        self._epoch = state_dict["epoch"]
        self._consumed_batches = state_dict["consumed_batches"]
        if self._datamodule is None or not hasattr(self._datamodule, "resume_at"):
            raise InputError("exact resume needs a datamodule with resume_at(epoch, consumed_batches)",
                             setting="data._target_", fix="use training.datamodule.QADataModule or DprDataModule")
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
