"""``rag-compare DIR1 DIR2 [...]``: rag-eval runs on the same questions, side by side, question by question.

    rag-compare runs/eval/rag_sequence runs/eval/rag_token            # -> runs/eval/compare/compare.md, .json
    rag-compare A B C --out reports/abc --show 50
    python -m training.evaluation.compare_cli A B

Prints and writes: each run's metrics in one table, with a bootstrap 95% interval of its EM
(questions resampled, seeded); for each pair of runs, the questions one answers right and the
other wrong (both answers) and the exact McNemar p-value of the EM difference
(training/evaluation/paired_stats.py). Runs over different question files are refused: a file is the
same when its content is (size and SHA-256), whatever its name.
"""
from __future__ import annotations

import argparse
import json
import sys
from itertools import combinations
from pathlib import Path
from typing import Any

from rag_models.atomic import atomic_write_text
from rag_models.cli_errors import at_least
from rag_models.errors import InputError
from rag_models.file_manifest import content_fingerprint
from training.evaluation.paired_stats import bootstrap_interval, mcnemar_exact

ROWS = ("exact_match", "f1", "recall@1", "recall@5", "recall@20", "recall@100", "exact_match_stale",
        "em_coverage_area", "coverage", "exact_match_answered", "num_total", "n_docs", "strategy", "seconds")


def read_run(directory: Path) -> dict[str, Any]:
    """A finished rag-eval directory: its metrics and prediction records; InputError when it is not one."""
    metrics_path, predictions = directory / "metrics.json", directory / "predictions.jsonl"
    if not metrics_path.is_file() or not predictions.is_file():
        raise InputError("is not a finished rag-eval run (no metrics.json or predictions.jsonl)", path=directory,
                         fix="Pass rag-eval out_dir directories (for a sweep: its n_docs=K directories)")
    records = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {"dir": str(directory), "metrics": json.loads(metrics_path.read_text(encoding="utf-8")),
            "records": records}


def _fingerprint(questions: object) -> tuple[int, str] | None:
    """(size, SHA-256) of the question file a run names, or None when it is not a file here (a hub name, moved)."""
    path = Path(str(questions))
    if questions is None or not path.is_file():
        return None
    found = content_fingerprint(path)
    return found["size"], found["sha256"]


def check_same_questions(runs: list[dict[str, Any]]) -> list[str]:
    """Refuse runs over different question files, or over different questions of one file (limit, or the file
    edited in between); returns notes on equal content (size and SHA-256) stored under another name."""
    first, notes = runs[0], []
    asked = first["metrics"].get("questions")
    for run in runs[1:]:
        other = run["metrics"].get("questions")
        if other != asked:
            same = _fingerprint(asked)
            if same is None or same != _fingerprint(other):
                raise InputError(f"{run['dir']} answered {other}, but {first['dir']} answered {asked}"
                                 f"{'' if same is None else ' (another content)'}", setting="DIR",
                                 fix="Compare runs over the same question file")
            notes.append(f"{other} ({run['dir']}) has the content of {asked} (same size and SHA-256)")
        mine, theirs = [r["question"] for r in run["records"]], [r["question"] for r in first["records"]]
        if mine == theirs:
            continue
        shorter = min(len(mine), len(theirs))
        if mine[:shorter] == theirs[:shorter]:
            raise InputError(f"{run['dir']} and {first['dir']} answered different questions of {asked} "
                             f"({len(run['records'])} vs {len(first['records'])})",
                             setting="DIR", fix="Compare runs with the same limit")
        raise InputError(f"the question files differ: {run['dir']} and {first['dir']} answered other questions "
                         f"under {asked if other == asked else f'{other} and {asked}'} (a file edited between "
                         "the runs?)", setting="DIR", fix="Rerun both on one version of the question file")
    return notes


def _names(runs: list[dict[str, Any]]) -> list[str]:
    """Short names: the directory names, or the full paths when two share a name."""
    names = [Path(run["dir"]).name for run in runs]
    return names if len(set(names)) == len(names) else [run["dir"] for run in runs]


def compare(directories: list[Path], *, seed: int = 0) -> dict[str, Any]:
    """The comparison record of ``directories`` (at least two): metrics, EM intervals, pairwise differences."""
    if len(directories) < 2:
        raise InputError("needs at least two runs", setting="DIR", fix="Pass two or more rag-eval directories")
    seen: dict[Path, Path] = {}
    for directory in map(Path, directories):
        if directory.resolve() in seen:
            raise InputError(f"{directory} is given twice (also as {seen[directory.resolve()]})", setting="DIR",
                             fix="Pass each rag-eval directory once")
        seen[directory.resolve()] = directory
    runs = [read_run(Path(d)) for d in directories]
    notes = check_same_questions(runs)
    names = _names(runs)
    table = {}
    for name, run in zip(names, runs):
        correct = [bool(r["correct"]) for r in run["records"]]
        low, high = bootstrap_interval(correct, seed=seed)
        table[name] = {key: run["metrics"].get(key) for key in ROWS} | {"em_95_low": low, "em_95_high": high}
    pairs = []
    for (i, a), (j, b) in combinations(enumerate(runs), 2):
        only_a, only_b = [], []
        for ra, rb in zip(a["records"], b["records"]):
            if bool(ra["correct"]) != bool(rb["correct"]):
                row = {"question": ra["question"], "answers": ra["answers"], names[i]: ra["prediction"],
                       names[j]: rb["prediction"]}
                (only_a if ra["correct"] else only_b).append(row)
        pairs.append({"a": names[i], "b": names[j], "a_right_b_wrong": len(only_a), "a_wrong_b_right": len(only_b),
                      "em_difference": table[names[i]]["exact_match"] - table[names[j]]["exact_match"],
                      "mcnemar_p": mcnemar_exact(len(only_a), len(only_b)),
                      "only_a_right": only_a, "only_b_right": only_b})
    return {"runs": dict(zip(names, [run["dir"] for run in runs])), "questions": runs[0]["metrics"].get("questions"),
            "num_questions": len(runs[0]["records"]), "bootstrap": {"samples": 2000, "seed": seed, "level": 0.95},
            "metrics": table, "pairs": pairs, "notes": notes}


def _cell(value: Any) -> str:
    return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def render_markdown(result: dict[str, Any], show: int = 20) -> str:
    """compare.md: the metrics table, then per pair the test and up to ``show`` questions each way."""
    names = list(result["metrics"])
    lines = ["# Comparison", "", f"{result['num_questions']} questions of `{result['questions']}`", "",
             *(f"- note: {note}" for note in result.get("notes", ())), *([""] if result.get("notes") else []),
             "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in ROWS:
        if any(result["metrics"][n][key] is not None for n in names):
            lines.append(f"| {key} | " + " | ".join(_cell(result["metrics"][n][key]) for n in names) + " |")
    lines.append("| EM 95% interval (bootstrap) | " + " | ".join(
        f"[{result['metrics'][n]['em_95_low']:.4f}, {result['metrics'][n]['em_95_high']:.4f}]" for n in names) + " |")
    for pair in result["pairs"]:
        a, b = pair["a"], pair["b"]
        lines += ["", f"## {a} vs {b}", "",
                  f"EM difference {pair['em_difference']:+.4f}; {a} right and {b} wrong: {pair['a_right_b_wrong']}, "
                  f"the reverse: {pair['a_wrong_b_right']}; exact McNemar p = {pair['mcnemar_p']:.4g}"]
        for key, label in (("only_a_right", f"{a} right, {b} wrong"), ("only_b_right", f"{b} right, {a} wrong")):
            rows = pair[key]
            if rows:
                lines += ["", f"### {label} ({len(rows)}{f', first {show}' if len(rows) > show else ''})", "",
                          f"| question | references | {a} | {b} |", "|---|---|---|---|"]
                lines += [f"| {_md(r['question'])} | {_md(' / '.join(r['answers']))} | {_md(r[a])} | {_md(r[b])} |"
                          for r in rows[:show]]
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def write_comparison(out: Path, result: dict[str, Any], show: int = 20) -> str:
    """Write ``out``/compare.md and compare.json (atomically); returns the markdown."""
    text = render_markdown(result, show)
    atomic_write_text(out / "compare.md", text)
    atomic_write_text(out / "compare.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``rag-compare``; exit status 2 on bad input."""
    parser = argparse.ArgumentParser(prog="rag-compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="rag-eval output directories (same question file)")
    parser.add_argument("--out", type=Path, default=None, help="where compare.md/json go (default: DIR1/../compare)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling (default: 0)")
    parser.add_argument("--show", type=at_least(0), default=20,
                        help="questions listed each way in compare.md (all in .json)")
    args = parser.parse_args(argv)
    out = args.out or args.dirs[0].resolve().parent / "compare"
    try:
        if out.exists() and not out.is_dir():
            raise InputError("--out is an existing file, not a directory", path=out,
                             fix="Pass a directory (new or existing) for compare.md and compare.json")
        result = compare(args.dirs, seed=args.seed)
    except InputError as err:
        print(f"rag-compare: error: {err}", file=sys.stderr)
        return 2
    text = write_comparison(out, result, args.show)
    print(text)
    print(f"wrote {out / 'compare.md'}, {out / 'compare.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
