"""Print how far our RAG losses and gradients are from transformers' RAG, for every loss variant.

Both implementations get the same tiny random-init DPR question encoder and BART (the very
same module objects), the same generator inputs and doc scores q . d computed from the question
encoder; the table gives, over several random batches, the largest absolute difference of

- the per-example loss (ours: rag_models.marginalize on our model's logits; theirs: get_nll
  with reduce_loss=False on theirs),
- the batch loss (our RagModel.loss vs the mean of theirs),
- the gradient of the question encoder (largest over all its parameters, and relative to the
  largest gradient entry).

transformers' RagTokenForGeneration ignores exclude_bos_score; for that row its oracle is its
get_nll with the BOS position masked out of the NLL term (smoothing kept), i.e. our definition.

    python scripts/parity_report.py [--batches 5] [--batch-size 4] [--n-docs 5] [--dtype float32]
"""
from __future__ import annotations

import argparse
import itertools
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import RagConfig, RagSequenceForGeneration, RagTokenForGeneration  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from rag_models.docs import RetrievedDocs  # noqa: E402
from rag_models.generator import Generator  # noqa: E402
from rag_models.marginalize import rag_sequence_nll, rag_token_nll  # noqa: E402
from rag_models.rag import RagModel  # noqa: E402
from rag_models.retriever import DenseEncoder  # noqa: E402
from rag_models.tiny_models import TinyBartSize, TinyDprSize, tiny_bart, tiny_dpr_encoder  # noqa: E402
from rag_models.tokenization import dpr_tokenizers, train_bart_tokenizer, train_wordpiece_vocab  # noqa: E402

WORDS = "town river copper founded north green wool market bridge castle harbour valley mill".split()
HF_CLASSES = {"sequence": RagSequenceForGeneration, "token": RagTokenForGeneration}
NLL_FUNCTIONS = {"sequence": rag_sequence_nll, "token": rag_token_nll}


def random_text(rng: random.Random, n_min: int, n_max: int) -> str:
    """A sentence of random corpus words."""
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(n_min, n_max)))


def make_batch(rng: random.Random, batch_size: int, n_docs: int, dim: int, dtype: torch.dtype) -> dict:
    """Random questions, answers of varied length, K passages each and their stored vectors."""
    questions = [random_text(rng, 3, 8) + "?" for _ in range(batch_size)]
    answers = [random_text(rng, 1, 5) for _ in range(batch_size)]
    titles = [[random_text(rng, 1, 2) for _ in range(n_docs)] for _ in range(batch_size)]
    texts = [[random_text(rng, 5, 30) for _ in range(n_docs)] for _ in range(batch_size)]
    gen = torch.Generator().manual_seed(rng.randint(0, 2**31))
    vectors = torch.randn(batch_size, n_docs, dim, generator=gen, dtype=dtype)  # (B, K, D)
    ids = torch.arange(batch_size * n_docs).view(batch_size, n_docs)  # (B, K)
    docs = RetrievedDocs(ids=ids, scores=torch.zeros(ids.shape), vectors=vectors, titles=titles, texts=texts)
    return {"questions": questions, "answers": answers, "docs": docs}


def their_example_losses(theirs, logits, scores, labels, marginalization: str, exclude_bos: bool, eps: float):
    """transformers' per-example get_nll; for RAG-Token with exclude_bos, its NLL minus the BOS term."""
    if marginalization == "sequence":
        return theirs.get_nll(logits, scores, labels, reduce_loss=False, epsilon=eps, exclude_bos_score=exclude_bos)
    full = theirs.get_nll(logits, scores, labels, reduce_loss=False, epsilon=eps)
    if not exclude_bos:
        return full
    masked = labels.clone()
    masked[:, 1] = theirs.config.generator.pad_token_id  # labels[:, 1] is the BOS target
    bos_nll = theirs.get_nll(logits, scores, labels, epsilon=0.0) - theirs.get_nll(logits, scores, masked, epsilon=0.0)
    return full - (1.0 - eps) * bos_nll


def grads_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Clone and clear the gradients of ``module``."""
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return grads


def compare(parts: dict, batch: dict, marginalization: str, exclude_bos: bool, eps: float) -> tuple[float, ...]:
    """One batch through both; returns max |d example loss|, |d batch loss|, max |d grad|, max |grad|, max loss."""
    q_encoder, bart = parts["q_encoder"], parts["bart"]
    ours = RagModel(
        question_encoder=DenseEncoder(q_encoder), question_tokenizer=parts["q_tok"],
        generator=Generator(bart, parts["bart_tok"], max_source_length=128, max_target_length=32),
        marginalization=marginalization, n_docs=batch["docs"].n_docs, label_smoothing=eps,
        exclude_bos_score=exclude_bos,
    ).eval()
    inputs = ours.prepare_inputs(batch["questions"], batch["docs"], batch["answers"])
    q_encoder.zero_grad(set_to_none=True)
    out = ours(**inputs)
    out.loss.backward()
    our_grads = grads_of(q_encoder)
    target = inputs["target"]
    our_examples = NLL_FUNCTIONS[marginalization](
        out.seq_logits, out.doc_scores, target, bart.config.pad_token_id,
        exclude_bos_score=exclude_bos, label_smoothing=eps, bos_token_id=ours.generator.bos_token_id,
    )
    config = RagConfig.from_question_encoder_generator_configs(
        q_encoder.config, bart.config, n_docs=batch["docs"].n_docs, label_smoothing=eps, reduce_loss=False
    )
    theirs = HF_CLASSES[marginalization](config, question_encoder=q_encoder, generator=bart).eval()
    start = target.new_full((target.shape[0], 1), bart.config.decoder_start_token_id)  # (B, 1)
    labels = torch.cat([start, target], 1)  # (B, T+1)
    q = q_encoder(inputs["question_input_ids"], attention_mask=inputs["question_attention_mask"])
    q = q.pooler_output  # (B, D)
    scores = torch.bmm(q.unsqueeze(1), batch["docs"].vectors.transpose(1, 2)).squeeze(1)  # (B, K)
    logits = theirs(
        context_input_ids=inputs["context_input_ids"], context_attention_mask=inputs["context_attention_mask"],
        doc_scores=scores, decoder_input_ids=labels, n_docs=batch["docs"].n_docs,
    ).logits  # (B*K, T+1, V)
    their_examples = their_example_losses(theirs, logits, scores, labels, marginalization, exclude_bos, eps)
    their_examples.mean().backward()
    their_grads = grads_of(q_encoder)
    grad_diff = max((our_grads[n] - their_grads[n]).abs().max().item() for n in our_grads)
    grad_max = max(g.abs().max().item() for g in our_grads.values())
    example_diff = (our_examples - their_examples).abs().max().item()
    batch_diff = (out.loss - their_examples.mean()).abs().item()
    return example_diff, batch_diff, grad_diff, grad_max, their_examples.abs().max().item()


def build_parts(seed: int, dtype: torch.dtype) -> dict:
    """Tokenizers trained on random corpus text and the demo-size tiny models."""
    rng = random.Random(seed)
    corpus = [random_text(rng, 5, 30) for _ in range(300)]
    q_tok, _ = dpr_tokenizers(train_wordpiece_vocab(corpus, 300))
    bart_tok = train_bart_tokenizer(corpus, 500)
    dpr_size = TinyDprSize(vocab_size=300)
    q_encoder = tiny_dpr_encoder("question", len(q_tok), dpr_size, seed=seed).to(dtype)
    bart = tiny_bart(bart_tok, TinyBartSize(vocab_size=500), seed=seed + 1).to(dtype)
    return {"q_tok": q_tok, "bart_tok": bart_tok, "q_encoder": q_encoder, "bart": bart, "dim": dpr_size.hidden_size}


def main() -> None:
    """Parse options, run every variant over the batches, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=5, help="random batches per variant")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--n-docs", type=int, default=5)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    parts = build_parts(args.seed, dtype)
    print(f"tiny DPR {parts['dim']}-d + tiny BART, {args.batches} batches of {args.batch_size} questions "
          f"x {args.n_docs} docs, {args.dtype}")
    print(f"{'marginalization':<16}{'exclude_bos':<13}{'smoothing':<11}{'max|d ex. loss|':>17}"
          f"{'max|d batch loss|':>19}{'max|d grad q|':>15}{'rel. grad':>11}{'max loss':>10}")
    for marginalization, exclude_bos, eps in itertools.product(["sequence", "token"], [False, True], [0.0, 0.1]):
        rng = random.Random(args.seed + 1)
        rows = [compare(parts, make_batch(rng, args.batch_size, args.n_docs, parts["dim"], dtype), marginalization,
                        exclude_bos, eps) for _ in range(args.batches)]
        ex, bl, gd = (max(r[i] for r in rows) for i in range(3))
        rel = max(r[2] / r[3] for r in rows)
        top = max(r[4] for r in rows)  # float32 spacing near it bounds what "equal" can mean
        print(f"{marginalization:<16}{str(exclude_bos):<13}{eps:<11}"
              f"{ex:>17.2e}{bl:>19.2e}{gd:>15.2e}{rel:>11.2e}{top:>10.1f}")


if __name__ == "__main__":
    main()
