"""Passage files: DPR TSV and JSONL round trips, quoting, streaming, and every malformed-input error."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest

from conftest import write_passages_jsonl
from index.passage_files import Passage, iter_passages, passage_format, write_passages_tsv
from rag_models.errors import InputError

TRICKY = [
    Passage(id="1", title="Aaron", text="Aaron is a prophet, high priest, and the brother of Moses."),
    Passage(id="2", title='The "Boss"', text='He said "hi" to them'),
    Passage(id="3", title="Quoted", text='"entirely quoted"'),
    Passage(id="17", title="", text="no title, unicode: Zürich – 東京"),
]


def _write(path: Path, text: str) -> Path:
    """Write raw text (UTF-8, gzip for .gz) for the reader to meet."""
    data = text.encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


@pytest.mark.parametrize("name", ["psgs.tsv", "psgs.tsv.gz", "psgs.jsonl", "psgs.jsonl.gz"])
def test_round_trip_keeps_every_field(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    writer = write_passages_tsv if "tsv" in name else write_passages_jsonl
    assert writer(iter(TRICKY), path) == len(TRICKY)
    assert list(iter_passages(path)) == TRICKY
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left behind


def test_reads_dpr_psgs_w100_layout_with_quotes(tmp_path: Path) -> None:
    # The first lines of DPR's file look like this: quoted text, `""` for a quote inside.
    path = _write(
        tmp_path / "psgs_w100.tsv",
        'id\ttext\ttitle\n'
        '1\t"Aaron Aaron ( or ; ""Ahärôn"") is a prophet"\tAaron\n'
        '2\tplain text without quotes\t"Title, with comma"\n',
    )
    passages = list(iter_passages(path))
    assert passages[0] == Passage(id="1", title="Aaron", text='Aaron Aaron ( or ; "Ahärôn") is a prophet')
    assert passages[1] == Passage(id="2", title="Title, with comma", text="plain text without quotes")


def test_columns_are_found_by_header_name(tmp_path: Path) -> None:
    content = "title\tscore\tid\ttext\r\nT1\t0.5\t10\tsome text\r\n\nT2\t0.1\t11\tmore\r\n"
    path = _write(tmp_path / "p.tsv", content)
    assert list(iter_passages(path)) == [
        Passage(id="10", title="T1", text="some text"),
        Passage(id="11", title="T2", text="more"),
    ]


def test_jsonl_integer_ids_become_strings(tmp_path: Path) -> None:
    content = '{"id": 7, "title": "A", "text": "x", "extra": 1}\n\n{"id": "b", "title": "B", "text": "y"}\n'
    path = _write(tmp_path / "p.jsonl", content)
    assert [p.id for p in iter_passages(path)] == ["7", "b"]


def test_tsv_writer_turns_tabs_and_newlines_into_spaces(tmp_path: Path) -> None:
    path = tmp_path / "p.tsv"
    write_passages_tsv([Passage(id="1", title="a\tb", text="line one\nline two\r\nthree")], path)
    assert list(iter_passages(path)) == [Passage(id="1", title="a b", text="line one line two three")]


def test_reader_streams_instead_of_loading_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.tsv", "id\ttext\ttitle\n1\tfine\tA\n2\tbroken line\n")
    passages = iter_passages(path)
    assert next(passages) == Passage(id="1", title="A", text="fine")  # served before the bad line is seen
    with pytest.raises(InputError, match="line 3"):
        next(passages)


BAD_FILES = {
    "missing column": ("p.tsv", "id\ttext\n1\tx\n", r"p\.tsv, line 1: header lacks column\(s\) title"),
    "duplicate column": ("p.tsv", "id\ttext\ttitle\tid\n", r"line 1: column `id` appears twice"),
    "repeated header": ("p.tsv", "id\ttext\ttitle\n1\tx\tA\nid\ttext\ttitle\n",
                        r"line 3: the header line appears again"),
    "wrong field count": ("p.tsv", "id\ttext\ttitle\n1\tx\tA\n2\tx\ty\tz\n",
                          r"line 3: 4 tab-separated fields, the header has 3"),
    "empty id tsv": ("p.tsv", "id\ttext\ttitle\n \tx\tA\n", r"line 2: empty passage id"),
    "empty file": ("p.tsv", "", r"the file is empty"),
    "bad json": ("p.jsonl", '{"id": 1, "title": "A", "text": "x"}\n{"id": 2, "title": \n', r"line 2: bad JSON"),
    "not an object": ("p.jsonl", "[1, 2]\n", r"line 1: expected a JSON object"),
    "missing key": ("p.jsonl", '{"id": 1, "text": "x"}\n', r"line 1: missing key `title`"),
    "empty id jsonl": ("p.jsonl", '{"id": "", "title": "A", "text": "x"}\n', r"line 1: empty passage id"),
    "bad id type": ("p.jsonl", '{"id": [1], "title": "A", "text": "x"}\n', r"`id` must be a string or an integer"),
    "bad text type": ("p.jsonl", '{"id": 1, "title": "A", "text": null}\n', r"`text` must be a string"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_malformed_files_raise_input_error_with_file_and_line(tmp_path: Path, case: str) -> None:
    name, content, pattern = BAD_FILES[case]
    path = _write(tmp_path / name, content)
    with pytest.raises(InputError, match=pattern) as info:
        list(iter_passages(path))
    assert info.value.path == str(path)


def test_unreadable_inputs(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="file not found"):
        list(iter_passages(tmp_path / "absent.tsv"))
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(InputError, match="cannot open"):
        list(iter_passages(tmp_path / "dir.jsonl"))
    (tmp_path / "latin1.tsv").write_bytes("id\ttext\ttitle\n1\tcaf\xe9\tA\n".encode("latin-1"))
    with pytest.raises(InputError, match="line 2: not valid UTF-8"):
        list(iter_passages(tmp_path / "latin1.tsv"))
    (tmp_path / "fake.tsv.gz").write_bytes(b"id\ttext\ttitle\n")
    with pytest.raises(InputError, match="cannot read the file"):
        list(iter_passages(tmp_path / "fake.tsv.gz"))
    with pytest.raises(InputError, match="unknown passage file type"):
        passage_format(tmp_path / "psgs.csv")


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "p.tsv"
    write_passages_tsv(TRICKY, path)
    before = path.read_bytes()

    def passages_then_crash():
        yield TRICKY[0]
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_passages_tsv(passages_then_crash(), path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["p.tsv"]


def test_gzip_output_is_byte_identical_between_runs(tmp_path: Path) -> None:
    write_passages_tsv(TRICKY, tmp_path / "a.tsv.gz")
    write_passages_tsv(TRICKY, tmp_path / "b.tsv.gz")
    assert (tmp_path / "a.tsv.gz").read_bytes() == (tmp_path / "b.tsv.gz").read_bytes()
