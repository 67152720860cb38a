"""One process's share of an evaluation: questions -> retrieval -> answers -> prediction records.

For every batch of questions the question encoder runs once: its vectors search
the top ``max(n_docs, recall_depth)`` passages (`decoding.retrieve.retrieve`), the
answer is decoded from the first ``n_docs`` of them (`decoding.answer.decode_retrieved`),
and the rank of the first passage holding a reference answer is noted (recall@k).
Each record keeps the answer's provenance: passage ids, titles, and the posterior
p(z|x,y) of each document. A record is one line of predictions.jsonl:

    {"question", "prediction", "answers", "correct", "score",
     "doc_ids", "titles", "doc_posteriors", "answer_rank",     (rag mode)
     "stale_answers", "correct_stale"}                          (questions of a changed world)
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from decoding.answer import decode_retrieved
from decoding.closed_book import answer_closed_book
from decoding.retrieve import Retrieval, embed_questions, retrieve
from index.retrieval import Retriever
from rag_models.checkpoint import load_rag_model
from rag_models.errors import InputError
from rag_models.rag import RagModel
from training.data.questions import QAExample, question_place
from training.evaluation.answer_match import answer_ranks
from training.evaluation.job import EvalJob
from training.evaluation.metrics import exact_match


@dataclass
class EvalParts:
    """The loaded model and retriever of one rank, and the depths they are used at.

    Fields:
        model: the checkpoint's RagModel, in eval mode on this rank's device.
        retriever: the opened index; None in closed-book mode.
        n_docs: docs each answer is decoded from (0: closed-book).
        depth: docs retrieved per question, max(n_docs, recall_depth) capped at the index size.
    """

    model: RagModel
    retriever: Retriever | None
    n_docs: int
    depth: int


def load_parts(job: EvalJob, device: torch.device, world_size: int = 1) -> EvalParts:
    """Load the checkpoint and open the index; check that they fit together before any decoding.

    The job's length settings and n_docs replace the checkpoint's. Raises InputError naming the
    setting when one exceeds the model's positions, when the index's vectors have another dimension
    than the question encoder's, or when n_docs exceeds the index size.
    """
    model = load_rag_model(job.checkpoint, **job.model_overrides).to(device).eval()
    if job.mode == "closed_book":
        return EvalParts(model, None, 0, 0)
    retriever = job.index.open(world_size=world_size)
    dim = embed_questions(model, ["dimension probe"]).shape[-1]  # (1, D)
    if dim != retriever.dim:
        raise InputError(
            f"the question encoder of checkpoint {job.checkpoint} gives {dim}-dimensional vectors, but the index "
            f"at {job.index_path} holds {retriever.dim}-dimensional ones", setting="index.path",
            fix="Use the index built with the context encoder this question encoder was trained with "
                "(`rag-build-index --encoder ...`), or the matching checkpoint")
    n_docs = job.n_docs or model.n_docs
    if n_docs > len(retriever):
        raise InputError(f"n_docs={n_docs} but the index holds {len(retriever)} passages", setting="n_docs",
                         fix=f"Use n_docs <= {len(retriever)}")
    return EvalParts(model, retriever, n_docs, min(max(n_docs, job.recall_depth), len(retriever)))


def prediction_records(batch: list[QAExample], parts: EvalParts, job: EvalJob,
                       retrieval: Retrieval | None = None) -> list[dict[str, Any]]:
    """Retrieve once, decode from the first n_docs, and build one provenance record per question.

    ``retrieval``: this batch's docs, already searched at least ``parts.depth`` deep (an n_docs sweep
    searches once at its largest depth); None: searched here. Its docs are sorted best first, so its
    first ``parts.depth`` are what a search of that depth finds (exact indexes). Each record also holds
    ``passage_texts`` (the texts of the docs read), kept in memory for report.html, never written.
    """
    questions = [example.question for example in batch]
    ranks = [None] * len(batch)
    if parts.retriever is None:
        answers = answer_closed_book(questions, parts.model, job.decoding)
    else:
        if retrieval is None:
            retrieval = retrieve(parts.model, parts.retriever, questions, parts.depth)  # (B, depth)
        answers = decode_retrieved(questions, parts.model, retrieval, replace(job.decoding, n_docs=parts.n_docs))
        texts = [row[: parts.depth] for row in retrieval.docs.texts]  # (B, depth)
        ranks = answer_ranks([example.answers for example in batch], texts)
    records = []
    for position, (example, found, rank) in enumerate(zip(batch, answers, ranks)):
        record = {"question": example.question, "prediction": found.text, "answers": list(example.answers),
                  "correct": exact_match(found.text, example.answers),
                  # Closed-book records carry no score (the file format rag-eval has always written).
                  "score": None if retrieval is None else found.score}
        if retrieval is not None:
            record.update(doc_ids=parts.retriever.passages.ids(found.doc_ids), titles=found.titles,
                          doc_posteriors=[round(p, 6) for p in found.posteriors], answer_rank=rank,
                          passage_texts=texts[position][: parts.n_docs])
        if example.stale_answers:
            record.update(stale_answers=list(example.stale_answers),
                          correct_stale=exact_match(found.text, example.stale_answers))
        records.append(record)
    return records


def decode_share(examples: list[QAExample], parts: EvalParts, job: EvalJob, *, rank: int = 0,
                 n_batches: int | None = None) -> list[dict[str, Any]]:
    """Records for this rank's questions, in order; a progress bar on rank 0.

    ``n_batches`` (sharded index only): run that many batches even when this rank has
    fewer, searching with no queries, so every rank joins every collective search.
    """
    own = -(-len(examples) // job.batch_size)  # ceil
    records: list[dict[str, Any]] = []
    with tqdm(total=len(examples), desc="eval", unit="q", disable=not job.progress or rank != 0) as bar:
        for start in range(0, len(examples), job.batch_size):
            batch = examples[start:start + job.batch_size]
            records.extend(prediction_records(batch, parts, job))
            bar.update(len(batch))
    for _ in range(max(0, (n_batches or 0) - own)):
        parts.retriever.retrieve(torch.zeros(0, parts.retriever.dim), parts.depth)
    return records


def cut_questions(examples: list[QAExample], model: RagModel, job: EvalJob) -> dict[int, str]:
    """Every question the model cuts to fit its length settings: line (row for hub data) -> warning line.

    The warning names ``FILE:LINE`` and each setting with the tokens before and after; the question is
    still answered and scored, from its beginning.
    """
    cuts = model.question_cuts([e.question for e in examples], closed_book=job.mode == "closed_book")
    found = {}
    for position, (example, cut) in enumerate(zip(examples, cuts), start=1):
        if cut:
            where = question_place(job.questions, example, position)
            found[example.line or position] = (f"{where}: question cut to fit {', '.join(map(str, cut))}, "
                                               f"keeping its beginning: {example.question[:60]!r}...")
    return found
