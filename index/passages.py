"""The passage store: 21M passages on disk, memory-mapped, random access by row or id in O(1).

Built once from DPR's TSV or JSONL into a directory:

    meta.json                 count, checksum, id scheme, source fingerprint (written last)
    titles.bin / titles.off   UTF-8 bytes of all titles; (N+1,) int64 offsets into them
    texts.bin  / texts.off    the same for the texts
    ids.bin    / ids.off      the ids as strings (omitted when ids are consecutive integers)
    id_hash.u64 / id_row.i64  sorted 64-bit id hashes and their rows (only for non-integer ids)
    sources.bin / sources.off where each passage came from, e.g. ``notes/report.pdf#page=3`` (only when
                              some passage has a source; meta.json then says ``"sources": true``)
    checksums.json            every file above with its size and content hash (rag_models/file_manifest.py)

Opening maps the files, reads meta.json and checks every file's size against
checksums.json (a truncated column is refused by name): time and RAM do not grow with the
corpus. DPR's ids are the integers 1..N, so `row_of` is one subtraction; other
ids go through a sorted hash table on disk (binary search over a memmap).

The checksum covers ids, titles and texts (what the index encodes), not the
sources: provenance does not change a vector. Stores without sources are
written exactly as before the column existed, and older stores open as stores
without sources.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tqdm import tqdm

from index.passage_files import Passage, iter_passages
from rag_models.atomic import atomic_directory
from rag_models.errors import InputError
from rag_models.file_manifest import check_directory, content_fingerprint, same_source, write_file_manifest

STORE_VERSION = 1
_FLUSH_EVERY = 65536  # records buffered before a write: bounded RAM, few syscalls
_FIELDS = ("ids", "titles", "texts")  # the checksummed columns
_SOURCES = "sources"  # optional provenance column, outside the checksum


class _ColumnWriter:
    """Appends strings to ``NAME.bin`` and their end offsets to ``NAME.off``."""

    def __init__(self, directory: Path, name: str) -> None:
        self.blob = open(directory / f"{name}.bin", "wb")
        self.offsets = open(directory / f"{name}.off", "wb")
        self.offsets.write(np.zeros(1, dtype=np.int64).tobytes())
        self.pending: list[int] = []
        self.position = 0

    def append(self, data: bytes) -> None:
        """Add one string's bytes; offsets are written in batches."""
        self.blob.write(data)
        self.position += len(data)
        self.pending.append(self.position)
        if len(self.pending) >= _FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        """Write the buffered end offsets."""
        self.offsets.write(np.asarray(self.pending, dtype=np.int64).tobytes())
        self.pending = []

    def close(self) -> None:
        """Flush and close both files."""
        self.flush()
        self.blob.close()
        self.offsets.close()


def _id_hash(pid: str) -> int:
    """Stable 64-bit hash of an id (Python's hash() changes between processes)."""
    return int.from_bytes(hashlib.blake2b(pid.encode("utf-8"), digest_size=8).digest(), "little")


def existing_store(directory: Path, source: dict, *, refusal: str, fix: str) -> "PassageStore | None":
    """The finished store at ``directory`` when it was built from ``source`` (a fingerprint), None when there is none.

    A re-run reuses the store instead of rebuilding it; a damaged one (a file cut or missing) is rebuilt, with a
    message. Raises InputError(``refusal``, ``fix``) when the store there was built from something else (its
    fingerprint differs).
    """
    if not (directory / "meta.json").is_file():
        return None
    try:
        store = PassageStore.open(directory)
    except InputError as err:
        print(f"passage store: {err}; building it again", file=sys.stderr)
        return None
    if same_source(store.meta.get("source"), source):
        return store
    raise InputError(refusal.format(source=store.meta.get("source")), path=directory, fix=fix)


class PassageStore:
    """Memory-mapped passages: ``get(row)``, ``titles(rows)``, ``texts(rows)``, ``row_of(id)``.

    Opening maps the files and reads only ``meta.json``: constant time and RAM whatever N.

    Args:
        directory: a store directory written by `build` / `from_passages` (``meta.json`` and the column
            files); same as `open`.

    Raises InputError when ``directory`` has no ``meta.json`` (not a store, or an unfinished build) or a
    column's offsets disagree with the count in ``meta.json`` (the store was modified after its build).
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        meta_path = self.directory / "meta.json"
        if not meta_path.is_file():
            raise InputError(
                "not a passage store (no meta.json)",
                path=self.directory,
                fix="Build one with PassageStore.build(passages_file, out_dir) or rag-build-index; "
                "a directory without meta.json is an unfinished build",
            )
        check_directory(self.directory, what="passage store")
        self.meta = _read_meta(meta_path)
        self._count = int(self.meta["count"])
        self._columns = {name: self._open_column(name) for name in _FIELDS if name != "ids" or not self._range_ids}
        if self.has_sources:
            self._columns[_SOURCES] = self._open_column(_SOURCES)
        if not self._range_ids:
            self._hashes = _map(self.directory / "id_hash.u64", np.uint64, self._count)  # (N,) sorted
            self._hash_rows = _map(self.directory / "id_row.i64", np.int64, self._count)  # (N,)

    @property
    def _range_ids(self) -> bool:
        return self.meta["id_mode"] == "range"

    @property
    def has_sources(self) -> bool:
        """Whether the store keeps a source per passage (False for stores built from TSV / JSONL)."""
        return bool(self.meta.get(_SOURCES))

    def _open_column(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        offsets = _map(self.directory / f"{name}.off", np.int64)  # (N+1,)
        if offsets.shape[0] != self._count + 1:
            raise InputError(f"{name}.off holds {offsets.shape[0] - 1} offsets, meta.json says {self._count}",
                             path=self.directory, fix="The store was modified after its build; rebuild it")
        size = int(offsets[-1])
        blob_size = (self.directory / f"{name}.bin").stat().st_size
        if blob_size != size:  # also for stores written before checksums.json
            raise InputError(f"{name}.bin holds {blob_size:,} bytes, its offsets end at {size:,} (truncated or "
                             "modified)", path=self.directory / f"{name}.bin",
                             fix="Re-copy the passage store from where it came from, or rebuild it")
        # np.memmap refuses zero-length files: an all-empty column is an empty array.
        blob = _map(self.directory / f"{name}.bin", np.uint8) if size else np.zeros(0, np.uint8)
        return offsets, blob

    @classmethod
    def open(cls, directory: str | Path) -> "PassageStore":
        """Open a built store (constant time and memory)."""
        return cls(directory)

    @classmethod
    def build(cls, source_path: str | Path, out_dir: str | Path, *, progress: bool = True,
              source: dict | None = None) -> "PassageStore":
        """Convert a DPR TSV / JSONL passage file into a store at ``out_dir`` (atomic, replaces an old one).

        ``source``: the file's `content_fingerprint` when the caller already has it (hashing 13 GB takes a
        while); computed here when None.
        """
        source_path = Path(source_path)
        source = content_fingerprint(source_path) if source is None else source
        return cls.from_passages(iter_passages(source_path), out_dir, progress=progress, source=source,
                                 where=source_path)

    @classmethod
    def from_passages(cls, passages: Iterable[Passage], out_dir: str | Path, *, progress: bool = True,
                      source: dict | None = None, where: str | Path | None = None) -> "PassageStore":
        """Write any iterable of passages into a store at ``out_dir`` (atomic: temp dir, then rename).

        ``where``: the file the passages came from, named by the error about a repeated id.
        """
        with atomic_directory(out_dir) as tmp:
            meta = _write_columns(passages, tmp, progress)
            if meta["id_mode"] == "hash":
                _write_id_table(tmp, meta["count"], where)
            unused = ([] if meta["id_mode"] == "hash" else ["ids"]) + ([] if meta.get(_SOURCES) else [_SOURCES])
            for name in unused:  # ids implied by their rows; no passage with a source
                for suffix in ("bin", "off"):
                    (tmp / f"{name}.{suffix}").unlink()
            meta.update(version=STORE_VERSION, source=source, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            write_file_manifest(tmp)  # last: sizes and hashes of every file above
        return cls(out_dir)

    def release_pages(self) -> None:
        """Drop the pages of the mapped files read so far from this process's resident memory.

        Every page read through a mapping stays resident in the process until the mapping closes: encoding
        all 21M passages reads every text (13 GB), and the encoder's RSS grew with N. The pages stay in the
        OS page cache and fault back in on the next read; a corpus-wide reader (encoding) calls this after
        each shard so that its RSS stays flat whatever N.
        """
        if not hasattr(mmap, "MADV_DONTNEED"):  # not on this platform (e.g. Windows): nothing to do
            return
        arrays = [array for column in self._columns.values() for array in column]
        arrays += [self._hashes, self._hash_rows] if not self._range_ids else []
        for array in arrays:
            mapping = getattr(array, "_mmap", None)  # the mmap.mmap behind an np.memmap (None: in-RAM array)
            if mapping is not None:
                mapping.madvise(mmap.MADV_DONTNEED)  # safe on a read-only file mapping

    # ---- access -------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._count

    @property
    def checksum(self) -> str:
        """Digest of all ids, titles and texts, computed once at build time."""
        return self.meta["checksum"]

    def _strings(self, name: str, rows: Sequence[int] | np.ndarray) -> list[str]:
        rows = self._check_rows(rows)
        offsets, blob = self._columns[name]
        starts, ends = offsets[rows], offsets[rows + 1]  # (R,), (R,)
        return [blob[a:b].tobytes().decode("utf-8") for a, b in zip(starts.tolist(), ends.tolist())]

    def _check_rows(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)  # (R,)
        if rows.size and (rows.min() < 0 or rows.max() >= self._count):
            bad = rows[(rows < 0) | (rows >= self._count)][0]
            raise IndexError(f"row {bad} outside the passage store of {self._count} passages ({self.directory})")
        return rows

    def titles(self, rows: Sequence[int] | np.ndarray) -> list[str]:
        """Titles of the given rows, in order."""
        return self._strings("titles", rows)

    def texts(self, rows: Sequence[int] | np.ndarray) -> list[str]:
        """Texts of the given rows, in order."""
        return self._strings("texts", rows)

    def ids(self, rows: Sequence[int] | np.ndarray) -> list[str]:
        """Passage ids (as in the source file) of the given rows."""
        if self._range_ids:
            start = int(self.meta["id_start"])
            return [str(start + row) for row in self._check_rows(rows).tolist()]
        return self._strings("ids", rows)

    def sources(self, rows: Sequence[int] | np.ndarray) -> list[str]:
        """Where the given rows came from (e.g. ``notes/report.pdf#page=3``); "" each when the store has none."""
        if not self.has_sources:
            return [""] * len(self._check_rows(rows))
        return self._strings(_SOURCES, rows)

    def get(self, row: int) -> Passage:
        """The passage at ``row`` (0-based position in the source file)."""
        return Passage(id=self.ids([row])[0], title=self.titles([row])[0], text=self.texts([row])[0],
                       source=self.sources([row])[0])

    def row_of(self, pid: str) -> int:
        """Row of the passage whose id is ``pid``; KeyError if there is none."""
        pid = str(pid)
        if self._range_ids:
            if pid.lstrip("-").isdigit() and str(int(pid)) == pid:
                row = int(pid) - int(self.meta["id_start"])
                if 0 <= row < self._count:
                    return row
            raise KeyError(f"no passage with id {pid!r} in {self.directory}")
        target = np.uint64(_id_hash(pid))
        position = int(np.searchsorted(self._hashes, target, side="left"))
        while position < self._count and self._hashes[position] == target:  # rare 64-bit collisions
            row = int(self._hash_rows[position])
            if self.ids([row])[0] == pid:
                return row
            position += 1
        raise KeyError(f"no passage with id {pid!r} in {self.directory}")


def _map(path: Path, dtype: type, count: int | None = None) -> np.ndarray:
    """A read-only memmap of a store file, or InputError naming it (missing, or cut mid-item in an old store)."""
    try:
        return np.memmap(path, dtype=dtype, mode="r", shape=None if count is None else (count,))
    except (OSError, ValueError) as err:
        raise InputError(f"cannot map the file ({err})", path=path,
                         fix="Re-copy the passage store from where it came from, or rebuild it") from None


def _read_meta(path: Path) -> dict:
    """meta.json of a store, or an InputError naming it when it is unreadable or lacks a key."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or not {"count", "checksum", "id_mode"} <= set(meta):
            raise ValueError("expected an object with count, checksum and id_mode")
        int(meta["count"])
    except (ValueError, TypeError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InputError(f"unreadable store metadata ({err})", path=path,
                         fix="Re-copy the passage store from where it came from, or rebuild it") from None
    return meta


def _write_columns(passages: Iterable[Passage], directory: Path, progress: bool) -> dict:
    """Stream passages into the columns; returns count, checksum, the id scheme and whether any has a source."""
    writers = {name: _ColumnWriter(directory, name) for name in (*_FIELDS, _SOURCES)}
    digest = hashlib.blake2b(digest_size=16)
    count, start, consecutive, any_source, blank = 0, None, True, False, 0
    for passage in tqdm(passages, desc="passage store", unit=" psg", unit_scale=True, disable=not progress):
        if not passage.id:
            raise InputError(f"passage #{count + 1} has an empty id", setting="passages",
                             fix="Give every passage a unique, non-empty id")
        fields = (passage.id.encode("utf-8"), passage.title.encode("utf-8"), passage.text.encode("utf-8"))
        for name, data in zip(_FIELDS, fields):
            writers[name].append(data)
            # Lengths first, so ("ab", "c") and ("a", "bc") never hash alike.
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
        writers[_SOURCES].append(passage.source.encode("utf-8"))  # not in the checksum: provenance only
        any_source = any_source or bool(passage.source)
        blank += not passage.text.strip()
        if consecutive:
            if start is None:
                consecutive = passage.id.lstrip("-").isdigit() and str(int(passage.id)) == passage.id
                start = int(passage.id) if consecutive else None
            else:
                consecutive = passage.id == str(start + count)
        count += 1
    for writer in writers.values():
        writer.close()
    if count == 0:
        raise InputError("no passages to store", setting="passages", fix="Pass a non-empty passage file")
    mode = "range" if consecutive else "hash"
    meta = {"count": count, "checksum": f"blake2b:{digest.hexdigest()}", "id_mode": mode,
            "id_start": start if consecutive else None}
    if any_source:  # stores without sources keep exactly the meta.json they always had
        meta[_SOURCES] = True
    if blank:  # kept (rows follow the file), flagged: they are retrievable yet say nothing
        meta["blank_texts"] = blank
    return meta


def _write_id_table(directory: Path, count: int, where: str | Path | None = None) -> None:
    """Sorted id hashes + rows for O(log N) on-disk lookups; refuses duplicate ids.

    RAM: the (N,) hashes and their sort order (16 bytes a passage: the size of the table written); the ids
    are read _FLUSH_EVERY at a time (a Python list of all N offsets cost 60 bytes a passage more).
    """
    offsets = np.memmap(directory / "ids.off", dtype=np.int64, mode="r")  # (N+1,)
    blob = np.memmap(directory / "ids.bin", dtype=np.uint8, mode="r")
    hashes = np.empty(count, dtype=np.uint64)  # (N,)
    for first in range(0, count, _FLUSH_EVERY):
        bounds = offsets[first:min(count, first + _FLUSH_EVERY) + 1].tolist()  # (b+1,)
        hashes[first:first + len(bounds) - 1] = [_id_hash(blob[a:b].tobytes().decode("utf-8"))
                                                 for a, b in zip(bounds[:-1], bounds[1:])]
    order = np.argsort(hashes, kind="stable")  # (N,) rows sorted by hash
    sorted_hashes = hashes[order]
    for position in np.flatnonzero(sorted_hashes[1:] == sorted_hashes[:-1]).tolist():
        row_a, row_b = int(order[position]), int(order[position + 1])
        id_a = blob[offsets[row_a]:offsets[row_a + 1]].tobytes().decode("utf-8")
        id_b = blob[offsets[row_b]:offsets[row_b + 1]].tobytes().decode("utf-8")
        if id_a == id_b:
            raise InputError(f"passage id {id_a!r} appears twice (passages #{row_a + 1} and #{row_b + 1})",
                             path=where, setting="passages", fix="Give every passage a unique id")
    sorted_hashes.tofile(directory / "id_hash.u64")
    order.astype(np.int64).tofile(directory / "id_row.i64")
