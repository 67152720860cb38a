"""Data of DPR bi-encoder pre-training: (question, positive, hard negatives) batches and the dev retrieval set.

A training batch of B questions carries B positives followed by B*H hard
negatives (H per question), as strings; the module tokenizes them. Every
question is scored against all B + B*H passages (in-batch negatives + hard
negatives). Passages equal to a question's own positive but sitting in another
column (two questions about one town in the same batch) are masked out of its
softmax instead of being pushed away: ``keys`` identify passages for that.

Dev: questions with their gold passage ids and answers, and the corpus to search (the whole
passage file for small corpora like the demo's; else the dev positives and hard
negatives pooled, which is what DPR's own validation ranks against).
"""
from __future__ import annotations

import functools
import zlib
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from index.passage_files import Passage, iter_passages
from rag_models.errors import InputError
from training.data.questions import DprExample, read_dpr_training
from training.data.sampler import EvalShardSampler, ResumableSampler


def passage_key(passage: Passage) -> int:
    """A stable 63-bit key of a passage (its id, else its text): equal passages, equal keys, on every rank."""
    basis = passage.id or f"{passage.title}\n{passage.text}"
    return zlib.crc32(basis.encode("utf-8")) << 31 | zlib.adler32(basis.encode("utf-8")) >> 1


class DprTrainSet(Dataset):
    """Training examples; each item is one question with its first positive and H hard negatives.

    Args:
        examples: DPR examples, each with at least one positive passage (only the first is used).
        hard_negatives: H, the most hard negatives an item carries (its first H; fewer when the example has
            fewer, and `collate_dpr` fills the gap).
    """

    def __init__(self, examples: list[DprExample], hard_negatives: int) -> None:
        self.examples = examples
        self.hard_negatives = hard_negatives

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ex = self.examples[index]
        return {"question": ex.question, "positive": ex.positives[0],
                "hard": list(ex.hard_negatives[: self.hard_negatives])}


def collate_dpr(items: list[dict[str, Any]], hard_negatives: int) -> dict[str, Any]:
    """B items -> questions, B + B*H passages (positives first), their keys (B + B*H,) and positive keys (B,).

    An example with fewer than H hard negatives borrows the next example's positive,
    so that every rank's batch has the same passage count (DDP gathers them).
    """
    positives = [item["positive"] for item in items]
    hard: list[Passage] = []
    for i, item in enumerate(items):
        filler = [positives[(i + 1 + j) % len(items)] for j in range(hard_negatives)]
        hard += (item["hard"] + filler)[:hard_negatives]
    passages = positives + hard
    return {
        "questions": [item["question"] for item in items],
        "titles": [p.title for p in passages],
        "texts": [p.text for p in passages],
        "keys": torch.tensor([passage_key(p) for p in passages], dtype=torch.int64),  # (B + B*H,)
        "positive_keys": torch.tensor([passage_key(p) for p in positives], dtype=torch.int64),  # (B,)
    }


class DevQuestions(Dataset):
    """Dev questions with the keys of their gold passages (positions past the end wrap, marked not real).

    Args:
        examples: the dev DPR examples; every positive of an example counts as a gold passage.
    """

    def __init__(self, examples: list[DprExample]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, position: int) -> dict[str, Any]:
        ex = self.examples[position % len(self.examples)]
        return {"question": ex.question, "gold": [passage_key(p) for p in ex.positives],
                "answers": list(ex.answers), "real": position < len(self.examples)}


def collate_dev(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Dev batch: questions, gold key lists, answer lists, real mask (B,)."""
    return {"questions": [i["question"] for i in items], "gold": [i["gold"] for i in items],
            "answers": [i["answers"] for i in items],
            "real": torch.tensor([i["real"] for i in items], dtype=torch.bool)}


class DprDataModule(pl.LightningDataModule):
    """DPR training / dev files (DPR's JSON or JSONL format) and the corpus searched for dev recall@k.

    Args:
        train_file: DPR training data: one JSON array (``.json``) or one object a line (``.jsonl``), either
            optionally gzipped; examples without a positive passage are dropped.
        dev_file: dev examples in the same format; None: no validation (and no ``val/recall@k``).
        passages_file: the corpus dev questions are searched in (``.tsv`` or ``.jsonl`` passages, all encoded
            at every validation: small corpora only); None: the dev examples' positives, hard and random
            negatives, pooled without repeats (what DPR's own validation ranks against).
        batch_size: B, training questions per device per step; each brings its positive and H hard
            negatives, so a step encodes B + B*H passages per device. Only full batches are used.
        eval_batch_size: dev questions per device per validation batch.
        hard_negatives: H, hard negatives per question (the file's first H ``hard_negative_ctxs``; an example
            with fewer borrows other questions' positives); 0: in-batch negatives only.
        max_train_examples: keep the first N training examples (after dropping those without a positive);
            None: all.
        max_dev_examples: keep the first N dev examples (they also make the pooled corpus); None: all.
        num_workers: DataLoader worker processes per device for training batches; dev batches load in the
            main process.
        seed: epoch e's shuffle is drawn from ``seed + e`` (the same on every rank).

    Raises InputError for ``hard_negatives < 0`` or ``batch_size < 1``; ``setup`` raises it for a malformed
    file or a training file without any positive passage.
    """

    def __init__(self, *, train_file: str, dev_file: str | None = None, passages_file: str | None = None,
                 batch_size: int = 16, eval_batch_size: int = 128, hard_negatives: int = 1,
                 max_train_examples: int | None = None, max_dev_examples: int | None = None,
                 num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        if hard_negatives < 0 or batch_size < 1:
            raise InputError(f"hard_negatives={hard_negatives}, batch_size={batch_size}", setting="data",
                             fix="use hard_negatives >= 0 and batch_size >= 1")
        self.train_file, self.dev_file, self.passages_file = train_file, dev_file, passages_file
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.hard_negatives = hard_negatives
        self.limits = (max_train_examples, max_dev_examples)
        self.num_workers, self.seed = num_workers, seed
        self.train_examples: list[DprExample] = []
        self.dev_examples: list[DprExample] = []
        self.corpus: list[Passage] = []
        self.train_sampler: ResumableSampler | None = None
        self._resume: tuple[int, int] | None = None

    def setup(self, stage: str | None = None) -> None:
        """Read the training and dev examples, and the dev corpus."""
        if not self.train_examples and stage in (None, "fit"):
            self.train_examples = read_dpr_training(self.train_file)[: self.limits[0]]
            if not self.train_examples:
                raise InputError("no examples with a positive passage", path=self.train_file,
                                 fix="DPR training needs positive_ctxs for each question")
        if self.dev_file and not self.dev_examples:
            self.dev_examples = read_dpr_training(self.dev_file)[: self.limits[1]]
            self.corpus = self._dev_corpus()

    def _dev_corpus(self) -> list[Passage]:
        """The passages dev questions are searched in, each once."""
        if self.passages_file:
            return list(iter_passages(self.passages_file))
        pooled: dict[int, Passage] = {}
        for ex in self.dev_examples:
            for p in (*ex.positives, *ex.hard_negatives, *ex.negatives):
                pooled.setdefault(passage_key(p), p)
        return list(pooled.values())

    def _rank_world(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def resume_at(self, epoch: int, consumed_batches: int) -> None:
        """Start the next iteration of ``epoch`` after ``consumed_batches`` batches (see ResumeCallback)."""
        self._resume = (epoch, consumed_batches)
        if self.train_sampler is not None:
            self.train_sampler.resume_at(epoch, consumed_batches * self.batch_size)

    def train_dataloader(self) -> DataLoader:
        """Shuffled per epoch; full batches only (every rank gathers the same number of passages)."""
        rank, world = self._rank_world()
        dataset = DprTrainSet(self.train_examples, self.hard_negatives)
        self.train_sampler = ResumableSampler(len(dataset), seed=self.seed, rank=rank, world_size=world, drop_last=True)
        if self._resume is not None:
            self.resume_at(*self._resume)
        collate = functools.partial(collate_dpr, hard_negatives=self.hard_negatives)  # picklable for workers
        return DataLoader(dataset, batch_size=self.batch_size, sampler=self.train_sampler, drop_last=True,
                          collate_fn=collate, num_workers=self.num_workers,
                          generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> list[DataLoader] | DataLoader:
        """Dev questions split over ranks (an empty list when there is no dev file)."""
        if not self.dev_examples:
            return []
        rank, world = self._rank_world()
        return DataLoader(DevQuestions(self.dev_examples), batch_size=self.eval_batch_size, collate_fn=collate_dev,
                          sampler=EvalShardSampler(len(self.dev_examples), rank=rank, world_size=world),
                          generator=torch.Generator().manual_seed(self.seed))
