"""Question readers: real NQ-Open dev, DPR csv, .source/.target, hub rows, DPR training files, and their errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import require_nq_dev
from index.passage_files import Passage
from rag_models.errors import InputError
from training.data.questions import (
    DprExample,
    QAExample,
    examples_from_records,
    read_dpr_training,
    read_questions,
    write_dpr_training_jsonl,
    write_questions_jsonl,
)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_reads_all_of_the_real_nq_open_dev_file() -> None:
    examples = read_questions(require_nq_dev())
    assert len(examples) == 3610
    assert all(len(e.answers) >= 1 and all(a.strip() for a in e.answers) for e in examples)
    assert examples[0] == QAExample("when was the last time anyone was on the moon",
                                    ("14 December 1972 UTC", "December 1972"))
    assert examples[-1].question and examples[-1].positive_ids == ()


def test_nq_jsonl_ignores_extra_keys_and_exposes_demo_fields(tmp_path: Path) -> None:
    path = _write(tmp_path / "q.jsonl",
                  '{"question": "who?", "answer": ["A", "B"], "id": 3}\n\n'
                  '{"question": "where?", "answer": ["X"], "passage_id": 17, "stale_answer": ["Y"]}\n')
    assert read_questions(path) == [
        QAExample("who?", ("A", "B")),
        QAExample("where?", ("X",), positive_ids=("17",), stale_answers=("Y",)),
    ]


@pytest.mark.parametrize("name", ["q.jsonl", "q.jsonl.gz"])
def test_write_then_read_round_trip(tmp_path: Path, name: str) -> None:
    examples = [
        QAExample("q1", ("a",)),
        QAExample("q2 with ünïcode", ("b", "c"), positive_ids=("5",), stale_answers=("d",)),
        QAExample("q3", ("e",), positive_ids=("1", "2")),
    ]
    assert write_questions_jsonl(examples, tmp_path / name) == 3
    assert read_questions(tmp_path / name) == examples
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_dpr_csv_answers_are_python_literals(tmp_path: Path) -> None:
    path = _write(tmp_path / "nq-test.csv",
                  "who got the first nobel prize in physics\t['Wilhelm Conrad Röntgen']\n"
                  "who said it\t[\"Bob's\", 'O\\'Neil']\n"
                  '"who sings ""does he love me"" with reba"\t[\'Linda Davis\']\n')
    assert read_questions(path) == [
        QAExample("who got the first nobel prize in physics", ("Wilhelm Conrad Röntgen",)),
        QAExample("who said it", ("Bob's", "O'Neil")),
        QAExample('who sings "does he love me" with reba', ("Linda Davis",)),
    ]


def test_dpr_csv_never_evaluates_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = _write(tmp_path / "q.csv", f"q\t__import__('pathlib').Path({str(marker)!r}).touch()\n")
    with pytest.raises(InputError, match="line 1: answer list is not a list literal"):
        read_questions(path)
    assert not marker.exists()


def _pair(tmp_path: Path, questions: str, answers: str) -> Path:
    _write(tmp_path / "val.source", questions)
    _write(tmp_path / "val.target", answers)
    return tmp_path / "val"


def test_source_target_pair_from_either_file_prefix_or_directory(tmp_path: Path) -> None:
    prefix = _pair(tmp_path, "who is a?\nwhere is b?\n", "Ann\tAnnie\nBerlin\n")
    expected = [QAExample("who is a?", ("Ann", "Annie")), QAExample("where is b?", ("Berlin",))]
    for source in (prefix.with_suffix(".source"), prefix.with_suffix(".target"), prefix, str(prefix), tmp_path):
        assert read_questions(source, split="validation") == expected


def test_source_target_length_mismatch_names_the_shorter_file(tmp_path: Path) -> None:
    prefix = _pair(tmp_path, "q1\nq2\nq3\n", "a1\na2\n")
    with pytest.raises(InputError, match=r"val\.target, line 3: .*val\.target is shorter") as info:
        read_questions(prefix)
    assert info.value.path == str(tmp_path / "val.target")
    _pair(tmp_path, "q1\n", "a1\na2\n")
    with pytest.raises(InputError, match=r"val\.source is shorter"):
        read_questions(prefix)


def test_blank_target_line_is_reported(tmp_path: Path) -> None:
    prefix = _pair(tmp_path, "q1\nq2\n", "a1\n\n")
    with pytest.raises(InputError, match=r"val\.target, line 2: empty answer"):
        read_questions(prefix)


BAD_QUESTION_FILES = {
    "bad json": ("q.jsonl", '{"question": "a", "answer": ["b"]}\n{"question": \n', r"line 2: bad JSON"),
    "missing question": ("q.jsonl", '{"answer": ["b"]}\n', r"line 1: missing key `question`"),
    "missing answer": ("q.jsonl", '{"question": "a"}\n', r"line 1: missing key `answer`"),
    "empty answers": ("q.jsonl", '{"question": "a", "answer": []}\n', r"line 1: `answer` is an empty list"),
    "answer not list": ("q.jsonl", '{"question": "a", "answer": "b"}\n',
                        r"line 1: `answer` must be a list of strings"),
    "answer not str": ("q.jsonl", '{"question": "a", "answer": [1]}\n', r"`answer` must be a list of strings"),
    "csv fields": ("q.csv", "only a question\n", r"line 1: 1 tab-separated fields, expected 2"),
    "csv empty list": ("q.csv", "q\t[]\n", r"line 1: `answers` is an empty list"),
    "unknown suffix": ("q.txt", "hello\n", r"unknown question file type"),
}


@pytest.mark.parametrize("case", sorted(BAD_QUESTION_FILES))
def test_malformed_question_files(tmp_path: Path, case: str) -> None:
    name, content, pattern = BAD_QUESTION_FILES[case]
    path = _write(tmp_path / name, content)
    with pytest.raises(InputError, match=pattern) as info:
        read_questions(path)
    assert info.value.path == str(path)


def test_missing_or_unreadable_question_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="file not found"):
        read_questions(tmp_path / "absent.jsonl")
    with pytest.raises(InputError, match="file not found"):
        read_questions(tmp_path / "absent")
    (tmp_path / "latin.csv").write_bytes("caf\xe9\t['a']\n".encode("latin-1"))
    with pytest.raises(InputError, match="line 1: not valid UTF-8"):
        read_questions(tmp_path / "latin.csv")


def test_hub_offline_gives_an_actionable_error() -> None:
    with pytest.raises(InputError, match=r"setting `hf:nq_open`: .*unreachable.*HF_DATASETS_OFFLINE=0"):
        read_questions("hf:nq_open")
    with pytest.raises(InputError, match=r"no dataset name"):
        read_questions("hf:")


def test_hub_rows_of_nq_open_and_trivia_qa_shapes() -> None:
    import datasets

    nq = datasets.Dataset.from_dict({"question": ["who?"], "answer": [["A", "B"]]})
    assert examples_from_records(nq, where="hf:nq_open") == [QAExample("who?", ("A", "B"))]
    trivia = datasets.Dataset.from_dict({
        "question": ["which?"],
        "answer": [{"value": "Paris", "aliases": ["Paris", "Paree"], "normalized_value": "paris"}],
    })
    assert examples_from_records(trivia, where="hf:trivia_qa") == [QAExample("which?", ("Paris", "Paree"))]
    with pytest.raises(InputError, match=r"hf:x: row 1: `answer` is an empty list"):
        examples_from_records([{"question": "a", "answer": ["b"]}, {"question": "c", "answer": []}], where="hf:x")


def _ctx(pid: str, title: str, text: str) -> dict[str, str]:
    return {"title": title, "text": text, "passage_id": pid, "score": "1.0"}


DPR_RECORDS = [
    {"question": "who?", "answers": ["Ann"], "positive_ctxs": [_ctx("1", "A", "Ann did it")],
     "hard_negative_ctxs": [_ctx("2", "B", "Bob did not"), _ctx("3", "C", "Cy neither")], "negative_ctxs": []},
    {"question": "no positive", "answers": ["x"], "positive_ctxs": [], "hard_negative_ctxs": []},
]
FIRST = DprExample("who?", ("Ann",), positives=(Passage("1", "A", "Ann did it"),),
                   hard_negatives=(Passage("2", "B", "Bob did not"), Passage("3", "C", "Cy neither")))


def test_dpr_training_array_and_jsonl(tmp_path: Path) -> None:
    array = _write(tmp_path / "biencoder-nq-dev.json", json.dumps(DPR_RECORDS, indent=4))
    lines = _write(tmp_path / "train.jsonl", "".join(json.dumps(r) + "\n" for r in DPR_RECORDS))
    for path in (array, lines):
        assert read_dpr_training(path) == [FIRST]  # DPR drops questions without a positive
        assert len(read_dpr_training(path, drop_without_positives=False)) == 2
    assert write_dpr_training_jsonl([FIRST], tmp_path / "out.jsonl") == 1
    assert read_dpr_training(tmp_path / "out.jsonl") == [FIRST]


def test_dpr_training_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"line 3: bad JSON"):
        read_dpr_training(_write(tmp_path / "a.json", '[\n{"question": "q",\n ]'))
    with pytest.raises(InputError, match=r"line 1: expected a JSON array"):
        read_dpr_training(_write(tmp_path / "b.json", '{"question": "q"}'))
    bad_ctx = dict(DPR_RECORDS[0], positive_ctxs=[{"title": "no text"}])
    with pytest.raises(InputError, match=r"item 0: positive_ctxs: a ctx must be an object"):
        read_dpr_training(_write(tmp_path / "c.json", json.dumps([bad_ctx])))
    with pytest.raises(InputError, match=r"line 2: missing key `question`"):
        read_dpr_training(_write(tmp_path / "d.jsonl", json.dumps(DPR_RECORDS[0]) + '\n{"answers": []}\n'))
    with pytest.raises(InputError, match="file not found"):
        read_dpr_training(tmp_path / "absent.json")
    with pytest.raises(InputError, match="unknown DPR training file type"):
        read_dpr_training(tmp_path / "x.csv")
