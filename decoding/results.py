"""What the RAG decoders return: hypotheses with their scores and their provenance."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GenerationResult:
    """R hypotheses per question, best first (B questions, K docs, R = num_return_sequences).

    Fields:
        sequences: (B*R, T) token ids; row b*R+r is hypothesis r of question b. They begin with
            the decoder start token and are padded with pad_token_id after their end.
        scores: (B*R,) what the hypotheses were ranked by. RAG-Token beam: transformers'
            ``sequences_scores`` (Σ_t log p(y_t|x,y<t) over the processed marginal, divided by
            generated_length**length_penalty); RAG-Token greedy: that sum undivided; RAG-Sequence:
            the marginal log p(y|x) = logsumexp_k [log p(z_k|x) + log p(y|x,z_k)] (fast decoding:
            over the docs whose beams produced y only).
        doc_loglik: (B*R, K) log p(y|x,z_k): teacher-forced under every doc (RAG-Token, RAG-Sequence
            thorough), or the beam's plain token log-prob sum, -inf for docs that did not
            produce y (RAG-Sequence fast). Pad tokens and a shared first BOS are not counted.
        doc_posteriors: (B*R, K) p(z_k|x,y) ∝ p(z_k|x) p(y|x,z_k), from `doc_loglik`; each row sums to 1.
        num_return_sequences: R.
    """

    sequences: torch.Tensor
    scores: torch.Tensor
    doc_loglik: torch.Tensor
    doc_posteriors: torch.Tensor
    num_return_sequences: int

    @property
    def n_docs(self) -> int:
        return int(self.doc_posteriors.shape[1])

    @property
    def batch_size(self) -> int:
        return int(self.sequences.shape[0]) // self.num_return_sequences

    def question_rows(self, b: int) -> range:
        """Rows of `sequences` that hold the hypotheses of question `b`, best first."""
        r = self.num_return_sequences
        return range(b * r, (b + 1) * r)
