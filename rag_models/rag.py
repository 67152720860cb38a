"""RagModel: question encoder + retrieved docs + generator, trained on the marginal likelihood.

Shapes: B questions, K docs per question, L source length, T target length,
V vocab, D embedding dim. Retrieval itself (the index) happens outside: the model
receives the retrieved docs (ids, stored vectors, texts) and the generator's
token ids, recomputes ``q . d`` with gradient, and marginalizes over the docs per
sequence (RAG-Sequence) or per token (RAG-Token).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import BatchEncoding, PreTrainedTokenizerBase

from rag_models.docs import RetrievedDocs
from rag_models.errors import InputError
from rag_models.generator import Generator
from rag_models.marginalize import rag_sequence_nll, rag_token_nll
from rag_models.retriever import DenseEncoder, doc_scores, freeze, tokenize_passages

# marginalization name -> per-example loss function (B*K,T,V), (B,K), (B,T) -> (B,)
MARGINALIZATIONS: dict[str, Callable[..., Tensor]] = {"sequence": rag_sequence_nll, "token": rag_token_nll}
# loss_reduction name -> how per-example losses (B,) become the training loss ()
REDUCTIONS: dict[str, Callable[[Tensor], Tensor]] = {"mean": torch.mean, "sum": torch.sum}


@dataclass
class RagOutput:
    """What one RagModel forward returns.

    Fields:
        loss: () the training objective, per-example losses (label-smoothed when
            ``label_smoothing > 0``) reduced by ``loss_reduction`` over the batch.
        nll: (B,) -log p(y|x) per question, marginalized over the K docs, no smoothing
            (the BOS term dropped when ``exclude_bos_score``).
        doc_scores: (B, K) q . d recomputed with gradient (log-softmax gives p(z|x)).
        seq_logits: (B*K, T, V) generator logits, row b*K+k = question b with doc k.
    """

    loss: Tensor
    nll: Tensor
    doc_scores: Tensor
    seq_logits: Tensor


@dataclass(frozen=True)
class QuestionCut:
    """One question cut to fit one length setting, keeping its beginning (see `RagModel.question_cuts`).

    Fields:
        setting: the length setting it exceeded: "max_source_length" (generator) or "max_question_length"
            (question encoder).
        tokens: its tokens under that setting's tokenizer.
        kept: the tokens kept (< tokens).
    """

    setting: str
    tokens: int
    kept: int

    def __str__(self) -> str:
        return f"{self.setting} ({self.tokens} -> {self.kept} tokens)"


def _first_docs(rows: Tensor, batch: int, k_total: int, k: int) -> Tensor:
    """Keep the first k of k_total docs per question in question-major rows (B*Kt, ...) -> (B*k, ...)."""
    if rows.shape[0] != batch * k_total:
        raise InputError(
            f"{rows.shape[0]} rows for {batch} questions x {k_total} docs",
            setting="context_input_ids",
            fix="build generator inputs from the same retrieved docs (row b*K+k = question b, doc k)",
        )
    if k == k_total:
        return rows
    per_question = rows.view(batch, k_total, *rows.shape[1:])  # (B, Kt, ...)
    return per_question[:, :k].reshape(batch * k, *rows.shape[1:])  # (B*k, ...)


class RagModel(nn.Module):
    """RAG-Sequence or RAG-Token over a dense retriever and a seq2seq generator.

    Args:
        question_encoder: maps question tokens (B, Lq) to q (B, D); trained through ``q . d`` (B, K).
        question_tokenizer: the question encoder's tokenizer (`tokenize_questions`).
        generator: the seq2seq `Generator` that reads each (question, doc) pair and gives (B*K, T, V) logits.
        context_encoder: maps passage tokens (B*K, Lp) to d (B*K, D); None: only the index's stored
            vectors are used. Frozen here unless ``train_context_encoder``.
        context_tokenizer: the context encoder's tokenizer (`tokenize_docs`); needed with ``train_context_encoder``.
        marginalization: "sequence" (RAG-Sequence) or "token" (RAG-Token), a key of `MARGINALIZATIONS`.
        n_docs: K, the docs marginalized over per question (>= 1); `forward` may lower it per call, up to
            the docs retrieved.
        label_smoothing: eps of transformers' RAG label smoothing, in [0, 1); 0 = plain NLL. Only the
            training ``loss`` is smoothed, never ``nll``.
        exclude_bos_score: drop the log-prob of predicting the target's leading BOS (target position 0)
            from the NLL, as transformers' RAG-Sequence option; needs a generator whose targets start with BOS.
        train_context_encoder: end to end: re-encode the retrieved passages with the context encoder (with
            gradient) instead of using the index's stored vectors (the index then goes stale).
        max_question_length: Lq, question tokens kept (truncation), at most the question encoder's positions.
        max_passage_length: Lp, passage tokens kept when re-encoding passages; at most the context encoder's
            positions (checked only when there is a context encoder).
        loss_reduction: "mean" or "sum" of the per-question losses (B,) into ``loss`` (), a key of `REDUCTIONS`.

    Raises InputError for an unknown marginalization or loss_reduction, n_docs < 1, label_smoothing outside
    [0, 1), exclude_bos_score with a generator without BOS, a max length above its encoder's positions,
    or train_context_encoder without a context encoder and tokenizer.
    """

    def __init__(
        self,
        *,
        question_encoder: DenseEncoder,
        question_tokenizer: PreTrainedTokenizerBase,
        generator: Generator,
        context_encoder: DenseEncoder | None = None,
        context_tokenizer: PreTrainedTokenizerBase | None = None,
        marginalization: str = "sequence",
        n_docs: int = 5,
        label_smoothing: float = 0.0,
        exclude_bos_score: bool = False,
        train_context_encoder: bool = False,
        max_question_length: int = 64,
        max_passage_length: int = 256,
        loss_reduction: str = "mean",
    ) -> None:
        super().__init__()
        _check_settings(marginalization, loss_reduction, n_docs, label_smoothing)
        if exclude_bos_score and generator.bos_token_id is None:
            raise InputError("the generator's targets have no BOS token to exclude", setting="model.exclude_bos_score",
                             fix="set it to false for this generator")
        _check_length(question_encoder, max_question_length, "max_question_length")
        if context_encoder is not None:
            _check_length(context_encoder, max_passage_length, "max_passage_length")
        if train_context_encoder and (context_encoder is None or context_tokenizer is None):
            raise InputError("training the context encoder needs it and its tokenizer",
                             setting="model.train_context_encoder",
                             fix="set model.context_encoder (retriever.context_encoder) or train_context_encoder=false")
        self.question_encoder = question_encoder
        self.question_tokenizer = question_tokenizer
        self.generator = generator
        self.context_encoder = context_encoder
        self.context_tokenizer = context_tokenizer
        if context_encoder is not None and not train_context_encoder:
            freeze(context_encoder)  # the paper's default: the index's vectors stay valid
        self.marginalization = marginalization
        self.n_docs = n_docs
        self.label_smoothing = label_smoothing
        self.exclude_bos_score = exclude_bos_score
        self.train_context_encoder = train_context_encoder
        self.max_question_length = max_question_length
        self.max_passage_length = max_passage_length
        self.loss_reduction = loss_reduction
        self._loss_fn = MARGINALIZATIONS[marginalization]
        self._reduce = REDUCTIONS[loss_reduction]

    def settings(self) -> dict[str, Any]:
        """The scalar settings (saved as rag_config.json beside the weights)."""
        names = ("marginalization", "n_docs", "label_smoothing", "exclude_bos_score", "train_context_encoder",
                 "max_question_length", "max_passage_length", "loss_reduction")
        gen_names = ("max_source_length", "max_target_length", "input_format", "title_sep", "doc_sep")
        gen = {name: getattr(self.generator, name) for name in gen_names}
        return {**{name: getattr(self, name) for name in names}, **gen}

    def tokenize_questions(self, questions: list[str]) -> BatchEncoding:
        """Question-encoder inputs on CPU: input_ids (B, Lq), attention_mask (B, Lq)."""
        return self.question_tokenizer(questions, max_length=self.max_question_length, truncation=True, padding=True,
                                       return_tensors="pt")

    def question_cuts(self, questions: list[str], *, closed_book: bool = False) -> list[tuple[QuestionCut, ...]]:
        """Per question, the length settings it is cut to fit (empty: read whole); nothing is raised.

        Both the question encoder (``max_question_length``, not read closed-book) and the generator
        (``max_source_length``, `Generator.question_cuts`) keep a long question's beginning.
        """
        cuts: list[list[QuestionCut]] = [[] for _ in questions]
        if not closed_book:
            lengths = [len(ids) for ids in self.question_tokenizer(questions)["input_ids"]]
            for found, n in zip(cuts, lengths):
                if n > self.max_question_length:
                    found.append(QuestionCut("max_question_length", n, self.max_question_length))
        for found, (n, kept) in zip(cuts, self.generator.question_cuts(questions, closed_book=closed_book)):
            if kept < n:
                found.append(QuestionCut("max_source_length", n, kept))
        return [tuple(found) for found in cuts]

    def embed_questions(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Question vectors q (B, D); used with no_grad for index search, with grad in forward."""
        return self.question_encoder(input_ids, attention_mask)

    def doc_scores(self, question_vectors: Tensor, doc_vectors: Tensor) -> Tensor:
        """q . d: (B, D), (B, K, D) -> (B, K)."""
        return doc_scores(question_vectors, doc_vectors)

    def tokenize_docs(self, docs: RetrievedDocs) -> BatchEncoding:
        """Context-encoder inputs for every retrieved passage: (B*K, Lp), question-major."""
        if self.context_tokenizer is None:
            raise InputError("no context tokenizer to encode passages with", setting="model.context_encoder",
                             fix="build the model with a context encoder")
        titles = [t for row in docs.titles for t in row]
        texts = [x for row in docs.texts for x in row]
        return tokenize_passages(self.context_tokenizer, titles, texts, self.max_passage_length)

    def build_generator_inputs(self, questions: list[str], docs: RetrievedDocs) -> tuple[Tensor, Tensor]:
        """Generator inputs of every (question, doc) pair: input_ids (B*K, L), attention_mask (B*K, L).

        With the "transformers" input format the question reaches the generator as transformers'
        RagRetriever passes it: tokenized by the question tokenizer (truncated to ``max_question_length``)
        and decoded back without special tokens (an uncased DPR tokenizer lowercases it), which is what
        the released RAG checkpoints were trained on. "question_first" uses the question as given.
        """
        if self.generator.input_format == "transformers":
            ids = self.tokenize_questions(questions)["input_ids"]  # (B, Lq)
            questions = self.question_tokenizer.batch_decode(ids, skip_special_tokens=True)
        return self.generator.build_inputs(questions, docs.titles, docs.texts)

    def prepare_inputs(self, questions: list[str], docs: RetrievedDocs, answers: list[str]) -> dict[str, Any]:
        """Everything `forward` needs for a batch, as CPU tensors keyed by its argument names."""
        q = self.tokenize_questions(questions)
        context_input_ids, context_attention_mask = self.build_generator_inputs(questions, docs)
        decoder_input_ids, target = self.generator.prepare_targets(answers)
        batch = {
            "question_input_ids": q["input_ids"],
            "question_attention_mask": q["attention_mask"],
            "docs": docs,
            "context_input_ids": context_input_ids,
            "context_attention_mask": context_attention_mask,
            "decoder_input_ids": decoder_input_ids,
            "target": target,
        }
        if self.train_context_encoder:
            passages = self.tokenize_docs(docs)
            batch.update(passage_input_ids=passages["input_ids"], passage_attention_mask=passages["attention_mask"])
        return batch

    def forward(
        self,
        question_input_ids: Tensor,
        question_attention_mask: Tensor,
        docs: RetrievedDocs,
        context_input_ids: Tensor,
        context_attention_mask: Tensor,
        decoder_input_ids: Tensor,
        target: Tensor,
        n_docs: int | None = None,
        passage_input_ids: Tensor | None = None,
        passage_attention_mask: Tensor | None = None,
    ) -> RagOutput:
        """Marginal loss of ``target`` (B, T) given questions and their retrieved docs.

        ``context_input_ids`` / ``context_attention_mask`` (B*Kt, L) are the generator
        inputs of all Kt retrieved docs; ``decoder_input_ids`` is (B, T) or (B*Kt, T);
        ``n_docs`` (default: the model's) uses the first n_docs of them. In end-to-end
        mode ``passage_input_ids`` (B*Kt, Lp) feed the context encoder; when omitted,
        the docs' titles and texts are tokenized here.
        """
        batch, k_total = docs.ids.shape
        k = self.n_docs if n_docs is None else n_docs
        if not 1 <= k <= k_total:
            raise InputError(f"n_docs={k} but {k_total} docs were retrieved per question", setting="n_docs",
                             fix=f"use 1..{k_total} or retrieve more docs")
        docs = docs.first(k) if k < k_total else docs
        question_vectors = self.embed_questions(question_input_ids, question_attention_mask)  # (B, D)
        doc_vectors = self._doc_vectors(docs, k_total, passage_input_ids, passage_attention_mask)  # (B, K, D)
        scores = self.doc_scores(question_vectors, doc_vectors)  # (B, K)
        if decoder_input_ids.shape[0] == batch:
            decoder_input_ids = decoder_input_ids.repeat_interleave(k, dim=0)  # (B*K, T)
        else:
            decoder_input_ids = _first_docs(decoder_input_ids, batch, k_total, k)  # (B*K, T)
        seq_logits = self.generator(
            _first_docs(context_input_ids, batch, k_total,
                        k), _first_docs(context_attention_mask, batch, k_total, k), decoder_input_ids
        )  # (B*K, T, V)
        loss, nll = self.marginal_loss(seq_logits, scores, target)
        return RagOutput(loss=loss, nll=nll, doc_scores=scores, seq_logits=seq_logits)

    def marginal_loss(self, seq_logits: Tensor, doc_scores: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """(loss (), nll (B,)) of generator logits (B*K, T, V) under doc scores (B, K) for targets (B, T).

        This model's marginalization, BOS handling, label smoothing and reduction
        (`MARGINALIZATIONS`, `REDUCTIONS`); ``nll`` is unsmoothed. The closed-book
        baseline calls it with K = 1 and zero doc scores (the generator alone).
        """
        nll = self._example_losses(seq_logits, doc_scores, target, 0.0)  # (B,)
        smoothed = self.label_smoothing != 0.0
        objective = self._example_losses(seq_logits, doc_scores, target, self.label_smoothing) if smoothed else nll
        return self._reduce(objective), nll

    def _example_losses(self, seq_logits: Tensor, scores: Tensor, target: Tensor, label_smoothing: float) -> Tensor:
        """Per-example marginal loss (B,) with this model's marginalization and BOS handling."""
        gen = self.generator
        return self._loss_fn(
            seq_logits, scores, target, gen.pad_token_id,
            exclude_bos_score=self.exclude_bos_score, label_smoothing=label_smoothing, bos_token_id=gen.bos_token_id,
        )

    def _doc_vectors(self, docs: RetrievedDocs, k_total: int, passage_ids: Tensor | None,
                     passage_mask: Tensor | None) -> Tensor:
        """(B, K, D) doc vectors: the index's stored ones, or re-encoded when training the context encoder."""
        if not self.train_context_encoder:
            return docs.vectors
        batch, k = docs.ids.shape
        if passage_ids is None or passage_mask is None:
            enc = self.tokenize_docs(docs)  # already only the first k docs
            passage_ids, passage_mask = enc["input_ids"], enc["attention_mask"]
            device = self.context_encoder.model.device
            passage_ids, passage_mask = passage_ids.to(device), passage_mask.to(device)
        else:
            passage_ids = _first_docs(passage_ids, batch, k_total, k)
            passage_mask = _first_docs(passage_mask, batch, k_total, k)
        vectors = self.context_encoder(passage_ids, passage_mask)  # (B*K, D)
        return vectors.view(batch, k, -1)  # (B, K, D)


def _check_settings(marginalization: str, loss_reduction: str, n_docs: int, label_smoothing: float) -> None:
    """Raise InputError naming the setting for any invalid model setting."""
    if marginalization not in MARGINALIZATIONS:
        raise InputError(f"unknown marginalization {marginalization!r}", setting="model.marginalization",
                         fix=f"use one of {sorted(MARGINALIZATIONS)}")
    if loss_reduction not in REDUCTIONS:
        raise InputError(f"unknown loss_reduction {loss_reduction!r}", setting="model.loss_reduction",
                         fix=f"use one of {sorted(REDUCTIONS)}")
    if n_docs < 1:
        raise InputError(f"n_docs={n_docs}", setting="model.n_docs", fix="use at least 1 document")
    if not 0.0 <= label_smoothing < 1.0:
        raise InputError(f"label_smoothing={label_smoothing}", setting="model.label_smoothing",
                         fix="use a value in [0, 1)")


def _check_length(encoder: DenseEncoder, max_length: int, setting: str) -> None:
    """Raise InputError when an encoder cannot embed ``max_length`` positions."""
    limit = getattr(encoder.model.config, "max_position_embeddings", None)
    if limit is not None and max_length > limit:
        raise InputError(f"{setting}={max_length} exceeds the encoder's {limit} positions",
                         setting=f"retriever.{setting}", fix=f"set it to at most {limit}")
