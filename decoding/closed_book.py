"""Closed-book answers: the generator reads the question alone, no retrieval (the baseline of RAG's Table 1).

Decoded as RAG-Sequence fast decoding over one pseudo-document, the question
itself, whose log p(z|x) is 0: that is plain greedy / beam search of the
generator, with the same beam bookkeeping and scores as the RAG decoders.

Shapes: B questions, L source length.
"""
from __future__ import annotations

import torch

from decoding.answer import Answer, DecodingSettings, eval_mode, to_answers
from decoding.rag_sequence import rag_sequence_generate
from rag_models.rag import RagModel


@torch.no_grad()
def answer_closed_book(questions: list[str], model: RagModel, settings: DecodingSettings) -> list[Answer]:
    """One Answer per question from the generator alone (no docs: empty doc_ids, titles, posteriors).

    ``settings.strategy`` and ``n_docs`` play no part; the beams, lengths and
    ``num_return_sequences`` apply to the generator's own search.
    """
    device = next(model.parameters()).device
    ids, mask = model.generator.build_question_inputs(questions)  # (B, L)
    scores = torch.zeros(len(questions), 1, device=device)  # (B, 1): log p(z|x) = 0 for the one pseudo-doc
    with eval_mode(model):
        result = rag_sequence_generate(model.generator.model, ids.to(device), mask.to(device), scores, mode="fast",
                                       **settings.search_kwargs())
    empty: list[list] = [[] for _ in questions]
    answers = to_answers(result, model.generator.decode(result.sequences), empty, empty)
    for found in answers:
        for candidate in (found, *found.alternatives):
            candidate.posteriors = []  # the pseudo-doc's posterior is 1 by construction: nothing to explain
    return answers
