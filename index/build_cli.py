"""`rag-build-index`: passages file -> passage store -> encoded shards -> index directory.

    rag-build-index --passages psgs_w100.tsv --encoder facebook/dpr-ctx_encoder-single-nq-base \\
        --out indexes/wiki --factory IVF4096,PQ64 --device cuda --fp16

    rag-build-index --documents notes/ papers/report.pdf --encoder runs/<run>/model/context_encoder --out indexes/mine

--documents splits your own .txt, .md and .pdf files (folders expand recursively)
into 100-word passages that keep their source file and page (index/documents.py).
Either way it writes OUT/passages (the store), OUT/shards (encoding, resumable; removed at the
end unless --keep-shards) and OUT/index (manifest, index.faiss, vectors.npy,
pointing at ../passages). Re-running after a kill removes its temporaries and resumes the encoding; re-running
after success with another --factory rebuilds only the faiss index. Under
torchrun every rank encodes its shards and rank 0 builds the index. With
--from-dataset SRC the passages come with their embeddings and nothing is
encoded (index/dataset_import.py).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist

from index.builders import build_and_save, check_factory, finish_build
from index.dataset_import import import_dataset
from index.documents import document_files, documents_fingerprint, iter_document_passages
from index.encode import encode_corpus, load_shards, make_embed_fn, resolve_rank
from index.manifest import IndexManifest, load_array, load_checked
from index.passages import PassageStore, existing_store
from rag_models.cli_errors import command, positive_int
from rag_models.errors import InputError
from rag_models.file_manifest import content_fingerprint
from rag_models.leftovers import sweep_stale
from rag_models.lifeline import tie_to_launcher


def _passage_store(passages: Path, out: Path, progress: bool) -> PassageStore:
    """The store at ``out``, built from ``passages`` unless a store of that same file is already there."""
    fingerprint = content_fingerprint(passages)  # hashed once: for the reuse check and the new store's meta.json
    store = existing_store(out, fingerprint,
                           refusal="holds a passage store built from another file ({source})",
                           fix="Use a new --out directory, or delete this one to rebuild it from the new passages")
    return store if store is not None else PassageStore.build(passages, out, progress=progress, source=fingerprint)


def _documents_store(documents: Sequence[str | Path], out: Path, progress: bool) -> PassageStore:
    """The store at ``out``, built from the ``documents`` unless a store of that same set of files is already there."""
    files = document_files(documents)
    fingerprint = documents_fingerprint(files)
    store = existing_store(out, fingerprint,
                           refusal="holds a passage store built from other files (or other versions of them)",
                           fix="Use a new --out directory, or delete this one to rebuild it from the documents "
                           "given now")
    if store is not None:
        return store
    return PassageStore.from_passages(iter_document_passages(files, progress=progress), out, progress=False,
                                      source=fingerprint)


def _reusable_vectors(index_dir: Path, store: PassageStore, encoder: str) -> np.ndarray | None:
    """vectors.npy of a finished index over the same passages and encoder, else None (a damaged one is rebuilt)."""
    if not (index_dir / "manifest.json").is_file():
        return None
    try:
        manifest = load_checked(index_dir)  # a damaged index is never reused
        if manifest.passages_checksum != store.checksum or manifest.encoder != encoder:
            return None
        return load_array(index_dir / "vectors.npy", mmap=True)  # (N, D)
    except InputError as err:
        print(f"rag-build-index: {err}; building it again", file=sys.stderr)
        return None


def _encode(store: PassageStore, out: Path, *, encoder: str, factory: str, train_sample: int, batch_size: int,
            shard_size: int, max_length: int, fp16: bool, device: str, progress: bool) -> None:
    """Encode this rank's shards with the context encoder (skips finished shards), once ``factory`` fits its D."""
    from rag_models.retriever import load_encoder  # the model package is only needed when encoding

    model, tokenizer = load_encoder(encoder, role="context")
    check_factory(factory, dim=model.dim, count=len(store), train_sample=train_sample)  # before hours of encoding
    embed = make_embed_fn(model, tokenizer, max_length=max_length, device=device, fp16=fp16)
    encode_corpus(store, embed, out / "shards", batch_size=batch_size, shard_size=shard_size,
                  encoder_name=encoder, progress=progress)


def build_index(
    passages: str | Path | None,
    encoder: str | Path,
    out: str | Path,
    *,
    factory: str = "Flat",
    batch_size: int = 128,
    shard_size: int = 100_000,
    max_length: int = 256,
    fp16: bool = False,
    device: str = "cpu",
    train_sample: int = 200_000,
    keep_shards: bool = False,
    progress: bool = True,
    documents: Sequence[str | Path] = (),
) -> Path:
    """Build (or resume, or reuse) the index of ``passages`` under ``out``; returns ``out/index``.

    factory: a faiss factory string (Flat, HNSW32, IVF4096,PQ64) or "exact" (vectors only, torch backend).
    documents: text / Markdown / PDF files or folders to split into passages instead (``passages`` None).
    """
    started, out, encoder = time.time(), Path(out), str(encoder)
    index_dir = out / "index"
    rank, world = resolve_rank(None, None)
    if rank == 0:  # passage store, shards, index of a killed build (never a live build's)
        sweep_stale(out, command="rag-build-index")
    store = None
    if rank == 0 and documents:
        store = _documents_store(documents, out / "passages", progress)
    elif rank == 0:
        store = _passage_store(Path(passages), out / "passages", progress)
    if world > 1:
        dist.barrier()  # rank 0 built the store; the others open it
        store = store or PassageStore.open(out / "passages")
    existing = _reusable_vectors(index_dir, store, encoder)
    if existing is not None and IndexManifest.load(index_dir).factory == factory:
        print(f"rag-build-index: {index_dir} is up to date ({len(store):,} passages, {factory})")
        return index_dir
    encode_seconds = 0.0
    if existing is None:
        _encode(store, out, encoder=encoder, factory=factory, train_sample=train_sample, batch_size=batch_size,
                shard_size=shard_size, max_length=max_length, fp16=fp16, device=device, progress=progress)
        encode_seconds = time.time() - started
        if world > 1:
            dist.barrier()  # every rank's shards are on disk
    if rank == 0:
        vectors = existing
        if vectors is None:  # (N, D), concatenated from the shards into one file
            vectors = load_shards(out / "shards", out_path=out / "shards" / "vectors.npy")
        build_and_save(vectors, out, factory=factory, encoder=encoder, passages=store, train_sample=train_sample,
                       progress=progress)
        finish_build(out, count=len(store), dim=int(vectors.shape[1]), factory=factory, keep_shards=keep_shards,
                     started=started, stage="encoding", stage_seconds=encode_seconds)
    if world > 1:
        dist.barrier()  # no rank returns before the index exists
    return index_dir


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rag-build-index", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--passages", help="DPR psgs_w100.tsv(.gz) or JSONL {id,title,text}")
    source.add_argument("--documents", nargs="+", metavar="PATH",
                        help="your .txt / .md / .pdf files or folders, split into 100-word passages")
    parser.add_argument("--encoder", help="context encoder: hub name or local checkpoint directory "
                        "(required, except with --from-dataset)")
    parser.add_argument("--out", required=True, help="output directory (passages/, index/)")
    parser.add_argument("--factory", default="Flat", help="faiss factory (Flat, HNSW32, IVF4096,PQ64) or 'exact'")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="passages per encoder forward")
    parser.add_argument("--shard-size", type=positive_int, default=100_000, help="passages per resumable shard")
    parser.add_argument("--max-length", type=positive_int, default=256, help="token limit of title [SEP] text")
    parser.add_argument("--train-sample", type=positive_int, default=200_000, help="vectors used to train IVF / PQ")
    parser.add_argument("--fp16", action="store_true", help="autocast the encoder to fp16 (CUDA only)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--keep-shards", action="store_true", help="keep OUT/shards after the index is built")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs)")
    _add_dataset_options(parser, source)
    return parser


def _add_dataset_options(parser: argparse.ArgumentParser, source: argparse._MutuallyExclusiveGroup) -> None:
    """--from-dataset SRC (instead of --passages) and --faiss-index FILE; see index/dataset_import.py."""
    source.add_argument("--from-dataset", metavar="SRC", help="instead of --passages: import passages with their "
                        "embeddings (no encoding) from a Dataset.save_to_disk directory, parquet or .arrow file(s), "
                        "or hf:NAME[:CONFIG[:SPLIT]]; --encoder is then only a label for the manifest")
    parser.add_argument("--faiss-index", metavar="FILE", help="with --from-dataset: reuse this inner-product faiss "
                        "index of the same rows instead of building one (then open it with index.factory=null)")


def _check_sources(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--encoder unless --from-dataset; --faiss-index only with --from-dataset (argparse: one source exactly)."""
    if args.from_dataset is None and args.encoder is None:
        parser.error("--passages / --documents need --encoder (the context encoder that embeds the passages)")
    if args.faiss_index is not None and args.from_dataset is None:
        parser.error("--faiss-index goes only with --from-dataset")
    if args.passages is not None and not Path(args.passages).is_file():
        raise InputError("passages file not found", path=args.passages,
                         fix="Pass --passages FILE: a DPR psgs_w100.tsv(.gz) or a JSONL {id, title, text} file")
    if args.encoder is not None and Path(args.encoder).exists() and not (Path(args.encoder) / "config.json").is_file():
        raise InputError("not an encoder checkpoint (no config.json)", path=args.encoder,
                         fix="Pass --encoder DIR written by save_pretrained (e.g. rag-train's "
                         "<run_dir>/model/context_encoder) or a hub name")
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        raise InputError("exists and is not a directory", path=args.out, fix="Pass --out a new or existing directory")


def _import(args: argparse.Namespace) -> None:
    """rag-build-index --from-dataset: no encoder, no devices, one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("--from-dataset runs in one process: nothing to share among ranks", setting="WORLD_SIZE",
                         fix="Run it with python / rag-build-index, not torchrun")
    import_dataset(args.from_dataset, args.out, factory=args.factory, faiss_index=args.faiss_index,
                   encoder=args.encoder, shard_size=args.shard_size, train_sample=args.train_sample,
                   keep_shards=args.keep_shards, progress=not args.no_progress)


def check_device(device: str | None, setting: str = "--device") -> None:
    """InputError for a device torch does not know, or a CUDA device on a machine without one."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device {device!r}", setting=setting, fix="Use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{device!r} asked for, but this machine has no CUDA device", setting=setting,
                         fix="Use --device cpu")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise InputError(f"{device!r}: only {torch.cuda.device_count()} CUDA device(s) here", setting=setting,
                         fix="Use a device index below the count")


def _init_distributed(device: str | None) -> str:
    """Join the torchrun process group when launched with WORLD_SIZE > 1; returns this rank's device."""
    cuda = torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        tie_to_launcher()  # each rank dies with torchrun's agent
        dist.init_process_group("nccl" if cuda else "gloo")
        if cuda and device is None:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            return f"cuda:{torch.cuda.current_device()}"
    return device or ("cuda" if cuda else "cpu")


@command("rag-build-index")
def main(argv: list[str] | None = None) -> None:
    """Console entry point of ``rag-build-index``; a bad input: one line on stderr, exit status 2."""
    parser = _parser()
    args = parser.parse_args(argv)
    _check_sources(parser, args)
    check_device(args.device)
    if args.fp16 and not str(args.device).startswith("cuda"):
        print(f"rag-build-index: warning: --fp16 autocasts on CUDA only; encoding on {args.device} stays float32",
              file=sys.stderr)
    try:
        if args.from_dataset is not None:
            _import(args)
            return
        device = _init_distributed(args.device)
        build_index(args.passages, args.encoder, args.out, factory=args.factory, batch_size=args.batch_size,
                    shard_size=args.shard_size, max_length=args.max_length, fp16=args.fp16, device=device,
                    train_sample=args.train_sample, keep_shards=args.keep_shards, progress=not args.no_progress,
                    documents=args.documents or ())
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
