"""Greedy and beam search over any per-step log-prob function.

The bookkeeping follows transformers' (5.x) greedy and beam search step for step
(top 2·W continuations, finished hypotheses ranked by ``sum / length**penalty``,
the same early-stopping heuristic, the NoRepeatNGram / MinLength / ForcedBOS /
ForcedEOS processors in that order), so that with the same per-step log-probs we pick the
same tokens. What it adds: the *raw* log-prob of every chosen token (before the
processors) is kept beside each hypothesis, so callers get the plain
log-likelihood ``Σ_t log p(y_t|...)`` that RAG-Sequence fast decoding needs.

Dimensions: N independent searches (questions, or question×doc pairs), W beams,
V vocabulary, T max_length (decoder start token included), R returned sequences.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from rag_models.errors import InputError

# step(last_tokens (N*W,), beam_origin (N*W,) | None) -> (log-probs (N*W, V), extra (N*W, A, V) | None).
# beam_origin[i] is the row that row i continues (for KV-cache reordering); None: no reordering.
# `extra`: A more scores per candidate token that each hypothesis sums along its tokens beside
# its log-prob, e.g. RAG-Token's per-doc log p(y_t|x,z_k,y<t); None adds nothing this step.
StepFn = Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]]

NEG = -1.0e9  # transformers' "impossible" score; kept identical so ties break the same way


@dataclass(frozen=True)
class SearchSettings:
    """How to search, and the generator's special token ids (see `search_settings`).

    Token counts include the decoder start token. Defaults for the ids are BART's (start = eos = 2, pad = 1);
    `search_settings` reads the real ones from the generator's config.

    Fields:
        num_beams: W, beams per search, >= 1; 1 runs greedy search.
        max_length: T, the most tokens per hypothesis, decoder start included, >= 2.
        min_length: EOS is forbidden while a hypothesis has fewer tokens (start included), 0..max_length.
        num_return_sequences: R, hypotheses returned per search, best first, 1..num_beams.
        length_penalty: beam search ranks finished hypotheses by sum of log-probs / generated_length**penalty
            (generated_length excludes the start token); > 0 favours longer ones. Greedy ignores it.
        early_stopping: beam search only, as transformers: True stops a search once it has W finished
            hypotheses; False stops it when its best running beam, at its current length, cannot beat its
            worst finished one; "never" assumes that beam could still grow to max_length (if length_penalty > 0).
        decoder_start_token_id: the first token of every hypothesis (fed to the decoder, never scored).
        eos_token_ids: ids any of which ends a hypothesis.
        pad_token_id: fills a hypothesis after its end.
        bos_token_id: not used by the search; lets scorers recognize a BOS shared by all hypotheses (None: none).
        forced_bos_token_id: if set, the only token allowed right after the decoder start (transformers'
            ForcedBOS); its true log-prob is still recorded.
        forced_eos_token_id: if set, the only token allowed at the last position (max_length - 1).
        no_repeat_ngram_size: n > 0 forbids any token that would repeat an n-gram of the hypothesis
            (decoder start included), as transformers' NoRepeatNGram; 0 = off.

    Raises InputError (in ``__post_init__``) for num_beams < 1, num_return_sequences outside 1..num_beams,
    max_length < 2, min_length outside 0..max_length, or early_stopping not True, False or "never".
    """

    num_beams: int = 1
    max_length: int = 20  # tokens per hypothesis, the decoder start token included
    min_length: int = 0  # EOS is forbidden while a hypothesis is shorter than this
    num_return_sequences: int = 1
    length_penalty: float = 1.0  # finished beams are ranked by sum / generated_length**length_penalty
    early_stopping: bool | str = False  # True, False or "never", as in transformers
    decoder_start_token_id: int = 2
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int = 1
    bos_token_id: int | None = None  # only to recognize a shared first BOS when scoring
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None
    no_repeat_ngram_size: int = 0

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise InputError(f"num_beams is {self.num_beams}", setting="num_beams", fix="use 1 (greedy) or more")
        if not 1 <= self.num_return_sequences <= self.num_beams:
            raise InputError(
                f"num_return_sequences={self.num_return_sequences} with num_beams={self.num_beams}",
                setting="num_return_sequences",
                fix="return between 1 and num_beams sequences (raise num_beams to get more)",
            )
        if self.max_length < 2:
            raise InputError(f"max_length is {self.max_length}", setting="max_length",
                             fix="allow at least 2 tokens (start + one)")
        if not 0 <= self.min_length <= self.max_length:
            raise InputError(
                f"min_length={self.min_length} with max_length={self.max_length}",
                setting="min_length",
                fix="use 0 <= min_length <= max_length",
            )
        if self.early_stopping not in (True, False, "never"):
            raise InputError(f"early_stopping is {self.early_stopping!r}", setting="early_stopping",
                             fix="use true, false or 'never'")


def search_settings(generator: PreTrainedModel, **search: object) -> SearchSettings:
    """Settings for `generator`: its special ids (generation config first, then model config) + `search`."""

    def special(name: str) -> int | list[int] | None:
        for source in (getattr(generator, "generation_config", None), generator.config):
            value = getattr(source, name, None) if source is not None else None
            if value is not None:
                return value
        return None

    eos = special("eos_token_id")
    if eos is None:
        raise InputError("the generator has no eos_token_id", setting="generator config",
                         fix="set eos_token_id in its config")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
    start = special("decoder_start_token_id")
    start = special("bos_token_id") if start is None else start  # as transformers does for old configs
    if start is None:
        raise InputError("the generator has no decoder_start_token_id", setting="generator config",
                         fix="set it in its config")
    pad = special("pad_token_id")
    forced_eos = special("forced_eos_token_id")
    if isinstance(forced_eos, (list, tuple)):
        forced_eos = forced_eos[0]
    return SearchSettings(
        decoder_start_token_id=int(start),
        eos_token_ids=eos_ids,
        pad_token_id=eos_ids[0] if pad is None else int(pad),
        bos_token_id=special("bos_token_id"),
        forced_bos_token_id=special("forced_bos_token_id"),
        forced_eos_token_id=forced_eos,
        no_repeat_ngram_size=int(special("no_repeat_ngram_size") or 0),
        **search,
    )


@dataclass
class SearchOutput:
    """Finished hypotheses, R per search, best first.

    Fields:
        sequences: (N*R, T') token ids, decoder start first, pad after the end; T' <= max_length.
        scores: (N*R,) ranking score: processed log-probs summed (greedy) or that sum divided by
            generated_length**length_penalty (beam), as transformers' ``sequences_scores``.
        token_logprobs: (N*R, T') raw log-prob of each token under the step function (0 at
            position 0 and after the end); forced tokens keep their true log-prob here.
        extra: (N*R, A) the step function's extra scores summed along each hypothesis, or None.
    """

    sequences: torch.Tensor
    scores: torch.Tensor
    token_logprobs: torch.Tensor
    extra: torch.Tensor | None = None


def repeated_ngram_tokens(history: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor:
    """(R, V) bool: the tokens that would complete an n-gram already in each row of ``history`` (R, L)."""
    rows, length = history.shape
    banned = torch.zeros(rows, vocab_size, dtype=torch.bool, device=history.device)  # (R, V)
    if n < 1 or length < n:
        return banned
    grams = history.unfold(1, n, 1)  # (R, L-n+1, n): every n-gram so far
    last = history[:, length - n + 1:]  # (R, n-1): what the next token would extend
    same_start = (grams[:, :, : n - 1] == last[:, None, :]).all(-1)  # (R, L-n+1)
    hits = torch.zeros(rows, vocab_size, device=history.device)
    hits.scatter_add_(1, grams[:, :, n - 1], same_start.float())
    return hits > 0


def process_logprobs(log_probs: torch.Tensor, cur_len: int, s: SearchSettings,
                     history: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' NoRepeatNGram, MinLength, ForcedBOS and ForcedEOS processors, in that order. (R, V) -> (R, V).

    ``history`` (R, cur_len): the tokens so far, decoder start included (needed for no_repeat_ngram_size).
    """
    out = log_probs
    if s.no_repeat_ngram_size > 0 and history is not None:
        out = out.masked_fill(repeated_ngram_tokens(history, s.no_repeat_ngram_size, out.shape[1]), -math.inf)
    if cur_len < s.min_length:
        out = out.clone()
        out[:, list(s.eos_token_ids)] = -math.inf
    if s.forced_bos_token_id is not None and cur_len == 1:
        out = torch.full_like(out, -math.inf)
        out[:, s.forced_bos_token_id] = 0.0
    if s.forced_eos_token_id is not None and cur_len == s.max_length - 1:
        out = torch.full_like(out, -math.inf)
        out[:, s.forced_eos_token_id] = 0.0
    return out


def greedy_search(step: StepFn, n: int, s: SearchSettings, device: torch.device, extra_dims: int = 0) -> SearchOutput:
    """Pick the most likely token at every step; rows that ended are padded until all end."""
    eos = torch.tensor(s.eos_token_ids, device=device)
    seqs = torch.full((n, s.max_length), s.pad_token_id, dtype=torch.long, device=device)  # (N, T)
    seqs[:, 0] = s.decoder_start_token_id
    token_lp = torch.zeros(n, s.max_length, device=device)  # (N, T)
    scores = torch.zeros(n, device=device)
    running = torch.ones(n, dtype=torch.bool, device=device)
    extra = torch.zeros(n, extra_dims, device=device)  # (N, A)
    cur_len = 1
    while True:
        raw, aux = step(seqs[:, cur_len - 1], None)  # (N, V), (N, A, V) | None
        raw = raw.float()
        processed = process_logprobs(raw, cur_len, s, seqs[:, :cur_len])
        best = processed.argmax(-1)  # (N,)
        if aux is not None:
            picked = aux.gather(2, best.view(n, 1, 1).expand(-1, extra_dims, 1)).squeeze(2)  # (N, A)
            extra += torch.where(running[:, None], picked, 0.0)
        tokens = torch.where(running, best, s.pad_token_id)
        seqs[:, cur_len] = tokens
        token_lp[:, cur_len] = torch.where(running, raw.gather(1, best[:, None]).squeeze(1), 0.0)
        scores += torch.where(running, processed.gather(1, best[:, None]).squeeze(1), 0.0)
        cur_len += 1
        running &= ~torch.isin(tokens, eos) & (cur_len < s.max_length)
        if not bool(running.any()):
            break
    return SearchOutput(seqs[:, :cur_len], scores, token_lp[:, :cur_len], extra if extra_dims else None)


@dataclass
class _Beams:
    """Per search, W hypotheses: running ones (being extended) or finished ones (kept best-first)."""

    seqs: torch.Tensor  # (N, W, T)
    token_lp: torch.Tensor  # (N, W, T)
    scores: torch.Tensor  # (N, W)
    extra: torch.Tensor  # (N, W, A) the step function's extra scores, summed
    lengths: torch.Tensor | None = None  # (N, W), finished beams only
    done: torch.Tensor | None = None  # (N, W) bool, finished beams only

    def take(self, index: torch.Tensor) -> "_Beams":
        """The beams at `index` (N, W') along dim 1."""
        fields = (self.seqs, self.token_lp, self.scores, self.extra, self.lengths, self.done)
        return _Beams(*(_gather_beams(t, index) for t in fields))


def _gather_beams(t: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    """t[n, index[n, j], ...] for (N, W) or (N, W, T) tensors; None stays None."""
    if t is None:
        return None
    return t.gather(1, index if t.dim() == 2 else index[..., None].expand(-1, -1, t.shape[2]))


def _initial_beams(n: int, s: SearchSettings, device: torch.device, extra_dims: int) -> tuple[_Beams, _Beams]:
    """Running beams (only the first one live, so step 1 does not pick W copies) and empty finished ones."""
    w, t = s.num_beams, s.max_length
    seqs = torch.full((n, w, t), s.pad_token_id, dtype=torch.long, device=device)  # (N, W, T)
    seqs[:, :, 0] = s.decoder_start_token_id
    scores = torch.zeros(n, w, device=device)
    scores[:, 1:] = NEG
    running = _Beams(seqs, torch.zeros(n, w, t, device=device), scores, torch.zeros(n, w, extra_dims, device=device))
    finished = _Beams(
        seqs.clone(),
        torch.zeros(n, w, t, device=device),
        torch.full((n, w), NEG, device=device),
        torch.zeros(n, w, extra_dims, device=device),
        lengths=torch.ones(n, w, dtype=torch.long, device=device),
        done=torch.zeros(n, w, dtype=torch.bool, device=device),
    )
    return running, finished


def _candidates(
    running: _Beams, raw: torch.Tensor, aux: torch.Tensor | None, cur_len: int, keep: int, s: SearchSettings
) -> tuple[_Beams, torch.Tensor]:
    """The `keep` best one-token extensions of all running beams; also returns their source beam (N, keep)."""
    n, w, v = raw.shape  # (N, W, V)
    history = running.seqs[:, :, :cur_len].reshape(n * w, cur_len)  # (N*W, cur_len)
    processed = process_logprobs(raw.view(n * w, v), cur_len, s, history).view(n, w, v)
    total = (processed + running.scores[:, :, None]).view(n, w * v)  # (N, W*V)
    top_scores, top_index = torch.topk(total, keep, dim=1)  # (N, keep), sorted best first
    source = top_index // v
    cand = running.take(source)
    cand.seqs[:, :, cur_len] = top_index % v
    cand.token_lp[:, :, cur_len] = raw.view(n, w * v).gather(1, top_index)
    cand.scores = top_scores
    if aux is not None:
        per_beam = aux.view(n, w, aux.shape[1], v)  # (N, W, A, V)
        rows = torch.arange(n, device=raw.device)[:, None]  # (N, 1)
        cand.extra = cand.extra + per_beam[rows, source, :, top_index % v]  # (N, keep, A)
    return cand, source


def _update_finished(
    finished: _Beams, cand: _Beams, ended: torch.Tensor, still_open: torch.Tensor, cur_len: int, s: SearchSettings
) -> _Beams:
    """Merge the candidates that just ended (among the top W) into the W best finished beams."""
    n, keep = ended.shape
    top_w = torch.arange(keep, device=ended.device) < s.num_beams  # only these may finish
    just_ended = ended & top_w[None, :]  # (N, keep)
    generated = cur_len  # tokens after this step (cur_len + 1) minus the decoder start token
    scores = cand.scores / (generated**s.length_penalty)
    full = finished.done.all(dim=-1, keepdim=True) & (s.early_stopping is True)
    scores = scores + full.float() * NEG
    scores = scores + (~still_open).float() * NEG
    scores = scores + (~just_ended).float() * NEG
    merged = _Beams(
        torch.cat((finished.seqs, cand.seqs), 1),
        torch.cat((finished.token_lp, cand.token_lp), 1),
        torch.cat((finished.scores, scores), 1),
        torch.cat((finished.extra, cand.extra), 1),
        lengths=torch.cat((finished.lengths, finished.lengths.new_full((n, keep), cur_len + 1)), 1),
        done=torch.cat((finished.done, just_ended), 1),
    )
    return merged.take(torch.topk(merged.scores, s.num_beams, dim=1)[1])


def _still_open(still_open: torch.Tensor, running: _Beams, finished: _Beams, cur_len: int,
                s: SearchSettings) -> torch.Tensor:
    """transformers' heuristic: can the best running beam still beat the worst finished one? (N, 1)."""
    if s.early_stopping == "never" and s.length_penalty > 0.0:
        best_length = s.max_length - 1
    else:
        best_length = cur_len - 1
    best_possible = running.scores[:, :1] / (best_length**s.length_penalty)
    worst_finished = torch.where(finished.done, finished.scores.min(dim=1, keepdim=True)[0], NEG)
    return still_open & (best_possible > worst_finished).any(dim=-1, keepdim=True)


def beam_search(step: StepFn, n: int, s: SearchSettings, device: torch.device, extra_dims: int = 0) -> SearchOutput:
    """Beam search with W = s.num_beams beams per search; returns the R best finished hypotheses."""
    w = s.num_beams
    eos = torch.tensor(s.eos_token_ids, device=device)
    keep = max(2, 1 + len(s.eos_token_ids)) * w  # enough that W candidates survive even if W of them end
    running, finished = _initial_beams(n, s, device, extra_dims)
    still_open = torch.ones(n, 1, dtype=torch.bool, device=device)
    origin, cur_len = None, 1
    while True:
        raw, aux = step(running.seqs[:, :, cur_len - 1].reshape(n * w), origin)  # (N*W, V), (N*W, A, V) | None
        cand, source = _candidates(running, raw.float().view(n, w, -1), aux, cur_len, keep, s)
        ended = torch.isin(cand.seqs[:, :, cur_len], eos) | (cur_len + 1 >= s.max_length)  # (N, keep)
        live_scores = cand.scores + ended.float() * NEG  # ended candidates must not be extended
        pick = torch.topk(live_scores, w, dim=1)[1]  # (N, W)
        finished = _update_finished(finished, cand, ended, still_open, cur_len, s)
        running = cand.take(pick)
        running.scores = live_scores.gather(1, pick)
        origin = (source.gather(1, pick) + torch.arange(n, device=device)[:, None] * w).view(n * w)
        cur_len += 1
        still_open = _still_open(still_open, running, finished, cur_len, s)
        all_full = bool(finished.done.all()) and s.early_stopping is True
        if not bool(still_open.any()) or all_full or bool(ended.all()):
            break
    best = finished.take(torch.arange(s.num_return_sequences, device=device).expand(n, -1))  # (N, R)
    width = int(best.lengths.max())
    r = s.num_return_sequences
    return SearchOutput(
        sequences=best.seqs[:, :, :width].reshape(n * r, width),
        scores=best.scores.reshape(n * r),
        token_logprobs=best.token_lp[:, :, :width].reshape(n * r, width),
        extra=best.extra.reshape(n * r, extra_dims) if extra_dims else None,
    )


def run_search(step: StepFn, n: int, s: SearchSettings, device: torch.device, extra_dims: int = 0) -> SearchOutput:
    """Greedy search for one beam (as transformers does), beam search otherwise."""
    search = greedy_search if s.num_beams == 1 else beam_search
    return search(step, n, s, device, extra_dims)
