"""Paper-size models on the CPU (slow): BART-large + DPR-base, random init from their real configs, no download.

- loading: the checkpoints are written with ``save_pretrained`` and read back by `build_rag_model`, through
  the loaders a hub name (facebook/bart-large, facebook/dpr-question_encoder-single-nq-base) goes through;
  every tensor arrives unchanged;
- one training step (1 question x 5 docs): our RAG-Sequence and RAG-Token losses equal transformers' RAG on
  the same weights (1e-4), the backward pass and an SGD step finish with finite gradients;
- RAG-Sequence thorough decoding of 2 questions with n_docs=50 finishes (the path rag-eval runs).
Each test prints its time and the process's peak resident memory; run them one at a time (each holds
1.6 GB of BART-large weights, more with gradients):  pytest -s -m slow tests/test_full_size.py -k NAME
Measured on 2 contended CPU cores (torch 2.13), each test in its own process: building and saving the
checkpoints 69-124 s (3.14 GiB peak); loading 20 s (3.14 GiB); the training step 64 s (4.78 GiB; losses
76.049156 both, RAG-Token 76.043640 vs 76.043648); thorough decoding with 50 docs 294 s (3.67 GiB).
"""
from __future__ import annotations

import gc
import resource
import time

import pytest
import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    DPRConfig,
    DPRQuestionEncoder,
    RagConfig,
    RagSequenceForGeneration,
    RagTokenForGeneration,
)

from decoding.answer import DecodingSettings, decode_retrieved
from decoding.retrieve import Retrieval
from rag_models.checkpoint import build_rag_model
from rag_models.docs import RetrievedDocs
from rag_models.marginalize import rag_token_nll
from rag_models.tokenization import dpr_tokenizers, train_bart_tokenizer, train_wordpiece_vocab

pytestmark = pytest.mark.slow

# facebook/bart-large's config.json (sizes and special ids) and DPR-base's (BERT-base, no projection)
BART_LARGE = dict(vocab_size=50265, d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
                  decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, max_position_embeddings=1024,
                  pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=0,
                  forced_eos_token_id=2, scale_embedding=False, dropout=0.1, attention_dropout=0.0)
DPR_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                intermediate_size=3072, max_position_embeddings=512, projection_dim=0)
WORDS = ("the town of {} lies on the river {} and was founded in {} by a trader from the north who sold copper "
         "salt and wool at the market near the old bridge").split()


def _text(i: int, n_words: int) -> str:
    return " ".join(WORDS[(i * 7 + j) % len(WORDS)].format(i) for j in range(n_words)).replace("{}", str(i))


def _report(name: str, started: float) -> str:
    """'<name>: <s> s, peak RSS <GiB>' printed for the test log (ru_maxrss is in KiB on Linux)."""
    line = (f"{name}: {time.perf_counter() - started:.1f} s, process peak RSS "
            f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    print(line)
    return line


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """BART-large and a DPR-base question encoder, random init, saved with tokenizers; per-tensor sums kept."""
    started = time.perf_counter()
    root = tmp_path_factory.mktemp("full_size")
    corpus = [_text(i, 40) for i in range(200)]
    bart_tok = train_bart_tokenizer(corpus, 1000)  # ids 0..3 = <s> <pad> </s> <unk>, as BART's
    q_tok, _ = dpr_tokenizers(train_wordpiece_vocab(corpus, 500))
    torch.manual_seed(0)
    sums = {}
    for name, model, tok in (("generator", BartForConditionalGeneration(BartConfig(**BART_LARGE)), bart_tok),
                             ("question_encoder", DPRQuestionEncoder(DPRConfig(**DPR_BASE)), q_tok)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        sums[name] = {key: (float(t.double().sum()), float(t.double().abs().sum()))
                      for key, t in model.state_dict().items()}
        del model
        gc.collect()
    _report("build and save BART-large + DPR-base", started)
    return {"root": root, "sums": sums}


def _load(checkpoints: dict, marginalization: str = "sequence", n_docs: int = 5):
    """build_rag_model from the saved directories: the road of a hub name (rag_models/loaders.py)."""
    root = checkpoints["root"]
    return build_rag_model(question_encoder=str(root / "question_encoder"), generator=str(root / "generator"),
                           marginalization=marginalization, n_docs=n_docs, max_source_length=128).eval()


def test_real_sized_checkpoints_load_through_the_hub_loaders(checkpoints):
    started = time.perf_counter()
    model = _load(checkpoints)
    loaded = {"generator": model.generator.model, "question_encoder": model.question_encoder.model}
    for name, module in loaded.items():
        state = module.state_dict()
        assert set(checkpoints["sums"][name]) <= set(state), name
        for key, (total, magnitude) in checkpoints["sums"][name].items():
            t = state[key].double()
            assert float(t.sum()) == total and float(t.abs().sum()) == magnitude, (name, key)
    config = model.generator.model.config
    assert (config.d_model, config.encoder_layers, config.vocab_size) == (1024, 12, 50265)
    assert model.question_encoder.dim == 768 and model.question_encoder.pooling == "pooler"
    assert 400e6 < sum(p.numel() for p in model.generator.parameters()) < 410e6  # BART-large: 406M
    _report("load BART-large + DPR-base through build_rag_model", started)


def _docs(k: int, batch: int, dim: int = 768) -> RetrievedDocs:
    gen = torch.Generator().manual_seed(1)
    return RetrievedDocs(ids=torch.arange(batch * k).view(batch, k), scores=torch.zeros(batch, k),
                         vectors=torch.randn(batch, k, dim, generator=gen) / dim**0.5,
                         titles=[[f"Town {b * k + i}" for i in range(k)] for b in range(batch)],
                         texts=[[_text(b * k + i, 40) for i in range(k)] for b in range(batch)])


def test_one_training_step_matches_transformers_rag(checkpoints):
    started = time.perf_counter()
    model = _load(checkpoints)
    question, answer, k = ["who founded the town of 3?"], ["a trader from the north"], 5
    batch = model.prepare_inputs(question, _docs(k, 1), answer)
    out = model(**batch)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    q_enc, bart = model.question_encoder.model, model.generator.model
    config = RagConfig.from_question_encoder_generator_configs(q_enc.config, bart.config, n_docs=k)
    target = batch["target"]
    labels = torch.cat([target.new_full((1, 1), bart.config.decoder_start_token_id), target], 1)  # (1, T+1)
    inputs = dict(context_input_ids=batch["context_input_ids"], context_attention_mask=batch["context_attention_mask"],
                  doc_scores=out.doc_scores.detach(), labels=labels, n_docs=k, reduce_loss=False)
    with torch.no_grad():
        theirs_seq = RagSequenceForGeneration(config, question_encoder=q_enc, generator=bart).eval()(**inputs).loss
        theirs_tok = RagTokenForGeneration(config, question_encoder=q_enc, generator=bart).eval()(**inputs).loss
        ours_tok = rag_token_nll(out.seq_logits, out.doc_scores, target, model.generator.pad_token_id)
    print(f"losses: ours seq {out.loss.item():.6f} tok {ours_tok.item():.6f}; "
          f"transformers seq {theirs_seq.item():.6f} tok {theirs_tok.item():.6f}")
    assert abs(out.loss.item() - theirs_seq.item()) < 1e-4
    assert abs(ours_tok.item() - theirs_tok.item()) < 1e-4
    before = model.generator.model.lm_head.weight.detach().clone()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3).step()
    assert not torch.equal(before, model.generator.model.lm_head.weight)  # the step moved the (tied) weights
    _report("one RAG training step, 1 question x 5 docs, BART-large + DPR-base", started)


def test_thorough_decoding_of_two_questions_with_50_docs_finishes(checkpoints):
    started = time.perf_counter()
    model = _load(checkpoints, n_docs=50)
    questions, k = ["who founded the town of 3?", "which river flows through the town of 8?"], 50
    enc = model.tokenize_questions(questions)
    with torch.no_grad():
        q = model.embed_questions(enc["input_ids"], enc["attention_mask"])  # (2, 768)
    settings = DecodingSettings(strategy="thorough", num_beams=1, max_length=8, n_docs=k)
    answers = decode_retrieved(questions, model, Retrieval(q, _docs(k, 2)), settings)
    assert len(answers) == 2
    for found in answers:
        assert len(found.posteriors) == k and abs(sum(found.posteriors) - 1.0) < 1e-4
        assert torch.isfinite(torch.tensor(found.score))
    _report("RAG-Sequence thorough decoding, 2 questions x 50 docs, max_length 8", started)
