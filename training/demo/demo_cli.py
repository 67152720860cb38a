"""``rag-demo`` (``make demo``): the whole mission offline on a CPU, end to end, in minutes.

    rag-demo                       # runs/demo-<timestamp>/ (results.json, every stage's files)
    rag-demo --out runs/my-demo    # choose the run directory
    rag-demo --quick               # a smoke run under a minute: tiny world, a few steps per stage

It generates the demo world, trains tokenizers and tiny models on it, pre-trains
DPR, builds the index, trains RAG-Sequence, RAG-Token and a closed-book baseline,
evaluates them on held-out test questions, then swaps in the index of the changed
world (same context encoder, no retraining) and evaluates again. Each stage is
the code a user runs: ``rag-train`` configs, ``build_index``, ``rag-eval``.
Prints a table and writes ``results.json`` (atomically) in the run directory.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rag_models.atomic import atomic_write_text
from rag_models.cli_errors import at_least, command
from rag_models.errors import InputError
from training.demo.stages import FULL, QUICK, DemoPlan, run_stages
from training.demo.views import demo_views, render_views

# (key in results.json, label in the table, comparison, threshold): the demo's targets on 2 CPU cores.
TARGETS = (
    ("em_rag_sequence", "RAG-Sequence test EM", ">=", 0.8),
    ("em_rag_token", "RAG-Token test EM", ">=", 0.8),
    ("rag_minus_closed_book", "min RAG EM - closed-book EM", ">=", 0.5),
    ("em_swap_matched", "after swap: EM vs new answers", ">=", 0.8),
    ("em_swap_stale", "after swap: EM vs old answers", "<=", 0.1),
    ("minutes", "total minutes", "<=", 15.0),
)


def collect_results(metrics: dict[str, dict[str, Any]], stage_seconds: dict[str, float], *, seconds: float,
                    plan: DemoPlan, quick: bool, seed: int, resumed: list[str] | None = None,
                    train_seconds: dict[str, float] | None = None) -> dict[str, Any]:
    """The flat results.json record: headline numbers, targets, and per-stage seconds."""
    seq, tok, closed = metrics["rag_sequence"], metrics["rag_token"], metrics["closed_book"]
    before, swap, swap_tok = metrics["before_swap"], metrics["swap"], metrics["swap_rag_token"]
    results: dict[str, Any] = {
        "recall@1": seq.get("recall@1"),
        "recall@5": seq.get("recall@5"),
        "em_rag_sequence": seq["exact_match"],
        "em_rag_token": tok["exact_match"],
        "em_closed_book": closed["exact_match"],
        "f1_rag_sequence": seq["f1"],
        "f1_rag_token": tok["f1"],
        "f1_closed_book": closed["f1"],
        "em_before_swap_matched": before["exact_match"],
        "em_before_swap_stale": before["exact_match_stale"],
        "em_swap_matched": swap["exact_match"],
        "em_swap_stale": swap["exact_match_stale"],
        "em_swap_matched_rag_token": swap_tok["exact_match"],
        "em_swap_stale_rag_token": swap_tok["exact_match_stale"],
        "num_test": seq["num_total"],
        "num_changed": swap["num_total"],
        "n_docs": seq["n_docs"],
        "seconds": round(seconds, 1),
        "minutes": round(seconds / 60, 2),
        "stage_seconds": stage_seconds,
        "train_seconds": train_seconds or {},  # each model's training, run in parallel within stage `train`
        "resumed_stages": resumed or [],  # reused from an earlier, killed run: their time is not in `seconds`
        "quick": quick,
        "views": metrics.get("views"),  # sweeps, figures, report.html files, the comparison (training/demo/views.py)
        "seed": seed,
        "world": {"entities": plan.n_entities, "dev_towns": plan.n_dev, "test_towns": plan.n_test,
                  "change_fraction": plan.change_fraction},
    }
    results["rag_minus_closed_book"] = min(results["em_rag_sequence"], results["em_rag_token"]) - \
        results["em_closed_book"]
    results["targets"] = {key: {"value": results[key], "target": f"{op} {limit}",
                                "met": results[key] >= limit if op == ">=" else results[key] <= limit}
                          for key, _, op, limit in TARGETS}
    return results


def render_table(results: dict[str, Any]) -> str:
    """The printed summary: one row per headline number, with the target where there is one."""
    targets = {key: (label, f"{op} {limit}") for key, label, op, limit in TARGETS}
    rows = [
        ("retrieval recall@5 (test, RAG-Sequence's question encoder)", "recall@5"),
        ("RAG-Sequence test EM", "em_rag_sequence"),
        ("RAG-Token test EM", "em_rag_token"),
        ("closed-book test EM (same generator, no retrieval)", "em_closed_book"),
        ("min RAG EM - closed-book EM", "rag_minus_closed_book"),
        ("changed questions, v1 index: EM vs new answers", "em_before_swap_matched"),
        ("changed questions, v1 index: EM vs old answers", "em_before_swap_stale"),
        ("after swap to v2 index: EM vs new answers", "em_swap_matched"),
        ("after swap to v2 index: EM vs old answers", "em_swap_stale"),
        ("after swap, RAG-Token: EM vs new / old answers", None),
        ("total minutes", "minutes"),
    ]
    lines = [f"{'':<58} {'value':>8}  {'target':<8} met", "-" * 84]
    for label, key in rows:
        if key is None:
            value = f"{results['em_swap_matched_rag_token']:.3f}/{results['em_swap_stale_rag_token']:.3f}"
            lines.append(f"{label:<58} {value:>8}")
            continue
        target, met = targets.get(key, ("", ""))[1], ""
        if key in results["targets"]:
            met = "yes" if results["targets"][key]["met"] else "NO"
        value = results[key]
        shown = "n/a" if value is None else (f"{value:.3f}" if key != "minutes" else f"{value:.1f}")
        lines.append(f"{label:<58} {shown:>8}  {target:<8} {met}")
    lines.append(f"test questions: {results['num_test']}, changed questions: {results['num_changed']}, "
                 f"docs per answer: {results['n_docs']}")
    stages = ", ".join(f"{name} {seconds:.0f}s" for name, seconds in results["stage_seconds"].items())
    lines.append(f"stage seconds: {stages}")
    if results["train_seconds"]:
        each = ", ".join(f"{name} {seconds:.0f}s" for name, seconds in results["train_seconds"].items())
        lines.append(f"training in parallel: {each}")
    if results.get("views"):
        lines += render_views(results["views"])
    if results["resumed_stages"]:
        lines.append(f"resumed run: {', '.join(results['resumed_stages'])} reused from an earlier run "
                     "(their time is not counted)")
    return "\n".join(lines)


def _check_run_dir(out: Path, plan: DemoPlan, seed: int) -> None:
    """Refuse a finished run directory, or one of a run with other settings; record this run's settings."""
    if (out / "results.json").exists():
        raise InputError("already holds a finished demo (results.json)", path=out,
                         fix="Pass another --out, or remove the directory")
    settings = json.loads(json.dumps({"plan": asdict(plan), "seed": seed}))
    recorded = out / "demo_settings.json"
    if recorded.is_file() and json.loads(recorded.read_text(encoding="utf-8")) != settings:
        raise InputError("holds an unfinished demo run with other settings (--quick or --seed differ)", path=out,
                         fix="Re-run with the same flags to resume it, or pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(recorded, json.dumps(settings, indent=2) + "\n")


def run_demo(out: str | Path | None = None, *, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Run every stage into ``out`` (default runs/demo-<timestamp>); returns the results (also results.json).

    An unfinished run directory (a killed demo) is resumed: finished stages are reused.
    """
    out = Path(out) if out is not None else Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    plan = QUICK if quick else FULL
    _check_run_dir(out, plan, seed)
    started = time.perf_counter()
    metrics, clock = run_stages(out, plan, seed)
    metrics["views"] = clock.run("views", "n_docs sweeps, figures, RAG-Sequence vs RAG-Token (rag-compare)",
                                 lambda: demo_views(out, plan, metrics))
    results = collect_results(metrics, clock.seconds, seconds=time.perf_counter() - started, plan=plan,
                              quick=quick, seed=seed, resumed=clock.resumed, train_seconds=clock.each)
    results["run_dir"] = str(out)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "results.md", "```\n" + render_table(results) + "\n```\n")
    return results


@command("rag-demo")
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``rag-demo``: run, print the table, say where everything is; bad input: exit status 2."""
    parser = argparse.ArgumentParser(prog="rag-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="run directory (default: runs/demo-<timestamp>)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny world, a few steps (under a minute)")
    parser.add_argument("--seed", type=at_least(0), default=0, help="seed of the world and the models (default: 0)")
    options = parser.parse_args(argv)
    if options.out is not None and Path(options.out).exists() and not Path(options.out).is_dir():
        raise InputError("exists and is not a directory", path=options.out,
                         fix="Pass --out a new or existing directory")
    results = run_demo(options.out, quick=options.quick, seed=options.seed)
    print("\n" + render_table(results))
    if results["quick"]:
        print("(--quick: a smoke run of every stage; its numbers are not the demo's targets)")
    print(f"results: {Path(results['run_dir']) / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
