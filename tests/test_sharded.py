"""ShardedIndex over 2 gloo CPU processes == one full index, with unequal (and empty) batches per rank."""
from __future__ import annotations

import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from index.faiss_index import DenseIndex
from index.manifest import IndexManifest
from index.passage_files import Passage
from index.passages import PassageStore
from index.retrieval import Retriever
from index.sharded import ShardedIndex, slice_bounds
from rag_models.errors import InputError

N, D, WORLD = 25, 8, 2
# (rank 0's batch, rank 1's batch, k): unequal sizes, one empty rank, all empty, k larger than a slice.
CASES = [(3, 5, 4), (0, 4, 6), (2, 0, 20), (0, 0, 3), (1, 1, N)]


def _queries(rank: int, case: int, size: int) -> np.ndarray:
    return np.random.default_rng(100 * case + rank).standard_normal((size, D)).astype(np.float32)


def _worker(rank: int, init_file: str, index_dir: str, out_dir: str) -> None:
    """One rank: search every case with the torch and faiss backends, save results for the parent."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for backend in ("torch", "faiss"):
            retriever = Retriever.from_dir(index_dir, backend=backend, sharded=True)
            sharded = retriever.index
            assert isinstance(sharded, ShardedIndex) and (sharded.start, sharded.start + len(sharded.local)) == \
                slice_bounds(N, rank, WORLD)
            for case, sizes in enumerate(CASES):
                scores, ids = sharded.search(_queries(rank, case, sizes[rank]), sizes[2])
                results[f"{backend}_{case}_scores"], results[f"{backend}_{case}_ids"] = scores, ids
                results[f"{backend}_{case}_vectors"] = sharded.vectors(ids)
            docs = retriever.retrieve(torch.from_numpy(_queries(rank, 0, CASES[0][rank])), 2)
            results[f"{backend}_titles"] = np.array(docs.titles, dtype=object).reshape(-1, 2)
        np.savez(f"{out_dir}/rank{rank}.npz", **{k: v for k, v in results.items() if v.dtype != object},
                 titles=np.array([str(results["torch_titles"].tolist()), str(results["faiss_titles"].tolist())]))
    except Exception:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    corpus = [Passage(id=str(i + 1), title=f"title {i}", text=f"text {i}") for i in range(N)]
    store = PassageStore.from_passages(corpus, root / "passages", progress=False)
    vectors = np.random.default_rng(0).standard_normal((N, D)).astype(np.float32)
    full = DenseIndex.build(vectors, factory="Flat", passages=store, progress=False)
    full.save(root / "index")
    mp.spawn(_worker, args=(str(root / "init"), str(root / "index"), str(root)), nprocs=WORLD, join=True)
    return full, vectors, [dict(np.load(root / f"rank{r}.npz")) for r in range(WORLD)]


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_sharded_equals_full_index(sharded_results, backend):
    full, vectors, results = sharded_results
    for case, sizes in enumerate(CASES):
        for rank in range(WORLD):
            queries = _queries(rank, case, sizes[rank])
            got_scores, got_ids = results[rank][f"{backend}_{case}_scores"], results[rank][f"{backend}_{case}_ids"]
            assert got_ids.shape == (sizes[rank], sizes[2]) and got_ids.dtype == np.int64
            if sizes[rank] == 0:
                continue
            want_scores, want_ids = full.search(queries, sizes[2])
            np.testing.assert_array_equal(got_ids, want_ids, err_msg=f"case {case} rank {rank}")
            np.testing.assert_allclose(got_scores, want_scores, rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(results[rank][f"{backend}_{case}_vectors"], vectors[want_ids])


def test_sharded_retriever_returns_passage_texts(sharded_results):
    full, _, results = sharded_results
    _, want = full.search(_queries(1, 0, CASES[0][1]), 2)
    titles = [[f"title {i}" for i in row] for row in want.tolist()]
    assert results[1]["titles"][0] == str(titles) == results[1]["titles"][1]


def test_slice_bounds_cover_every_row_once():
    for total, world in ((25, 2), (7, 3), (2, 4), (21_015_324, 64)):
        bounds = [slice_bounds(total, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert max(e - s for s, e in bounds) - min(e - s for s, e in bounds) <= 1


def test_sharded_without_process_group_says_what_to_do(tmp_path):
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialized in this pytest process")
    with pytest.raises(InputError, match="sharded=false"):
        ShardedIndex.from_vectors(np.zeros((4, D), np.float32), IndexManifest(dim=D, count=4, factory="Flat"))
