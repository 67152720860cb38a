"""Side effects of training, kept out of the training step: sample predictions, throughput, index refresh.

- `SamplePredictions`: after each validation, a few questions with the model's
  answer, the references and the titles of the passages it read, as TensorBoard text.
- `LongQuestions`: once, how many training questions are cut to fit the length settings, and where.
- `Throughput`: questions/s and tokens/s of the optimizer-side step, all ranks together.
- `IndexRefresh` (end-to-end mode): on a schedule such as ``"0-1000:500,1000-10000:2000"``
  re-encode the corpus with the context encoder being trained, build a new index,
  and swap it into every rank's retriever. Encoding is split over the ranks
  (``encode_corpus`` shards by rank) or done by rank 0 alone.
"""
from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from index.encode import encode_corpus, load_shards, make_embed_fn
from index.faiss_index import DenseIndex
from rag_models.errors import InputError
from training.data.questions import question_place
from training.lit.schedule import parse_refresh_schedule, refresh_due

log = logging.getLogger(__name__)


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _passages_table(number: int, prediction: Any, texts: list[str], width: int = 200) -> list[str]:
    """Markdown rows of one question's passages read: position, title, posterior p(z|x,y), text (cut to ``width``)."""
    rows = ["", f"**{number}.** passages read", "", "| # | title | p(z\\|x,y) | text |", "|---|---|---|---|"]
    for k, (title, posterior) in enumerate(zip(prediction.titles, prediction.posteriors)):
        text = texts[k] if k < len(texts) else ""
        shown = text if len(text) <= width else text[:width] + "..."
        rows.append(f"| {k + 1} | {_markdown_cell(title)} | {posterior:.3f} | {_markdown_cell(shown)} |")
    return rows


class SamplePredictions(pl.Callback):
    """Logs ``n`` validation questions with prediction, references and retrieved titles with their posteriors,
    then each question's passages (title, posterior, text) (TensorBoard text ``val/samples``).

    Args:
        n: questions shown after each validation (not the sanity check): the first n of the datamodule's
            val split, decoded again on every rank. Does nothing for a module without ``predict_questions``
            or a datamodule without ``splits`` (DPR pre-training).
    """

    def __init__(self, *, n: int = 4) -> None:
        self.n = n

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        examples = getattr(trainer.datamodule, "splits", {}).get("val", [])[: self.n]
        if trainer.sanity_checking or not examples or not hasattr(pl_module, "predict_questions"):
            return
        # Every rank decodes (a sharded index search is a collective); rank 0 writes.
        predictions, retrieval = pl_module.predict_questions([e.question for e in examples])
        if not trainer.is_global_zero:
            return
        rows = ["| question | prediction | answers | retrieved |", "|---|---|---|---|"]
        for example, prediction in zip(examples, predictions):
            retrieved = " · ".join(f"{t} ({p:.2f})" for t, p in zip(prediction.titles, prediction.posteriors))
            cells = (example.question, prediction.text, " / ".join(example.answers), retrieved or "(none)")
            rows.append("| " + " | ".join(_markdown_cell(c) for c in cells) + " |")
        for number, prediction in enumerate(predictions if retrieval is not None else [], start=1):
            rows += _passages_table(number, prediction, retrieval.docs.texts[number - 1])
        text = "\n".join(rows)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("val/samples", text, global_step=trainer.global_step)
        log.info("step %d sample predictions:\n%s", trainer.global_step, text)


class LongQuestions(pl.Callback):
    """Warns once, at the start of training, how many training questions are cut to fit the length settings.

    A question longer than ``max_question_length`` or than the generator's question budget
    (`RagModel.question_cuts`) is trained on from its beginning, never refused; this says how many
    and where the first few are. Does nothing for a module without a RagModel (DPR pre-training).

    Args:
        shown: ``FILE:LINE`` places named in the warning.
    """

    def __init__(self, *, shown: int = 5) -> None:
        self.shown = shown

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = getattr(pl_module, "model", None)
        examples = getattr(trainer.datamodule, "splits", {}).get("train", [])
        if not trainer.is_global_zero or not examples or not hasattr(model, "question_cuts"):
            return
        cuts = model.question_cuts([e.question for e in examples], closed_book=pl_module.mode == "closed_book")
        source = trainer.datamodule.files["train"][0]
        places = [question_place(source, e, n) for n, (e, cut) in enumerate(zip(examples, cuts), start=1) if cut]
        if places:
            more = ", ..." if len(places) > self.shown else ""
            print(f"rag-train: warning: {len(places)} of {len(examples)} training questions are longer than the "
                  f"length settings and are cut to their beginning ({', '.join(places[: self.shown])}{more})",
                  file=sys.stderr, flush=True)


class Throughput(pl.Callback):
    """Logs ``perf/questions_per_s`` and ``perf/tokens_per_s`` (all ranks) from the training step's counts.

    A rate is this rank's count over its batch's seconds, times the world size. "Tokens" are what the
    module reports as ``n_tokens``: generator input (question + doc) and target tokens for RAG, passage
    characters for DPR.

    Args:
        skip_first: training batches (counted from the start of fit) not logged: they pay one-off costs.
    """

    def __init__(self, *, skip_first: int = 1) -> None:
        self.skip_first = skip_first  # the first steps pay one-off costs (allocations, lazy init)
        self._start: float | None = None
        self._seen = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._seen += 1
        if self._start is None or self._seen <= self.skip_first or not isinstance(outputs, dict):
            return
        seconds = max(time.perf_counter() - self._start, 1e-9)
        # Ranks run in lock step (DDP), so the global rate is the local one times the world size.
        world = trainer.world_size
        pl_module.log("perf/questions_per_s", world * outputs.get("n_questions", 0) / seconds, on_step=True,
                      on_epoch=False)
        pl_module.log("perf/tokens_per_s", world * outputs.get("n_tokens", 0) / seconds, on_step=True, on_epoch=False)


class IndexRefresh(pl.Callback):
    """Re-encode the corpus with the trained context encoder and swap the index, on a step schedule.

    Args:
        schedule: when to refresh, in optimizer steps (``trainer.global_step``): comma-separated
            ``start-end:every`` ranges, e.g. ``"0-1000:500,1000-10000:2000"``; "" never refreshes, and step 0
            never does (the index is fresh).
        out_dir: directory that receives ``step_XXXXXXXX/index`` at each refresh (and, until the index is
            built, that step's encoding shards).
        split_across_ranks: True: every rank encodes its share of the corpus shards; False: rank 0 encodes
            them all while the others wait.
        batch_size: passages per context-encoder forward pass while re-encoding (per rank).
        factory: the faiss index-factory string of the rebuilt index ("Flat", "HNSW32", "IVF4096,PQ64"...);
            it must match the module's ``index.factory`` (unless null), or the swap is refused.
        keep: refreshed indexes kept on disk, the newest ones (rank 0 deletes older ``step_*`` directories);
            0 or less keeps them all.

    Raises InputError for a malformed ``schedule`` and, at fit start, when the module's model does not
    train its context encoder.
    """

    def __init__(self, *, schedule: str, out_dir: str, split_across_ranks: bool = True, batch_size: int = 64,
                 factory: str = "Flat", keep: int = 2) -> None:
        self.ranges = parse_refresh_schedule(schedule)
        self.out_dir = Path(out_dir)
        self.split_across_ranks = split_across_ranks
        self.batch_size = batch_size
        self.factory = factory
        self.keep = keep
        self._last_step = -1
        self.refreshed_at: list[int] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = getattr(pl_module, "model", None)
        if model is None or not getattr(model, "train_context_encoder", False):
            raise InputError("the index refresh only makes sense while the context encoder trains",
                             setting="callbacks.index_refresh",
                             fix="set model.train_context_encoder=true or drop the callback")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step  # with gradient accumulation it stays put for several batches
        if step != self._last_step and refresh_due(step, self.ranges):
            self._last_step = step
            self.refresh(trainer, pl_module, step)

    def refresh(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> Path:
        """Encode (this rank's shards), build the index on rank 0, then every rank swaps to it."""
        model, retriever = pl_module.model, pl_module.retriever
        store = retriever.passages
        rank, world = (trainer.global_rank, trainer.world_size) if self.split_across_ranks else (0, 1)
        step_dir = self.out_dir / f"step_{step:08d}"
        encoder = model.context_encoder
        was_training = encoder.training
        if self.split_across_ranks or trainer.is_global_zero:
            embed = make_embed_fn(encoder, model.context_tokenizer, max_length=model.max_passage_length,
                                  device=pl_module.device)
            encode_corpus(store, embed, step_dir / "encoding", batch_size=self.batch_size, rank=rank, world_size=world,
                          encoder_name=f"context encoder at step {step}", progress=trainer.is_global_zero)
        encoder.train(was_training)  # make_embed_fn switched it to eval
        trainer.strategy.barrier("index_refresh_encoded")
        if trainer.is_global_zero:
            vectors = load_shards(step_dir / "encoding")  # (N, D)
            index = DenseIndex.build(vectors, factory=self.factory, passages=store, encoder=f"step {step}",
                                     progress=False)
            index.save(step_dir / "index")
            shutil.rmtree(step_dir / "encoding", ignore_errors=True)
        trainer.strategy.barrier("index_refresh_built")
        retriever.swap(step_dir / "index")
        self.refreshed_at.append(step)
        trainer.strategy.barrier("index_refresh_swapped")
        if trainer.is_global_zero:
            self._prune()
        return step_dir / "index"

    def _prune(self) -> None:
        """Delete all but the newest ``keep`` refreshed indexes (open memmaps keep working on Linux)."""
        old = sorted(self.out_dir.glob("step_*"))[: -self.keep] if self.keep > 0 else []
        for directory in old:
            shutil.rmtree(directory, ignore_errors=True)
