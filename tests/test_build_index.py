"""rag-build-index end to end with a tiny random DPR context encoder: build, resume, reuse, refuse."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertTokenizerFast, DPRConfig, DPRContextEncoder

from index import build_cli
from index.build_cli import build_index, main
from index.manifest import IndexManifest
from index.passage_files import Passage, write_passages_tsv
from index.retrieval import Retriever
from rag_models.errors import InputError

REPO_ROOT = Path(__file__).resolve().parents[1]
WORDS = "river castle queen harbor mountain library engine violin orchard comet lantern meadow".split()


def _corpus(n: int = 30) -> list[Passage]:
    rng = np.random.default_rng(0)
    return [Passage(id=str(i + 1), title=f"{WORDS[i % 12]} {i}",
                    text=" ".join(rng.choice(WORDS, size=12).tolist())) for i in range(n)]


def _tiny_encoder(directory: Path, texts: list[str]) -> Path:
    """A random-init 32-d DPR context encoder with a WordPiece tokenizer trained on ``texts``, saved."""
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    raw = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    raw.normalizer = normalizers.BertNormalizer(lowercase=True)
    raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    raw.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=120, special_tokens=special))
    cls_id, sep_id = raw.token_to_id("[CLS]"), raw.token_to_id("[SEP]")
    raw.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tokenizer = BertTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(0)
    config = DPRConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=64)
    DPRContextEncoder(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("build")
    corpus = _corpus()
    write_passages_tsv(corpus, root / "psgs.tsv")
    encoder = _tiny_encoder(root / "ctx_encoder", [p.title + " " + p.text for p in corpus])
    return root, corpus, encoder


def _direct_vectors(encoder_dir: Path, corpus: list[Passage]) -> np.ndarray:
    """The passages encoded straight with transformers, DPR-style (title, text) pairs, zero segments."""
    from transformers import AutoTokenizer

    model, tokenizer = DPRContextEncoder.from_pretrained(encoder_dir).eval(), AutoTokenizer.from_pretrained(encoder_dir)
    batch = tokenizer([p.title for p in corpus], [p.text for p in corpus], padding=True, truncation=True,
                      max_length=64, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output.numpy()


def test_cli_builds_a_self_contained_index(setup, capsys):
    root, corpus, encoder = setup
    main(["--passages", str(root / "psgs.tsv"), "--encoder", str(encoder), "--out", str(root / "out"),
          "--batch-size", "4", "--shard-size", "7", "--max-length", "64", "--device", "cpu", "--no-progress"])
    assert "30 passages, dim 32, factory Flat" in capsys.readouterr().out
    assert sorted(p.name for p in (root / "out").iterdir()) == ["index", "passages"]  # shards cleaned up
    manifest = IndexManifest.load(root / "out" / "index")
    assert (manifest.count, manifest.dim, manifest.encoder,
            manifest.passages_path) == (30, 32, str(encoder), "../passages")
    want = _direct_vectors(encoder, corpus)
    stored = np.load(root / "out" / "index" / "vectors.npy")
    np.testing.assert_allclose(stored, want, rtol=1e-4, atol=1e-5)
    # Self-contained: copy the whole output elsewhere and it still opens, passages included.
    (root / "moved").mkdir()
    (root / "out").rename(root / "moved" / "out")
    retriever = Retriever.from_dir(root / "moved" / "out")
    docs = retriever.retrieve(torch.from_numpy(want[:2]), 3)
    # The exact top-3 of the stored vectors, compared by score: random tiny vectors can nearly tie,
    # and a near-tie may come back in either order.
    all_scores = want[:2] @ stored.T  # (2, 30)
    top_scores = -np.sort(-all_scores, axis=1)[:, :3]  # (2, 3)
    np.testing.assert_allclose(docs.scores.numpy(), top_scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(all_scores, docs.ids.numpy(), axis=1), top_scores, rtol=1e-5,
                               atol=1e-5)
    assert len(set(docs.ids[0].tolist())) == 3
    assert docs.texts[0][0] == corpus[int(docs.ids[0, 0])].text
    (root / "moved" / "out").rename(root / "out")


def test_killed_encoding_resumes_without_recomputing(setup, monkeypatch):
    root, corpus, encoder = setup
    real = build_cli.make_embed_fn
    calls: list[int] = []

    def counting(*args, die_after=None, **kwargs):
        embed = real(*args, **kwargs)

        def wrapped(titles, texts):
            if die_after is not None and len(calls) >= die_after:
                raise KeyboardInterrupt("killed")
            calls.append(len(titles))
            return embed(titles, texts)
        return wrapped

    monkeypatch.setattr(build_cli, "make_embed_fn", lambda *a, **k: counting(*a, die_after=5, **k))
    options = dict(batch_size=4, shard_size=8, max_length=64, progress=False)
    with pytest.raises(KeyboardInterrupt):
        build_index(root / "psgs.tsv", encoder, root / "resume", **options)  # 2 shards done, dies in the 3rd
    assert not (root / "resume" / "index").exists()
    with pytest.raises(InputError, match="no manifest.json"):
        Retriever.from_dir(root / "resume")
    calls.clear()
    monkeypatch.setattr(build_cli, "make_embed_fn", counting)
    build_index(root / "psgs.tsv", encoder, root / "resume", keep_shards=True, **options)
    assert sum(calls) == 30 - 16  # only the rows of the unfinished shards were encoded again
    np.testing.assert_allclose(np.load(root / "resume" / "index" / "vectors.npy"), _direct_vectors(encoder, corpus),
                               rtol=1e-4, atol=1e-5)
    assert (root / "resume" / "shards" / "shard_00000.npy").is_file()  # --keep-shards


def test_rerun_is_up_to_date_and_new_factory_reuses_vectors(setup, monkeypatch, capsys):
    root, _, encoder = setup
    build_index(root / "psgs.tsv", encoder, root / "again", max_length=64, progress=False)
    before = np.load(root / "again" / "index" / "vectors.npy")

    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded again although the vectors exist")

    monkeypatch.setattr(build_cli, "_encode", no_encoding)
    build_index(root / "psgs.tsv", encoder, root / "again", max_length=64, progress=False)
    assert "up to date" in capsys.readouterr().out
    build_index(root / "psgs.tsv", encoder, root / "again", factory="HNSW8", max_length=64, progress=False)
    assert IndexManifest.load(root / "again" / "index").factory == "HNSW8"
    np.testing.assert_array_equal(np.load(root / "again" / "index" / "vectors.npy"), before)
    build_index(root / "psgs.tsv", encoder, root / "again", factory="exact", max_length=64, progress=False)
    assert not (root / "again" / "index" / "index.faiss").exists()
    assert len(Retriever.from_dir(root / "again", backend="torch")) == 30


@pytest.mark.parametrize("factory, problem", [
    ("IVF256,PQ8", "256 IVF lists, but only 30 vectors"),  # more lists than passages
    ("PQ7", "multiple of the number of subquantizers"),  # 7 does not divide D=32
    ("PQ4", "256 PQ centroids per sub-quantizer"),  # 2^8 codes per sub-quantizer, 30 vectors
])
def test_factory_that_cannot_fit_is_refused_before_encoding(setup, tmp_path, monkeypatch, factory, problem):
    root, _, encoder = setup

    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded although the factory cannot be built")

    monkeypatch.setattr(build_cli, "encode_corpus", no_encoding)
    with pytest.raises(InputError, match=problem) as refused:
        build_index(root / "psgs.tsv", encoder, tmp_path / "out", factory=factory, max_length=64, progress=False)
    assert "--factory" in str(refused.value) or "index.factory" in str(refused.value)
    assert not (tmp_path / "out" / "shards").exists()


def test_factory_that_fits_small_corpus_is_built(setup, tmp_path):
    root, _, encoder = setup
    build_index(root / "psgs.tsv", encoder, tmp_path / "out", factory="IVF2,PQ4x4", max_length=64, progress=False)
    assert IndexManifest.load(tmp_path / "out" / "index").factory == "IVF2,PQ4x4"


def test_changed_passage_file_is_refused(setup, tmp_path, capsys):
    root, corpus, encoder = setup
    write_passages_tsv(corpus[:10], tmp_path / "psgs.tsv")
    build_index(tmp_path / "psgs.tsv", encoder, tmp_path / "out", factory="exact", max_length=64, progress=False)
    write_passages_tsv(corpus[:12], tmp_path / "psgs.tsv")
    with pytest.raises(SystemExit) as exit_info:
        main(["--passages", str(tmp_path / "psgs.tsv"), "--encoder", str(encoder), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "another file" in capsys.readouterr().err


def test_script_wrapper_shows_help():
    done = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "build_index.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--factory" in done.stdout and "--passages" in done.stdout
