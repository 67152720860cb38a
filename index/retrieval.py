"""The retriever the model calls: question vectors -> top-K passages with their stored vectors and texts.

`Retriever.from_dir(index_dir)` opens an index directory written by
`rag-build-index` (manifest + faiss file + vectors + passage store) with the
faiss or the exact torch backend, optionally sharded over torch.distributed.
`swap(index_dir)` replaces index and passages while training or serving, e.g.
to change the world the model knows about without retraining.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np
import torch

from index.manifest import MANIFEST_NAME, IndexManifest
from index.torch_index import DEFAULT_CHUNK, TorchIndex
from rag_models.docs import RetrievedDocs
from rag_models.errors import InputError

if TYPE_CHECKING:  # faiss is imported only when a faiss index is opened (an exact torch index needs none)
    from index.faiss_index import DenseIndex


class SearchIndex(Protocol):
    """What the retriever needs from an index: DenseIndex, TorchIndex and ShardedIndex all qualify."""

    manifest: IndexManifest
    passages: object

    @property
    def dim(self) -> int: ...
    def __len__(self) -> int: ...
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...
    def vectors(self, ids: np.ndarray) -> np.ndarray: ...


def resolve_index_dir(path: str | Path | None) -> Path:
    """The directory holding manifest.json: ``path`` itself or ``path/index`` (a rag-build-index output)."""
    if path is None:
        raise InputError("no index directory given", setting="index.path",
                         fix="Pass index.path=DIR, a directory written by `rag-build-index --out DIR`")
    path = Path(path)
    if not (path / MANIFEST_NAME).is_file() and (path / "index" / MANIFEST_NAME).is_file():
        return path / "index"
    return path


def _load_faiss(path: Path, *, use_gpu: bool, mmap: bool, nprobe: int | None, ef_search: int | None,
                refine: int | None, passages: object, **_unused) -> DenseIndex:
    """A DenseIndex from disk (on the GPU only through use_gpu)."""
    from index.faiss_index import DenseIndex  # lazy: faiss only when the index is a faiss one

    return DenseIndex.load(path, passages, use_gpu=use_gpu, mmap=mmap, nprobe=nprobe, ef_search=ef_search,
                           refine=refine)


def _load_torch(path: Path, *, device: str, chunk_size: int, passages: object, **_unused) -> TorchIndex:
    """A TorchIndex from disk on ``device``."""
    return TorchIndex.load(path, passages, device=device, chunk_size=chunk_size)


def _load_sharded(path: Path, *, backend: str, **options) -> SearchIndex:
    """This rank's slice of the index (see index/sharded.py)."""
    from index.sharded import ShardedIndex  # lazy: only sharded runs need torch.distributed set up

    return ShardedIndex.from_dir(path, backend=backend, **options)


_LOADERS: dict[str, Callable[..., SearchIndex]] = {"faiss": _load_faiss, "torch": _load_torch}


def _names(passages: object, rows: np.ndarray, titles: list[str]) -> list[str]:
    """What provenance shows for passage ``rows`` (n,): each title, or the passage id where the title is empty."""
    untitled = [i for i, title in enumerate(titles) if not title]
    if not untitled:
        return titles
    names = list(titles)
    for i, pid in zip(untitled, passages.ids(rows[untitled])):
        names[i] = pid
    return names


class Retriever:
    """Top-K retrieval for a batch of question vectors; hot-swappable index.

    Usually made by `from_dir`, which fills in ``loader``, ``expected_factory`` and ``directory``.

    Args:
        index: the opened index in service (DenseIndex, TorchIndex or ShardedIndex); it must carry its
            passage store (``index.passages``), from which `retrieve` reads titles and texts.
        loader: opens an index directory (resolved path -> index); used by `swap`, which it enables
            (None: an in-memory index, `swap` refuses).
        expected_factory: the faiss factory string the index (and every swapped-in one) must have been built
            with, compared with its manifest's ``factory``; None: any.
        directory: where ``index`` came from, only to name it in error messages (None: "<in-memory index>").

    Raises InputError when the index has no passage store or was built with another factory than
    ``expected_factory``.
    """

    def __init__(self, index: SearchIndex, *, loader: Callable[[Path], SearchIndex] | None = None,
                 expected_factory: str | None = None, directory: Path | None = None) -> None:
        """Wrap an opened index (see the class docstring for the arguments)."""
        self._loader = loader
        self._expected_factory = expected_factory
        self._index = self._checked(index, directory or Path("<in-memory index>"))

    @classmethod
    def from_dir(cls, path: str | Path | None, *, backend: str = "faiss", factory: str | None = None,
                 device: str = "cpu", sharded: bool = False, use_gpu: bool = False, nprobe: int | None = None,
                 ef_search: int | None = None, chunk_size: int = DEFAULT_CHUNK, train_sample: int = 200_000,
                 mmap: bool = False, refine: int | None = None, passages: str | Path | None = None) -> "Retriever":
        """Open an index directory.

        backend: "faiss" (the stored faiss index) or "torch" (exact, any device).
        factory: if set, the faiss factory the index must have been built with.
        sharded: each torch.distributed rank searches 1/world of the passages.
        nprobe / ef_search: IVF / HNSW search knobs. refine: re-rank refine*k faiss candidates exactly.
        mmap: map the faiss file instead of reading it into RAM (pages shared between processes on
        one machine). passages: override the store. See index.settings.IndexSettings, the config group.
        """
        if backend not in _LOADERS:
            raise InputError(f"unknown backend {backend!r}", setting="index.backend",
                             fix=f"Use one of: {', '.join(sorted(_LOADERS))}")
        options = dict(device=device, use_gpu=use_gpu, nprobe=nprobe, ef_search=ef_search, chunk_size=chunk_size,
                       passages=passages, factory=factory, train_sample=train_sample, mmap=mmap, refine=refine)
        load = functools.partial(_load_sharded, backend=backend, **options) if sharded else \
            functools.partial(_LOADERS[backend], **options)
        expected = factory if backend == "faiss" else None
        directory = resolve_index_dir(path)
        return cls(load(directory), loader=load, expected_factory=expected, directory=directory)

    def _checked(self, index: SearchIndex, directory: Path) -> SearchIndex:
        """The index if it has a passage store and the expected factory, else InputError."""
        if index.passages is None:
            named = index.manifest.passages_path
            raise InputError(
                "the index has no passage store"
                + (f" (its manifest names {named}, which is missing)" if named else ""),
                path=directory, fix="Keep the passage store beside the index as rag-build-index writes it, "
                "or pass passages=STORE_DIR")
        if self._expected_factory is not None and index.manifest.factory != self._expected_factory:
            raise InputError(
                f"the index was built with factory {index.manifest.factory!r}, "
                f"the config asks {self._expected_factory!r}",
                path=directory / MANIFEST_NAME,
                fix="Choose the index config that matches (e.g. index=flat), set index.factory=null, or rebuild")
        return index

    @property
    def index(self) -> SearchIndex:
        """The index in service."""
        return self._index

    @property
    def passages(self):
        """The PassageStore in service."""
        return self._index.passages

    @property
    def dim(self) -> int:
        """D, the dimension queries must have."""
        return self._index.dim

    def __len__(self) -> int:
        return len(self._index)

    def retrieve(self, question_vectors: torch.Tensor, k: int) -> RetrievedDocs:
        """Top-``k`` passages for question vectors (B, D), on their device, in their dtype or float32 if wider.

        The search runs without grad on a detached float32 CPU copy; the stored
        vectors come back exact so the model can recompute q·d with grad.
        """
        index = self._index  # one read: a concurrent swap() never mixes two indexes in one batch
        queries = question_vectors.detach().to("cpu", torch.float32).numpy()  # (B, D)
        scores, ids = index.search(queries, k)  # (B, k), (B, k)
        if (ids < 0).any():
            raise InputError(f"the index found fewer than k={k} passages for some questions",
                             setting="index.nprobe / index.ef_search",
                             fix="Search wider (IVF: raise index.nprobe; HNSW: raise index.ef_search above k) "
                             "or retrieve fewer (n_docs, rag-eval's recall_depth)")
        vectors = index.vectors(ids)  # (B, k, D)
        flat = ids.reshape(-1)  # (B*k,)
        titles, texts = index.passages.titles(flat), index.passages.texts(flat)
        names = _names(index.passages, flat, titles)
        # At least float32: half-precision question vectors must not round the stored vectors q . d reads.
        device, dtype = question_vectors.device, torch.promote_types(question_vectors.dtype, torch.float32)
        return RetrievedDocs(
            ids=torch.from_numpy(ids).to(device),
            scores=torch.from_numpy(scores).to(device, dtype),
            vectors=torch.from_numpy(vectors).to(device, dtype),
            titles=[titles[row * k:(row + 1) * k] for row in range(ids.shape[0])],
            texts=[texts[row * k:(row + 1) * k] for row in range(ids.shape[0])],
            names=[names[row * k:(row + 1) * k] for row in range(ids.shape[0])],
        )

    def swap(self, path: str | Path) -> None:
        """Replace index and passages by those at ``path``; on any refusal the old ones stay in service.

        Refuses an index of another dimension (the question encoder could not query it).
        With a sharded index every rank must call swap, like search.
        """
        if self._loader is None:
            raise InputError("this retriever was built from an in-memory index", setting="index.path",
                             fix="Create it with Retriever.from_dir to be able to swap")
        directory = resolve_index_dir(path)
        new = self._checked(self._loader(directory), directory)
        if new.dim != self.dim:
            raise InputError(f"the new index has dimension {new.dim}, the one in service {self.dim}",
                             path=directory / MANIFEST_NAME,
                             fix="Swap only to an index built with the same context encoder family (same dimension)")
        self._index = new
