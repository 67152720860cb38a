"""Own documents as passages: 100-word windows, titles per format, Markdown cleanup, PDF pages, folders,
bad files, and rag-build-index --documents -> retrieval and rag-ask naming the source file and page.

PDFs are made inside the tests with pypdf's writer (a Helvetica text stream per page): no binary fixtures.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from pypdf import PdfWriter
from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

from decoding.ask_cli import main as ask_main
from index.build_cli import main as build_main
from index.documents import (
    document_files,
    document_passages,
    documents_fingerprint,
    iter_document_passages,
    markdown_to_text,
    split_words,
)
from index.retrieval import Retriever
from rag_models.errors import InputError
from tiny_setup import save_untrained_rag


def _words(prefix: str, n: int) -> str:
    """``n`` distinct words ``prefix0 prefix1 ...``, 12 to a line."""
    words = [f"{prefix}{i}" for i in range(n)]
    return "\n".join(" ".join(words[i:i + 12]) for i in range(0, n, 12))


def write_pdf(path: Path, pages: list[str], title: str | None = None) -> Path:
    """A PDF with one page per string (each line of it a text line; "" = a page without text)."""
    writer = PdfWriter()
    font = DictionaryObject({NameObject("/Type"): NameObject("/Font"), NameObject("/Subtype"): NameObject("/Type1"),
                             NameObject("/BaseFont"): NameObject("/Helvetica")})
    for text in pages:
        page = writer.add_blank_page(612, 792)
        page[NameObject("/Resources")] = DictionaryObject({NameObject("/Font"): DictionaryObject(
            {NameObject("/F1"): font})})
        ops = [f"BT /F1 9 Tf 40 {760 - 12 * row} Td ({line}) Tj ET" for row, line in enumerate(text.splitlines())]
        stream = DecodedStreamObject()
        stream.set_data("\n".join(ops).encode("latin-1"))
        page.replace_contents(stream)
    if title is not None:
        writer.add_metadata({"/Title": title})
    with open(path, "wb") as out:
        writer.write(out)
    return path


@pytest.fixture()
def docs(tmp_path: Path) -> Path:
    """docs/report.pdf (pages of 150, 0 and 30 words), docs/notes/guide.md (230 words), docs/readme.txt (50)."""
    root = tmp_path / "docs"
    (root / "notes").mkdir(parents=True)
    write_pdf(root / "report.pdf", [_words("alpha", 150), "", _words("gamma", 30)], title="Quarterly  Report")
    (root / "notes" / "guide.md").write_text(f"# The *Guide*\n\n{_words('mark', 230)}\n", encoding="utf-8")
    (root / "readme.txt").write_text(_words("plain", 50), encoding="utf-8")
    return root


def _passages(paths: list[Path]) -> list:
    return list(iter_document_passages(document_files(paths), progress=False))


# ---------------------------------------------------------------- splitting, titles, Markdown


def test_split_words_makes_dpr_windows():
    text = " ".join(f"w{i}" for i in range(250)).replace("w7 ", "w7\n\t ")
    windows = split_words(text)
    assert [len(w.split()) for w in windows] == [100, 100, 50]
    assert windows[0].split()[0] == "w0" and windows[1].split()[0] == "w100" and windows[2].split()[-1] == "w249"
    assert "\n" not in windows[0]  # whitespace is normalised to single spaces
    assert [len(w.split()) for w in split_words(" ".join(["x"] * 200))] == [100, 100]
    assert split_words(" \n ") == []
    assert [len(w.split()) for w in split_words("a b c d e", size=2)] == [2, 2, 1]


def test_titles_per_format(tmp_path, docs):
    (tmp_path / "bare.md").write_text("## Not a title\n\nsome text\n", encoding="utf-8")
    write_pdf(tmp_path / "untitled.pdf", ["one page"])
    write_pdf(tmp_path / "blank-title.pdf", ["one page"], title="  ")
    titles = {p.source.split("#")[0]: p.title for p in _passages([docs, *sorted(tmp_path.glob("*.*"))])}
    assert titles == {"docs/report.pdf": "Quarterly Report",  # metadata title, whitespace normalised
                      "docs/notes/guide.md": "The Guide",  # first `# ` heading, markup stripped
                      "docs/readme.txt": "readme",  # the stem
                      "bare.md": "bare", "untitled.pdf": "untitled", "blank-title.pdf": "blank-title"}


def test_markdown_cleanup():
    markdown = "\n".join([
        "---", "layout: post", "---",
        "Intro with **bold**, *em*, _under_, snake_case_name, ~~old~~ and `code`.",
        "# Main *Title* #",
        "## Install",
        "- see [the docs](https://example.com/docs) and ![a diagram](img.png)",
        "1. then [a ref][r1]",
        "> quoted <b>html</b> <!-- a comment --> <https://auto.link/>",
        "| col a | col b |", "|-------|:-----:|", "| 1 | 2 |",
        "```bash", "pip install rag-e2e", "```",
        "***",
        "[r1]: https://ref.example.com",
        r"Escaped \*star\* stays.",
    ])
    title, text = markdown_to_text(markdown)
    assert title == "Main Title"
    assert text.split() == (
        "Intro with bold, em, under, snake_case_name, old and code. Install see the docs and a diagram then a ref "
        "quoted html https://auto.link/ col a col b 1 2 pip install rag-e2e Escaped *star* stays.").split()
    # A `# ` line inside a code block is code, not the title.
    assert markdown_to_text("```\n# comment\n```\ntext")[0] is None


# ---------------------------------------------------------------- PDF pages, folders, bad files


def test_pdf_passages_keep_their_page(docs, caplog):
    passages = document_passages(document_files([docs / "report.pdf"])[0])
    assert "report.pdf: no extractable text on page(s) 2 (scanned?" in caplog.text  # a warning, not an error
    assert [(p.id, p.source, len(p.text.split())) for p in passages] == [
        ("report.pdf#p1-1", "report.pdf#page=1", 100),
        ("report.pdf#p1-2", "report.pdf#page=1", 50),  # a passage never spans two pages
        ("report.pdf#p3-1", "report.pdf#page=3", 30),
    ]
    assert passages[0].text.split()[:2] == ["alpha0", "alpha1"] and passages[2].text.split()[-1] == "gamma29"


def test_folders_expand_recursively_sorted_and_named_from_their_parent(tmp_path, docs):
    (docs / "data.csv").write_text("ignored,in,a,folder\n", encoding="utf-8")
    (docs / ".cache").mkdir()
    (docs / ".cache" / "hidden.md").write_text("hidden\n", encoding="utf-8")
    (docs / "UPPER.MD").write_text("upper case suffix\n", encoding="utf-8")
    files = document_files([docs, docs / "readme.txt"])  # a file inside a given folder counts once
    assert [f.name for f in files] == ["docs/UPPER.MD", "docs/notes/guide.md", "docs/readme.txt", "docs/report.pdf"]
    assert document_files([docs / "readme.txt", docs]) == files  # argument order does not matter
    assert [f.name for f in document_files([docs / "notes"])] == ["notes/guide.md"]
    fingerprint = documents_fingerprint(files)["documents"]
    assert [entry["name"] for entry in fingerprint] == [f.name for f in files]
    assert fingerprint[2]["size"] == (docs / "readme.txt").stat().st_size


def test_a_bad_file_is_skipped_with_a_warning(docs, caplog):
    (docs / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntruncated")
    write_pdf(docs / "scan.pdf", ["", ""])
    with caplog.at_level(logging.WARNING, logger="index.documents"):
        passages = _passages([docs])
    messages = [r.getMessage() for r in caplog.records if r.name == "index.documents"]
    assert any("latin1.txt: skipped: not valid UTF-8" in m for m in messages)
    assert any("broken.pdf: skipped: not a readable PDF" in m for m in messages)
    assert any("scan.pdf: skipped: no text in it (scanned?" in m for m in messages)
    assert messages[-1].startswith("skipped 3 of 6 document files: docs/broken.pdf (")
    assert {p.source.split("#")[0] for p in passages} == {"docs/report.pdf", "docs/notes/guide.md", "docs/readme.txt"}
    assert len(passages) == 3 + 3 + 1


def test_nothing_readable_is_an_input_error(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"\xff\xfe\x00bad")
    (tmp_path / "b.pdf").write_bytes(b"not a pdf at all")
    with pytest.raises(InputError, match=r"none of the 2 document file\(s\) gave any text: a.txt \(not valid UTF-8"):
        _passages([tmp_path / "a.txt", tmp_path / "b.pdf"])


def test_unsupported_or_missing_paths_are_input_errors(tmp_path, caplog):
    (tmp_path / "table.docx").write_bytes(b"PK")
    with pytest.raises(InputError, match=r"table.docx: unsupported document type '.docx'.*\.txt, \.md, \.markdown, "
                                         r"\.pdf"):
        document_files([tmp_path / "table.docx"])
    with pytest.raises(InputError, match="no such file or folder"):
        document_files([tmp_path / "missing.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .txt, .md"):
        document_files([tmp_path / "empty"])
    assert "empty: no .txt, .md, .markdown, .pdf files in this folder" in caplog.text


# ---------------------------------------------------------------- rag-build-index --documents, rag-ask

EXPECTED_SOURCES = {"docs/report.pdf#page=1", "docs/report.pdf#page=3", "docs/notes/guide.md", "docs/readme.txt"}


@pytest.fixture()
def documents_index(tiny_setup, docs, tmp_path) -> Path:
    """rag-build-index --documents over the ``docs`` folder, with the tiny context encoder."""
    out = tmp_path / "mine"
    build_main(["--documents", str(docs), "--encoder", str(tiny_setup.models.context_encoder), "--out", str(out),
               "--max-length", "128", "--no-progress", "--device", "cpu"])
    return out


def test_build_index_from_documents_retrieves_sources(tiny_setup, documents_index, docs, capsys):
    retriever = Retriever.from_dir(documents_index)
    store = retriever.passages
    assert len(store) == 7 and store.has_sources and store.meta["id_mode"] == "hash"
    assert store.row_of("docs/report.pdf#p3-1") == 6  # stable string ids: <file>#p<page>-<n>, <file>#<n>
    docs_found = retriever.retrieve(torch.randn(2, retriever.dim), len(store))  # every passage, best first
    for rows in docs_found.ids.tolist():
        assert sorted(rows) == list(range(7))
        assert set(store.sources(rows)) == EXPECTED_SOURCES
    assert [store.get(row).source for row in range(3)] == [
        "docs/notes/guide.md", "docs/notes/guide.md", "docs/notes/guide.md"]
    assert json.loads((documents_index / "passages" / "meta.json").read_text())["source"]["documents"][0]["name"] \
        == "docs/notes/guide.md"
    # The same files again: the store and the vectors are reused; another set is refused, naming the store.
    capsys.readouterr()
    args = ["--documents", str(docs), "--encoder", str(tiny_setup.models.context_encoder), "--out",
            str(documents_index), "--max-length", "128", "--no-progress", "--device", "cpu"]
    build_main(args)  # reads no document again
    assert "is up to date" in capsys.readouterr().out
    (docs / "more.txt").write_text("a new file", encoding="utf-8")
    with pytest.raises(SystemExit) as stopped:
        build_main(args)
    assert stopped.value.code == 2 and "built from other files" in capsys.readouterr().err


def test_passages_and_documents_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        build_main(["--passages", "p.tsv", "--documents", "d", "--encoder", "e", "--out", "o"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_rag_ask_names_the_source_of_each_supporting_passage(tiny_setup, documents_index, tmp_path, capsys):

    save_untrained_rag(tiny_setup.models, tmp_path / "rag", n_docs=3)
    assert ask_main(["--checkpoint", str(tmp_path / "rag"), "--index", str(documents_index), "--max-length", "4",
                     "--num-beams", "1", "--strategy", "greedy", "--top-docs", "2", "what is in the report?"]) == 0
    out = capsys.readouterr().out
    support = out.splitlines()[2]
    assert support.startswith("   from: ")
    shown = re.findall(r"\(\d\.\d\d\) \[([^\]]+)\]", support)
    assert len(shown) == 2 and set(shown) <= EXPECTED_SOURCES
