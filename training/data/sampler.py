"""The training order of exact mid-epoch resume: a seeded sampler that can start at any position.

A run killed mid-epoch and resumed from its last checkpoint must end with the same
weights as a run never interrupted. Which examples the rest of the epoch holds is
this sampler's part: epoch e's order is drawn from ``seed + e`` alone (no global
RNG), and `resume_at` skips what was already consumed. The random streams and the
checkpointed position are `training/lit/resume.py`'s part.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from rag_models.errors import InputError


class ResumableSampler(Sampler[int]):
    """Shuffled (or ordered) indices of a dataset, this rank's share, resumable at any position.

    Epoch e's global order is a permutation drawn from ``seed + e``. Rank r of W takes
    positions r, r+W, r+2W, ... of it, so that W ranks with batch b see, step by step,
    exactly the examples one process with batch W*b sees. The order is padded by
    wrapping around (or cut, with ``drop_last``) to a multiple of W, so every rank has
    the same number of examples: DDP needs every rank to take the same number of steps.

    Args:
        num_examples: examples in the dataset (all ranks together), at least 1.
        seed: epoch e's permutation is drawn from ``seed + e``.
        shuffle: False keeps the dataset order (still padded or cut to a multiple of W).
        rank: r, this process's rank, in [0, world_size).
        world_size: W, the number of processes sharing the dataset.
        drop_last: cut the order to a multiple of W (at most W - 1 examples left out) instead of wrapping
            around to pad it.
        lengths: per example, a length to group by (e.g. characters of question + answer); None: no grouping.
        group_size: with ``lengths``, the shuffled order is cut into windows of this many positions and each
            window is sorted longest first, so that a batch (W*b consecutive positions) holds examples of
            similar length and pads little; a window of many batches keeps the epoch shuffled at large.
            The grouped order is still a function of ``seed + e`` alone: resume stays exact.

    Raises InputError for an empty dataset, a rank outside [0, world_size), lengths not one per example, or
    lengths with a group_size below 1.
    """

    def __init__(self, num_examples: int, *, seed: int = 0, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False, lengths: list[int] | None = None,
                 group_size: int = 0) -> None:
        if num_examples < 1:
            raise InputError("the training set is empty", setting="data.train_file",
                             fix="point it at a file with questions")
        if not 0 <= rank < world_size:
            raise InputError(f"rank {rank} outside a world of {world_size}", setting="trainer.devices")
        if lengths is not None and (len(lengths) != num_examples or group_size < 1):
            raise InputError(f"{len(lengths)} lengths for {num_examples} examples, group_size={group_size}",
                             setting="data.group_by_length", fix="give one length per example and a window >= 1")
        self.num_examples = num_examples
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.lengths = lengths
        self.group_size = group_size
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
        if self.lengths is not None:
            order = group_by_length(order, self.lengths, self.group_size)
        total = len(self) * self.world_size
        while len(order) < total:  # wrap around: a few examples appear twice in this epoch
            order += order[: total - len(order)]
        return order[:total]

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0  # a resume position is used once
        mine = self.global_order(self.epoch)[self.rank :: self.world_size]
        return iter(mine[skip:])


def group_by_length(order: list[int], lengths: list[int], group_size: int) -> list[int]:
    """``order`` with each window of ``group_size`` consecutive positions sorted by length, longest first.

    The sort is stable (ties keep their shuffled order) and never moves an example out of its window.
    """
    return [i for start in range(0, len(order), group_size)
            for i in sorted(order[start : start + group_size], key=lambda i: -lengths[i])]


class EvalShardSampler(Sampler[int]):
    """Positions r, r+W, ... of the examples padded to a multiple of W: equal batch counts on every rank.

    Args:
        num_examples: evaluation examples (all ranks together); the dataset wraps the padding positions
            past the end and marks them not real.
        rank: r, this process's rank, in [0, world_size) (not checked).
        world_size: W, the number of processes sharing the examples, at least 1 (not checked).
    """

    def __init__(self, num_examples: int, *, rank: int = 0, world_size: int = 1) -> None:
        self.total = -(-num_examples // world_size) * world_size
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return self.total // self.world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total, self.world_size))
