"""Every file of a directory the project writes, with its size and content hash, checked when it is loaded.

A checkpoint, an index, a passage store or an evaluation directory carries ``checksums.json``:

    {"format": 1, "hash": "sha256", "files": {"generator/model.safetensors": {"size": 1234, "sha256": "..."}}}

written last, once every other file is in place. Loading checks that every listed file is present with its size
(one ``stat`` per file: a truncated or missing file is refused at once). The contents are hashed too, in 8 MiB
chunks:

- when asked: ``--verify`` / ``verify=true`` on the commands, or ``RAG_VERIFY_FILES=1`` in the environment;
- on the first use after a copy. The writer leaves ``.checksums.verified`` beside the manifest, holding the
  manifest's device, inode and modification time; a copy (``cp -r``, ``rsync``, a download) gives the manifest
  a new inode, so the first load of the copy hashes every file and records the copy as verified. A move on one
  file system keeps the inode and costs nothing. In a read-only copy the record cannot be written: every load
  hashes, with a warning.

Any mismatch is an InputError naming the file and saying "re-copy / re-save / rebuild". Directories written
before this file existed load with one warning; ``python -m rag_models.file_manifest DIR`` adds a manifest.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Iterable

from tqdm import tqdm

from rag_models.atomic import atomic_write_text
from rag_models.errors import InputError

MANIFEST_NAME = "checksums.json"
MARKER_NAME = ".checksums.verified"
FORMAT = 1
HASH_NAME = "sha256"
VERIFY_ENV = "RAG_VERIFY_FILES"
_CHUNK = 8 * 2**20  # bytes read per hash update: bounded RAM whatever the file size
_PROGRESS_BYTES = 2**30  # show a progress bar when hashing more than this
_warned: set[str] = set()  # directories already warned about (one warning per directory and process)


def file_digest(path: Path) -> str:
    """Hex SHA-256 of the file's bytes, read in 8 MiB chunks."""
    digest = hashlib.sha256()  # OpenSSL uses SHA CPU instructions where present: 1.7x blake2b's rate on such a CPU
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def content_fingerprint(path: Path) -> dict:
    """Name, size and content hash of a source file: what decides whether a store or encoding made from it is
    reused (never its timestamp, which a copy or a ``touch`` changes while the content stays)."""
    return {"name": path.name, "size": path.stat().st_size, "sha256": file_digest(path)}


def same_source(old: object, new: object) -> bool:
    """Whether fingerprint ``old`` (saved) describes the source of ``new`` (now).

    A fingerprint saved before content hashes (name, size and mtime) matches on name and size alone: the
    timestamp is ignored, never trusted.
    """
    if isinstance(old, dict) and isinstance(new, dict):
        if "mtime" in old and "sha256" not in old:
            old = {key: value for key, value in old.items() if key != "mtime"}
            new = {key: value for key, value in new.items() if key != "sha256"}
        return old.keys() == new.keys() and all(same_source(old[key], new[key]) for key in old)
    if isinstance(old, list) and isinstance(new, list):
        return len(old) == len(new) and all(same_source(a, b) for a, b in zip(old, new))
    return old == new


def verify_requested() -> bool:
    """True when the process was asked to hash every file it loads (``RAG_VERIFY_FILES=1``)."""
    return os.environ.get(VERIFY_ENV, "").strip().lower() in ("1", "true", "yes")


def request_verify(verify: bool) -> None:
    """Make every later load of this process, and of the processes it starts, hash its files (when ``verify``)."""
    if verify:
        os.environ[VERIFY_ENV] = "1"


def _listed(directory: Path, files: Iterable[str | Path] | None) -> list[str]:
    """Relative POSIX paths of ``files`` (default: every file under ``directory``, hidden ones excepted)."""
    if files is not None:
        return sorted(Path(name).as_posix() for name in files)
    found = []
    for path in directory.rglob("*"):
        relative = path.relative_to(directory)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts) \
                and relative.as_posix() != MANIFEST_NAME:
            found.append(relative.as_posix())
    return sorted(found)


def write_file_manifest(directory: str | Path, files: Iterable[str | Path] | None = None) -> Path:
    """Hash the files of ``directory`` (default: all but hidden ones) into its ``checksums.json``; returns it.

    Call it last, when the directory is complete (inside `atomic_directory`, before the rename). The writer
    just read every byte, so the directory is recorded as verified (see the module docstring).
    """
    directory = Path(directory)
    entries = {}
    for name in _listed(directory, files):
        path = directory / name
        entries[name] = {"size": path.stat().st_size, "sha256": file_digest(path)}
    path = directory / MANIFEST_NAME
    atomic_write_text(path, json.dumps({"format": FORMAT, "hash": HASH_NAME, "files": entries}, indent=1) + "\n")
    _mark_verified(directory)
    return path


def _stamp(manifest: Path) -> str:
    """What identifies this copy of the manifest: device, inode and modification time in ns."""
    stat = manifest.stat()
    return f"{stat.st_dev}:{stat.st_ino}:{stat.st_mtime_ns}"


def _mark_verified(directory: Path) -> bool:
    """Record that this copy's files matched their hashes; False when the directory is read-only."""
    try:
        atomic_write_text(directory / MARKER_NAME, _stamp(directory / MANIFEST_NAME) + "\n")
    except OSError:
        return False
    return True


def _verified_before(directory: Path) -> bool:
    """Whether the files of this very copy were hashed before (the marker matches the manifest's identity)."""
    try:
        return (directory / MARKER_NAME).read_text().strip() == _stamp(directory / MANIFEST_NAME)
    except OSError:
        return False


def _damaged(path: Path, problem: str, what: str, *, edited: Path | None = None) -> InputError:
    """The error for a damaged file; ``edited``: the directory to re-list if the change was made on purpose."""
    fix = f"Re-copy the {what} from where it came from, or re-save / rebuild it"
    if edited is not None:
        fix += f" (if you edited it on purpose: python -m rag_models.file_manifest {edited})"
    return InputError(f"{problem}: the {what} is damaged", path=path, fix=fix)


def read_file_manifest(directory: Path, what: str) -> dict[str, dict] | None:
    """The ``files`` of ``directory/checksums.json``, None when the directory has none (written before them)."""
    path = directory / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = data["files"]
        if not isinstance(files, dict) or not all(isinstance(e, dict) and {"size", "sha256"} <= set(e)
                                                  for e in files.values()):
            raise ValueError("entries need size and sha256")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise _damaged(path, f"unreadable file manifest ({err})", what) from None
    return files


def check_directory(directory: str | Path, *, what: str, under: str | None = None,
                    verify: bool | None = None) -> None:
    """Refuse a damaged ``directory``: a listed file missing or of another size, or with ``verify`` another hash.

    ``what`` names the directory for people ("checkpoint", "index", "passage store", ...). ``under``: check only
    the files below that subdirectory (a checkpoint's ``generator/`` loaded alone). ``verify`` None: hash when
    ``RAG_VERIFY_FILES=1`` or on the first use of a copy (module docstring); True / False: always / never hash.
    Raises InputError naming the first damaged file. A directory without a manifest warns once and passes.
    """
    directory = Path(directory)
    files = read_file_manifest(directory, what)
    if files is None:
        _warn_unlisted(directory, what)
        return
    prefix = None if under is None else under.rstrip("/") + "/"
    names = [name for name in files if prefix is None or name.startswith(prefix)]
    for name in names:
        path, expected = directory / name, int(files[name]["size"])
        try:
            size = path.stat().st_size
        except OSError:
            raise _damaged(path, "file missing", what) from None
        if size != expected:
            raise _damaged(path, f"{size:,} bytes, {expected:,} when it was written (truncated or modified)", what,
                           edited=directory)
    fresh_copy = verify is None and not _verified_before(directory)
    if not (fresh_copy or verify or (verify is None and verify_requested())):
        return
    _check_hashes(directory, files, names, what)
    if prefix is None or len(names) == len(files):
        if not _mark_verified(directory) and fresh_copy:
            _warn_once(directory, f"{directory}: cannot record that this copy of the {what} was verified "
                       "(read-only); its files are hashed at every load")


def _check_hashes(directory: Path, files: dict[str, dict], names: list[str], what: str) -> None:
    """InputError naming the first of ``names`` whose content hash differs from the manifest's."""
    total = sum(int(files[name]["size"]) for name in names)
    with tqdm(total=total, desc=f"verify {directory.name}", unit="B", unit_scale=True,
              disable=total < _PROGRESS_BYTES) as bar:
        for name in names:
            if file_digest(directory / name) != files[name]["sha256"]:
                raise _damaged(directory / name, "content differs from when it was written (corrupt or replaced)",
                               what, edited=directory)
            bar.update(int(files[name]["size"]))


def check_file(path: str | Path, *, what: str, verify: bool | None = None) -> None:
    """Check one file against the manifest of its directory, when that manifest lists it (else nothing)."""
    path = Path(path)
    files = read_file_manifest(path.parent, what)
    if files is None or path.name not in files:
        return
    entry = files[path.name]
    if not path.is_file():
        raise _damaged(path, "file missing", what)
    if path.stat().st_size != int(entry["size"]):
        raise _damaged(path, f"{path.stat().st_size:,} bytes, {int(entry['size']):,} when it was written "
                       "(truncated or modified)", what, edited=path.parent)
    if verify or (verify is None and verify_requested()):
        _check_hashes(path.parent, files, [path.name], what)


def _warn_unlisted(directory: Path, what: str) -> None:
    _warn_once(directory, f"{directory}: this {what} has no {MANIFEST_NAME} (written by an older version): "
               "its files cannot be checked; add one with `python -m rag_models.file_manifest "
               f"{directory}` once you trust it")


def _warn_once(directory: Path, message: str) -> None:
    key = f"{directory.resolve()}|{message[-40:]}"
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def main(argv: list[str] | None = None) -> int:
    """``python -m rag_models.file_manifest DIR...``: add (or refresh) the file manifest of directories you trust."""
    names = sys.argv[1:] if argv is None else argv
    if not names or any(name.startswith("-") for name in names):
        print("usage: python -m rag_models.file_manifest DIR [DIR ...]  (writes DIR/checksums.json)", file=sys.stderr)
        return 2
    for name in names:
        if not Path(name).is_dir():
            print(f"file_manifest: error: {name}: not a directory", file=sys.stderr)
            return 2
        path = write_file_manifest(name)
        print(f"wrote {path} ({len(json.loads(path.read_text())['files'])} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
