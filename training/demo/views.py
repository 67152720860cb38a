"""The demo's pictures and comparison: n_docs sweeps of both RAG models, their figures, rag-compare.

After the evaluations (training/demo/stages.py) the demo sweeps RAG-Sequence and RAG-Token
over n_docs on the test questions (``rag-eval ... n_docs=[...]``, one retrieval each), draws
EM/F1 against n_docs for both decoders and the before/after figure of the index swap into
``eval/figures/``, and compares the two models question by question (``rag-compare``) into
``eval/compare/``. Every ``eval/<name>/`` already holds its recall@k, risk-coverage figures
and report.html.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from rag_models.atomic import atomic_write_text
from training.config import compose
from training.demo.stages import DemoPlan, finished_training, override
from training.demo.world import world_files
from training.evaluation import figures
from training.evaluation.compare_cli import compare, write_comparison
from training.evaluation.eval_cli import evaluate

DECODERS = {"rag_sequence": ("RAG-Sequence", "fast"), "rag_token": ("RAG-Token", "greedy")}


def sweep_stage(out: Path, name: str, checkpoint: Path, questions: Path, index: Path, decoding: str,
                values: tuple[int, ...], eval_overrides: tuple[str, ...]) -> dict[str, Any]:
    """``rag-eval ... n_docs=[values]`` of one checkpoint into ``out/eval/sweep_NAME``; returns its summary."""
    overrides = [override("checkpoint", checkpoint), override("questions", questions), override("index.path", index),
                 override("out_dir", out / "eval" / f"sweep_{name}"), f"decoding={decoding}", "batch_size=64",
                 f"n_docs=[{','.join(str(v) for v in values)}]", *eval_overrides]
    summary = evaluate(compose(overrides, config_name="eval"))
    shown = ", ".join(f"{run['n_docs']}: {run['exact_match']:.3f}" for run in summary["runs"])
    print(f"sweep {name}: EM by n_docs {shown}", flush=True)
    return summary


def demo_views(out: Path, plan: DemoPlan, metrics: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Sweeps, figures and the comparison of the demo in ``out`` (its stages done, ``metrics`` their evaluations).

    Returns what results.json records of them (paths relative to ``out``).
    """
    values, questions = plan.sweep_n_docs, world_files(out / "world").test
    sweeps = {}
    for name, (_, decoding) in DECODERS.items():
        checkpoint = finished_training(out / name).export_dir
        sweeps[name] = sweep_stage(out, name, checkpoint, questions, out / "index", decoding, values,
                                   plan.eval_overrides)
    figure_dir = out / "eval" / "figures"
    series = {f"{DECODERS[name][0]} ({summary['strategy']})": summary["runs"] for name, summary in sweeps.items()}
    before, swap, swap_token = metrics["before_swap"], metrics["swap"], metrics["swap_rag_token"]
    bars = {"v1 index\nRAG-Sequence": (before["exact_match"], before["exact_match_stale"]),
            "v2 index\nRAG-Sequence": (swap["exact_match"], swap["exact_match_stale"]),
            "v2 index\nRAG-Token": (swap_token["exact_match"], swap_token["exact_match_stale"])}
    drawn = [figures.em_vs_n_docs(series, figure_dir), figures.index_swap(bars, figure_dir)]
    atomic_write_text(figure_dir / "figures.md", "# Demo figures\n\n" + "\n\n".join(d.markdown() for d in drawn) + "\n")
    result = compare([out / "eval" / "rag_sequence", out / "eval" / "rag_token"])
    write_comparison(out / "eval" / "compare", result)
    pair = result["pairs"][0]
    figure_files = [str(path.relative_to(out)) for d in drawn for path in d.files]
    figure_files += [str(p.relative_to(out)) for name in ("rag_sequence", "rag_token")
                     for p in sorted((out / "eval" / name).glob("*.png"))]
    return {
        "sweep_n_docs": list(values),
        "sweep_em": {name: {str(run["n_docs"]): run["exact_match"] for run in summary["runs"]}
                     for name, summary in sweeps.items()},
        "figures": figure_files,
        "reports_html": [f"eval/{name}/report.html" for name in ("rag_sequence", "rag_token")],
        "compare": {"file": "eval/compare/compare.md", "seq_right_token_wrong": pair["a_right_b_wrong"],
                    "seq_wrong_token_right": pair["a_wrong_b_right"], "mcnemar_p": pair["mcnemar_p"],
                    "em_95": {name: [m["em_95_low"], m["em_95_high"]] for name, m in result["metrics"].items()}},
    }


def render_views(views: dict[str, Any]) -> list[str]:
    """The lines rag-demo prints about the sweeps, the figures and the comparison."""
    lines = []
    for name, by_n in views["sweep_em"].items():
        lines.append(f"{DECODERS[name][0]} test EM by n_docs: " + ", ".join(f"{n}: {em:.3f}" for n, em in by_n.items()))
    c = views["compare"]
    intervals = ", ".join(f"{name} [{low:.3f}, {high:.3f}]" for name, (low, high) in c["em_95"].items())
    lines.append(f"RAG-Sequence vs RAG-Token: {c['seq_right_token_wrong']} questions only RAG-Sequence answers, "
                 f"{c['seq_wrong_token_right']} only RAG-Token; exact McNemar p = {c['mcnemar_p']:.3g}; "
                 f"EM 95% intervals {intervals} ({c['file']})")
    lines.append("figures: " + ", ".join(views["figures"]))
    lines.append("error analysis: " + ", ".join(views["reports_html"]))
    return lines
