"""Joint RAG training as a LightningModule: marginal NLL, per-component learning rates, val/em and recall@k.

One training step (shapes: B questions, K docs, D embedding dim):
1. q = question encoder(questions) without gradient, searched in the index
   (`Retriever`, or the sharded index under DDP: a collective, every rank calls it);
2. the docs' stored vectors and texts come back; `RagModel.forward` recomputes q
   with gradient and the doc scores q . d (B, K) from the stored vectors, runs the
   generator on the B*K (question, doc) inputs and marginalizes over the docs.
The context encoder is frozen unless ``model.train_context_encoder`` (end to end,
with the index-refresh callback re-encoding the corpus on a schedule).

``mode="closed_book"`` is the no-retrieval baseline: the same generator reads the
question alone. The retriever is opened in ``setup`` on each rank, never pickled
and never a submodule (DDP would otherwise broadcast it).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from decoding.answer import Answer, DecodingSettings, decode_retrieved
from decoding.closed_book import answer_closed_book
from decoding.retrieve import Retrieval, retrieve
from index.retrieval import Retriever
from index.settings import IndexSettings
from rag_models.checkpoint import MODES, save_rag_model
from rag_models.docs import RetrievedDocs
from rag_models.errors import InputError
from rag_models.rag import RagModel
from rag_models.retriever import freeze
from training.evaluation.answer_match import answer_ranks
from training.evaluation.metrics import batch_sums
from training.lit.optim import configure_optimizer, param_groups

# How val/test answers are decoded when the config gives no decoding group: the model's own decoder.
DEFAULT_EVAL_DECODING = DecodingSettings()


class RagLitModule(pl.LightningModule):
    """Trains a `RagModel` (question encoder + generator; context encoder optional) on question-answer pairs.

    Args:
        model: the RagModel to train (configs/model/); its n_docs docs are read per training question.
        optimizer: a partial optimizer class (e.g. AdamW with betas, eps) that takes the param groups.
        index: the `index` group; opened on each rank in `setup` (its ``path`` is needed in "rag" mode).
        mode: "rag" (retrieve, marginalize) or "closed_book" (the generator reads the question alone).
        lr_question_encoder, lr_generator, lr_context_encoder: learning rates per component (before the
            schedule's factor); the context encoder's applies only when the model trains it.
        train_question_encoder: False freezes it (the frozen-retriever baseline; always frozen closed-book).
        weight_decay: AdamW decay of the weight matrices (biases and norms never decay).
        schedule: "linear" (warm-up, then linear decay to ``final_lr_factor``) or "constant" after warm-up.
        warmup_steps: optimizer steps of linear warm-up.
        final_lr_factor: the lr multiplier reached at the last step (linear schedule), in [0, 1].
        decoding: how val/test answers are decoded (configs/decoding/); default: the model's own decoder
            (RAG-Sequence thorough with one beam per doc, RAG-Token greedy).
        eval_n_docs: docs read per val/test answer; None: the decoding's n_docs, else the model's.
        recall_ks: the k of ``val/recall@k`` (an answer in a top-k passage), each up to the index size.

    Raises InputError for an unknown mode; the other settings are checked where they are used.
    """

    def __init__(
        self,
        *,
        model: RagModel,
        optimizer: Callable[..., Optimizer],
        index: IndexSettings | None = None,
        mode: str = "rag",
        lr_question_encoder: float = 3e-5,
        lr_generator: float = 3e-5,
        lr_context_encoder: float = 1e-5,
        train_question_encoder: bool = True,
        weight_decay: float = 0.0,
        schedule: str = "linear",
        warmup_steps: int = 0,
        final_lr_factor: float = 0.0,
        decoding: DecodingSettings | None = None,
        eval_n_docs: int | None = None,
        recall_ks: tuple[int, ...] = (1, 5, 20),
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise InputError(f"unknown mode {mode!r}", setting="module.mode", fix=f"use one of {MODES}")
        self.model = model
        self.optimizer_factory = optimizer
        self.index = index or IndexSettings()
        self.mode = mode
        self.lrs = {"question_encoder": lr_question_encoder, "generator": lr_generator,
                    "context_encoder": lr_context_encoder}
        self.train_question_encoder = train_question_encoder and mode == "rag"
        self.weight_decay = weight_decay
        self.schedule = {"schedule": schedule, "warmup_steps": warmup_steps, "final_lr_factor": final_lr_factor}
        decoding = decoding or DEFAULT_EVAL_DECODING
        # Docs read per val/test answer: eval_n_docs, else the decoding config's, else as trained; one answer each.
        self.decoding = replace(decoding, n_docs=eval_n_docs or decoding.n_docs or model.n_docs,
                                num_return_sequences=1)
        if mode == "rag":  # closed-book answers come from the generator's own search: no RAG decoder
            self.decoding = self.decoding.for_model(model)
        self.recall_ks = tuple(int(k) for k in recall_ks)
        if not self.train_question_encoder:
            freeze(model.question_encoder)  # the frozen-retriever baseline (and closed-book)
        self.retriever: Retriever | None = None
        self._losses = {"rag": self._rag_loss, "closed_book": self._closed_book_loss}[mode]
        self._sums: dict[str, float] = defaultdict(float)
        # This rank's answer ranks of the running val/test epoch (None: no answer within eval_depth), for the
        # recall@k-vs-k figure (training/lit/recall_figure.py); cleared when the epoch's metrics are logged.
        self.eval_ranks: list[int | None] = []
        self.eval_depth = 0
        # Scalars only: checkpoints must load with weights_only=True.
        self.train()  # checkpoints load in eval mode; Lightning keeps whatever mode it finds
        self.save_hyperparameters({"mode": mode, "marginalization": model.marginalization, "n_docs": model.n_docs,
                                   **self.lrs, "train_question_encoder": self.train_question_encoder})

    # ---- set-up -----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Open the index on this rank (its own replica, or its slice when sharded)."""
        if self.mode == "rag" and self.retriever is None:
            self.retriever = self.index.open(world_size=self.trainer.world_size)
        if self.trainer.is_global_zero and stage == "fit" and self.mode == "rag":
            print(f"val/test decoding: {self.decoding.summary()}")

    def frozen_parts(self) -> list[nn.Module]:
        """Components that do not train: kept in eval mode so dropout never perturbs them."""
        parts = [] if self.train_question_encoder else [self.model.question_encoder]
        if self.model.context_encoder is not None and not self.model.train_context_encoder:
            parts.append(self.model.context_encoder)
        return parts

    def train(self, mode: bool = True) -> "RagLitModule":
        """Lightning switches everything to train mode at each epoch; frozen parts stay in eval."""
        super().train(mode)
        for part in self.frozen_parts():
            part.eval()
        return self

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (or the configured optimizer) with one lr per trained component, warm-up then decay."""
        components = {"generator": (self.model.generator, self.lrs["generator"])}
        if self.train_question_encoder:
            components["question_encoder"] = (self.model.question_encoder, self.lrs["question_encoder"])
        if self.model.train_context_encoder:
            components["context_encoder"] = (self.model.context_encoder, self.lrs["context_encoder"])
        groups = param_groups(components, weight_decay=self.weight_decay)
        total_steps = int(self.trainer.estimated_stepping_batches)
        return configure_optimizer(groups, self.optimizer_factory, total_steps=total_steps, **self.schedule)

    # ---- training -----------------------------------------------------------------------------
    def _to_device(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device) if isinstance(v, (Tensor, RetrievedDocs)) else v for k, v in inputs.items()}

    def _rag_loss(self, questions: list[str], targets: list[str]) -> tuple[Tensor, Tensor, int]:
        """(loss (), nll (B,), generator tokens) with retrieval; q.d keeps its gradient."""
        if self.retriever is None:
            raise InputError("no index to retrieve from", setting="index.path",
                             fix="set index.path to a rag-build-index directory")
        docs = retrieve(self.model, self.retriever, questions, self.model.n_docs).docs  # (B, K), no gradient
        inputs = self._to_device(self.model.prepare_inputs(questions, docs, targets))
        out = self.model(**inputs)  # q recomputed with gradient: q . d trains the question encoder
        pad = self.model.generator.pad_token_id
        tokens = int(inputs["context_attention_mask"].sum() + inputs["target"].ne(pad).sum())
        return out.loss, out.nll, tokens

    def _closed_book_loss(self, questions: list[str], targets: list[str]) -> tuple[Tensor, Tensor, int]:
        """(loss, nll, tokens) of the generator reading the question alone (one pseudo-doc, p(z|x) = 1)."""
        gen = self.model.generator
        ids, mask = (t.to(self.device) for t in gen.build_question_inputs(questions))  # (B, L)
        decoder_input_ids, target = (t.to(self.device) for t in gen.prepare_targets(targets))  # (B, T)
        logits = gen(ids, mask, decoder_input_ids)  # (B*1, T, V): one pseudo-doc per question
        scores = logits.new_zeros(len(questions), 1)  # (B, 1): log p(z|x) = 0
        loss, nll = self.model.marginal_loss(logits, scores, target)  # the model's own smoothing and reduction
        return loss, nll, int(mask.sum() + target.ne(gen.pad_token_id).sum())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Marginal NLL of the target answers; logs ``train/loss`` and ``train/nll``."""
        questions = batch["questions"]
        loss, nll, tokens = self._losses(questions, batch["targets"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(questions))
        self.log("train/nll", nll.mean(), batch_size=len(questions))
        # The throughput callback reads these (no timing here: side measurements live in callbacks).
        return {"loss": loss, "n_questions": len(questions), "n_tokens": tokens}

    # ---- evaluation ---------------------------------------------------------------------------
    def predict_questions(self, questions: list[str]) -> tuple[list[Answer], Retrieval | None]:
        """Decoded answers, and the retrieval (None closed-book) searched deep enough for every recall@k.

        The same path as rag-eval: one question-encoder pass searches the index, the
        answer is decoded from the first ``decoding.n_docs`` docs.
        """
        if self.mode == "closed_book":
            return answer_closed_book(questions, self.model, self.decoding), None
        depth = min(max(self.recall_ks + (self.decoding.n_docs,)), len(self.retriever))
        retrieval = retrieve(self.model, self.retriever, questions, depth)  # (B, depth)
        return decode_retrieved(questions, self.model, retrieval, self.decoding), retrieval

    def _eval_step(self, batch: dict[str, Any]) -> tuple[list[int | None], int]:
        """Add this batch's em / f1 / recall@k counts over its real (non-padding) questions.

        Returns the real questions' answer ranks and the depth searched (([], 0) closed-book).
        """
        answers, retrieval = self.predict_questions(batch["questions"])
        real = [i for i, keep in enumerate(batch["real"].tolist()) if keep]
        references = [batch["answers"][i] for i in real]
        ranks, depth = None, 0
        if retrieval is not None:
            depth = retrieval.docs.n_docs
            ranks = answer_ranks(references, [retrieval.docs.texts[i] for i in real])
        sums = batch_sums([answers[i].text for i in real], references, ranks, self.recall_ks, depth)
        for key, value in sums.items():
            self._sums[key] += value
        return ranks or [], depth

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Greedy (or beam) answers of a validation batch, scored by exact match."""
        ranks, self.eval_depth = self._eval_step(batch)
        self.eval_ranks.extend(ranks)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """As validation, on the test questions."""
        ranks, self.eval_depth = self._eval_step(batch)
        self.eval_ranks.extend(ranks)

    def _log_eval(self, stage: str) -> None:
        """Sum the counts over ranks, then log ``{stage}/em``, ``/f1``, ``/recall@k``."""
        keys = sorted(self._sums)
        if not keys:
            return
        totals = torch.tensor([self._sums[k] for k in keys], dtype=torch.float64, device=self.device)
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        sums = dict(zip(keys, totals.tolist()))
        count = max(sums.pop("count"), 1.0)
        for key, value in sums.items():
            self.log(f"{stage}/{key}", value / count, prog_bar=key == "em", sync_dist=False, rank_zero_only=False)
        self._sums.clear()
        self.eval_ranks.clear()

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    # ---- export -------------------------------------------------------------------------------
    def export_pretrained(self, out_dir: str | Path) -> Path:
        """Write the trained RagModel as a directory rag-eval / rag-ask load (atomic)."""
        return save_rag_model(self.model, out_dir, mode=self.mode)
