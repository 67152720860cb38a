"""Passage files on disk: read DPR's ``psgs_w100.tsv`` and JSONL, write the TSV atomically.

Readers stream one line at a time (the Wikipedia corpus has 21M passages) and
raise :class:`InputError` naming the file and line of anything malformed.
Files are opened in binary and split on ``\\n`` only, so a stray ``\\r`` inside
a passage never splits it; each line is decoded on its own.
"""
from __future__ import annotations

import gzip
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from rag_models.atomic import atomic_text_writer
from rag_models.errors import InputError

TSV_COLUMNS = ("id", "text", "title")
_TSV_SUFFIXES = (".tsv", ".tsv.gz")
_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
LONG_PASSAGE_CHARS = 100_000  # a 100-word passage is ~600 characters: a line this long lost its line structure
_SHOWN_LINES = 10  # line numbers listed in a warning


@dataclass(frozen=True)
class Passage:
    """One retrievable unit: an id (kept as a string), a title, a text and, optionally, where it came from.

    ``source`` names the passage's origin for people (e.g. ``notes/report.pdf#page=3``); "" when unknown.
    DPR's TSV and JSONL files carry none; `index.documents` fills it.
    """

    id: str
    title: str
    text: str
    source: str = ""


def passage_format(path: str | Path) -> str:
    """``"tsv"`` or ``"jsonl"`` from the file name, else InputError."""
    name = Path(path).name.lower()
    if name.endswith(_TSV_SUFFIXES):
        return "tsv"
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    raise InputError(
        "unknown passage file type",
        path=path,
        fix="Name it *.tsv / *.tsv.gz (DPR psgs_w100 format: id, text, title) or *.jsonl / *.jsonl.gz",
    )


def iter_passages(path: str | Path) -> Iterator[Passage]:
    """Stream the passages of a DPR TSV or a JSONL file (format chosen by suffix): the one passage reader.

    Lines are read by :func:`iter_lines` (BOM dropped, CRLF accepted, blank lines skipped); an empty file
    raises. Repeated ids are not checked here (a 21M-passage set would not fit): ``PassageStore`` refuses them.
    Passages with a blank text are kept (row ids follow the file) with one warning giving their count and
    first lines; a passage over ``LONG_PASSAGE_CHARS`` warns by line (encoders cut it before tokenizing).
    """
    reader = _iter_tsv if passage_format(path) == "tsv" else _iter_jsonl
    return _flag_records(Path(path), reader(Path(path)))


def _flag_records(path: Path, records: Iterator[tuple[int, Passage]]) -> Iterator[Passage]:
    """The passages of ``records`` ((line, passage) pairs), warning about blank and absurdly long ones."""
    blank: list[int] = []
    for number, passage in records:
        if not passage.text.strip():
            blank.append(number)
        size = len(passage.title) + len(passage.text)
        if size > LONG_PASSAGE_CHARS:
            warnings.warn(f"{path}, line {number}: a passage of {size:,} characters (id {passage.id!r}): only its "
                          "beginning is encoded and read (the models' max_length); the file probably lost its "
                          "line breaks", stacklevel=2)
        yield passage
    if blank:
        shown = ", ".join(map(str, blank[:_SHOWN_LINES])) + (", ..." if len(blank) > _SHOWN_LINES else "")
        warnings.warn(f"{path}: {len(blank)} passage(s) with an empty text (line {shown}): kept, so that row ids "
                      "follow the file, but they can be retrieved while saying nothing; drop or fill them",
                      stacklevel=2)


def iter_lines(path: str | Path, *, skip_blank: bool = True) -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded line without its end) for a text or ``.gz`` file.

    Every reader of questions, references, predictions, passages and DPR training files goes through here,
    so they all treat a file the same way: a UTF-8 byte-order mark at the start is dropped (Windows editors
    write one), ``\r\n`` line ends are accepted, blank lines are skipped unless ``skip_blank`` is False
    (line-aligned files need them), and bytes that are not UTF-8 raise InputError naming the file and line.
    """
    path = Path(path)
    try:
        raw = gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")
    except FileNotFoundError:
        raise InputError("file not found", path=path, fix="Check the path") from None
    except (IsADirectoryError, PermissionError) as err:
        raise InputError(f"cannot open the file ({err.strerror})", path=path, fix="Pass a readable file") from None
    with raw:
        number = 0
        try:
            for number, data in enumerate(raw, start=1):
                line = data.rstrip(b"\n").rstrip(b"\r").decode("utf-8")
                if number == 1:
                    line = line.removeprefix("\ufeff")
                if line.strip() or not skip_blank:
                    yield number, line
        except UnicodeDecodeError:
            raise InputError("not valid UTF-8", path=path, line=number,
                             fix="Re-encode the file as UTF-8") from None
        except (gzip.BadGzipFile, EOFError, OSError) as err:
            raise InputError(f"cannot read the file ({err})", path=path, line=number + 1,
                             fix="The file is truncated or not gzip; re-create it") from None


def _unquote(field: str) -> str:
    """DPR's csv writer wraps some fields in double quotes and doubles inner quotes: undo that."""
    if len(field) >= 2 and field[0] == '"' and field[-1] == '"':
        return field[1:-1].replace('""', '"')
    return field


def _tsv_header(path: Path, number: int, line: str) -> tuple[dict[str, int], int]:
    """(column name -> position, number of columns), checking that id, text and title are each present once."""
    names = [name.strip() for name in line.split("\t")]
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise InputError(f"column `{name}` appears twice in the header", path=path, line=number,
                             fix="Keep one column per name: id, text, title")
        seen.add(name)
    missing = [name for name in TSV_COLUMNS if name not in seen]
    if missing:
        raise InputError(
            f"header lacks column(s) {', '.join(missing)} (found: {', '.join(names)})",
            path=path,
            line=number,
            fix="The first line must name the columns, e.g. `id<TAB>text<TAB>title` as in DPR's psgs_w100.tsv",
        )
    return {name: names.index(name) for name in TSV_COLUMNS}, len(names)


def _iter_tsv(path: Path) -> Iterator[tuple[int, Passage]]:
    """Passages of a DPR-style TSV; columns located by the header's names."""
    columns: dict[str, int] | None = None
    header_line, n_columns = "", 0
    for number, line in iter_lines(path):
        if columns is None:
            (columns, n_columns), header_line = _tsv_header(path, number, line), line
            continue
        if line == header_line:
            raise InputError("the header line appears again", path=path, line=number,
                             fix="Files were probably concatenated; drop the repeated header lines")
        fields = line.split("\t")
        if len(fields) != n_columns:
            raise InputError(
                f"{len(fields)} tab-separated fields, the header has {n_columns}",
                path=path,
                line=number,
                fix="Each line needs exactly one value per header column; tabs inside a text are not allowed",
            )
        pid = _unquote(fields[columns["id"]]).strip()
        if not pid:
            raise InputError("empty passage id", path=path, line=number, fix="Give every passage a unique id")
        yield number, Passage(id=pid, title=_unquote(fields[columns["title"]]),
                              text=_unquote(fields[columns["text"]]))
    if columns is None:
        raise InputError("the file is empty (no header line)", path=path,
                         fix="The first line must be `id<TAB>text<TAB>title`")


def _jsonl_passage(path: Path, number: int, line: str) -> Passage:
    """One JSONL record -> Passage, or InputError naming the line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"bad JSON ({err.msg}, column {err.colno})", path=path, line=number,
                         fix='Each line must be one object {"id": ..., "title": ..., "text": ...}') from None
    if not isinstance(record, dict):
        raise InputError(f"expected a JSON object, got {type(record).__name__}", path=path, line=number,
                         fix='Each line must be one object {"id": ..., "title": ..., "text": ...}')
    for key in ("id", "title", "text"):
        if key not in record:
            raise InputError(f"missing key `{key}`", path=path, line=number,
                             fix='Each object needs "id", "title" and "text"')
    pid = record["id"]
    if isinstance(pid, bool) or not isinstance(pid, (int, str)):
        raise InputError(f"`id` must be a string or an integer, got {type(pid).__name__}", path=path, line=number)
    pid = str(pid).strip()
    if not pid:
        raise InputError("empty passage id", path=path, line=number, fix="Give every passage a unique id")
    for key in ("title", "text"):
        if not isinstance(record[key], str):
            raise InputError(f"`{key}` must be a string, got {type(record[key]).__name__}", path=path, line=number)
    return Passage(id=pid, title=record["title"], text=record["text"])


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Passage]]:
    """Passages of a JSONL file, one object a line; an empty file is an InputError, as for the TSV."""
    number = 0
    for number, line in iter_lines(path):
        yield number, _jsonl_passage(path, number, line)
    if number == 0:
        raise InputError("the file holds no passages", path=path,
                         fix='Write one object {"id": ..., "title": ..., "text": ...} a line')


def _quote(field: str) -> str:
    """Single-line TSV field: tabs / newlines become spaces; fields with quotes get DPR's csv quoting."""
    field = field.replace("\r\n", " ").replace("\t", " ").replace("\n", " ").replace("\r", " ")
    if '"' in field:
        return '"' + field.replace('"', '""') + '"'
    return field


def write_passages_tsv(passages: Iterable[Passage], path: str | Path) -> int:
    """Write DPR's ``id \\t text \\t title`` format with a header, atomically; returns the count.

    TSV cannot hold tabs or line breaks inside a field: they are written as spaces
    (use JSONL to keep them).
    """
    count = 0
    with atomic_text_writer(path) as out:
        out.write("\t".join(TSV_COLUMNS) + "\n")
        for passage in passages:
            if not passage.id.strip():
                raise InputError(f"passage number {count + 1} has an empty id", path=path,
                                 fix="Give every passage a unique id")
            out.write(f"{_quote(passage.id)}\t{_quote(passage.text)}\t{_quote(passage.title)}\n")
            count += 1
    return count
