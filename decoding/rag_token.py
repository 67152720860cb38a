"""RAG-Token decoding: greedy or beam search over the doc-marginalized next-token distribution.

At every step, for each question b and beam w, the generator's decoder runs on the
K rows (b, w, k) and the next-token distribution is the RAG-Token marginal
``logsumexp_k [log p(z_k|x) + log p(y_t|x,z_k,y<t)]``. The encoder runs once on the
B*K contexts; each beam reads those states by row index, and the decoder keeps a
KV cache that follows the beams.

Provenance comes free: beside its marginal score, every hypothesis sums the per-doc
log-probs of its own tokens, log p(y|x,z_k) = Σ_t log p(y_t|x,z_k,y<t), which the step
computes anyway; p(z_k|x,y) ∝ p(z_k|x) p(y|x,z_k) then needs no extra forward pass.

Row layout during search: (b, w, k) -> row (b*W + w)*K + k; B questions, W beams, K docs.
"""
from __future__ import annotations

import torch
from transformers import PreTrainedModel

from decoding.beam import SearchSettings, StepFn, run_search, search_settings
from decoding.contexts import encode_contexts
from decoding.results import GenerationResult
from decoding.scoring import CachedDecoder, check_inputs, doc_posteriors
from rag_models.marginalize import rag_token_step_logprobs


def marginal_step(decoder: CachedDecoder, doc_scores: torch.Tensor, settings: SearchSettings) -> StepFn:
    """The search step: (B*W,) last tokens -> marginal log-probs (B*W, V), per-doc log-probs (B*W, K, V).

    doc_scores (B*W, K): each beam's question's retriever scores.
    """
    n_docs = doc_scores.shape[1]
    offsets = torch.arange(n_docs, device=doc_scores.device)
    calls = [0]

    def step(tokens: torch.Tensor, beam_origin: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows = tokens.repeat_interleave(n_docs)  # (B*W*K,)
        origin = None if beam_origin is None else (beam_origin[:, None] * n_docs + offsets).reshape(-1)  # (B*W*K,)
        logits = decoder(rows, origin)  # (B*W*K, V)
        # The marginal is normalized up to rounding; renormalizing keeps scores bit-equal to transformers'.
        marginal = rag_token_step_logprobs(logits, doc_scores).log_softmax(-1)  # (B*W, V)
        calls[0] += 1
        if calls[0] == 1 and settings.forced_bos_token_id is not None:
            return marginal, None  # a forced BOS says nothing about the docs (as RAG-Sequence's scoring)
        per_doc = logits.log_softmax(-1).view(doc_scores.shape[0], n_docs, -1)  # (B*W, K, V)
        per_doc[:, :, settings.pad_token_id] = 0.0  # padding carries no score (as in training)
        return marginal, per_doc

    return step


@torch.no_grad()
def rag_token_generate(
    generator: PreTrainedModel,
    context_input_ids: torch.Tensor,
    context_attention_mask: torch.Tensor,
    doc_scores: torch.Tensor,
    *,
    n_docs: int | None = None,
    num_beams: int = 1,
    max_length: int = 20,
    min_length: int = 0,
    num_return_sequences: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
) -> GenerationResult:
    """RAG-Token greedy (num_beams=1) or beam search, with per-hypothesis doc posteriors.

    Args:
        generator: the HF seq2seq model (``Generator.model``); special ids come from its config.
        context_input_ids: (B*K, L) question+doc token ids, row b*K+k.
        context_attention_mask: (B*K, L); padding is never attended to.
        doc_scores: (B, K) retriever scores q·d (log-softmax gives p(z|x)).
        n_docs: K, or None to read it from ``doc_scores``.
        num_beams, max_length (decoder start token included), min_length, num_return_sequences,
        length_penalty, early_stopping: as transformers' ``generate``.

    Returns: a GenerationResult whose ``doc_loglik`` is Σ_t log p(y_t|x,z_k,y<t) of each final
    hypothesis under each doc (a forced first BOS and pad tokens not counted), summed during
    the search, and ``doc_posteriors`` p(z|x,y) ∝ p(z|x) p(y|x,z).
    """
    batch, k = check_inputs(context_input_ids, context_attention_mask, doc_scores, n_docs)
    settings = search_settings(
        generator,
        num_beams=num_beams,
        max_length=max_length,
        min_length=min_length,
        num_return_sequences=num_return_sequences,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
    )
    contexts = encode_contexts(generator, context_input_ids, context_attention_mask)  # B*K contexts, encoded once
    device = context_input_ids.device
    w = settings.num_beams
    rows = torch.arange(batch * k, device=device).view(batch, 1, k)  # (B, 1, K)
    beam_rows = rows.expand(batch, w, k).reshape(-1)  # (B*W*K,)
    decoder = CachedDecoder(generator, contexts, beam_rows)
    step = marginal_step(decoder, doc_scores.repeat_interleave(w, dim=0), settings)  # doc scores (B*W, K)
    found = run_search(step, batch, settings, device, extra_dims=k)
    r = settings.num_return_sequences
    doc_loglik = found.extra.view(batch, r, k)  # (B, R, K)
    posteriors, _ = doc_posteriors(doc_scores, doc_loglik)  # (B, R, K)
    return GenerationResult(
        sequences=found.sequences,
        scores=found.scores,
        doc_loglik=doc_loglik.view(batch * r, k),
        doc_posteriors=posteriors.view(batch * r, k),
        num_return_sequences=r,
    )
