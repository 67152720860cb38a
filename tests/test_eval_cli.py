"""rag-eval end to end on a tiny demo world: files and provenance, n_docs, index swap, 2 processes, bad inputs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from index.build_cli import build_index
from rag_models.checkpoint import load_rag_model, save_rag_model, saved_mode
from rag_models.errors import InputError
from rag_models.retriever import DenseEncoder
from rag_models.tiny_models import TinyDprSize, save_tiny_checkpoints
from tiny_setup import save_untrained_rag
from training.config import compose
from training.evaluation.eval_cli import evaluate
from training.evaluation.eval_cli import main as eval_main
from training.evaluation.score_cli import score_files


def compose_eval(overrides: list[str]):
    """The config of ``rag-eval OVERRIDES``."""
    return compose(overrides, config_name="eval")


N_QUESTIONS = 16  # 2 processes x 2 batches of 4: the same batches as one process, so identical answers


@pytest.fixture(scope="module")
def parts(tiny_setup, tmp_path_factory):
    """The session's tiny world and v1 index, a v2 index, and an (untrained) RagModel checkpoint."""
    root = tmp_path_factory.mktemp("eval")
    setup = tiny_setup
    save_untrained_rag(setup.models, root / "rag", n_docs=3)
    v2 = build_index(setup.world.v2_passages, setup.models.context_encoder, root / "index_v2", factory="Flat",
                     max_length=128, progress=False)
    return {"root": root, "setup": setup, "checkpoint": root / "rag", "index": setup.index_dir,
            "index_v2": v2.parent}


def _overrides(parts, out_dir: Path, *extra: str, questions: Path | None = None) -> list[str]:
    questions = questions or parts["setup"].world.test
    return [f"checkpoint={parts['checkpoint']}", f"questions={questions}", f"index.path={parts['index']}",
            f"out_dir={out_dir}", f"limit={N_QUESTIONS}", "batch_size=4", "progress=false", *extra]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def one_process(parts):
    out = parts["root"] / "eval_one"
    metrics = evaluate(compose_eval(_overrides(parts, out)))
    return out, metrics


def test_outputs_and_provenance(parts, one_process):
    out, metrics = one_process
    records = _read_jsonl(out / "predictions.jsonl")
    questions = [json.loads(line)["question"] for line in parts["setup"].world.test.read_text().splitlines()]
    assert [r["question"] for r in records] == questions[:N_QUESTIONS]  # question order kept
    for record in records:
        assert isinstance(record["prediction"], str) and record["answers"]
        assert len(record["doc_ids"]) == len(record["titles"]) == len(record["doc_posteriors"]) == 3
        assert sum(record["doc_posteriors"]) == pytest.approx(1.0, abs=1e-4)
        assert record["answer_rank"] is None or 0 <= record["answer_rank"] < 100
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == metrics
    assert metrics["num_total"] == N_QUESTIONS and metrics["n_docs"] == 3 and metrics["devices"] == 1
    # no decoding= given: the RAG-Sequence checkpoint is decoded as the paper evaluates it
    assert metrics["strategy"] == "thorough" and metrics["decoding"]["num_beams"] == 1
    assert metrics["decoding_summary"] == "thorough, 1 beam per doc, 3 docs, max_length 40"
    assert metrics["index_path"] == str(parts["index"])
    # recall@k: the world has 100 passages, so every k of 1, 5, 20, 100 is reachable.
    for k in (1, 5, 20, 100):
        expected = sum(r["answer_rank"] is not None and r["answer_rank"] < k for r in records) / N_QUESTIONS
        assert metrics[f"recall@{k}"] == pytest.approx(expected)
    assert metrics["recall@100"] == 1.0  # every answer is in some passage of the world
    assert metrics["exact_match"] == pytest.approx(sum(r["correct"] for r in records) / N_QUESTIONS)
    report = (out / "report.md").read_text()
    assert "| exact_match |" in report and records[0]["question"] in report


def test_question_encoder_runs_once_per_batch(parts, monkeypatch, tmp_path):
    """One pass embeds a batch: the vectors that search the index also score the docs the answer reads."""
    calls: list[int] = []
    forward = DenseEncoder.forward

    def counting(self, input_ids, attention_mask):
        calls.append(int(input_ids.shape[0]))
        return forward(self, input_ids, attention_mask)

    monkeypatch.setattr(DenseEncoder, "forward", counting)
    evaluate(compose_eval(_overrides(parts, tmp_path / "count", "limit=10", "decoding=thorough")))
    # 10 questions in batches of 4 (4, 4, 2), after the one-question dimension probe at load time.
    assert calls == [1, 4, 4, 2]


def test_rag_score_agrees_with_rag_eval(parts, one_process, tmp_path):
    out, metrics = one_process
    references = tmp_path / "refs.jsonl"
    lines = parts["setup"].world.test.read_text().splitlines()[:N_QUESTIONS]
    references.write_text("\n".join(lines) + "\n")
    scores = score_files(references, out / "predictions.jsonl")
    assert scores["exact_match"] == metrics["exact_match"] and scores["f1"] == metrics["f1"]
    # Predictions scored against another question file: a clear error naming the file and line.
    other = tmp_path / "other.jsonl"
    other.write_text(parts["setup"].world.dev.read_text())
    with pytest.raises(InputError, match=r"predictions.jsonl, line 1: question .* is not in"):
        score_files(other, out / "predictions.jsonl")


def test_test_time_n_docs_and_index_swap(parts, tmp_path):
    changed = parts["setup"].world.v2_changed_test
    metrics = evaluate(compose_eval(_overrides(parts, tmp_path / "swap", "n_docs=5", f"index.path={parts['index_v2']}",
                                                      "limit=null", questions=changed)))
    records = _read_jsonl(tmp_path / "swap" / "predictions.jsonl")
    assert metrics["n_docs"] == 5 and all(len(r["doc_ids"]) == 5 for r in records)
    assert metrics["index_path"] == str(parts["index_v2"])
    # The changed questions carry their old answers: both scores are reported.
    assert metrics["num_stale"] == len(records) > 0 and "exact_match_stale" in metrics
    assert all("stale_answers" in r for r in records)


def test_closed_book_and_beam(parts, tmp_path):
    metrics = evaluate(compose_eval(_overrides(parts, tmp_path / "cb", "mode=closed_book", "limit=4")))
    records = _read_jsonl(tmp_path / "cb" / "predictions.jsonl")
    assert metrics["mode"] == "closed_book" and "recall@1" not in metrics and len(records) == 4
    assert "doc_ids" not in records[0]
    beam = evaluate(compose_eval(_overrides(parts, tmp_path / "beam", "decoding=beam", "limit=4")))
    assert beam["strategy"] == "beam" and beam["num_total"] == 4


def test_mode_defaults_to_how_the_checkpoint_was_trained(parts, tmp_path):
    """A closed-book export says so in rag_config.json: rag-eval then needs neither mode= nor an index."""
    model = load_rag_model(parts["checkpoint"])
    save_rag_model(model, tmp_path / "cb_model", mode="closed_book")
    assert saved_mode(tmp_path / "cb_model") == "closed_book" and saved_mode(parts["checkpoint"]) == "rag"
    assert load_rag_model(tmp_path / "cb_model").n_docs == model.n_docs  # "mode" is not a model setting
    overrides = [f"checkpoint={tmp_path / 'cb_model'}", f"questions={parts['setup'].world.test}",
                 f"out_dir={tmp_path / 'cb'}", "limit=4", "batch_size=4", "progress=false"]
    assert evaluate(compose_eval(overrides))["mode"] == "closed_book"
    # An explicit mode still wins: the closed-book generator may be evaluated with retrieval.
    with_docs = evaluate(compose_eval([*overrides[:2], f"out_dir={tmp_path / 'rag'}", *overrides[3:],
                                              "mode=rag", f"index.path={parts['index']}"]))
    assert with_docs["mode"] == "rag" and "recall@1" in with_docs
    # A RAG checkpoint without an index is still refused, naming the setting.
    with pytest.raises(InputError, match="index.path"):
        evaluate(compose_eval([f"checkpoint={parts['checkpoint']}", *overrides[1:]]))


def test_two_processes_give_the_same_files(parts, one_process, tmp_path):
    out_one, metrics_one = one_process
    out_two = tmp_path / "two"
    metrics_two = evaluate(compose_eval(_overrides(parts, out_two, "trainer.devices=2", "trainer.accelerator=cpu")))
    assert (out_two / "predictions.jsonl").read_text() == (out_one / "predictions.jsonl").read_text()
    differ = {"seconds", "devices"}
    assert {k: v for k, v in metrics_two.items() if k not in differ} == \
        {k: v for k, v in metrics_one.items() if k not in differ}
    assert metrics_two["devices"] == 2


# --- bad inputs -------------------------------------------------------------------------------------


def test_missing_files(parts, tmp_path):
    with pytest.raises(InputError, match="checkpoint directory not found"):
        evaluate(compose_eval(_overrides(parts, tmp_path / "a", f"checkpoint={tmp_path / 'nope'}")))
    with pytest.raises(InputError, match="index directory not found"):
        evaluate(compose_eval(_overrides(parts, tmp_path / "b", f"index.path={tmp_path / 'nope'}")))
    with pytest.raises(InputError, match="file not found"):
        evaluate(compose_eval(_overrides(parts, tmp_path / "c", questions=tmp_path / "nope.jsonl")))
    with pytest.raises(InputError, match="checkpoint.*required"):
        evaluate(compose_eval([f"questions={parts['setup'].world.test}", f"out_dir={tmp_path}"]))
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_index_dimension_mismatch_is_caught_before_decoding(parts, tmp_path):
    texts = [line for line in parts["setup"].world.train.read_text().splitlines()]
    wide = save_tiny_checkpoints(tmp_path / "wide", texts, dpr_size=TinyDprSize(hidden_size=48, num_layers=1,
                                                                                 num_heads=2, intermediate_size=64,
                                                                                 vocab_size=300))
    index = build_index(parts["setup"].world.v1_passages, wide.context_encoder, tmp_path / "wide_index",
                        factory="Flat", max_length=128, progress=False).parent
    with pytest.raises(InputError) as caught:
        evaluate(compose_eval(_overrides(parts, tmp_path / "out", f"index.path={index}")))
    message = str(caught.value)
    assert "32-dimensional" in message and "48-dimensional" in message
    assert str(parts["checkpoint"]) in message and str(index) in message
    assert not (tmp_path / "out").exists()  # nothing was decoded or written


@pytest.mark.slow  # spawns 2 processes that each import torch (20-50 s on 2 busy cores)
def test_bad_input_in_two_processes_reads_as_an_input_error(parts, tmp_path):
    bad = tmp_path / "index_of_nothing"
    bad.mkdir()
    with pytest.raises(InputError, match="manifest"):
        evaluate(compose_eval(_overrides(parts, tmp_path / "o", f"index.path={bad}", "trainer.devices=2",
                                                "trainer.accelerator=cpu")))


def test_command_line(parts, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cli"
    monkeypatch.setattr(sys, "argv", ["rag-eval", *_overrides(parts, out, "limit=4")])
    eval_main()
    printed = capsys.readouterr().out
    assert "exact_match" in printed and (out / "metrics.json").is_file() and (out / ".hydra").is_dir()
    monkeypatch.setattr(sys, "argv",
                        ["rag-eval", *_overrides(parts, tmp_path / "bad", f"checkpoint={tmp_path / 'missing'}")])
    with pytest.raises(SystemExit) as exited:
        eval_main()
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "rag-eval: error:" in err and "checkpoint directory not found" in err and "Traceback" not in err


@pytest.mark.slow  # spawns 2 processes (20-50 s on 2 busy cores)
def test_two_processes_with_a_sharded_index_and_uneven_shares(parts, tmp_path):
    # 9 questions in batches of 4: rank 0 runs 1 batch, rank 1 runs 2, so rank 0 must join the
    # second collective search with no queries. The batches are those of one process.
    one = evaluate(compose_eval(_overrides(parts, tmp_path / "one", "limit=9")))
    two = evaluate(compose_eval(_overrides(parts, tmp_path / "two", "limit=9", "trainer.devices=2",
                                                  "trainer.accelerator=cpu", "index.sharded=true")))
    assert (tmp_path / "two" / "predictions.jsonl").read_text() == (tmp_path / "one" / "predictions.jsonl").read_text()
    assert two["exact_match"] == one["exact_match"] and two["recall@5"] == one["recall@5"]


@pytest.mark.parametrize("marginalization,strategy", [("sequence", "thorough"), ("token", "greedy")])
def test_every_entry_point_decodes_a_checkpoint_alike_by_default(parts, tmp_path, capsys, marginalization: str,
                                                                  strategy: str):
    """Field case 03: rag-eval (no decoding=), rag-ask and answer() give the same answer and score for the same
    checkpoint and question, with the model's own decoder (RAG-Sequence thorough 1 beam / doc, RAG-Token greedy)."""
    from decoding.answer import answer
    from decoding.ask_cli import main as ask_main
    from index.settings import IndexSettings

    checkpoint = parts["checkpoint"]
    if marginalization == "token":
        checkpoint = save_rag_model(load_rag_model(parts["checkpoint"], marginalization="token"), tmp_path / "tok")
    question = json.loads(parts["setup"].world.test.read_text().splitlines()[0])["question"]
    metrics = evaluate(compose_eval([f"checkpoint={checkpoint}", f"questions={parts['setup'].world.test}",
                                     f"index.path={parts['index']}", f"out_dir={tmp_path / 'eval'}", "limit=1",
                                     "progress=false"]))
    record = _read_jsonl(tmp_path / "eval" / "predictions.jsonl")[0]
    assert metrics["strategy"] == strategy and metrics["decoding"]["num_beams"] == 1
    assert f"decoding: {strategy}, 1 beam" in (tmp_path / "eval" / "report.md").read_text()
    capsys.readouterr()
    assert ask_main(["--checkpoint", str(checkpoint), "--index", str(parts["index"]), question]) == 0
    shown = capsys.readouterr()
    assert f"decoding: {strategy}, 1 beam" in shown.err
    assert f"A: {record['prediction']}    [score {record['score']:.3f}]" in shown.out
    found = answer([question], IndexSettings(path=str(parts["index"])).open(), load_rag_model(checkpoint),
                   progress=False)[0]
    assert (found.text, round(found.score, 4)) == (record["prediction"], round(record["score"], 4))


def test_a_decoder_of_the_other_marginalization_runs_only_when_named_with_a_warning(parts, tmp_path):
    with pytest.warns(UserWarning, match="decoding a RAG-Sequence model with beam, a RAG-Token decoder"):
        metrics = evaluate(compose_eval(_overrides(parts, tmp_path / "eval", "decoding=beam", "limit=2")))
    assert metrics["strategy"] == "beam" and metrics["decoding"]["num_beams"] == 4
