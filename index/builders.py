"""Factory string -> an index over (N, D) vectors: "exact" (vectors only, torch backend) or any faiss factory.

Shared by both ways `rag-build-index` gets its vectors: encoded from a passage
file (`build_cli.build_index`) or imported with a dataset (`dataset_import`).
"""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import faiss
import numpy as np

from index.faiss_index import DenseIndex, _make_faiss_index
from index.torch_index import EXACT_FACTORY, TorchIndex
from rag_models.errors import InputError

MIN_PER_CENTROID = 39  # faiss's k-means warns below this many training vectors per IVF list


def _build_exact(vectors: np.ndarray, *, encoder: str | None, passages: object, **_unused) -> TorchIndex:
    """Vectors only: served by the exact torch backend (no faiss index held in RAM at build time)."""
    return TorchIndex.build(vectors, encoder=encoder, passages=passages)


# factory string -> builder; anything not listed is a faiss factory string.
_BUILDERS = {EXACT_FACTORY: _build_exact}


def _product_quantizer(index: faiss.Index) -> faiss.ProductQuantizer | None:
    """The PQ of a factory's index (PQ, IVF-PQ, OPQ-wrapped), None when it has none."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return getattr(index, "pq", None)


def check_factory(factory: str, *, dim: int, count: int, train_sample: int) -> None:
    """Refuse, before any vector is encoded, a factory that cannot index ``count`` vectors of dimension ``dim``.

    Builds the empty faiss index (faiss checks e.g. that PQ's m divides D) and checks that the training sample,
    min(count, train_sample) vectors, holds at least one vector per IVF list and per PQ centroid (2^nbits).
    Raises InputError naming --factory and a fix; "exact" and untrained factories (Flat, HNSW) always fit.
    """
    if factory in _BUILDERS:
        return
    index = _make_faiss_index(dim, factory, custom_ids=False)  # InputError when faiss refuses factory for dim
    if index.is_trained:
        return
    sample = min(count, train_sample)
    needs = []  # (centroids, what they are, a smaller factory part that fits)
    try:
        nlist = int(faiss.extract_index_ivf(index).nlist)
        needs.append((nlist, f"{nlist} IVF lists", f"IVF{max(1, sample // MIN_PER_CENTROID)}"))
    except RuntimeError:  # not an IVF index
        pass
    pq = _product_quantizer(index)
    if pq is not None:
        bits = max(1, sample.bit_length() - 1)  # 2^bits <= sample
        needs.append((int(pq.ksub), f"{pq.ksub} PQ centroids per sub-quantizer", f"PQ{pq.M}x{bits}"))
    for centroids, what, smaller in needs:
        if centroids > sample:
            raise InputError(f"--factory {factory!r} has {what}, but only {sample} vectors train it "
                             f"(min of {count} passages and --train-sample {train_sample})", setting="--factory",
                             fix=f"Use fewer centroids (e.g. {smaller}; faiss wants about {MIN_PER_CENTROID} "
                                 "training vectors per centroid), or Flat / HNSW32 for a corpus this small")


def build_from_vectors(vectors: np.ndarray, *, factory: str, encoder: str | None, passages: object,
                       train_sample: int = 200_000, progress: bool = True) -> DenseIndex | TorchIndex:
    """The index of ``factory`` over ``vectors`` (N, D) float32 (usually a memmap), rows 0..N-1 as ids.

    factory: "exact" (TorchIndex) or a faiss factory string such as Flat, HNSW32, IVF4096,PQ64 (DenseIndex,
    IVF / PQ trained on ``train_sample`` rows). ``passages`` (a PassageStore) is recorded by checksum.
    Raises InputError for a factory faiss cannot build or train.
    """
    builder = _BUILDERS.get(factory, DenseIndex.build)
    return builder(vectors, factory=factory, encoder=encoder, passages=passages, train_sample=train_sample,
                   progress=progress)


def build_and_save(vectors: np.ndarray, out: Path, *, factory: str, encoder: str | None, passages: object,
                   train_sample: int, progress: bool) -> None:
    """`build_from_vectors`, saved as ``out/index`` pointing at the store ``out/passages``."""
    index = build_from_vectors(vectors, factory=factory, encoder=encoder, passages=passages,
                               train_sample=train_sample, progress=progress)
    if progress:
        print(f"write {out / 'index'}", file=sys.stderr, flush=True)
    index.save(out / "index", passages_path=out / "passages")


def finish_build(out: Path, *, count: int, dim: int, factory: str, keep_shards: bool, started: float,
                 stage: str, stage_seconds: float) -> Path:
    """Drop ``out/shards`` (unless kept) and print the one-line summary of a finished ``out/index``; returns it.

    ``stage``: what produced the vectors ("encoding", "import"), ``stage_seconds`` its share of the wall time.
    """
    index_dir = out / "index"
    if not keep_shards:
        shutil.rmtree(out / "shards", ignore_errors=True)  # the index holds a hard link to vectors.npy
    size = sum(p.stat().st_size for p in index_dir.iterdir()) / 2**20
    print(f"rag-build-index: {count:,} passages, dim {dim}, factory {factory}, {size:,.1f} MB in {index_dir}, "
          f"{time.time() - started:.1f} s ({stage} {stage_seconds:.1f} s)")
    return index_dir
