"""rag-eval's views: n_docs sweeps, figures, abstention, report.html (tiny world, untrained tiny model)."""
from __future__ import annotations

import json
import math
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from decoding.abstain import transfer_warning
from decoding.retrieve import retrieve
from index.settings import IndexSettings
from rag_models.checkpoint import load_rag_model
from rag_models.errors import InputError
from tiny_setup import save_untrained_rag
from training.config import compose
from training.evaluation import figures
from training.evaluation.answer_match import answer_in_text, answer_spans, answer_tokens
from training.evaluation.eval_cli import evaluate
from training.evaluation.metrics import recall_hits
from training.evaluation.selective import abstention, check_settings, risk_coverage, threshold_for_coverage

LIMIT = 8


@pytest.fixture(scope="module")
def parts(tiny_setup, tmp_path_factory):
    """The session's tiny world and index, and an untrained RAG-Sequence checkpoint reading 3 docs."""
    root = tmp_path_factory.mktemp("views")
    setup = tiny_setup
    save_untrained_rag(setup.models, root / "rag", n_docs=3)
    return {"root": root, "setup": setup, "checkpoint": root / "rag", "index": setup.index_dir}


def _overrides(parts, out_dir: Path, *extra: str) -> list[str]:
    return [f"checkpoint={parts['checkpoint']}", f"questions={parts['setup'].world.test}",
            f"index.path={parts['index']}", f"out_dir={out_dir}", f"limit={LIMIT}", "batch_size=4", "progress=false",
            "recall_depth=20", *extra]


def _run(parts, out_dir: Path, *extra: str) -> dict:
    return evaluate(compose(_overrides(parts, out_dir, *extra), config_name="eval"))


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def sweep(parts):
    out = parts["root"] / "sweep"
    return out, _run(parts, out, "n_docs=[5,1,3]")


# --- sweeps ------------------------------------------------------------------------------------------


def test_first_k_of_a_deeper_retrieval_is_a_k_retrieval(parts):
    model = load_rag_model(parts["checkpoint"]).eval()
    retriever = IndexSettings(path=str(parts["index"])).open()
    questions = [json.loads(line)["question"] for line in parts["setup"].world.test.read_text().splitlines()[:6]]
    deep, shallow = retrieve(model, retriever, questions, 50), retrieve(model, retriever, questions, 5)
    cut = deep.docs.first(5)
    assert torch.equal(cut.ids, shallow.docs.ids)
    assert torch.allclose(cut.scores, shallow.docs.scores) and torch.equal(cut.vectors, shallow.docs.vectors)
    assert cut.texts == shallow.docs.texts and cut.titles == shallow.docs.titles
    # The doc scores the decoder uses are recomputed from the vectors: the same for both.
    assert torch.equal(model.doc_scores(deep.question_vectors, cut.vectors),
                       model.doc_scores(shallow.question_vectors, shallow.docs.vectors))


def test_sweep_equals_separate_runs(parts, sweep, tmp_path):
    out, summary = sweep
    assert summary["values"] == [1, 3, 5] and [r["n_docs"] for r in summary["runs"]] == [1, 3, 5]
    assert json.loads((out / "summary.json").read_text()) == summary
    assert "| 3 |" in (out / "summary.md").read_text()
    for n_docs in (1, 5):
        single = _run(parts, tmp_path / f"single{n_docs}", f"n_docs={n_docs}")
        swept = json.loads((out / f"n_docs={n_docs}" / "metrics.json").read_text())
        differ = {"seconds"}
        assert {k: v for k, v in swept.items() if k not in differ} == \
            {k: v for k, v in single.items() if k not in differ}
        assert (out / f"n_docs={n_docs}" / "predictions.jsonl").read_text() == \
            (tmp_path / f"single{n_docs}" / "predictions.jsonl").read_text()
        assert all(len(r["doc_ids"]) == n_docs for r in _records(out / f"n_docs={n_docs}" / "predictions.jsonl"))


def test_sweep_draws_em_against_n_docs(sweep):
    out, _ = sweep
    assert (out / "em_vs_n_docs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "em_vs_n_docs.svg").read_text().lstrip().startswith("<?xml")
    assert "![EM and F1 against the docs read](em_vs_n_docs.png)" in (out / "summary.md").read_text()


def test_sweep_refuses_bad_values(parts, tmp_path):
    with pytest.raises(InputError, match="n_docs"):
        _run(parts, tmp_path / "bad", "n_docs=[0,2]")
    with pytest.raises(InputError, match="trainer.devices"):
        _run(parts, tmp_path / "two", "n_docs=[1,2]", "trainer.devices=2")


# --- figures -----------------------------------------------------------------------------------------


def test_recall_curve_agrees_with_recall_at_k():
    ranks = [0, 3, None, 19, 4, 1, None, 7]
    curve = figures.recall_curve(ranks, 20)
    hits = recall_hits(ranks, (1, 5, 20), 20)
    assert len(curve) == 20 and curve[-1] == hits["recall@20"] / len(ranks)
    assert curve[0] == hits["recall@1"] / len(ranks) and curve[4] == hits["recall@5"] / len(ranks)
    assert all(a <= b for a, b in zip(curve, curve[1:]))


def test_figures_without_data_are_not_drawn(tmp_path):
    for drawn in (figures.recall_at_k(None, 0, tmp_path), figures.risk_coverage([], [], math.nan, "score", tmp_path),
                  figures.em_vs_n_docs({"thorough": [{"n_docs": 3, "exact_match": 0.5, "f1": 0.6}]}, tmp_path),
                  figures.index_swap({}, tmp_path)):
        assert drawn.files == () and "not drawn" in drawn.markdown()
    assert list(tmp_path.iterdir()) == []  # never empty axes on disk
    drawn = figures.index_swap({"v1 index": (0.0, 0.97), "v2 index": (0.97, 0.0)}, tmp_path)
    assert [p.name for p in drawn.files] == ["index_swap.png", "index_swap.svg"]


def test_eval_writes_figures_and_embeds_them(sweep):
    out, _ = sweep
    run = out / "n_docs=3"
    report = (run / "report.md").read_text()
    for name in ("recall_at_k", "risk_coverage"):
        assert (run / f"{name}.png").stat().st_size > 1000 and (run / f"{name}.svg").is_file()
        assert f"]({name}.png)" in report
    assert "passage_texts" not in (run / "predictions.jsonl").read_text()  # kept in memory for report.html only


def test_figures_false_draws_nothing(parts, tmp_path):
    _run(parts, tmp_path / "plain", "figures=false", "limit=2")
    assert sorted(p.name for p in (tmp_path / "plain").iterdir() if p.suffix in (".png", ".svg", ".html")) == []
    assert "## Figures" not in (tmp_path / "plain" / "report.md").read_text()


def test_closed_book_says_what_is_not_drawn(parts, tmp_path):
    _run(parts, tmp_path / "cb", "mode=closed_book", "limit=2")
    report = (tmp_path / "cb" / "report.md").read_text()
    assert "not drawn (no passages retrieved" in report and "not drawn (the answers carry no score" in report
    assert not (tmp_path / "cb" / "recall_at_k.png").exists() and (tmp_path / "cb" / "report.html").is_file()


# --- abstention --------------------------------------------------------------------------------------


def _fake(scores: list[float], correct: list[bool]) -> list[dict]:
    return [{"score": s, "correct": c, "doc_posteriors": [0.5 + s / 100, 0.5 - s / 100]}
            for s, c in zip(scores, correct)]


def test_risk_coverage_brute_force():
    scores, correct = [-1.0, -3.0, -0.5, -2.0, -4.0], [True, False, True, False, True]
    coverage, em, area = risk_coverage(_fake(scores, correct))
    order = sorted(range(5), key=lambda i: -scores[i])
    for i in range(1, 6):
        assert coverage[i - 1] == i / 5 and em[i - 1] == sum(correct[j] for j in order[:i]) / i
    assert area == pytest.approx(sum(em) / 5) and em[-1] == 3 / 5


def test_abstention_marks_and_scores_the_answered():
    records = _fake([-1.0, -3.0, -0.5, -2.0, -4.0], [True, False, True, False, True])
    metrics = abstention(records, below=-1.5, on=None, coverage=None)
    assert [r["abstained"] for r in records] == [False, True, False, True, True]
    assert metrics["coverage"] == 2 / 5 and metrics["exact_match_answered"] == 1.0 and metrics["abstain_on"] == "score"
    assert threshold_for_coverage(records, 0.6, "score") == -2.0
    chosen = abstention(records, below=None, on="posterior", coverage=0.4)
    assert chosen["coverage"] == 0.4 and chosen["abstain_on"] == "posterior"
    with pytest.raises(InputError, match="abstain_on"):
        abstention(records, below=0.0, on="entropy", coverage=None)
    with pytest.raises(InputError, match="both"):
        abstention(records, below=0.0, on=None, coverage=0.5)


@pytest.mark.parametrize("below", [math.nan, math.inf, -math.inf, "nan", "-inf"])
def test_non_finite_thresholds_are_refused(below, tmp_path):
    records = _fake([-1.0, -3.0], [True, False])
    with pytest.raises(InputError, match="abstain_below.*not a finite number"):
        abstention(records, below=below, on=None, coverage=None)
    saved = tmp_path / "threshold.json"
    saved.write_text(json.dumps({"threshold": float(below), "abstain_on": "score"}))  # json writes NaN / Infinity
    with pytest.raises(InputError, match="threshold.json.*not a finite number"):
        abstention(records, below=str(saved), on=None, coverage=None)


def test_posterior_thresholds_are_probabilities_and_abstain_on_needs_a_threshold(tmp_path):
    records = _fake([-1.0, -3.0], [True, False])
    for below in (-0.5, 1.01):
        with pytest.raises(InputError, match=r"abstain_below.*not in \[0, 1\]"):
            abstention(records, below=below, on="posterior", coverage=None)
    saved = tmp_path / "threshold.json"
    saved.write_text(json.dumps({"threshold": 2.0, "abstain_on": "posterior"}))
    with pytest.raises(InputError, match=r"threshold.json.*not in \[0, 1\]"):
        abstention(records, below=str(saved), on=None, coverage=None)
    assert abstention(records, below=0.52, on="posterior", coverage=None)["coverage"] == 1 / 2  # max 0.51, 0.53
    assert abstention(records, below=-0.5, on="score", coverage=None)["coverage"] == 0.0  # a score may be < 0
    with pytest.raises(InputError, match="abstain_on.*without a threshold"):
        check_settings(None, "posterior", None)


def test_threshold_file_used_elsewhere_warns_naming_both(tmp_path):
    saved = tmp_path / "threshold.json"
    summary = "thorough, 1 beam per doc, 5 docs, max_length 40"
    saved.write_text(json.dumps({"threshold": -1.0, "abstain_on": "score", "checkpoint": "runs/a/model",
                                 "strategy": "thorough", "n_docs": 5, "decoding_summary": summary}))
    same = {"decoding_summary": summary, "strategy": "thorough", "n_docs": 5}
    assert transfer_warning(saved, "runs/a/model", same) is None
    assert transfer_warning(-1.0, "runs/b/model", same) is None  # a number records nothing
    warning = transfer_warning(saved, "runs/b/model", same)
    assert "checkpoint runs/a/model (this run: runs/b/model)" in warning and "decoding" not in warning
    other = transfer_warning(saved, "runs/a/model", {"decoding_summary": "fast, 1 beam per doc, 5 docs, "
                                                                          "max_length 40"})
    assert f"decoding {summary} (this run: fast, 1 beam" in other and "checkpoint" not in other
    assert "n_docs 5 (this run: 10)" in transfer_warning(saved, "runs/a/model", {"strategy": None, "n_docs": 10})


def test_threshold_chosen_on_dev_is_stored_and_read_back(parts, tmp_path, capsys):
    dev = _run(parts, tmp_path / "dev", "abstain_coverage=0.5")
    saved = json.loads((tmp_path / "dev" / "threshold.json").read_text())
    assert saved["threshold"] == dev["abstain_below"] and saved["abstain_on"] == "score"
    assert dev["coverage"] >= 0.5 and dev["num_answered"] == round(dev["coverage"] * LIMIT)
    again = _run(parts, tmp_path / "test", f"abstain_below={tmp_path / 'dev' / 'threshold.json'}")
    assert again["abstain_below"] == saved["threshold"] and again["coverage"] == dev["coverage"]
    records = _records(tmp_path / "test" / "predictions.jsonl")
    assert [r["abstained"] for r in records] == [r["score"] < saved["threshold"] for r in records]
    assert (saved["checkpoint"], saved["n_docs"], saved["strategy"]) == (str(parts["checkpoint"]), 3, dev["strategy"])
    assert saved["decoding_summary"] == dev["decoding_summary"]
    assert "warning" not in capsys.readouterr().err  # same checkpoint and decoder: nothing to say
    _run(parts, tmp_path / "other", f"abstain_below={tmp_path / 'dev' / 'threshold.json'}", "n_docs=2")
    assert "rag-eval: warning:" in capsys.readouterr().err  # (printed by check_abstention)
    with pytest.raises(InputError, match="abstain_on=score"):
        _run(parts, tmp_path / "x", f"abstain_below={tmp_path / 'dev' / 'threshold.json'}", "abstain_on=posterior")
    with pytest.raises(InputError, match="closed-book"):
        _run(parts, tmp_path / "y", "mode=closed_book", "abstain_below=-1")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# --- report.html -------------------------------------------------------------------------------------


@pytest.mark.parametrize("answers, text", [
    (["Selk"], "the Selk-river. SELK again, selkie not"),
    (["US"], "the U.S. army and US forces"),
    (["Beyoncé"], "Beyonce\u0301 and Beyoncé, not beyonce"),
    (["ΟΔΟΣ"], "η οδος ΟΔΟΣ"),
    (["New York", "York"], "New York, york city"),
    (["-"], "a - b"),
])
def test_answer_spans_are_the_recall_matches(answers, text):
    spans = answer_spans(answers, text)
    assert bool(spans) == answer_in_text(answers, text)
    wanted = [answer_tokens(a) for a in answers]
    for start, end in spans:  # merged spans are runs of answer matches
        assert any(answer_tokens(text[start:end])[: len(w)] == w for w in wanted)


class _Page(HTMLParser):
    """Collects each question's text and, per passage text cell, its plain text and highlighted spans."""

    def __init__(self) -> None:
        super().__init__()
        self.questions: list[str] = []
        self.cells: list[tuple[str, list[tuple[int, int]], str]] = []  # (text, spans, question id)
        self._in_question = self._in_cell = self._in_mark = False
        self._current = ""
        self._text = ""
        self._spans: list[tuple[int, int]] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "details":
            self._current = attrs["id"]
        if tag == "span" and attrs.get("class") == "question":
            self._in_question, self.questions = True, self.questions + [""]
        if tag == "td" and attrs.get("class") == "text":
            self._in_cell, self._text, self._spans = True, "", []
        if tag == "mark" and self._in_cell:
            self._in_mark = True
            self._spans.append((len(self._text), len(self._text)))

    def handle_endtag(self, tag):
        if tag == "span":
            self._in_question = False
        if tag == "mark":
            self._in_mark = False
        if tag == "td" and self._in_cell:
            self._in_cell = False
            self.cells.append((self._text, self._spans, self._current))

    def handle_data(self, data):
        if self._in_question:
            self.questions[-1] += data
        if self._in_cell:
            self._text += data
            if self._in_mark:
                self._spans[-1] = (self._spans[-1][0], len(self._text))


def test_report_html_holds_every_question_and_highlights_recall_matches(sweep):
    out, _ = sweep
    run = out / "n_docs=5"
    page = _Page()
    page.feed((run / "report.html").read_text(encoding="utf-8"))
    page.close()
    records = _records(run / "predictions.jsonl")
    assert page.questions == [f"{i}. {r['question']}" for i, r in enumerate(records, start=1)]
    assert len(page.cells) == 5 * len(records)
    by_question = {f"q{i}": r for i, r in enumerate(records, start=1)}
    highlighted = set()
    for text, spans, question in page.cells:
        answers = by_question[question]["answers"]
        assert spans == answer_spans(answers, text) and bool(spans) == answer_in_text(answers, text)
        if spans:
            highlighted.add(question)
    # A question has a highlighted passage exactly when recall counts an answer among the docs it read.
    read = {q for q, r in by_question.items() if r["answer_rank"] is not None and r["answer_rank"] < 5}
    assert highlighted == read and read
    html = (run / "report.html").read_text()
    assert "<script" not in html and "http" not in html.replace(str(run), "")  # no script, nothing fetched
    for name in ("f-wrong", "f-right", "f-notretrieved", "f-notread", "o-down"):
        assert f'id="{name}"' in html


def test_rag_ask_says_no_confident_answer_with_its_best_guess(parts, capsys, tmp_path):
    from decoding.ask_cli import main as ask_main

    question = json.loads(parts["setup"].world.test.read_text().splitlines()[0])["question"]
    base = ["--checkpoint", str(parts["checkpoint"]), "--index", str(parts["index"]), "--max-length", "6", question]
    assert ask_main(base) == 0
    plain = capsys.readouterr().out
    guess = plain.splitlines()[1].split("    [score ")[0][len("A: "):]
    assert ask_main([*base, "--abstain-below", "0"]) == 0  # a log-probability is never above 0
    out = capsys.readouterr().out
    assert f"A: no confident answer (best guess: {guess}    [score " in out and "from: " in out
    assert ask_main([*base, "--abstain-below=-1e9"]) == 0
    assert capsys.readouterr().out == plain
    assert ask_main([*base, "--abstain-below", "1", "--abstain-on", "posterior"]) == 0  # max posterior < 1
    assert "no confident answer" in capsys.readouterr().out
    saved = tmp_path / "threshold.json"
    saved.write_text(json.dumps({"threshold": 0.0, "abstain_on": "score"}))
    assert ask_main([*base, "--abstain-below", str(saved)]) == 0
    assert "no confident answer" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:  # bad input: exit status 2 (rag_models/cli_errors.py)
        ask_main([*base, "--abstain-below", str(tmp_path / "missing.json")])
    assert exited.value.code == 2 and "threshold file" in capsys.readouterr().err
    saved.write_text(json.dumps({"threshold": 0.0, "abstain_on": "score", "checkpoint": "runs/other/model"}))
    assert ask_main([*base, "--abstain-below", str(saved)]) == 0
    assert "rag-ask: warning: " in capsys.readouterr().err.split("checkpoint runs/other/model (this run: ")[0]
    for bad, message in ((["--abstain-below", "nan"], "not a finite number"),
                         (["--abstain-below", "1.01", "--abstain-on", "posterior"], r"not in [0, 1]"),
                         (["--abstain-on", "posterior"], "without a threshold")):
        with pytest.raises(SystemExit) as exited:
            ask_main([*base, *bad])
        assert exited.value.code == 2 and message in capsys.readouterr().err
