"""Questions in, answers out: retrieve, build generator inputs, decode, attach provenance.

The one path from a question to an answer. `answer` retrieves and decodes;
`decode_retrieved` decodes from docs already retrieved by `decoding.retrieve.retrieve`
(evaluation and training validation retrieve deeper than they read, for recall@k),
reusing the question vectors that searched the index. The strategy string picks a
decoder from `STRATEGIES`: "greedy" and "beam" search the RAG-Token marginal,
"thorough" and "fast" are RAG-Sequence's decoders. Without a strategy, the model's
own marginalization decides, as the paper evaluates it (token -> greedy, sequence -> thorough
with one beam per doc).

Shapes: B questions, K docs read per answer, L source length.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch
from tqdm import tqdm

from decoding.rag_sequence import rag_sequence_generate
from decoding.rag_token import rag_token_generate
from decoding.results import GenerationResult
from decoding.retrieve import Retrieval, RetrieverLike, retrieve
from rag_models.errors import InputError
from rag_models.rag import RagModel


def _greedy(generator: Any, ids: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor,
            **search: Any) -> GenerationResult:
    """RAG-Token greedy decoding: one beam and one sequence, whatever the settings ask."""
    return rag_token_generate(generator, ids, mask, scores, **{**search, "num_beams": 1, "num_return_sequences": 1})


# strategy name -> decoder(generator, context_input_ids, context_attention_mask, doc_scores, **search)
STRATEGIES: dict[str, Callable[..., GenerationResult]] = {
    "greedy": _greedy,
    "beam": rag_token_generate,
    "thorough": partial(rag_sequence_generate, mode="thorough"),
    "fast": partial(rag_sequence_generate, mode="fast"),
}
# the model's marginalization -> its decoder when no strategy is given: how Lewis et al. evaluate each model
# on open-domain QA (App. A: RAG-Sequence thorough decoding with one beam per doc, RAG-Token greedy)
DEFAULT_STRATEGY: dict[str, str] = {"token": "greedy", "sequence": "thorough"}
# the marginalization each decoder belongs to; another one is decoded only when named, with a warning
STRATEGY_MARGINALIZATION: dict[str, str] = {"greedy": "token", "beam": "token", "thorough": "sequence",
                                            "fast": "sequence"}
# beams (per doc for RAG-Sequence) when num_beams is not given: beam search 4, every other decoder 1
DEFAULT_BEAMS: dict[str, int] = {"beam": 4}
NAMES: dict[str, str] = {"sequence": "RAG-Sequence", "token": "RAG-Token"}


@dataclass
class Answer:
    """One answer and where it came from.

    Fields:
        text: the decoded answer.
        score: the decoder's score of it (see GenerationResult.scores).
        doc_ids: the K retrieved passages' rows in the passage store, retrieval order (empty closed-book).
        titles: their titles, or their passage ids where a title is empty (`RetrievedDocs.names`).
        posteriors: p(z_k|x,y) for each of them (sums to 1).
        alternatives: the next best answers when num_return_sequences > 1, best first.
    """

    text: str
    score: float
    doc_ids: list[int]
    titles: list[str]
    posteriors: list[float]
    alternatives: list["Answer"] = field(default_factory=list)

    def supporting_positions(self, n: int = 3) -> list[int]:
        """Positions k (into doc_ids, titles, posteriors) of the `n` passages that best explain the answer."""
        return sorted(range(len(self.posteriors)), key=lambda k: -self.posteriors[k])[:n]

    def supporting(self, n: int = 3) -> list[tuple[str, float]]:
        """The titles of the `n` passages that best explain the answer, with their posteriors."""
        return [(self.titles[k], self.posteriors[k]) for k in self.supporting_positions(n)]


@dataclass(frozen=True)
class DecodingSettings:
    """How to decode: the Hydra target of configs/decoding/*.yaml.

    Fields:
        strategy: "greedy" | "beam" (RAG-Token), "thorough" | "fast" (RAG-Sequence), or None for the
            model's own, as the paper evaluates it (token -> greedy, sequence -> thorough). A decoder of the
            other marginalization is used when named, with a warning.
        num_beams: beams (per doc for RAG-Sequence); None: 4 for "beam", else 1 (one beam per doc: the
            paper's thorough decoding). num_return_sequences <= num_beams.
        max_length: tokens per answer, the decoder start token included; min_length likewise.
        n_docs: docs read per answer; None = the model's n_docs (as trained).
        length_penalty, early_stopping: as transformers' generate (beam ranking only).
        num_return_sequences: R, the n-best answers kept (the others become Answer.alternatives).
        score_chunk_elements: RAG-Sequence decoders only: the most floats (logits and cached keys/values)
            one chunk of thorough scoring holds; None: the device's default (2**24 = 64 MB of float32 on a
            CPU, 2**28 on a GPU); lower it to bound memory at many docs.
    """

    strategy: str | None = None
    num_beams: int | None = None
    max_length: int = 40
    min_length: int = 0
    n_docs: int | None = None
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    score_chunk_elements: int | None = None

    def search_kwargs(self) -> dict[str, Any]:
        """The keyword arguments the strategy's decoder in `STRATEGIES` takes (num_beams None: `DEFAULT_BEAMS`)."""
        kwargs = dict(num_beams=self._num_beams(self.strategy), num_return_sequences=self.num_return_sequences,
                      max_length=self.max_length, min_length=self.min_length, length_penalty=self.length_penalty,
                      early_stopping=self.early_stopping)
        if STRATEGY_MARGINALIZATION.get(self.strategy or "") == "sequence":
            kwargs["score_chunk_elements"] = self.score_chunk_elements
        return kwargs

    def for_model(self, model: RagModel) -> "DecodingSettings":
        """These settings with ``strategy``, ``num_beams`` and ``n_docs`` filled from ``model`` where None.

        Raises InputError for an unknown strategy or n_docs < 1; warns (once) when the strategy, named
        explicitly, belongs to the other marginalization than the model's.
        """
        strategy = self.strategy or DEFAULT_STRATEGY.get(model.marginalization, "thorough")
        if strategy not in STRATEGIES:
            raise InputError(f"unknown decoding strategy {strategy!r}", setting="decoding.strategy",
                             fix=f"use one of {sorted(STRATEGIES)}")
        if STRATEGY_MARGINALIZATION[strategy] != model.marginalization:
            warnings.warn(f"decoding a {NAMES.get(model.marginalization, model.marginalization)} model with "
                          f"{strategy}, a {NAMES[STRATEGY_MARGINALIZATION[strategy]]} decoder (asked for); its own is "
                          f"{DEFAULT_STRATEGY.get(model.marginalization)}", stacklevel=2)
        n_docs = model.n_docs if self.n_docs is None else self.n_docs
        if n_docs < 1:
            raise InputError(f"n_docs={n_docs}", setting="decoding.n_docs", fix="use at least one doc")
        return replace(self, strategy=strategy, n_docs=n_docs, num_beams=self._num_beams(strategy))

    def _num_beams(self, strategy: str | None) -> int:
        """``num_beams``, or when None the default of ``strategy`` (`DEFAULT_BEAMS`, else 1)."""
        return self.num_beams if self.num_beams is not None else DEFAULT_BEAMS.get(strategy, 1)

    def describe(self) -> dict[str, Any]:
        """What a decode ran with (after `for_model`): for metrics.json."""
        return dict(strategy=self.strategy, num_beams=self.num_beams, n_docs=self.n_docs, max_length=self.max_length,
                    min_length=self.min_length, length_penalty=self.length_penalty,
                    num_return_sequences=self.num_return_sequences)

    def summary(self) -> str:
        """One line for the console and report.md, e.g. ``thorough, 1 beam per doc, 5 docs, max_length 40``."""
        beams = f"{self.num_beams} beam{'s' if self.num_beams != 1 else ''}"
        if self.strategy in ("thorough", "fast"):
            beams += " per doc"
        return f"{self.strategy}, {beams}, {self.n_docs} docs, max_length {self.max_length}"



@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """No dropout while decoding; the model's mode is given back afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def to_answers(result: GenerationResult, texts: list[str], doc_ids: list[list[int]],
               titles: list[list[str]]) -> list[Answer]:
    """One Answer per question (its best hypothesis), the others as alternatives; docs given per question."""
    answers = []
    for b in range(result.batch_size):
        found = [
            Answer(text=texts[row], score=float(result.scores[row]), doc_ids=list(doc_ids[b]), titles=list(titles[b]),
                   posteriors=[float(p) for p in result.doc_posteriors[row].tolist()])
            for row in result.question_rows(b)
        ]
        found[0].alternatives = found[1:]
        answers.append(found[0])
    return answers


@torch.no_grad()
def decode_retrieved(questions: list[str], model: RagModel, retrieval: Retrieval,
                     settings: DecodingSettings) -> list[Answer]:
    """Answer one batch from its retrieval, reading the first ``n_docs`` docs of each question.

    ``retrieval`` holds B question vectors and (B, >= n_docs) docs in the questions' order;
    its question vectors score the docs (q . d), so the encoder does not run again.
    Raises InputError when the retrieval does not fit the questions or the settings.
    """
    settings = settings.for_model(model)
    k = settings.n_docs
    if len(retrieval.docs.titles) != len(questions) or retrieval.docs.n_docs < k:
        raise InputError(
            f"docs for {len(retrieval.docs.titles)} questions x {retrieval.docs.n_docs} docs, "
            f"but {len(questions)} questions and n_docs={k}", setting="n_docs",
            fix="retrieve at least n_docs passages for every question, in the questions' order")
    docs = retrieval.docs.first(k)  # (B, K)
    q = retrieval.question_vectors  # (B, D)
    with eval_mode(model):
        ids, mask = model.build_generator_inputs(questions, docs)  # (B*K, L)
        scores = model.doc_scores(q, docs.vectors.to(q.device))  # (B, K), float32 (rag_models/precision.py)
        result = STRATEGIES[settings.strategy](model.generator.model, ids.to(q.device), mask.to(q.device), scores,
                                               n_docs=k, **settings.search_kwargs())
    doc_ids = [[int(i) for i in row] for row in docs.ids.tolist()]
    return to_answers(result, model.generator.decode(result.sequences), doc_ids, docs.shown_names)


def answer(questions: list[str], retriever: RetrieverLike, model: RagModel, settings: DecodingSettings | None = None,
           *, batch_size: int = 16, progress: bool = True) -> list[Answer]:
    """Answer each question with a RagModel and a retriever; one Answer per question, in order.

    Each batch of ``batch_size`` questions is embedded once, searched for the
    settings' n_docs (default: the model's) and decoded (`decode_retrieved`);
    ``progress`` shows a bar over the batches. Raises InputError for bad settings.
    """
    settings = (settings or DecodingSettings()).for_model(model)
    if batch_size < 1:
        raise InputError(f"batch_size={batch_size}", setting="batch_size", fix="use at least one question per batch")
    starts = range(0, len(questions), batch_size)
    answers: list[Answer] = []
    with eval_mode(model):
        for start in tqdm(starts, desc=f"answering ({settings.strategy})", disable=not progress or len(starts) < 2):
            batch = questions[start:start + batch_size]
            answers += decode_retrieved(batch, model, retrieve(model, retriever, batch, settings.n_docs), settings)
    return answers
