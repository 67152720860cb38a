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
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from decoding.answer import DecodingSettings
from index.retrieval import Retriever
from rag_models.checkpoint import MODES
from rag_models.docs import RetrievedDocs
from rag_models.errors import InputError
from rag_models.marginalize import rag_sequence_nll
from rag_models.rag import RagModel
from rag_models.retriever import freeze
from training.optim import configure_optimizer, param_groups
from training.rag_predict import (
    Prediction,
    closed_book_inputs,
    predict_closed_book,
    predict_rag,
    retrieve,
    score_batch,
)


class RagLitModule(pl.LightningModule):
    """Trains a `RagModel` (question encoder + generator; context encoder optional) on question-answer pairs."""

    def __init__(
        self,
        *,
        model: RagModel,
        optimizer: Callable[..., Optimizer],
        index_path: str | None = None,
        index_options: dict[str, Any] | None = None,
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
        self.index_path = index_path
        self.index_options = dict(index_options or {})
        self.mode = mode
        self.lrs = {"question_encoder": lr_question_encoder, "generator": lr_generator, "context_encoder": lr_context_encoder}
        self.train_question_encoder = train_question_encoder and mode == "rag"
        self.weight_decay = weight_decay
        self.schedule = {"schedule": schedule, "warmup_steps": warmup_steps, "final_lr_factor": final_lr_factor}
        settings = (decoding or DecodingSettings(strategy="fast", num_beams=1, max_length=20)).as_kwargs()
        # Docs read per val/test answer: eval_n_docs, else the decoding config's, else as trained.
        settings["n_docs"] = eval_n_docs or settings.get("n_docs") or model.n_docs
        settings["num_return_sequences"] = 1
        self.decoding = settings
        self.recall_ks = tuple(int(k) for k in recall_ks)
        if not self.train_question_encoder:
            freeze(model.question_encoder)  # the frozen-retriever baseline (and closed-book)
        self.retriever: Retriever | None = None
        self._losses = {"rag": self._rag_loss, "closed_book": self._closed_book_loss}[mode]
        self._sums: dict[str, float] = defaultdict(float)
        # Scalars only: checkpoints must load with weights_only=True.
        self.train()  # checkpoints load in eval mode; Lightning keeps whatever mode it finds
        self.save_hyperparameters({"mode": mode, "marginalization": model.marginalization, "n_docs": model.n_docs,
                                   **self.lrs, "train_question_encoder": self.train_question_encoder})

    # ---- set-up -----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Open the index on this rank (its own replica, or its slice when sharded)."""
        if self.mode == "rag" and self.retriever is None:
            options = dict(self.index_options)
            # One process holds the whole index anyway; sharding would need torch.distributed for nothing.
            options["sharded"] = bool(options.get("sharded", False)) and self.trainer.world_size > 1
            self.retriever = Retriever.from_dir(self.index_path, **options)

    def attach_retriever(self, retriever: Retriever) -> None:
        """Use an already opened retriever (tests, notebooks) instead of ``index_path``."""
        self.retriever = retriever

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
        return configure_optimizer(groups, self.optimizer_factory, total_steps=int(self.trainer.estimated_stepping_batches),
                                   **self.schedule)

    # ---- training -----------------------------------------------------------------------------
    def _to_device(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device) if isinstance(v, (Tensor, RetrievedDocs)) else v for k, v in inputs.items()}

    def _rag_loss(self, questions: list[str], targets: list[str]) -> tuple[Tensor, Tensor, int]:
        """(loss (), nll (B,), generator tokens) with retrieval; q.d keeps its gradient."""
        if self.retriever is None:
            raise InputError("no index to retrieve from", setting="index.path", fix="set index.path to a rag-build-index directory")
        _, docs = retrieve(self.model, self.retriever, questions, self.model.n_docs, self.device)
        inputs = self._to_device(self.model.prepare_inputs(questions, docs, targets))
        out = self.model(**inputs)
        tokens = int(inputs["context_attention_mask"].sum() + inputs["target"].ne(self.model.generator.pad_token_id).sum())
        return out.loss, out.nll, tokens

    def _closed_book_loss(self, questions: list[str], targets: list[str]) -> tuple[Tensor, Tensor, int]:
        """(loss, nll, tokens) of the generator reading the question alone (one pseudo-doc, p(z|x) = 1)."""
        gen = self.model.generator
        ids, mask = (t.to(self.device) for t in closed_book_inputs(self.model, questions))  # (B, L)
        decoder_input_ids, target = (t.to(self.device) for t in gen.prepare_targets(targets))  # (B, T)
        logits = gen(ids, mask, decoder_input_ids)  # (B, T, V)
        scores = logits.new_zeros(len(questions), 1)  # (B, 1)
        loss_of = lambda smoothing: rag_sequence_nll(logits, scores, target, gen.pad_token_id, label_smoothing=smoothing,
                                                    exclude_bos_score=self.model.exclude_bos_score, bos_token_id=gen.bos_token_id)
        nll = loss_of(0.0)  # (B,)
        objective = nll if self.model.label_smoothing == 0 else loss_of(self.model.label_smoothing)
        loss = objective.mean() if self.model.loss_reduction == "mean" else objective.sum()
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
    def predict_questions(self, questions: list[str]) -> tuple[list[Prediction], Any]:
        """Decoded answers (and the retrieved docs, None for closed-book) for a list of questions."""
        if self.mode == "closed_book":
            return predict_closed_book(self.model, questions, decoding=self.decoding, device=self.device), None
        depth = min(max(self.recall_ks + (self.decoding["n_docs"],)), len(self.retriever))
        return predict_rag(self.model, self.retriever, questions, retrieve_k=depth, decoding=self.decoding,
                           device=self.device)

    def _eval_step(self, batch: dict[str, Any]) -> None:
        predictions, docs = self.predict_questions(batch["questions"])
        for key, value in score_batch(predictions, batch["answers"], batch["real"], docs, self.recall_ks).items():
            self._sums[key] += value

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Greedy (or beam) answers of a validation batch, scored by exact match."""
        self._eval_step(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """As validation, on the test questions."""
        self._eval_step(batch)

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

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    # ---- export -------------------------------------------------------------------------------
    def export_pretrained(self, out_dir: str | Path) -> Path:
        """Write the trained RagModel as a directory rag-eval / rag-ask load (atomic)."""
        self.model.save_pretrained(out_dir, mode=self.mode)
        return Path(out_dir)
