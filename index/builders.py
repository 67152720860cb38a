"""Factory string -> an index over (N, D) vectors: "exact" (vectors only, torch backend) or any faiss factory.

Shared by both ways `rag-build-index` gets its vectors: encoded from a passage
file (`build_cli.build_index`) or imported with a dataset (`dataset_import`).
"""
from __future__ import annotations

import numpy as np

from index.faiss_index import DenseIndex
from index.torch_index import EXACT_FACTORY, TorchIndex


def _build_exact(vectors: np.ndarray, *, encoder: str | None, passages: object, **_unused) -> TorchIndex:
    """Vectors only: served by the exact torch backend (no faiss index held in RAM at build time)."""
    return TorchIndex.build(vectors, encoder=encoder, passages=passages)


# factory string -> builder; anything not listed is a faiss factory string.
_BUILDERS = {EXACT_FACTORY: _build_exact}


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
