"""Questions in, answers out: retrieve, build generator inputs, decode, attach provenance.

Used by evaluation and by ``rag-ask``. The strategy string picks a decoder from
`STRATEGIES`; "greedy" and "beam" search the RAG-Token marginal, "thorough" and
"fast" are RAG-Sequence's decoders. Without a strategy, the model's own
marginalization decides (token -> beam, sequence -> thorough).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Protocol

import torch
from tqdm import tqdm

from decoding.rag_sequence import rag_sequence_generate
from decoding.rag_token import rag_token_generate
from decoding.results import GenerationResult
from rag_models.docs import RetrievedDocs
from rag_models.errors import InputError


def _greedy(generator: Any, ids: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor, **search: Any) -> GenerationResult:
    """RAG-Token greedy decoding: one beam and one sequence, whatever the settings ask."""
    return rag_token_generate(generator, ids, mask, scores, **{**search, "num_beams": 1, "num_return_sequences": 1})


# strategy name -> decoder(generator, context_input_ids, context_attention_mask, doc_scores, **search)
STRATEGIES: dict[str, Callable[..., GenerationResult]] = {
    "greedy": _greedy,
    "beam": rag_token_generate,
    "thorough": partial(rag_sequence_generate, mode="thorough"),
    "fast": partial(rag_sequence_generate, mode="fast"),
}
# the model's marginalization -> its decoder when no strategy is given
DEFAULT_STRATEGY: dict[str, str] = {"token": "beam", "sequence": "thorough"}


class RetrieverLike(Protocol):
    """What `answer` needs from index.retrieval.Retriever."""

    def retrieve(self, question_vectors: torch.Tensor, k: int) -> RetrievedDocs: ...


@dataclass
class Answer:
    """One answer and where it came from.

    Fields:
        text: the decoded answer.
        score: the decoder's score of it (see GenerationResult.scores).
        doc_ids: the K retrieved passages' rows in the passage store, retrieval order.
        titles: their titles.
        posteriors: p(z_k|x,y) for each of them (sums to 1).
        alternatives: the next best answers when num_return_sequences > 1, best first.
    """

    text: str
    score: float
    doc_ids: list[int]
    titles: list[str]
    posteriors: list[float]
    alternatives: list["Answer"] = field(default_factory=list)

    def supporting(self, n: int = 3) -> list[tuple[str, float]]:
        """The titles of the `n` passages that best explain the answer, with their posteriors."""
        ranked = sorted(zip(self.titles, self.posteriors), key=lambda pair: -pair[1])
        return ranked[:n]


@dataclass(frozen=True)
class DecodingSettings:
    """How to decode (the Hydra target of configs/decoding/*.yaml); see `answer` for each field."""

    strategy: str | None = None
    num_beams: int = 4
    max_length: int = 40
    min_length: int = 0
    n_docs: int | None = None  # None: the model's n_docs (as trained)
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1

    def as_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `answer`."""
        return asdict(self)


def _to_answers(result: GenerationResult, texts: list[str], docs: RetrievedDocs) -> list[Answer]:
    """One Answer per question (its best hypothesis), the others as alternatives."""
    answers = []
    for b in range(result.batch_size):
        found = [
            Answer(
                text=texts[row],
                score=float(result.scores[row]),
                doc_ids=[int(i) for i in docs.ids[b].tolist()],
                titles=list(docs.titles[b]),
                posteriors=[float(p) for p in result.doc_posteriors[row].tolist()],
            )
            for row in result.question_rows(b)
        ]
        found[0].alternatives = found[1:]
        answers.append(found[0])
    return answers


def _docs_rows(docs: RetrievedDocs, start: int, end: int, k: int) -> RetrievedDocs:
    """Questions start..end of already retrieved docs, their first k docs."""
    return RetrievedDocs(
        ids=docs.ids[start:end, :k],
        scores=docs.scores[start:end, :k],
        vectors=docs.vectors[start:end, :k],
        titles=[row[:k] for row in docs.titles[start:end]],
        texts=[row[:k] for row in docs.texts[start:end]],
    )


@torch.no_grad()
def _answer_batch(
    questions: list[str],
    retriever: RetrieverLike | None,
    model: Any,
    strategy: str,
    k: int,
    search: dict[str, Any],
    docs: RetrievedDocs | None,
) -> list[Answer]:
    """Retrieve (unless `docs` are given), decode and explain one batch of questions."""
    device = next(model.parameters()).device
    batch = model.tokenize_questions(questions).to(device)
    q = model.embed_questions(batch["input_ids"], batch["attention_mask"])  # (B, D)
    if docs is None:
        docs = retriever.retrieve(q, k)
    ids, mask = model.generator.build_inputs(questions, docs.titles, docs.texts)  # (B*K, L)
    scores = model.doc_scores(q, docs.vectors.to(q.device, q.dtype))  # (B, K)
    result = STRATEGIES[strategy](model.generator.model, ids.to(device), mask.to(device), scores, n_docs=k, **search)
    return _to_answers(result, model.generator.decode(result.sequences), docs)


def answer(
    questions: list[str],
    retriever: RetrieverLike | None,
    model: Any,
    *,
    docs: RetrievedDocs | None = None,
    strategy: str | None = None,
    n_docs: int | None = None,
    num_beams: int = 4,
    max_length: int = 40,
    min_length: int = 0,
    num_return_sequences: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    batch_size: int = 16,
    progress: bool = True,
) -> list[Answer]:
    """Answer each question with a RagModel and a retriever; one Answer per question, in order.

    Args:
        retriever: searched for each batch, unless `docs` are given (then it may be None).
        docs: already retrieved docs for these questions (B, >= n_docs), e.g. deeper ones kept
            for recall@k; the first n_docs of each are read.
        strategy: "greedy" | "beam" (RAG-Token), "thorough" | "fast" (RAG-Sequence), or None
            for the model's own (token -> beam, sequence -> thorough).
        n_docs: docs retrieved per question; None = the model's n_docs (as trained).
        num_beams: beams (per doc for RAG-Sequence); num_return_sequences <= num_beams.
        max_length: tokens per answer, the decoder start token included; min_length likewise.
        length_penalty, early_stopping: as transformers' generate (beam ranking only).
        batch_size: questions decoded together; progress: show a progress bar over batches.
    """
    strategy = strategy or DEFAULT_STRATEGY.get(getattr(model, "marginalization", "sequence"), "thorough")
    if strategy not in STRATEGIES:
        raise InputError(f"unknown decoding strategy {strategy!r}", setting="decoding.strategy", fix=f"use one of {sorted(STRATEGIES)}")
    k = model.n_docs if n_docs is None else n_docs
    if k < 1 or batch_size < 1:
        raise InputError(
            f"n_docs={k}, batch_size={batch_size}", setting="decoding.n_docs", fix="use at least one doc and one question per batch"
        )
    if docs is not None and (len(docs.titles) != len(questions) or docs.n_docs < k):
        raise InputError(
            f"docs for {len(docs.titles)} questions x {docs.n_docs} docs, but {len(questions)} questions and n_docs={k}",
            setting="docs",
            fix="retrieve at least n_docs passages for every question, in the questions' order",
        )
    if docs is None and retriever is None:
        raise InputError("neither a retriever nor retrieved docs", setting="retriever", fix="pass an index.retrieval.Retriever or docs=")
    search = dict(
        num_beams=num_beams, num_return_sequences=num_return_sequences, max_length=max_length,
        min_length=min_length, length_penalty=length_penalty, early_stopping=early_stopping,
    )
    was_training = model.training
    model.eval()  # no dropout while decoding
    try:
        starts = range(0, len(questions), batch_size)
        answers: list[Answer] = []
        for start in tqdm(starts, desc=f"answering ({strategy})", disable=not progress or len(starts) < 2):
            end = start + batch_size
            given = None if docs is None else _docs_rows(docs, start, end, k)
            answers += _answer_batch(questions[start:end], retriever, model, strategy, k, search, given)
        return answers
    finally:
        model.train(was_training)
