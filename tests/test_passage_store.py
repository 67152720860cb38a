"""PassageStore: build from TSV / JSONL, random access by row and id, checksum, atomic build."""
from __future__ import annotations

import json
import mmap
import os

import numpy as np
import pytest

from conftest import write_passages_jsonl
from index import passages as passages_module
from index.passage_files import Passage, write_passages_tsv
from index.passages import PassageStore
from rag_models.errors import InputError


def _corpus(n: int, *, start: int = 1, prefix: str = "") -> list[Passage]:
    """Passages with ids prefix+start.., unicode, quotes and an empty title among them."""
    return [
        Passage(id=f"{prefix}{start + i}", title="" if i == 3 else f"Titre {i} é",
                text=f'passage {i} says "hello" to ünïcode {"x" * (i % 7)}')
        for i in range(n)
    ]


@pytest.fixture()
def tsv_store(tmp_path):
    corpus = _corpus(50)
    write_passages_tsv(corpus, tmp_path / "psgs.tsv")
    return corpus, PassageStore.build(tmp_path / "psgs.tsv", tmp_path / "store", progress=False)


def test_tsv_round_trip_by_row_and_id(tsv_store):
    corpus, store = tsv_store
    assert len(store) == 50
    assert store.meta["id_mode"] == "range"  # DPR-style consecutive integer ids: arithmetic lookup
    for row in (0, 3, 17, 49):
        assert store.get(row) == corpus[row]
        assert store.row_of(corpus[row].id) == row
    rows = np.array([5, 0, 49, 5])
    assert store.titles(rows) == [corpus[r].title for r in rows]
    assert store.texts(rows) == [corpus[r].text for r in rows]
    assert store.ids(rows) == [corpus[r].id for r in rows]


def test_jsonl_with_string_ids_uses_hash_table(tmp_path):
    corpus = _corpus(40, prefix="wiki:")
    write_passages_jsonl(corpus, tmp_path / "psgs.jsonl")
    store = PassageStore.build(tmp_path / "psgs.jsonl", tmp_path / "store", progress=False)
    assert store.meta["id_mode"] == "hash"
    assert (tmp_path / "store" / "ids.bin").exists()  # hash mode keeps the id strings to confirm a match
    for row, passage in enumerate(corpus):
        assert store.row_of(passage.id) == row
        assert store.get(row) == passage


def test_unknown_ids_raise_key_error(tsv_store, tmp_path):
    _, store = tsv_store
    for missing in ("0", "51", "007", "abc", "-1"):
        with pytest.raises(KeyError):
            store.row_of(missing)
    hashed = PassageStore.from_passages(_corpus(5, prefix="d"), tmp_path / "h", progress=False)
    with pytest.raises(KeyError):
        hashed.row_of("d99")
    with pytest.raises(IndexError):
        store.titles([50])


def test_non_consecutive_integer_ids_fall_back_to_hash(tmp_path):
    corpus = _corpus(10)
    corpus = corpus[:4] + corpus[5:]  # a gap: row arithmetic would be wrong
    store = PassageStore.from_passages(corpus, tmp_path / "s", progress=False)
    assert store.meta["id_mode"] == "hash"
    assert [store.row_of(p.id) for p in corpus] == list(range(9))


def test_duplicate_ids_are_refused(tmp_path):
    corpus = _corpus(6, prefix="p") + [Passage(id="p3", title="again", text="dup")]
    with pytest.raises(InputError, match="'p3' appears twice"):
        PassageStore.from_passages(corpus, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


def test_checksum_depends_on_content_only(tmp_path):
    corpus = _corpus(20)
    a = PassageStore.from_passages(corpus, tmp_path / "a", progress=False)
    b = PassageStore.from_passages(corpus, tmp_path / "b", progress=False)
    changed = corpus[:7] + [Passage(corpus[7].id, corpus[7].title, corpus[7].text + ".")] + corpus[8:]
    c = PassageStore.from_passages(changed, tmp_path / "c", progress=False)
    assert a.checksum == b.checksum != c.checksum
    # Stored once at build time: opening reads it from meta.json, no content pass.
    assert json.loads((tmp_path / "a" / "meta.json").read_text())["checksum"] == a.checksum


def test_killed_build_leaves_nothing_and_keeps_old_store(tmp_path, monkeypatch):
    corpus = _corpus(30)
    old = PassageStore.from_passages(corpus[:10], tmp_path / "store", progress=False)

    def dying(passages, directory, progress):
        raise KeyboardInterrupt("killed mid-build")

    monkeypatch.setattr(passages_module, "_write_columns", dying)
    with pytest.raises(KeyboardInterrupt):
        PassageStore.from_passages(corpus, tmp_path / "store", progress=False)
    with pytest.raises(KeyboardInterrupt):
        PassageStore.from_passages(corpus, tmp_path / "fresh", progress=False)
    assert not (tmp_path / "fresh").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # temp dirs removed
    reopened = PassageStore.open(tmp_path / "store")
    assert len(reopened) == 10 and reopened.checksum == old.checksum


def test_open_refuses_unfinished_directory(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "texts.bin").write_bytes(b"abc")
    with pytest.raises(InputError, match="no meta.json"):
        PassageStore.open(tmp_path / "half")


def test_empty_source_is_refused(tmp_path):
    with pytest.raises(InputError, match="no passages"):
        PassageStore.from_passages([], tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


def test_empty_texts_and_titles(tmp_path):
    corpus = [Passage(id=str(i), title="", text="") for i in range(5)]
    store = PassageStore.from_passages(corpus, tmp_path / "s", progress=False)
    assert store.titles([0, 4]) == ["", ""] and store.get(2) == corpus[2]


# Built by the store code before the sources column existed: stores without sources must not change.
CHECKSUM_BEFORE_SOURCES = "blake2b:0583fad6a1003c12705dca3b82b797e8"  # _corpus(20)


def test_store_without_sources_is_written_as_before(tmp_path):
    store = PassageStore.from_passages(_corpus(20), tmp_path / "s", progress=False)
    assert store.checksum == CHECKSUM_BEFORE_SOURCES
    # the column files of old, plus the file manifest (and the hidden record that this copy was verified)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        ".checksums.verified", "checksums.json", "meta.json", "texts.bin", "texts.off", "titles.bin", "titles.off"]
    assert "sources" not in store.meta and not store.has_sources
    assert store.sources([0, 19, 0]) == ["", "", ""] and store.get(5).source == ""
    with pytest.raises(IndexError):
        store.sources([20])


def test_sources_round_trip_outside_the_checksum(tmp_path):
    corpus = _corpus(20, prefix="doc#")
    sourced = [Passage(p.id, p.title, p.text, source="" if i == 2 else f"notes/ré {i}.pdf#page={i}")
               for i, p in enumerate(corpus)]
    store = PassageStore.from_passages(sourced, tmp_path / "s", progress=False)
    assert store.has_sources and json.loads((tmp_path / "s" / "meta.json").read_text())["sources"] is True
    assert (tmp_path / "s" / "sources.bin").is_file()
    assert store.sources([3, 2, 0]) == ["notes/ré 3.pdf#page=3", "", "notes/ré 0.pdf#page=0"]
    assert [store.get(row) for row in range(20)] == sourced
    assert store.row_of("doc#8") == 7  # ids doc#1..doc#20
    # Provenance is not content: the same passages without sources have the same checksum.
    plain = PassageStore.from_passages(corpus, tmp_path / "plain", progress=False)
    assert plain.checksum == store.checksum
    reopened = PassageStore.open(tmp_path / "s")
    assert reopened.sources([19]) == ["notes/ré 19.pdf#page=19"]


def _rss_file_bytes() -> int:
    """This process's resident pages of mapped files (Linux /proc), in bytes."""
    status = open("/proc/self/status", encoding="ascii").read()
    return int(status.split("RssFile:")[1].split()[0]) * 1024


@pytest.mark.skipif(not hasattr(mmap, "MADV_DONTNEED") or not os.path.exists("/proc/self/status"),
                    reason="needs Linux: madvise(MADV_DONTNEED) and /proc/self/status")
def test_release_pages_gives_back_what_a_full_read_mapped(tmp_path):
    # Encoding reads every text once; before release_pages its RSS grew by the size of texts.bin (13 GB at 21M).
    corpus = [Passage(id=str(i + 1), title=f"t{i}", text=f"{i} " + "w" * 8000) for i in range(2500)]  # 20 MB
    store = PassageStore.from_passages(corpus, tmp_path / "store", progress=False)
    before = _rss_file_bytes()
    texts = [text for first in range(0, len(store), 500) for text in store.texts(np.arange(first, first + 500))]
    mapped = _rss_file_bytes() - before
    store.release_pages()
    released = _rss_file_bytes() - before
    assert mapped > 15 * 2**20, f"reading 20 MB of texts mapped only {mapped / 2**20:.1f} MB"
    assert released < 2 * 2**20, f"{released / 2**20:.1f} MB still resident after release_pages"
    assert texts[1234] == corpus[1234].text and store.texts([1234])[0] == corpus[1234].text  # still readable
