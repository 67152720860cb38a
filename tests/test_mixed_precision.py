"""Mixed precision cannot NaN: under bf16 / fp16 autocast every score, log-likelihood and loss is float32.

Autocast (Lightning's ``bf16-mixed`` / ``16-mixed``) runs matmuls in half precision. These tests run the
paths from logits and doc scores to the loss, the decoders' step scores and the doc posteriors inside
``torch.autocast("cpu", ...)`` (CPU autocast lowers the same matmuls to bf16 / fp16) and check that:
- q . d, question vectors, DPR's in-batch scores and the torch index search come out in float32 and equal
  their float32 values (with fp16 they would overflow above 65,504; with bf16 round to 8 bits);
- RAG-Sequence and RAG-Token losses and question-encoder gradients under bf16 autocast agree with float32
  (tolerances stated beside each assert, measured on these tiny models);
- logits in the fp16 overflow range (7e4) give finite losses, step log-probs and posteriors.
The training run under ``trainer.precision=bf16-mixed`` against float32 is the slow test at the end.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from decoding.rag_sequence import rag_sequence_generate
from decoding.rag_token import rag_token_generate
from decoding.scoring import doc_posteriors
from index.manifest import IndexManifest
from index.torch_index import TorchIndex
from rag_models.docs import RetrievedDocs
from rag_models.generator import Generator
from rag_models.marginalize import rag_sequence_nll, rag_token_nll, rag_token_step_logprobs
from rag_models.rag import RagModel
from rag_models.retriever import DenseEncoder, doc_scores
from rag_models.tiny_models import TinyBartSize, TinyDprSize, tiny_bart, tiny_dpr_encoder
from rag_models.tokenization import dpr_tokenizers, train_bart_tokenizer, train_wordpiece_vocab
from training.lit.dpr_module import DprLitModule

HALF = [torch.bfloat16, torch.float16]
QUESTIONS = ["what is the color of Quenby?", "who founded Marrowick?", "which river flows through Tarn?"]
ANSWERS = ["green", "Elsa Tarn", "the river Varn in the north"]
TITLES = [["Quenby", "Marrowick", "Tarn"], ["Marrowick", "Tarn", "Quenby"], ["Tarn", "Quenby", "Marrowick"]]
TEXTS = [["Quenby is a green town on the river Varn.", "Marrowick was founded by Elsa Tarn.", "Tarn is north."],
         ["Marrowick was founded by Elsa Tarn in 1742.", "Tarn lies in the north.", "Quenby is green."],
         ["Tarn lies on the river Varn in the north.", "Quenby is a green town.", "Marrowick exports copper."]]
CORPUS = QUESTIONS + ANSWERS + [t for row in TEXTS for t in row] + [t for row in TITLES for t in row]
B, K, D = 3, 3, 32


def _big_vectors(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, D), d (B, K, D) whose products are ~1e5: inf in fp16, coarsely rounded in bf16."""
    g = torch.Generator().manual_seed(seed)
    q = 60.0 + torch.rand(B, D, generator=g) * 10
    d = 60.0 + torch.rand(B, K, D, generator=g) * 10
    return q, d


@pytest.mark.parametrize("dtype", HALF)
def test_doc_scores_stay_float32_and_exact_under_autocast(dtype):
    q, d = _big_vectors(0)
    reference = doc_scores(q.double(), d.double())  # (B, K), ~1.3e5 each
    assert reference.min() > 65504  # past fp16's largest value: a half q . d would be inf
    with torch.autocast("cpu", dtype=dtype):
        assert torch.mm(q, q.T).dtype == dtype  # autocast is really on
        scores = doc_scores(q, d)
        scores_half_q = doc_scores(q.to(dtype), d)  # a half question vector (bf16-true weights)
    assert scores.dtype == torch.float32 and scores_half_q.dtype == torch.float32
    torch.testing.assert_close(scores.double(), reference, rtol=1e-6, atol=0)
    assert torch.isfinite(scores_half_q).all()


def test_doc_scores_keep_float64():
    q, d = _big_vectors(1)
    assert doc_scores(q.double(), d.float()).dtype == torch.float64


@pytest.fixture(scope="module")
def parts():
    """Tiny tokenizers, a DPR question encoder and a BART, and 3 docs per question (eval mode: no dropout)."""
    q_tok, _ = dpr_tokenizers(train_wordpiece_vocab(CORPUS * 5, 200))
    bart_tok = train_bart_tokenizer(CORPUS * 5, 300)
    q_encoder = tiny_dpr_encoder("question", len(q_tok), TinyDprSize(hidden_size=D, num_layers=1, num_heads=2,
                                                                     intermediate_size=64, max_positions=64), seed=0)
    # init_std 0.3 and doc vectors of norm ~0.6: each doc's log p(y|x,z) differs by 2-5 nats and q . d is O(1),
    # so p(z|x) is not one-hot and the question encoder gets a real gradient (with BART's 0.02 and unit vectors
    # the docs barely matter and the retriever's gradient is rounding noise, 1e-8, in any precision).
    bart = tiny_bart(bart_tok, TinyBartSize(d_model=32, layers=1, heads=2, ffn_dim=64, max_positions=128,
                                            init_std=0.3), seed=1)
    vectors = 0.1 * torch.randn(B, K, D, generator=torch.Generator().manual_seed(2))
    docs = RetrievedDocs(ids=torch.arange(B * K).view(B, K), scores=torch.zeros(B, K), vectors=vectors,
                         titles=TITLES, texts=TEXTS)
    return SimpleNamespace(q_tok=q_tok, bart_tok=bart_tok, q_encoder=q_encoder.eval(), bart=bart.eval(), docs=docs)


def _model(parts, marginalization: str) -> RagModel:
    generator = Generator(parts.bart, parts.bart_tok, max_source_length=48, max_target_length=16)
    return RagModel(question_encoder=DenseEncoder(parts.q_encoder, pooling="pooler"), question_tokenizer=parts.q_tok,
                    generator=generator, marginalization=marginalization, n_docs=K).eval()


def _loss_and_grads(model: RagModel, batch: dict, dtype: torch.dtype | None) -> tuple[object, dict]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out, grads


@pytest.mark.parametrize("marginalization", ["sequence", "token"])
def test_loss_and_gradients_under_bf16_autocast_agree_with_float32(parts, marginalization):
    model = _model(parts, marginalization)
    batch = model.prepare_inputs(QUESTIONS, parts.docs, ANSWERS)
    full, full_grads = _loss_and_grads(model, batch, None)
    half, half_grads = _loss_and_grads(model, batch, torch.bfloat16)
    assert not torch.equal(half.seq_logits, full.seq_logits)  # the generator did run in bf16 ...
    for name in ("loss", "nll", "doc_scores"):  # ... and everything after it is float32
        assert getattr(half, name).dtype == torch.float32, name
    # Tolerances: about 3x the worst measured here (both marginalizations, torch 2.13 CPU).
    # Loss: measured relative difference <= 1.4e-4.
    assert abs(half.loss.item() - full.loss.item()) <= 5e-4 * abs(full.loss.item())
    # q . d (~1.3 at most): q comes from a bf16 encoder; measured absolute difference 4.8e-5.
    torch.testing.assert_close(half.doc_scores, full.doc_scores, rtol=0, atol=2e-4)
    # Gradients: over all parameters, relative L2 error measured <= 0.026; per tensor (those holding >= 1% of
    # the gradient's norm, 49 of 70) relative L2 error <= 0.05 and cosine similarity >= 0.9988.
    assert full_grads.keys() == half_grads.keys() and len(full_grads) > 10
    total = torch.cat([g.flatten() for g in full_grads.values()])
    total_half = torch.cat([half_grads[name].flatten() for name in full_grads])
    assert (total_half - total).norm() <= 0.08 * total.norm()
    checked = 0
    for name, grad in full_grads.items():
        other = half_grads[name]
        assert torch.isfinite(other).all(), name
        if grad.norm() < 1e-2 * total.norm():
            continue  # tensors with a negligible share of the gradient: their relative error means nothing
        checked += 1
        assert (other - grad).norm() <= 0.15 * grad.norm(), name
        assert torch.nn.functional.cosine_similarity(other.flatten(), grad.flatten(), dim=0) >= 0.995, name
    assert checked > 20
    retriever = [name for name in full_grads if name.startswith("question_encoder") and full_grads[name].norm() > 0]
    assert retriever  # the retriever's gradient is among those compared


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("marginalization", ["sequence", "token"])
def test_forward_with_huge_doc_scores_stays_finite_under_autocast(parts, marginalization, dtype):
    """q . d ~ 1e5 (fp16 overflow) inside the model's own forward: loss and gradients finite."""
    model = _model(parts, marginalization)
    q, d = _big_vectors(3)
    docs = RetrievedDocs(ids=parts.docs.ids, scores=parts.docs.scores, vectors=d, titles=TITLES, texts=TEXTS)
    batch = model.prepare_inputs(QUESTIONS, docs, ANSWERS)
    model.embed_questions = lambda ids, mask: q.clone().requires_grad_(True)  # huge question vectors
    out, grads = _loss_and_grads(model, batch, dtype)
    assert torch.isfinite(out.loss) and torch.isfinite(out.doc_scores).all()
    assert all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("loss_fn", [rag_sequence_nll, rag_token_nll])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_losses_of_logits_in_the_fp16_overflow_range_are_finite(loss_fn, eps):
    """bf16 logits of magnitude 7e4 (fp16 would hold inf) and doc scores of 7e4: finite loss and gradients."""
    g = torch.Generator().manual_seed(4)
    t, v = 5, 50
    logits = (torch.randn(B * K, t, v, generator=g) * 7e4).to(torch.bfloat16).requires_grad_(True)
    scores = (torch.randn(B, K, generator=g) * 7e4).to(torch.bfloat16).requires_grad_(True)
    target = torch.randint(2, v, (B, t), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(logits, scores, target, pad_token_id=1, label_smoothing=eps)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(logits.grad.float()).all() and torch.isfinite(scores.grad.float()).all()
    # The same numbers in float64 give the same loss up to bf16 -> float32 exactness (inputs are equal).
    reference = loss_fn(logits.detach().double(), scores.detach().double(), target, pad_token_id=1,
                        label_smoothing=eps)
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=0)


def test_step_logprobs_and_posteriors_of_huge_half_inputs_are_finite():
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(B * K, 40, generator=g) * 7e4).to(torch.bfloat16)
    scores = (torch.randn(B, K, generator=g) * 7e4).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        step = rag_token_step_logprobs(logits, scores)  # (B, V)
        posterior, marginal = doc_posteriors(scores, torch.randn(B, 2, K, generator=g) * 7e4)
    assert step.dtype == torch.float32 and torch.isfinite(step).all()
    torch.testing.assert_close(step.exp().sum(-1), torch.ones(B))
    assert torch.isfinite(posterior).all() and torch.isfinite(marginal).all()
    torch.testing.assert_close(posterior.sum(-1), torch.ones(B, 2))


@pytest.mark.parametrize("dtype", HALF)
def test_dpr_in_batch_loss_is_float32_under_autocast(dtype):
    q, d = _big_vectors(6)
    p = d.view(B * K, D)  # (P, D) passages; question i's positive is column i
    keys, positive = torch.arange(B * K), torch.arange(B)
    reference, _ = DprLitModule.contrastive_loss(None, q.double(), p.double(), keys, positive, 0)
    with torch.autocast("cpu", dtype=dtype):
        loss, accuracy = DprLitModule.contrastive_loss(None, q, p, keys, positive, 0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), reference, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", HALF)
def test_question_vectors_are_float32_under_autocast(parts, dtype):
    enc = DenseEncoder(parts.q_encoder, pooling="mean")
    ids = parts.q_tok(QUESTIONS, return_tensors="pt", padding=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        half = enc(ids["input_ids"], ids["attention_mask"])
    full = enc(ids["input_ids"], ids["attention_mask"]).detach()
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=0, atol=0.05 * full.abs().max().item())  # encoder ran in half


def test_torch_index_search_ignores_an_enclosing_autocast():
    g = torch.Generator().manual_seed(7)
    vectors = torch.randn(500, D, generator=g).numpy()
    queries = vectors[:4] + 0.01 * torch.randn(4, D, generator=g).numpy()
    manifest = IndexManifest(dim=D, count=len(vectors), factory="exact")
    index = TorchIndex(vectors, manifest, device="cpu")
    plain_scores, plain_ids = index.search(queries, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores, ids = index.search(queries, 10)
    np.testing.assert_array_equal(ids, plain_ids)
    np.testing.assert_array_equal(scores, plain_scores)


@pytest.mark.parametrize("strategy", ["thorough", "token"])
def test_decoders_score_in_float32_under_autocast(parts, strategy):
    """Step scores, hypothesis scores and doc posteriors are float32 and finite when the generator runs in bf16."""
    model = _model(parts, "sequence" if strategy == "thorough" else "token")
    ids, mask = model.build_generator_inputs(QUESTIONS, parts.docs)  # (B*K, L)
    scores = torch.randn(B, K, generator=torch.Generator().manual_seed(8)) * 7e4  # huge, but float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        if strategy == "thorough":
            result = rag_sequence_generate(parts.bart, ids, mask, scores, mode="thorough", num_beams=2,
                                           max_length=6)
        else:
            result = rag_token_generate(parts.bart, ids, mask, scores, num_beams=2, max_length=6)
    for field in (result.scores, result.doc_loglik, result.doc_posteriors):
        assert field.dtype == torch.float32
    assert torch.isfinite(result.scores).all() and torch.isfinite(result.doc_posteriors).all()
    torch.testing.assert_close(result.doc_posteriors.sum(-1), torch.ones(B))


@pytest.mark.slow
def test_bf16_mixed_training_learns_like_float32(tiny_setup, tmp_path: Path):
    """rag-train (demo experiment, tiny set-up) under trainer.precision=bf16-mixed and 32-true, same seed.

    Measure: the mean train/loss of the last 5 of 30 steps; bf16-mixed within 1% of float32 (measured on 2 CPU
    cores, torch 2.13: 36.1391 vs 36.1387, from 52.448 over the first 5 steps in both), and both below 80% of the
    first 5 steps' mean (it learns); every logged loss finite.
    """
    from test_training import _column, _config, _read_csv_metrics  # the training tests' own helpers

    from training.lit.train_cli import train

    means = {}
    for precision in ("32-true", "bf16-mixed"):
        run_dir = tmp_path / precision
        cfg = _config("demo", tiny_setup, run_dir, "logger=csv", "trainer.max_steps=30", "trainer.log_every_n_steps=1",
                      "trainer.val_check_interval=30", "data.batch_size=8", "module.warmup_steps=3",
                      "module.lr_question_encoder=1e-4", "module.lr_generator=3e-3", f"trainer.precision={precision}")
        train(cfg)
        losses = _column(_read_csv_metrics(run_dir), "train/loss")
        assert len(losses) == 30 and all(np.isfinite(losses)), losses
        means[precision] = (sum(losses[:5]) / 5, sum(losses[-5:]) / 5)
        assert means[precision][1] < 0.8 * means[precision][0], losses
    print("first-5 and last-5 mean train/loss:", means)
    first, last = means["32-true"], means["bf16-mixed"]
    assert abs(last[1] - first[1]) <= 0.01 * first[1], means


def test_rag_eval_precision_names():
    from rag_models.errors import InputError
    from training.evaluation.job import AUTOCAST_DTYPES, _precision

    assert AUTOCAST_DTYPES[_precision("bf16-mixed")] is torch.bfloat16
    assert AUTOCAST_DTYPES[_precision("32-true")] is None
    with pytest.raises(InputError, match="trainer.precision"):
        _precision("bf16")
