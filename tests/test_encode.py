"""Corpus encoding: shards, resume after a kill, rank split, refusals, and the encoder-backed embed fn."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from index.encode import encode_corpus, load_shards, make_embed_fn, shard_path
from index.passage_files import Passage
from index.passages import PassageStore
from rag_models.errors import InputError

N, D = 53, 6


class FakeEmbedder:
    """Deterministic vectors from the text; counts calls; optionally dies after `die_after` batches."""

    def __init__(self, die_after: int | None = None) -> None:
        self.die_after = die_after
        self.calls = 0
        self.rows_seen: list[str] = []

    def __call__(self, titles: list[str], texts: list[str]) -> np.ndarray:
        if self.die_after is not None and self.calls >= self.die_after:
            raise KeyboardInterrupt("killed mid-encoding")
        self.calls += 1
        self.rows_seen.extend(texts)
        numbers = np.array([int(text.split()[-1]) for text in texts], dtype=np.float32)  # (b,)
        return np.stack([numbers * (j + 1) + 2 for j in range(D)], axis=1)  # (b, D)


@pytest.fixture()
def store(tmp_path) -> PassageStore:
    corpus = [Passage(id=str(i + 1), title=f"t{i}", text=f"passage {i}") for i in range(N)]
    return PassageStore.from_passages(corpus, tmp_path / "store", progress=False)


def test_shards_concatenate_in_row_order(store, tmp_path):
    paths = encode_corpus(store, FakeEmbedder(), tmp_path / "enc", batch_size=4, shard_size=10, progress=False)
    assert [p.name for p in paths] == [f"shard_{i:05d}.npy" for i in range(6)]
    vectors = load_shards(tmp_path / "enc")
    assert vectors.shape == (N, D) and vectors.dtype == np.float32
    np.testing.assert_array_equal(vectors[:, 0], np.arange(N) + 2)  # row i encodes "passage i"
    merged = load_shards(tmp_path / "enc", out_path=tmp_path / "all.npy")
    np.testing.assert_array_equal(np.asarray(merged), vectors)
    assert isinstance(merged, np.memmap)


def test_resume_after_kill_gives_same_vectors_without_recomputing(store, tmp_path):
    reference = FakeEmbedder()
    encode_corpus(store, reference, tmp_path / "ref", batch_size=4, shard_size=10, progress=False)
    dying = FakeEmbedder(die_after=7)  # shard 0 = 3 batches, shard 1 = 3 batches, dies inside shard 2
    with pytest.raises(KeyboardInterrupt):
        encode_corpus(store, dying, tmp_path / "enc", batch_size=4, shard_size=10, progress=False)
    assert sorted(p.name for p in (tmp_path / "enc").glob("shard_*.npy")) == ["shard_00000.npy", "shard_00001.npy"]
    with pytest.raises(InputError, match="4 of 6 shards are missing"):
        load_shards(tmp_path / "enc")
    resumed = FakeEmbedder()
    encode_corpus(store, resumed, tmp_path / "enc", batch_size=4, shard_size=10, progress=False)
    assert resumed.rows_seen == [f"passage {i}" for i in range(20, N)]  # finished shards skipped
    np.testing.assert_array_equal(load_shards(tmp_path / "enc"), load_shards(tmp_path / "ref"))


def test_partial_shard_without_sidecar_is_recomputed(store, tmp_path):
    encode_corpus(store, FakeEmbedder(), tmp_path / "enc", batch_size=8, shard_size=20, progress=False)
    sidecar = shard_path(tmp_path / "enc", 1).with_suffix(".json")
    sidecar.unlink()  # as if killed between the array and its sidecar
    truncated = shard_path(tmp_path / "enc", 2)
    truncated.write_bytes(truncated.read_bytes()[:50])  # a torn file under the final name
    again = FakeEmbedder()
    encode_corpus(store, again, tmp_path / "enc", batch_size=8, shard_size=20, progress=False)
    assert again.rows_seen == [f"passage {i}" for i in range(20, N)]
    np.testing.assert_array_equal(load_shards(tmp_path / "enc")[:, 0], np.arange(N) + 2)


def test_ranks_split_shards_round_robin(store, tmp_path):
    seen = []
    for rank in range(3):
        embedder = FakeEmbedder()
        paths = encode_corpus(store, embedder, tmp_path / "enc", batch_size=5, shard_size=10, rank=rank,
                              world_size=3, progress=False)
        assert [int(p.stem.split("_")[1]) % 3 for p in paths] == [rank] * len(paths)
        seen.extend(embedder.rows_seen)
    assert sorted(seen) == sorted(f"passage {i}" for i in range(N))  # each row encoded exactly once
    np.testing.assert_array_equal(load_shards(tmp_path / "enc")[:, 0], np.arange(N) + 2)


def test_resume_refuses_another_plan(store, tmp_path):
    encode_corpus(store, FakeEmbedder(), tmp_path / "enc", batch_size=4, shard_size=10, progress=False)
    with pytest.raises(InputError, match="shard_size"):
        encode_corpus(store, FakeEmbedder(), tmp_path / "enc", batch_size=4, shard_size=11, progress=False)
    with pytest.raises(InputError, match="encoder"):
        encode_corpus(store, FakeEmbedder(), tmp_path / "enc", shard_size=10, encoder_name="other", progress=False)
    assert json.loads((tmp_path / "enc" / "encoding.json").read_text())["shard_size"] == 10


def test_bad_embedder_output_is_refused(store, tmp_path):
    with pytest.raises(InputError, match="one vector per passage"):
        encode_corpus(store, lambda titles, texts: np.zeros((1, D)), tmp_path / "enc", batch_size=4, progress=False)
    with pytest.raises(InputError, match="rank 3"):
        encode_corpus(store, FakeEmbedder(), tmp_path / "enc", rank=3, world_size=2, progress=False)


class _TinyEncoder(torch.nn.Module):
    """A stand-in DenseEncoder: mean of token embeddings (records the batch it saw)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(100, D)
        self.seen: dict = {}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.seen = {"grad": torch.is_grad_enabled(), "training": self.training, "shape": tuple(input_ids.shape)}
        mask = attention_mask.unsqueeze(-1).float()  # (B, L, 1)
        return (self.embedding(input_ids) * mask).sum(1) / mask.sum(1)  # (B, D)


def _pair_tokenizer(titles, texts, truncation, max_length, padding, return_tensors):
    """Title [SEP] text as word ids, like a BERT pair (enough to check the call convention)."""
    rows = [([1] + [len(w) for w in t.split()] + [2] + [len(w) for w in x.split()])[:max_length]
            for t, x in zip(titles, texts)]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def test_make_embed_fn_runs_eval_no_grad_and_truncates():
    encoder = _TinyEncoder().train()
    embed = make_embed_fn(encoder, _pair_tokenizer, max_length=5, fp16=True)  # fp16 ignored on CPU
    out = embed(["a title", "b"], ["some longer text here", "c"])
    assert out.shape == (2, D) and out.dtype == np.float32
    assert encoder.seen == {"grad": False, "training": False, "shape": (2, 5)}
