"""checksums.json: sizes always, hashes when asked or on the first use of a copy; old directories; fingerprints."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from index.build_cli import _passage_store
from rag_models import file_manifest
from rag_models.errors import InputError
from rag_models.file_manifest import MANIFEST_NAME, MARKER_NAME, check_directory, main, same_source, write_file_manifest


def _directory(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "a.bin").write_bytes(bytes(range(256)) * 40)
    (root / "sub" / "b.json").write_text('{"x": 1}\n')
    (root / ".hidden").write_text("not listed")
    write_file_manifest(root)
    return root


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))


@pytest.fixture
def hashed(monkeypatch) -> list[str]:
    """The names of the files hashed from now on (file_digest counted)."""
    names: list[str] = []
    digest = file_manifest.file_digest

    def counting(path: Path) -> str:
        names.append(Path(path).name)
        return digest(path)

    monkeypatch.setattr(file_manifest, "file_digest", counting)
    monkeypatch.setenv(file_manifest.VERIFY_ENV, "0")
    return names


def test_manifest_lists_every_file_but_hidden_ones(tmp_path):
    root = _directory(tmp_path / "d")
    files = file_manifest.read_file_manifest(root, "test")
    assert sorted(files) == ["a.bin", "sub/b.json"] and files["a.bin"]["size"] == 10240
    assert (root / MARKER_NAME).is_file()  # the writer read every byte: this copy counts as verified


def test_sizes_always_hashes_only_when_asked(tmp_path, hashed):
    root = _directory(tmp_path / "d")
    hashed.clear()  # (the writer hashed them)
    _flip(root / "a.bin")  # same size, other content
    check_directory(root, what="test")  # the copy was verified when written: a stat per file, no hashing
    assert hashed == []
    with pytest.raises(InputError, match=r"a\.bin: content differs .* re-save / rebuild"):
        check_directory(root, what="test", verify=True)
    (root / "sub" / "b.json").write_text("{}")
    with pytest.raises(InputError, match=r"b\.json: 2 bytes, 9 when it was written \(truncated or modified\)"):
        check_directory(root, what="test", verify=False)
    (root / "sub" / "b.json").unlink()
    with pytest.raises(InputError, match=r"b\.json: file missing: the test is damaged\. Re-copy"):
        check_directory(root, what="test", verify=False)


def test_first_use_of_a_copy_hashes_once(tmp_path, hashed):
    root = _directory(tmp_path / "d")
    hashed.clear()  # (the writer hashed them)
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)  # new inodes: the marker copied along no longer matches
    check_directory(copy, what="test")
    assert sorted(hashed) == ["a.bin", "b.json"]
    check_directory(copy, what="test")  # recorded: the second use does not hash
    assert len(hashed) == 2
    os.replace(copy, tmp_path / "moved")  # a move keeps the inodes: still verified
    check_directory(tmp_path / "moved", what="test")
    assert len(hashed) == 2
    shutil.copytree(root, tmp_path / "bad")
    _flip(tmp_path / "bad" / "a.bin")  # a copy gone wrong in transit: refused at its first use
    with pytest.raises(InputError, match=r"bad/a\.bin: content differs"):
        check_directory(tmp_path / "bad", what="test")


def test_environment_asks_for_hashes(tmp_path, hashed, monkeypatch):
    root = _directory(tmp_path / "d")
    hashed.clear()  # (the writer hashed them)
    monkeypatch.setenv(file_manifest.VERIFY_ENV, "1")
    check_directory(root, what="test")
    assert sorted(hashed) == ["a.bin", "b.json"]


def test_old_directory_warns_once_and_can_be_given_a_manifest(tmp_path, capsys):
    root = _directory(tmp_path / "d")
    (root / MANIFEST_NAME).unlink()
    with pytest.warns(UserWarning, match=r"no checksums\.json .*python -m rag_models\.file_manifest"):
        check_directory(root, what="test")
    assert main([str(root)]) == 0 and "2 files" in capsys.readouterr().out
    _flip(root / "a.bin")
    with pytest.raises(InputError, match="content differs"):
        check_directory(root, what="test", verify=True)
    assert main([str(tmp_path / "nope")]) == 2


def test_unreadable_manifest_is_named(tmp_path):
    root = _directory(tmp_path / "d")
    (root / MANIFEST_NAME).write_text("[1, 2")
    with pytest.raises(InputError, match=r"checksums\.json: unreadable file manifest"):
        check_directory(root, what="test")


def test_reuse_of_a_passage_store_follows_the_content_not_the_timestamp(tmp_path):
    source = tmp_path / "p.tsv"
    source.write_text("id\ttext\ttitle\n1\tAlpha\tA\n2\tBeta\tB\n")
    built = _passage_store(source, tmp_path / "store", progress=False)
    os.utime(source, (1, 1))  # touched, copied, restored from a backup: same content
    again = _passage_store(source, tmp_path / "store", progress=False)
    assert again.checksum == built.checksum and (tmp_path / "store" / "meta.json").stat().st_mtime_ns == \
        (built.directory / "meta.json").stat().st_mtime_ns  # reused, not rebuilt
    source.write_text("id\ttext\ttitle\n1\tAlpha\tA\n2\tBetb\tB\n")  # same size, same mtime, other content
    os.utime(source, (1, 1))
    with pytest.raises(InputError, match="built from another file"):
        _passage_store(source, tmp_path / "store", progress=False)


def test_fingerprints_saved_before_content_hashes_match_on_name_and_size():
    old = {"name": "p.tsv", "size": 10, "mtime": 5}
    assert same_source(old, {"name": "p.tsv", "size": 10, "sha256": "ab"})
    assert not same_source(old, {"name": "p.tsv", "size": 11, "sha256": "ab"})
    assert not same_source({"name": "p.tsv", "size": 10, "sha256": "cd"}, {"name": "p.tsv", "size": 10,
                                                                            "sha256": "ab"})
    docs = {"documents": [{**old, "name": "a.md"}]}
    assert same_source(docs, {"documents": [{"name": "a.md", "size": 10, "sha256": "x"}]})
