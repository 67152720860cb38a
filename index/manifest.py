"""The on-disk index format: the manifest, atomic publication of files and directories, shared checks.

An index directory holds:

    manifest.json   what the index is (this file's `IndexManifest`), written last
    index.faiss     the faiss index (absent for the exact torch index)
    vectors.npy     (N, D) passage vectors, memory-mapped at load: exact `vectors(ids)`
    ids.npy         (N,) int64 row ids, only when they are not 0..N-1
    checksums.json  every file above with its size and content hash (rag_models/file_manifest.py)

A directory is published by renaming a finished temporary directory onto its
final name, so a killed save never leaves anything that loads.
"""
from __future__ import annotations

import json
import mmap
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from rag_models.atomic import atomic_write_text
from rag_models.errors import InputError
from rag_models.file_manifest import check_directory

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
FAISS_NAME = "index.faiss"
VECTORS_NAME = "vectors.npy"
IDS_NAME = "ids.npy"
_GATHER_ROWS = 1024  # scattered rows copied between two releases of a memmap's pages (see read_rows)


@dataclass
class IndexManifest:
    """What an index directory contains, and what it was built from (saved as ``manifest.json``).

    Fields:
        dim: D, the dimension of every passage vector (queries must match it).
        count: N, the number of indexed passages (rows of ``vectors.npy``).
        factory: the faiss factory string the index was built with (e.g. "Flat", "HNSW32", "IVF4096,PQ64"),
            or "exact" for the torch index, which has no ``index.faiss``.
        encoder: name or path of the context encoder that made the vectors (None: unknown); informational.
        passages_checksum: `PassageStore.checksum` of the store the rows point into; loading refuses a store
            with another checksum (None: no check).
        passages_path: that store's directory, relative to the index directory (None: no store recorded).
        dtype: numpy dtype name of ``vectors.npy`` (always "float32" as written here); informational.
        metric: the similarity searched, always "inner_product"; informational.
        format_version: the on-disk format version; `load` refuses versions newer than `FORMAT_VERSION`.
        created: local build time, ISO 8601 with UTC offset (``%Y-%m-%dT%H:%M:%S%z``); default: now.
    """

    dim: int
    count: int
    factory: str  # faiss factory string, or "exact" for the torch index (no faiss file)
    encoder: str | None = None  # context encoder name or path that made the vectors
    passages_checksum: str | None = None  # PassageStore.checksum of the store the rows point into
    passages_path: str | None = None  # the store, relative to the index directory
    dtype: str = "float32"  # of vectors.npy
    metric: str = "inner_product"
    format_version: int = FORMAT_VERSION
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def save(self, directory: str | Path) -> None:
        """Write ``manifest.json`` into ``directory`` atomically."""
        atomic_write_text(Path(directory) / MANIFEST_NAME, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "IndexManifest":
        """Read ``directory/manifest.json``, or an InputError saying what the directory is missing."""
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            directory = Path(directory)
            moved = sorted(directory.parent.glob(f".{directory.name}.old-*"))
            raise InputError(
                "not an index directory (no manifest.json)",
                path=directory,
                fix=f"A save was interrupted while replacing it: the previous index is intact at {moved[-1]}; "
                "rename it back" if moved else "Build one with `rag-build-index --passages FILE --encoder NAME "
                "--out DIR`; a directory without manifest.json is an unfinished or killed build",
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            manifest = cls(**data)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as err:
            raise InputError(f"unreadable manifest ({err})", path=path, fix="Rebuild the index") from None
        if manifest.format_version > FORMAT_VERSION:
            raise InputError(
                f"index format version {manifest.format_version}, this code reads up to {FORMAT_VERSION}",
                path=path,
                fix="Upgrade this package, or rebuild the index with this version",
            )
        return manifest

    def with_passages(self, directory: str | Path, store_dir: str | Path | None) -> "IndexManifest":
        """A copy whose ``passages_path`` points to ``store_dir`` relative to ``directory`` (None: no store)."""
        relative = None if store_dir is None else os.path.relpath(Path(store_dir).resolve(), Path(directory).resolve())
        return IndexManifest(**{**asdict(self), "passages_path": relative})

    def resolve_passages(self, directory: str | Path) -> Path | None:
        """Absolute path of the passage store the manifest refers to, or None."""
        if self.passages_path is None:
            return None
        return (Path(directory) / self.passages_path).resolve()


def load_checked(directory: str | Path) -> IndexManifest:
    """The manifest of an index directory whose files are all present with their sizes (and hashes, see
    rag_models/file_manifest.py); InputError naming a missing, truncated or corrupt file."""
    manifest = IndexManifest.load(directory)
    check_directory(directory, what="index")
    return manifest


def load_array(path: Path, *, mmap: bool = False) -> np.ndarray:
    """``np.load`` of a ``.npy`` the project wrote, or an InputError naming it when it is truncated or not one."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise InputError(f"cannot read the array ({err}): truncated or not a .npy file", path=path,
                         fix="Re-copy the directory from where it came from, or rebuild it") from None


def link_or_copy(source: Path, dest: Path) -> None:
    """Hard-link ``source`` to ``dest`` (free for a 64 GB vectors file), copying across file systems."""
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)


def write_vectors(vectors: np.ndarray, dest: Path) -> None:
    """Put ``vectors`` at ``dest`` as ``.npy``: hard-link the file it is mapped from if it is whole, else save."""
    source = getattr(vectors, "filename", None)
    if source is not None and str(source).endswith(".npy"):
        whole = np.load(source, mmap_mode="r")
        if whole.shape == vectors.shape and whole.dtype == np.float32:
            link_or_copy(Path(source), dest)
            return
    np.save(dest, np.asarray(vectors, dtype=np.float32))


def read_rows(vectors: np.ndarray, rows: slice | np.ndarray) -> np.ndarray:
    """A float32 C-order copy of ``vectors[rows]``, (R, D); a read-only memmap then gives its pages back.

    Every page read through a mapping stays in this process's resident memory until the mapping closes:
    adding a 60 GB ``vectors.npy`` to faiss chunk by chunk would end with 60 GB resident. Dropping the
    pages after each copy (they stay in the OS page cache) keeps RSS at one chunk whatever N. Scattered
    ``rows`` (a training sample) are copied _GATHER_ROWS at a time: each page fault maps its neighbours too
    (fault-around), so a 100k-row sample of a 6 GB file once mapped nearly all of it.
    """
    mapping = getattr(vectors, "_mmap", None)  # the mmap.mmap behind an np.memmap (None for an in-RAM array)
    releasable = mapping is not None and getattr(vectors, "mode", None) == "r" and hasattr(mmap, "MADV_DONTNEED")
    if not releasable or isinstance(rows, slice):
        block = np.array(vectors[rows], dtype=np.float32, order="C", copy=True)  # (R, D)
        if releasable:
            mapping.madvise(mmap.MADV_DONTNEED)  # safe on a read-only file mapping: later reads fault them back in
        return block
    block = np.empty((len(rows), vectors.shape[1]), dtype=np.float32)  # (R, D)
    for start in range(0, len(rows), _GATHER_ROWS):
        block[start:start + _GATHER_ROWS] = vectors[rows[start:start + _GATHER_ROWS]]  # (r, D)
        mapping.madvise(mmap.MADV_DONTNEED)
    return block


def check_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    """(B, D) float32 C-contiguous queries, or an InputError if D is not the index's dimension."""
    queries = np.asarray(queries)
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise InputError(
            f"queries of shape {tuple(queries.shape)} do not match the index dimension {dim}",
            setting="question encoder / index.path",
            fix="Use the question encoder paired with the context encoder this index was built with, "
            "or rebuild the index with a matching encoder",
        )
    return np.ascontiguousarray(queries, dtype=np.float32)  # (B, D)


def check_k(k: int, count: int) -> None:
    """InputError unless 1 <= k <= number of indexed passages."""
    if not 1 <= k <= count:
        raise InputError(f"cannot retrieve k={k} documents from an index of {count} passages",
                         setting="n_docs", fix=f"Use 1 <= n_docs <= {count}")


def open_vectors(directory: Path, manifest: IndexManifest) -> np.ndarray:
    """Memory-map ``vectors.npy`` read-only and check its shape against the manifest."""
    path = directory / VECTORS_NAME
    if not path.is_file():
        raise InputError("index directory lacks vectors.npy", path=directory, fix="Rebuild the index")
    vectors = load_array(path, mmap=True)  # (N, D), pages read on demand
    if vectors.shape != (manifest.count, manifest.dim):
        raise InputError(
            f"vectors.npy has shape {vectors.shape}, the manifest says {(manifest.count, manifest.dim)}",
            path=path,
            fix="The directory was modified after it was built; rebuild the index",
        )
    return vectors


def check_store(store_checksum: str | None, manifest: IndexManifest, directory: Path, store_path: object) -> None:
    """InputError if the passage store is not the one the index rows point into."""
    if manifest.passages_checksum is None or store_checksum == manifest.passages_checksum:
        return
    raise InputError(
        f"passage store {store_path} has checksum {store_checksum}, but this index was built over a store "
        f"with checksum {manifest.passages_checksum}: its rows would point at the wrong passages",
        path=directory / MANIFEST_NAME,
        fix="Pass the passage store the index was built from, or rebuild the index with "
        "`rag-build-index --passages FILE --encoder NAME --out DIR`",
    )


def gather_vectors(
    vectors: np.ndarray, ids: np.ndarray, row_of_id: Callable[[np.ndarray], np.ndarray] | None = None
) -> np.ndarray:
    """Stored vectors for ``ids`` (B, K) -> (B, K, D) float32; ids of -1 (no result) give zeros."""
    ids = np.asarray(ids, dtype=np.int64)
    flat = ids.reshape(-1)  # (B*K,)
    rows = flat if row_of_id is None else row_of_id(flat)
    valid = rows >= 0
    out = np.zeros((flat.shape[0], vectors.shape[1]), dtype=np.float32)  # (B*K, D)
    if valid.any():
        wanted = rows[valid]
        # Reading rows in ascending order turns random page faults into a forward scan.
        order = np.argsort(wanted, kind="stable")
        out_rows = np.flatnonzero(valid)[order]
        out[out_rows] = vectors[wanted[order]]
    return out.reshape(*ids.shape, vectors.shape[1])  # (B, K, D)


def open_passages(directory: Path, manifest: IndexManifest, passages: object = None):
    """The passage store for an index: ``passages`` (a store or its path) or the one the manifest names.

    Returns None when neither is given nor found; raises if the store's checksum
    differs from the one the index was built over.
    """
    from index.passages import PassageStore  # here, not at the top: passages.py imports this module

    if passages is None:
        referenced = manifest.resolve_passages(directory)
        if referenced is None or not referenced.is_dir():
            return None
        passages = referenced
    store = passages if isinstance(passages, PassageStore) else PassageStore.open(passages)
    check_store(store.checksum, manifest, directory, store.directory)
    return store
