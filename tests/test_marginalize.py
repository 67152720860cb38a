"""The marginal likelihoods against a brute-force loop over documents and against transformers' get_nll."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import RagSequenceForGeneration, RagTokenForGeneration

from rag_models.errors import InputError
from rag_models.marginalize import rag_sequence_nll, rag_token_nll, rag_token_step_logprobs, sequence_logprobs

PAD, BOS, EOS = 1, 0, 2
B, K, T, V = 3, 4, 6, 11


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (B*K, T, V) logits, (B, K) scores and BART-style targets [bos, ..., eos, pad...]."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B * K, T, V, generator=g) * 3
    scores = torch.randn(B, K, generator=g) * 2
    target = torch.randint(3, V, (B, T), generator=g)
    target[:, 0] = BOS
    for row, length in enumerate([T, 4, 3]):  # full, and two padded answers
        target[row, length - 1] = EOS
        target[row, length:] = PAD
    return logits, scores, target


def _brute_sequence(logits, scores, target, exclude_bos=False):
    """-log sum_k p(k|x) prod_t p(y_t|x,k): explicit loops, float64."""
    out = []
    for b in range(B):
        prior = torch.softmax(scores[b].double(), 0)
        total = 0.0
        for k in range(K):
            lp = torch.log_softmax(logits[b * K + k].double(), -1)
            seq = sum(lp[t, target[b, t]] for t in range(T) if target[b, t] != PAD and not (exclude_bos and t == 0))
            total += prior[k] * math.exp(seq)
        out.append(-math.log(total))
    return torch.tensor(out, dtype=torch.float64)


def _brute_token(logits, scores, target, exclude_bos=False):
    """-sum_t log sum_k p(k|x) p(y_t|x,k,y<t): explicit loops, float64."""
    out = []
    for b in range(B):
        prior = torch.softmax(scores[b].double(), 0)
        nll = 0.0
        for t in range(T):
            if target[b, t] == PAD or (exclude_bos and t == 0):
                continue
            p = sum(prior[k] * torch.softmax(logits[b * K + k, t].double(), -1)[target[b, t]] for k in range(K))
            nll -= math.log(p)
        out.append(nll)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("exclude_bos", [False, True])
def test_sequence_matches_brute_force(exclude_bos):
    logits, scores, target = _batch(1)
    ours = rag_sequence_nll(logits, scores, target, PAD, exclude_bos_score=exclude_bos)
    assert ours.shape == (B,)
    torch.testing.assert_close(ours.double(), _brute_sequence(logits, scores, target, exclude_bos), atol=1e-5, rtol=0)


@pytest.mark.parametrize("exclude_bos", [False, True])
def test_token_matches_brute_force(exclude_bos):
    logits, scores, target = _batch(2)
    ours = rag_token_nll(logits, scores, target, PAD, exclude_bos_score=exclude_bos)
    torch.testing.assert_close(ours.double(), _brute_token(logits, scores, target, exclude_bos), atol=1e-5, rtol=0)


def test_one_doc_reduces_to_plain_cross_entropy():
    logits, scores, target = _batch(3)
    one = logits.view(B, K, T, V)[:, 0]  # (B, T, V)
    ce = torch.nn.functional.cross_entropy(one.reshape(-1, V), target.reshape(-1), ignore_index=PAD, reduction="none")
    expected = ce.view(B, T).sum(-1)
    for fn in (rag_sequence_nll, rag_token_nll):
        torch.testing.assert_close(fn(one, scores[:, :1], target, PAD), expected, atol=1e-5, rtol=0)


def _oracle(kind: str, logits, scores, target, exclude_bos: bool, eps: float) -> torch.Tensor:
    """transformers' get_nll on the same numbers, in its own convention (labels = [start] + target)."""
    cfg = SimpleNamespace(generator=SimpleNamespace(pad_token_id=PAD, bos_token_id=BOS), bos_token_id=None, n_docs=K)
    fake = SimpleNamespace(config=cfg)
    labels = torch.cat([target.new_full((B, 1), EOS), target], 1)  # (B, T+1), transformers' decoder input
    extra = torch.randn(B * K, 1, V)  # its last position predicts the appended pad: any value
    their_logits = torch.cat([logits, extra], 1)  # (B*K, T+1, V)
    if kind == "sequence":
        return RagSequenceForGeneration.get_nll(
            fake, their_logits, scores, labels, reduce_loss=False, epsilon=eps, exclude_bos_score=exclude_bos
        )
    fake.marginalize = lambda *a: RagTokenForGeneration.marginalize(fake, *a)
    if exclude_bos:  # transformers' RAG-Token has no exclude_bos_score: drop position 0's NLL term by hand
        masked = labels.clone()
        masked[:, 1] = PAD
        bos_term = RagTokenForGeneration.get_nll(fake, their_logits, scores, labels,
                                                 epsilon=0.0) - RagTokenForGeneration.get_nll(
            fake, their_logits, scores, masked, epsilon=0.0
        )
        full = RagTokenForGeneration.get_nll(fake, their_logits, scores, labels, epsilon=eps)
        return full - (1.0 - eps) * bos_term
    return RagTokenForGeneration.get_nll(fake, their_logits, scores, labels, reduce_loss=False, epsilon=eps)


@pytest.mark.parametrize("kind", ["sequence", "token"])
@pytest.mark.parametrize("exclude_bos", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_matches_transformers_get_nll(kind, exclude_bos, eps):
    logits, scores, target = _batch(4)
    fn = rag_sequence_nll if kind == "sequence" else rag_token_nll
    ours = fn(logits, scores, target, PAD, exclude_bos_score=exclude_bos, label_smoothing=eps)
    theirs = _oracle(kind, logits, scores, target, exclude_bos, eps)
    assert (ours - theirs).abs().max().item() < 1e-5


def test_gradients_reach_the_doc_scores_and_logits():
    logits, scores, target = _batch(5)
    logits.requires_grad_(True)
    scores.requires_grad_(True)
    for fn in (rag_sequence_nll, rag_token_nll):
        logits.grad = scores.grad = None
        fn(logits, scores, target, PAD, label_smoothing=0.1).sum().backward()
        assert scores.grad.abs().sum() > 0 and torch.isfinite(logits.grad).all()
        # a pad position gets no gradient from the NLL or the smoothing
        assert logits.grad.view(B, K, T, V)[2, :, 3:].abs().max() == 0


def test_sequence_keeps_the_doc_prior_for_a_one_token_target():
    # transformers adds log p(z|x) at position 1, which a one-token target lacks; we do not lose it
    logits, scores, target = _batch(6)
    short = target.clone()
    short[:, 1:] = PAD
    ours = rag_sequence_nll(logits, scores, short, PAD)
    per_doc = sequence_logprobs(logits, short.repeat_interleave(K, 0), PAD).view(B, K)
    expected = -torch.logsumexp(per_doc + torch.log_softmax(scores, 1), 1)
    torch.testing.assert_close(ours, expected)


def test_exclude_bos_only_where_the_target_starts_with_bos():
    logits, scores, target = _batch(7)
    target[1, 0] = 5  # this row has no bos: nothing to exclude
    dropped = rag_sequence_nll(logits, scores, target, PAD, exclude_bos_score=True, bos_token_id=BOS)
    kept = rag_sequence_nll(logits, scores, target, PAD)
    assert dropped[1] == kept[1] and dropped[0] != kept[0]


def test_step_logprobs_is_the_token_marginal():
    logits, scores, target = _batch(8)
    step = logits[:, 2]  # (B*K, V)
    out = rag_token_step_logprobs(step, scores)
    assert out.shape == (B, V)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(B))
    for b in range(B):
        prior = torch.softmax(scores[b], 0)
        mix = sum(prior[k] * torch.softmax(step[b * K + k], -1) for k in range(K))
        torch.testing.assert_close(out[b].exp(), mix)


def test_shape_mismatch_names_the_setting():
    logits, scores, target = _batch(9)
    with pytest.raises(InputError, match="n_docs"):
        rag_sequence_nll(logits, scores[:, :3], target, PAD)
    with pytest.raises(InputError, match="n_docs"):
        rag_token_step_logprobs(logits[:, 0], scores[:, :3])
