"""Your own documents as passages: .txt, .md / .markdown and .pdf files -> DPR-style 100-word passages.

    rag-build-index --documents notes/ papers/report.pdf --encoder runs/<run>/model/context_encoder --out indexes/mine

Splitting follows DPR's psgs_w100: consecutive, non-overlapping windows of 100
whitespace-separated words; a document's last window may be shorter. A PDF is
split page by page (a passage never spans two pages, so its page is exact; a
page's last window may be shorter).

Titles: a PDF's metadata title if it has one, else the file stem; a Markdown
file's first ``# `` heading (that line then leaves the text), else the stem; a
text file's stem. Text and Markdown files must be UTF-8 (a BOM is dropped).

Names: a file is named by its path relative to the directory holding the given
paths (their common parent), e.g. ``--documents notes/`` names ``notes/report.pdf``.
Directories expand recursively to their supported files (hidden ones skipped);
all files are sorted by name, so the order of the arguments does not matter.

Ids and sources: a passage's id is ``<name>#<n>`` (text, Markdown) or
``<name>#p<page>-<n>`` (PDF), n counting from 1 within the document (or page).
Such ids stay the same when other files are added or removed (integer ids would
shift), so prediction records that cite them stay meaningful; the store finds
them through its id hash table. The source, shown by rag-ask, is ``<name>`` or
``<name>#page=<page>`` (pages from 1; the fragment PDF viewers open at).

Markdown cleanup (simple, line by line, not a full parser): YAML front matter,
HTML comments and tags, code fence lines (the code itself is kept: questions
about a README often ask for its commands), heading hashes, block-quote and list
markers, horizontal rules, table pipes and separator rows, link reference
definitions, link and image URLs (their text is kept), emphasis markers
(``*``, ``_``, ``~~``), inline-code backticks and backslash escapes.

Bad files never end the run: an unreadable file, a corrupt or encrypted PDF,
or a text file that is not UTF-8 is skipped with a warning naming it and the
reason (logger ``index.documents``; printed to stderr when logging is not set
up), and the skipped files are listed again at the end; a PDF page without
extractable text (a scan) is a warning too. Only when no file gives any
text at all is it an InputError.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from index.passage_files import Passage
from rag_models.errors import InputError
from rag_models.file_manifest import content_fingerprint

WORDS_PER_PASSAGE = 100  # DPR's psgs_w100
FORMATS = {".txt": "text", ".md": "markdown", ".markdown": "markdown", ".pdf": "pdf"}  # suffix -> reader
log = logging.getLogger(__name__)  # skipped files and pages without text


class _Unreadable(Exception):
    """A file that cannot be read; its message is the reason given in the warning."""


@dataclass(frozen=True)
class DocumentFile:
    """One document on disk: ``path`` to read it, ``name`` (relative, POSIX) for its ids and sources."""

    path: Path
    name: str

    @property
    def kind(self) -> str:
        """``"text"``, ``"markdown"`` or ``"pdf"``, from the suffix."""
        return FORMATS[self.path.suffix.lower()]


# ---- finding the files ---------------------------------------------------------------------------
def _supported_files(directory: Path) -> list[Path]:
    """The supported files under ``directory``, recursively, skipping hidden files and folders."""
    found = []
    for path in directory.rglob("*"):
        hidden = any(part.startswith(".") for part in path.relative_to(directory).parts)
        if not hidden and path.suffix.lower() in FORMATS and path.is_file():
            found.append(path)
    return found


def document_files(paths: Sequence[str | Path]) -> list[DocumentFile]:
    """The document files of ``paths`` (files, or directories expanded recursively), unique, sorted by name.

    Raises InputError for a path that does not exist, a file given explicitly whose suffix is not
    supported, or when no supported file is found at all.
    """
    supported = ", ".join(FORMATS)
    if not paths:
        raise InputError("no document paths given", setting="documents", fix=f"Pass files ({supported}) or folders")
    absolute = [Path(os.path.abspath(path)) for path in paths]  # abspath, not resolve: keep the names users gave
    root = Path(os.path.commonpath([path.parent for path in absolute]))
    found: dict[Path, None] = {}  # ordered set: a file given twice (or inside a given folder) counts once
    for given, path in zip(paths, absolute):
        if path.is_dir():
            files = _supported_files(path)
            if not files:
                log.warning("%s: no %s files in this folder", given, supported)
            found.update(dict.fromkeys(files))
        elif path.is_file():
            if path.suffix.lower() not in FORMATS:
                raise InputError(f"unsupported document type {path.suffix or '(no suffix)'!r}", path=given,
                                 fix=f"Pass {supported} files; for DPR TSV or JSONL passage files use --passages")
            found[path] = None
        else:
            raise InputError("no such file or folder", path=given, fix="Check the path")
    if not found:
        raise InputError(f"no {supported} files found", setting="documents", fix="Check the paths")
    files = [DocumentFile(path=path, name=path.relative_to(root).as_posix()) for path in found]
    return sorted(files, key=lambda file: file.name)


def documents_fingerprint(files: Sequence[DocumentFile]) -> dict:
    """Name, size and content hash of every file: the passage store's source, to notice a changed set."""
    return {"documents": [{**content_fingerprint(file.path), "name": file.name} for file in files]}


# ---- reading one file ----------------------------------------------------------------------------
def split_words(text: str, size: int = WORDS_PER_PASSAGE) -> list[str]:
    """Consecutive, non-overlapping windows of ``size`` whitespace-separated words; the last may be shorter."""
    words = text.split()
    return [" ".join(words[start:start + size]) for start in range(0, len(words), size)]


def _read_utf8(path: Path) -> str:
    """The file's text, or _Unreadable saying why (not UTF-8, no permission, ...)."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise _Unreadable(f"not valid UTF-8 (byte {err.start}); re-encode it as UTF-8") from None
    except OSError as err:
        raise _Unreadable(f"cannot read it ({err.strerror or err})") from None


_FRONT_MATTER = re.compile(r"\A---[ \t]*\n.*?\n(?:---|\.\.\.)[ \t]*(?:\n|\Z)", re.DOTALL)
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})(?:\s+|$)(.*?)(?:\s+#+)?\s*$")
_SKIPPED_LINE = re.compile(
    r"^\s{0,3}(?:([-*_])(?:\s*\1){2,}"  # horizontal rule
    r"|\|?\s*:?-{3,}:?\s*(?:\|\s*:?-{3,}:?\s*)*\|?"  # table separator row
    r"|\[[^\]]+\]:\s*\S+.*)\s*$"  # link reference definition
)
_BLOCK_MARKERS = re.compile(r"^\s*(?:>\s?)*(?:(?:[-*+]|\d+[.)])\s+)?")  # block quotes, then a list bullet
_INLINE = (  # (pattern, replacement), applied in order
    (re.compile(r"`+([^`]*)`+"), r"\1"),  # inline code
    (re.compile(r"!?\[([^\]]*)\](?:\([^)]*\)|\[[^\]]*\])"), r"\1"),  # [text](url), ![alt](url), [text][ref]
    (re.compile(r"<((?:https?|ftp|mailto):[^>\s]+)>"), r"\1"),  # <https://...> autolinks keep their URL
    (re.compile(r"</?[A-Za-z][^>]*>"), " "),  # HTML tags
    (re.compile(r"(?<!\\)(\*{1,3}|~~)(?=\S)(.+?)(?<=[^\s\\])\1"), r"\2"),  # *em*, **strong**, ~~strike~~
    (re.compile(r"(?<![\w\\])(_{1,3})(?=\S)(.+?)(?<=[^\s\\])\1(?!\w)"), r"\2"),  # _em_, __strong__; not snake_case
    (re.compile(r"\\([\\`*_{}\[\]()#+\-.!|~<>])"), r"\1"),  # backslash escapes
    (re.compile(r"\|"), " "),  # table cell borders
)


def _plain_inline(line: str) -> str:
    """A Markdown line's text without its inline markup."""
    for pattern, replacement in _INLINE:
        line = pattern.sub(replacement, line)
    return line


def markdown_to_text(markdown: str) -> tuple[str | None, str]:
    """(title: the first ``# `` heading or None, plain text without markup) of a Markdown document."""
    title, lines, fence = None, [], ""
    for line in _HTML_COMMENT.sub(" ", _FRONT_MATTER.sub("", markdown)).splitlines():
        opening = _FENCE.match(line)
        if fence:  # inside a code block: keep the code, drop the closing fence
            if opening and opening.group(1)[0] == fence[0] and len(opening.group(1)) >= len(fence):
                fence = ""
            else:
                lines.append(line)
            continue
        if opening:
            fence = opening.group(1)
            continue
        heading = _HEADING.match(line)
        if heading:
            text = _plain_inline(heading.group(2)).strip()
            if title is None and len(heading.group(1)) == 1 and text:
                title = " ".join(text.split())  # the title is not repeated in the text
                continue
            lines.append(text)
        elif not _SKIPPED_LINE.match(line):
            lines.append(_plain_inline(_BLOCK_MARKERS.sub("", line, count=1)))
    return title, "\n".join(lines)


def _pdf_pages(path: Path) -> tuple[str | None, list[str]]:
    """(metadata title or None, text of each page); _Unreadable for a corrupt or encrypted PDF."""
    from pypdf import PdfReader  # imported here: text and Markdown need no PDF library

    try:
        reader = PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):
            raise _Unreadable("encrypted PDF (it needs a password); save a decrypted copy")
        title = reader.metadata.title if reader.metadata else None
        pages = list(reader.pages)
    except _Unreadable:
        raise
    except OSError as err:
        raise _Unreadable(f"cannot read it ({err.strerror or err})") from None
    except Exception as err:  # pypdf raises many types (PdfReadError, ValueError, KeyError...) on broken files
        raise _Unreadable(f"not a readable PDF ({type(err).__name__}: {err})") from None
    texts = []
    for number, page in enumerate(pages, start=1):
        try:
            text = page.extract_text() or ""
        except Exception as err:  # one broken page costs that page only
            log.warning("%s: page %d is unreadable (%s: %s); skipped", path, number, type(err).__name__, err)
            text = ""
        texts.append(text.encode("utf-8", "replace").decode("utf-8"))  # lone surrogates from odd fonts
    return (title if isinstance(title, str) else None), texts


def _pdf_passages(file: DocumentFile) -> list[Passage]:
    """A PDF's passages, page by page; pages without text are reported, not fatal."""
    title, pages = _pdf_pages(file.path)
    title = " ".join((title or "").split()) or file.path.stem
    passages, blank = [], []
    for page, text in enumerate(pages, start=1):
        windows = split_words(text)
        blank += [page] if not windows else []
        passages += [Passage(id=f"{file.name}#p{page}-{n}", title=title, text=window,
                             source=f"{file.name}#page={page}") for n, window in enumerate(windows, start=1)]
    if blank and len(blank) < len(pages):  # a PDF with no text at all is reported once, as a skipped file
        log.warning("%s: no extractable text on page(s) %s (scanned? run OCR on it to index them)", file.path,
                    ", ".join(map(str, blank)))
    return passages


def document_passages(file: DocumentFile) -> list[Passage]:
    """One document's passages (see the module docstring); an empty list when it has no text.

    Raises _Unreadable (with the reason) when the file cannot be read.
    """
    if file.kind == "pdf":
        return _pdf_passages(file)
    text = _read_utf8(file.path)
    title = None
    if file.kind == "markdown":
        title, text = markdown_to_text(text)
    title = title or file.path.stem
    return [Passage(id=f"{file.name}#{n}", title=title, text=window, source=file.name)
            for n, window in enumerate(split_words(text), start=1)]


def iter_document_passages(files: Sequence[DocumentFile], *, progress: bool = True) -> Iterator[Passage]:
    """Stream the passages of every file in order, skipping unreadable ones with a warning.

    Raises InputError at the end when no file gave any passage (naming the files and why).
    """
    skipped: list[str] = []
    count = 0
    # Our warnings and pypdf's (about the file being read) are written above the progress bar, not through it.
    with logging_redirect_tqdm(loggers=[log, logging.getLogger("pypdf")]) if progress else contextlib.nullcontext():
        for file in tqdm(files, desc="documents", unit=" file", disable=not progress):
            try:
                passages = document_passages(file)
                if not passages:
                    raise _Unreadable("no text in it" + (" (scanned? run OCR on it)" if file.kind == "pdf" else ""))
            except _Unreadable as err:
                log.warning("%s: skipped: %s", file.path, err)
                skipped.append(f"{file.name} ({err})")
                continue
            count += len(passages)
            yield from passages
    if count == 0:
        raise InputError(f"none of the {len(files)} document file(s) gave any text: {'; '.join(skipped[:10])}"
                         + ("; ..." if len(skipped) > 10 else ""), setting="documents",
                         fix="Pass readable UTF-8 text, Markdown or PDF files with extractable text")
    if skipped:
        log.warning("skipped %d of %d document files: %s", len(skipped), len(files), "; ".join(skipped))
