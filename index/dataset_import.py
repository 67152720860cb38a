"""`rag-build-index --from-dataset`: passages that come with their embeddings -> passage store + index, no encoding.

    rag-build-index --from-dataset my_knowledge_dataset --out indexes/kb --factory HNSW32
    rag-build-index --from-dataset my_knowledge_dataset --out indexes/kb \\
        --faiss-index my_knowledge_dataset_hnsw_index.faiss          # keep the dataset's own faiss index
    rag-build-index --from-dataset hf:facebook/wiki_dpr:psgs_w100.nq.no_index --out indexes/wiki --factory exact

SRC (kinds: index/dataset_sources.py) has columns title, text, embeddings and optionally id, as transformers'
examples/research_projects/rag/use_own_knowledge_dataset.py saves them, or the hub's wiki_dpr. Row r of
the dataset becomes row r of the index, the doc_id transformers' RagRetriever reports. OUT gets what
`rag-build-index --passages` writes, so `Retriever.from_dir(OUT)` opens it unchanged:

    OUT/passages   the passage store; ids: the id column as strings, else the row numbers "0", "1", ...
    OUT/shards     the embeddings in resumable shards (index/encode.py's format); removed once the index exists
    OUT/index      manifest.json, index.faiss (none for --factory exact), vectors.npy

One read of SRC fills the store and the shards, batch by batch: memory does not grow with N (only the
faiss index a factory holds does: Flat keeps N x D floats). A killed run resumes: finished shards are not
converted again, the store is rebuilt unless it was finished. With --faiss-index FILE, FILE is checked
(N vectors of dimension D, inner product) and copied in as index.faiss; the manifest's factory is then
"imported:<faiss class>", e.g. imported:IndexHNSWFlat, so configs must accept any factory:
`index.factory=null` (IndexSettings(path=OUT, factory=None)).
"""
from __future__ import annotations

import itertools
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from index.builders import build_and_save, check_factory, finish_build
from index.dataset_sources import ID_COLUMN, Batch, DatasetSource, open_source
from index.encode import PLAN_NAME, check_plan, load_shards, publish_shard, shard_done, shard_path, shard_ranges
from index.manifest import (
    FAISS_NAME,
    MANIFEST_NAME,
    VECTORS_NAME,
    IndexManifest,
    load_array,
    load_checked,
    write_vectors,
)
from index.passage_files import Passage
from index.passages import PassageStore, existing_store
from rag_models.atomic import atomic_directory
from rag_models.errors import InputError
from rag_models.file_manifest import write_file_manifest

IMPORTED = "imported:"  # manifest factory prefix of an index whose faiss file came with the dataset
_STEP = 8192  # rows converted at a time: (8192, 768) float32 is 24 MB
_EXACT_STORAGE = {"IndexFlat", "IndexFlatIP", "IndexHNSWFlat"}  # faiss classes whose reconstruct() is exact
_EMBEDDING_FIX = "Every row needs an embedding: a list of D finite floats, the same D for all rows"


class _RowError(Exception):
    """A bad value ``offset`` rows into the batch being read; the caller adds the file and the row."""

    def __init__(self, offset: int, problem: str, fix: str) -> None:
        super().__init__(problem)
        self.offset, self.problem, self.fix = offset, problem, fix


def _first(mask: pa.Array | np.ndarray) -> int:
    """Position of the first True."""
    return int(np.flatnonzero(np.asarray(mask))[0])


def _embedding_matrix(column: pa.Array, dim: int | None, origin: str) -> np.ndarray:
    """(n, D) float32 from a list / large_list / fixed_size_list column of n embeddings, no Python loop over rows.

    dim: the D every row must have (``origin`` says where it came from, for the message); None: the first row's.
    Raises _RowError at the first null embedding, wrong length, or NaN / inf / null value.
    """
    kind = column.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)) or not (
            pa.types.is_floating(kind.value_type) or pa.types.is_integer(kind.value_type)):
        raise _RowError(0, f"column embeddings has type {kind}, not a list of numbers", _EMBEDDING_FIX)
    if column.null_count:
        raise _RowError(_first(column.is_null()), "null embedding", _EMBEDDING_FIX)
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)  # (n,)
    want = int(lengths[0]) if dim is None else dim
    if want < 1:
        raise _RowError(0, "empty embedding", _EMBEDDING_FIX)
    bad = np.flatnonzero(lengths != want)
    if bad.size:
        where = origin or "like the first row read"
        raise _RowError(int(bad[0]), f"embedding of {lengths[bad[0]]} values, not {want} ({where})", _EMBEDDING_FIX)
    values = column.flatten()  # (n * D,), the slice's values only
    if values.null_count:
        raise _RowError(_first(values.is_null()) // want, "null value inside the embedding", _EMBEDDING_FIX)
    with np.errstate(over="ignore", invalid="ignore"):  # out-of-range float64 become inf, refused just below
        matrix = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, want)  # (n, D)
    finite = np.isfinite(matrix).all(axis=1)  # (n,)
    if not finite.all():
        raise _RowError(_first(~finite), "NaN or inf in the embedding (as float32)", _EMBEDDING_FIX)
    return matrix


def _strings(data: pa.RecordBatch, name: str) -> list[str]:
    """Column ``name`` as Python strings (integer ids become "17"); _RowError at a null or a non-string type."""
    column = data.column(name)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
            or (name == ID_COLUMN and pa.types.is_integer(column.type))):
        raise _RowError(0, f"column {name} has type {column.type}, not strings", f"Store the {name}s as strings")
    if column.null_count:
        fix = "Give every row a unique id, or drop the id column" if name == ID_COLUMN else \
            f"Give every row a {name} (an empty string is fine)"
        raise _RowError(_first(column.is_null()), f"null {name}", fix)
    strings = pc.cast(column, pa.string())
    if name == ID_COLUMN and pc.any(pc.equal(pc.binary_length(strings), 0)).as_py():
        raise _RowError(_first(pc.equal(pc.binary_length(strings), 0)), "empty id",
                        "Give every row a unique, non-empty id, or drop the id column")
    return strings.to_pylist()


def _passages(data: pa.RecordBatch, row: int) -> list[Passage]:
    """The passages of a batch whose first row is dataset row ``row``; ids default to the row numbers."""
    titles, texts = _strings(data, "title"), _strings(data, "text")
    has_ids = ID_COLUMN in data.schema.names
    ids = _strings(data, ID_COLUMN) if has_ids else [str(number) for number in range(row, row + data.num_rows)]
    return [Passage(id=pid, title=title, text=text) for pid, title, text in zip(ids, titles, texts)]


class _ShardWriter:
    """Fills the unfinished shards of ``directory`` in row order, publishing each when its last row arrives.

    Args:
        directory: the shard directory (index/encode.py's format; its plan already checked).
        count: N, the dataset's rows. shard_size: rows per shard.
        dim: the D every embedding must have (from --faiss-index), or None: taken from the finished shards,
            else from the first row converted. origin: where ``dim`` came from, for messages.
        check_dim: called with D as soon as it is known, before any shard is written (e.g. `check_factory`).
    """

    def __init__(self, directory: Path, count: int, shard_size: int, dim: int | None, origin: str,
                 check_dim: Callable[[int], None] = lambda dim: None) -> None:
        self.directory, self.shard_size = directory, shard_size
        self.ranges = shard_ranges(count, shard_size)
        self.todo = [n for n, (start, end) in enumerate(self.ranges) if not shard_done(directory, n, start, end)]
        finished = sorted(set(range(len(self.ranges))) - set(self.todo))
        self.dim, self.origin = dim, origin
        if finished:
            sidecar = json.loads(shard_path(directory, finished[0]).with_suffix(".json").read_text(encoding="utf-8"))
            if dim is not None and sidecar["dim"] != dim:
                raise InputError(f"finished shards hold {sidecar['dim']}-d vectors, not {dim} ({origin})",
                                 path=directory, fix="Delete this directory to import again")
            self.dim, self.origin = int(sidecar["dim"]), f"the dimension of the finished shards in {directory}"
        self.check_dim = check_dim
        if self.dim is not None:
            check_dim(self.dim)
        self._todo = set(self.todo)
        self._buffer: np.ndarray | None = None  # (rows of the shard being filled, D)

    def wants(self, row: int) -> bool:
        """Whether the shard of ``row`` is still to be written."""
        return row // self.shard_size in self._todo

    def add(self, row: int, vectors: np.ndarray) -> None:
        """Store ``vectors`` (n, D), rows [row, row + n) of one shard; publish the shard when it is full."""
        if self.dim is None:
            self.dim, self.origin = vectors.shape[1], f"like row {row}, the first one read"
            self.check_dim(self.dim)
        number = row // self.shard_size
        start, end = self.ranges[number]
        if row == start:
            self._buffer = np.empty((end - start, self.dim), dtype=np.float32)  # (S, D)
        self._buffer[row - start:row - start + vectors.shape[0]] = vectors
        if row + vectors.shape[0] == end:
            publish_shard(self.directory, number, start, self._buffer)
            self._buffer = None


def _pieces(dataset: DatasetSource, start: int, shard_size: int) -> Iterator[Batch]:
    """Batches from row ``start`` on, cut to at most _STEP rows that never straddle a shard boundary."""
    for batch in dataset.batches(start):
        first = max(start - batch.row, 0)  # rows before ``start`` are dropped
        while first < batch.data.num_rows:
            row = batch.row + first
            size = min(batch.data.num_rows - first, (row // shard_size + 1) * shard_size - row, _STEP)
            yield Batch(batch.where, batch.file_row + first, row, batch.data.slice(first, size))
            first += size


def _read(dataset: DatasetSource, count: int | None, shards: _ShardWriter | None, *, with_passages: bool,
          progress: bool, shard_size: int) -> Iterator[list[Passage]]:
    """Read the dataset in row order, filling ``shards``; yields each piece's passages (or [] without them).

    Without passages it reads only from the first to the last unfinished shard.
    """
    start, stop = 0, None
    if not with_passages:
        start, stop = shards.ranges[shards.todo[0]][0], shards.ranges[shards.todo[-1]][1]
    seen = start
    with tqdm(total=count, initial=start, desc="import", unit=" psg", unit_scale=True, disable=not progress) as bar:
        for piece in _pieces(dataset, start, shard_size):
            if stop is not None and piece.row >= stop:
                return
            try:
                if shards is not None and shards.wants(piece.row):
                    vectors = _embedding_matrix(piece.data.column("embeddings"), shards.dim, shards.origin)
                    shards.add(piece.row, vectors)  # (n, D)
                passages = _passages(piece.data, piece.row) if with_passages else []
            except _RowError as bad:
                row, file_row = piece.row + bad.offset, piece.file_row + bad.offset
                in_file = f" (row {file_row} of this file)" if file_row != row else ""
                raise InputError(f"row {row} of the dataset{in_file}: {bad.problem}", path=piece.where,
                                 fix=bad.fix) from None
            seen = piece.row + piece.data.num_rows
            bar.update(piece.data.num_rows)
            yield passages
    if count is not None and seen != count:
        raise InputError(f"read {seen} rows, expected {count}", path=dataset.label,
                         fix="The dataset changed during the import; run it again")


def _import_pass(dataset: DatasetSource, count: int | None, *, store_dir: Path | None, shards: _ShardWriter | None,
                 shard_size: int, progress: bool) -> PassageStore | None:
    """One read of the dataset: builds the passage store at ``store_dir`` (if given), fills ``shards`` (if given)."""
    pieces = _read(dataset, count, shards, with_passages=store_dir is not None, progress=progress,
                   shard_size=shard_size)
    if store_dir is None:
        for _ in pieces:
            pass
        return None
    return PassageStore.from_passages(itertools.chain.from_iterable(pieces), store_dir, progress=False,
                                      source=dataset.fingerprint())


@dataclass(frozen=True)
class _FaissFile:
    """A faiss index file given with the dataset, opened memory-mapped (only its header and graph in RAM)."""

    path: Path
    index: faiss.Index
    kind: str  # the faiss class, e.g. IndexHNSWFlat


def _open_faiss_file(path: Path, count: int) -> _FaissFile:
    """Open FILE and check it indexes ``count`` vectors by inner product with ids 0..N-1; InputError otherwise."""
    if not path.is_file():
        raise InputError("no such faiss index file", path=path, fix="Check the --faiss-index path")
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:
        try:  # index types faiss cannot map are read whole
            index = faiss.read_index(str(path))
        except RuntimeError as err:
            raise InputError(f"not a faiss index file ({str(err).splitlines()[-1]})", path=path,
                             fix="Pass the file written by dataset.get_index('embeddings').save(FILE)") from None
    kind = type(index).__name__  # read_index returns the concrete class (downcast_index here would free it)
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        metric = "L2" if index.metric_type == faiss.METRIC_L2 else f"metric {index.metric_type}"
        raise InputError(f"this {kind} ranks by {metric} distance; RAG ranks passages by inner product", path=path,
                         fix="Drop --faiss-index and let rag-build-index build one (--factory HNSW128, Flat or exact), "
                         "or rebuild the file with faiss.METRIC_INNER_PRODUCT")
    if index.ntotal != count:
        raise InputError(f"holds {index.ntotal} vectors, the dataset has {count} rows", path=path,
                         fix="Pass the faiss file built from this dataset (same rows, same order)")
    if hasattr(index, "id_map") and not np.array_equal(faiss.vector_to_array(index.id_map), np.arange(count)):
        raise InputError("its ids are not the row numbers 0..N-1", path=path,
                         fix="Pass an index whose i-th vector is row i's embedding, or drop --faiss-index")
    return _FaissFile(path, index, kind)


def _check_faiss_rows(foreign: _FaissFile, vectors: np.ndarray) -> None:
    """The first and last stored vectors equal those rows' embeddings (for classes that store them exactly)."""
    if foreign.index.d != vectors.shape[1]:
        raise InputError(f"dimension {foreign.index.d}, the dataset's embeddings have {vectors.shape[1]}",
                         path=foreign.path, fix="Pass the faiss file built from this dataset's embeddings")
    if foreign.kind not in _EXACT_STORAGE:
        _check_ivf_rows(foreign, vectors)
        return
    for row in sorted({0, vectors.shape[0] - 1}):
        if not np.allclose(foreign.index.reconstruct(row), vectors[row], rtol=1e-5, atol=1e-6):
            raise InputError(f"its vector {row} is not row {row}'s embedding", path=foreign.path,
                             fix="Pass the faiss file built from this dataset's embeddings, in its row order")


def _check_ivf_rows(foreign: _FaissFile, vectors: np.ndarray, samples: int = 16) -> None:
    """An IVF file (codes, not vectors) must hold each sampled row's id in the list that row's embedding is assigned to.

    A file of the same rows in another order fails for most samples; one miss is allowed for a vector
    lying on the boundary of two lists. Other compressed kinds cannot be checked (a warning says so).
    """
    ivf = faiss.try_extract_index_ivf(foreign.index)
    if ivf is None:
        print(f"warning: the row order of a {foreign.kind} file cannot be checked; it must list the dataset's rows "
              f"in order ({foreign.path})")
        return
    rows = np.unique(np.linspace(0, vectors.shape[0] - 1, samples).astype(np.int64))  # (S,)
    _, lists = ivf.quantizer.search(np.ascontiguousarray(vectors[rows], dtype=np.float32), 1)  # (S, 1)
    misses = 0
    for row, list_no in zip(rows.tolist(), lists[:, 0].tolist()):
        size = ivf.invlists.list_size(list_no)
        ids = faiss.rev_swig_ptr(ivf.invlists.get_ids(list_no), size) if size else np.zeros(0, np.int64)
        misses += int(row not in set(ids.tolist()))
    if misses > 1:
        raise InputError(f"{misses} of {len(rows)} sampled rows are not in the inverted list of their embedding",
                         path=foreign.path,
                         fix="Pass the faiss file built from this dataset's embeddings, in its row order")


def _save_with_faiss_file(foreign: _FaissFile, vectors: np.ndarray, store: PassageStore, index_dir: Path,
                          encoder: str) -> str:
    """Write the index directory around a copy of the faiss file; returns the manifest's factory."""
    factory = IMPORTED + foreign.kind
    manifest = IndexManifest(dim=int(vectors.shape[1]), count=int(vectors.shape[0]), factory=factory,
                             encoder=encoder, passages_checksum=store.checksum)
    with atomic_directory(index_dir) as tmp:
        shutil.copyfile(foreign.path, tmp / FAISS_NAME)  # a copy, not a link: rewriting FILE must not change us
        write_vectors(vectors, tmp / VECTORS_NAME)
        manifest.with_passages(index_dir, store.directory).save(tmp)  # the directory loads only when whole
        write_file_manifest(tmp)  # last: sizes and hashes of every file above
    return factory


def _reusable_vectors(index_dir: Path, store: PassageStore | None) -> np.ndarray | None:
    """vectors.npy (N, D) of a finished index over this same store (same dataset), else None."""
    if store is None or not (index_dir / MANIFEST_NAME).is_file():
        return None
    try:
        if load_checked(index_dir).passages_checksum != store.checksum:  # a damaged index is never reused
            return None
        return load_array(index_dir / VECTORS_NAME, mmap=True)
    except InputError as err:
        print(f"rag-build-index: {err}; building it again", file=sys.stderr)
        return None


def _same_build(manifest: IndexManifest, factory: str, encoder: str) -> bool:
    """Whether an index over the same vectors was also built with this factory and encoder name."""
    return manifest.factory == factory and manifest.encoder == encoder


def _shard_plan(directory: Path, plan: dict) -> None:
    """check_plan, after deleting shards a previous import made of a since-changed dataset (they are only a cache)."""
    path = directory / PLAN_NAME
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if "source" in old and old != plan:
            print(f"rag-build-index: {directory} holds shards of an earlier version of the dataset: deleting them")
            shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    check_plan(directory, plan)  # refuses shards of an encoding (rag-build-index --passages)


def _import_vectors(dataset: DatasetSource, out: Path, store: PassageStore | None, count: int, shard_size: int,
                    foreign: _FaissFile | None, progress: bool,
                    check_dim: Callable[[int], None]) -> tuple[PassageStore, np.ndarray]:
    """The store (built unless given) and the (N, D) vectors, memory-mapped from OUT/shards/vectors.npy.

    ``check_dim`` sees D before any shard is written (refusing, e.g., a factory that does not fit it).
    """
    shards_dir = out / "shards"
    _shard_plan(shards_dir, {"count": count, "shard_size": shard_size, "source": dataset.fingerprint(),
                             "vectors": "precomputed"})
    dim = None if foreign is None else int(foreign.index.d)
    writer = _ShardWriter(shards_dir, count, shard_size, dim, f"the dimension of {foreign.path}" if foreign else "",
                          check_dim)
    if writer.todo or store is None:
        built = _import_pass(dataset, count, store_dir=None if store else out / "passages",
                             shards=writer if writer.todo else None, shard_size=shard_size, progress=progress)
        store = store or built
    return store, load_shards(shards_dir, out_path=shards_dir / VECTORS_NAME)


def import_dataset(
    source: str | Path,
    out: str | Path,
    *,
    factory: str = "Flat",
    faiss_index: str | Path | None = None,
    encoder: str | None = None,
    shard_size: int = 100_000,
    train_sample: int = 200_000,
    keep_shards: bool = False,
    progress: bool = True,
) -> Path:
    """Import passages and their embeddings from ``source`` into ``out`` (see the module docstring); returns out/index.

    factory: a faiss factory string (Flat, HNSW32, IVF4096,PQ64) or "exact" (vectors only, torch backend);
    ignored with ``faiss_index``, a faiss file over the same rows to reuse instead. encoder: recorded in the
    manifest (default "precomputed:SRC"). shard_size: rows per resumable shard. train_sample: vectors that
    train IVF / PQ. keep_shards: keep OUT/shards after the index is built.
    Raises InputError for an unreadable source, a missing column, a null, a NaN / inf or an embedding of the
    wrong length (naming the file and the row), an unusable faiss file, or an OUT built from something else.
    """
    started, out = time.time(), Path(out)
    index_dir, dataset = out / "index", open_source(source)
    encoder = encoder or f"precomputed:{dataset.label}"
    if dataset.count == 0:
        raise InputError("the dataset has no rows", path=dataset.label, fix="Pass a non-empty dataset")
    store = existing_store(out / "passages", dataset.fingerprint(),
                           refusal="holds a passage store built from another source ({source})",
                           fix="Use a new --out directory, or delete this one to import the new dataset")
    if store is None and dataset.count is None:  # the hub does not say N: a first read builds the store
        store = _import_pass(dataset, None, store_dir=out / "passages", shards=None, shard_size=shard_size,
                             progress=progress)
    count = len(store) if store is not None else dataset.count
    foreign = _open_faiss_file(Path(faiss_index), count) if faiss_index is not None else None
    vectors = _reusable_vectors(index_dir, store)
    if vectors is None:
        def check_dim(dim: int) -> None:  # a --factory that cannot index count x dim vectors: before any copying
            if foreign is None:
                check_factory(factory, dim=dim, count=count, train_sample=train_sample)

        store, vectors = _import_vectors(dataset, out, store, count, shard_size, foreign, progress, check_dim)
    elif foreign is None and _same_build(IndexManifest.load(index_dir), factory, encoder):
        print(f"rag-build-index: {index_dir} is up to date ({count:,} passages, {factory})")
        return index_dir
    import_seconds = time.time() - started
    if foreign is not None:
        _check_faiss_rows(foreign, vectors)
        factory = _save_with_faiss_file(foreign, vectors, store, index_dir, encoder)
    else:
        build_and_save(vectors, out, factory=factory, encoder=encoder, passages=store, train_sample=train_sample,
                       progress=progress)
    return finish_build(out, count=count, dim=int(vectors.shape[1]), factory=factory, keep_shards=keep_shards,
                        started=started, stage="import", stage_seconds=import_seconds)
