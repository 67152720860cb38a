"""One table of malformed files, run through every command that reads the format; the outcomes must agree.

Questions (NQ-Open JSONL, DPR CSV) are read by rag-eval (``load_examples``), rag-train (``QADataModule.setup``)
and rag-score (its references); passages (TSV, JSONL) by rag-build-index (``PassageStore.build``) and the DPR
data module's corpus (``iter_passages``). Each variant expects either the same InputError from every command
(its message naming the file and line) or the same parsed records.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import pytest

from index.passage_files import iter_passages
from index.passages import PassageStore
from rag_models.errors import InputError
from training.data.dpr_datamodule import DprDataModule
from training.data.qa_datamodule import QADataModule
from training.data.questions import read_dpr_training
from training.evaluation.job import EvalJob, load_examples
from training.evaluation.score_cli import read_predictions, score_files

BOM, BAD_UTF8 = "\ufeff".encode(), b"\xff\xfe"
NQ = ['{"question": "who a", "answer": ["x"]}', '{"question": "who b", "answer": ["y", "z"]}']
CSV = ["who a\t['x']", "who b\t['y', 'z']"]
QA_RECORDS = [("who a", ("x",)), ("who b", ("y", "z"))]
TSV = ["id\ttext\ttitle", "1\tAlpha text\tA", "2\tBeta text\tB"]
PJ = ['{"id": "1", "title": "A", "text": "Alpha text"}', '{"id": "2", "title": "B", "text": "Beta text"}']
PASSAGES = [("1", "A", "Alpha text"), ("2", "B", "Beta text")]


def _lines(lines: list[str], end: str = "\n") -> bytes:
    return "".join(line + end for line in lines).encode()


def _variants(good: list[str], missing: str, wrong: str, repeat: str, records: list, errors: dict[str, str],
              first: int = 1) -> dict[str, tuple[bytes, Any]]:
    """variant -> (file bytes, expected): records for every command, or the error (regex) every command raises.

    ``first`` is the line of the first record (2 after a TSV header); ``errors`` holds the per-format messages.
    """
    head, last = good[:-1], good[-1]
    return {
        "valid": (_lines(good), records),
        "empty line": (_lines([*head, "", "   ", last]), records),  # blank lines skipped, numbers kept
        "missing field": (_lines([*head, missing]), errors["missing"].format(line=first + 1)),
        "wrong type": (_lines([*head, wrong]), errors["wrong"].format(line=first + 1)),
        "repeat": (_lines([*good, repeat]), errors["repeat"].format(line=first + 2)),
        "BOM": (BOM + _lines(good), records),  # dropped by iter_lines
        "CRLF": (_lines(good, "\r\n"), records),
        "invalid UTF-8": (_lines(head) + BAD_UTF8 + b"\n" + _lines([last]), f"line {first + 1}: not valid UTF-8"),
        "empty file": (b"", errors["empty"]),
    }


QUESTION_TABLE = {
    "q.jsonl": _variants(NQ, '{"question": "who b"}', '{"question": "who b", "answer": "y"}', NQ[0], QA_RECORDS,
                         {"missing": "line {line}: missing key `answer`",
                          "wrong": r"line {line}: `answer` must be a list of strings",
                          "repeat": r"q\.jsonl:{line}: the question repeats .*q\.jsonl:1",
                          "empty": "q.jsonl: no questions in the file"}),
    "q.csv": _variants(CSV, "who b", "who b\t'y'", CSV[0], QA_RECORDS,
                       {"missing": "line {line}: 1 tab-separated fields, expected 2",
                        "wrong": r"line {line}: `answers` must be a list of strings",
                        "repeat": r"q\.csv:{line}: the question repeats .*q\.csv:1",
                        "empty": "q.csv: no questions in the file"}),
}
PASSAGE_TABLE = {
    "p.tsv": _variants(TSV, "2\tBeta text", "\tBeta text\tB", TSV[1], PASSAGES,
                       {"missing": "line {line}: 2 tab-separated fields, the header has 3",
                        "wrong": "line {line}: empty passage id",
                        "repeat": r"p\.tsv: passage id .1. appears twice", "empty": r"p\.tsv: the file is empty"},
                       first=2),
    "p.jsonl": _variants(PJ, '{"id": "2", "title": "B"}', '{"id": "2", "title": 5, "text": "Beta text"}', PJ[0],
                         PASSAGES, {"missing": "line {line}: missing key `text`",
                                    "wrong": "line {line}: `title` must be a string, got int",
                                    "repeat": r"p\.jsonl: passage id .1. appears twice",
                                    "empty": r"p\.jsonl: the file holds no passages"}),
}

# Blank questions are refused by line in every question format (a blank passage is kept with a warning, below).
QUESTION_TABLE["q.jsonl"]["blank question"] = (_lines([NQ[0], '{"question": "   ", "answer": ["y"]}']),
                                              "line 2: `question` must be a non-empty string")
QUESTION_TABLE["q.csv"]["blank question"] = (_lines([CSV[0], "   \t['y']"]), "line 2: empty question")


def _outcome(read: Callable[[], Any]) -> Any:
    """What a command makes of a file: its records, or ``InputError: message``."""
    try:
        return read()
    except InputError as err:
        return f"InputError: {err}"


def _qa(examples: list) -> list[tuple[str, tuple[str, ...]]]:
    return [(e.question, e.answers) for e in examples]


def _rag_eval(path: Path) -> Any:
    return _qa(load_examples(EvalJob(checkpoint=path.parent, questions=str(path), out_dir=path.parent / "out")))


def _rag_train(path: Path) -> Any:
    data = QADataModule(train_file=None, val_file=str(path))
    data.setup("validate")
    return _qa(data.splits["val"])


def _rag_score(path: Path) -> Any:
    """rag-score's reading of references: how many questions it scores (no predictions given)."""
    predictions = path.parent / "predictions.jsonl"
    predictions.write_text("", encoding="utf-8")
    return score_files(path, predictions)["num_total"]


def _check(outcome: Any, expected: Any, records: Any) -> None:
    if isinstance(expected, str):
        assert isinstance(outcome, str) and re.search(expected, outcome), outcome
    else:
        assert outcome == records, outcome


@pytest.mark.parametrize("name,variant", [(n, v) for n, table in QUESTION_TABLE.items() for v in table])
def test_question_readers_agree(tmp_path: Path, name: str, variant: str) -> None:
    data, expected = QUESTION_TABLE[name][variant]
    path = tmp_path / name
    path.write_bytes(data)
    outcomes = {command: _outcome(lambda: read(path))
                for command, read in (("rag-eval", _rag_eval), ("rag-train", _rag_train), ("rag-score", _rag_score))}
    if variant == "repeat":  # documented: training keeps a repeated question, scoring by question text cannot
        assert outcomes.pop("rag-train") == [*QA_RECORDS, QA_RECORDS[0]]
    if not isinstance(expected, str):  # rag-score reports the count it scores, the others the records
        assert outcomes.pop("rag-score") == len(expected)
    assert len(set(map(repr, outcomes.values()))) == 1, outcomes  # the very same records or message
    for outcome in outcomes.values():
        _check(outcome, expected, expected)


def _store_passages(path: Path) -> Any:
    store = PassageStore.build(path, path.parent / "store", progress=False)
    return [(p.id, p.title, p.text) for p in map(store.get, range(len(store)))]


@pytest.mark.parametrize("name,variant", [(n, v) for n, table in PASSAGE_TABLE.items() for v in table])
def test_passage_readers_agree(tmp_path: Path, name: str, variant: str) -> None:
    data, expected = PASSAGE_TABLE[name][variant]
    path = tmp_path / name
    path.write_bytes(data)
    build = _outcome(lambda: _store_passages(path))
    corpus = _outcome(lambda: [(p.id, p.title, p.text) for p in iter_passages(path)])
    if variant == "repeat":  # documented: iter_passages streams without an id set; the store refuses repeats
        assert corpus == [*PASSAGES, PASSAGES[0]]
        _check(build, expected, None)
        return
    assert build == corpus
    _check(build, expected, expected)


def test_source_target_pair_bom_crlf_and_bad_bytes(tmp_path: Path) -> None:
    """A BOM and CRLF in .source/.target are handled as in every other reader; bad bytes name the line."""
    (tmp_path / "q.source").write_bytes(BOM + b"who a\r\nwho b\r\n")
    (tmp_path / "q.target").write_bytes(BOM + b"x\r\ny\tz\r\n")
    path = tmp_path / "q.source"
    assert _rag_eval(path) == _rag_train(path) == QA_RECORDS and _rag_score(path) == 2
    (tmp_path / "q.target").write_bytes(b"x\n" + BAD_UTF8 + b"\n")
    messages = {_outcome(lambda: read(path)) for read in (_rag_eval, _rag_train, _rag_score)}
    assert len(messages) == 1 and "q.target, line 2: not valid UTF-8" in messages.pop()


def test_dpr_training_bom_and_crlf_in_both_layouts(tmp_path: Path) -> None:
    """read_dpr_training (DprDataModule's one reader) drops a BOM and accepts CRLF in .jsonl and .json alike."""
    record = ('{"question": "who a", "answers": ["x"], '
              '"positive_ctxs": [{"title": "A", "text": "t", "passage_id": "1"}]}')
    (tmp_path / "d.jsonl").write_bytes(BOM + (record + "\r\n").encode() * 2)
    (tmp_path / "d.json").write_bytes(BOM + f"[{record},\r\n{record}]\r\n".encode())
    examples = read_dpr_training(tmp_path / "d.jsonl")
    assert examples == read_dpr_training(tmp_path / "d.json") and len(examples) == 2
    assert examples[0].question == "who a" and examples[0].positives[0].id == "1"


# .source/.target: a variant changes both files of the pair; blank lines are not skipped there (lines must align).
SOURCE, TARGET = ["who a", "who b"], ["x", "y\tz"]
PAIR_TABLE: dict[str, tuple[bytes, bytes, Any]] = {
    "valid": (_lines(SOURCE), _lines(TARGET), QA_RECORDS),
    "empty line": (_lines(["who a", "", "who b"]), _lines(["x", "", "y\tz"]), r"q\.source, line 2: empty question"),
    "missing field": (_lines(SOURCE), _lines(TARGET[:1]),
                      r"q\.target, line 2: q\.source has 2 lines but q\.target has 1: q\.target is shorter"),
    "wrong type": (_lines(SOURCE), _lines(["x", "\t"]), r"q\.target, line 2: empty answer"),
    "repeat": (_lines([*SOURCE, "who a"]), _lines([*TARGET, "x"]), r"q\.source:3: the question repeats .*q\.source:1"),
    "BOM": (BOM + _lines(SOURCE), BOM + _lines(TARGET), QA_RECORDS),
    "CRLF": (_lines(SOURCE, "\r\n"), _lines(TARGET, "\r\n"), QA_RECORDS),
    "invalid UTF-8": (b"who a\n" + BAD_UTF8 + b"\n", _lines(TARGET), r"q\.source, line 2: not valid UTF-8"),
    "empty file": (b"", b"", r"q\.source: no questions in the file"),
}


@pytest.mark.parametrize("variant", list(PAIR_TABLE))
def test_source_target_readers_agree(tmp_path: Path, variant: str) -> None:
    """rag-eval, rag-train and rag-score read a .source/.target pair alike (named by its .source)."""
    source, target, expected = PAIR_TABLE[variant]
    (tmp_path / "q.source").write_bytes(source)
    (tmp_path / "q.target").write_bytes(target)
    path = tmp_path / "q.source"
    outcomes = {command: _outcome(lambda: read(path))
                for command, read in (("rag-eval", _rag_eval), ("rag-train", _rag_train), ("rag-score", _rag_score))}
    if variant == "repeat":  # documented: training keeps a repeated question, scoring by question text cannot
        assert outcomes.pop("rag-train") == [*QA_RECORDS, QA_RECORDS[0]]
    if not isinstance(expected, str):
        assert outcomes.pop("rag-score") == len(expected)
    assert len(set(map(repr, outcomes.values()))) == 1, outcomes
    for outcome in outcomes.values():
        _check(outcome, expected, expected)


def _dpr(question: str, answers: Any, pid: str) -> str:
    return json.dumps({"question": question, "answers": answers,
                       "positive_ctxs": [{"title": pid, "text": "t", "passage_id": pid}]})


DPR = [_dpr("who a", ["x"], "1"), _dpr("who b", ["y", "z"], "2")]
DPR_RECORDS = [("who a", ("x",), ("1",)), ("who b", ("y", "z"), ("2",))]
DPR_MISSING, DPR_WRONG = json.dumps({"answers": ["y"], "positive_ctxs": []}), _dpr("who b", "y", "2")
DPR_ERRORS = {"missing": "line {line}: missing key `question`", "wrong": "line {line}: `answers` must be a list",
              "empty": "no DPR training examples in the file"}


def _json_array(lines: bytes) -> bytes:
    """The .json layout of a .jsonl variant: the same objects, one a line, in one array (blank lines kept)."""
    if lines.startswith(BOM):  # the BOM stays the file's first bytes
        return BOM + _json_array(lines[len(BOM):])
    rows = lines.split(b"\n")[:-1]
    objects = [i for i, row in enumerate(rows) if row.strip()]
    if not objects:
        return lines
    ends = [b"\r" if row.endswith(b"\r") else b"" for row in rows]  # the comma goes before a CRLF's \r
    body = [row.rstrip(b"\r") + (b"," if i in objects[:-1] else b"") + end
            for i, (row, end) in enumerate(zip(rows, ends))]
    return b"[" + b"\n".join(body) + b"]\n"


DPR_JSONL = _variants(DPR, DPR_MISSING, DPR_WRONG, DPR[0], DPR_RECORDS,
                      {**DPR_ERRORS, "repeat": ""})  # repeat: documented below, kept
# .json: the same objects in one array, one a line; an item's error names its line and its index.
DPR_TABLE = {
    "d.jsonl": DPR_JSONL,
    "d.json": {variant: (_json_array(data), expected.replace("line 2: ", "line 2: item 1: ")
                         if isinstance(expected, str) and "UTF-8" not in expected else expected)
               for variant, (data, expected) in DPR_JSONL.items()},
}


def _dpr_train(path: Path) -> Any:
    """rag-train's DPR data module reading the file as its training file."""
    data = DprDataModule(train_file=str(path))
    data.setup("fit")
    return [(e.question, e.answers, tuple(p.id for p in e.positives)) for e in data.train_examples]


def _dpr_dev(path: Path) -> Any:
    """The same module reading it as its dev file (validation only)."""
    data = DprDataModule(train_file="unused.jsonl", dev_file=str(path))
    data.setup("validate")
    return [(e.question, e.answers, tuple(p.id for p in e.positives)) for e in data.dev_examples]


@pytest.mark.parametrize("name,variant", [(n, v) for n, table in DPR_TABLE.items() for v in table])
def test_dpr_training_readers_agree(tmp_path: Path, name: str, variant: str) -> None:
    data, expected = DPR_TABLE[name][variant]
    path = tmp_path / name
    path.write_bytes(data)
    outcomes = {command: _outcome(lambda: read(path)) for command, read in (("train", _dpr_train), ("dev", _dpr_dev))}
    assert outcomes["train"] == outcomes["dev"], outcomes
    if variant == "repeat":  # documented: DPR training files keep a repeated question (as DPR's own data does)
        assert outcomes["train"] == [*DPR_RECORDS, DPR_RECORDS[0]]
        return
    _check(outcomes["train"], expected, expected)


PREDICTIONS = ['{"question": "who a", "prediction": "x"}', '{"question": "who b", "prediction": "y"}']
PREDICTION_TABLE = _variants(
    PREDICTIONS, '{"question": "who b"}', '{"question": "who b", "prediction": ["y"]}', PREDICTIONS[0],
    {"who a": "x", "who b": "y"},
    {"missing": "line {line}: missing key `prediction`", "wrong": "line {line}: `prediction` must be a string",
     "repeat": r"line {line}: duplicate prediction for 'who a' \(first on line 1\)", "empty": ""})
PREDICTION_TABLE["empty file"] = (b"", {})  # documented: no predictions; every reference counts as missing


@pytest.mark.parametrize("variant", list(PREDICTION_TABLE))
def test_prediction_reader_table(tmp_path: Path, variant: str) -> None:
    """rag-score's predictions (its one reader): the documented outcome per variant, through score_files too."""
    data, expected = PREDICTION_TABLE[variant]
    references, path = tmp_path / "q.jsonl", tmp_path / "p.jsonl"
    references.write_bytes(_lines(NQ))
    path.write_bytes(data)
    outcome = _outcome(lambda: read_predictions(path))
    _check(outcome, expected, expected)
    scores = _outcome(lambda: score_files(references, path))
    if isinstance(expected, str):
        assert scores == outcome and f"{path}, line" in outcome  # names the file and line
    else:
        assert (scores["num_correct"], scores["missing_predictions"]) == (len(expected), 2 - len(expected))


BLANK_AND_LONG = {  # passages 2 and 3 have no text (3 not even a title), passage 4 lost its line breaks
    "p.tsv": [*TSV, "3\t\tC", "4\t \t ", "5\t" + "word " * 30_000 + "\tE"],
    "p.jsonl": [*PJ, '{"id": "3", "title": "C", "text": ""}', '{"id": "4", "title": " ", "text": " "}',
                json.dumps({"id": "5", "title": "E", "text": "word " * 30_000})],
}


@pytest.mark.parametrize("name", list(BLANK_AND_LONG))
def test_blank_and_long_passages_warn_alike(tmp_path: Path, name: str) -> None:
    """Every passage reader keeps blank passages (row ids follow the file) with one warning giving their count and
    lines, warns about a passage of 150,000 characters by line; the store records how many are blank."""
    path = tmp_path / name
    path.write_bytes(_lines(BLANK_AND_LONG[name]))
    first = 2 if name == "p.tsv" else 1  # line of passage 1
    messages = {}
    for command, read in (("rag-build-index", _store_passages), ("corpus", lambda p: list(iter_passages(p)))):
        with pytest.warns(UserWarning) as caught:
            records = read(path)
        assert len(records) == 5  # nothing dropped
        messages[command] = sorted(str(w.message) for w in caught if name in str(w.message))
    assert messages["rag-build-index"] == messages["corpus"]
    long_warning, blank_warning = messages["corpus"]
    assert f"line {first + 4}: a passage of 150,001 characters" in long_warning
    assert f"2 passage(s) with an empty text (line {first + 2}, {first + 3})" in blank_warning
    assert PassageStore.open(tmp_path / "store").meta["blank_texts"] == 2


REFERENCE_FILES = {  # the same two questions in every reference format; each file starts with a BOM
    "q.jsonl": {"q.jsonl": _lines(NQ)},
    "q.csv": {"q.csv": _lines(CSV)},
    "q.source": {"q.source": _lines(["who a", "who b"]), "q.target": _lines(["x", "y\tz"])},
}


@pytest.mark.parametrize("name", list(REFERENCE_FILES))
@pytest.mark.parametrize("bom_in", ["references", "predictions", "both"])
def test_perfect_predictions_score_one_whatever_the_bom(tmp_path: Path, name: str, bom_in: str) -> None:
    """rag-score: perfect predictions over a BOM'd reference file (or BOM'd predictions) score EM 1.0, not 0.5."""
    for file_name, data in REFERENCE_FILES[name].items():
        (tmp_path / file_name).write_bytes((BOM if bom_in != "predictions" else b"") + data)
    (tmp_path / "p.jsonl").write_bytes((BOM if bom_in != "references" else b"") + _lines(PREDICTIONS))
    metrics = score_files(tmp_path / name, tmp_path / "p.jsonl")
    assert metrics["exact_match"] == 1.0 and metrics["num_total"] == 2, metrics
