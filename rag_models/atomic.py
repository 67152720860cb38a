"""Files and directories that appear whole or not at all.

Every artefact a run produces (passage stores, shards, indexes, checkpoints,
predictions, results) goes through these helpers: the bytes are written under a
temporary name in the *same* directory, fsynced, and renamed onto the final
name. A run killed at any point leaves either the old complete artefact or none,
never a half-written one under the real name. Every temporary name carries the
writer's PID, so that a later run can tell a killed writer's leftovers from a live
one's (rag_models/leftovers.py removes the former).
"""
from __future__ import annotations

import contextlib
import gzip
import io
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import IO, Iterator

import numpy as np

from rag_models.errors import InputError
from rag_models.leftovers import TEMP_PATTERN, remove_stale, stale_temporaries


def _temp_name(path: Path) -> Path:
    """A hidden sibling of ``path`` that no reader mistakes for the real file."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[IO[bytes]]:
    """Open ``path`` for binary writing under a temporary name; rename it into place on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        with open(tmp, "wb") as raw:
            yield raw
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_text_writer(path: str | Path) -> Iterator[IO[str]]:
    """Like `atomic_file`, for UTF-8 text (gzip-compressed when ``path`` ends in ``.gz``)."""
    with atomic_file(path) as raw:
        binary: IO[bytes] = raw
        if str(path).lower().endswith(".gz"):
            # mtime=0 and no stored name (it would be the temporary one) keep the bytes reproducible.
            binary = gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0)
        text = io.TextIOWrapper(binary, encoding="utf-8", newline="\n")
        yield text
        text.flush()
        text.detach()  # keep `binary` open: the gzip trailer is written by its close below
        if binary is not raw:
            binary.close()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a small text file atomically."""
    with atomic_file(path) as out:
        out.write(text.encode("utf-8"))


def atomic_save_npy(path: str | Path, array: np.ndarray) -> None:
    """``np.save`` atomically: the ``.npy`` appears only complete."""
    with atomic_file(path) as out:
        np.save(out, array)


@contextlib.contextmanager
def atomic_directory(target: str | Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``target``; on success rename it to ``target``.

    If the body raises (or the process dies), ``target`` is untouched: an old
    directory stays in service and no half-written one appears. An existing
    ``target`` is replaced (old renamed aside, new renamed in, old deleted).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_writers(target)
    if target.exists() and not overwrite:
        raise InputError("already exists", path=target, fix="Choose another output directory or delete this one")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        _sync_directory(tmp)
        publish_directory(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _remove_dead_writers(target: Path) -> None:
    """Remove the temporaries of ``target`` left by killed writers (a live writer's stay), with a warning."""
    mine = [p for p in stale_temporaries(target.parent)
            if (match := TEMP_PATTERN.match(p.name)) is not None and match["name"] == target.name]
    sweep = remove_stale(mine)
    if sweep.removed or sweep.restored:
        warnings.warn(sweep.summary(target.parent), stacklevel=4)


def publish_directory(tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` onto ``target``, moving an existing ``target`` aside first."""
    old = None
    if target.exists():
        # rename() cannot replace a non-empty directory; the old one is moved aside
        # (it stays recoverable under .NAME.old-* if we die between the two renames).
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
        os.rmdir(old)
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _sync_directory(directory: Path) -> None:
    """fsync every file in ``directory`` so the rename never publishes data still in flight."""
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
