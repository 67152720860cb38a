"""Benchmark `rag-eval` start-up: seconds until the first question is decoded, against importing torch + transformers.

    python scripts/bench_startup.py --size mid --json runs/bench/startup.json
    python scripts/bench_startup.py --demo runs/demo-<time> --nq ../shared/data/nq_open/NQ-open.dev.jsonl

ours: wall seconds from starting ``python -m training.evaluation.eval_cli ... batch_size=1`` until its
progress bar shows the first question answered (the process is then stopped); everything before that is
start-up: imports, configs, reading the questions, loading the model and the index. peer: wall seconds of
``python -c "import torch, transformers"``. Both run in turns (ours, peer, ours, ...), best of --runs, so
load from other processes hits both alike. ratio = peer / ours; the target is ours <= 1.5x peer.

Model and index: a rag-demo run directory (--demo; default the newest runs/demo-*, else a
``rag-demo --quick`` made under runs/bench/). Questions: the first 89 of its test questions, and at
--size mid / large also NQ-Open dev's 3,610 (--nq; the tiny model answers them wrongly: only start-up counts).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # the checkout's packages, installed or not

from scripts.bench_contract import add_contract_args, machine, write_rows  # noqa: E402

NQ_DEV = REPO_ROOT.parent / "shared" / "data" / "nq_open" / "NQ-open.dev.jsonl"
FIRST_ANSWER = re.compile(rb"eval:\s+\d+%\|[^|]*\|\s*[1-9]\d*/")  # tqdm's bar after the first question
TARGET = 1.5  # ours / peer at most
PEER = "import torch, transformers"


def find_demo(demo: Path | None) -> Path:
    """The rag-demo run to evaluate: ``demo``, else the newest runs/demo-*, else a new quick demo."""
    if demo is not None:
        return demo
    runs = sorted((REPO_ROOT / "runs").glob("demo-*/rag_sequence/model"))
    if runs:
        return runs[-1].parents[1]
    out = REPO_ROOT / "runs" / "bench" / "demo-quick"
    if not (out / "rag_sequence" / "model").is_dir():
        print(f"no rag-demo run found: making a quick one in {out}", flush=True)
        subprocess.run([sys.executable, "-m", "training.demo.demo_cli", "--quick", "--out", str(out)], cwd=REPO_ROOT,
                       check=True, stdout=subprocess.DEVNULL)
    return out


def _env() -> dict[str, str]:
    """This checkout's code first; offline."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def time_to_first_answer(demo: Path, questions: Path, out_dir: Path) -> float:
    """Wall seconds from launching rag-eval until its progress bar counts one answered question."""
    command = [sys.executable, "-m", "training.evaluation.eval_cli", f"checkpoint={demo / 'rag_sequence' / 'model'}",
               f"questions={questions}", f"index.path={demo / 'index'}", f"out_dir={out_dir}", "batch_size=1",
               "progress=true"]
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=REPO_ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = b""
    try:
        while True:
            chunk = os.read(child.stderr.fileno(), 65536)
            if not chunk:
                tail = seen[-2000:].decode(errors="replace")
                raise RuntimeError(f"rag-eval ended before answering a question:\n{tail}")
            seen += chunk
            if FIRST_ANSWER.search(seen):
                return time.perf_counter() - started
    finally:
        child.kill()
        child.wait()
        child.stderr.close()


def time_peer() -> float:
    """Wall seconds of a fresh interpreter importing torch and transformers."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", PEER], cwd=REPO_ROOT, env=_env(), check=True)
    return time.perf_counter() - started


def questions_files(demo: Path, nq: Path | None, size: str, scratch: Path) -> dict[str, Path]:
    """label -> question file: 89 demo test questions, and NQ-Open dev (mid / large) when it is there."""
    first = (demo / "world" / "v1" / "test.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[:89]
    files = {f"{len(first)} demo questions": scratch / "demo_questions.jsonl"}
    files[f"{len(first)} demo questions"].write_text("".join(first), encoding="utf-8")
    nq = nq or NQ_DEV
    if size != "tiny" and nq.is_file():
        count = sum(1 for line in nq.open(encoding="utf-8") if line.strip())
        files[f"{count:,} NQ-Open questions"] = nq
    return files


def main(argv: list[str] | None = None) -> None:
    """Measure every question file, ours and the peer in turns; print and write the contract rows."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_contract_args(parser)
    parser.add_argument("--demo", type=Path, help="a rag-demo run directory (rag_sequence/model, index, world)")
    parser.add_argument("--nq", type=Path, help=f"NQ-Open dev JSONL (default: {NQ_DEV.name} beside the checkout)")
    parser.add_argument("--runs", type=int, default=3, help="turns of ours and the peer; the best of each counts")
    args = parser.parse_args(argv)
    demo = find_demo(args.demo)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as scratch:
        for label, questions in questions_files(demo, args.nq, args.size, Path(scratch)).items():
            ours, peer = [], []
            for turn in range(args.runs):
                ours.append(time_to_first_answer(demo, questions, Path(scratch) / f"eval{turn}"))
                peer.append(time_peer())
                print(f"{label}: first answer {ours[-1]:.2f} s, `{PEER}` {peer[-1]:.2f} s", flush=True)
            ratio = min(peer) / min(ours)
            print(f"{label}: best {min(ours):.2f} s vs {min(peer):.2f} s: ours = {1 / ratio:.2f}x the imports")
            rows.append({"measure": f"rag-eval start-up to 1st answer, {label} (ratio peer/ours)", "size": args.size,
                         "ours": round(min(ours), 3), "peer": round(min(peer), 3), "peer_name": PEER, "unit": "s",
                         "ratio": round(ratio, 3), "target": f">= {1 / TARGET:.2f} (ours <= {TARGET}x)",
                         "met": ratio >= 1 / TARGET})
    write_rows(args, rows, machine())


if __name__ == "__main__":
    main()
