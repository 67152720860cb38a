"""The figures of an evaluation, drawn with matplotlib's Agg backend as PNG and SVG (no display, no pyplot).

- `em_vs_n_docs`: EM and F1 against the docs read, one line per decoder (an n_docs sweep; Lewis et al. Fig. 3).
- `recall_at_k`: answer recall@k against k = 1..depth (the fraction of questions with an answer in the top k).
- `risk_coverage`: EM of the answered questions against the fraction answered, most confident first.
- `index_swap`: EM against the new and the old answers, before and after swapping the index (the demo).

Each returns a `Drawn`: the files written, or none and the reason, so that a report says why a
figure is missing instead of showing empty axes. matplotlib is imported when a figure is drawn.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rag_models.atomic import atomic_file
from training.evaluation.metrics import recall_hit_curve

FORMATS = ("png", "svg")


@dataclass(frozen=True)
class Drawn:
    """One figure: its title and files (PNG first), or no files and ``note`` saying why it was not drawn."""

    name: str
    title: str
    files: tuple[Path, ...] = ()
    note: str = ""

    def markdown(self) -> str:
        """The report line: the PNG embedded (relative to the report) with an SVG link, or why it is missing."""
        if not self.files:
            return f"- {self.title}: not drawn ({self.note})"
        png, svg = self.files[0].name, self.files[1].name
        caption = f" {self.note}" if self.note else ""
        return f"![{self.title}]({png})\n\n*{self.title}.*{caption} ([SVG]({svg}))"


def _new_figure(width: float = 5.0, height: float = 3.4) -> Any:
    """A matplotlib Figure on an Agg canvas (no pyplot, so no global backend is switched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, out_dir: Path, name: str, title: str, note: str = "") -> Drawn:
    """Write ``name``.png and ``name``.svg atomically, byte-reproducible (no dates, fixed SVG ids)."""
    import matplotlib

    files = []
    with matplotlib.rc_context({"svg.hashsalt": "rag-e2e", "svg.fonttype": "path"}):
        for fmt in FORMATS:
            path = Path(out_dir) / f"{name}.{fmt}"
            metadata = {"Date": None} if fmt == "svg" else {"Software": None}
            with atomic_file(path) as out:
                figure.savefig(out, format=fmt, metadata=metadata)
            files.append(path)
    return Drawn(name, title, tuple(files), note)


def em_vs_n_docs(series: Mapping[str, Sequence[Mapping[str, Any]]], out_dir: Path,
                 name: str = "em_vs_n_docs") -> Drawn:
    """EM (solid) and F1 (dashed) against n_docs, one colour per decoder.

    ``series``: decoder label -> metrics dicts with ``n_docs``, ``exact_match`` and ``f1`` (a sweep's values).
    Not drawn when no decoder has two or more n_docs values.
    """
    title = "EM and F1 against the docs read"
    usable = {label: sorted(points, key=lambda m: m["n_docs"]) for label, points in series.items() if len(points) > 1}
    if not usable:
        return Drawn(name, title, note="needs an n_docs sweep of at least two values, e.g. n_docs=[1,5,10]")
    figure = _new_figure()
    axes = figure.subplots()
    for index, (label, points) in enumerate(usable.items()):
        colour = f"C{index}"
        xs = [m["n_docs"] for m in points]
        axes.plot(xs, [m["exact_match"] for m in points], "o-", color=colour, label=f"{label} EM")
        if all(m.get("f1") is not None for m in points):
            axes.plot(xs, [m["f1"] for m in points], "s--", color=colour, alpha=0.7, label=f"{label} F1")
    axes.set_xscale("log")
    all_x = sorted({m["n_docs"] for points in usable.values() for m in points})
    axes.set_xticks(all_x, [str(x) for x in all_x])
    axes.set(xlabel="documents read (n_docs)", ylabel="score", title=title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return _save(figure, out_dir, name, title)


def recall_curve(ranks: Sequence[int | None], depth: int) -> list[float]:
    """recall@k for k = 1..depth: the fraction of questions whose first answer-holding passage ranks below k."""
    return [hits / len(ranks) for hits in recall_hit_curve(ranks, depth)] if ranks else []


def recall_at_k(ranks: Sequence[int | None] | None, depth: int, out_dir: Path, name: str = "recall_at_k") -> Drawn:
    """Answer recall@k against k (log scale), k = 1..depth; not drawn without retrieval."""
    title = "Answer recall@k against k"
    if not ranks or depth < 1:
        return Drawn(name, title, note="no passages retrieved (closed-book run)")
    curve = recall_curve(ranks, depth)
    return _save(recall_figure(curve, title), out_dir, name, title,
                 note=f"{len(ranks)} questions, k up to {depth}.")


def recall_figure(curve: Sequence[float], title: str = "Answer recall@k against k") -> Any:
    """The recall@k-vs-k Figure of ``curve`` (recall at k = 1, 2, ...): rag-eval's file and training's TensorBoard."""
    figure = _new_figure()
    axes = figure.subplots()
    ks = list(range(1, len(curve) + 1))
    axes.plot(ks, curve, "-", color="C0")
    for k in (1, 5, 20, 100):
        if k <= len(curve):
            axes.plot([k], [curve[k - 1]], "o", color="C0")
            axes.annotate(f"{curve[k - 1]:.2f}", (k, curve[k - 1]), textcoords="offset points", xytext=(4, -12),
                          fontsize="small")
    if len(curve) > 1:
        axes.set_xscale("log")
        ticks = [k for k in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if k <= len(curve)]
        axes.set_xticks(ticks, [str(k) for k in ticks])
    axes.set(xlabel="k (passages retrieved)", ylabel="questions with an answer in the top k", title=title,
             ylim=(0, 1.05))
    axes.grid(alpha=0.3)
    return figure


def risk_coverage(coverage: Sequence[float], em: Sequence[float], area: float, on: str, out_dir: Path,
                  name: str = "risk_coverage", threshold_coverage: float | None = None) -> Drawn:
    """EM of the answered questions against coverage, with the area in the legend; not drawn without scores."""
    title = f"EM of the answered against coverage (by {on})"
    if not coverage:
        return Drawn(name, title, note="the answers carry no score (closed-book run)")
    figure = _new_figure()
    axes = figure.subplots()
    axes.plot(coverage, em, "-", color="C1", label=f"area {area:.3f}")
    axes.axhline(em[-1], color="grey", linestyle=":", label=f"answer all: EM {em[-1]:.3f}")
    if threshold_coverage is not None:
        axes.axvline(threshold_coverage, color="C3", linestyle="--",
                     label=f"threshold: coverage {threshold_coverage:.2f}")
    axes.set(xlabel="coverage (fraction answered, most confident first)", ylabel="EM of the answered",
             title=title, xlim=(0, 1.02), ylim=(0, 1.05))
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", loc="lower left")
    return _save(figure, out_dir, name, title, note=f"Area under the curve {area:.3f}.")


def index_swap(bars: Mapping[str, tuple[float, float]], out_dir: Path, name: str = "index_swap") -> Drawn:
    """Grouped bars: for each stage (e.g. "v1 index", "v2 index"), EM against the new and against the old answers."""
    title = "Changed questions: EM vs new and old answers"
    if not bars:
        return Drawn(name, title, note="no evaluation of changed questions")
    figure = _new_figure()
    axes = figure.subplots()
    labels = list(bars)
    width = 0.38
    for offset, (column, colour, which) in enumerate(((0, "C2", "new answers"), (1, "C7", "old answers"))):
        xs = [i + (offset - 0.5) * width for i in range(len(labels))]
        values = [bars[label][column] for label in labels]
        drawn = axes.bar(xs, values, width, color=colour, label=f"EM vs {which}")
        axes.bar_label(drawn, fmt="%.2f", fontsize="small")
    axes.set_xticks(range(len(labels)), labels)
    axes.set(ylabel="exact match", title=title, ylim=(0, 1.3), yticks=[0, 0.2, 0.4, 0.6, 0.8, 1.0])
    axes.legend(fontsize="small", loc="upper center", ncols=2)
    return _save(figure, out_dir, name, title)
