"""Benchmark `rag-build-index`'s peak memory: encoding N passages must not cost more RAM as N grows.

    python scripts/bench_encode_memory.py --size mid --json runs/bench/encode_memory.json
    python scripts/bench_encode_memory.py --n 5000 20000 80000 --max-length 256   # any sizes

Writes a synthetic corpus of ~100-word passages and a tiny random-init DPR context encoder (D=64)
under a temporary directory, then runs ``python -m index.build_cli --passages ... --factory exact``
once per N in a child process and reads the child's peak resident memory from the kernel
(``wait4``'s ru_maxrss: exact, no sampling). Beyond the current shard's vectors (N x 64 x 4 bytes:
1.3 MB at 5k, 20 MB at 80k) the peak should not depend on N. The contract row compares the largest N
with the smallest: ours = peak at the largest N, peer = peak at the smallest, ratio = ours / peer.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # the checkout's packages, installed or not

from scripts.bench_contract import add_contract_args, machine, write_rows  # noqa: E402

MB = 2**20
# size -> (passage counts, encoder max_length, words per passage)
SIZES = {"tiny": ([5_000, 40_000], 16, 4), "mid": ([5_000, 20_000, 80_000], 128, 60),
         "large": ([5_000, 80_000, 320_000], 256, 100)}
TARGET = 1.15  # largest / smallest peak RSS


def write_corpus(path: Path, count: int, words: int, seed: int = 0) -> None:
    """``count`` passages of ``words`` words from a 2,000-word vocabulary, as DPR's TSV (ids 1..count)."""
    import numpy as np

    from index.passage_files import Passage, write_passages_tsv

    rng = np.random.default_rng(seed)
    vocabulary = [f"w{number}" for number in range(2000)]
    pool = [" ".join(vocabulary[w] for w in rng.integers(0, len(vocabulary), size=words)) for _ in range(1024)]
    passages = (Passage(id=str(row + 1), title=f"title {row}", text=pool[row % len(pool)]) for row in range(count))
    write_passages_tsv(passages, path)


def write_encoder(out: Path, max_length: int, *, layers: int = 2, hidden: int = 64) -> Path:
    """A tiny random-init DPR context encoder (D = ``hidden``) with a WordPiece vocabulary of the corpus words."""
    from rag_models.tiny_models import TinyDprSize, _save_atomically, tiny_dpr_encoder
    from rag_models.tokenization import dpr_tokenizers, train_wordpiece_vocab

    texts = [" ".join(f"w{number}" for number in range(start, start + 100)) for start in range(0, 2000, 100)]
    _, tokenizer = dpr_tokenizers(train_wordpiece_vocab(texts + ["title"], 500))
    size = TinyDprSize(hidden_size=hidden, num_layers=layers, intermediate_size=2 * hidden,
                       max_positions=max(max_length, 64))
    return _save_atomically(tiny_dpr_encoder("context", len(tokenizer), size, seed=0), tokenizer, out)


def start_build(passages: Path, encoder: Path, out: Path, max_length: int, checkout: Path,
                batch_size: int) -> subprocess.Popen:
    """Start one ``rag-build-index --factory exact`` run of ``checkout``'s code in a child process."""
    command = [sys.executable, "-m", "index.build_cli", "--passages", str(passages), "--encoder", str(encoder),
               "--out", str(out), "--factory", "exact", "--max-length", str(max_length),
               "--batch-size", str(batch_size), "--device", "cpu", "--no-progress"]
    # One thread: memory is the measure, and idle OpenMP workers spin for seconds on a contended machine.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(checkout), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=checkout, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_for(child: subprocess.Popen) -> tuple[float, float]:
    """Wait for ``child``: (peak resident memory in MB as the kernel counted it, CPU seconds); raises if it failed."""
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"rag-build-index failed ({child.returncode}):\n{output.decode(errors='replace')}")
    return usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime  # Linux: ru_maxrss in KiB


def measure(counts: list[int], max_length: int, words: int, scratch: Path, *, checkout: Path = REPO_ROOT,
            layers: int = 2, hidden: int = 64, batch_size: int = 128, parallel: bool = False) -> dict[int, float]:
    """Peak RSS in MB of rag-build-index for each passage count (one corpus per count, one encoder for all).

    ``parallel`` runs the children side by side (less wall time; each peak is still its own process's).
    """
    encoder = write_encoder(scratch / "encoder", max_length, layers=layers, hidden=hidden)
    started, children, results = time.perf_counter(), {}, {}
    for count in counts:
        corpus = scratch / f"psgs_{count}.tsv"
        write_corpus(corpus, count, words)
        children[count] = start_build(corpus, encoder, scratch / f"out_{count}", max_length, checkout, batch_size)
        if not parallel:
            results[count] = wait_for(children[count])
    for count in counts:
        peak, cpu = results[count] if count in results else wait_for(children[count])
        results[count] = peak, cpu
        print(f"{count:>9,} passages: peak RSS {peak:,.0f} MB ({cpu:.1f} CPU s)", flush=True)
    print(f"({time.perf_counter() - started:.1f} s wall)")
    return {count: peak for count, (peak, _) in results.items()}


def main(argv: list[str] | None = None) -> None:
    """Parse the sizes, measure, print and (with --json) write the contract row."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_contract_args(parser)
    parser.add_argument("--n", type=int, nargs="+", help="passage counts (default: those of --size)")
    parser.add_argument("--max-length", type=int, help="encoder token limit (default: that of --size)")
    parser.add_argument("--words", type=int, help="words per passage (default: that of --size)")
    parser.add_argument("--checkout", type=Path, default=REPO_ROOT,
                        help="run rag-build-index from this source tree (e.g. an older commit's) instead of ours")
    args = parser.parse_args(argv)
    counts, max_length, words = SIZES[args.size]
    counts, max_length, words = args.n or counts, args.max_length or max_length, args.words or words
    with tempfile.TemporaryDirectory(prefix="bench_encode_memory_") as scratch:
        peaks = measure(sorted(counts), max_length, words, Path(scratch), checkout=args.checkout.resolve(),
                        batch_size=512 if args.size == "tiny" else 128)
    small, large = min(peaks), max(peaks)
    ratio = peaks[large] / peaks[small]
    print(f"peak RSS at {large:,} / at {small:,} passages: {ratio:.3f} (target <= {TARGET})")
    row = {"measure": f"build-index peak RSS, {large:,} vs {small:,} passages (ratio ours/peer)",
           "size": args.size, "ours": round(peaks[large], 1), "peer": round(peaks[small], 1),
           "peer_name": f"same command, {small:,} passages", "unit": "MB", "ratio": round(ratio, 3),
           "target": f"<= {TARGET}x", "met": ratio <= TARGET}
    write_rows(args, [row], machine())


if __name__ == "__main__":
    main()
