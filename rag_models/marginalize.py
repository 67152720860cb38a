"""Marginal likelihoods of RAG-Sequence and RAG-Token: pure functions, tensors in, tensors out.

Shapes: B questions, K retrieved docs per question, T target length, V vocabulary.

Label-shift convention (one for every function here): ``seq_logits[:, t]`` is the
generator's prediction of ``target[:, t]``. With BART (decoder_start_token_id =
eos = 2, bos = 0):

    target            = tokenizer(answer).input_ids   = [bos, a1, ..., an, eos, pad...]
    decoder_input_ids = target shifted right, start 2 = [eos, bos, a1, ..., an, eos...]

transformers' RAG instead feeds ``labels`` *unshifted* as ``decoder_input_ids`` and
shifts the labels left inside ``get_nll`` (appending a pad). So the transformers call
``labels = [2, bos, a1, ..., eos]`` is the same computation as ours with
``target = labels[:, 1:]`` and ``seq_logits = logits[:, :-1]`` (its last position
always predicts the appended pad and is masked). ``exclude_bos_score`` drops the
score of position 0, i.e. of predicting ``bos``.

Label smoothing follows transformers exactly: the objective per example is
``(1 - eps) * nll + (eps / V) * smooth`` where ``smooth`` replaces each token's
log-probability by the sum of the log-probabilities of all V tokens (marginalized
over docs the same way as the NLL; for RAG-Sequence the doc log-prior then weighs
V times, as in transformers). ``exclude_bos_score`` affects the NLL term only.

One deliberate difference: transformers' RAG-Sequence adds the doc log-prior at
target position 1, so a target with fewer than two non-pad tokens silently loses
the retriever's term. We add it once per (question, doc); the two agree whenever
``target[:, 1]`` is not a pad, which holds for every BART target ([bos, ..., eos]).
"""
from __future__ import annotations

import torch
from torch import Tensor

from rag_models.errors import InputError
from rag_models.precision import upcast as _upcast


def _check_shapes(seq_logits: Tensor, doc_scores: Tensor, target: Tensor) -> tuple[int, int, int, int]:
    """Validate (B*K, T, V) logits against (B, K) scores and (B, T) targets; return B, K, T, V."""
    if doc_scores.dim() != 2 or target.dim() != 2 or seq_logits.dim() != 3:
        raise InputError(
            f"expected seq_logits (B*K, T, V), doc_scores (B, K), target (B, T); got "
            f"{tuple(seq_logits.shape)}, {tuple(doc_scores.shape)}, {tuple(target.shape)}",
            setting="marginalize inputs",
            fix="pass one row of doc scores and one target per question",
        )
    (b, k), (n, t, v) = doc_scores.shape, seq_logits.shape
    if n != b * k or target.shape != (b, t):
        raise InputError(
            f"seq_logits has {n} rows and {t} positions, but doc_scores {tuple(doc_scores.shape)} "
            f"and target {tuple(target.shape)} imply {b * k} rows (B*K) and target (B, T) = ({b}, {t})",
            setting="n_docs",
            fix="order generator rows question-major (row b*K+k) and give target the logits' length",
        )
    return b, k, t, v


def _keep_mask(target: Tensor, pad_token_id: int, exclude_bos_score: bool, bos_token_id: int | None) -> Tensor:
    """(..., T) bool: positions whose NLL term counts (not pad; not position 0 if it is a dropped bos)."""
    keep = target.ne(pad_token_id)
    if exclude_bos_score:
        drop = torch.ones_like(keep[..., 0]) if bos_token_id is None else target[..., 0].eq(bos_token_id)
        keep[..., 0] = keep[..., 0] & ~drop
    return keep


def token_logprobs(seq_logits: Tensor, target: Tensor) -> Tensor:
    """log p(target_t | ...) per row and position: (N, T, V) logits, (N, T) ids -> (N, T).

    Computed as ``logit[target] - logsumexp(logits)`` so no (N, T, V) log-softmax is
    materialized. Logits are upcast to float32 first: a logsumexp over docs in
    bf16 loses the small differences that decide the marginal.
    """
    logits = _upcast(seq_logits)
    picked = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (N, T)
    return picked - torch.logsumexp(logits, dim=-1)  # (N, T)


def sequence_logprobs(
    seq_logits: Tensor,
    target: Tensor,
    pad_token_id: int,
    *,
    exclude_bos_score: bool = False,
    bos_token_id: int | None = None,
) -> Tensor:
    """Sum over positions of log p(y_t | x, z, y<t) per row, pads ignored: (N, T, V), (N, T) -> (N,).

    Used by RAG-Sequence training and by its decoders (scoring hypotheses per doc).
    """
    keep = _keep_mask(target, pad_token_id, exclude_bos_score, bos_token_id)  # (N, T)
    return token_logprobs(seq_logits, target).masked_fill(~keep, 0.0).sum(-1)  # (N,)


def _smoothing_terms(seq_logits: Tensor, target: Tensor, pad_token_id: int, b: int, k: int) -> Tensor:
    """Sum over the vocabulary of log p(v | x, z, y<t), pads zeroed: -> (B, K, T)."""
    logits = _upcast(seq_logits)
    t, v = logits.shape[1:]
    # sum_v log_softmax(x)_v = sum_v x_v - V * logsumexp(x)
    total = logits.sum(-1) - v * torch.logsumexp(logits, dim=-1)  # (B*K, T)
    total = total.view(b, k, t)  # (B, K, T)
    return total.masked_fill(target.eq(pad_token_id).unsqueeze(1), 0.0)


def rag_sequence_nll(
    seq_logits: Tensor,
    doc_scores: Tensor,
    target: Tensor,
    pad_token_id: int,
    *,
    exclude_bos_score: bool = False,
    label_smoothing: float = 0.0,
    bos_token_id: int | None = None,
) -> Tensor:
    """Per-example RAG-Sequence loss -logsumexp_z[log p(z|x) + sum_t log p(y_t|x,z,y<t)]: -> (B,).

    Args:
        seq_logits: (B*K, T, V) generator logits, row b*K+k = question b with doc k;
            position t predicts target[:, t] (see the module docstring).
        doc_scores: (B, K) raw retriever scores q.d (log-softmax is taken here).
        target: (B, T) target ids, padded with ``pad_token_id`` (pads are ignored).
        exclude_bos_score: drop the score of position 0 (predicting bos). When
            ``bos_token_id`` is given, only rows whose target starts with it.
        label_smoothing: eps of transformers' RAG label smoothing (0 = plain NLL).
    """
    b, k, t, v = _check_shapes(seq_logits, doc_scores, target)
    doc_logprobs = torch.log_softmax(_upcast(doc_scores), dim=1)  # (B, K)
    per_doc_target = target.repeat_interleave(k, dim=0)  # (B*K, T)
    seq_lp = sequence_logprobs(
        seq_logits, per_doc_target, pad_token_id, exclude_bos_score=exclude_bos_score, bos_token_id=bos_token_id
    ).view(b, k)  # (B, K)
    nll = -torch.logsumexp(seq_lp + doc_logprobs, dim=1)  # (B,)
    if label_smoothing == 0.0:
        return nll
    smooth = _smoothing_terms(seq_logits, target, pad_token_id, b, k).sum(-1)  # (B, K)
    smooth_loss = -torch.logsumexp(smooth + v * doc_logprobs, dim=1)  # (B,)
    return (1.0 - label_smoothing) * nll + (label_smoothing / v) * smooth_loss


def rag_token_nll(
    seq_logits: Tensor,
    doc_scores: Tensor,
    target: Tensor,
    pad_token_id: int,
    *,
    exclude_bos_score: bool = False,
    label_smoothing: float = 0.0,
    bos_token_id: int | None = None,
) -> Tensor:
    """Per-example RAG-Token loss -sum_t logsumexp_z[log p(z|x) + log p(y_t|x,z,y<t)]: -> (B,).

    Arguments as for `rag_sequence_nll`. transformers' RagTokenForGeneration ignores
    ``exclude_bos_score``; here it drops the NLL term of position 0, as for RAG-Sequence.
    """
    b, k, t, v = _check_shapes(seq_logits, doc_scores, target)
    doc_logprobs = torch.log_softmax(_upcast(doc_scores), dim=1)  # (B, K)
    per_doc_target = target.repeat_interleave(k, dim=0)  # (B*K, T)
    tok_lp = token_logprobs(seq_logits, per_doc_target).view(b, k, t)  # (B, K, T)
    marginal = torch.logsumexp(tok_lp + doc_logprobs.unsqueeze(-1), dim=1)  # (B, T)
    keep = _keep_mask(target, pad_token_id, exclude_bos_score, bos_token_id)  # (B, T)
    nll = -marginal.masked_fill(~keep, 0.0).sum(-1)  # (B,)
    if label_smoothing == 0.0:
        return nll
    # Smoothing needs the whole marginal distribution over V at every position.
    logprobs = torch.log_softmax(_upcast(seq_logits), dim=-1).view(b, k, t, v)  # (B, K, T, V)
    full_marginal = torch.logsumexp(logprobs + doc_logprobs[:, :, None, None], dim=1)  # (B, T, V)
    smooth = full_marginal.sum(-1).masked_fill(target.eq(pad_token_id), 0.0).sum(-1)  # (B,)
    return (1.0 - label_smoothing) * nll + (label_smoothing / v) * -smooth


def rag_token_step_logprobs(step_logits: Tensor, doc_scores: Tensor) -> Tensor:
    """RAG-Token next-token distribution for decoding: (B*K, V) logits, (B, K) scores -> (B, V).

    Returns logsumexp_k[log_softmax(doc_scores)_k + log_softmax(step_logits_k)], a
    normalized log-distribution over the vocabulary for each question.
    """
    b, k = doc_scores.shape
    if step_logits.dim() != 2 or step_logits.shape[0] != b * k:
        raise InputError(
            f"step_logits {tuple(step_logits.shape)} should be (B*K, V) = ({b * k}, V) for doc_scores {(b, k)}",
            setting="n_docs",
            fix="give one row of logits per (question, doc), question-major",
        )
    logprobs = torch.log_softmax(_upcast(step_logits), dim=-1).view(b, k, -1)  # (B, K, V)
    doc_logprobs = torch.log_softmax(_upcast(doc_scores), dim=1)  # (B, K)
    return torch.logsumexp(logprobs + doc_logprobs.unsqueeze(-1), dim=1)  # (B, V)
