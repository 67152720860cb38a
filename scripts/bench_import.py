"""Benchmark `rag-build-index --from-dataset`: peak memory and wall time of importing N precomputed embeddings.

    python scripts/bench_import.py --n 200000 2000000 --dim 768 --factory exact IVF1024,PQ64 --train-sample 100000
    python scripts/bench_import.py --size tiny --json runs/bench/import.json   # contract row: RSS(10x N) / RSS(N)

For each N it writes a synthetic dataset (title, ~100-word text, a D-dim float32 embedding; files of 250k
rows, written chunk by chunk; parquet, or with --format arrow IPC streams) under a scratch directory, runs
the import in a child process (scripts/build_index.py --from-dataset ... --no-progress) once per factory,
and samples the child's memory (children included) every 0.1 s:

    RSS    resident set size, all pages mapped in, file-backed ones (memmaps) included
    anon   RSS minus file-backed and shared pages (psutil's rss - shared): heap, what the import allocates
    USS    pages only this process maps (psutil memory_full_info; counts its memmap pages too), every ~1 s

The scratch directory (2M x 768 is 6 GB per copy, three copies at the peak) is deleted at the end.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # the checkout's packages, installed or not

from scripts.bench_contract import add_contract_args, machine, write_rows  # noqa: E402

MB = 2**20
# --size -> (the two dataset sizes, D): the peak RSS of the larger over the smaller is the contract row
SIZES = {"tiny": ([10_000, 100_000], 256), "mid": ([20_000, 200_000], 768), "large": ([200_000, 2_000_000], 768)}
TARGET = 1.15
_CHUNK = 50_000  # rows generated and written at a time (one row group): 150 MB of 768-d float32
_FILE_ROWS = 250_000  # rows per parquet file


def write_dataset(directory: Path, n: int, dim: int, file_format: str = "parquet", seed: int = 0) -> Path:
    """Files of ``n`` rows (title, text, embeddings list<float32> (n, dim)) in ``directory``; bounded RAM.

    parquet: 50k-row row groups; arrow: IPC streams of 1,000-row batches, as Dataset.save_to_disk writes them.
    """
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    vocabulary = np.array([f"w{number}" for number in range(5000)])
    pool = [" ".join(rng.choice(vocabulary, size=100)) for _ in range(4096)]  # ~100-word texts, reused
    schema = pa.schema([("title", pa.string()), ("text", pa.string()), ("embeddings", pa.list_(pa.float32()))])
    for first_row in range(0, n, _FILE_ROWS):
        rows = min(_FILE_ROWS, n - first_row)
        path = directory / f"part-{first_row // _FILE_ROWS:05d}.{file_format}"
        with _writer(path, schema, file_format) as writer:
            for start in range(first_row, first_row + rows, _CHUNK):
                count = min(_CHUNK, first_row + rows - start)
                vectors = rng.standard_normal((count, dim), dtype=np.float32)  # (c, D)
                offsets = pa.array(np.arange(0, (count + 1) * dim, dim, dtype=np.int32))  # (c + 1,)
                embeddings = pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1)))
                titles = pa.array([f"passage {row}" for row in range(start, start + count)])
                texts = pa.array([pool[row % len(pool)] for row in range(start, start + count)])
                table = pa.Table.from_batches([pa.record_batch([titles, texts, embeddings], schema=schema)])
                if file_format == "parquet":
                    writer.write_table(table)  # one 50k-row row group
                else:
                    writer.write_table(table, max_chunksize=1000)
    return directory


def _writer(path: Path, schema: pa.Schema, file_format: str):
    """A parquet writer (uncompressed: random floats do not compress) or an Arrow IPC stream writer."""
    if file_format == "parquet":
        return pq.ParquetWriter(path, schema, compression="none")
    return pa.ipc.new_stream(str(path), schema)


def _memory(process: psutil.Process, with_uss: bool) -> tuple[int, int, int]:
    """(rss, anon, uss) of a process and its children in bytes (uss 0 unless asked for: reading smaps is slow)."""
    rss = anon = uss = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            info = member.memory_info()
            rss, anon = rss + info.rss, anon + info.rss - info.shared
            uss += member.memory_full_info().uss if with_uss else 0
        except psutil.NoSuchProcess:  # exited between listing and reading
            continue
    return rss, anon, uss


def run_import(source: Path, out: Path, factory: str, train_sample: int, shard_size: int | None = None) -> dict:
    """Run the import in a child process; its peak memory (RSS, anon, USS) and wall time."""
    command = [sys.executable, str(REPO_ROOT / "scripts" / "build_index.py"), "--from-dataset", str(source),
               "--out", str(out), "--factory", factory, "--train-sample", str(train_sample), "--no-progress"]
    command += [] if shard_size is None else ["--shard-size", str(shard_size)]
    started = time.time()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    process, peak, samples = psutil.Process(child.pid), [0, 0, 0], 0
    while child.poll() is None:
        try:
            sample = _memory(process, with_uss=samples % 10 == 0)
        except psutil.NoSuchProcess:
            break
        peak = [max(old, new) for old, new in zip(peak, sample)]
        samples += 1
        time.sleep(0.1)
    output = child.communicate()[0]
    if child.returncode != 0:
        raise SystemExit(f"import failed ({child.returncode}):\n{output}")
    return {"rss": peak[0], "anon": peak[1], "uss": peak[2], "seconds": time.time() - started,
            "summary": output.strip().splitlines()[-1]}


def main(argv: list[str] | None = None) -> None:
    """Parse the sizes, import each dataset with each factory in a child process, print (and write) the peaks."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[200_000, 2_000_000], help="dataset sizes (rows)")
    parser.add_argument("--dim", type=int, default=768, help="embedding dimension D")
    parser.add_argument("--factory", nargs="+", default=["exact"], help="factories to import with, each a run")
    parser.add_argument("--train-sample", type=int, default=100_000, help="IVF / PQ training vectors")
    parser.add_argument("--format", choices=["parquet", "arrow"], default="parquet",
                        help="source files: parquet, or Arrow IPC streams as Dataset.save_to_disk writes them")
    parser.add_argument("--scratch", default=None, help="parent of the scratch directory (default: the temp dir)")
    parser.add_argument("--shard-size", type=int, help="rows per shard (default: rag-build-index's 100,000)")
    add_contract_args(parser)
    parser.set_defaults(size=None)  # no --size: --n and --dim as given
    args = parser.parse_args(argv)
    if args.size is not None:  # shards of the smaller size: both runs may hold one shard, only N differs
        args.n, args.dim = SIZES[args.size]
        args.shard_size = args.shard_size or min(args.n)
    scratch = Path(tempfile.mkdtemp(prefix="bench_import-", dir=args.scratch))
    results: dict[tuple[str, int], dict] = {}
    try:
        for n in args.n:
            started = time.time()
            source = write_dataset(scratch / f"data-{n}", n, args.dim, args.format)
            size = sum(path.stat().st_size for path in source.iterdir()) / MB
            print(f"N={n:,}: wrote {size:,.0f} MB of {args.format} in {time.time() - started:.0f} s", flush=True)
            for factory in args.factory:
                result = results[factory, n] = run_import(source, scratch / "out", factory, args.train_sample,
                                                              args.shard_size)
                print(f"  {factory:>14}: peak RSS {result['rss'] / MB:,.0f} MB, anon {result['anon'] / MB:,.0f} MB, "
                      f"USS {result['uss'] / MB:,.0f} MB, {result['seconds']:.0f} s | {result['summary']}", flush=True)
                shutil.rmtree(scratch / "out")
            shutil.rmtree(source)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    smallest, largest = min(args.n), max(args.n)
    rows = []
    for factory in args.factory:
        if smallest != largest:
            low, high = results[factory, smallest], results[factory, largest]
            print(f"{factory}: RSS({largest:,}) / RSS({smallest:,}) = {high['rss'] / low['rss']:.2f}, "
                  f"anon {high['anon'] / low['anon']:.2f}, USS {high['uss'] / low['uss']:.2f}")
            ratio = high["rss"] / low["rss"]
            rows.append({"measure": f"--from-dataset peak RSS ({factory}, D={args.dim}), {largest:,} vs {smallest:,} "
                         "rows (ratio ours/peer)", "size": args.size, "ours": round(high["rss"] / MB, 1),
                         "peer": round(low["rss"] / MB, 1), "peer_name": f"same import, {smallest:,} rows",
                         "unit": "MB", "ratio": round(ratio, 3), "target": f"<= {TARGET}x", "met": ratio <= TARGET})
    write_rows(args, rows, machine())


if __name__ == "__main__":
    main()
