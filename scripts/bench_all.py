"""`make bench`: run every ``scripts/bench_*.py`` at one size and print one table of ratios with their commands.

    python scripts/bench_all.py                     # --size tiny: a few minutes on a CPU
    python scripts/bench_all.py --size mid          # larger shapes, still CPU
    python scripts/bench_all.py --size large        # the paper's shapes: for a GPU machine
    python scripts/bench_all.py --only index startup --markdown
    python scripts/bench_all.py --table-from runs/bench/<time>-tiny/summary.json --markdown

Each benchmark is run as ``python scripts/bench_NAME.py --size SIZE --json runs/bench/<time>/NAME.json``
(the contract in scripts/bench_contract.py) in its own process, one after the other, and its output is
kept beside the JSON (NAME.log). A script that fails, times out or writes no JSON gets a "no JSON" line
saying why; the others still run. All rows go to ``runs/bench/<time>/summary.json``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # the checkout's packages, installed or not

from scripts.bench_contract import SIZES, machine  # noqa: E402

NOT_BENCHMARKS = {"bench_all.py", "bench_contract.py"}


def discover(only: list[str] | None) -> list[Path]:
    """The benchmark scripts, by name; ``only``: just those whose NAME (bench_NAME.py) is listed."""
    scripts = sorted(path for path in (REPO_ROOT / "scripts").glob("bench_*.py") if path.name not in NOT_BENCHMARKS)
    if only:
        scripts = [path for path in scripts if path.stem.removeprefix("bench_") in only]
    return scripts


def run_one(script: Path, size: str, out_dir: Path, timeout: float) -> dict:
    """Run one benchmark; its contract JSON, or {"script", "command", "error"} saying why there is none."""
    name = script.stem.removeprefix("bench_")
    json_path, log_path = out_dir / f"{name}.json", out_dir / f"{name}.log"
    command = [sys.executable, str(script.relative_to(REPO_ROOT)), "--size", size, "--json",
               str(json_path.relative_to(REPO_ROOT) if json_path.is_relative_to(REPO_ROOT) else json_path)]
    shown = " ".join(["python", *command[1:]])
    started = time.perf_counter()
    print(f"== {shown}", flush=True)
    try:
        with open(log_path, "w", encoding="utf-8") as log:
            done = subprocess.run(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
        error = None if done.returncode == 0 else f"exit {done.returncode}"
    except subprocess.TimeoutExpired:
        error = f"timed out after {timeout:.0f} s"
    seconds = time.perf_counter() - started
    if error is None and not json_path.is_file():
        error = "exit 0 but no JSON (does it take --size / --json yet?)"
    if error is not None:
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] or [""]
        print(f"   no JSON: {error}: {tail[0][:150]}", flush=True)
        return {"script": f"scripts/{script.name}", "command": shown, "error": error, "seconds": seconds,
                "log": str(log_path), "rows": []}
    result = json.loads(json_path.read_text(encoding="utf-8"))
    result["seconds"] = seconds
    print(f"   {len(result.get('rows', []))} rows in {seconds:.0f} s", flush=True)
    return result


def _number(value: object) -> str:
    """A figure for the table: 4 significant digits, or the text as is."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def table(results: list[dict], markdown: bool) -> str:
    """One line per row of every result (ours, peer, ratio, target, met), then each script's command."""
    head = ["measure", "ours", "peer", "unit", "peer is", "ratio", "target", "met"]
    lines, alone = [], 0
    for result in results:
        if result.get("error"):
            lines.append([f"{result['script']}: no JSON ({result['error']})", "", "", "", "", "", "", ""])
        for row in result.get("rows", []):
            if row.get("peer") is None and row.get("target") is None:  # a measurement without a comparison
                alone += 1
                continue
            met = {True: "yes", False: "NO", None: ""}.get(row.get("met"), str(row.get("met")))
            lines.append([row["measure"], _number(row["ours"]), _number(row["peer"]), _number(row.get("unit")),
                          _number(row.get("peer_name")), _number(row.get("ratio")), _number(row.get("target")), met])
    commands = [f"{result['script']}: `{result['command']}`" for result in results]
    if alone:
        commands.append(f"({alone} measurements without a peer, e.g. bench_scale.py's stages: in summary.json)")
    if markdown:
        text = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        text += ["| " + " | ".join(cell.replace("|", "/") for cell in line) + " |" for line in lines]
        return "\n".join(text + ["", "Commands:", ""] + [f"- {command}" for command in commands])
    widths = [max(len(str(line[i])) for line in [head, *lines]) for i in range(len(head))]
    widths[0] = min(widths[0], 70)
    text = ["  ".join(str(cell)[:widths[i]].ljust(widths[i]) for i, cell in enumerate(line))
            for line in [head, *lines]]
    return "\n".join(text + ["", "commands:"] + [f"  {command}" for command in commands])


def main(argv: list[str] | None = None) -> None:
    """Run the benchmarks, print the table, write runs/bench/<time>/summary.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="tiny", help="passed to every benchmark")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="only these (bench_NAME.py), e.g. index startup")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "bench", help="parent of the run directory")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one benchmark may run")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown (for the README)")
    parser.add_argument("--table-from", type=Path, metavar="SUMMARY", help="print the table of an earlier "
                        "run's summary.json (e.g. as Markdown for the README) instead of running anything")
    args = parser.parse_args(argv)
    if args.table_from is not None:
        summary = json.loads(args.table_from.read_text(encoding="utf-8"))
        print(f"{summary['size']} size on {summary['machine']}; {summary['seconds']:.0f} s in all\n")
        print(table(summary["results"], args.markdown))
        return
    out_dir = args.out.resolve() / f"{time.strftime('%Y%m%d-%H%M%S')}-{args.size}"
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = [run_one(script, args.size, out_dir, args.timeout) for script in discover(args.only)]
    machine_line = next((r["machine"] for r in results if r.get("machine")), machine())
    print(f"\n{args.size} size on {machine_line}; {time.perf_counter() - started:.0f} s in all\n")
    print(table(results, args.markdown))
    summary = {"size": args.size, "machine": machine_line, "seconds": time.perf_counter() - started,
               "results": results}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {out_dir / 'summary.json'}")


if __name__ == "__main__":
    main()
