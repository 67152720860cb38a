"""Encoders and pooling, generator input formatting and targets, RagModel assembly, save/load, configs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from transformers import BertConfig, BertModel

from rag_models.checkpoint import build_rag_model, load_rag_model, save_rag_model
from rag_models.docs import RetrievedDocs
from rag_models.errors import InputError
from rag_models.generator import MIN_PASSAGE_TOKENS, Generator
from rag_models.rag import RagModel
from rag_models.retriever import DenseEncoder, doc_scores, load_encoder, tokenize_passages
from rag_models.tiny_models import TinyBartSize, TinyDprSize, save_tiny_checkpoints

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUESTIONS = ["what is the color of Quenby?", "who founded Marrowick?"]
TITLES = [["Quenby", "Marrowick"], ["Marrowick", "Quenby"]]
LONG = "Quenby is a green town on the river Varn, famous for copper and wool. " * 8
TEXTS = [[LONG, "Marrowick was founded by Elsa Tarn."], ["Marrowick was founded by Elsa Tarn.", LONG]]
CORPUS = QUESTIONS + [LONG, "Marrowick was founded by Elsa Tarn.", "green", "Elsa Tarn"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Tiny DPR encoders and BART saved as ordinary checkpoints."""
    return save_tiny_checkpoints(
        tmp_path_factory.mktemp("tiny"), CORPUS * 5,
        dpr_size=TinyDprSize(hidden_size=32, num_layers=1, intermediate_size=64, max_positions=128, vocab_size=200),
        bart_size=TinyBartSize(d_model=32, layers=1, heads=2, ffn_dim=64, max_positions=128, vocab_size=300),
    )


@pytest.fixture(scope="module")
def model(ckpt) -> RagModel:
    return build_rag_model(
        question_encoder=str(ckpt.question_encoder), context_encoder=str(ckpt.context_encoder),
        generator=str(ckpt.generator), n_docs=2, max_source_length=40, max_target_length=16, max_passage_length=64,
    ).eval()


def _docs(dim: int) -> RetrievedDocs:
    vectors = torch.randn(2, 2, dim, generator=torch.Generator().manual_seed(0))
    return RetrievedDocs(ids=torch.arange(4).view(2, 2), scores=torch.zeros(2, 2), vectors=vectors, titles=TITLES,
                         texts=TEXTS)


def test_dpr_pooler_and_cls_pooling_agree_and_mean_ignores_pads(ckpt):
    pooler, tok = load_encoder(ckpt.question_encoder, role="question")
    assert pooler.pooling == "pooler" and pooler.dim == 32
    cls = DenseEncoder(pooler.model, pooling="cls")
    enc = tok(QUESTIONS, padding=True, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    with torch.no_grad():
        torch.testing.assert_close(pooler(**batch), cls(**batch))  # DPR without projection pools CLS
        mean = DenseEncoder(pooler.model, pooling="mean")
        alone = tok(QUESTIONS[1:], return_tensors="pt")
        assert enc["attention_mask"][1].sum() < enc["attention_mask"].shape[1]  # the second question is padded
        single = mean(alone["input_ids"], alone["attention_mask"])
        torch.testing.assert_close(mean(**batch)[1], single[0], atol=1e-5, rtol=0)
    assert mean(**batch).shape == (2, 32)


def test_any_transformers_encoder_with_saved_pooling_round_trips(ckpt, tmp_path):
    config = BertConfig(vocab_size=200, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32)
    _, tok = load_encoder(ckpt.question_encoder, role="question")
    bert = DenseEncoder(BertModel(config).eval(), pooling="mean")
    bert.save_pretrained(tmp_path / "bert", tokenizer=tok)
    again, tok2 = load_encoder(tmp_path / "bert", role="context")  # auto: the saved pooling
    assert again.pooling == "mean" and type(again.model) is BertModel
    enc = tok2(QUESTIONS, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(bert(enc["input_ids"], enc["attention_mask"]),
                                   again(enc["input_ids"], enc["attention_mask"]))
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dir left behind


def test_doc_scores_are_inner_products_with_gradient():
    q = torch.randn(2, 4, requires_grad=True)
    d = torch.randn(2, 3, 4)
    scores = doc_scores(q, d)
    torch.testing.assert_close(scores, torch.einsum("bd,bkd->bk", q, d))
    scores.sum().backward()
    torch.testing.assert_close(q.grad, d.sum(1))
    with pytest.raises(InputError, match="same D"):
        doc_scores(q, torch.randn(2, 3, 5))


def test_passages_use_the_dpr_pair_format(ckpt):
    _, tok = load_encoder(ckpt.context_encoder, role="context")
    enc = tokenize_passages(tok, ["Quenby"], ["a green town"], max_length=16)
    assert tok.decode(enc["input_ids"][0]) == "[CLS] quenby [SEP] a green town [SEP]"
    assert tokenize_passages(tok, ["Q"], [LONG], max_length=16)["input_ids"].shape == (1, 16)


def test_question_is_never_truncated(model):
    gen = model.generator
    ids, mask = gen.build_inputs(QUESTIONS, TITLES, TEXTS)
    assert ids.shape[0] == 4 and ids.shape[1] <= gen.max_source_length
    rows = gen.decode(ids)
    for row, question in zip(rows, [q for q in QUESTIONS for _ in range(2)]):
        assert row.startswith(question + " // ")
    assert rows[0].startswith("what is the color of Quenby? // Quenby / Quenby is a green")
    # the long passage was cut, to exactly max_source_length tokens with bos and eos kept
    assert mask[0].sum() == gen.max_source_length and ids[0, -1] == gen.tokenizer.eos_token_id
    # transformers' format (question last) loses the question behind the same long passage
    theirs = Generator(gen.model, gen.tokenizer, max_source_length=40, input_format="transformers")
    assert "Quenby?" not in theirs.decode(theirs.build_inputs(QUESTIONS, TITLES, TEXTS)[0])[0]


def test_too_long_question_keeps_its_beginning_and_some_passage(model):
    gen = Generator(model.generator.model, model.generator.tokenizer, max_source_length=6)  # room 4: 2 + 2
    assert gen.question_budget == 2
    ids, mask = gen.build_inputs(QUESTIONS, TITLES, TEXTS)  # cut, never refused
    assert mask.sum(dim=1).tolist() == [6, 6, 6, 6]
    question = gen.tokenizer(QUESTIONS[0], add_special_tokens=False)["input_ids"]
    assert ids[0, 1:3].tolist() == question[:2]  # after bos: the question's first tokens
    assert [kept for _, kept in gen.question_cuts(QUESTIONS)] == [2, 2]
    long = Generator(gen.model, gen.tokenizer, max_source_length=40)
    assert long.question_budget == 19  # 38 beside bos and eos, less half of it for the passage
    room = 128 - 2  # the tiny BART's 128 positions, less bos and eos
    expected = room - min(MIN_PASSAGE_TOKENS, room // 2)
    assert Generator(gen.model, gen.tokenizer, max_source_length=128).question_budget == expected
    with pytest.raises(InputError, match="max_source_length"):
        Generator(gen.model, gen.tokenizer, max_source_length=2)
    with pytest.raises(InputError, match="max_target_length"):
        Generator(gen.model, gen.tokenizer, max_source_length=40, max_target_length=4096)
    with pytest.raises(InputError, match="same number"):
        gen.build_inputs(QUESTIONS, [["a"], ["b", "c"]], [["x"], ["y", "z"]])
    with pytest.raises(InputError, match="input_format"):
        Generator(gen.model, gen.tokenizer, max_source_length=6, input_format="question_last")
    with pytest.raises(InputError, match="positions"):
        Generator(gen.model, gen.tokenizer, max_source_length=4096)


def test_targets_follow_bart_conventions(model):
    gen = model.generator
    decoder_input_ids, target = gen.prepare_targets(["green", " Elsa Tarn "])
    tok = gen.tokenizer
    assert target[0, 0] == tok.bos_token_id and target[1, 0] == tok.bos_token_id
    assert target[1, (target[1] != tok.pad_token_id).sum() - 1] == tok.eos_token_id
    assert (decoder_input_ids[:, 0] == gen.model.config.decoder_start_token_id).all()
    assert torch.equal(decoder_input_ids[:, 1:], target[:, :-1])
    assert gen.decode(target) == ["green", "Elsa Tarn"]


def test_frozen_context_encoder_gets_no_gradient(model):
    model.zero_grad(set_to_none=True)
    batch = model.prepare_inputs(QUESTIONS, _docs(32), ["green", "Elsa Tarn"])
    model(**batch).loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in model.context_encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.question_encoder.parameters())
    assert all(p.grad is not None for p in model.generator.parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)


def test_end_to_end_mode_trains_the_context_encoder(ckpt):
    e2e = build_rag_model(
        question_encoder=str(ckpt.question_encoder), context_encoder=str(ckpt.context_encoder),
        generator=str(ckpt.generator),
        n_docs=2, max_source_length=40, max_target_length=16, max_passage_length=64, train_context_encoder=True,
        marginalization="token",
    ).eval()
    docs = _docs(32)
    batch = e2e.prepare_inputs(QUESTIONS, docs, ["green", "Elsa Tarn"])
    out = e2e(**batch)
    passages = e2e.tokenize_docs(docs)
    with torch.no_grad():
        q = e2e.embed_questions(batch["question_input_ids"], batch["question_attention_mask"])
        d = e2e.context_encoder(passages["input_ids"], passages["attention_mask"]).view(2, 2, -1)  # (B, K, D)
    torch.testing.assert_close(out.doc_scores, doc_scores(q, d))  # recomputed, not the index's vectors
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in e2e.context_encoder.parameters())
    without_ids = {k: v for k, v in batch.items() if not k.startswith("passage_")}
    torch.testing.assert_close(e2e(**without_ids).loss, out.loss)  # tokenized in forward when not given


def test_save_load_round_trip_is_exact(model, tmp_path):
    batch = model.prepare_inputs(QUESTIONS, _docs(32), ["green", "Elsa Tarn"])
    save_rag_model(model, tmp_path / "rag")
    save_rag_model(model, tmp_path / "rag")  # overwriting an existing save works too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rag"]
    again = load_rag_model(tmp_path / "rag").eval()
    assert again.settings() == model.settings() and again.context_encoder is not None
    with torch.no_grad():
        assert torch.equal(model(**batch).nll, again(**batch).nll)
    assert load_rag_model(tmp_path / "rag", n_docs=1).n_docs == 1
    with pytest.raises(InputError, match="rag_config.json"):
        load_rag_model(tmp_path)


def test_bad_settings_name_the_setting(ckpt):
    paths = {"question_encoder": str(ckpt.question_encoder), "generator": str(ckpt.generator), "max_source_length": 40}
    with pytest.raises(InputError, match="model.marginalization"):
        build_rag_model(**paths, marginalization="sequences")
    with pytest.raises(InputError, match="train_context_encoder"):
        build_rag_model(**paths, train_context_encoder=True)
    with pytest.raises(InputError, match="retriever.question_encoder"):
        build_rag_model(**{**paths, "question_encoder": None})


@pytest.mark.parametrize("name", ["rag_sequence", "rag_token"])
def test_model_configs_instantiate(ckpt, name):
    overrides = [
        f"+model={name}", "+retriever=tiny",
        f"retriever.question_encoder={ckpt.question_encoder}", f"retriever.context_encoder={ckpt.context_encoder}",
        f"model.generator={ckpt.generator}", "model.max_source_length=64",
    ]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose(overrides=overrides)
        built = instantiate(cfg.model)
        assert isinstance(built, RagModel) and built.marginalization == name.removeprefix("rag_")
        assert built.context_encoder is None and built.n_docs == 5
        with pytest.raises(InstantiationException, match="retriever.question_encoder"):  # Hydra wraps our InputError
            instantiate(compose(overrides=[f"+model={name}", "+retriever=tiny"]).model)
        real = compose(overrides=[f"+model={name}", "+retriever=dpr_nq"])
        assert real.model.question_encoder == "facebook/dpr-question_encoder-single-nq-base"
        assert real.retriever.context_encoder == "facebook/dpr-ctx_encoder-single-nq-base"
        assert real.model.generator == "facebook/bart-large"
