"""Answers during training: retrieve for a batch of questions, decode, and score against the references.

Used by the LightningModule for ``val/em`` and ``val/recall@k`` and by the
sample-predictions callback. Decoding goes through `decoding.answer.answer`, the
same code rag-eval and rag-ask use, with the configured strategy; the docs are
retrieved here, deeper than the decoder reads, so that recall@k comes for free.
The closed-book baseline runs the RAG-Sequence decoder with one "document" (the
question alone), whose log p(z|x) is 0: plain greedy / beam search of the generator.

Shapes: B questions, K docs, L source length, D embedding dim.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from decoding.answer import answer
from decoding.rag_sequence import rag_sequence_generate
from rag_models.docs import RetrievedDocs
from rag_models.rag import RagModel
from training.metrics import exact_match, f1_score, first_answer_rank


@dataclass
class Prediction:
    """One decoded answer with the passages it was conditioned on (titles empty for closed-book)."""

    question: str
    text: str
    titles: list[str] = field(default_factory=list)
    doc_ids: list[int] = field(default_factory=list)


def encode_questions(model: RagModel, questions: list[str], device: torch.device) -> Tensor:
    """Question vectors (B, D) without gradient, for the index search."""
    enc = model.tokenize_questions(questions)
    with torch.no_grad():
        return model.embed_questions(enc["input_ids"].to(device), enc["attention_mask"].to(device)).detach()


def retrieve(model: RagModel, retriever, questions: list[str], k: int, device: torch.device) -> tuple[Tensor, RetrievedDocs]:
    """(q (B, D), top-k docs on ``device``): the no-grad side computation of every RAG step."""
    q = encode_questions(model, questions, device)  # (B, D)
    return q, retriever.retrieve(q.float(), k).to(device)


def closed_book_inputs(model: RagModel, questions: list[str]) -> tuple[Tensor, Tensor]:
    """Generator inputs from the question alone: input_ids (B, L), attention_mask (B, L), on CPU."""
    gen = model.generator
    enc = gen.tokenizer([gen.prefix + q.strip() for q in questions], max_length=gen.max_source_length,
                        truncation=True, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@torch.no_grad()
def predict_rag(model: RagModel, retriever, questions: list[str], *, retrieve_k: int, decoding: dict[str, Any],
                device: torch.device) -> tuple[list[Prediction], RetrievedDocs]:
    """Retrieve ``retrieve_k`` docs, decode from the first ``decoding["n_docs"]``; also returns all retrieved docs."""
    _, docs = retrieve(model, retriever, questions, retrieve_k, device)  # (B, D), (B, Kr)
    answers = answer(questions, None, model, docs=docs, batch_size=len(questions), progress=False, **decoding)
    predictions = [Prediction(q, a.text, a.titles, a.doc_ids) for q, a in zip(questions, answers)]
    return predictions, docs


@torch.no_grad()
def predict_closed_book(model: RagModel, questions: list[str], *, decoding: dict[str, Any],
                        device: torch.device) -> list[Prediction]:
    """Decode from the question alone (one pseudo-document with log p(z|x) = 0)."""
    ids, mask = closed_book_inputs(model, questions)  # (B, L)
    scores = torch.zeros(len(questions), 1, device=device)  # (B, 1)
    search = {k: decoding[k] for k in ("num_beams", "max_length", "min_length", "length_penalty", "early_stopping")}
    result = rag_sequence_generate(model.generator.model, ids.to(device), mask.to(device), scores, mode="fast", **search)
    return [Prediction(q, text) for q, text in zip(questions, model.generator.decode(result.sequences))]


def score_batch(predictions: list[Prediction], answers: list[list[str]], real: Tensor,
                docs: RetrievedDocs | None, recall_ks: tuple[int, ...]) -> dict[str, float]:
    """Sums over the real (non-padding) examples: em, f1, count, and hits@k for each k retrieved."""
    sums = {"em": 0.0, "f1": 0.0, "count": 0.0}
    depth = docs.n_docs if docs is not None else 0
    for k in recall_ks:
        if k <= depth:
            sums[f"recall@{k}"] = 0.0
    for i, (prediction, refs) in enumerate(zip(predictions, answers)):
        if not bool(real[i]):
            continue
        sums["count"] += 1
        sums["em"] += float(exact_match(prediction.text, refs))
        sums["f1"] += f1_score(prediction.text, refs)
        if docs is None:
            continue
        # Standard open-QA retrieval accuracy: an answer string occurs in a top-k passage (as rag-eval counts it).
        hit = first_answer_rank(refs, docs.texts[i])
        for k in recall_ks:
            if k <= depth:
                sums[f"recall@{k}"] += float(hit is not None and hit < k)
    return sums
