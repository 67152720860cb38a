"""Exact inner-product search in torch: matmul + top-k over corpus chunks, on any device.

No faiss-gpu needed: on a GPU the vectors are copied there once in fp16 (21M x 768
is 32 GB), on a CPU they stay memory-mapped in fp32 and stream through in
chunks. Either way a query batch only ever holds a (B, chunk) score block, so
memory stays bounded whatever the corpus size. Same interface as DenseIndex.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from tqdm import tqdm

from index.manifest import (
    VECTORS_NAME,
    IndexManifest,
    check_k,
    check_queries,
    gather_vectors,
    load_checked,
    open_passages,
    open_vectors,
    write_vectors,
)
from rag_models.atomic import atomic_directory
from rag_models.errors import InputError
from rag_models.file_manifest import write_file_manifest

EXACT_FACTORY = "exact"  # the manifest's factory for an index that is only vectors
# Rows scored per matmul: 65,536 x 768 fp32 is 200 MB, small next to the corpus, large enough for full speed.
DEFAULT_CHUNK = 65_536


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA (twice the corpus per GB, tensor cores), fp32 elsewhere (CPU half matmul is slow)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def _read_only_tensor(block: np.ndarray) -> torch.Tensor:
    """A tensor sharing a read-only memmap block without a copy (we never write to it, so torch's warning is moot)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(block)


def chunked_topk(queries: torch.Tensor, chunks: Iterable[tuple[int, torch.Tensor]],
                 k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k inner products of ``queries`` (B, D) over a corpus given as (first row, (C, D) block) chunks.

    One matmul + top-k per chunk, merged with the running best, so memory is one (B, C) score block whatever
    N. Returns float32 scores (B, k) and int64 rows (B, k), best first, on the queries' device. Equal scores
    may come in any order (torch.topk). Runs outside any autocast. A matmul reaches full speed at any B,
    which faiss' own Flat search does not below a few dozen queries (scripts/bench_index.py).
    """
    # The corpus' own dtype decides the matmul: an enclosing autocast (a bf16-mixed training step searching an
    # fp16 index) would otherwise round both sides to bf16 and reorder close passages.
    with torch.no_grad(), torch.autocast(device_type=queries.device.type, enabled=False):
        best_scores = queries.new_empty((queries.shape[0], 0), dtype=torch.float32)  # (B, <=k)
        best_ids = torch.empty((queries.shape[0], 0), dtype=torch.int64, device=queries.device)
        for start, block in chunks:
            scores = (queries @ block.T).float()  # (B, C)
            top = scores.topk(min(k, scores.shape[1]), dim=1)  # (B, k')
            # Merge this chunk's best with the running best: memory stays O(B * k).
            merged_scores = torch.cat([best_scores, top.values], dim=1)  # (B, <=2k)
            merged_ids = torch.cat([best_ids, top.indices + start], dim=1)  # (B, <=2k)
            keep = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
            best_scores, best_ids = keep.values, merged_ids.gather(1, keep.indices)  # (B, k)
    return best_scores, best_ids


def host_chunks(vectors: np.ndarray, chunk_size: int, dtype: torch.dtype = torch.float32):
    """(first row, (C, D) CPU tensor) for every ``chunk_size`` rows of host ``vectors`` (N, D), without copies
    when they are C-order float32 (a memmap or an in-RAM array)."""
    for start in range(0, len(vectors), chunk_size):
        block = np.ascontiguousarray(vectors[start:start + chunk_size], dtype=np.float32)  # (C, D)
        yield start, _read_only_tensor(block).to(dtype)


class TorchIndex:
    """Brute-force top-k by inner product over (N, D) vectors, chunked over N.

    Args:
        vectors: (N, D) float32 passage vectors, usually a read-only memmap of ``vectors.npy``; the ids are
            the rows 0..N-1. Kept on the host for exact `vectors(ids)` (and, on a CPU, as the search source).
        manifest: what the index is; its ``dim`` and ``count`` must match ``vectors``.
        passages: the `PassageStore` the rows point into, or None (no texts; `Retriever` refuses it).
        device: where the search runs; any non-CPU device gets a resident copy of all vectors, made here
            chunk by chunk (N x D in ``dtype``: 32 GB for 21M x 768 in fp16).
        dtype: the dtype of the scoring matmul (and of the resident copy); None: fp16 on CUDA, fp32
            elsewhere (`default_dtype`). Scores are returned as float32 either way.
        chunk_size: corpus rows scored per matmul (a (B, chunk_size) score block at a time), >= 1.

    Raises InputError for a chunk_size below 1.
    """

    def __init__(self, vectors: np.ndarray, manifest: IndexManifest, *, passages: object = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 chunk_size: int = DEFAULT_CHUNK) -> None:
        if chunk_size < 1:
            raise InputError(f"chunk_size={chunk_size}", setting="index.chunk_size", fix="Use a positive chunk size")
        self.manifest = manifest
        self.passages = passages
        self.device = torch.device(device)
        self.dtype = dtype or default_dtype(self.device)
        self.chunk_size = chunk_size
        self._vectors = vectors  # (N, D) host copy (memmap): exact vectors(ids), and the CPU search source
        self._resident = self._to_device() if self.device.type != "cpu" else None

    def _to_device(self) -> list[torch.Tensor]:
        """Copy the corpus to the device chunk by chunk (never a full host-side fp32 copy)."""
        chunks = []
        for start in tqdm(range(0, len(self), self.chunk_size), desc=f"vectors to {self.device}",
                          unit=" chunk", disable=len(self) < 10 * self.chunk_size):
            block = np.ascontiguousarray(self._vectors[start:start + self.chunk_size], dtype=np.float32)  # (C, D)
            chunks.append(torch.from_numpy(block).to(self.device, self.dtype))
        return chunks

    @classmethod
    def build(cls, vectors: np.ndarray, *, encoder: str | None = None, passages: object = None,
              device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
              chunk_size: int = DEFAULT_CHUNK) -> "TorchIndex":
        """An exact index over ``vectors`` (N, D) whose ids are the rows 0..N-1."""
        if vectors.ndim != 2 or vectors.shape[0] == 0:
            raise InputError(f"vectors of shape {vectors.shape}", setting="vectors",
                             fix="Pass a non-empty (N, D) array")
        manifest = IndexManifest(dim=int(vectors.shape[1]), count=int(vectors.shape[0]), factory=EXACT_FACTORY,
                                 encoder=encoder, passages_checksum=getattr(passages, "checksum", None))
        return cls(vectors, manifest, passages=passages, device=device, dtype=dtype, chunk_size=chunk_size)

    @property
    def dim(self) -> int:
        """D, the vector dimension."""
        return self.manifest.dim

    def __len__(self) -> int:
        return self.manifest.count

    def _chunks(self):
        """(first row, (C, D) tensor on the device) for every chunk of the corpus."""
        if self._resident is not None:
            yield from zip(range(0, len(self), self.chunk_size), self._resident)
            return
        yield from host_chunks(self._vectors, self.chunk_size, self.dtype)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k: scores (B, k) float32 and row ids (B, k) int64, best first."""
        queries = check_queries(queries, self.manifest.dim)  # (B, D)
        check_k(k, self.manifest.count)
        q = torch.from_numpy(queries).to(self.device, self.dtype)  # (B, D)
        scores, ids = chunked_topk(q, self._chunks(), k)
        return scores.cpu().numpy(), ids.cpu().numpy()

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The stored fp32 vectors of ``ids`` (B, K): (B, K, D); id -1 gives zeros."""
        return gather_vectors(self._vectors, ids)

    def save(self, directory: str | Path, *, passages_path: str | Path | None = None) -> Path:
        """Write manifest + vectors atomically (no faiss file: load with the torch backend)."""
        directory = Path(directory)
        store_dir = passages_path if passages_path is not None else getattr(self.passages, "directory", None)
        manifest = self.manifest.with_passages(directory, store_dir)
        with atomic_directory(directory) as tmp:
            write_vectors(self._vectors, tmp / VECTORS_NAME)
            manifest.save(tmp)
            write_file_manifest(tmp)  # last: sizes and hashes of every file above
        self.manifest = manifest
        return directory

    @classmethod
    def load(cls, directory: str | Path, passages: object = None, *, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None, chunk_size: int = DEFAULT_CHUNK) -> "TorchIndex":
        """Open any index directory (faiss-built or not) using only its manifest and vectors."""
        directory = Path(directory)
        manifest = load_checked(directory)
        store = open_passages(directory, manifest, passages)
        return cls(open_vectors(directory, manifest), manifest, passages=store, device=device, dtype=dtype,
                   chunk_size=chunk_size)
