"""Our RAG decoders give transformers' RAG generations, token for token, on shared tiny weights.

One random-init tiny BART is handed to transformers' RagTokenForGeneration and
RagSequenceForGeneration (same object, so same weights) and to our decoders, with
the same precomputed ``context_input_ids`` / ``doc_scores``. Contexts have no
padding: transformers' RAG-Sequence ``generate`` drops the attention mask (ours
does not; tests/test_decoding.py checks that padding changes nothing).
"""
from __future__ import annotations

import warnings

import pytest
import torch
from transformers import RagConfig, RagSequenceForGeneration, RagTokenForGeneration
from transformers.utils import logging as hf_logging

from decoding.rag_sequence import rag_sequence_generate
from decoding.rag_token import rag_token_generate
from rag_models.tiny_models import TinyBartSize, TinyDprSize, tiny_bart, tiny_dpr_encoder
from rag_models.tokenization import train_bart_tokenizer

TEXTS = [
    "Quenby lies on the river Varn in the region of Oster.",
    "Marrowick was founded in 1742 by Elsa Tarn; its main export is copper.",
    "which river flows through Quenby? who founded Marrowick?",
] * 10
B, K, L = 3, 4, 12  # questions, docs, context length
MAX_LENGTH = 9
# init_std 0.1: answers differ across docs and questions (checked below); 0.02 or 0.06 give one answer everywhere.
BART = TinyBartSize(d_model=64, layers=2, heads=2, ffn_dim=128, vocab_size=300, init_std=0.1)


@pytest.fixture(scope="module")
def shared():
    """Tiny BART shared by our decoders and transformers' two RAG models, plus unpadded inputs."""
    tokenizer = train_bart_tokenizer(TEXTS, 300)
    bart = tiny_bart(tokenizer, BART, seed=0)
    question_encoder = tiny_dpr_encoder("question", 100, TinyDprSize(hidden_size=32, num_layers=1), seed=1)
    config = RagConfig.from_question_encoder_generator_configs(question_encoder.config, bart.config, n_docs=K)
    rag_token = RagTokenForGeneration(config, question_encoder=question_encoder, generator=bart).eval()
    rag_sequence = RagSequenceForGeneration(config, question_encoder=question_encoder, generator=bart).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, len(tokenizer), (B * K, L), generator=gen)  # (B*K, L), no padding
    ids[:, 0], ids[:, -1] = tokenizer.bos_token_id, tokenizer.eos_token_id
    scores = torch.randn(B, K, generator=gen) * 2  # (B, K)
    hf_logging.set_verbosity_error()  # RAG-Sequence's "attention mask dropped" warning
    return {"bart": bart, "token": rag_token, "sequence": rag_sequence, "ids": ids, "mask": torch.ones_like(ids),
            "scores": scores, "forced_bos": None}


@pytest.fixture(params=[None, 0], ids=["no_forced_bos", "forced_bos"])
def models(shared, request):
    """The shared models, with or without BART-large's forced BOS (its generation config sets 0)."""
    shared["bart"].generation_config.forced_bos_token_id = request.param
    yield {**shared, "forced_bos": request.param}
    shared["bart"].generation_config.forced_bos_token_id = None


def _inputs(m: dict) -> dict:
    return {"context_input_ids": m["ids"], "context_attention_mask": m["mask"], "doc_scores": m["scores"]}


def _theirs_token(m: dict, **search) -> object:
    """transformers' RAG-Token generate (its generation config is its own: pass forced BOS explicitly)."""
    extra = {} if m["forced_bos"] is None else {"forced_bos_token_id": m["forced_bos"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return m["token"].generate(**_inputs(m), n_docs=K, output_scores=True, return_dict_in_generate=True, **search,
                                   **extra)


def test_outputs_are_not_degenerate(shared):
    """Random weights that answer the same for every doc would make parity trivially true."""
    models = shared
    per_doc = models["bart"].generate(models["ids"], attention_mask=models["mask"], max_length=MAX_LENGTH, min_length=3)
    distinct = [len({tuple(row) for row in per_doc[b * K : (b + 1) * K].tolist()}) for b in range(B)]
    assert max(distinct) > 1  # some question's docs lead the generator to different answers
    ours = rag_sequence_generate(models["bart"], models["ids"], models["mask"], models["scores"], num_beams=3,
                                 max_length=MAX_LENGTH, min_length=3)
    assert len({tuple(row) for row in ours.sequences.tolist()}) > 1  # not one answer for every question
    assert not torch.allclose(ours.doc_posteriors, ours.doc_posteriors[:, :1].expand(-1, K), atol=1e-3)


def test_rag_token_greedy_matches_transformers(models):
    ours = rag_token_generate(models["bart"], models["ids"], models["mask"], models["scores"], max_length=MAX_LENGTH,
                              min_length=3)
    theirs = _theirs_token(models, num_beams=1, max_length=MAX_LENGTH, min_length=3)
    assert torch.equal(ours.sequences, theirs.sequences)


@pytest.mark.parametrize(
    "num_beams,num_return_sequences,length_penalty,early_stopping",
    [(4, 1, 1.0, False), (4, 2, 0.5, True), (3, 3, 2.0, "never")],
)
def test_rag_token_beam_matches_transformers(models, num_beams, num_return_sequences, length_penalty, early_stopping):
    search = dict(num_beams=num_beams, num_return_sequences=num_return_sequences, max_length=MAX_LENGTH, min_length=3,
                  length_penalty=length_penalty, early_stopping=early_stopping)
    ours = rag_token_generate(models["bart"], models["ids"], models["mask"], models["scores"], **search)
    theirs = _theirs_token(models, **search)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert (ours.scores - theirs.sequences_scores).abs().max() < 1e-5


def _transformers_nll(m: dict, sequences: torch.Tensor, per_question: int) -> torch.Tensor:
    """-log p(y|x) of each hypothesis by transformers' RagSequenceForGeneration forward, (B*R,)."""
    losses = []
    for b in range(B):
        rows = slice(b * K, (b + 1) * K)
        out = m["sequence"](
            context_input_ids=m["ids"][rows].repeat(per_question, 1),
            context_attention_mask=m["mask"][rows].repeat(per_question, 1),
            doc_scores=m["scores"][b : b + 1].repeat(per_question, 1),
            labels=sequences[b * per_question : (b + 1) * per_question],
            exclude_bos_score=True,  # as its generate scores candidates
        )
        losses.append(out.loss)
    return torch.cat(losses)


@pytest.mark.parametrize("num_beams,num_return_sequences", [(1, 1), (3, 2)])
def test_rag_sequence_thorough_matches_transformers(models, num_beams, num_return_sequences):
    # min_length 3: transformers' RAG-Sequence drops log p(z|x) for one-token answers
    # (it adds it at target position 1, a pad there); ours scores those correctly.
    search = dict(num_beams=num_beams, num_return_sequences=num_return_sequences, max_length=MAX_LENGTH, min_length=3)
    ours = rag_sequence_generate(models["bart"], models["ids"], models["mask"], models["scores"], mode="thorough",
                                 **search)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = models["sequence"].generate(**_inputs(models), n_docs=K, **search)  # deduplication on (default)
    assert torch.equal(ours.sequences, theirs)
    nll = _transformers_nll(models, theirs, num_return_sequences)
    assert (ours.scores + nll).abs().max() < 1e-5
