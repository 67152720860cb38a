"""Corpus encoding: passage store -> (N, D) float32 vectors, in shards that survive a kill.

Rows are cut into shards of ``shard_size``; shard i belongs to rank ``i % world``.
A shard is published as ``shard_00012.npy`` (temp name + os.replace) and then
its sidecar ``shard_00012.json``; a shard counts as done only if the sidecar
exists and the array has the shape it states. A re-run skips done shards, so
a killed 21M-passage encode loses at most one shard per rank.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import torch
from tqdm import tqdm

from index.passages import PassageStore
from rag_models.atomic import atomic_save_npy, atomic_write_text
from rag_models.errors import InputError

EmbedFn = Callable[[list[str], list[str]], np.ndarray]  # (titles, texts) -> (N, D) float32
PLAN_NAME = "encoding.json"


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world) from the arguments, else from torch.distributed when initialized, else (0, 1)."""
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    if rank is None:
        rank = torch.distributed.get_rank() if initialized else 0
    if world_size is None:
        world_size = torch.distributed.get_world_size() if initialized else 1
    if not 0 <= rank < world_size:
        raise InputError(f"rank {rank} outside world of size {world_size}", setting="rank / world_size")
    return rank, world_size


def shard_ranges(count: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, end) rows of every shard."""
    if shard_size < 1:
        raise InputError(f"shard_size={shard_size}", setting="shard_size", fix="Use a positive shard size")
    return [(start, min(count, start + shard_size)) for start in range(0, count, shard_size)]


def shard_path(out_dir: Path, number: int) -> Path:
    """Path of shard ``number``'s vectors; its sidecar has the same stem and ``.json``."""
    return out_dir / f"shard_{number:05d}.npy"


def check_plan(out_dir: Path, plan: dict) -> None:
    """Write ``plan`` as ``encoding.json``, or check an existing one: a resume must cut the same shards of N rows.

    ``plan`` needs ``count`` (N) and ``shard_size`` (what `load_shards` reads), plus whatever identifies where
    the vectors come from. Raises InputError when ``out_dir`` holds shards of another plan.
    """
    path = out_dir / PLAN_NAME
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != plan:
            raise InputError(
                f"holds shards of another encoding ({old}), not of this one ({plan})",
                path=out_dir,
                fix="Delete that directory or encode into another one; "
                "a resume needs the same passages, encoder and shard_size",
            )
        return
    atomic_write_text(path, json.dumps(plan, indent=2) + "\n")


def shard_done(out_dir: Path, number: int, start: int, end: int) -> bool:
    """True when shard ``number`` is complete: sidecar present and the array of the stated shape."""
    sidecar = shard_path(out_dir, number).with_suffix(".json")
    if not sidecar.is_file():
        return False
    try:
        info = json.loads(sidecar.read_text(encoding="utf-8"))
        array = np.load(shard_path(out_dir, number), mmap_mode="r")
    except (OSError, ValueError):  # truncated or missing .npy: encode it again
        return False
    return info.get("rows") == [start,
                                end] and array.shape == (end - start, info.get("dim")) and array.dtype == np.float32


def _encode_shard(store: PassageStore, embed: EmbedFn, start: int, end: int, batch_size: int, bar: tqdm) -> np.ndarray:
    """Vectors of rows [start, end), batch by batch, written into one (end - start, D) array.

    Filled in place (allocated once D is known): a list of batches concatenated at the end would hold the
    shard twice at its peak.
    """
    shard = None  # (end - start, D) float32
    for first in range(start, end, batch_size):
        rows = np.arange(first, min(end, first + batch_size))  # (b,)
        vectors = np.asarray(embed(store.titles(rows), store.texts(rows)), dtype=np.float32)  # (b, D)
        if vectors.ndim != 2 or vectors.shape[0] != len(rows):
            raise InputError(f"the embedding function returned shape {vectors.shape} for {len(rows)} passages",
                             setting="encoder", fix="It must return one vector per passage, shape (N, D)")
        if shard is None:
            shard = np.empty((end - start, vectors.shape[1]), dtype=np.float32)
        elif vectors.shape[1] != shard.shape[1]:
            raise InputError("the embedding function changed dimension between batches", setting="encoder")
        shard[first - start:first - start + len(rows)] = vectors  # a copy: no batch output outlives its batch
        bar.update(len(rows))
    return shard


def publish_shard(out_dir: Path, number: int, start: int, vectors: np.ndarray) -> Path:
    """Write the array (temp + replace), then its sidecar: the sidecar is the 'done' mark."""
    path = shard_path(out_dir, number)
    atomic_save_npy(path, vectors)
    info = {"rows": [start, start + vectors.shape[0]], "dim": int(vectors.shape[1]), "dtype": "float32"}
    atomic_write_text(path.with_suffix(".json"), json.dumps(info) + "\n")
    return path


def encode_corpus(
    store: PassageStore,
    embed: EmbedFn,
    out_dir: str | Path,
    *,
    batch_size: int = 64,
    shard_size: int = 100_000,
    rank: int | None = None,
    world_size: int | None = None,
    encoder_name: str | None = None,
    progress: bool = True,
) -> list[Path]:
    """Encode this rank's shards of ``store`` into ``out_dir``, skipping shards already done; returns their paths.

    ``encoder_name`` is recorded so that a resume with another encoder is refused
    instead of mixing vectors of two encoders.
    """
    rank, world_size = resolve_rank(rank, world_size)
    if batch_size < 1:
        raise InputError(f"batch_size={batch_size}", setting="batch_size", fix="Use a positive batch size")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_plan(out_dir, {"count": len(store), "shard_size": shard_size, "passages_checksum": store.checksum,
                         "encoder": encoder_name})
    mine = [(n, s, e) for n, (s, e) in enumerate(shard_ranges(len(store), shard_size)) if n % world_size == rank]
    todo = [(n, s, e) for n, s, e in mine if not shard_done(out_dir, n, s, e)]
    total = sum(e - s for _, s, e in mine)
    done_rows = total - sum(e - s for _, s, e in todo)
    with tqdm(total=total, initial=done_rows, desc=f"encode rank {rank}/{world_size}", unit=" psg",
              unit_scale=True, disable=not progress) as bar:
        for number, start, end in todo:
            publish_shard(out_dir, number, start, _encode_shard(store, embed, start, end, batch_size, bar))
            store.release_pages()  # RSS: one shard's passages at a time, not the whole store
    return [shard_path(out_dir, n) for n, _, _ in mine]


def load_shards(out_dir: str | Path, out_path: str | Path | None = None) -> np.ndarray:
    """All shards concatenated in row order: (N, D) float32.

    With ``out_path`` the result is written there as one ``.npy`` (atomically, with
    bounded RAM) and returned memory-mapped; without, it is an in-RAM array.
    Missing or partial shards raise an InputError that lists them.
    """
    out_dir = Path(out_dir)
    plan_path = out_dir / PLAN_NAME
    if not plan_path.is_file():
        raise InputError("no encoding.json: not an encoding directory", path=out_dir,
                         fix="Run encode_corpus (or rag-build-index) into it first")
    plan = json.loads(plan_path.read_text(encoding="utf-8"))
    ranges = shard_ranges(plan["count"], plan["shard_size"])
    missing = [n for n, (s, e) in enumerate(ranges) if not shard_done(out_dir, n, s, e)]
    if missing:
        shown = ", ".join(shard_path(out_dir, n).name for n in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise InputError(f"{len(missing)} of {len(ranges)} shards are missing or unfinished: {shown}",
                         path=out_dir, fix="Re-run the encoding with the same arguments: it resumes and fills them in")
    paths = [shard_path(out_dir, n) for n in range(len(ranges))]
    dims = {int(json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))["dim"]) for path in paths}
    if len(dims) != 1:
        raise InputError(f"shards have different dimensions {sorted(dims)}", path=out_dir,
                         fix="They came from different encoders; delete the directory and encode again")
    if out_path is None:
        return np.concatenate([np.load(path, mmap_mode="r") for path in paths])  # (N, D)
    return _write_concatenated(paths, Path(out_path), plan["count"], dims.pop())


def _write_concatenated(paths: list[Path], out_path: Path, count: int, dim: int) -> np.ndarray:
    """Append the shards' bytes one file at a time to a temp ``.npy``, then rename it to ``out_path``.

    Plain file reads and writes, not memmaps: the pages of a mapped 60 GB file would count in this process's
    resident memory; copying through a 16 MB buffer keeps it flat whatever N.
    """
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as merged:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                      "shape": (count, dim)}
            np.lib.format.write_array_header_1_0(merged, header)  # as np.save writes it
            for path in tqdm(paths, desc="merge shards", unit=" shard", disable=len(paths) < 10):
                with open(path, "rb") as shard:
                    _skip_npy_header(shard)
                    shutil.copyfileobj(shard, merged, length=16 * 2**20)
            merged.flush()
            os.fsync(merged.fileno())
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return np.load(out_path, mmap_mode="r")


def _skip_npy_header(handle: BinaryIO) -> None:
    """Move past the header of a C-order float32 ``.npy`` file: the raw (rows, D) data follows."""
    version = np.lib.format.read_magic(handle)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    _, fortran_order, dtype = read_header(handle)
    if fortran_order or dtype != np.float32:  # shard_done() already checked the dtype; np.save writes C order
        raise InputError("shard is not a C-order float32 array", path=getattr(handle, "name", None),
                         fix="Delete it and run the encoding again")


def make_embed_fn(encoder: torch.nn.Module, tokenizer, *, max_length: int = 256,
                  device: str | torch.device = "cpu", fp16: bool = False) -> EmbedFn:
    """An ``embed(titles, texts)`` from a context encoder and its tokenizer (DPR pair input: title [SEP] text).

    Runs in eval mode without gradients; ``fp16`` autocasts on CUDA only (CPU half matmuls are slow).
    """
    device = torch.device(device)
    encoder = encoder.to(device).eval()
    use_autocast = fp16 and device.type == "cuda"

    def embed(titles: list[str], texts: list[str]) -> np.ndarray:
        """(N, D) float32 vectors of N (title, text) pairs."""
        batch = tokenizer(titles, texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_autocast):
            output = encoder(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        # Our DenseEncoder returns the (B, D) tensor; a bare transformers DPR encoder, an output with pooler_output.
        vectors = output if isinstance(output, torch.Tensor) else output.pooler_output  # (B, D)
        # A copy, not a view: the pooled vectors are often a slice of the (B, L, H) hidden states, and a view
        # would keep that whole buffer alive until the shard is written (memory growing with the shard).
        return vectors.float().cpu().numpy().copy()

    return embed
