"""Length-grouped training order: batches of similar lengths, the same examples, and exact resume."""
from __future__ import annotations

import random

import pytest

from rag_models.errors import InputError
from training.data.qa_datamodule import QADataModule, TrainPairs, first_answer
from training.data.questions import QAExample
from training.data.sampler import ResumableSampler, group_by_length

_RNG = random.Random(0)
LENGTHS = [_RNG.randint(5, 80) for _ in range(64)]


def _padding(order: list[int], batch: int) -> int:
    """Pad positions when each batch of consecutive positions is padded to its longest example."""
    return sum(max(LENGTHS[i] for i in order[s: s + batch]) * len(order[s: s + batch])
               - sum(LENGTHS[i] for i in order[s: s + batch]) for s in range(0, len(order), batch))


def test_windows_are_sorted_longest_first_and_keep_their_examples():
    order = list(range(64))
    random.Random(1).shuffle(order)
    grouped = group_by_length(order, LENGTHS, 16)
    for start in range(0, 64, 16):
        window = grouped[start: start + 16]
        assert set(window) == set(order[start: start + 16])  # nothing leaves its window
        assert [LENGTHS[i] for i in window] == sorted((LENGTHS[i] for i in window), reverse=True)


def test_grouped_sampler_pads_less_and_resumes_exactly():
    plain = ResumableSampler(64, seed=5)
    grouped = ResumableSampler(64, seed=5, lengths=LENGTHS, group_size=32)
    order = list(grouped)
    assert sorted(order) == list(range(64))
    assert _padding(order, 8) < _padding(list(plain), 8) / 2  # the point of grouping
    grouped.resume_at(0, 24)
    assert list(grouped) == order[24:]  # mid-epoch resume: the rest of the same grouped order
    grouped.set_epoch(1)
    assert list(grouped) != order  # still a new shuffle each epoch
    ranks = [ResumableSampler(64, seed=5, rank=r, world_size=2, lengths=LENGTHS, group_size=32) for r in range(2)]
    assert [list(s) for s in ranks] == [order[0::2], order[1::2]]  # ranks split the same global order


def test_datamodule_groups_by_question_and_answer_length():
    examples = [QAExample(question="q" * n, answers=("a" * (n % 7 + 1),)) for n in LENGTHS]
    data = QADataModule(train_file=None, batch_size=4, group_by_length=4)
    data.splits = {"train": examples}
    loader = data.train_dataloader()
    pairs = TrainPairs(examples, first_answer).items
    expected = group_by_length(ResumableSampler(64, seed=0).global_order(0),
                               [len(q) + len(t) for q, t, _ in pairs], 16)
    assert list(data.train_sampler) == expected
    data.resume_at(0, 3)
    first = next(iter(data.train_dataloader()))
    assert first["questions"] == [pairs[i][0] for i in expected[12:16]]
    assert len(loader) == 16


def test_bad_grouping_settings_name_the_setting():
    with pytest.raises(InputError, match="group_by_length"):
        QADataModule(train_file=None, group_by_length=-1)
    with pytest.raises(InputError, match="group_by_length"):
        ResumableSampler(4, lengths=[1, 2, 3])
