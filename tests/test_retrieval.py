"""Retriever: from_dir with both backends, RetrievedDocs contents, hot-swap and its refusals."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from index.faiss_index import DenseIndex
from index.passage_files import Passage
from index.passages import PassageStore
from index.retrieval import Retriever
from index.settings import IndexSettings
from index.torch_index import TorchIndex
from rag_models.docs import RetrievedDocs
from rag_models.errors import InputError

N, D, K = 40, 8, 4
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "index"


def _world(root, name: str, *, dim: int = D, seed: int = 0, factory: str = "Flat") -> tuple:
    """A build-CLI-shaped directory root/name/{passages,index} whose passages say which world they are from."""
    corpus = [Passage(id=str(i + 1), title=f"{name} title {i}", text=f"in world {name}, fact {i}") for i in range(N)]
    store = PassageStore.from_passages(corpus, root / name / "passages", progress=False)
    vectors = np.random.default_rng(seed).standard_normal((N, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)  # unit norm: each vector's best match is itself
    builder = TorchIndex.build(vectors, passages=store) if factory == "exact" else \
        DenseIndex.build(vectors, factory=factory, passages=store, progress=False)
    builder.save(root / name / "index")
    return root / name, vectors


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_retrieve_returns_ids_scores_vectors_and_texts(tmp_path, backend):
    world, vectors = _world(tmp_path, "A")
    retriever = Retriever.from_dir(world, backend=backend)  # the build output dir; its index/ is found
    assert retriever.dim == D and len(retriever) == N
    queries = torch.from_numpy(vectors[[3, 17]] * 10).double().requires_grad_()  # (2, D)
    docs = retriever.retrieve(queries, K)
    assert isinstance(docs, RetrievedDocs)
    assert docs.ids.shape == (2, K) and docs.ids.dtype == torch.int64
    assert docs.scores.dtype == torch.float64 and docs.vectors.shape == (2, K, D)
    assert docs.vectors.dtype == torch.float64 and not docs.vectors.requires_grad
    want = np.argsort(-(vectors[[3, 17]] @ vectors.T), axis=1)[:, :K]
    np.testing.assert_array_equal(docs.ids.numpy(), want)
    np.testing.assert_allclose(docs.vectors.numpy(), vectors[want], rtol=1e-6)
    torch.testing.assert_close(docs.scores, torch.einsum("bd,bkd->bk", queries.detach(), docs.vectors), rtol=1e-5,
                               atol=1e-4)
    assert docs.titles[0][0] == "A title 3" and docs.texts[1][0] == "in world A, fact 17"
    assert [len(row) for row in docs.titles] == [K, K]


def test_empty_batch(tmp_path):
    world, _ = _world(tmp_path, "A")
    docs = Retriever.from_dir(world).retrieve(torch.zeros(0, D), K)
    assert docs.ids.shape == (0, K) and docs.vectors.shape == (0, K, D) and docs.titles == []


def test_hot_swap_changes_passages_and_wrong_dimension_is_refused(tmp_path):
    world_a, vectors_a = _world(tmp_path, "A", seed=0)
    world_b, vectors_b = _world(tmp_path, "B", seed=1, factory="HNSW8")
    wide, _ = _world(tmp_path, "wide", dim=D * 2, seed=2)
    retriever = Retriever.from_dir(world_a)
    queries = torch.from_numpy(vectors_b[[5]])  # (1, D): in world B its own passage is the best match
    before = retriever.retrieve(queries, K)
    assert before.titles[0][0].startswith("A title")
    retriever.swap(world_b / "index")
    after = retriever.retrieve(queries, K)
    assert after.titles[0][0] == "B title 5" and all(t.startswith("B title") for t in after.titles[0])
    assert len(retriever.passages) == N and retriever.index.manifest.factory == "HNSW8"
    with pytest.raises(InputError, match="dimension 16"):
        retriever.swap(wide)
    still = retriever.retrieve(queries, K)  # the refused swap left B in service
    assert still.titles == after.titles
    np.testing.assert_array_equal(still.ids.numpy(), after.ids.numpy())


def test_swap_to_a_missing_or_unfinished_directory_keeps_the_old_index(tmp_path):
    world_a, vectors_a = _world(tmp_path, "A")
    retriever = Retriever.from_dir(world_a, backend="torch")
    (tmp_path / "half").mkdir()
    with pytest.raises(InputError, match="no manifest.json"):
        retriever.swap(tmp_path / "half")
    assert retriever.retrieve(torch.from_numpy(vectors_a[:1]), 1).ids.item() == 0


def test_config_factory_mismatch_and_missing_store(tmp_path):
    world, _ = _world(tmp_path, "A", factory="Flat")
    with pytest.raises(InputError, match="factory 'Flat'"):
        Retriever.from_dir(world, factory="HNSW32")
    Retriever.from_dir(world, backend="torch", factory="HNSW32")  # the torch backend ignores the faiss factory
    with pytest.raises(InputError, match="index.backend"):
        Retriever.from_dir(world, backend="annoy")
    with pytest.raises(InputError, match="index.path"):
        Retriever.from_dir(None)
    (world / "passages").rename(tmp_path / "moved")
    with pytest.raises(InputError, match="no passage store"):
        Retriever.from_dir(world)
    assert len(Retriever.from_dir(world, passages=tmp_path / "moved").passages) == N


def test_in_memory_retriever_cannot_swap(tmp_path):
    store = PassageStore.from_passages([Passage("1", "t", "x"), Passage("2", "u", "y")], tmp_path / "s", progress=False)
    retriever = Retriever(TorchIndex.build(np.eye(2, dtype=np.float32), passages=store))
    assert retriever.retrieve(torch.tensor([[0.0, 1.0]]), 1).texts == [["y"]]
    with pytest.raises(InputError, match="from_dir"):
        retriever.swap(tmp_path)


def test_ivf_with_too_few_probes_says_raise_nprobe(tmp_path):
    world, vectors = _world(tmp_path, "A", factory="IVF4,Flat")
    retriever = Retriever.from_dir(world, nprobe=1)
    with pytest.raises(InputError, match="nprobe"):
        retriever.retrieve(torch.from_numpy(vectors[:3]), N)


# Tiny stand-ins of the configs' production factories (IVF4096,PQ64 needs >= 160k training vectors).
_TINY_FACTORY = {"Flat": "Flat", "HNSW32": "HNSW32", "IVF4096,PQ64": "IVF2,PQ2x4", None: "exact"}


@pytest.mark.parametrize("option", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_index_configs_instantiate_settings_that_open_a_retriever(tmp_path, option):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(CONFIG_DIR.parent), version_base=None):
        cfg = compose(config_name=f"index/{option}").index
    assert cfg.path is None and cfg.sharded is False  # users must say which index
    factory = _TINY_FACTORY[cfg.factory]
    world, vectors = _world(tmp_path, "A", factory=factory)
    overrides = {"path": str(world)} | ({"factory": factory} if cfg.factory is not None else {})
    settings = instantiate(cfg, **overrides)
    assert isinstance(settings, IndexSettings) and settings.path == str(world)
    retriever = settings.open()
    assert isinstance(retriever, Retriever) and len(retriever) == N
    assert retriever.retrieve(torch.from_numpy(vectors[:2]), 2).ids.shape == (2, 2)
