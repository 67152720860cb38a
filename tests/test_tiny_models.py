"""Tiny offline models: tokenizers trained locally, and the save -> load round trip."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from rag_models.errors import InputError
from rag_models.loaders import load_encoder_checkpoint, load_generator_checkpoint
from rag_models.tiny_models import TinyBartSize, TinyDprSize, save_tiny_checkpoints, tiny_bart, tiny_dpr_encoder
from rag_models.tokenization import WORDPIECE_SPECIALS, dpr_tokenizers, train_bart_tokenizer, train_wordpiece_vocab

TEXTS = [
    "Quenby lies on the river Varn in the region of Oster.",
    "which river flows through Quenby?",
    "Marrowick was founded in 1742 by Elsa Tarn; its main export is copper.",
    "who founded Marrowick?",
] * 20
PROBES = ["who founded Quenby?", "Unseen wörds, punctuation!? and 1999"]


def same_tokenization(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase, texts: list[str]) -> bool:
    """True when two tokenizers give identical ids on every text (round-trip checks)."""
    return all(a(t)["input_ids"] == b(t)["input_ids"] for t in texts)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    return save_tiny_checkpoints(out, TEXTS, dpr_size=TinyDprSize(vocab_size=200),
                                 bart_size=TinyBartSize(vocab_size=300))


def test_wordpiece_tokenizer_adds_cls_sep_and_lowercases():
    q_tok, c_tok = dpr_tokenizers(train_wordpiece_vocab(TEXTS, 200))
    ids = q_tok("Who founded QUENBY?")["input_ids"]
    assert ids[0] == q_tok.cls_token_id and ids[-1] == q_tok.sep_token_id
    assert q_tok.decode(ids, skip_special_tokens=True) == "who founded quenby?"
    # Context side: DPR feeds "title [SEP] text" as a pair.
    pair = c_tok("Quenby", "lies on the river Varn")["input_ids"]
    assert pair.count(c_tok.sep_token_id) == 2


def test_wordpiece_vocabulary_merges_frequent_pieces_and_keeps_every_character():
    vocab = train_wordpiece_vocab(TEXTS, 200)
    assert list(vocab)[:5] == WORDPIECE_SPECIALS and sorted(vocab.values()) == list(range(len(vocab)))
    assert {"q", "##u", "##7", "?"} <= set(vocab)  # word-initial and word-internal characters
    assert {"quenby", "founded", "river"} <= set(vocab)  # frequent words end up whole
    small = train_wordpiece_vocab(TEXTS, 60)  # the size is a cap, filled in merge order
    assert list(small) == list(vocab)[:60]


def test_wordpiece_vocabulary_is_the_same_in_every_process():
    """The same texts must give the same ids in a fresh process (tokenizers' own trainer did not)."""
    script = ("import json, sys; from rag_models.tokenization import train_wordpiece_vocab; "
              "print(json.dumps(train_wordpiece_vocab(json.loads(sys.stdin.read()), 200)))")
    runs = [subprocess.run([sys.executable, "-c", script], input=json.dumps(TEXTS), capture_output=True, text=True,
                           check=True) for _ in range(2)]
    here = train_wordpiece_vocab(TEXTS, 200)
    assert [json.loads(run.stdout) for run in runs] == [here, here]


def test_byte_level_bpe_round_trips_any_text():
    tok = train_bart_tokenizer(TEXTS, 300)
    for text in PROBES:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert tok.unk_token_id not in ids  # byte-level: nothing is unknown
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id) == (0, 1, 2)  # BART's layout


def test_tiny_models_are_seeded():
    a = tiny_dpr_encoder("question", 100, TinyDprSize(), seed=3)
    b = tiny_dpr_encoder("question", 100, TinyDprSize(), seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    bart = tiny_bart(train_bart_tokenizer(TEXTS, 300), TinyBartSize(), seed=0)
    assert bart.config.init_std == pytest.approx(0.06)


def test_tiny_bart_dropout_setting_is_saved_and_used():
    """The demo trains its reader without dropout: the rate must reach the saved config and the forward pass."""
    tok = train_bart_tokenizer(TEXTS, 300)
    ids = torch.tensor([tok("the town lies on a river")["input_ids"]])
    for rate, same in ((0.0, True), (0.5, False)):
        bart = tiny_bart(tok, TinyBartSize(d_model=32, layers=1, heads=2, ffn_dim=64, vocab_size=300, dropout=rate),
                         seed=0)
        assert bart.config.dropout == rate
        bart.train()
        first, second = (bart(input_ids=ids, decoder_input_ids=ids).logits for _ in range(2))
        assert torch.equal(first, second) is same


@pytest.mark.parametrize("role", ["question", "context"])
def test_encoder_round_trip_gives_identical_outputs(checkpoints, role):
    path = checkpoints.question_encoder if role == "question" else checkpoints.context_encoder
    model, tok = load_encoder_checkpoint(path, role)
    again_dir = path.parent / f"{role}_again"
    model.save_pretrained(again_dir)
    tok.save_pretrained(again_dir)
    model2, tok2 = load_encoder_checkpoint(again_dir, role)
    assert type(model2) is type(model)
    assert same_tokenization(tok, tok2, PROBES)
    batch = tok(PROBES, padding=True, return_tensors="pt")
    with torch.no_grad():
        out1 = model(**batch).pooler_output
        out2 = model2(**batch).pooler_output
    assert out1.shape == (2, 64)
    assert torch.equal(out1, out2)


def test_generator_round_trip_gives_identical_outputs(checkpoints, tmp_path):
    model, tok = load_generator_checkpoint(checkpoints.generator)
    model.save_pretrained(tmp_path / "g")
    tok.save_pretrained(tmp_path / "g")
    model2, tok2 = load_generator_checkpoint(tmp_path / "g")
    assert same_tokenization(tok, tok2, PROBES)
    batch = tok(PROBES, padding=True, return_tensors="pt")
    labels = tok(["Varn", "1742"], padding=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits1 = model(**batch, labels=labels).logits
        logits2 = model2(**batch, labels=labels).logits
    assert logits1.shape[:2] == labels.shape
    assert torch.equal(logits1, logits2)


def test_unknown_checkpoint_names_the_setting_and_the_fix(tmp_path):
    with pytest.raises(InputError, match="cannot load model") as err:
        load_generator_checkpoint(tmp_path / "no_such_model")
    assert "no_such_model" in str(err.value)
    with pytest.raises(InputError, match="role"):
        load_encoder_checkpoint(tmp_path, "answer")
