"""The first half of every question -> answer path: question vectors, then the index search.

Training steps, validation, `rag-eval`, `rag-ask` and `answer()` all embed and
search through `retrieve`, so the question encoder runs once per batch and the
vectors that searched the index are the ones that score the docs (q . d).

Shapes: B questions, K docs retrieved per question, D embedding dim.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from rag_models.docs import RetrievedDocs
from rag_models.rag import RagModel


class RetrieverLike(Protocol):
    """What retrieval needs from an index: `index.retrieval.Retriever` (or its sharded form)."""

    def retrieve(self, question_vectors: Tensor, k: int) -> RetrievedDocs: ...


@dataclass
class Retrieval:
    """Question vectors and the docs they found.

    Fields:
        question_vectors: (B, D) no gradient, on the model's device and in its dtype.
        docs: (B, K) retrieved docs, best first, tensors on the same device (vectors float32).
    """

    question_vectors: Tensor
    docs: RetrievedDocs


@torch.no_grad()
def embed_questions(model: RagModel, questions: list[str]) -> Tensor:
    """Question vectors (B, D) without gradient, on the model's device, in the model's current mode."""
    device = next(model.parameters()).device
    batch = model.tokenize_questions(questions).to(device)  # (B, Lq)
    return model.embed_questions(batch["input_ids"], batch["attention_mask"])  # (B, D)


def retrieve(model: RagModel, retriever: RetrieverLike, questions: list[str], k: int) -> Retrieval:
    """Embed ``questions`` once and search the top ``k`` docs of each (B questions -> (B, K) docs).

    The index is searched with float32 vectors; the docs come back on the question
    vectors' device. Raises InputError (from the index) when it holds fewer than k passages.
    """
    question_vectors = embed_questions(model, questions)  # (B, D)
    docs = retriever.retrieve(question_vectors.float(), k).to(question_vectors.device)  # (B, K)
    return Retrieval(question_vectors, docs)
