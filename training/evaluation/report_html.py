"""report.html: every question of an evaluation on one static page, for error analysis.

Each question shows its prediction, references, right / wrong, score and the passages
it read (title, id, posterior p(z|x,y), text), the reference answers highlighted in the
text where `answer_match.answer_spans` finds them: the matching behind recall@k, so a
highlighted passage is one recall@k counts. Filters (wrong, right, answer not retrieved,
retrieved but not read, abstained) and the order (question, score either way) are radio
buttons read by CSS: the page works from the file system with JavaScript on or off, and
loads nothing (jinja2 template ``templates/report.html.j2``, values escaped).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rag_models.atomic import atomic_write_text
from training.evaluation.answer_match import answer_spans

TEMPLATE_DIR = Path(__file__).parent / "templates"
SHOWN_METRICS = ("exact_match", "f1", "recall@1", "recall@5", "recall@20", "recall@100", "exact_match_stale",
                 "em_coverage_area", "coverage", "exact_match_answered", "num_total", "n_docs")


def segments(text: str, spans: Sequence[tuple[int, int]]) -> list[tuple[str, bool]]:
    """``text`` cut at ``spans``: (piece, highlighted) pairs whose pieces join back into ``text``."""
    parts, position = [], 0
    for start, end in spans:
        if start > position:
            parts.append((text[position:start], False))
        parts.append((text[start:end], True))
        position = end
    if position < len(text):
        parts.append((text[position:], False))
    return parts


def question_classes(record: dict[str, Any]) -> list[str]:
    """The filter classes of a record: right|wrong, notretrieved (no retrieved passage holds an answer),
    notread (one does, beyond the docs read), abstained."""
    classes = ["right" if record["correct"] else "wrong"]
    if "answer_rank" in record:
        rank, read = record["answer_rank"], len(record.get("doc_ids", []))
        if rank is None:
            classes.append("notretrieved")
        elif rank >= read:
            classes.append("notread")
    if record.get("abstained"):
        classes.append("abstained")
    return classes


def _docs(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The passages read by one record, with their highlighted text segments."""
    texts = record.get("passage_texts") or [""] * len(record.get("doc_ids", []))
    docs = []
    for position, (doc_id, title, posterior, text) in enumerate(
            zip(record.get("doc_ids", []), record.get("titles", []), record.get("doc_posteriors", []), texts), 1):
        spans = answer_spans(record["answers"], text)
        docs.append(dict(position=position, id=doc_id, title=title, posterior=f"{posterior:.3f}", gold=bool(spans),
                         segments=segments(text, spans)))
    return docs


def _score_orders(records: Sequence[dict[str, Any]]) -> tuple[list[int], list[int]]:
    """Each record's place when sorted by score, highest first and lowest first (no score: last either way)."""
    scored = [i for i, r in enumerate(records) if r.get("score") is not None]
    down = sorted(scored, key=lambda i: -records[i]["score"])
    up = sorted(scored, key=lambda i: records[i]["score"])
    places_down, places_up = [len(records)] * len(records), [len(records)] * len(records)
    for place, i in enumerate(down):
        places_down[i] = place
    for place, i in enumerate(up):
        places_up[i] = place
    return places_down, places_up


def _shown(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def render_html(records: Sequence[dict[str, Any]], metrics: dict[str, Any], title: str = "Evaluation report") -> str:
    """The page for ``records`` (rag-eval's prediction records, with ``passage_texts`` when known)."""
    import jinja2

    down, up = _score_orders(records)
    questions = []
    for number, record in enumerate(records, start=1):
        score = record.get("score")
        rank = record.get("answer_rank")
        questions.append(dict(
            number=number, question=record["question"], prediction=record["prediction"],
            answers=record["answers"], stale=record.get("stale_answers"), correct=bool(record["correct"]),
            verdict="right" if record["correct"] else "wrong", abstained=bool(record.get("abstained")),
            score="" if score is None else f"{score:.3f}", classes=" ".join(question_classes(record)),
            rank="" if "answer_rank" not in record else ("none" if rank is None else f"#{rank + 1}"),
            down=down[number - 1], up=up[number - 1], docs=_docs(record)))
    classes = [set(q["classes"].split()) for q in questions]
    counts = {name: sum(name in c for c in classes) for name in ("wrong", "right", "notretrieved", "notread")}
    counts["all"] = len(questions)
    counts["abstained"] = sum("abstained" in c for c in classes) if "coverage" in metrics else None
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE_DIR), autoescape=True,
                                     undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    shown = [(name, _shown(metrics[name])) for name in SHOWN_METRICS if metrics.get(name) is not None]
    return environment.get_template("report.html.j2").render(
        title=title, metrics=metrics, shown_metrics=shown, counts=counts, questions=questions)


def write_report_html(path: Path, records: Sequence[dict[str, Any]], metrics: dict[str, Any]) -> Path:
    """Write report.html atomically; returns its path."""
    atomic_write_text(path, render_html(records, metrics))
    return path
