"""The question-answer data of joint RAG training: files -> shuffled, resumable, per-rank batches of strings.

Batches hold strings, not token ids: the LightningModule tokenizes them with the
model's own tokenizers (question encoder and generator differ), so this module
needs to know nothing about the model. A batch is
``{"questions": [B str], "targets": [B str], "answers": [B list[str]], "real": (B,) bool}``
where ``targets`` are what the generator is trained to produce and ``answers`` all
accepted answers (for exact match); ``real`` is False for the padding examples
that give every rank the same number of evaluation batches (they are not scored).
"""
from __future__ import annotations

from typing import Any, Callable

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from rag_models.errors import InputError
from training.data.questions import QAExample, read_questions
from training.data.sampler import EvalShardSampler, ResumableSampler


def first_answer(example: QAExample) -> list[tuple[str, str]]:
    """One training pair per question, its first listed answer as the target."""
    return [(example.question, example.answers[0])]


def each_answer(example: QAExample) -> list[tuple[str, str]]:
    """One training pair per (question, accepted answer)."""
    return [(example.question, answer) for answer in dict.fromkeys(example.answers)]


# data.answers -> how a question with several accepted answers becomes training pairs
ANSWER_CHOICES: dict[str, Callable[[QAExample], list[tuple[str, str]]]] = {"first": first_answer, "each": each_answer}


class TrainPairs(Dataset):
    """(question, target answer, all answers) triples for training.

    Args:
        examples: the training questions, each with its accepted answers.
        choose: turns one example into its (question, target) pairs (a value of ``ANSWER_CHOICES``).
    """

    def __init__(self, examples: list[QAExample], choose: Callable[[QAExample], list[tuple[str, str]]]) -> None:
        self.items = [(q, target, list(ex.answers)) for ex in examples for q, target in choose(ex)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        question, target, answers = self.items[index]
        return {"question": question, "target": target, "answers": answers, "real": True}


class EvalExamples(Dataset):
    """Evaluation questions; positions past the end wrap around and are marked not real.

    Args:
        examples: the val or test questions; each is scored against all its answers (its first is the target).
    """

    def __init__(self, examples: list[QAExample]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, position: int) -> dict[str, Any]:
        example = self.examples[position % len(self.examples)]
        return {"question": example.question, "target": example.answers[0], "answers": list(example.answers),
                "real": position < len(self.examples)}


def collate_strings(items: list[dict[str, Any]]) -> dict[str, Any]:
    """List of examples -> one batch of string lists (and the ``real`` mask)."""
    return {
        "questions": [item["question"] for item in items],
        "targets": [item["target"] for item in items],
        "answers": [item["answers"] for item in items],
        "real": torch.tensor([item["real"] for item in items], dtype=torch.bool),  # (B,)
    }


def _load(path: str | None, split: str, limit: int | None, setting: str) -> list[QAExample]:
    """Read a question file (or ``hf:`` dataset), keeping the first ``limit`` questions."""
    if path is None:
        return []
    examples = read_questions(path, split=split)
    if not examples:
        raise InputError("no questions in it", setting=setting, fix="point it at a non-empty question file")
    return examples[:limit] if limit is not None else examples


class QADataModule(pl.LightningDataModule):
    """NQ-Open / TriviaQA / demo questions for RAG training, validation and test.

    Args:
        train_file: the training questions: NQ-Open ``.jsonl`` (or ``.jsonl.gz``), DPR ``.csv`` / ``.tsv``, a
            ``.source`` / ``.target`` pair (either file, their prefix, or a directory), or ``hf:name[:config]``.
            None only when not fitting.
        val_file, test_file: the validation and test questions, in the same formats; None: no validation /
            no test (rag-train then skips its test).
        batch_size: training pairs per device per step (with ``answers="each"`` a question with several
            answers is several pairs).
        eval_batch_size: val / test questions per device per batch.
        answers: how a question with several accepted answers becomes training pairs: "first" (one pair, its
            first listed answer the target) or "each" (one pair per distinct answer, RAG's NQ recipe). Val and
            test always score against all the answers.
        max_train_examples, max_val_examples, max_test_examples: keep the first N questions of each file
            (file order, before ``answers="each"`` expands them); None: all.
        train_split, val_split, test_split: the split read from an ``hf:`` source, or ``{split}.source`` in a
            directory (a "validation" split also finds ``val.source`` and ``dev.source``); unused otherwise.
        num_workers: DataLoader worker processes per device (kept alive across epochs when > 0); 0: the main
            process loads the batches.
        seed: epoch e's shuffle is drawn from ``seed + e`` (the same on every rank).
        drop_last: cut each epoch's order to a multiple of the world size W instead of wrapping around to
            pad it (at most W - 1 training pairs left out); a rank's last, partial batch is still trained on.
        group_by_length: 0 (off) or n: within each window of n global batches of the shuffled order, training
            pairs are sorted by length (characters of question + target), so a batch pads its questions and
            answers to similar lengths; exact resume is kept (`ResumableSampler`). The passages are retrieved
            later and are not grouped.

    Raises InputError for an unknown ``answers`` or a batch size below 1; ``setup`` raises it for a malformed
    or empty question file, and when fitting without training questions.
    """

    def __init__(
        self,
        *,
        train_file: str | None,
        val_file: str | None = None,
        test_file: str | None = None,
        batch_size: int = 8,
        eval_batch_size: int = 32,
        answers: str = "first",
        max_train_examples: int | None = None,
        max_val_examples: int | None = None,
        max_test_examples: int | None = None,
        train_split: str = "train",
        val_split: str = "validation",
        test_split: str = "test",
        num_workers: int = 0,
        seed: int = 0,
        drop_last: bool = False,
        group_by_length: int = 0,
    ) -> None:
        super().__init__()
        if group_by_length < 0:
            raise InputError(f"group_by_length={group_by_length}", setting="data.group_by_length",
                             fix="use 0 (off) or a window of n >= 1 batches")
        if answers not in ANSWER_CHOICES:
            raise InputError(f"unknown answers={answers!r}", setting="data.answers",
                             fix=f"use one of {sorted(ANSWER_CHOICES)}")
        if batch_size < 1 or eval_batch_size < 1:
            raise InputError(f"batch_size={batch_size}, eval_batch_size={eval_batch_size}", setting="data.batch_size",
                             fix="use positive batch sizes (per device)")
        self.files = {"train": (train_file, train_split, max_train_examples),
                      "val": (val_file, val_split, max_val_examples),
                      "test": (test_file, test_split, max_test_examples)}
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.choose = ANSWER_CHOICES[answers]
        self.num_workers = num_workers
        self.seed = seed
        self.drop_last = drop_last
        self.group_by_length = group_by_length
        self.train_sampler: ResumableSampler | None = None
        self._resume: tuple[int, int] | None = None
        self.splits: dict[str, list[QAExample]] = {}

    def setup(self, stage: str | None = None) -> None:
        """Read the files each stage needs (once)."""
        wanted = {"fit": ("train", "val"), "validate": ("val",),
                  "test": ("test",)}.get(stage or "", ("train", "val", "test"))
        for name in wanted:
            if name not in self.splits:
                path, split, limit = self.files[name]
                self.splits[name] = _load(path, split, limit, f"data.{name}_file")
        if stage == "fit" and not self.splits["train"]:
            raise InputError("no training questions", setting="data.train_file", fix="set data.train_file")

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def resume_at(self, epoch: int, consumed_batches: int) -> None:
        """Start the next iteration of ``epoch`` after ``consumed_batches`` batches (see ResumeCallback)."""
        self._resume = (epoch, consumed_batches)
        if self.train_sampler is not None:
            self.train_sampler.resume_at(epoch, consumed_batches * self.batch_size)

    def train_dataloader(self) -> DataLoader:
        """Shuffled per epoch from ``seed``; rank r of W gets every W-th example."""
        dataset = TrainPairs(self.splits["train"], self.choose)
        rank, world = self._rank_world()
        grouping = {}
        if self.group_by_length:
            grouping = {"lengths": [len(q) + len(t) for q, t, _ in dataset.items],
                        "group_size": self.group_by_length * self.batch_size * world}  # n global batches
        self.train_sampler = ResumableSampler(len(dataset), seed=self.seed, rank=rank, world_size=world,
                                              drop_last=self.drop_last, **grouping)
        if self._resume is not None:
            self.resume_at(*self._resume)
        return self._loader(dataset, self.train_sampler, self.batch_size)

    def _eval_loader(self, name: str) -> list[DataLoader] | DataLoader:
        examples = self.splits.get(name) or []
        if not examples:
            return []
        rank, world = self._rank_world()
        return self._loader(EvalExamples(examples), EvalShardSampler(len(examples), rank=rank, world_size=world),
                            self.eval_batch_size)

    def val_dataloader(self) -> list[DataLoader] | DataLoader:
        """Validation questions in file order, split over ranks (an empty list when there is no val file)."""
        return self._eval_loader("val")

    def test_dataloader(self) -> list[DataLoader] | DataLoader:
        """Test questions in file order, split over ranks."""
        return self._eval_loader("test")

    def _loader(self, dataset: Dataset, sampler: Sampler, batch_size: int) -> DataLoader:
        # Own generator: creating an iterator must not draw from the global RNG (exact resume).
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_strings,
                          num_workers=self.num_workers, generator=torch.Generator().manual_seed(self.seed),
                          persistent_workers=self.num_workers > 0)
