"""The retrieved documents handed from the index to the model (no faiss here)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RetrievedDocs:
    """Top-K passages for a batch of B questions.

    Fields:
        ids: (B, K) int64, passage row numbers in the passage store.
        scores: (B, K) float, inner products as the index computed them (no grad).
        vectors: (B, K, D) float, the stored passage vectors; the model recomputes
            ``q · d`` from these so that gradients reach the question encoder.
        titles: B lists of K passage titles.
        texts: B lists of K passage texts.
    """

    ids: torch.Tensor
    scores: torch.Tensor
    vectors: torch.Tensor
    titles: list[list[str]]
    texts: list[list[str]]

    @property
    def n_docs(self) -> int:
        return int(self.ids.shape[1])

    def to(self, device: torch.device | str) -> "RetrievedDocs":
        """Move the tensors (not the strings) to ``device``."""
        return RetrievedDocs(
            ids=self.ids.to(device),
            scores=self.scores.to(device),
            vectors=self.vectors.to(device),
            titles=self.titles,
            texts=self.texts,
        )

    def first(self, k: int) -> "RetrievedDocs":
        """The top ``k`` documents of each question (they are sorted best first)."""
        return RetrievedDocs(
            ids=self.ids[:, :k],
            scores=self.scores[:, :k],
            vectors=self.vectors[:, :k],
            titles=[row[:k] for row in self.titles],
            texts=[row[:k] for row in self.texts],
        )
