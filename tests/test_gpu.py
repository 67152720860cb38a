"""On one CUDA GPU: the same numbers as on the CPU and as transformers' RAG on the GPU (run by make gpu-check).

- RAG-Sequence and RAG-Token losses on CUDA (float32) equal ours on the CPU and transformers' RAG on CUDA;
- RAG-Token greedy / beam and RAG-Sequence thorough generations on CUDA equal ours on the CPU and
  transformers' ``generate`` on CUDA, token for token;
- the torch index in fp16 on CUDA returns the exact float64 top-k (ties within fp16 rounding aside);
- ``rag-train`` fast_dev_run and ``rag-eval`` on one GPU under bf16-mixed;
- passage encoding on the GPU in fp16 agrees with the CPU's float32 vectors.
Every test skips, saying why, without CUDA.
"""
from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check runs these)")]

from test_decoding_parity import MAX_LENGTH, shared  # noqa: E402, F401  (fixture)
from test_decoding_parity import K as PARITY_K  # noqa: E402
from test_rag_parity import ANSWERS, QUESTIONS, _ours, _theirs, parts  # noqa: E402, F401  (fixture)

from decoding.rag_sequence import rag_sequence_generate  # noqa: E402
from decoding.rag_token import rag_token_generate  # noqa: E402
from index.encode import make_embed_fn  # noqa: E402
from index.torch_index import TorchIndex  # noqa: E402
from rag_models.retriever import load_encoder  # noqa: E402
from tiny_setup import tiny_overrides  # noqa: E402
from training.config import compose  # noqa: E402
from training.evaluation.eval_cli import evaluate  # noqa: E402
from training.lit.train_cli import train  # noqa: E402

CUDA = torch.device("cuda")


def _parts_on(source: SimpleNamespace, device: torch.device) -> SimpleNamespace:
    """A copy of test_rag_parity's tiny models and docs on ``device``."""
    return SimpleNamespace(q_tok=source.q_tok, bart_tok=source.bart_tok, docs=source.docs.to(device),
                           q_encoder=copy.deepcopy(source.q_encoder).to(device).eval(),
                           bart=copy.deepcopy(source.bart).to(device).eval())


@torch.no_grad()
def _nll_ours_and_theirs(p: SimpleNamespace, marginalization: str) -> tuple[torch.Tensor, torch.Tensor]:
    """-log p(y|x) per question (B,) by our RagModel and by transformers' RAG, on p's device."""
    ours = _ours(p, marginalization, False, 0.0)
    device = p.docs.vectors.device
    batch = ours.prepare_inputs(QUESTIONS, p.docs, ANSWERS)
    batch = {key: value.to(device) for key, value in batch.items()}
    out = ours(**batch)
    target = batch["target"]
    start = target.new_full((target.shape[0], 1), p.bart.config.decoder_start_token_id)
    q = p.q_encoder(batch["question_input_ids"], attention_mask=batch["question_attention_mask"]).pooler_output
    scores = torch.bmm(q.unsqueeze(1), p.docs.vectors.transpose(1, 2)).squeeze(1)  # (B, K)
    theirs = _theirs(p, marginalization, False, 0.0)(
        context_input_ids=batch["context_input_ids"], context_attention_mask=batch["context_attention_mask"],
        doc_scores=scores, labels=torch.cat([start, target], 1), n_docs=p.docs.n_docs, reduce_loss=False)
    return out.nll, theirs.loss


@pytest.mark.parametrize("marginalization", ["sequence", "token"])
def test_losses_on_cuda_equal_cpu_and_transformers(parts, marginalization):  # noqa: F811
    cpu_ours, _ = _nll_ours_and_theirs(parts, marginalization)
    cuda_ours, cuda_theirs = _nll_ours_and_theirs(_parts_on(parts, CUDA), marginalization)
    assert cuda_ours.device == CUDA or cuda_ours.device.type == CUDA.type
    torch.testing.assert_close(cuda_ours.cpu(), cpu_ours, rtol=1e-5, atol=1e-4)  # GPU vs CPU kernels
    torch.testing.assert_close(cuda_ours, cuda_theirs, rtol=1e-5, atol=1e-5)


def _decoding_on(shared, device: torch.device) -> dict:  # noqa: F811
    """test_decoding_parity's models and inputs on ``device`` (transformers' RAG reads the same BART copy)."""
    moved = {key: value.to(device) if torch.is_tensor(value) else value for key, value in shared.items()}
    moved["bart"] = copy.deepcopy(shared["bart"]).to(device).eval()
    for name in ("token", "sequence"):
        model = copy.deepcopy(shared[name]).to(device).eval()
        model.rag.generator = moved["bart"]
        moved[name] = model
    return moved


def _inputs(m: dict) -> dict:
    return {"context_input_ids": m["ids"], "context_attention_mask": m["mask"], "doc_scores": m["scores"]}


@pytest.mark.parametrize("num_beams", [1, 3])
def test_rag_token_generations_on_cuda_equal_cpu_and_transformers(shared, num_beams):  # noqa: F811
    search = dict(num_beams=num_beams, max_length=MAX_LENGTH, min_length=3)
    cpu = rag_token_generate(shared["bart"], shared["ids"], shared["mask"], shared["scores"], **search)
    gpu = _decoding_on(shared, CUDA)
    ours = rag_token_generate(gpu["bart"], gpu["ids"], gpu["mask"], gpu["scores"], **search)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = gpu["token"].generate(**_inputs(gpu), n_docs=PARITY_K, **search)
    assert torch.equal(ours.sequences.cpu(), cpu.sequences)
    assert torch.equal(ours.sequences, theirs)
    torch.testing.assert_close(ours.scores.cpu(), cpu.scores, rtol=0, atol=1e-4)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_rag_sequence_thorough_generations_on_cuda_equal_cpu_and_transformers(shared, num_beams):  # noqa: F811
    search = dict(num_beams=num_beams, max_length=MAX_LENGTH, min_length=3)
    cpu = rag_sequence_generate(shared["bart"], shared["ids"], shared["mask"], shared["scores"], mode="thorough",
                                **search)
    gpu = _decoding_on(shared, CUDA)
    ours = rag_sequence_generate(gpu["bart"], gpu["ids"], gpu["mask"], gpu["scores"], mode="thorough", **search)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = gpu["sequence"].generate(**_inputs(gpu), n_docs=PARITY_K, **search)
    assert torch.equal(ours.sequences.cpu(), cpu.sequences)
    assert torch.equal(ours.sequences, theirs)
    torch.testing.assert_close(ours.scores.cpu(), cpu.scores, rtol=0, atol=1e-4)
    torch.testing.assert_close(ours.doc_posteriors.cpu(), cpu.doc_posteriors, rtol=0, atol=1e-4)


def test_torch_fp16_index_topk_equals_exact_search():
    """fp16 on CUDA vs float64: the same top-k, except where two scores lie within fp16 rounding of each other."""
    n, d, k, n_queries = 200_000, 768, 20, 64
    gen = torch.Generator().manual_seed(0)
    vectors = torch.randn(n, d, generator=gen).numpy()  # (N, D) float32
    queries = torch.randn(n_queries, d, generator=gen).numpy()  # (Q, D)
    scores, ids = TorchIndex.build(vectors, device="cuda").search(queries, k)  # fp16 matmul on the GPU
    exact = torch.from_numpy(queries).double().to(CUDA) @ torch.from_numpy(vectors).double().to(CUDA).T  # (Q, N)
    exact_top = exact.topk(k, dim=1)
    # fp16 keeps 11 significant bits. Inputs: each of the 768 products rounds by ~2^-11 relative, ~0.03 on a
    # score (std 0.03 over random signs); output: a top score of ~120 (4.5 sigma of N(0, 768)) is stored in
    # fp16, whose spacing is 0.0625 below 128 and 0.125 above. 0.25 bounds both: the tie band.
    tie = 0.25
    kth = exact_top.values[:, -1].cpu().numpy()  # (Q,)
    ours_exact = exact.gather(1, torch.from_numpy(ids).to(CUDA)).cpu().numpy()  # (Q, k) float64 scores of our ids
    reference = exact_top.indices.cpu().numpy()
    for row in range(n_queries):
        extra = set(ids[row]) - set(reference[row])
        for found in extra:  # a passage we return that the exact search does not: must be a tie at rank k
            assert abs(ours_exact[row][list(ids[row]).index(found)] - kth[row]) < tie, (row, found)
    # Near rank k, consecutive exact scores lie ~0.3 apart, so a tie band of 0.25 allows some swaps there;
    # the bulk of each top-k must agree.
    agree = np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, reference)])
    assert agree >= 0.9, agree
    np.testing.assert_allclose(scores, ours_exact, rtol=0, atol=tie)


def _gpu_overrides(setup, run_dir: Path) -> list[str]:
    """tiny_overrides on one GPU with bf16-mixed (configs/trainer/gpu.yaml)."""
    return [o for o in tiny_overrides(setup, run_dir) if o != "trainer=cpu"] + ["trainer=gpu"]


def test_rag_train_fast_dev_run_and_rag_eval_on_one_gpu_in_bf16(tiny_setup, tmp_path):
    cfg = compose(["experiment=demo", *_gpu_overrides(tiny_setup, tmp_path / "train"), "trainer.fast_dev_run=true"])
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accelerator == "gpu"
    result = train(cfg)
    assert math.isfinite(result.metrics["train/loss"]) and result.export_dir is not None
    metrics = evaluate(compose([f"checkpoint={result.export_dir}", f"questions={tiny_setup.world.test}",
                                f"index.path={tiny_setup.index_dir}", f"out_dir={tmp_path / 'eval'}", "limit=8",
                                "batch_size=4", "progress=false", "trainer.accelerator=gpu",
                                "trainer.precision=bf16-mixed"], config_name="eval"))
    assert 0.0 <= metrics["exact_match"] <= 1.0 and metrics["num_total"] == 8
    assert (tmp_path / "eval" / "predictions.jsonl").is_file()


def test_passage_encoding_on_gpu_in_fp16_matches_cpu(tiny_setup):
    encoder, tokenizer = load_encoder(tiny_setup.models.context_encoder, role="context")
    titles = [f"Town {i}" for i in range(64)]
    texts = [f"Town {i} lies on the river number {i % 7} and trades {i % 5} goods." for i in range(64)]
    cpu = make_embed_fn(copy.deepcopy(encoder), tokenizer, device="cpu")(titles, texts)  # (N, D) float32
    gpu = make_embed_fn(copy.deepcopy(encoder), tokenizer, device="cuda", fp16=True)(titles, texts)
    assert gpu.dtype == np.float32 and gpu.shape == cpu.shape
    cosine = (gpu * cpu).sum(1) / (np.linalg.norm(gpu, axis=1) * np.linalg.norm(cpu, axis=1))
    assert cosine.min() > 0.999, cosine.min()  # fp16 rounding only
    np.testing.assert_array_equal((gpu @ cpu.T).argmax(1), (cpu @ cpu.T).argmax(1))
