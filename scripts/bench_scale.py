"""Benchmark `rag-build-index` end to end on N synthetic passages: peak memory and time of every stage.

    python scripts/bench_scale.py --n 2000000 --factory IVF1024,PQ64x4fs --work-dir runs/bench_scale --json scale.json
    python scripts/bench_scale.py --size tiny --json scale.json        # tiny 20k, mid 200k, large 2M

It writes N passages of 100 words (DPR's TSV: id, text, title; ids 1..N) and a tiny random-init DPR
context encoder (1 layer of width 32, projected to D=768 as DPR-base's vectors are, so that the vectors,
the index and their memory have the real size while encoding stays cheap), then runs
``python -m index.build_cli --passages ...`` in a child process (progress bars on). A thread reads
the child's stderr, where every stage announces itself (``passage store``, ``encode rank``, ``merge
shards``, ``train``, ``add to``, ``write``), and the child's memory is sampled from /proc every 0.2 s:

    RSS    resident set size (VmRSS): every page mapped in, file-backed ones (memmaps) included
    anon   RssAnon: what the process allocated (heap, arrays, faiss), the memory that cannot be given back
    file   RssFile: pages of mapped files (passage store, vectors.npy); the kernel may drop them at will

Per stage it reports seconds and peak RSS / anon / file (MB), and the disk size of the store, the vectors
and the faiss file. The work directory is deleted at the end unless --keep.
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from rag_models.tiny_models import TinyDprSize, tiny_dpr_encoder  # noqa: E402
from rag_models.tokenization import dpr_tokenizers, train_wordpiece_vocab  # noqa: E402
from scripts.bench_contract import machine, write_rows  # noqa: E402

MB = 2**20
SIZES = {"tiny": 20_000, "mid": 200_000, "large": 2_000_000}
# Each stage's first line on the child's stderr (tqdm descriptions and the build's own messages).
STAGE_MARKERS = (("passage store", "store"), ("encode rank", "encode"), ("merge shards", "merge"),
                 ("train ", "train"), ("add to", "add"), ("write ", "write"), ("rag-build-index:", "done"))
ENCODER = TinyDprSize(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_positions=64,
                      vocab_size=1000, projection_dim=768)


def write_passages(path: Path, n: int, seed: int = 0) -> Path:
    """DPR TSV of ``n`` passages of 100 words (5,000-word vocabulary), ids 1..n; bounded RAM."""
    rng = np.random.default_rng(seed)
    vocabulary = np.array([f"w{number}" for number in range(5000)])
    with open(path, "w", encoding="utf-8") as out:
        out.write("id\ttext\ttitle\n")
        for start in range(0, n, 10_000):
            count = min(10_000, n - start)
            words = vocabulary[rng.integers(0, len(vocabulary), size=(count, 100))]  # (c, 100)
            out.writelines(f"{start + i + 1}\t{' '.join(row)}\tPassage {start + i + 1}\n"
                           for i, row in enumerate(words.tolist()))
    return path


def write_encoder(out: Path, passages: Path) -> Path:
    """A tiny DPR context encoder (D=768) with a WordPiece vocabulary trained on the first 2,000 passages."""
    texts = []
    with open(passages, encoding="utf-8") as handle:
        next(handle)
        for _, line in zip(range(2000), handle):
            ident, text, title = line.rstrip("\n").split("\t")
            texts.append(f"{title} {text}")
    _, tokenizer = dpr_tokenizers(train_wordpiece_vocab(texts, ENCODER.vocab_size))
    model = tiny_dpr_encoder("context", len(tokenizer), ENCODER, seed=0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _proc_cpu(pid: int) -> float | None:
    """User + system CPU seconds of a process from /proc (contention-proof, unlike wall time), None if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


def _proc_memory(pid: int) -> tuple[int, int, int] | None:
    """(VmRSS, RssAnon, RssFile) in bytes from /proc, None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = dict(re.findall(r"^(VmRSS|RssAnon|RssFile):\s+(\d+) kB", text, flags=re.M))
    if len(fields) < 3:
        return None
    return tuple(int(fields[name]) * 1024 for name in ("VmRSS", "RssAnon", "RssFile"))


class StageLog:
    """The child's current stage (from its stderr) and, per stage, start time and peak memory."""

    def __init__(self) -> None:
        self.stage, self.order = "start", ["start"]
        self.started = {"start": time.time()}
        self.peak: dict[str, list[int]] = {"start": [0, 0, 0]}
        self.cpu: dict[str, list[float]] = {"start": [0.0, 0.0]}  # CPU seconds at a stage's first and last sample
        self.lock = threading.Lock()
        self.lines: list[str] = []
        self.echoed = time.time()

    def read(self, stream) -> None:
        """Follow the child's stderr (tqdm redraws with carriage returns) and switch stages on markers."""
        buffer = ""
        while chunk := stream.read(1):
            if chunk not in "\r\n":
                buffer += chunk
                if len(buffer) == 20:  # a bar's first draw ends without \r: switch stages on its start
                    self._switch(buffer.strip())
                continue
            line, buffer = buffer.strip(), ""
            if line and (not self.lines or self.lines[-1] != line):
                self.lines = self.lines[-200:] + [line]
            if line and time.time() - self.echoed > 60:  # a long run shows where it is, once a minute
                self.echoed = time.time()
                peak = ", ".join(f"{value / MB:.0f}" for value in self.peak[self.stage])
                print(f"  [{self.stage}] {line[:100]} | peak RSS, anon, file MB: {peak}", flush=True)
            self._switch(line)

    def _switch(self, line: str) -> None:
        """Start the stage whose marker begins ``line`` (once per stage); print the one that ends."""
        for marker, stage in STAGE_MARKERS:
            if line.startswith(marker) and stage not in self.started:
                with self.lock:
                    self.report(self.stage)  # as it ends: a run killed later still leaves what it measured
                    self.stage = stage
                    self.order.append(stage)
                    self.started[stage] = time.time()
                    self.peak[stage] = [0, 0, 0]
                    self.cpu[stage] = [self.cpu[self.order[-2]][1]] * 2

    def report(self, stage: str) -> None:
        """Print a finished stage's seconds and peaks (MB)."""
        rss, anon, file = (value / MB for value in self.peak[stage])
        cpu = self.cpu[stage][1] - self.cpu[stage][0]
        print(f"stage {stage}: {time.time() - self.started[stage]:.1f} s ({cpu:.1f} CPU s), peak RSS {rss:.0f} MB "
              f"(anon {anon:.0f}, file-backed {file:.0f})", flush=True)

    def sample(self, memory: tuple[int, int, int], cpu: float) -> None:
        """Add one memory sample to the current stage's peaks, and its CPU seconds so far."""
        with self.lock:
            self.peak[self.stage] = [max(old, new) for old, new in zip(self.peak[self.stage], memory)]
            self.cpu[self.stage][1] = cpu


def run_build(tsv: Path, encoder: Path, out: Path, *, factory: str, train_sample: int, max_length: int,
              batch_size: int, shard_size: int, threads: int) -> tuple[StageLog, float, int]:
    """rag-build-index in a child process; the stage log, wall seconds and the child's peak RSS (ru_maxrss)."""
    command = [sys.executable, "-m", "index.build_cli", "--passages", str(tsv), "--encoder", str(encoder),
               "--out", str(out), "--factory", factory, "--train-sample", str(train_sample),
               "--max-length", str(max_length), "--batch-size", str(batch_size), "--shard-size", str(shard_size),
               "--device", "cpu"]
    # Waiting OpenMP threads spin: on shared, busy cores one thread per process measures the work, not the waits.
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    print("$", " ".join(command), flush=True)
    started, log = time.time(), StageLog()
    child = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE, text=True)
    reader = threading.Thread(target=log.read, args=(child.stderr,), daemon=True)
    reader.start()
    while child.poll() is None:
        memory, cpu = _proc_memory(child.pid), _proc_cpu(child.pid)
        if memory is not None and cpu is not None:
            log.sample(memory, cpu)
        time.sleep(0.2)
    reader.join(timeout=5)
    seconds = time.time() - started
    if child.returncode != 0:
        raise SystemExit(f"rag-build-index failed ({child.returncode}):\n" + "\n".join(log.lines[-20:]))
    return log, seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def _disk(path: Path) -> int:
    """Bytes of the files under ``path`` (hard links counted once per name: vectors.npy appears once)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def stage_rows(log: StageLog, end: float, size: str) -> list[dict]:
    """One row per stage and measure: seconds, peak RSS, anon and file MB."""
    rows = []
    stages = [stage for stage in log.order if stage != "done"]
    ends = [log.started[stage] for stage in stages[1:]] + [log.started.get("done", end)]
    for stage, stage_end in zip(stages, ends):
        rss, anon, file = log.peak[stage]
        cpu = log.cpu[stage][1] - log.cpu[stage][0]
        for measure, value, unit in ((f"{stage} time", stage_end - log.started[stage], "s"),
                                     (f"{stage} CPU time", cpu, "s"),
                                     (f"{stage} peak RSS", rss / MB, "MB"), (f"{stage} peak anon", anon / MB, "MB"),
                                     (f"{stage} peak file-backed", file / MB, "MB")):
            rows.append({"measure": measure, "size": size, "ours": round(value, 2), "peer": None, "peer_name": None,
                         "unit": unit, "ratio": None, "target": None, "met": None})
    return rows


def factory_rates(count: int, factories: list[str], train_sample: int, dim: int = 768) -> list[dict]:
    """Train and add CPU seconds of each faiss factory on ``count`` random (count, dim) vectors, in this process.

    The build of every factory but Flat costs more than copying the vectors: these rates, times N, give its
    build time at another N (IVF: train once on the sample, then assign every vector; HNSW: N log N inserts).
    """
    import faiss

    vectors = np.random.default_rng(0).standard_normal((count, dim), dtype=np.float32)  # (M, D)
    rows = []
    for factory in factories:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        started = time.process_time()  # CPU seconds of this process: what shared cores do not inflate
        if not index.is_trained:
            index.train(vectors[:train_sample])
        trained = time.process_time()
        index.add(vectors)
        added = time.process_time()
        print(f"{factory}: train {trained - started:.1f} CPU s on {min(count, train_sample):,}, "
              f"add {added - trained:.1f} CPU s for {count:,} ({count / max(added - trained, 1e-9):,.0f} per CPU s)",
              flush=True)
        for measure, value, unit in ((f"{factory} train", trained - started, "CPU s"),
                                     (f"{factory} add rate", count / max(added - trained, 1e-9), "vectors/CPU s")):
            rows.append({"measure": measure, "size": f"n={count}", "ours": round(value, 2), "peer": None,
                         "peer_name": None, "unit": unit, "ratio": None, "target": None, "met": None})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny", help="N: tiny 20k, mid 200k, large 2M")
    parser.add_argument("--n", type=int, default=None, help="passages (overrides --size)")
    parser.add_argument("--factory", default=None, help="faiss factory or 'exact' (default: IVF256,PQ64x4fs "
                        "below 100,000 passages, else IVF1024,PQ64x4fs: 4-bit PQ trains in seconds)")
    parser.add_argument("--train-sample", type=int, default=50_000, help="IVF / PQ training vectors")
    parser.add_argument("--max-length", type=int, default=32, help="encoder token limit")
    parser.add_argument("--batch-size", type=int, default=512, help="passages per encoder forward")
    parser.add_argument("--threads", type=int, default=1, help="OpenMP / torch threads of the build")
    parser.add_argument("--work-dir", default=None, help="scratch directory (default: runs/bench_scale-N)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--factory-rates", type=int, default=0, metavar="M",
                        help="instead: train / add time of Flat, HNSW32, IVF-PQ on M random 768-d vectors")
    parser.add_argument("--json", default=None, help="write the results here (bench contract)")
    args = parser.parse_args()
    if args.factory_rates:
        rows = factory_rates(args.factory_rates, ["Flat", "HNSW32", "IVF1024,PQ64", "IVF1024,PQ64x4fs"],
                             args.train_sample)
        write_rows(args, rows, machine())
        return
    n = args.n or SIZES[args.size]
    args.factory = args.factory or ("IVF256,PQ64x4fs" if n < 100_000 else "IVF1024,PQ64x4fs")
    size = args.size if args.n is None else f"n={n}"
    work = Path(args.work_dir or REPO_ROOT / "runs" / f"bench_scale-{n}")
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    tsv = work / "passages.tsv"
    if not tsv.is_file():
        write_passages(tsv.with_suffix(".tmp"), n).rename(tsv)
    print(f"passages: {n:,} in {tsv} ({tsv.stat().st_size / MB:,.0f} MB, {time.time() - started:.0f} s)", flush=True)
    encoder = work / "context_encoder"
    if not encoder.is_dir():
        write_encoder(encoder, tsv)
    out = work / "build"
    shutil.rmtree(out, ignore_errors=True)
    shard_size = min(100_000, max(1, n // 10))  # >= 10 shards: the merge stage shows itself
    log, seconds, max_rss = run_build(tsv, encoder, out, factory=args.factory, train_sample=args.train_sample,
                                      max_length=args.max_length, batch_size=args.batch_size, shard_size=shard_size,
                                      threads=args.threads)
    rows = stage_rows(log, log.started["start"] + seconds, size)
    disk = {"passage store": _disk(out / "passages"), "vectors.npy": _disk(out / "index" / "vectors.npy"),
            "index.faiss": _disk(out / "index" / "index.faiss")}
    for measure, value, unit in ((f"total time (N={n})", seconds, "s"), ("peak RSS (ru_maxrss)", max_rss / MB, "MB"),
                                 *((f"disk {name}", value / MB, "MB") for name, value in disk.items())):
        rows.append({"measure": measure, "size": size, "ours": round(value, 2), "peer": None, "peer_name": None,
                     "unit": unit, "ratio": None, "target": None, "met": None})
    print(f"\n{'measure':<34}{'value':>12}  unit   (N={n:,}, {args.factory}, D={ENCODER.projection_dim})")
    for row in rows:
        print(f"{row['measure']:<34}{row['ours']:>12,.1f}  {row['unit']}")
    write_rows(args, rows, machine())
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
