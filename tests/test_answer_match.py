"""DPR's answer-in-passage check: its tokens, edge cases, field case 01, and that every recall path uses it.

Expected values follow the definition (answer_match.py): NFD, lower case, tokens =
runs of letters/digits/combining marks plus each other non-space character alone;
found = the answer's tokens are a contiguous run of the text's tokens.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import SHARED_DIR
from index.build_cli import build_index
from tiny_setup import save_untrained_rag
from training.config import compose
from training.evaluation import answer_match
from training.evaluation.answer_match import answer_in_text, answer_ranks, answer_tokens, first_answer_rank
from training.evaluation.eval_cli import evaluate
from training.lit.dpr_module import DprLitModule
from training.lit.rag_module import RagLitModule

CASE_01 = SHARED_DIR / "cases" / "field-2026-11-30" / "01-recall-punctuation"

# Field case 01's values (answer, text, found).
CASE_01_VALUES = [
    ("Selk", "Orvanta lies on the Selk-river.", True),
    ("Tella Marr", "Tella Marr's family founded Brinmoor.", True),
    ("Paris", "It is in Paris,France.", True),
    ("Paul", "Jean-Paul Sartre wrote it.", True),
    ("US", "the U.S. army", False),  # text tokens u . s . ; "us" is none of them
]

# (answer, text, found): why, from the definition.
EDGE_CASES = [
    ("Marr", "Tella Marr's house", True),  # possessive: marr ' s; "marr" is a token
    ("Marr's", "Tella Marr's house", True),  # marr ' s on both sides
    ("Marrs", "Tella Marr's house", False),  # "marrs" is no token; the apostrophe splits it
    ("river", "the Selk-river", True),  # hyphen splits: selk - river
    ("Selk river", "the Selk-river", False),  # selk river is not contiguous: "-" sits between
    ("Selk-river", "the Selk-river", True),  # selk - river on both sides
    ("France", "Paris,France", True),  # comma without spaces splits: paris , france
    ("beyonce", "Beyoncé sang", False),  # NFD keeps the accent's combining mark inside the token: beyonce\u0301
    ("Beyoncé", "BEYONCE\u0301 sang", True),  # precomposed vs decomposed and upper case: equal after NFD + lower
    ("USA", "the U.S.A. flag", False),  # dotted abbreviation: u . s . a .
    ("U.S.A.", "the U.S.A. flag", True),  # the same tokens on both sides
    ("1000", "about 1,000 men", False),  # 1 , 000 ; "1000" is no token
    ("1,000", "about 1,000 men", True),  # 1 , 000 on both sides
    ("1,000", "about 1000 men", False),  # 1 , 000 is not a run of the single token 1000
    ("000", "about 1,000 men", True),  # the separator makes "000" a whole token
    ("O'Brien", "Conan O'Brien hosts", True),  # o ' brien
    ("Brien", "Conan O'Brien hosts", True),  # the apostrophe splits
    ("Paris", "the capital (Paris) of France", True),  # parentheses are tokens of their own
    ("AC", "an AC/DC song", True),  # slash splits: ac / dc
    ("AC DC", "an AC/DC song", False),  # "/" sits between ac and dc
    ("R&B", "a R&B singer", True),  # r & b on both sides
    ("RB", "a R&B singer", False),  # "rb" is no token
    ("5", "it cost $5 then", True),  # currency sign alone: $ 5
    ("$5", "it cost $5 then", True),  # $ 5 on both sides
    ("50", "grew 50% in a year", True),  # percent sign alone: 50 %
    ("50 percent", "grew 50% in a year", False),  # "%" is not the word "percent"
    ("New York", "New York is big", True),  # multi-token answer at the very start
    ("New York", "he moved to New York", True),  # multi-token answer at the very end
    ("New York City", "he moved to New York", False),  # the answer runs past the end of the text
    ("the", "the river", True),  # articles count here (only exact match drops them)
    ("", "anything at all", False),  # an empty answer has no tokens: never evidence
    ("   ", "anything at all", False),  # whitespace only: no tokens either
    ("r2", "the R2-D2 droid", True),  # r2 - d2: digits and letters stay together
    ("Pari", "Paris is large", False),  # a piece of a token is not the answer
]


@pytest.mark.parametrize(("answer", "text", "found"), CASE_01_VALUES)
def test_field_case_01_values(answer: str, text: str, found: bool):
    assert answer_in_text([answer], text) is found


@pytest.mark.parametrize(("answer", "text", "found"), EDGE_CASES)
def test_edge_cases_follow_dpr_tokens(answer: str, text: str, found: bool):
    assert answer_in_text([answer], text) is found


def test_tokens_are_dpr_tokens():
    assert answer_tokens("Orvanta lies on the Selk-river.") == ["orvanta", "lies", "on", "the", "selk", "-", "river",
                                                                 "."]
    assert answer_tokens("Tella\u00a0Marr's\t50%") == ["tella", "marr", "'", "s", "50", "%"]  # no-break space splits
    assert answer_tokens("Beyoncé") == ["beyonce\u0301"]  # NFD: the combining mark stays in the token


def test_regex_mode_goes_through_the_same_entry_point():
    """CuratedTrec: each answer is a pattern searched anywhere in the text, case-insensitively."""
    assert answer_in_text([r"selk\W+river"], "Orvanta lies on the Selk-river.", regex=True)
    assert not answer_in_text([r"^river"], "Orvanta lies on the Selk-river.", regex=True)
    assert first_answer_rank([r"1,?000"], ["none", "about 1000 men"], regex=True) == 1


@pytest.fixture
def spy(monkeypatch) -> list[tuple]:
    """Every call of answer_in_text, recorded; the real check still answers."""
    calls: list[tuple] = []
    real = answer_match.answer_in_text

    def recording(answers, text, *, regex=False):
        calls.append((tuple(answers), text))
        return real(answers, text, regex=regex)

    monkeypatch.setattr(answer_match, "answer_in_text", recording)
    return calls


def test_answer_ranks_use_the_check(spy):
    assert answer_ranks([["Selk"]], [["no river here", "Orvanta lies on the Selk-river."]]) == [1]
    assert spy == [(("Selk",), "no river here"), (("Selk",), "Orvanta lies on the Selk-river.")]


def test_training_validation_recall_uses_the_check(spy):
    """RagLitModule's val/recall@k: a punctuation-glued answer at rank 0, found by the shared check."""
    texts = [["Orvanta lies on the Selk-river.", "x"], ["y", "Tella Marr's family founded Brinmoor."]]
    retrieval = SimpleNamespace(docs=SimpleNamespace(n_docs=2, texts=texts))
    fake = SimpleNamespace(predict_questions=lambda questions: ([SimpleNamespace(text="Selk")] * 2, retrieval),
                           recall_ks=(1, 2), _sums=defaultdict(float))
    batch = {"questions": ["q1", "q2"], "answers": [["Selk"], ["Tella Marr"]], "real": torch.tensor([True, True])}
    RagLitModule._eval_step(fake, batch)
    assert fake._sums["recall@1"] == 1.0 and fake._sums["recall@2"] == 2.0
    assert (("Selk",), "Orvanta lies on the Selk-river.") in spy


def test_dpr_pretraining_recall_uses_the_check(spy):
    """DprLitModule's val/recall@k: with answers, the passage text decides (as DPR's top-k accuracy)."""
    corpus = [SimpleNamespace(text="Orvanta lies on the Selk-river."), SimpleNamespace(text="nothing here")]
    keys = torch.tensor([10, 11])
    top = torch.tensor([0, 1])  # (kmax,) corpus rows, best first
    # The gold passage is row 1, but row 0 holds the answer: rank 0, like rag-eval's recall.
    assert DprLitModule._first_hit(top, keys, corpus, [11], ["Selk"]) == 0
    assert spy == [(("Selk",), "Orvanta lies on the Selk-river.")]
    assert DprLitModule._first_hit(top, keys, corpus, [11], ["US"]) is None
    # A DPR file without answers: the gold passage's key decides.
    assert DprLitModule._first_hit(top, keys, corpus, [11], []) == 1


def test_field_case_01_through_build_index_and_rag_eval(tiny_setup, tmp_path: Path, spy):
    """rag-build-index of the case's passages, then rag-eval: recall@1 = 1.0 and answer_rank 0 for both questions."""
    if not CASE_01.is_dir():
        pytest.skip("field case 01 not found at ../shared/cases/field-2026-11-30/ (absent in a user's clone)")
    index_root = build_index(CASE_01 / "passages.tsv", tiny_setup.models.context_encoder, tmp_path / "index",
                             factory="Flat", max_length=128, progress=False)
    save_untrained_rag(tiny_setup.models, tmp_path / "rag", n_docs=2)
    out = tmp_path / "eval"
    metrics = evaluate(compose([f"checkpoint={tmp_path / 'rag'}", f"questions={CASE_01 / 'questions.jsonl'}",
                                f"index.path={index_root.parent}", f"out_dir={out}", "progress=false"],
                               config_name="eval"))
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert metrics["recall@1"] == 1.0
    assert [r["answer_rank"] for r in records] == [0, 0]
    assert {answers for answers, _ in spy} == {("Selk",), ("Tella Marr",)}  # rag-eval asked the shared check
