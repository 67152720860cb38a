"""DenseIndex (faiss) and TorchIndex: exact top-k, knobs, save/load, manifest refusals, atomic saves."""
from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from index import faiss_index as faiss_index_module
from index.faiss_index import DenseIndex
from index.manifest import IndexManifest
from index.passage_files import Passage
from index.passages import PassageStore
from index.torch_index import TorchIndex
from rag_models.errors import InputError

N, D, B, K = 300, 16, 7, 10


def _data(seed: int = 0, n: int = N, dim: int = D) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, dim)).astype(np.float32), rng.standard_normal((B, dim)).astype(np.float32)


def _brute_force(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries.astype(np.float64) @ vectors.T.astype(np.float64)  # (B, N)
    ids = np.argsort(-scores, axis=1)[:, :k]  # (B, k)
    return np.take_along_axis(scores, ids, axis=1), ids


def _store(tmp_path, n: int = N, name: str = "store", tag: str = "") -> PassageStore:
    corpus = [Passage(id=str(i + 1), title=f"t{i}{tag}", text=f"text {i}{tag}") for i in range(n)]
    return PassageStore.from_passages(corpus, tmp_path / name, progress=False)


def test_flat_equals_brute_force():
    vectors, queries = _data()
    scores, ids = DenseIndex.build(vectors, factory="Flat", progress=False).search(queries, K)
    want_scores, want_ids = _brute_force(vectors, queries, K)
    assert ids.dtype == np.int64 and scores.dtype == np.float32 and ids.shape == (B, K)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 8, 16, 64, 600])
def test_flat_search_matches_faiss_at_every_batch_size(batch):
    # A CPU Flat index searches by matmul + top-k over faiss' own vectors (1 query) or by faiss' BLAS path
    # forced on (2 or more; faiss scans query by query below its threshold); faiss' default answer is the
    # reference: same ids, scores to float rounding.
    rng = np.random.default_rng(batch)
    vectors, queries = rng.standard_normal((2000, D), dtype=np.float32), rng.standard_normal((batch, D),
                                                                                            dtype=np.float32)
    index = DenseIndex.build(vectors, factory="Flat", progress=False)
    np.testing.assert_array_equal(index._flat_vectors(), vectors)  # the path taken: faiss' storage, viewed
    threshold = faiss.cvar.distance_compute_blas_threshold
    scores, ids = index.search(queries, K)
    assert faiss.cvar.distance_compute_blas_threshold == threshold  # faiss' setting restored after the search
    want_scores, want_ids = index.index.search(queries, K)  # the faiss object itself
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
    assert ids.dtype == np.int64 and scores.dtype == np.float32 and ids.shape == (batch, K)


def test_only_plain_cpu_flat_indexes_take_the_matmul_path():
    vectors, queries = _data(5)
    custom_ids = np.arange(N, dtype=np.int64) * 3 + 1
    for index in (DenseIndex.build(vectors, ids=custom_ids, factory="Flat", progress=False),  # IDMap2 over Flat
                  DenseIndex.build(vectors, factory="HNSW8", progress=False)):
        assert index._flat_vectors() is None
    mapped = DenseIndex.build(vectors, ids=custom_ids, factory="Flat", progress=False)
    np.testing.assert_array_equal(mapped.search(queries, K)[1], custom_ids[_brute_force(vectors, queries, K)[1]])


@pytest.mark.parametrize("chunk_size", [1000, 64, 7])
def test_torch_index_equals_brute_force(chunk_size):
    vectors, queries = _data(1)
    scores, ids = TorchIndex.build(vectors, chunk_size=chunk_size).search(queries, K)
    want_scores, want_ids = _brute_force(vectors, queries, K)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


def test_vectors_are_exact_even_for_pq_and_hnsw():
    vectors, queries = _data(2, n=1000)
    for factory in ("HNSW8", "IVF8,PQ4x4"):  # 4-bit codes: 8-bit PQ training takes ~7 s here
        index = DenseIndex.build(vectors, factory=factory, train_sample=2000, progress=False)
        _, ids = index.search(queries, K)
        np.testing.assert_array_equal(index.vectors(ids), vectors[ids])  # (B, K, D), not PQ reconstructions


def test_approximate_indexes_find_most_true_neighbours_and_knobs_matter():
    vectors, queries = _data(3, n=4000)
    _, truth = _brute_force(vectors, queries, K)
    hnsw = DenseIndex.build(vectors, factory="HNSW16", ef_search=128, progress=False)
    recall = np.mean([len(set(a) & set(b)) / K for a, b in zip(hnsw.search(queries, K)[1], truth)])
    assert recall >= 0.9
    ivf = DenseIndex.build(vectors, factory="IVF16,Flat", nprobe=1, progress=False)
    narrow = np.mean([len(set(a) & set(b)) / K for a, b in zip(ivf.search(queries, K)[1], truth)])
    ivf.set_search_params(nprobe=16)  # every list probed: exact
    np.testing.assert_array_equal(ivf.search(queries, K)[1], truth)
    assert narrow < 1.0


def test_custom_ids_map_back_to_their_vectors():
    vectors, queries = _data(4)
    ids = np.arange(N, dtype=np.int64)[::-1] * 3 + 5  # distinct, not the rows
    index = DenseIndex.build(vectors, ids, factory="Flat", progress=False)
    _, got = index.search(queries, K)
    _, rows = _brute_force(vectors, queries, K)
    np.testing.assert_array_equal(got, ids[rows])
    np.testing.assert_array_equal(index.vectors(got), vectors[rows])


def test_save_load_round_trip(tmp_path):
    vectors, queries = _data(5)
    store = _store(tmp_path)
    index = DenseIndex.build(vectors, factory="HNSW8", passages=store, encoder="tiny-ctx", ef_search=64, progress=False)
    before = index.search(queries, K)
    index.save(tmp_path / "idx")
    loaded = DenseIndex.load(tmp_path / "idx", ef_search=64)
    after = loaded.search(queries, K)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_allclose(before[0], after[0], rtol=1e-6)
    assert loaded.passages.checksum == store.checksum  # found through the manifest's relative path
    manifest = IndexManifest.load(tmp_path / "idx")
    assert (manifest.dim, manifest.count, manifest.factory, manifest.encoder) == (D, N, "HNSW8", "tiny-ctx")
    np.testing.assert_array_equal(loaded.vectors(after[1]), vectors[after[1]])
    # The exact torch backend opens the same directory (ignores index.faiss).
    np.testing.assert_array_equal(TorchIndex.load(tmp_path / "idx").search(queries, K)[1],
                                  _brute_force(vectors, queries, K)[1])


def test_torch_index_save_load_and_faiss_refusal(tmp_path):
    vectors, queries = _data(6)
    TorchIndex.build(vectors).save(tmp_path / "exact")
    np.testing.assert_array_equal(TorchIndex.load(tmp_path / "exact").search(queries, 3)[1],
                                  _brute_force(vectors, queries, 3)[1])
    with pytest.raises(InputError, match="torch backend"):
        DenseIndex.load(tmp_path / "exact")


def test_load_refuses_another_passage_store(tmp_path):
    vectors, _ = _data(7)
    DenseIndex.build(vectors, passages=_store(tmp_path), progress=False).save(tmp_path / "idx")
    other = _store(tmp_path, name="other", tag=" (2018)")
    with pytest.raises(InputError, match="checksum") as err:
        DenseIndex.load(tmp_path / "idx", passages=other)
    assert "rebuild the index" in str(err.value) and "manifest.json" in str(err.value)
    with pytest.raises(InputError, match="checksum"):
        TorchIndex.load(tmp_path / "idx", passages=other.directory)


def test_search_refuses_wrong_dimension_and_bad_k():
    vectors, queries = _data(8)
    for index in (DenseIndex.build(vectors, progress=False), TorchIndex.build(vectors)):
        with pytest.raises(InputError, match="dimension 16"):
            index.search(queries[:, :8], K)
        with pytest.raises(InputError, match="n_docs"):
            index.search(queries, N + 1)


def test_bad_factory_and_undertrained_ivf_raise_input_error():
    vectors, _ = _data(9)
    with pytest.raises(InputError, match="index.factory"):
        DenseIndex.build(vectors, factory="NotAnIndex12", progress=False)
    with pytest.raises(InputError, match="train"):
        DenseIndex.build(vectors, factory="IVF1024,Flat", progress=False)  # 300 points, 1024 lists
    with pytest.raises(InputError, match="nprobe"):
        DenseIndex.build(vectors, factory="Flat", nprobe=4, progress=False)


def test_killed_save_keeps_old_index_and_leaves_nothing_loadable(tmp_path, monkeypatch):
    vectors, queries = _data(10)
    DenseIndex.build(vectors, progress=False).save(tmp_path / "idx")
    old = DenseIndex.load(tmp_path / "idx").search(queries, K)
    newer = DenseIndex.build(vectors * -1.0, progress=False)

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(faiss_index_module, "write_vectors", crash)  # dies after index.faiss is written
    for target in ("idx", "fresh"):
        with pytest.raises(OSError, match="simulated"):
            newer.save(tmp_path / target)
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temp dirs left behind
    kept = DenseIndex.load(tmp_path / "idx").search(queries, K)
    np.testing.assert_array_equal(kept[1], old[1])


def test_manifest_from_the_future_and_missing_manifest(tmp_path):
    vectors, _ = _data(11)
    DenseIndex.build(vectors, progress=False).save(tmp_path / "idx")
    (tmp_path / "idx" / "manifest.json").rename(tmp_path / "idx" / "m.json")
    with pytest.raises(InputError, match="no manifest.json"):
        DenseIndex.load(tmp_path / "idx")
    text = (tmp_path / "idx" / "m.json").read_text().replace('"format_version": 1', '"format_version": 99')
    (tmp_path / "idx" / "manifest.json").write_text(text)
    with pytest.raises(InputError, match="version 99"):
        TorchIndex.load(tmp_path / "idx")


def test_gpu_flag_without_gpu_says_what_to_do(tmp_path):
    if faiss.get_num_gpus() > 0:
        pytest.skip("a GPU is visible to faiss: the refusal path does not apply")
    vectors, _ = _data(12)
    with pytest.raises(InputError, match="backend=torch"):
        DenseIndex.build(vectors, progress=False).to_gpu()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for the fp16 torch index")
def test_torch_index_fp16_on_cuda_matches_top1():
    vectors, queries = _data(13)
    _, ids = TorchIndex.build(vectors, device="cuda").search(queries, K)
    np.testing.assert_array_equal(ids[:, 0], _brute_force(vectors, queries, 1)[1][:, 0])


def test_interrupted_replace_points_to_the_intact_previous_index(tmp_path):
    vectors, _ = _data(14)
    DenseIndex.build(vectors, progress=False).save(tmp_path / "idx")
    # A kill between "move the old index aside" and "move the new one in" leaves only the old one, renamed.
    (tmp_path / "idx").rename(tmp_path / ".idx.old-x1")
    with pytest.raises(InputError, match="previous index is intact") as err:
        DenseIndex.load(tmp_path / "idx")
    assert ".idx.old-x1" in str(err.value)


def test_refine_reranks_pq_candidates_exactly():
    vectors, queries = _data(15, n=400)
    index = DenseIndex.build(vectors, factory="IVF4,PQ4x4", nprobe=4, progress=False)
    want_scores, want_ids = _brute_force(vectors, queries, K)
    coarse = index.search(queries, K)[1]
    index.set_search_params(refine=len(vectors) // K)  # every vector is a candidate: exact answer
    scores, ids = index.search(queries, K)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-4)
    assert not np.array_equal(coarse, want_ids)  # PQ alone ranks differently: the re-ranking did the work
    with pytest.raises(InputError, match="index.refine"):
        index.set_search_params(refine=0)
