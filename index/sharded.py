"""The index split over torch.distributed ranks: each searches its slice, results are merged per query.

Rank r holds rows [N*r/W, N*(r+1)/W) in its own DenseIndex or TorchIndex, so a
21M-passage Flat index costs 64/W GB per rank. One search is four collectives,
symmetric across ranks (no rank-0 bottleneck):

1. all_gather the batch sizes (ranks may have different B, including 0),
2. all_gather the padded queries, trimmed back to the real ones (S = sum of B),
3. every rank searches its slice for all S queries (ids made global),
4. all_to_all sends each rank the partial top-k of its own queries, merged locally.

`vectors(ids)` needs no communication: every rank memory-maps the full vectors
file (pages are read on demand, so this costs only the rows actually used).
All ranks must call `search` the same number of times, like any collective.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from index.faiss_index import DenseIndex
from index.manifest import (
    IndexManifest,
    check_k,
    check_queries,
    gather_vectors,
    load_checked,
    open_passages,
    open_vectors,
)
from index.torch_index import DEFAULT_CHUNK, EXACT_FACTORY, TorchIndex
from rag_models.errors import InputError

# Where collectives need their tensors: NCCL only moves CUDA tensors, gloo CPU ones.
_COMM_DEVICE = {"nccl": lambda: torch.device("cuda", torch.cuda.current_device())}


def slice_bounds(total: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) rows owned by ``rank``: sizes differ by at most one."""
    return total * rank // world, total * (rank + 1) // world


class ShardedIndex:
    """Search over all ranks' slices; each rank gets the global top-k of its own queries.

    Usually made by `from_dir` or `from_vectors`, which build this rank's slice; every rank constructs one.

    Args:
        local: this rank's index over its rows ``[start, start + n_r)`` with local ids 0..n_r-1 (a DenseIndex
            or TorchIndex), or None when this rank owns no rows (more ranks than passages).
        full_vectors: (N, D) float32 vectors of all passages, usually a memmap of ``vectors.npy``; `vectors`
            reads them by global id without communication.
        manifest: the whole index's manifest (N = ``count``, D = ``dim``), not the slice's.
        start: the global row of this rank's first local row (local id i is global id ``start + i``).
        passages: the `PassageStore` the global ids point into, or None (`Retriever` refuses it).
        group: the torch.distributed process group to search over; None: the default (world) group.
            Its backend picks where collectives run: CUDA for NCCL, CPU otherwise.

    Raises InputError when torch.distributed is not available or not initialized.
    """

    def __init__(self, local: DenseIndex | TorchIndex | None, full_vectors: np.ndarray, manifest: IndexManifest, *,
                 start: int, passages: object = None, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise InputError("torch.distributed is not initialized", setting="index.sharded",
                             fix="Call torch.distributed.init_process_group first (Lightning DDP does), "
                             "or set index.sharded=false")
        self.local = local  # None when this rank owns no rows (more ranks than passages)
        self.manifest = manifest
        self.passages = passages
        self.start = start
        self.group = group
        self._full_vectors = full_vectors  # (N, D) memmap of all rows
        backend = dist.get_backend(group)
        self._comm_device = _COMM_DEVICE[backend]() if backend in _COMM_DEVICE else torch.device("cpu")

    @classmethod
    def from_vectors(cls, vectors: np.ndarray, manifest: IndexManifest, *, backend: str = "torch",
                     factory: str | None = None, device: str = "cpu", use_gpu: bool = False,
                     nprobe: int | None = None, ef_search: int | None = None, chunk_size: int = DEFAULT_CHUNK,
                     train_sample: int = 200_000, passages: object = None,
                     group: dist.ProcessGroup | None = None, mmap: bool = False,
                     refine: int | None = None) -> "ShardedIndex":
        """Build this rank's slice index over ``vectors[start:end]`` (all ranks pass the same full array).

        ``mmap`` is accepted for config symmetry and has no effect: slices are built in RAM.
        """
        if not dist.is_available() or not dist.is_initialized():
            raise InputError("torch.distributed is not initialized", setting="index.sharded",
                             fix="Call torch.distributed.init_process_group first, or set index.sharded=false")
        start, end = slice_bounds(len(vectors), dist.get_rank(group), dist.get_world_size(group))
        piece = vectors[start:end]  # (n_r, D), still a memmap view
        local = None
        if end > start and backend == "torch":
            local = TorchIndex.build(piece, device=device, chunk_size=chunk_size)
        elif end > start:
            # Each rank builds its slice (IVF / HNSW slices train and build in parallel, 1/W of the work).
            chosen = factory or (manifest.factory if manifest.factory != EXACT_FACTORY else "Flat")
            local = DenseIndex.build(piece, factory=chosen, train_sample=train_sample, nprobe=nprobe,
                                     ef_search=ef_search, refine=refine, progress=False)
            if use_gpu:
                local.to_gpu()
        return cls(local, vectors, manifest, start=start, passages=passages, group=group)

    @classmethod
    def from_dir(cls, path: str | Path, *, passages: object = None, **options) -> "ShardedIndex":
        """Open an index directory and build this rank's slice (options as in ``from_vectors``)."""
        directory = Path(path)
        manifest = load_checked(directory)
        store = open_passages(directory, manifest, passages)
        return cls.from_vectors(open_vectors(directory, manifest), manifest, passages=store, **options)

    @property
    def dim(self) -> int:
        """D, the vector dimension."""
        return self.manifest.dim

    def __len__(self) -> int:
        return self.manifest.count

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors of global ids (B, K) -> (B, K, D), read from this rank's map of the full file."""
        return gather_vectors(self._full_vectors, ids)

    def _local_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of the slice for all gathered queries (S, D), padded to k with (-inf, -1); ids global."""
        scores = np.full((queries.shape[0], k), -np.inf, dtype=np.float32)  # (S, k)
        ids = np.full((queries.shape[0], k), -1, dtype=np.int64)  # (S, k)
        if self.local is not None and queries.shape[0] > 0:
            local_k = min(k, len(self.local))
            found_scores, found_ids = self.local.search(queries, local_k)  # (S, k')
            scores[:, :local_k] = found_scores
            ids[:, :local_k] = np.where(found_ids >= 0, found_ids + self.start, -1)
        return scores, ids

    def _gather_queries(self, queries: np.ndarray) -> tuple[torch.Tensor, list[int]]:
        """All ranks' queries concatenated in rank order (S, D), and each rank's batch size."""
        device = self._comm_device
        world = dist.get_world_size(self.group)
        size = torch.tensor([queries.shape[0]], dtype=torch.int64, device=device)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size, group=self.group)
        sizes = [int(s.item()) for s in sizes]
        longest = max(sizes)
        # all_gather needs equal shapes: pad to the longest batch, trim after.
        padded = torch.zeros((longest, self.dim), dtype=torch.float32, device=device)  # (maxB, D)
        padded[:queries.shape[0]] = torch.from_numpy(queries).to(device)
        gathered = [torch.empty_like(padded) for _ in range(world)]
        if longest > 0:
            dist.all_gather(gathered, padded, group=self.group)
        return torch.cat([g[:n] for g, n in zip(gathered, sizes)]), sizes  # (S, D)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Global top-k for this rank's queries (B, D): scores (B, k) float32, global ids (B, k) int64.

        A collective: every rank calls it (B may be 0 on some ranks).
        """
        queries = check_queries(queries, self.dim)  # (B, D)
        check_k(k, len(self))
        everything, sizes = self._gather_queries(queries)  # (S, D)
        mine, world = queries.shape[0], len(sizes)
        if sum(sizes) == 0:  # every rank knows this: all return without further collectives
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        scores, ids = self._local_search(everything.cpu().numpy(), k)  # (S, k), (S, k)
        device = self._comm_device
        # Row block r of the send buffer holds rank r's queries; each rank receives W blocks of B rows.
        recv_scores = torch.empty((world * mine, k), dtype=torch.float32, device=device)  # (W*B, k)
        recv_ids = torch.empty((world * mine, k), dtype=torch.int64, device=device)  # (W*B, k)
        for received, sent in ((recv_scores, scores), (recv_ids, ids)):
            dist.all_to_all_single(received, torch.from_numpy(sent).to(device), output_split_sizes=[mine] * world,
                                   input_split_sizes=sizes, group=self.group)
        candidates = recv_scores.view(world, mine, k).permute(1, 0, 2).reshape(mine, world * k)  # (B, W*k)
        candidate_ids = recv_ids.view(world, mine, k).permute(1, 0, 2).reshape(mine, world * k)  # (B, W*k)
        best = candidates.topk(k, dim=1)  # (B, k)
        return best.values.cpu().numpy(), candidate_ids.gather(1, best.indices).cpu().numpy()
