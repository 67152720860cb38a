"""What every ``scripts/bench_*.py`` shares: ``--size`` / ``--json``, the machine line, and the JSON it writes.

Each benchmark writes ``{"script", "command", "machine", "rows": [...]}``; a row holds
``measure, size, ours, peer, peer_name, unit, ratio, target, met`` (ratio: peer/ours for times,
ours/peer for rates, as each measure states). ``scripts/bench_all.py`` runs them all and reads these files.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
from pathlib import Path

SIZES = ("tiny", "mid", "large")
ROW_KEYS = ("measure", "size", "ours", "peer", "peer_name", "unit", "ratio", "target", "met")


def add_contract_args(parser: argparse.ArgumentParser, *, device: bool = False) -> None:
    """Add ``--size {tiny,mid,large}`` (large: the paper's sizes, for a GPU), ``--json PATH`` and maybe ``--device``."""
    parser.add_argument("--size", choices=SIZES, default="tiny", help="tiny / mid (CPU, minutes) or large (GPU)")
    parser.add_argument("--json", metavar="PATH", help="write the result rows here (the bench_all contract)")
    if device:
        parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")


def _cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """One line: CPU model, cores this process may use, load average (contention), and the GPU if torch sees one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = f"{_cpu_name()}, {cores} CPU cores"
    if hasattr(os, "getloadavg"):
        load = os.getloadavg()[0]
        text += f", load {load:.1f}" + (" (contended)" if load > 0.5 * cores else "")
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name()}"
    return text


def command_line() -> str:
    """The command that ran this script, as a shell would take it back."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(Path.cwd())
    except ValueError:
        pass
    return shlex.join(["python", str(script), *sys.argv[1:]])


def write_rows(args: argparse.Namespace, rows: list[dict], machine_line: str) -> None:
    """Write the contract JSON to ``args.json`` (when given): script, command, machine and the rows."""
    if not args.json:
        return
    for row in rows:
        missing = [key for key in ROW_KEYS if key not in row]
        if missing:
            raise ValueError(f"benchmark row {row.get('measure')!r} lacks {missing}")
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(Path(__file__).resolve().parents[1])
    except ValueError:
        pass
    payload = {"script": str(script), "command": command_line(), "machine": machine_line, "rows": rows}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
