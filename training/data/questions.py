"""Question-answer data: NQ-Open JSONL, DPR question CSV, .source/.target pairs, the HF hub, DPR training files.

Every reader returns plain frozen dataclasses and raises :class:`InputError`
naming the file and line (or the setting) of anything malformed.
"""
from __future__ import annotations

import ast
import csv
import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from index.passage_files import Passage, iter_lines
from rag_models.atomic import atomic_text_writer
from rag_models.errors import InputError

NQ_FIX = 'Each line must be one object {"question": "...", "answer": ["...", ...]}'
# Names a .source/.target directory may use for a split (HF's seq2seq scripts write val.source).
SPLIT_FILE_NAMES = {"validation": ("validation", "val", "dev"), "train": ("train",), "test": ("test",)}


@dataclass(frozen=True)
class QAExample:
    """One question with its accepted answers.

    Fields:
        question: the question text, stripped, non-empty.
        answers: the accepted answers, at least one, each a non-empty string; the first is the training
            target with ``data.answers=first`` and the target of val / test batches.
        positive_ids: the gold passage ids when the file knows them (the demo world); () otherwise.
        stale_answers: the answers before the world changed (the demo world's v2); () otherwise.
        line: its 1-based line in the file it was read from (the .source file of a pair), for messages
            that name one question; None for hub rows and examples built in code. Not compared.
    """

    question: str
    answers: tuple[str, ...]
    positive_ids: tuple[str, ...] = ()
    stale_answers: tuple[str, ...] = ()
    line: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class DprExample:
    """One retriever-training example of DPR's format: positives, hard negatives, random negatives.

    Fields:
        question: the question text, stripped, non-empty.
        answers: the file's answers (may be empty: DPR training does not read them).
        positives: the gold passages (``positive_ctxs``); `read_dpr_training` drops examples without one.
        hard_negatives: passages that look relevant but do not answer (``hard_negative_ctxs``; DPR's are BM25
            hits without the answer), in file order.
        negatives: random negatives (``negative_ctxs``); only the pooled dev corpus uses them here.
    """

    question: str
    answers: tuple[str, ...]
    positives: tuple[Passage, ...]
    hard_negatives: tuple[Passage, ...] = ()
    negatives: tuple[Passage, ...] = ()


def _answers(value: Any, *, path: str | Path, line: int | None, key: str, allow_empty: bool = False,
             where: str = "") -> tuple[str, ...]:
    """Validate a list of non-empty answer strings; InputError naming file and line otherwise."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(a, str) for a in value):
        raise InputError(f"{where}`{key}` must be a list of strings, got {json.dumps(value)[:80]}", path=path,
                         line=line, fix=f'Write it as "{key}": ["first answer", "another"]')
    if not value and not allow_empty:
        raise InputError(f"{where}`{key}` is an empty list", path=path, line=line,
                         fix="Give at least one answer, or drop the question")
    if any(not a.strip() for a in value):
        raise InputError(f"{where}`{key}` holds an empty string", path=path, line=line, fix="Remove empty answers")
    return tuple(value)


def _json_record(path: Path, number: int, line: str, fix: str) -> dict[str, Any]:
    """Parse one JSONL line into an object, or InputError."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"bad JSON ({err.msg}, column {err.colno})", path=path, line=number, fix=fix) from None
    if not isinstance(record, dict):
        raise InputError(f"expected a JSON object, got {type(record).__name__}", path=path, line=number, fix=fix)
    return record


def _question(record: dict[str, Any], *, path: str | Path, line: int | None, where: str = "") -> str:
    """The non-empty ``question`` string of a record."""
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        problem = "missing key `question`" if question is None else "`question` must be a non-empty string"
        raise InputError(where + problem, path=path, line=line, fix=NQ_FIX)
    return question.strip()


def _ids(record: dict[str, Any]) -> tuple[str, ...]:
    """Gold passage ids from the extra keys ``passage_id`` (one) or ``positive_ids`` (several)."""
    if "passage_id" in record:
        return (str(record["passage_id"]),)
    return tuple(str(i) for i in record.get("positive_ids", ()))


def _read_nq_jsonl(path: Path, split: str) -> list[QAExample]:
    """NQ-Open JSONL: ``{"question", "answer": [...]}`` a line; other keys ignored."""
    examples = []
    for number, line in iter_lines(path):
        record = _json_record(path, number, line, NQ_FIX)
        question = _question(record, path=path, line=number)
        key = "answer" if "answer" in record else "answers"
        if key not in record:
            raise InputError("missing key `answer`", path=path, line=number, fix=NQ_FIX)
        answers = _answers(record[key], path=path, line=number, key=key)
        stale = record.get("stale_answer", [])
        stale = _answers(stale, path=path, line=number, key="stale_answer", allow_empty=True)
        examples.append(QAExample(question, answers, positive_ids=_ids(record), stale_answers=stale,
                                  line=number))
    return examples


def _read_dpr_csv(path: Path, split: str) -> list[QAExample]:
    """DPR's ``nq-test.csv``: ``question \\t ['a', 'b']``, no header; the list is a Python literal."""
    fix = "Each line must be `question<TAB>['answer one', 'answer two']` (DPR's qas format)"
    examples = []
    for number, line in iter_lines(path):
        fields = next(csv.reader([line], delimiter="\t"))
        if len(fields) != 2:
            raise InputError(f"{len(fields)} tab-separated fields, expected 2", path=path, line=number, fix=fix)
        question, literal = fields[0].strip(), fields[1].strip()
        if not question:
            raise InputError("empty question", path=path, line=number, fix=fix)
        try:
            value = ast.literal_eval(literal)  # never eval: the file is data
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise InputError(f"answer list is not a list literal: {literal[:80]}", path=path, line=number,
                             fix=fix) from None
        examples.append(QAExample(question, _answers(value, path=path, line=number, key="answers"), line=number))
    return examples


def _pair_paths(path: Path, split: str) -> tuple[Path, Path]:
    """(.source, .target) from either file, their common prefix, or a directory holding ``{split}.source``."""
    if path.is_dir():
        for name in SPLIT_FILE_NAMES.get(split, (split,)):
            if (path / f"{name}.source").is_file():
                return path / f"{name}.source", path / f"{name}.target"
        raise InputError(f"no {split}.source file in the directory", path=path,
                         fix=f"Add {split}.source and {split}.target, or pass another split / a file")
    if path.suffix in (".source", ".target"):
        return path.with_suffix(".source"), path.with_suffix(".target")
    return path.with_name(path.name + ".source"), path.with_name(path.name + ".target")


def _read_pair(path: Path, split: str) -> list[QAExample]:
    """Line-aligned ``.source`` (questions) and ``.target`` (answers, tab-separated when several)."""
    source, target = _pair_paths(path, split)
    questions = [line for _, line in iter_lines(source, skip_blank=False)]
    targets = [line for _, line in iter_lines(target, skip_blank=False)]
    if len(questions) != len(targets):
        shorter, longer = (source, target) if len(questions) < len(targets) else (target, source)
        raise InputError(
            f"{source.name} has {len(questions)} lines but {target.name} has {len(targets)}: "
            f"{shorter.name} is shorter",
            path=shorter,
            line=min(len(questions), len(targets)) + 1,
            fix=f"Make {shorter.name} and {longer.name} line-aligned: one question and its answers per line",
        )
    examples = []
    for number, (question, answer_line) in enumerate(zip(questions, targets), start=1):
        if not question.strip():
            raise InputError("empty question", path=source, line=number, fix="Remove the line from both files")
        answers = tuple(a.strip() for a in answer_line.split("\t") if a.strip())
        if not answers:
            raise InputError("empty answer", path=target, line=number,
                             fix="Write one answer per line (several separated by tabs)")
        examples.append(QAExample(question.strip(), answers, line=number))
    return examples


def examples_from_records(records: Iterable[dict[str, Any]], *, where: str) -> list[QAExample]:
    """Hub rows -> examples: nq_open's ``answer`` list, or trivia_qa's ``answer.value`` + ``answer.aliases``."""
    examples = []
    for index, row in enumerate(records):
        at = f"row {index}: "
        question = _question(row, path=where, line=None, where=at)
        answer = row.get("answer", row.get("answers"))
        if isinstance(answer, dict):  # trivia_qa: the canonical value first, then its aliases, no repeats
            answer = list(dict.fromkeys([answer.get("value", ""), *answer.get("aliases", [])]))
            answer = [a for a in answer if isinstance(a, str) and a.strip()]
        elif isinstance(answer, str):
            answer = [answer]
        examples.append(QAExample(question, _answers(answer, path=where, line=None, key="answer", where=at)))
    return examples


def _read_hub(source: str, split: str) -> list[QAExample]:
    """``hf:name`` or ``hf:name:config`` through ``datasets.load_dataset``."""
    name, _, config = source[len("hf:"):].partition(":")
    fix = ("Set HF_DATASETS_OFFLINE=0 and HF_HUB_OFFLINE=0 on a machine that reaches the hub, "
           "or pass a local file (NQ-Open .jsonl, DPR .csv, .source/.target)")
    if not name:
        raise InputError("no dataset name after `hf:`", setting=source, fix="Write e.g. hf:nq_open")
    import datasets  # here, not at the top: the local readers must not pay for it

    try:
        rows = datasets.load_dataset(name, config or None, split=split)
    except ConnectionError as err:
        raise InputError(f"the Hugging Face hub is unreachable ({err})", setting=source, fix=fix) from None
    except Exception as err:  # datasets raises many types for unknown names, configs and splits
        raise InputError(f"cannot load dataset `{name}` config `{config or None}` split `{split}` "
                         f"({type(err).__name__}: {err})", setting=source, fix=fix) from None
    return examples_from_records(rows, where=source)


_READERS: dict[str, Callable[[Path, str], list[QAExample]]] = {
    ".jsonl": _read_nq_jsonl,
    ".jsonl.gz": _read_nq_jsonl,
    ".csv": _read_dpr_csv,
    ".tsv": _read_dpr_csv,
    ".source": _read_pair,
    ".target": _read_pair,
}


def read_questions(source: str | Path, *, split: str = "validation") -> list[QAExample]:
    """Read questions from a file (format by suffix), a .source/.target prefix or folder, or ``hf:name[:config]``.

    The one question reader: rag-train (QADataModule), rag-eval (``load_examples``) and rag-score (its
    references) all call it. Files are read by :func:`index.passage_files.iter_lines`: a UTF-8 BOM is
    dropped, CRLF accepted, blank lines skipped (not in .source/.target, whose lines must align), bytes that
    are not UTF-8 raise. A file without any question raises InputError naming it. Repeated questions are
    kept (training pairs may repeat); commands keyed by question text call :func:`refuse_repeats`.
    ``split`` picks the hub split, or ``{split}.source`` inside a directory.
    """
    if isinstance(source, str) and source.startswith("hf:"):
        return _read_hub(source, split)
    path = Path(source)
    examples = _read_local(path, split)
    if not examples:
        raise InputError("no questions in the file", path=path, fix="Pass a file with at least one question")
    return examples


def _read_local(path: Path, split: str) -> list[QAExample]:
    """The reader chosen by the file name (or a .source/.target prefix or folder)."""
    name = path.name.lower()
    for suffix, reader in _READERS.items():
        if name.endswith(suffix):
            return reader(path, split)
    if path.is_dir() or path.with_name(path.name + ".source").is_file():
        return _read_pair(path, split)
    if not path.exists():
        raise InputError("file not found", path=path, fix="Check the path")
    raise InputError("unknown question file type", path=path,
                     fix="Use NQ-Open .jsonl, DPR .csv/.tsv, .source/.target, or hf:<dataset>[:<config>]")


def question_place(source: str | Path, example: QAExample, position: int) -> str:
    """``FILE:LINE`` of an example, for messages about one question; ``SOURCE row N`` when the line is unknown.

    ``position``: its 1-based place among the questions read (hub rows have no line).
    """
    return f"{source}:{example.line}" if example.line is not None else f"{source} row {position}"


def refuse_repeats(examples: list[QAExample], source: str | Path) -> None:
    """InputError ``FILE:LINE: the question repeats FILE:LINE`` for the first question seen twice.

    rag-eval and rag-score key predictions by question text (as NQ-Open does), so a repeat would be
    answered once and scored twice (or collapse silently); rag-train accepts repeats.
    """
    seen: dict[str, str] = {}
    for number, example in enumerate(examples, start=1):
        place = question_place(source, example, number)
        if example.question in seen:
            raise InputError(f"{place}: the question repeats {seen[example.question]}: {example.question[:80]!r}",
                             fix="Remove the duplicate question")
        seen[example.question] = place


def _example_record(example: QAExample) -> dict[str, Any]:
    """NQ-Open object for one example, with the optional extra keys only when set."""
    record: dict[str, Any] = {"question": example.question, "answer": list(example.answers)}
    if len(example.positive_ids) == 1:
        record["passage_id"] = example.positive_ids[0]
    elif example.positive_ids:
        record["positive_ids"] = list(example.positive_ids)
    if example.stale_answers:
        record["stale_answer"] = list(example.stale_answers)
    return record


def write_questions_jsonl(examples: Iterable[QAExample], path: str | Path) -> int:
    """Write NQ-Open JSONL atomically (extra keys ``passage_id``, ``stale_answer`` when set); returns the count."""
    count = 0
    with atomic_text_writer(path) as out:
        for example in examples:
            out.write(json.dumps(_example_record(example), ensure_ascii=False) + "\n")
            count += 1
    return count


def _ctx(value: Any, *, path: Path, line: int | None, at: str) -> Passage:
    """A DPR ctx ``{"title", "text", "passage_id"}`` -> Passage (id "" when the file gives none)."""
    if not isinstance(value, dict) or not isinstance(value.get("text"), str):
        raise InputError(f"{at}a ctx must be an object with a string `text`", path=path, line=line,
                         fix='Write each ctx as {"title": "...", "text": "...", "passage_id": "..."}')
    pid = value.get("passage_id", value.get("id", value.get("psg_id", "")))
    return Passage(id=str(pid), title=str(value.get("title", "")), text=value["text"])


def _dpr_example(record: Any, *, path: Path, line: int | None, at: str) -> DprExample:
    """One DPR training object -> DprExample."""
    if not isinstance(record, dict):
        raise InputError(f"{at}expected a JSON object, got {type(record).__name__}", path=path, line=line)
    question = _question(record, path=path, line=line, where=at)
    answers = _answers(record.get("answers", []), path=path, line=line, key="answers", allow_empty=True, where=at)
    groups = []
    for key in ("positive_ctxs", "hard_negative_ctxs", "negative_ctxs"):
        ctxs = record.get(key, [])
        if not isinstance(ctxs, list):
            raise InputError(f"{at}`{key}` must be a list", path=path, line=line)
        groups.append(tuple(_ctx(c, path=path, line=line, at=f"{at}{key}: ") for c in ctxs))
    return DprExample(question, answers, positives=groups[0], hard_negatives=groups[1], negatives=groups[2])


def read_dpr_training(path: str | Path, *, drop_without_positives: bool = True) -> list[DprExample]:
    """DPR retriever-training data: the original JSON array (``.json``) or one object a line (``.jsonl``).

    Like DPR, examples without a positive passage are dropped unless told otherwise. A file without any
    object (empty, or only blank lines / ``[]``) raises InputError naming it, so a training file and a dev
    file fail alike; bytes that are not UTF-8 name the line in both layouts.
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        examples = [_dpr_example(_json_record(path, n, line, "One DPR training object a line"), path=path,
                                 line=n, at="") for n, line in iter_lines(path)]
    elif name.endswith((".json", ".json.gz")):
        examples = [_dpr_example(r, path=path, line=n, at=f"item {i}: ")
                    for i, (n, r) in enumerate(_load_array(path))]
    else:
        raise InputError("unknown DPR training file type", path=path,
                         fix="Use DPR's .json (one array) or .jsonl (one object a line)")
    if not examples:
        raise InputError("no DPR training examples in the file", path=path,
                         fix="Pass a file with at least one DPR training object")
    return [e for e in examples if e.positives or not drop_without_positives]


_BLANK = re.compile(r"[ \t\n\r]*")


def _array_items(text: str, path: Path) -> list[tuple[int, Any]]:
    """(1-based line where it starts, item) for each item of a JSON array; JSONDecodeError when malformed.

    One pass of ``raw_decode`` per item, so an error about one item can name its line as .jsonl errors do.
    """
    start = _BLANK.match(text).end()
    if not text.startswith("[", start):
        data = json.loads(text)  # raises for bad JSON
        raise InputError(f"expected a JSON array, got {type(data).__name__}", path=path, line=1,
                         fix="DPR's .json is one array of objects; use .jsonl for one object a line")
    decoder, items, line, last = json.JSONDecoder(), [], 1, 0
    at = _BLANK.match(text, start + 1).end()
    if not text.startswith("]", at):
        while True:
            line, last = line + text.count("\n", last, at), at
            item, at = decoder.raw_decode(text, at)
            items.append((line, item))
            at = _BLANK.match(text, at).end()
            if text.startswith(",", at):
                at = _BLANK.match(text, at + 1).end()
            elif text.startswith("]", at):
                break
            else:
                raise json.JSONDecodeError("Expecting ',' delimiter", text, at)
    end = _BLANK.match(text, at + 1).end()
    if end != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    return items


def _load_array(path: Path) -> list[tuple[int, Any]]:
    """(line, item) for each item of a whole DPR training file (they are modest), which must be an array."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read().removeprefix(b"\xef\xbb\xbf")  # a BOM is dropped, as iter_lines does
        text = raw.decode("utf-8")
        return _array_items(text, path) if text.strip() else []  # an empty file holds no examples
    except FileNotFoundError:
        raise InputError("file not found", path=path, fix="Check the path") from None
    except UnicodeDecodeError as err:  # the line, as iter_lines names it for .jsonl
        raise InputError("not valid UTF-8", path=path, line=raw[:err.start].count(b"\n") + 1,
                         fix="Re-encode the file as UTF-8") from None
    except json.JSONDecodeError as err:
        raise InputError(f"bad JSON ({err.msg}, column {err.colno})", path=path, line=err.lineno,
                         fix="DPR's .json is one array of objects; use .jsonl for one object a line") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read the file ({err})", path=path, fix="Pass a readable UTF-8 file") from None


def write_dpr_training_jsonl(examples: Iterable[DprExample], path: str | Path) -> int:
    """Write DPR training objects one a line, atomically; returns the count."""

    def ctxs(passages: tuple[Passage, ...]) -> list[dict[str, str]]:
        """DPR's ctx objects for some passages."""
        return [{"title": p.title, "text": p.text, "passage_id": p.id} for p in passages]

    count = 0
    with atomic_text_writer(path) as out:
        for ex in examples:
            record = {"question": ex.question, "answers": list(ex.answers), "positive_ctxs": ctxs(ex.positives),
                      "hard_negative_ctxs": ctxs(ex.hard_negatives), "negative_ctxs": ctxs(ex.negatives)}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count
