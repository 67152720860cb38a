"""Maximum-inner-product search with faiss: Flat, HNSW<M>, IVF<n>,PQ<m>, on CPU or faiss-gpu.

`DenseIndex` pairs the faiss index with the exact passage vectors (a memmap), so
`vectors(ids)` returns the true stored vectors even when the faiss index keeps
only compressed codes (PQ) or a graph (HNSW). The model recomputes q·d from
them, so gradients and scores never inherit PQ's approximation.
"""
from __future__ import annotations

import sys
import threading
from pathlib import Path

import faiss
import numpy as np
import torch
from tqdm import tqdm

from index.manifest import (
    FAISS_NAME,
    IDS_NAME,
    VECTORS_NAME,
    IndexManifest,
    check_k,
    check_queries,
    gather_vectors,
    load_array,
    load_checked,
    open_passages,
    open_vectors,
    read_rows,
    write_vectors,
)
from index.torch_index import DEFAULT_CHUNK, chunked_topk, host_chunks
from rag_models.atomic import atomic_directory
from rag_models.errors import InputError
from rag_models.file_manifest import write_file_manifest

_ADD_CHUNK = 65536  # rows added per faiss call: bounded RAM when the vectors are a memmap
# A CPU Flat index searches 2 or more queries with faiss' BLAS path (its threshold forced to 1), one query with
# the torch matmul + top-k: the faster of the two at each batch size on 200k x 768 (scripts/bench_index.py).
BLAS_MIN_QUERIES = 2
_BLAS_LOCK = threading.Lock()  # faiss' threshold is one process-wide setting


def blas_search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """faiss' own search with its matrix-multiply path at every batch size: scores (B, k), ids (B, k)."""
    with _BLAS_LOCK:
        default = faiss.cvar.distance_compute_blas_threshold
        faiss.cvar.distance_compute_blas_threshold = 1
        try:
            return index.search(queries, k)
        finally:
            faiss.cvar.distance_compute_blas_threshold = default
_FACTORY_FIX = "Use a faiss factory string such as Flat, HNSW32 or IVF4096,PQ64"


class DenseIndex:
    """A faiss inner-product index over (N, D) passage vectors, plus the vectors themselves.

    Usually made by `build` or `load`, which check their inputs; the constructor only assembles the parts
    and raises nothing. Search knobs (``refine``, nprobe, ef_search) start at their defaults: see
    `set_search_params`.

    Args:
        index: the faiss index over the N vectors (inner-product metric); with custom ``ids`` an IDMap2
            index holding exactly those ids.
        vectors: (N, D) float32 exact passage vectors, usually a read-only memmap of ``vectors.npy``; row i
            belongs to the i-th id. `vectors(ids)` reads them, so PQ / HNSW never approximate q . d.
        manifest: what the index is (D, N, factory, passage checksum); ``dim`` and ``count`` must match
            ``vectors``.
        ids: (N,) int64 distinct non-negative ids of the rows, as added to ``index``; None: the rows 0..N-1.
        passages: the `PassageStore` the ids point into, or None (no texts; `Retriever` refuses it).
    """

    def __init__(self, index: faiss.Index, vectors: np.ndarray, manifest: IndexManifest, *,
                 ids: np.ndarray | None = None, passages: object = None) -> None:
        self.index = index
        self.manifest = manifest
        self.passages = passages
        self._vectors = vectors  # (N, D), usually a read-only memmap
        self._ids = ids  # (N,) custom ids, or None for rows 0..N-1
        if ids is not None:
            self._order = np.argsort(ids)  # id -> row via binary search in sorted ids
            self._sorted_ids = ids[self._order]
        self._gpu_resources = None
        self.refine = 1  # > 1: re-rank refine*k candidates by exact inner products (see search)

    # ---- build ---------------------------------------------------------------------------
    @classmethod
    def build(cls, vectors: np.ndarray, ids: np.ndarray | None = None, factory: str = "Flat", *,
              train_sample: int = 200_000, seed: int = 0, encoder: str | None = None,
              passages: object = None, nprobe: int | None = None, ef_search: int | None = None,
              refine: int | None = None, ef_construction: int | None = None, progress: bool = True) -> "DenseIndex":
        """Build an inner-product index over ``vectors`` (N, D); ``ids`` (N,) default to the rows 0..N-1.

        IVF / PQ factories are trained on ``train_sample`` random rows. ``passages``
        (a PassageStore) records its checksum so a later load can refuse another store.
        """
        if vectors.ndim != 2 or vectors.shape[0] == 0:
            raise InputError(f"vectors of shape {vectors.shape}", setting="vectors",
                             fix="Pass a non-empty (N, D) array")
        count, dim = vectors.shape
        ids = _check_ids(ids, count)
        index = _make_faiss_index(dim, factory, custom_ids=ids is not None)
        if ef_construction is not None:
            faiss.ParameterSpace().set_index_parameter(index, "efConstruction", ef_construction)
        if progress and not index.is_trained:  # minutes at 21M without a bar: say what is running
            print(f"train {factory} on {min(count, train_sample):,} vectors", file=sys.stderr, flush=True)
        _train(index, vectors, train_sample, seed, factory)
        for start in tqdm(range(0, count, _ADD_CHUNK), desc=f"add to {factory}", unit=" chunk", disable=not progress):
            chunk = read_rows(vectors, slice(start, start + _ADD_CHUNK))  # (c, D)
            if ids is None:
                index.add(chunk)
            else:
                index.add_with_ids(chunk, ids[start:start + _ADD_CHUNK])
        manifest = IndexManifest(dim=dim, count=count, factory=factory, encoder=encoder,
                                 passages_checksum=getattr(passages, "checksum", None))
        built = cls(index, vectors, manifest, ids=ids, passages=passages)
        built.set_search_params(nprobe=nprobe, ef_search=ef_search, refine=refine)
        return built

    # ---- knobs and sizes -----------------------------------------------------------------
    def set_search_params(self, *, nprobe: int | None = None, ef_search: int | None = None,
                          refine: int | None = None) -> None:
        """IVF lists probed per query, HNSW's search beam width, exact re-ranking factor; None keeps a value."""
        if refine is not None:
            if refine < 1:
                raise InputError(f"refine={refine}", setting="index.refine", fix="Use 1 (off) or more")
            self.refine = int(refine)
        params = faiss.GpuParameterSpace() if self._gpu_resources is not None else faiss.ParameterSpace()
        for name, value in (("nprobe", nprobe), ("efSearch", ef_search)):
            if value is None:
                continue
            try:
                params.set_index_parameter(self.index, name, int(value))
            except RuntimeError:
                raise InputError(f"the {self.manifest.factory} index has no `{name}` knob",
                                 setting=f"index.{'nprobe' if name == 'nprobe' else 'ef_search'}",
                                 fix="Set nprobe only for IVF indexes and ef_search only for HNSW ones") from None

    @property
    def dim(self) -> int:
        """D, the vector dimension."""
        return self.manifest.dim

    def __len__(self) -> int:
        return self.manifest.count

    # ---- queries ---------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: scores (B, k) float32 and ids (B, k) int64, best first.

        An IVF index probing too few lists may find fewer than k: those slots hold id -1.
        """
        queries = check_queries(queries, self.manifest.dim)  # (B, D)
        check_k(k, self.manifest.count)
        if self.refine > 1:
            return self._refined_search(queries, k)
        return self._top_k(queries, k)

    def _top_k(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """faiss' search; on a CPU Flat index with its matrix-multiply path at every batch size (one query: a torch
        matmul + top-k over the very vectors faiss holds).

        faiss' Flat search leaves its matrix-multiply path below a threshold number of queries and then scans
        one query at a time: at 16 queries per call on 200k x 768 it was 5x slower than a matmul, and training
        retrieves 8 questions a step. From 2 queries on, faiss' own blocked matrix multiply with its running top-k
        (its BLAS path, forced on) beats a full (B, N) score matrix + top-k; for one query the torch path is as
        fast or faster (scripts/bench_index.py prints the table). The scores are the same
        inner products (summed in another order: they may differ in the last bits, and equal scores may swap).
        """
        flat = self._flat_vectors()
        if flat is None:
            return self.index.search(queries, k)  # (B, k), (B, k)
        if len(queries) >= BLAS_MIN_QUERIES:
            return blas_search(self.index, queries, k)  # (B, k), (B, k)
        scores, ids = chunked_topk(torch.from_numpy(queries), host_chunks(flat, DEFAULT_CHUNK), k)  # (B, k) each
        return scores.numpy(), ids.numpy()

    def _flat_vectors(self) -> np.ndarray | None:
        """(N, D) float32 view (no copy) of the vectors of a CPU inner-product Flat index; None for other indexes.

        Taken afresh at each search: the view is only valid while faiss neither frees nor grows its storage.
        """
        index = faiss.downcast_index(self.index)  # IDMap2 (custom ids), HNSW, IVF, PQ and GPU indexes: None
        flat = type(index) in (faiss.IndexFlat, faiss.IndexFlatIP)  # what factory "Flat" gives (a subclass: no)
        if not flat or index.metric_type != faiss.METRIC_INNER_PRODUCT or index.ntotal == 0:
            return None
        return faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)

    def _refined_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """faiss proposes refine*k candidates; exact q·d from the stored vectors picks the top k.

        PQ codes rank coarsely (1M clustered 768-d vectors, IVF1024,PQ64x4fs, nprobe 32: recall@100
        0.24 alone, 0.66 with refine=4; scripts/bench_index.py);
        re-ranking reads only B*refine*k rows of the memmap, so RAM stays that of the codes.
        """
        wide = min(self.manifest.count, k * self.refine)
        _, candidates = self._top_k(queries, wide)  # (B, k*r)
        exact = np.einsum("bd,bkd->bk", queries, self.vectors(candidates))  # (B, k*r)
        exact[candidates < 0] = np.finfo(np.float32).min  # missing results stay last, as faiss marks them
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]  # (B, k)
        return np.take_along_axis(exact, order, axis=1), np.take_along_axis(candidates, order, axis=1)

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The stored (exact) vectors of ``ids`` (B, K): (B, K, D) float32; id -1 gives zeros."""
        return gather_vectors(self._vectors, ids, None if self._ids is None else self._row_of_ids)

    def _row_of_ids(self, ids: np.ndarray) -> np.ndarray:
        """Rows of custom ids (-1 stays -1)."""
        positions = np.clip(np.searchsorted(self._sorted_ids, ids), 0, len(self._sorted_ids) - 1)
        found = self._sorted_ids[positions] == ids
        return np.where(found, self._order[positions], -1)

    # ---- persistence -----------------------------------------------------------------------
    def save(self, directory: str | Path, *, passages_path: str | Path | None = None) -> Path:
        """Write the index directory atomically (temp dir + rename); an old one stays until the new one is whole.

        ``passages_path`` (default: the attached store's directory) is stored relative to ``directory``.
        """
        directory = Path(directory)
        store_dir = passages_path if passages_path is not None else getattr(self.passages, "directory", None)
        manifest = self.manifest.with_passages(directory, store_dir)
        with atomic_directory(directory) as tmp:
            cpu_index = faiss.index_gpu_to_cpu(self.index) if self._gpu_resources is not None else self.index
            faiss.write_index(cpu_index, str(tmp / FAISS_NAME))
            write_vectors(self._vectors, tmp / VECTORS_NAME)
            if self._ids is not None:
                np.save(tmp / IDS_NAME, self._ids)
            manifest.save(tmp)  # a directory without it never loads
            write_file_manifest(tmp)  # last: sizes and hashes of every file above
        self.manifest = manifest
        return directory

    @classmethod
    def load(cls, directory: str | Path, passages: object = None, *, use_gpu: bool = False, mmap: bool = False,
             nprobe: int | None = None, ef_search: int | None = None, refine: int | None = None) -> "DenseIndex":
        """Open an index directory; ``passages`` (store or path) overrides the store the manifest names.

        Refuses a passage store whose checksum differs from the one the index was built over.
        ``mmap`` maps IVF lists from disk instead of reading them into RAM.
        """
        directory = Path(directory)
        manifest = load_checked(directory)
        faiss_path = directory / FAISS_NAME
        if not faiss_path.is_file():
            raise InputError(f"no {FAISS_NAME} (this index was built with factory {manifest.factory!r})",
                             path=directory, fix="Load it with the torch backend (index.backend=torch), "
                             "or rebuild with a faiss factory such as --factory Flat")
        store = open_passages(directory, manifest, passages)
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        try:
            index = faiss.read_index(str(faiss_path), flags)
        except RuntimeError as err:
            raise InputError(f"faiss cannot read it ({str(err).splitlines()[-1][:200]}): truncated or not an index",
                             path=faiss_path, fix="Re-copy the index from where it came from, or rebuild it "
                             "with rag-build-index") from None
        if index.ntotal != manifest.count or index.d != manifest.dim:
            raise InputError(f"index.faiss holds {index.ntotal} x {index.d}, "
                             f"manifest says {manifest.count} x {manifest.dim}", path=directory,
                             fix="The directory was modified after its build; rebuild the index")
        ids = load_array(directory / IDS_NAME) if (directory / IDS_NAME).is_file() else None
        loaded = cls(index, open_vectors(directory, manifest), manifest, ids=ids, passages=store)
        if use_gpu:
            loaded.to_gpu()
        loaded.set_search_params(nprobe=nprobe, ef_search=ef_search, refine=refine)
        return loaded

    def to_gpu(self, device: int = 0) -> "DenseIndex":
        """Move the faiss index to GPU ``device`` (needs faiss-gpu and a GPU); the vectors stay memory-mapped."""
        if faiss.get_num_gpus() == 0:
            raise InputError("no GPU visible to faiss (faiss-cpu installed, or no CUDA device)",
                             setting="index.use_gpu",
                             fix="Set index.use_gpu=false, or use index.backend=torch on a GPU")
        self._gpu_resources = faiss.StandardGpuResources()
        self.index = faiss.index_cpu_to_gpu(self._gpu_resources, device, self.index)
        return self


def _check_ids(ids: np.ndarray | None, count: int) -> np.ndarray | None:
    """None when ids are the rows 0..N-1 (the usual case), else the validated int64 ids."""
    if ids is None:
        return None
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)  # (N,)
    if ids.shape[0] != count:
        raise InputError(f"{ids.shape[0]} ids for {count} vectors", setting="ids", fix="Give one id per vector")
    if np.array_equal(ids, np.arange(count)):
        return None
    if ids.min() < 0 or np.unique(ids).shape[0] != count:
        raise InputError("ids must be distinct and non-negative (-1 marks 'no result')", setting="ids")
    return ids


def _make_faiss_index(dim: int, factory: str, *, custom_ids: bool) -> faiss.Index:
    """faiss.index_factory with inner product; custom ids wrap it in an IDMap2."""
    description = f"IDMap2,{factory}" if custom_ids else factory
    try:
        return faiss.index_factory(dim, description, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise InputError(f"faiss cannot build {factory!r}: {str(err).splitlines()[-1]}",
                         setting="index.factory", fix=_FACTORY_FIX) from None


def _train(index: faiss.Index, vectors: np.ndarray, train_sample: int, seed: int, factory: str) -> None:
    """Train IVF centroids / PQ codebooks on a random sample of rows (sorted, so a memmap reads forward)."""
    if index.is_trained:
        return
    count = vectors.shape[0]
    rows = np.arange(count) if count <= train_sample else np.sort(
        np.random.default_rng(seed).choice(count, size=train_sample, replace=False))
    sample = read_rows(vectors, rows)  # (S, D)
    try:
        index.train(sample)
    except RuntimeError as err:
        raise InputError(f"training {factory!r} on {len(rows)} vectors failed: {str(err).splitlines()[-1]}",
                         setting="index.train_sample / index.factory",
                         fix="Give more training vectors (about 40 per IVF list), "
                         "or fewer IVF lists / PQ bits") from None
