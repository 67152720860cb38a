"""End to end against transformers: question strings in, the same passages, scores, answers and losses out.

(a) transformers' pipeline: a knowledge base built as its `use_own_knowledge_dataset.py` builds one
    (datasets directory + HNSW .faiss), `RagRetriever` with ``index_name="custom"``, and
    `RagSequenceForGeneration` / `RagTokenForGeneration` `.generate` / forward with that retriever.
(b) ours: `rag-import` of the same saved checkpoints, `rag-build-index --from-dataset` of the same
    dataset (our Flat index, and the reused .faiss file), then `answer()` / `rag-eval` / `RagModel`.

Where transformers' own behaviour is a bug, the tests go around it and say so:
- RAG-Sequence ``generate(n_docs=k)`` generates candidates from k docs but scores them with a forward
  that reads ``config.n_docs`` docs (`test_transformers_rag_sequence_scores_with_config_n_docs`): its
  side runs with ``config.n_docs = k``.
- RAG-Sequence adds log p(z|x) at target position 1, so a hypothesis with a single token after the
  decoder start loses it (tests/test_marginalize.py); ``min_length=3`` keeps every hypothesis longer.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import RagRetriever, RagTokenForGeneration, RagTokenizer
from transformers.utils import logging as hf_logging

from decoding.answer import DecodingSettings, answer
from decoding.retrieve import retrieve
from index.dataset_export import export_knowledge_dataset
from index.dataset_import import import_dataset
from index.passage_files import iter_passages
from index.retrieval import Retriever
from rag_models.checkpoint import load_rag_model
from rag_models.tiny_models import TinyBartSize, save_tiny_checkpoints
from rag_models.transformers_rag import export_transformers_rag, import_transformers_rag
from tiny_setup import TEST_DPR, TinySetup
from training.config import compose
from training.demo.transformers_example import (
    HF_CLASSES,
    bag_of_words_encoders,
    build_knowledge_dataset,
    save_transformers_rag,
    train_title_copier,
)
from training.evaluation.eval_cli import evaluate

BART = TinyBartSize(d_model=64, layers=2, heads=2, ffn_dim=128, max_positions=256, vocab_size=300, dropout=0.0)
MAX_LENGTH, MIN_LENGTH = 8, 3
MAX_COMBINED = 128


@pytest.fixture(scope="module")
def pipeline(tiny_setup: TinySetup, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Both pipelines over the tiny world's passages, for RAG-Sequence and RAG-Token."""
    hf_logging.set_verbosity_error()
    out = tmp_path_factory.mktemp("pipeline")
    passages = list(iter_passages(tiny_setup.world.v1_passages))
    by_town: dict[str, dict] = {}  # one question per town: different questions retrieve different passages
    for line in tiny_setup.world.test.read_text().splitlines():
        by_town.setdefault(json.loads(line)["passage_id"], json.loads(line))
    questions = list(by_town.values())[:6]
    texts = [f"{p.title} {p.text}" for p in passages] + [q["question"] for q in questions]
    checkpoints = save_tiny_checkpoints(out / "tiny", texts, dpr_size=TEST_DPR, bart_size=BART, seed=3)
    bag_of_words_encoders(checkpoints)
    train_title_copier(checkpoints.generator, [p.title for p in passages], [p.text for p in passages], steps=250)
    kb = build_knowledge_dataset([p.title for p in passages], [p.text for p in passages],
                                 checkpoints.context_encoder, out / "kb")
    ours_flat = Retriever.from_dir(import_dataset(kb.dataset_path, out / "ours_flat", progress=False))
    ours_reused = Retriever.from_dir(import_dataset(kb.dataset_path, out / "ours_reused", faiss_index=kb.index_path,
                                                    progress=False))
    models = {}
    for marginalization in HF_CLASSES:
        hf_dir = save_transformers_rag(checkpoints, marginalization, out / f"hf_{marginalization}", n_docs=5,
                                       index_name="custom", passages_path=str(kb.dataset_path),
                                       index_path=str(kb.index_path), retrieval_vector_size=kb.dim,
                                       max_combined_length=MAX_COMBINED)
        retriever = RagRetriever.from_pretrained(hf_dir)
        theirs = HF_CLASSES[marginalization].from_pretrained(hf_dir, retriever=retriever).eval()
        ours = load_rag_model(import_transformers_rag(hf_dir, out / f"ours_{marginalization}")).eval()
        models[marginalization] = SimpleNamespace(theirs=theirs, retriever=retriever, ours=ours,
                                                  tokenizer=RagTokenizer.from_pretrained(hf_dir),
                                                  checkpoint=out / f"ours_{marginalization}")
    # the world's questions, plus one long enough to be truncated inside max_combined_length
    strings = [q["question"] for q in questions] + [" ".join(q["question"] for q in questions)]
    return SimpleNamespace(models=models, questions=strings, answers=[q["answer"][0] for q in questions] + ["x"],
                           retrievers={"flat": ours_flat, "reused_faiss": ours_reused}, out=out, kb=kb)


def _their_retrieval(m: SimpleNamespace, questions: list[str], k: int) -> dict:
    enc = m.tokenizer(questions, padding=True, return_tensors="pt")
    with torch.no_grad():
        q = m.theirs.question_encoder(enc["input_ids"], attention_mask=enc["attention_mask"])[0]  # (B, D)
    out = m.retriever(enc["input_ids"], q.numpy(), n_docs=k, return_tensors="pt")
    scores = torch.bmm(q.unsqueeze(1), torch.as_tensor(out["retrieved_doc_embeds"]).float().transpose(1, 2))
    return {"ids": torch.as_tensor(out["doc_ids"]), "scores": scores.squeeze(1), **out}


@pytest.mark.parametrize("index", ["flat", "reused_faiss"])
@pytest.mark.parametrize("k", [5, 10])
def test_same_passages_scores_and_generator_inputs(pipeline, index: str, k: int):
    m = pipeline.models["sequence"]
    theirs = _their_retrieval(m, pipeline.questions, k)
    ours = retrieve(m.ours, pipeline.retrievers[index], pipeline.questions, k)
    assert torch.equal(ours.docs.ids, theirs["ids"])  # store rows = dataset rows, same order
    scores = m.ours.doc_scores(ours.question_vectors, ours.docs.vectors)
    torch.testing.assert_close(scores, theirs["scores"], atol=1e-5, rtol=0)
    ids, mask = m.ours.build_generator_inputs(pipeline.questions, ours.docs)
    assert torch.equal(ids, theirs["context_input_ids"]) and torch.equal(mask, theirs["context_attention_mask"])
    assert (mask.sum(1) == MAX_COMBINED).any()  # the long question was truncated inside the combined input


def _their_answers(m: SimpleNamespace, questions: list[str], k: int, num_beams: int, *,
                   config_n_docs: int | None = None) -> list[str]:
    """transformers' generate, with config.n_docs = k (module docstring).

    ``config_n_docs``: what its config says instead (to show the bug).
    """
    saved = m.theirs.config.n_docs
    m.theirs.config.n_docs = k if config_n_docs is None else config_n_docs
    try:
        enc = m.tokenizer(questions, padding=True, return_tensors="pt")
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            generated = m.theirs.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], n_docs=k,
                                          num_beams=num_beams, max_length=MAX_LENGTH, min_length=MIN_LENGTH)
    finally:
        m.theirs.config.n_docs = saved
    return [s.strip() for s in m.tokenizer.generator.batch_decode(generated, skip_special_tokens=True)]


@pytest.mark.parametrize("marginalization,strategy,num_beams", [
    ("sequence", "thorough", 1), ("sequence", "thorough", 4), ("token", "greedy", 1), ("token", "beam", 4),
])
@pytest.mark.parametrize("k", [5, 10])
def test_same_answer_strings(pipeline, marginalization: str, strategy: str, num_beams: int, k: int):
    m = pipeline.models[marginalization]
    theirs = _their_answers(m, pipeline.questions, k, num_beams)
    settings = DecodingSettings(strategy=strategy, num_beams=num_beams, max_length=MAX_LENGTH, min_length=MIN_LENGTH,
                                n_docs=k)
    ours = [a.text for a in answer(pipeline.questions, pipeline.retrievers["flat"], m.ours, settings, progress=False)]
    assert ours == theirs
    assert len(set(theirs)) > 1  # random weights that answer everything alike would make this trivially true


@pytest.mark.parametrize("marginalization", ["sequence", "token"])
@pytest.mark.parametrize("k", [5, 10])
def test_same_loss_of_question_answer_pairs(pipeline, marginalization: str, k: int):
    m = pipeline.models[marginalization]
    questions, answers = pipeline.questions, pipeline.answers
    retrieval = retrieve(m.ours, pipeline.retrievers["flat"], questions, k)
    batch = m.ours.prepare_inputs(questions, retrieval.docs, answers)
    with torch.no_grad():
        ours = m.ours(**batch, n_docs=k)
        # transformers' labels: the decoder start token, then the same target ids, fed unshifted
        target = batch["target"]
        labels = torch.cat([target.new_full((len(questions), 1), m.ours.generator.decoder_start_token_id), target], 1)
        enc = m.tokenizer(questions, padding=True, return_tensors="pt")
        theirs = m.theirs(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels, n_docs=k,
                          reduce_loss=False)
    torch.testing.assert_close(ours.nll, theirs.loss, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(ours.doc_scores, theirs.doc_scores, atol=1e-5, rtol=0)


def test_rag_eval_writes_transformers_answers(pipeline, tmp_path: Path):
    m = pipeline.models["sequence"]
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question": q, "answer": [a]}) + "\n"
                                 for q, a in zip(pipeline.questions, pipeline.answers)))
    evaluate(compose([f"checkpoint={m.checkpoint}", f"questions={questions}",
                      f"index.path={pipeline.out / 'ours_flat'}", "index.factory=null", "decoding=thorough",
                      "decoding.num_beams=1", f"decoding.max_length={MAX_LENGTH}", f"decoding.min_length={MIN_LENGTH}",
                      "n_docs=5", "recall_depth=10", "progress=false", f"out_dir={tmp_path / 'eval'}"],
                     config_name="eval"))
    records = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in records] == _their_answers(m, pipeline.questions, 5, 1)


def test_transformers_rag_sequence_scores_with_config_n_docs(pipeline, monkeypatch):
    """Why the comparison sets transformers' config.n_docs to k: generate(n_docs=10) generates candidates from
    10 docs, then scores them with a forward that marginalizes over config.n_docs (5) docs only."""
    m = pipeline.models["sequence"]
    scored_with = []
    forward = type(m.theirs).forward

    def spy(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        scored_with.append(out.doc_scores.shape[1])  # (candidates, docs marginalized over)
        return out

    monkeypatch.setattr(type(m.theirs), "forward", spy)
    _their_answers(m, pipeline.questions[:1], 10, 1, config_n_docs=5)
    assert set(scored_with) == {5}
    scored_with.clear()
    _their_answers(m, pipeline.questions[:1], 10, 1)  # as compared above: config.n_docs = 10
    assert set(scored_with) == {10}


def test_exported_model_and_index_answer_in_transformers_as_here(pipeline, tmp_path: Path):
    """rag-export-index + rag-export --knowledge: RagRetriever.from_pretrained(export) needs nothing else, and
    transformers answers as we do; the exported knowledge base imports back to the same rows and vectors."""
    m = pipeline.models["token"]
    knowledge = export_knowledge_dataset(pipeline.out / "ours_flat", tmp_path / "kb", progress=False)
    exported = export_transformers_rag(m.checkpoint, tmp_path / "hf", knowledge=knowledge)
    theirs = SimpleNamespace(theirs=RagTokenForGeneration.from_pretrained(
        exported, retriever=RagRetriever.from_pretrained(exported)).eval(),
        tokenizer=RagTokenizer.from_pretrained(exported))
    settings = DecodingSettings(strategy="beam", num_beams=4, max_length=MAX_LENGTH, min_length=MIN_LENGTH, n_docs=5)
    ours = [a.text for a in answer(pipeline.questions, pipeline.retrievers["flat"], m.ours, settings, progress=False)]
    assert _their_answers(theirs, pipeline.questions, 5, 4) == ours
    back = Retriever.from_dir(import_dataset(knowledge / "dataset", tmp_path / "back",
                                             faiss_index=knowledge / "index.faiss", progress=False))
    original = pipeline.retrievers["flat"]
    rows = list(range(len(original)))
    assert back.passages.ids(rows) == original.passages.ids(rows)
    assert back.passages.texts(rows) == original.passages.texts(rows)
    ids = torch.arange(len(original)).view(1, -1).numpy()
    assert (back.index.vectors(ids) == original.index.vectors(ids)).all()
