"""Checkpoint files that are whole or absent, loaded without unpickling arbitrary objects.

Lightning's default writer goes through an fsspec transaction whose temporary file
lives in the system temp dir; the final move is then a copy across file systems,
and a kill during that copy leaves a truncated ``last.ckpt`` under its final name.
Here the temporary file sits beside the target, is fsynced, and is renamed with
``os.replace`` (atomic on POSIX). Loading always uses ``weights_only=True``.

A ``.ckpt`` is a zip archive whose entries each carry a CRC-32: that is its file manifest. Reading it checks
the archive's directory at its end (a cut file fails at once); with ``RAG_VERIFY_FILES=1`` (rag-train
``verify=true``) every entry's CRC is checked first, so a corrupt byte is refused by name.
"""
from __future__ import annotations

import pickle
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from rag_models.atomic import atomic_file
from rag_models.errors import InputError
from rag_models.file_manifest import verify_requested


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` into ``.NAME.tmp-PID`` in the same directory, fsync, then rename onto ``path``."""
    with atomic_file(path) as handle:
        torch.save(obj, handle)
    return Path(path)


def safe_torch_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)``, with an InputError naming the file when it is not a checkpoint."""
    try:
        if verify_requested():
            _check_crcs(Path(path))
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise InputError("checkpoint not found", path=path, fix="check ckpt_path (or use ckpt_path=last)") from None
    except (RuntimeError, EOFError, ValueError, OSError, pickle.UnpicklingError) as err:
        raise InputError(f"cannot read the checkpoint ({str(err).splitlines()[0]})", path=path,
                         fix="pass a checkpoint written by rag-train; a truncated file comes from another writer "
                         "or an incomplete copy: re-copy it") from err


def _check_crcs(path: Path) -> None:
    """InputError naming ``path`` and its first entry whose bytes do not match their CRC-32."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, zlib.error, OSError) as err:
        raise InputError(f"not a whole checkpoint archive ({err})", path=path,
                         fix="Re-copy the checkpoint, or resume from another one") from None
    if bad is not None:
        raise InputError(f"entry {bad} is corrupt (CRC mismatch)", path=path,
                         fix="Re-copy the checkpoint, or resume from another one")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO: atomic local writes, ``weights_only=True`` reads.

    Takes no constructor arguments. Raises InputError when a checkpoint is missing or unreadable.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically."""
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: str | Path, map_location: Callable | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Read a checkpoint with the safe unpickler, whatever the caller asked."""
        location = map_location if map_location is not None else (lambda storage, loc: storage)
        return safe_torch_load(path, map_location=location)
