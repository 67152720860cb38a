"""What an evaluation shows beside its numbers: the figures and report.html, listed for report.md.

Called by `report.write_outputs` on rank 0 (``figures=true``, the default): answer recall@k
against k and the risk-coverage curve of selective answering, as PNG and SVG, and
report.html (training/evaluation/report_html.py). A figure without data is not drawn and
the report says why.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from training.evaluation import figures
from training.evaluation.report_html import write_report_html
from training.evaluation.selective import risk_coverage


def write_views(out_dir: Path, records: list[dict[str, Any]], metrics: dict[str, Any]) -> list[str]:
    """Draw the figures and write report.html into ``out_dir``; returns report.md's lines about them."""
    depth = int(metrics.get("retrieval_depth") or 0)
    ranks = [r["answer_rank"] for r in records] if records and "answer_rank" in records[0] else None
    on = metrics.get("abstain_on") or "score"
    coverage, em, area = risk_coverage(records, on)
    drawn = [figures.recall_at_k(ranks, depth, out_dir),
             figures.risk_coverage(coverage, em, area, on, out_dir, threshold_coverage=metrics.get("coverage"))]
    html = write_report_html(out_dir / "report.html", records, metrics)
    lines = ["## Figures", ""]
    for figure in drawn:
        lines += [figure.markdown(), ""]
    lines.append(f"Every question, its passages and the answers found in them: [{html.name}]({html.name}) "
                 "(filters: wrong, right, answer not retrieved, retrieved but not read; sort by score).")
    return lines
