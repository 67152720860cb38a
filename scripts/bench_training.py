"""Time one RAG training step (forward + backward + AdamW) against transformers' RAG, on realistic lengths.

Both sides get the same random-init weights (deep copies) and the same batches; only the
way the batch reaches the model differs, as it does in real use:
- ours: `RagModel` with its own collation (every tensor padded to the batch's longest row);
- transformers: `RagSequenceForGeneration` / `RagTokenForGeneration` fed as its `RagRetriever`
  feeds it: generator contexts padded to ``max_combined_length`` (300), doc scores q . d from
  its question encoder (with gradient, as its `RagModel` computes them), labels = [start] + target.

Batch lengths follow real data (token counts per word are stated approximations of BART's
byte-level BPE and DPR's WordPiece on English text):
- questions: the word counts of NQ-Open dev questions (``--questions``, the NQ-Open JSONL; if it is
  absent a stated fallback: 9 +- 2.5 words, clipped to 4..25, NQ-Open dev's mean and spread);
  BART tokens = round(1.3 x words), DPR tokens = round(1.2 x words) + 2;
- passages: DPR's 100-word passages: 130 +- 12 BART tokens (clipped 100..170), titles 1-6 words;
- answers: 1-5 tokens, plus BOS and EOS.
The context is [bos] question // title / passage [eos], cut at 300 tokens. Retrieval is not timed:
the doc vectors are random (B, K, D), as an index hands them over. Sizes: tiny (BART d128 2+2,
vocab 1000; DPR d64 2 layers), mid (BART d256 4+4, vocab 8000; DPR d256 4 layers), large
(BART-large + DPR-base: use a GPU, bf16 autocast by default there).
Besides the step time: questions/s, real (unpadded) context tokens/s, and on a GPU the peak memory of
each side and its model FLOPs utilization (6 x parameters x real tokens per step, over the bf16 peak).

    python scripts/bench_training.py --size tiny
    python scripts/bench_training.py --size mid --json out/training.json
    python scripts/bench_training.py --size large --device cuda
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from transformers import (  # noqa: E402
    BartConfig,
    BartForConditionalGeneration,
    DPRConfig,
    DPRQuestionEncoder,
    RagConfig,
    RagSequenceForGeneration,
    RagTokenForGeneration,
)
from transformers.utils import logging as hf_logging  # noqa: E402

from rag_models.docs import RetrievedDocs  # noqa: E402
from rag_models.generator import Generator  # noqa: E402
from rag_models.rag import RagModel  # noqa: E402
from rag_models.retriever import DenseEncoder  # noqa: E402
from rag_models.tokenization import dpr_tokenizers, train_bart_tokenizer, train_wordpiece_vocab  # noqa: E402
from scripts.bench_contract import machine, write_rows  # noqa: E402

# size -> (BART: d_model, layers, heads, ffn, vocab), (DPR: hidden, layers, heads, ffn, vocab)
SIZES = {
    "tiny": ((128, 2, 4, 256, 1000), (64, 2, 2, 128, 1000)),
    "mid": ((256, 4, 4, 1024, 8000), (256, 4, 4, 1024, 8000)),
    "large": ((1024, 12, 16, 4096, 50265), (768, 12, 12, 3072, 30522)),
}
MAX_COMBINED_LENGTH = 300  # transformers' RagConfig default: its retriever pads every context to this
QUESTIONS = "../shared/data/nq_open/NQ-open.dev.jsonl"  # relative to the checkout
FALLBACK_WORDS = (9.0, 2.5, 4, 25)  # mean, sd, min, max words of a question when the file is absent
MARGINALIZATIONS = {"sequence": RagSequenceForGeneration, "token": RagTokenForGeneration}


def question_words(path: Path, rng: random.Random, n: int) -> tuple[list[int], str]:
    """n question word counts: drawn from the NQ-Open file's questions, else from the stated fallback."""
    if path.is_file():
        with path.open(encoding="utf-8") as lines:
            counts = [len(json.loads(line)["question"].split()) for line in lines if line.strip()]
        return [rng.choice(counts) for _ in range(n)], f"NQ-Open dev question lengths ({len(counts)} questions)"
    print(f"{path} not found: question lengths fall back to {FALLBACK_WORDS[0]} +- {FALLBACK_WORDS[1]} words",
          file=sys.stderr)
    mean, sd, low, high = FALLBACK_WORDS
    return [min(high, max(low, round(rng.gauss(mean, sd)))) for _ in range(n)], "fallback normal question lengths"


def build_pair(size: str, n_docs: int, marginalization: str, seed: int) -> tuple[RagModel, torch.nn.Module]:
    """Our RagModel and transformers' RAG model with equal random weights (deep copies)."""
    (d, layers, heads, ffn, vocab), (qd, q_layers, q_heads, q_ffn, q_vocab) = SIZES[size]
    words = ["the town lies on a river", "who founded the town"]
    bart_tok = train_bart_tokenizer(words, 300)  # only its special ids are used: 0..3 = <s> <pad> </s> <unk>
    q_tok, _ = dpr_tokenizers(train_wordpiece_vocab(words, 100))
    torch.manual_seed(seed)
    bart = BartForConditionalGeneration(BartConfig(
        vocab_size=vocab, d_model=d, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=heads,
        decoder_attention_heads=heads, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn, max_position_embeddings=1024,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2))
    question = DPRQuestionEncoder(DPRConfig(vocab_size=q_vocab, hidden_size=qd, num_hidden_layers=q_layers,
                                            num_attention_heads=q_heads, intermediate_size=q_ffn))
    ours = RagModel(question_encoder=DenseEncoder(question), question_tokenizer=q_tok,
                    generator=Generator(bart, bart_tok, max_source_length=MAX_COMBINED_LENGTH),
                    marginalization=marginalization, n_docs=n_docs)
    config = RagConfig.from_question_encoder_generator_configs(question.config, bart.config, n_docs=n_docs,
                                                               max_combined_length=MAX_COMBINED_LENGTH)
    theirs = MARGINALIZATIONS[marginalization](config, question_encoder=copy.deepcopy(question),
                                               generator=copy.deepcopy(bart))
    return ours.train(), theirs.train()


def _pad(rows: list[list[int]], pad: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists to the longest (or ``length``): ids (N, L), mask (N, L)."""
    width = length or max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    return ids, mask


def make_batch(words: list[int], n_docs: int, vocab: int, q_vocab: int, dim: int, rng: random.Random) -> dict:
    """One batch of realistic lengths (see the module docstring), as our forward takes it, plus transformers' view."""
    ids = lambda n, v: [rng.randrange(4, v) for _ in range(n)]  # noqa: E731 - random non-special ids
    contexts, questions, targets = [], [], []
    for w in words:
        question = ids(round(1.3 * w), vocab)
        questions.append([101] + ids(round(1.2 * w), q_vocab) + [102])
        for _ in range(n_docs):
            passage = ids(min(170, max(100, round(rng.gauss(130, 12)))), vocab)
            title = ids(round(1.3 * rng.randint(1, 6)), vocab)
            contexts.append(([0] + question + [5, 6] + title + [7] + passage)[: MAX_COMBINED_LENGTH - 1] + [2])
        targets.append([0] + ids(rng.randint(1, 5), vocab) + [2])
    batch, k = len(words), n_docs
    q_ids, q_mask = _pad(questions, 0)
    target, _ = _pad(targets, 1)  # (B, T)
    decoder_input_ids = torch.cat([torch.full((batch, 1), 2), target[:, :-1]], 1)  # (B, T) shifted right
    ctx_ids, ctx_mask = _pad(contexts, 1)  # (B*K, L): the batch's longest
    full_ids, full_mask = _pad(contexts, 1, MAX_COMBINED_LENGTH)  # (B*K, 300): as transformers' retriever pads
    vectors = torch.randn(batch, k, dim)  # (B, K, D) the index's stored vectors
    docs = RetrievedDocs(ids=torch.zeros(batch, k, dtype=torch.long), scores=torch.zeros(batch, k), vectors=vectors,
                         titles=[[""] * k] * batch, texts=[[""] * k] * batch)
    ours = {"question_input_ids": q_ids, "question_attention_mask": q_mask, "docs": docs,
            "context_input_ids": ctx_ids, "context_attention_mask": ctx_mask,
            "decoder_input_ids": decoder_input_ids, "target": target}
    labels = torch.cat([torch.full((batch, 1), 2), target], 1)  # (B, T+1): [start] + target, fed unshifted
    theirs = {"question_input_ids": q_ids, "question_attention_mask": q_mask, "vectors": vectors,
              "context_input_ids": full_ids, "context_attention_mask": full_mask, "labels": labels}
    return {"ours": ours, "theirs": theirs}


def their_loss(model: torch.nn.Module, batch: dict, n_docs: int) -> torch.Tensor:
    """transformers' loss as its RagModel computes it after retrieval: q . d with gradient, padded contexts."""
    q = model.question_encoder(batch["question_input_ids"], attention_mask=batch["question_attention_mask"])[0]
    scores = torch.bmm(q.unsqueeze(1), batch["vectors"].transpose(1, 2)).squeeze(1)  # (B, K)
    out = model(context_input_ids=batch["context_input_ids"], context_attention_mask=batch["context_attention_mask"],
                doc_scores=scores, labels=batch["labels"], n_docs=n_docs, reduce_loss=False)
    return out.loss.mean()


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, (torch.Tensor, RetrievedDocs)) else v for k, v in batch.items()}


def step_fn(model: torch.nn.Module, loss_of: Callable[[dict], torch.Tensor], batches: list[dict],
            device: torch.device, dtype: torch.dtype | None) -> Callable[[], float]:
    """One training step per call on the next batch (cycling): forward, backward, AdamW."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    position = [0]

    def step() -> float:
        batch = batches[position[0] % len(batches)]
        position[0] += 1
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_of(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def timed(fn: Callable[[], float], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


# Dense bf16 peak of the GPUs RAG is trained on (vendor data sheets, without sparsity), for model FLOPs utilization.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def step_flops(model: RagModel, batch: dict) -> float:
    """Model FLOPs of one training step on ``batch``: 6 x parameters x tokens (forward + backward), counting the
    real (unpadded) tokens each network reads: the generator's contexts and answers, the question encoder's
    questions. The same work for both implementations, so MFU compares what each makes of it."""
    generator = sum(p.numel() for p in model.generator.parameters())
    question = sum(p.numel() for p in model.question_encoder.parameters())
    k = batch["docs"].ids.shape[1]
    generator_tokens = int(batch["context_attention_mask"].sum()) + k * int((batch["target"] != 1).sum())
    return 6.0 * (generator * generator_tokens + question * int(batch["question_attention_mask"].sum()))


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak FLOP/s when known (PEAK_BF16_FLOPS), else None (no MFU on CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def peak_memory_gb(fn: Callable[[], float], device: torch.device) -> float | None:
    """Peak GPU memory (GB) of one more step of ``fn``; None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) / 1e9


def throughput_rows(label: str, size: str, seconds: dict[str, float], flops: float, batch: int,
                    tokens: float, peak: float | None, memory: dict[str, float | None]) -> list[dict]:
    """Questions/s, tokens/s, MFU and peak memory of ours and transformers (contract rows, no targets)."""
    peer_name = "transformers, same weights and batches"
    rows = []
    rates = (("questions/s", "q/s", lambda t: batch / t), ("context tokens/s", "tokens/s", lambda t: tokens / t))
    for measure, unit, of in rates:
        mine, peer = of(seconds["ours"]), of(seconds["transformers"])
        rows.append({"measure": f"{label}: {measure}", "size": size, "ours": round(mine, 2), "peer": round(peer, 2),
                     "peer_name": peer_name, "unit": unit, "ratio": round(mine / peer, 3), "target": None,
                     "met": None})
    if peak:
        mine, peer = (100 * flops / seconds[name] / peak for name in ("ours", "transformers"))
        rows.append({"measure": f"{label}: model FLOPs utilization", "size": size, "ours": round(mine, 2),
                     "peer": round(peer, 2), "peer_name": peer_name, "unit": "% of bf16 peak",
                     "ratio": round(mine / peer, 3), "target": None, "met": None})
    if memory["ours"] is not None:
        rows.append({"measure": f"{label}: peak GPU memory (ours / peer)", "size": size,
                     "ours": round(memory["ours"], 2), "peer": round(memory["transformers"], 2),
                     "peer_name": peer_name, "unit": "GB", "ratio": round(memory["ours"] / memory["transformers"], 3),
                     "target": None, "met": None})
    return rows


def check_same_loss(ours: RagModel, theirs: torch.nn.Module, batch: dict, k: int, device: torch.device) -> float:
    """|our loss - theirs| in eval mode (no dropout) on one batch: the padding must not change the loss."""
    ours.eval(), theirs.eval()
    with torch.no_grad():
        gap = abs(float(ours(**to_device(batch["ours"], device)).loss) - float(their_loss(theirs, to_device(
            batch["theirs"], device), k)))
    ours.train(), theirs.train()
    return gap


def main(argv: list[str] | None = None) -> None:
    """Time both steps interleaved for each marginalization; print a table; write the contract JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", metavar="PATH", help="write the benchmark-contract rows here")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: bf16 on cuda")
    parser.add_argument("--batch", type=int, default=8, help="questions per step")
    parser.add_argument("--n-docs", type=int, default=5)
    parser.add_argument("--runs", type=int, default=5, help="timed steps per case (interleaved), after 2 warm-ups")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--questions", default=None, help=f"NQ-Open JSONL for question lengths (default {QUESTIONS})")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if precision == "bf16" else None
    rng = random.Random(0)
    path = Path(args.questions) if args.questions else Path(__file__).resolve().parents[1] / QUESTIONS
    (_, _, _, _, vocab), (dim, _, _, _, q_vocab) = SIZES[args.size]
    words, source = question_words(path, rng, 8 * args.batch)
    batches = [make_batch(words[i: i + args.batch], args.n_docs, vocab, q_vocab, dim, rng)
               for i in range(0, len(words), args.batch)]
    lengths = [b["ours"]["context_input_ids"].shape[1] for b in batches]
    rows = []
    for marginalization in MARGINALIZATIONS:
        ours, theirs = build_pair(args.size, args.n_docs, marginalization, seed=0)
        ours, theirs = ours.to(device), theirs.to(device)
        gap = check_same_loss(ours, theirs, batches[0], args.n_docs, device)
        ours_batches = [to_device(b["ours"], device) for b in batches]
        their_batches = [to_device(b["theirs"], device) for b in batches]
        cases = {"ours": step_fn(ours, lambda b, m=ours: m(**b).loss, ours_batches, device, dtype),
                 "transformers": step_fn(theirs, lambda b, m=theirs: their_loss(m, b, args.n_docs), their_batches,
                                         device, dtype)}
        times: dict[str, list[float]] = {name: [] for name in cases}
        for fn in cases.values():  # warm-up
            fn(), fn()
        memory = {name: peak_memory_gb(fn, device) for name, fn in cases.items()}
        for _ in tqdm(range(args.runs), desc=f"rag-{marginalization} rounds", file=sys.stderr):
            for name, fn in cases.items():
                times[name].append(timed(fn, device))
        mine, peer = statistics.median(times["ours"]), statistics.median(times["transformers"])
        ratio = peer / mine
        print(f"rag-{marginalization}: ours {mine:.4f} s/step, transformers {peer:.4f} s/step, {ratio:.2f}x; "
              f"eval-mode loss gap on one batch {gap:.2e}")
        rows.append({"measure": f"training step rag-{marginalization} (fwd+bwd+AdamW, B={args.batch}, "
                                f"K={args.n_docs}, {precision})",
                     "size": args.size, "ours": round(mine, 4), "peer": round(peer, 4),
                     "peer_name": f"transformers Rag{marginalization.title()}ForGeneration, contexts padded to "
                                  f"{MAX_COMBINED_LENGTH}",
                     "unit": "s", "ratio": round(ratio, 3), "target": ">= 1.3x", "met": ratio >= 1.3})
        flops = statistics.mean(step_flops(ours, b) for b in ours_batches)
        tokens = statistics.mean(float(b["context_attention_mask"].sum()) for b in ours_batches)
        rows += throughput_rows(f"rag-{marginalization} step", args.size, {"ours": mine, "transformers": peer},
                                flops, args.batch, tokens, peak_flops(device), memory)
    print(f"size={args.size} device={device} {precision} threads={args.threads}; question lengths: {source}; "
          f"our context lengths per batch (padded to the longest): {lengths} vs {MAX_COMBINED_LENGTH}; "
          f"medians of {args.runs} interleaved steps after 2 warm-ups")
    write_rows(args, rows, machine())


if __name__ == "__main__":
    main()
