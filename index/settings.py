"""Which index to open and how to search it: the `index` config group as one typed object.

configs/index/*.yaml target `IndexSettings`; training (`RagLitModule`) and
evaluation (`rag-eval`) both receive the whole object and open the retriever
with `IndexSettings.open`, so every key (refine, mmap, nprobe, ...) reaches
both, and validation and evaluation search the same way.
"""
from __future__ import annotations

from dataclasses import dataclass

from index.retrieval import Retriever
from index.torch_index import DEFAULT_CHUNK


@dataclass(frozen=True)
class IndexSettings:
    """The `index` group (see configs/index/flat.yaml for each key).

    Fields:
        path: a rag-build-index output directory (or its index/ subdirectory); None = no index.
        factory: the faiss factory the index must have been built with (None: accept any).
        backend: "faiss" or "torch" (exact matmul + top-k on ``device``).
        sharded: under torch.distributed each rank holds and searches 1/world of the passages.
        device: where the torch backend keeps the vectors ("cpu", "cuda", ...).
        use_gpu: move the faiss index to the GPU (needs faiss-gpu).
        mmap: map index.faiss instead of reading it (processes on one machine share the pages).
        nprobe: IVF lists visited per query; ef_search: HNSW search width (None: faiss' defaults).
        refine: re-rank refine * k faiss candidates by exact q . d from the stored vectors (for PQ).
        chunk_size: torch backend, corpus rows scored per matmul.
        train_sample: sharded faiss, vectors each rank trains its slice's IVF / PQ on.
        passages: another passage store directory (it must have the checksum the index was built over).
    """

    path: str | None = None
    factory: str | None = "Flat"
    backend: str = "faiss"
    sharded: bool = False
    device: str = "cpu"
    use_gpu: bool = False
    mmap: bool = False
    nprobe: int | None = None
    ef_search: int | None = None
    refine: int | None = None
    chunk_size: int = DEFAULT_CHUNK
    train_sample: int = 200_000
    passages: str | None = None

    def open(self, *, world_size: int = 1) -> Retriever:
        """The retriever of ``path``; sharded only when asked for and ``world_size`` > 1 (one process holds it all).

        Raises InputError for a missing path, an unreadable index or a factory mismatch.
        """
        return Retriever.from_dir(
            self.path, backend=self.backend, factory=self.factory, device=self.device,
            sharded=self.sharded and world_size > 1, use_gpu=self.use_gpu, nprobe=self.nprobe,
            ef_search=self.ef_search, chunk_size=self.chunk_size, train_sample=self.train_sample, mmap=self.mmap,
            refine=self.refine, passages=self.passages,
        )
