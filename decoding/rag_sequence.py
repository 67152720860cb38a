"""RAG-Sequence decoding, thorough and fast, for a whole batch at once.

1. Beam search per document: the B*K (question, doc) contexts are B*K independent
   searches of W beams each, run together (one encoder pass, one KV cache).
2. Per question, the union of its K*W hypotheses, duplicates removed (first
   occurrence kept, as transformers does).
3. Every candidate y gets log p(y|x,z_k) for each doc k. Where doc k's beam produced y,
   the beam's plain token log-prob sum is that value already. Elsewhere:
   - thorough: one batched teacher-forced pass over all remaining (question, candidate,
     doc) triples, reusing the encoder states of step 1;
   - fast: -inf (the paper's approximation p(y|x,z) ≈ 0): no extra forward pass.
4. log p(y|x) = logsumexp_k [log p(z_k|x) + log p(y|x,z_k)]; the R best are returned.

Dimensions: B questions, K docs, W beams, N candidates per question (<= K*W), T length.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from decoding.beam import SearchOutput, SearchSettings, run_search, search_settings
from decoding.contexts import EncodedContexts, encode_contexts
from decoding.results import GenerationResult
from decoding.scoring import (
    CachedDecoder,
    check_inputs,
    doc_posteriors,
    sequence_loglik,
    starts_with_bos,
    teacher_forced_logprobs,
)
from rag_models.errors import InputError


@dataclass
class Candidates:
    """The deduplicated hypotheses of each question.

    Fields:
        tokens: (B, N, T) token ids; rows past a question's count repeat a valid one.
        valid: (B, N) bool, which of the N slots hold a real candidate.
        source: (B, K*W) candidate index of each per-doc beam output (output j = doc j // W).
    """

    tokens: torch.Tensor
    valid: torch.Tensor
    source: torch.Tensor


def union_of_hypotheses(sequences: torch.Tensor, batch: int) -> Candidates:
    """Deduplicate each question's K*W beam outputs, keeping first occurrences in order. (B*K*W, T)."""
    per_question = sequences.shape[0] // batch
    rows = sequences.tolist()  # one device->host copy; hashing tuples of ints is the cheap part
    firsts: list[list[int]] = []
    source: list[list[int]] = []
    for b in range(batch):
        seen: dict[tuple[int, ...], int] = {}
        first: list[int] = []
        for j in range(b * per_question, (b + 1) * per_question):
            key = tuple(rows[j])
            if key not in seen:
                seen[key] = len(first)
                first.append(j)
        firsts.append(first)
        source.append([seen[tuple(rows[j])] for j in range(b * per_question, (b + 1) * per_question)])
    n = max(len(f) for f in firsts)
    device = sequences.device
    valid = torch.tensor([[i < len(f) for i in range(n)] for f in firsts], device=device)  # (B, N)
    index = torch.tensor([f + [f[0]] * (n - len(f)) for f in firsts], device=device)  # (B, N)
    return Candidates(tokens=sequences[index], valid=valid, source=torch.tensor(source, device=device))


@dataclass
class _Scoring:
    """What both scorers may read (built once per batch)."""

    generator: PreTrainedModel
    contexts: EncodedContexts  # the B*K contexts: encoder states, cross-attention keys/values
    found: SearchOutput  # (B*K*W, T) per-doc beam outputs
    candidates: Candidates
    skip_first: torch.Tensor  # (B,) drop the shared first BOS from every score
    settings: SearchSettings
    n_docs: int
    chunk_elements: int | None  # None: the device's default


def thorough_loglik(s: _Scoring) -> torch.Tensor:
    """log p(y|x,z_k) of every candidate under every doc: -> (B, N, K), -inf at invalid slots.

    Where doc k's own beam produced y, its plain token log-prob sum already is log p(y|x,z_k)
    (the same decoder, run incrementally); one batched teacher-forced pass fills in the rest.
    """
    known = fast_loglik(s)  # (B, N, K)
    batch, n, t = s.candidates.tokens.shape
    k = s.n_docs
    missing = (s.candidates.valid[:, :, None] & torch.isinf(known)).nonzero()  # (M, 3) rows of (b, c, k)
    question, cand, doc = missing.unbind(1)
    tokens = s.candidates.tokens[question, cand]  # (M, T)
    rows = question * k + doc  # (M,) encoder row b*K+k
    token_lp = teacher_forced_logprobs(s.generator, s.contexts, rows, tokens, s.chunk_elements)  # (M, T)
    known[question, cand, doc] = sequence_loglik(tokens, token_lp, s.settings.pad_token_id, s.skip_first[question])
    return known


def fast_loglik(s: _Scoring) -> torch.Tensor:
    """log p(y|x,z_k) from doc k's own beams, -inf where doc k did not produce y: -> (B, N, K)."""
    batch, n, _ = s.candidates.tokens.shape
    k = s.n_docs
    outputs = s.found.sequences.shape[0]  # B*K*W
    w = outputs // (batch * k)
    row = torch.arange(outputs, device=s.found.sequences.device)
    question, doc = row // (k * w), (row // w) % k
    # The plain token log-prob sum (not the length-normalized beam score): a likelihood to marginalize.
    loglik = sequence_loglik(s.found.sequences, s.found.token_logprobs, s.settings.pad_token_id, s.skip_first[question])
    target = (question * n + s.candidates.source.view(-1)) * k + doc  # flat (b, c, k)
    out = loglik.new_full((batch * n * k,), -torch.inf)
    out.scatter_reduce_(0, target, loglik, reduce="amax")
    return out.view(batch, n, k)


# mode name -> how candidates are scored under each doc
SCORERS: dict[str, Callable[[_Scoring], torch.Tensor]] = {"thorough": thorough_loglik, "fast": fast_loglik}


@torch.no_grad()
def rag_sequence_generate(
    generator: PreTrainedModel,
    context_input_ids: torch.Tensor,
    context_attention_mask: torch.Tensor,
    doc_scores: torch.Tensor,
    *,
    mode: str = "thorough",
    n_docs: int | None = None,
    num_beams: int = 1,
    max_length: int = 20,
    min_length: int = 0,
    num_return_sequences: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    score_chunk_elements: int | None = None,
) -> GenerationResult:
    """RAG-Sequence decoding ("thorough" or "fast") of a batch; see the module docstring.

    Args:
        generator: the HF seq2seq model (``Generator.model``); special ids come from its config.
        context_input_ids: (B*K, L) question+doc token ids, row b*K+k.
        context_attention_mask: (B*K, L); padding is never attended to.
        doc_scores: (B, K) retriever scores q·d.
        mode: "thorough" (score every candidate under every doc) or "fast".
        num_beams: beams per doc (1: greedy per doc); num_return_sequences <= num_beams per question.
        max_length, min_length, length_penalty, early_stopping: of the per-doc searches, as transformers'.
        score_chunk_elements: cap on the floats (logits, cached keys/values) one chunk of the thorough
            scoring pass holds; at least one row is scored per chunk. None: the device's default
            (`decoding.scoring.SCORE_CHUNK_ELEMENTS`: 2**24 on a CPU, 2**28 on a GPU).

    Raises InputError for an unknown mode, score_chunk_elements < 1, or inputs of mismatched shapes.
    """
    if mode not in SCORERS:
        raise InputError(f"unknown RAG-Sequence decoding mode {mode!r}", setting="mode",
                         fix=f"use one of {sorted(SCORERS)}")
    if score_chunk_elements is not None and score_chunk_elements < 1:
        raise InputError(f"score_chunk_elements={score_chunk_elements}", setting="decoding.score_chunk_elements",
                         fix="use a positive number of floats, or null for the device's default")
    batch, k = check_inputs(context_input_ids, context_attention_mask, doc_scores, n_docs)
    search = dict(max_length=max_length, min_length=min_length, length_penalty=length_penalty,
                  early_stopping=early_stopping)
    returned = search_settings(generator, num_beams=num_beams, num_return_sequences=num_return_sequences, **search)
    per_doc = search_settings(generator, num_beams=num_beams, num_return_sequences=num_beams, **search)
    contexts = encode_contexts(generator, context_input_ids, context_attention_mask)  # B*K contexts, encoded once
    device = context_input_ids.device
    rows = torch.arange(batch * k, device=device).repeat_interleave(num_beams)  # (B*K*W,)
    decoder = CachedDecoder(generator, contexts, rows)
    found = run_search(lambda tokens, origin: (decoder(tokens, origin).log_softmax(-1), None), batch * k, per_doc,
                       device)
    candidates = union_of_hypotheses(found.sequences, batch)
    skip = starts_with_bos(candidates.tokens, candidates.valid, per_doc.bos_token_id)  # (B,)
    scoring = _Scoring(generator, contexts, found, candidates, skip, per_doc, k,
                       score_chunk_elements)
    loglik = SCORERS[mode](scoring)  # (B, N, K)
    posteriors, marginal = doc_posteriors(doc_scores, loglik)  # (B, N, K), (B, N)
    marginal = marginal.masked_fill(~candidates.valid, -torch.inf)
    r = returned.num_return_sequences
    scores, best = marginal.topk(r, dim=1)  # (B, R)

    def take(t: torch.Tensor) -> torch.Tensor:
        """The R best candidates' rows of a (B, N, X) tensor -> (B*R, X)."""
        return t.gather(1, best[..., None].expand(-1, -1, t.shape[2])).reshape(batch * r, t.shape[2])

    return GenerationResult(
        sequences=take(candidates.tokens),  # (B*R, T)
        scores=scores.reshape(batch * r),
        doc_loglik=take(loglik),  # (B*R, K)
        doc_posteriors=take(posteriors),  # (B*R, K)
        num_return_sequences=r,
    )
