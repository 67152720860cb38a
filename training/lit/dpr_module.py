"""DPR bi-encoder pre-training as a LightningModule: in-batch + hard negatives, dev recall@k, encoder export.

Loss (Karpukhin et al. 2020, Sec. 3.2): for question i with positive p_i, the
negative log-softmax of q_i . p_i over every passage of the batch (the other
questions' positives and all hard negatives). Under DDP the passages of all
ranks are gathered (with gradient), so each question sees W times more
negatives, and the loss equals that of one process holding the global batch.

Dev recall@k: dev questions are searched, by exact inner product, in the dev
corpus encoded with the current context encoder at the end of each validation. A
question is answered at rank r when the r-th passage's text holds one of its
answers (`answer_match.first_answer_rank`, DPR's top-k accuracy and the check of
rag-eval's recall@k); a dev question without answers counts its gold passages instead.

``share_encoders``: one encoder serves both sides (as Contriever does). DPR trains
two; but when test questions name entities whose tokens never occur in training
(the demo world's unseen towns), two separate embedding tables cannot learn to
match them, while one shared table matches a token with itself. Measured on the
demo world (vocab 1000, mean pooling, 150 steps): dev recall@5 0.77 with two
encoders, 0.99 with one. The export still writes both directories.

Shapes: B questions, P passages (B positives + B*H hard negatives), D dim, N corpus.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim import Optimizer

from rag_models.atomic import atomic_directory
from rag_models.errors import InputError
from rag_models.precision import full_precision_matmul
from rag_models.retriever import load_encoder, tokenize_passages
from training.data.dpr_datamodule import passage_key
from training.evaluation.answer_match import first_answer_rank
from training.lit.optim import configure_optimizer, param_groups


class DprLitModule(pl.LightningModule):
    """Trains a question encoder and a context encoder so that q . p ranks a question's gold passage first.

    Args:
        question_encoder: hub name or local directory of the question encoder (a DPR checkpoint or any
            transformers encoder); configs/retriever/ fills it.
        context_encoder: hub name or local directory of the context encoder. With ``share_encoders`` its
            weights go unused: its tokenizer still reads the passages, and the export saves its class.
        optimizer: a partial optimizer class (e.g. AdamW with eps) that takes the param groups.
        pooling: how token states (B, L, H) become one vector (B, D), for both encoders: "pooler", "cls",
            "mean", or "auto" (the pooling saved with the checkpoint, else "pooler" for DPR, "cls" otherwise).
        lr: the one learning rate of both encoders (before the schedule's factor), > 0.
        weight_decay: AdamW decay of the weight matrices (biases and norms never decay).
        schedule: "linear" (warm-up, then linear decay to ``final_lr_factor``) or "constant" after warm-up.
        warmup_steps: optimizer steps of linear warm-up.
        final_lr_factor: the lr multiplier reached at the last step (linear schedule), in [0, 1].
        max_question_length: tokens kept per question (longer ones are truncated).
        max_passage_length: tokens kept per passage input ``[CLS] title [SEP] text [SEP]`` (truncated).
        gather_negatives: under DDP, score each question against the passages of all W ranks
            (W * (B + B*H) columns) instead of its own rank's B + B*H; no effect on one device.
        share_encoders: True: one module (the question encoder's weights) encodes both sides; the export
            still writes both directories. Needs the two tokenizers to have the same vocabulary.
        recall_ks: the k of ``val/recall@k`` (a passage holding an answer, or for a question without answers
            a gold passage, among the top k of the dev corpus); a k larger than the corpus is skipped.
        encode_batch_size: passages per context-encoder forward pass when the dev corpus is encoded (once at
            the end of each validation, on every rank).

    Raises InputError when ``share_encoders`` is set and the tokenizers' vocabularies differ, and (from the
    loader) when a checkpoint cannot be found or ``pooling`` is unknown; ``lr``, ``schedule``,
    ``warmup_steps`` and ``final_lr_factor`` are checked when the optimizer is configured.
    """

    def __init__(
        self,
        *,
        question_encoder: str,
        context_encoder: str,
        optimizer: Callable[..., Optimizer],
        pooling: str = "auto",
        lr: float = 2e-5,
        weight_decay: float = 0.0,
        schedule: str = "linear",
        warmup_steps: int = 0,
        final_lr_factor: float = 0.0,
        max_question_length: int = 64,
        max_passage_length: int = 256,
        gather_negatives: bool = True,
        share_encoders: bool = False,
        recall_ks: tuple[int, ...] = (1, 5, 20),
        encode_batch_size: int = 256,
    ) -> None:
        super().__init__()
        self.question_encoder, self.question_tokenizer = load_encoder(
            question_encoder, role="question", pooling=pooling)
        self.context_encoder, self.context_tokenizer = load_encoder(context_encoder, role="context", pooling=pooling)
        self.context_encoder_path, self.share_encoders = str(context_encoder), share_encoders
        if share_encoders:
            if self.question_tokenizer.get_vocab() != self.context_tokenizer.get_vocab():
                raise InputError("the question and context tokenizers differ: one encoder cannot read both",
                                 setting="module.share_encoders", fix="set it to false, or use one vocabulary")
            self.context_encoder = self.question_encoder  # one module, one set of weights, both sides
        self.optimizer_factory = optimizer
        self.lr, self.weight_decay = lr, weight_decay
        self.schedule = {"schedule": schedule, "warmup_steps": warmup_steps, "final_lr_factor": final_lr_factor}
        self.max_question_length, self.max_passage_length = max_question_length, max_passage_length
        self.gather_negatives = gather_negatives
        self.recall_ks = tuple(int(k) for k in recall_ks)
        self.encode_batch_size = encode_batch_size
        self._dev_vectors: list[Tensor] = []
        self._dev_gold: list[list[int]] = []
        self._dev_answers: list[list[str]] = []
        self.train()  # checkpoints load in eval mode; Lightning keeps whatever mode it finds
        self.save_hyperparameters({"question_encoder": str(question_encoder), "context_encoder": str(context_encoder),
                                   "lr": lr, "gather_negatives": gather_negatives, "share_encoders": share_encoders})

    def configure_optimizers(self) -> dict[str, Any]:
        """One lr for both encoders (DPR trains them alike), warm-up then linear decay."""
        # With shared encoders the context group is empty (param_groups counts each parameter once).
        groups = param_groups({"question_encoder": (self.question_encoder, self.lr),
                               "context_encoder": (self.context_encoder, self.lr)}, weight_decay=self.weight_decay)
        return configure_optimizer(groups, self.optimizer_factory,
                                   total_steps=int(self.trainer.estimated_stepping_batches),
                                   **self.schedule)

    # ---- encoding ---------------------------------------------------------------------------
    def encode_questions(self, questions: list[str]) -> Tensor:
        """(B, D) question vectors (with gradient when called under grad)."""
        enc = self.question_tokenizer(questions, max_length=self.max_question_length, truncation=True, padding=True,
                                      return_tensors="pt").to(self.device)
        return self.question_encoder(enc["input_ids"], enc["attention_mask"])

    def encode_passages(self, titles: list[str], texts: list[str]) -> Tensor:
        """(P, D) passage vectors, DPR input ``[CLS] title [SEP] text [SEP]``."""
        enc = tokenize_passages(self.context_tokenizer, titles, texts, self.max_passage_length).to(self.device)
        return self.context_encoder(enc["input_ids"], enc["attention_mask"])

    # ---- training -----------------------------------------------------------------------------
    def _gathered(self, tensor: Tensor) -> Tensor:
        """All ranks' rows concatenated in rank order, gradient flowing back to each (no-op alone)."""
        if not self.gather_negatives or self.trainer.world_size == 1:
            return tensor
        gathered = self.all_gather(tensor, sync_grads=tensor.requires_grad)  # (W, n, ...)
        return gathered.reshape(-1, *tensor.shape[1:])  # (W*n, ...)

    def contrastive_loss(self, q: Tensor, p: Tensor, keys: Tensor, positive_keys: Tensor,
                         offset: int) -> tuple[Tensor, Tensor]:
        """Mean NLL of each question's positive (column ``offset + i``) and the in-batch accuracy.

        q (B, D), p (P, D), keys (P,), positive_keys (B,). Other columns holding the same
        passage as question i's positive are masked (they are not negatives).
        """
        scores = full_precision_matmul(q, p.T)  # (B, P) float32 even under autocast: the loss's logits
        target = torch.arange(q.shape[0], device=q.device) + offset  # (B,)
        same = keys.unsqueeze(0) == positive_keys.unsqueeze(1)  # (B, P)
        same[torch.arange(q.shape[0], device=q.device), target] = False
        scores = scores.masked_fill(same, torch.finfo(scores.dtype).min)
        loss = F.cross_entropy(scores, target)
        accuracy = (scores.argmax(dim=1) == target).float().mean()
        return loss, accuracy

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """In-batch + hard-negative loss; logs ``train/loss`` and ``train/accuracy``."""
        questions = batch["questions"]
        q = self.encode_questions(questions)  # (B, D)
        p = self.encode_passages(batch["titles"], batch["texts"])  # (P, D)
        n_pos = len(questions)
        # Rank r's block is [positives_r, hard_r]; its positives start at r * P in the gathered matrix.
        offset = self.global_rank * p.shape[0] if self.gather_negatives and self.trainer.world_size > 1 else 0
        all_p, all_keys = self._gathered(p), self._gathered(batch["keys"])
        loss, accuracy = self.contrastive_loss(q, all_p, all_keys, batch["positive_keys"], offset)
        self.log("train/loss", loss, prog_bar=True, batch_size=n_pos)
        self.log("train/accuracy", accuracy, batch_size=n_pos)
        tokens = sum(len(t) for t in batch["texts"])  # characters, a cheap size proxy for the throughput log
        return {"loss": loss, "n_questions": n_pos, "n_tokens": tokens}

    # ---- dev recall@k ---------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Encode this rank's dev questions; the search happens once the corpus is encoded."""
        with torch.no_grad():
            q = self.encode_questions(batch["questions"])  # (B, D)
        real = batch["real"].tolist()
        self._dev_vectors.append(q[batch["real"].to(q.device)].float())
        self._dev_gold += [gold for gold, keep in zip(batch["gold"], real) if keep]
        self._dev_answers += [answers for answers, keep in zip(batch["answers"], real) if keep]

    @torch.no_grad()
    def encode_corpus(self, passages: list) -> Tensor:
        """(N, D) vectors of ``passages`` with the current context encoder, in eval batches."""
        chunks = []
        for start in range(0, len(passages), self.encode_batch_size):
            part = passages[start:start + self.encode_batch_size]
            chunks.append(self.encode_passages([p.title for p in part], [p.text for p in part]).float())
        return torch.cat(chunks)  # (N, D)

    def on_validation_epoch_end(self) -> None:
        """Search the dev corpus; log ``val/recall@k`` (summed over ranks) for each k."""
        corpus = getattr(self.trainer.datamodule, "corpus", [])
        if not corpus:
            raise InputError("no dev corpus to search", setting="data.dev_file",
                             fix="give a DPR dev file (or passages_file)")
        vectors = self.encode_corpus(corpus)  # (N, D)
        keys = torch.tensor([passage_key(p) for p in corpus], device=vectors.device)  # (N,)
        ks = [k for k in self.recall_ks if k <= len(corpus)]
        hits = torch.zeros(len(ks) + 1, dtype=torch.float64, device=self.device)
        if self._dev_vectors:
            q = torch.cat(self._dev_vectors)  # (Q, D)
            top = full_precision_matmul(q, vectors.T).topk(max(ks), dim=1).indices  # (Q, kmax)
            for row, (gold, answers) in enumerate(zip(self._dev_gold, self._dev_answers)):
                first = self._first_hit(top[row], keys, corpus, gold, answers)
                hits[:-1] += torch.tensor([first is not None and first < k for k in ks], dtype=torch.float64,
                                          device=self.device)
            hits[-1] = len(self._dev_gold)
        hits = self.trainer.strategy.reduce(hits, reduce_op="sum")
        for k, value in zip(ks, hits[:-1].tolist()):
            self.log(f"val/recall@{k}", value / max(hits[-1].item(), 1.0), prog_bar=k == ks[0], sync_dist=False)
        self._dev_vectors, self._dev_gold, self._dev_answers = [], [], []

    @staticmethod
    def _first_hit(top: Tensor, keys: Tensor, corpus: list, gold: list[int], answers: list[str]) -> int | None:
        """Rank (into ``top`` (kmax,), corpus rows best first) of the first passage answering the question, or None.

        With answers: the first whose text holds one (titles are no evidence), as rag-eval counts it.
        Without (DPR files may omit them): the first gold passage, by key (``keys`` (N,)).
        """
        if answers:
            return first_answer_rank(answers, [corpus[i].text for i in top.tolist()])
        found = torch.isin(keys[top], torch.tensor(gold, device=keys.device))  # (kmax,)
        return int(found.nonzero()[0]) if found.any() else None

    # ---- export -------------------------------------------------------------------------------
    def export_pretrained(self, out_dir: str | Path) -> Path:
        """Write ``question_encoder/`` and ``context_encoder/`` (each with its tokenizer); one atomic directory."""
        context = self.context_encoder
        if self.share_encoders:
            # Saved as the context-encoder class (its own weight names), holding the shared weights.
            context, _ = load_encoder(self.context_encoder_path, role="context", pooling=self.question_encoder.pooling)
            context.model.base_model.load_state_dict(self.question_encoder.model.base_model.state_dict())
        with atomic_directory(out_dir) as tmp:
            self.question_encoder.save_pretrained(tmp / "question_encoder", self.question_tokenizer)
            context.save_pretrained(tmp / "context_encoder", self.context_tokenizer)
        return Path(out_dir)
