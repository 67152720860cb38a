"""Our RagModel against transformers' RagSequenceForGeneration / RagTokenForGeneration, same weights.

Both models get the same tiny random-init DPR question encoder and BART objects (shared,
not copied), the same generator inputs, and doc scores computed from the question
encoder so that gradients flow; losses must agree to 1e-5 and so must the question
encoder's gradients.
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import RagConfig, RagSequenceForGeneration, RagTokenForGeneration
from transformers.models.rag.retrieval_rag import RagRetriever

from rag_models.docs import RetrievedDocs
from rag_models.generator import Generator
from rag_models.rag import RagModel
from rag_models.retriever import DenseEncoder
from rag_models.tiny_models import TinyBartSize, TinyDprSize, tiny_bart, tiny_dpr_encoder
from rag_models.tokenization import dpr_tokenizers, train_bart_tokenizer, train_wordpiece_vocab

QUESTIONS = ["what is the color of Quenby?", "who founded Marrowick?", "which river flows through Tarn?"]
ANSWERS = ["green", "Elsa Tarn", "the river Varn in the north"]  # different lengths: pads in the targets
TITLES = [["Quenby", "Marrowick", "Tarn"], ["Marrowick", "Tarn", "Quenby"], ["Tarn", "Quenby", "Marrowick"]]
TEXTS = [
    ["Quenby is a green town on the river Varn.", "Marrowick was founded by Elsa Tarn.", "Tarn lies in the north."],
    ["Marrowick was founded by Elsa Tarn in 1742.", "Tarn lies in the north.", "Quenby is green."],
    ["Tarn lies on the river Varn in the north.", "Quenby is a green town.", "Marrowick exports copper."],
]
CORPUS = QUESTIONS + ANSWERS + [t for row in TEXTS for t in row] + [t for row in TITLES for t in row]
B, K = 3, 3
RAG_CLASSES = {"sequence": RagSequenceForGeneration, "token": RagTokenForGeneration}


@pytest.fixture(scope="module")
def parts():
    """Tiny tokenizers and models shared by every test of this module (eval mode: no dropout)."""
    q_tok, _ = dpr_tokenizers(train_wordpiece_vocab(CORPUS * 5, 200))
    bart_tok = train_bart_tokenizer(CORPUS * 5, 300)
    dpr_size = TinyDprSize(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_positions=64)
    bart_size = TinyBartSize(d_model=32, layers=1, heads=2, ffn_dim=64, max_positions=128)
    q_encoder = tiny_dpr_encoder("question", len(q_tok), dpr_size, seed=0)
    bart = tiny_bart(bart_tok, bart_size, seed=1)
    vectors = torch.randn(B, K, dpr_size.hidden_size, generator=torch.Generator().manual_seed(2))  # the index's
    docs = RetrievedDocs(ids=torch.arange(B * K).view(B, K), scores=torch.zeros(B, K), vectors=vectors, titles=TITLES,
                         texts=TEXTS)
    return SimpleNamespace(q_tok=q_tok, bart_tok=bart_tok, q_encoder=q_encoder, bart=bart, docs=docs)


@pytest.fixture(scope="module")
def parts64(parts):
    """The same models in float64, where both implementations agree far below float32 rounding."""
    docs = parts.docs
    docs64 = RetrievedDocs(ids=docs.ids, scores=docs.scores, vectors=docs.vectors.double(), titles=docs.titles,
                           texts=docs.texts)
    return SimpleNamespace(
        q_tok=parts.q_tok, bart_tok=parts.bart_tok, docs=docs64,
        q_encoder=copy.deepcopy(parts.q_encoder).double(), bart=copy.deepcopy(parts.bart).double(),
    )


def _ours(parts, marginalization: str, exclude_bos: bool, eps: float, input_format: str = "question_first") -> RagModel:
    generator = Generator(parts.bart, parts.bart_tok, max_source_length=48, max_target_length=16,
                          input_format=input_format)
    return RagModel(
        question_encoder=DenseEncoder(parts.q_encoder, pooling="pooler"),
        question_tokenizer=parts.q_tok,
        generator=generator,
        marginalization=marginalization,
        n_docs=K,
        label_smoothing=eps,
        exclude_bos_score=exclude_bos,
    ).eval()


def _theirs(parts, marginalization: str, exclude_bos: bool, eps: float):
    config = RagConfig.from_question_encoder_generator_configs(
        parts.q_encoder.config, parts.bart.config, n_docs=K, label_smoothing=eps, exclude_bos_score=exclude_bos,
        reduce_loss=False,
    )
    return RAG_CLASSES[marginalization](config, question_encoder=parts.q_encoder, generator=parts.bart).eval()


def _question_grads(encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in encoder.named_parameters() if p.grad is not None}
    encoder.zero_grad(set_to_none=True)
    return grads


def run_both(parts, marginalization: str, exclude_bos: bool, eps: float) -> dict[str, object]:
    """Forward + backward through ours and transformers'; returns both losses and q-encoder grads."""
    ours = _ours(parts, marginalization, exclude_bos, eps)
    theirs = _theirs(parts, marginalization, exclude_bos, eps)
    batch = ours.prepare_inputs(QUESTIONS, parts.docs, ANSWERS)
    parts.q_encoder.zero_grad(set_to_none=True)
    out = ours(**batch)
    out.loss.backward()
    our_grads = _question_grads(parts.q_encoder)
    # transformers: labels = [decoder_start] + target, fed unshifted as its decoder input
    target = batch["target"]
    labels = torch.cat([target.new_full((B, 1), parts.bart.config.decoder_start_token_id), target], 1)  # (B, T+1)
    q = parts.q_encoder(batch["question_input_ids"], attention_mask=batch["question_attention_mask"])
    q = q.pooler_output  # (B, D)
    scores = torch.bmm(q.unsqueeze(1), parts.docs.vectors.transpose(1, 2)).squeeze(1)  # (B, K)
    extra = {"exclude_bos_score": exclude_bos} if marginalization == "sequence" else {}
    their_out = theirs(
        context_input_ids=batch["context_input_ids"], context_attention_mask=batch["context_attention_mask"],
        doc_scores=scores, labels=labels, n_docs=K, reduce_loss=False, **extra,
    )
    their_out.loss.mean().backward()
    return {"ours": out, "theirs": their_out, "our_grads": our_grads, "their_grads": _question_grads(parts.q_encoder)}


@pytest.mark.parametrize("marginalization", ["sequence", "token"])
@pytest.mark.parametrize("exclude_bos,eps", [(False, 0.0), (True, 0.0), (False, 0.1)])
def test_loss_and_question_encoder_gradients_match_transformers(parts, marginalization, exclude_bos, eps):
    if marginalization == "token" and exclude_bos:
        pytest.skip("transformers' RagTokenForGeneration ignores exclude_bos_score; covered in test_marginalize.py")
    both = run_both(parts, marginalization, exclude_bos, eps)
    ours, theirs = both["ours"], both["theirs"]
    assert (ours.loss - theirs.loss.mean()).abs().item() < 1e-5
    if eps == 0.0:
        assert (ours.nll - theirs.loss).abs().max().item() < 1e-5
    torch.testing.assert_close(ours.doc_scores, theirs.doc_scores, atol=1e-6, rtol=0)
    # float32 gradients: both sides round differently (ours is the closer to float64, see
    # below); the token marginal sums many near-cancelling terms, so compare relative to scale.
    assert both["our_grads"].keys() == both["their_grads"].keys() and len(both["our_grads"]) > 0
    for name, grad in both["our_grads"].items():
        scale = grad.abs().max().item()
        assert (grad - both["their_grads"][name]).abs().max().item() <= 1e-3 * scale + 1e-9, name
    assert any(g.abs().sum() > 0 for g in both["our_grads"].values())


@pytest.mark.parametrize("marginalization", ["sequence", "token"])
@pytest.mark.parametrize("exclude_bos,eps", [(False, 0.0), (True, 0.0), (False, 0.1)])
def test_question_encoder_gradients_match_transformers_in_float64(parts64, marginalization, exclude_bos, eps):
    if marginalization == "token" and exclude_bos:
        pytest.skip("transformers' RagTokenForGeneration ignores exclude_bos_score; covered in test_marginalize.py")
    both = run_both(parts64, marginalization, exclude_bos, eps)
    assert (both["ours"].loss - both["theirs"].loss.mean()).abs().item() < 1e-10
    for name, grad in both["our_grads"].items():
        torch.testing.assert_close(grad, both["their_grads"][name], atol=1e-12, rtol=1e-8, msg=name)


def test_seq_logits_equal_transformers_logits(parts):
    both = run_both(parts, "sequence", False, 0.0)
    ours, theirs = both["ours"].seq_logits, both["theirs"].logits
    assert ours.shape[:2] == (B * K, theirs.shape[1] - 1)  # ours has no extra last position
    torch.testing.assert_close(ours, theirs[:, :-1], atol=1e-5, rtol=0)


def test_transformers_format_is_token_for_token_their_retriever(parts):
    ours = Generator(parts.bart, parts.bart_tok, max_source_length=40, input_format="transformers")
    ids, mask = ours.build_inputs(QUESTIONS, TITLES, TEXTS)
    fake = SimpleNamespace(config=SimpleNamespace(title_sep=" / ", doc_sep=" // ", max_combined_length=40),
                           generator_tokenizer=parts.bart_tok)
    docs = [{"title": t, "text": x} for t, x in zip(TITLES, TEXTS)]
    their_ids, their_mask = RagRetriever.postprocess_docs(fake, docs, QUESTIONS, None, K, return_tensors="pt")
    assert torch.equal(ids, their_ids) and torch.equal(mask, their_mask)


def test_n_docs_per_call_uses_the_first_docs(parts):
    model = _ours(parts, "token", False, 0.0)
    batch = model.prepare_inputs(QUESTIONS, parts.docs, ANSWERS)
    with torch.no_grad():
        two = model(**batch, n_docs=2)
        again = model(**model.prepare_inputs(QUESTIONS, parts.docs.first(2), ANSWERS), n_docs=2)
    assert two.doc_scores.shape == (B, 2) and two.seq_logits.shape[0] == B * 2
    torch.testing.assert_close(two.nll, again.nll, atol=1e-6, rtol=0)
