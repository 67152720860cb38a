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
        titles: B lists of K passage titles, as the generator reads them (maybe empty).
        texts: B lists of K passage texts.
        names: B lists of K names to show a user: the title, or the passage id where the title is empty;
            None: the titles (docs not from a passage store).
    """

    ids: torch.Tensor
    scores: torch.Tensor
    vectors: torch.Tensor
    titles: list[list[str]]
    texts: list[list[str]]
    names: list[list[str]] | None = None

    @property
    def shown_names(self) -> list[list[str]]:
        """``names`` when known, else the titles: what provenance shows for each doc."""
        return self.names if self.names is not None else self.titles

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
            names=self.names,
        )

    def first(self, k: int) -> "RetrievedDocs":
        """The top ``k`` documents of each question (they are sorted best first)."""
        return RetrievedDocs(
            ids=self.ids[:, :k],
            scores=self.scores[:, :k],
            vectors=self.vectors[:, :k],
            titles=[row[:k] for row in self.titles],
            texts=[row[:k] for row in self.texts],
            names=None if self.names is None else [row[:k] for row in self.names],
        )
