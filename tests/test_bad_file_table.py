"""One table of damaged files, run through the real commands: each is refused with exit 2, no traceback, the file named.

A saved RagModel (checkpoint), the session's index and passage store, an encoding directory, a Lightning
``.ckpt`` and a rag-eval output are copied into each row's ``tmp_path``, one file is damaged (cut, a byte
flipped, deleted, replaced, garbage JSON), and the command that reads it runs in-process: ``rag-ask`` and
``rag-eval`` through their ``main()``, the others through the loader their command calls. Rows marked "old"
first delete ``checksums.json``: directories written before file manifests must fail as clearly.
"""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from decoding.ask_cli import main as ask_main
from index.build_cli import build_index
from index.encode import encode_corpus, load_shards
from index.passages import PassageStore
from rag_models.errors import InputError
from rag_models.file_manifest import MANIFEST_NAME, MARKER_NAME
from tiny_setup import save_untrained_rag
from training.evaluation.eval_cli import main as eval_main
from training.evaluation.score_cli import main as score_main
from training.lit.checkpoint_io import atomic_torch_save, safe_torch_load

FIX_WORDS = ("re-copy", "re-save", "rebuild", "encode again", "re-run")


@pytest.fixture(scope="module")
def originals(tiny_setup, tmp_path_factory) -> dict[str, Path]:
    """Undamaged originals: checkpoint, index root (index/ + passages/), questions, shards, .ckpt, eval output."""
    root = tmp_path_factory.mktemp("bad_files")
    models = tiny_setup.models
    save_untrained_rag(models, root / "model", n_docs=2)
    questions = root / "q.jsonl"
    questions.write_text("".join(tiny_setup.world.test.read_text().splitlines(keepends=True)[:2]))
    store = PassageStore.open(tiny_setup.index_dir / "passages")
    encode_corpus(store, lambda titles, texts: np.ones((len(texts), 4), np.float32), root / "shards",
                  shard_size=40, progress=False)
    atomic_torch_save({"state_dict": {"w": torch.arange(4000.0)}}, root / "last.ckpt")
    eval_out = root / "eval"
    _rag_eval(root / "model", tiny_setup.index_dir, questions, eval_out)
    return {"model": root / "model", "index": tiny_setup.index_dir, "questions": questions, "shards": root / "shards",
            "ckpt": root / "last.ckpt", "eval": eval_out}


def _rag_eval(model: Path, index: Path, questions: Path, out: Path, *extra: str) -> None:
    argv = ["rag-eval", f"checkpoint={model}", f"index.path={index}", f"questions={questions}", f"out_dir={out}",
            "progress=false", "n_docs=2", "recall_depth=2", *extra]
    saved = sys.argv
    sys.argv = argv
    try:
        eval_main()
    finally:
        sys.argv = saved


# ---- damages -------------------------------------------------------------------------------------
def cut_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def cut_to_1000(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def flip_byte(path: Path) -> None:
    """One byte in the middle changed: same size, another content (caught by the hash only)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def delete(path: Path) -> None:
    path.unlink()


def bad_json(path: Path) -> None:
    path.write_text('{"count": 3,,}')


def bad_json_same_size(path: Path) -> None:
    """Garbage of exactly the file's size: only parsing (or the hash) can tell."""
    path.write_text("{" + "x" * (path.stat().st_size - 1))


def garbage_header(path: Path) -> None:
    path.write_bytes(b"\x00" * path.stat().st_size)


def other_tokenizer(path: Path) -> None:
    """The generator's tokenizer.json replaced by the question encoder's (another vocabulary)."""
    path.write_bytes((path.parents[1] / "question_encoder" / "tokenizer.json").read_bytes())


def same_size_other_vocab(path: Path) -> None:
    """tokenizer.json with one two-letter token reversed: same size, another tokenizer (caught by --verify only)."""
    text = path.read_text(encoding="utf-8")
    vocab = json.loads(text)["model"]["vocab"]
    token = next(key for key in vocab if len(key) == 2 and key.isalpha() and key[0] != key[1]
                 and key[::-1] not in vocab)
    path.write_text(text.replace(f'"{token}"', f'"{token[::-1]}"', 1), encoding="utf-8")


# ---- runners: copy what the command reads, damage it, run the command ------------------------------
@dataclass(frozen=True)
class Row:
    """One damaged input: which command, which file (relative to which original), how, what must be named."""

    command: str  # ask | ask-verify | eval | eval-verify | store | shards | ckpt | ckpt-verify | score
    target: str  # key of `originals`
    file: str  # relative to the target ("" for a file target)
    damage: Callable[[Path], None]
    old: bool = False  # remove the directory's checksums.json first (written before file manifests)


def _copy(originals: dict[str, Path], tmp: Path) -> dict[str, Path]:
    copies = {}
    for key, path in originals.items():
        copies[key] = tmp / (key if path.is_dir() else path.name)
        if path.is_dir():
            shutil.copytree(path, copies[key])
        else:
            shutil.copyfile(path, copies[key])
    return copies


def _run(row: Row, copies: dict[str, Path], capsys) -> tuple[int, str]:
    """(exit status, what the user reads) of the row's command on the damaged copies."""
    model, index, questions = copies["model"], copies["index"], copies["questions"]
    if row.command.startswith("ask"):
        argv = ["--checkpoint", str(model), "--index", str(index), "--device", "cpu", "who founded it?"]
        try:  # every command exits 2 on bad input (rag_models/cli_errors.py)
            code = ask_main(argv + (["--verify"] if row.command == "ask-verify" else []))
        except SystemExit as exited:
            code = int(exited.code)
        return code, capsys.readouterr().err
    if row.command.startswith("eval"):
        try:
            _rag_eval(model, index, questions, copies["eval"].parent / "eval_out",
                      *(["verify=true"] if row.command == "eval-verify" else []))
        except SystemExit as exited:
            return int(exited.code), capsys.readouterr().err
        return 0, capsys.readouterr().err
    if row.command == "score":
        try:
            code = score_main(["--predictions", str(copies["eval"] / "predictions.jsonl"),
                               "--references", str(questions)])
        except SystemExit as exited:
            code = int(exited.code)
        return code, capsys.readouterr().err
    loaders = {"store": lambda: PassageStore.open(index / "passages"), "shards": lambda: load_shards(copies["shards"]),
               "ckpt": lambda: safe_torch_load(copies["ckpt"])}
    try:
        loaders[row.command.removesuffix("-verify")]()
    except InputError as err:
        return 2, str(err)
    return 0, ""


ROWS = {
    # the reliability cases' two headline inputs
    "safetensors cut in half": Row("ask", "model", "generator/model.safetensors", cut_half),
    "texts.bin cut to 1000 bytes (rag-eval)": Row("eval", "index", "passages/texts.bin", cut_to_1000),
    "texts.bin cut to 1000 bytes (rag-ask)": Row("ask", "index", "passages/texts.bin", cut_to_1000),
    # checkpoint
    "question encoder weights cut": Row("eval", "model", "question_encoder/model.safetensors", cut_half),
    "generator weights, a byte flipped, --verify": Row("ask-verify", "model", "generator/model.safetensors",
                                                        flip_byte),
    "generator weights, a byte flipped, verify=true": Row("eval-verify", "model", "generator/model.safetensors",
                                                           flip_byte),
    "generator config.json missing": Row("ask", "model", "generator/config.json", delete),
    "rag_config.json bad JSON": Row("ask", "model", "rag_config.json", bad_json),
    "another tokenizer.json": Row("ask", "model", "generator/tokenizer.json", other_tokenizer),
    "tokenizer.json, a token changed, --verify": Row("ask-verify", "model", "generator/tokenizer.json",
                                                      same_size_other_vocab),
    "checksums.json bad JSON": Row("ask", "model", MANIFEST_NAME, bad_json),
    "old checkpoint, safetensors cut": Row("ask", "model", "generator/model.safetensors", cut_half, old=True),
    "old checkpoint, safetensors zeroed": Row("ask", "model", "generator/model.safetensors", garbage_header,
                                              old=True),
    "old checkpoint, tokenizer.json garbage": Row("ask", "model", "generator/tokenizer.json", bad_json_same_size,
                                                  old=True),
    # index
    "index.faiss cut": Row("ask", "index", "index/index.faiss", cut_half),
    "vectors.npy cut": Row("eval", "index", "index/vectors.npy", cut_half),
    "vectors.npy a byte flipped, --verify": Row("ask-verify", "index", "index/vectors.npy", flip_byte),
    "index manifest.json bad JSON": Row("ask", "index", "index/manifest.json", bad_json_same_size),
    "old index, index.faiss cut": Row("ask", "index", "index/index.faiss", cut_half, old=True),
    "old index, vectors.npy header zeroed": Row("ask", "index", "index/vectors.npy", garbage_header, old=True),
    # passage store
    "store meta.json bad JSON": Row("store", "index", "passages/meta.json", bad_json_same_size),
    "store texts.off missing": Row("store", "index", "passages/texts.off", delete),
    "store titles.bin a byte flipped, verify=true": Row("eval-verify", "index", "passages/titles.bin", flip_byte),
    "old store, texts.bin cut": Row("store", "index", "passages/texts.bin", cut_to_1000, old=True),
    "old store, texts.off cut": Row("store", "index", "passages/texts.off", cut_half, old=True),
    # encoding shards, Lightning checkpoint, evaluation output
    "shard .npy cut": Row("shards", "shards", "shard_00001.npy", cut_half),
    "encoding.json bad JSON": Row("shards", "shards", "encoding.json", bad_json),
    "last.ckpt cut": Row("ckpt", "ckpt", "", cut_half),
    "last.ckpt a byte flipped, verify": Row("ckpt-verify", "ckpt", "", flip_byte),
    "predictions.jsonl cut (rag-score)": Row("score", "eval", "predictions.jsonl", cut_half),
}


@pytest.mark.parametrize("name", list(ROWS))
def test_damaged_file_is_refused_by_name(originals, tmp_path, capsys, monkeypatch, name):
    row = ROWS[name]
    copies = _copy(originals, tmp_path)
    base = copies[row.target]
    if row.old:
        for hidden in (MANIFEST_NAME, MARKER_NAME):
            for found in base.rglob(hidden):
                found.unlink()
    damaged = base / row.file if row.file else base
    row.damage(damaged)
    # set either way, so that teardown restores it after `request_verify` (--verify) changed it
    monkeypatch.setenv("RAG_VERIFY_FILES", "1" if row.command == "ckpt-verify" else "0")
    code, message = _run(row, copies, capsys)
    assert code == 2, f"{name}: exit {code}, expected 2 (silent result?)\n{message}"
    assert "Traceback" not in message
    assert damaged.name in message, message
    assert any(word in message.lower() for word in FIX_WORDS), message


def test_rag_build_index_rebuilds_a_damaged_store_and_index(tiny_setup, tmp_path, capsys):
    """A re-run of rag-build-index over a damaged output rebuilds what is damaged instead of refusing forever."""
    out = tmp_path / "out"
    shutil.copytree(tiny_setup.index_dir, out)
    cut_to_1000(out / "passages" / "texts.bin")
    cut_half(out / "index" / "vectors.npy")
    build_index(tiny_setup.world.v1_passages, tiny_setup.models.context_encoder, out, factory="Flat",
                max_length=128, progress=False)
    err = capsys.readouterr().err
    assert "texts.bin" in err and "vectors.npy" in err and err.count("building it again") == 2
    fresh = PassageStore.open(out / "passages")
    assert fresh.texts([0]) == PassageStore.open(tiny_setup.index_dir / "passages").texts([0])
    assert (out / "index" / "vectors.npy").stat().st_size == (tiny_setup.index_dir / "index" / "vectors.npy").stat(
    ).st_size
