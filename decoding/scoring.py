"""Running the generator over contexts encoded once: step by step, or teacher-forced.

Both RAG decoders run the generator's encoder a single time on the B*K
(question, doc) contexts and project the decoder's cross-attention keys and values
once (`decoding.contexts`), then reuse them by row index: for the beams during
search (with a self-attention KV cache that follows the beams), and in the
teacher-forced pass that scores finished hypotheses under every document.

Dimensions: B questions, K docs, W beams, L source length, T target length,
V vocabulary, H generator hidden size, M scored (hypothesis, doc) rows.
"""
from __future__ import annotations

import torch
from transformers import PreTrainedModel

from decoding.contexts import EncodedContexts
from rag_models.errors import InputError

# Teacher-forced scoring holds (rows, T, V) logits and each row's cross-attention keys and
# values; one chunk holds at most this many floats, by device type. On a CPU smaller chunks are
# faster (measured at d_model 256, vocab 8000: 64 MB chunks 20% faster than 512 MB ones, the
# logits' bias add and logsumexp stay nearer the caches); a GPU wants large batches.
SCORE_CHUNK_ELEMENTS: dict[str, int] = {"cpu": 2**24, "cuda": 2**28}
DEFAULT_CHUNK_ELEMENTS = 2**26  # other device types


def chunk_elements_for(device: torch.device) -> int:
    """The default cap on the floats of one scoring chunk on ``device`` (`SCORE_CHUNK_ELEMENTS`)."""
    return SCORE_CHUNK_ELEMENTS.get(device.type, DEFAULT_CHUNK_ELEMENTS)

def check_inputs(
    context_input_ids: torch.Tensor, context_attention_mask: torch.Tensor, doc_scores: torch.Tensor, n_docs: int | None
) -> tuple[int, int]:
    """Validate the shapes of the precomputed generator inputs; returns (B, K)."""
    if doc_scores.dim() != 2:
        raise InputError(f"doc_scores has shape {tuple(doc_scores.shape)}", setting="doc_scores",
                         fix="pass a (B, K) tensor")
    batch, k = doc_scores.shape
    if n_docs is not None and n_docs != k:
        raise InputError(
            f"n_docs={n_docs} but doc_scores has {k} columns", setting="n_docs",
            fix="pass n_docs=None or the K of doc_scores",
        )
    if context_input_ids.dim() != 2 or context_input_ids.shape[0] != batch * k:
        raise InputError(
            f"context_input_ids has shape {tuple(context_input_ids.shape)}, "
            f"expected ({batch * k}, L) for B={batch}, K={k}",
            setting="context_input_ids",
            fix="pass one row per (question, doc), question-major (row b*K+k)",
        )
    if context_attention_mask.shape != context_input_ids.shape:
        raise InputError(
            f"context_attention_mask has shape {tuple(context_attention_mask.shape)}, "
            f"context_input_ids {tuple(context_input_ids.shape)}",
            setting="context_attention_mask",
            fix="pass the mask that came with the ids",
        )
    return batch, k


class CachedDecoder:
    """The generator's decoder run one token at a time over fixed contexts, with a KV cache.

    `contexts` holds the R0 encoded contexts; `rows` (R,) says which of them each decoding row reads.
    """

    def __init__(self, generator: PreTrainedModel, contexts: EncodedContexts, rows: torch.Tensor) -> None:
        self.generator = generator
        inputs = contexts.decoder_inputs(rows)
        self.encoder_outputs = inputs["encoder_outputs"]  # (R, L, H)
        self.encoder_mask = inputs["attention_mask"]  # (R, L)
        self.cache = inputs["past_key_values"]  # cross-attention keys/values of the rows, or None

    def __call__(self, tokens: torch.Tensor, row_origin: torch.Tensor | None) -> torch.Tensor:
        """Next-token logits for each row. tokens (R,), row_origin (R,) | None -> (R, V) float."""
        if row_origin is not None and self.cache is not None and self.cache.get_seq_length() > 0:
            self._reorder(row_origin)
        out = self.generator(
            encoder_outputs=self.encoder_outputs,
            attention_mask=self.encoder_mask,
            decoder_input_ids=tokens[:, None],  # (R, 1)
            past_key_values=self.cache,
            use_cache=True,
            return_dict=True,
        )
        self.cache = out.past_key_values
        return out.logits[:, -1].float()

    def _reorder(self, row_origin: torch.Tensor) -> None:
        """Follow the beams in the self-attention cache only.

        A beam only ever continues a beam of the same (question, doc) encoder row, so the
        cross-attention keys and values of row i and of row_origin[i] are equal: copying
        them every step (as transformers' RAG does) would be wasted work.
        """
        self_cache = getattr(self.cache, "self_attention_cache", self.cache)
        self_cache.reorder_cache(row_origin)


def teacher_forced_logprobs(
    generator: PreTrainedModel,
    contexts: EncodedContexts,
    rows: torch.Tensor,
    tokens: torch.Tensor,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """log p(tokens[:, t] | tokens[:, <t], context) for every position, in row chunks.

    rows (M,) indices into the R0 contexts, tokens (M, T) starting with the decoder start
    token -> (M, T), 0 at position 0. A chunk holds at most ``chunk_elements`` floats of
    logits, cross-attention keys/values and self-attention cache (>= one row); None: the
    device's default (`chunk_elements_for`).
    """
    m, t = tokens.shape
    out = contexts.states.new_zeros(m, t, dtype=torch.float32)  # (M, T)
    if t < 2 or m == 0:
        return out
    per_row = 2 * (t - 1) * (getattr(generator.config, "vocab_size", None) or 1)  # logits, their log_softmax
    layers = getattr(generator.config, "decoder_layers", None) or 1
    hidden = contexts.states.shape[2]
    per_row += 2 * layers * hidden * (contexts.states.shape[1] + t)  # cross-attention K, V + self-attention cache
    per_chunk = max(1, (chunk_elements or chunk_elements_for(tokens.device)) // per_row)
    for start in range(0, m, per_chunk):
        sl = slice(start, start + per_chunk)
        logits = generator(
            **contexts.decoder_inputs(rows[sl]),  # the rows' contexts, keys/values projected once
            decoder_input_ids=tokens[sl, :-1],  # (m', T-1): position t predicts token t+1
            use_cache=True,  # the cross-attention cache is read only on this path
            return_dict=True,
        ).logits.float()  # (m', T-1, V)
        target = tokens[sl, 1:, None]  # (m', T-1, 1)
        # log_softmax, as the search's steps: one fused pass (3.6x faster than gather - logsumexp on a CPU,
        # whose logsumexp makes four); its second (m', T-1, V) tensor is bounded by the chunk
        out[sl, 1:] = logits.log_softmax(-1).gather(-1, target).squeeze(-1)
    return out


def sequence_loglik(tokens: torch.Tensor, token_logprobs: torch.Tensor, pad_token_id: int,
                    skip_first: torch.Tensor) -> torch.Tensor:
    """Σ_t log p(y_t) over the generated tokens that are not padding. (M, T), (M, T), (M,) bool -> (M,).

    Padding carries no score (as in training, where pad targets are ignored); `skip_first`
    drops the first generated token, a BOS that the decoder was made to emit.
    """
    counted = tokens[:, 1:] != pad_token_id  # (M, T-1)
    counted[:, 0] &= ~skip_first
    return (token_logprobs[:, 1:] * counted).sum(dim=1)


def starts_with_bos(tokens: torch.Tensor, valid: torch.Tensor, bos_token_id: int | None) -> torch.Tensor:
    """Per question: do all its hypotheses begin with BOS? (B, N, T), (B, N) -> (B,) bool.

    transformers' RAG-Sequence scoring (``exclude_bos_score``) leaves the first token out
    exactly then: a BOS every hypothesis has (BART's forced one) says nothing about the docs.
    """
    if bos_token_id is None or tokens.shape[2] < 2:
        return torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    return ((tokens[:, :, 1] == bos_token_id) | ~valid).all(dim=1)


def doc_posteriors(doc_scores: torch.Tensor, doc_loglik: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """p(z|x,y) ∝ p(z|x) p(y|x,z) and the marginal log p(y|x). (B, K), (B, N, K) -> (B, N, K), (B, N)."""
    joint = doc_scores.float().log_softmax(-1)[:, None, :] + doc_loglik  # (B, N, K)
    marginal = joint.logsumexp(-1)  # (B, N)
    posterior = torch.where(torch.isfinite(marginal)[..., None], (joint - marginal[..., None]).exp(), 0.0)
    return posterior, marginal
