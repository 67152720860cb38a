"""Time one RAG training step at paper scale: BART-large generator + BERT-base DPR question encoder.

    python scripts/bench_train_step.py                      # GPU, bf16 autocast, 5 docs, batch 8
    python scripts/bench_train_step.py --device cpu --tiny  # a smoke run of the script itself

Random init (no download): the configs have BART-large's and DPR-base's sizes, and
inputs are random token ids of realistic lengths (question 24 tokens, generator input
256 = question + a 100-word passage, answer 12). Retrieval is not timed: the stored
doc vectors are random (B, K, 768), as an index would hand them over. Reports
questions/s of forward + backward + AdamW step, and the peak GPU memory.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import BartConfig, BartForConditionalGeneration, DPRConfig, DPRQuestionEncoder  # noqa: E402

from rag_models.docs import RetrievedDocs  # noqa: E402
from rag_models.generator import Generator  # noqa: E402
from rag_models.rag import RagModel  # noqa: E402
from rag_models.retriever import DenseEncoder  # noqa: E402
from rag_models.tokenization import dpr_tokenizers, train_bart_tokenizer, train_wordpiece_vocab  # noqa: E402

LARGE = {"bart": dict(d_model=1024, layers=12, heads=16, ffn=4096, vocab=50265),
         "bert": dict(hidden=768, layers=12, heads=12, ffn=3072, vocab=30522)}
TINY = {"bart": dict(d_model=64, layers=2, heads=4, ffn=128, vocab=1000),
        "bert": dict(hidden=32, layers=2, heads=2, ffn=64, vocab=1000)}


def build_model(sizes: dict, n_docs: int) -> RagModel:
    """A random-init RagModel of the given sizes (tokenizers only supply special-token ids)."""
    words = ["the town lies on a river", "who founded the town"]
    bart_tok = train_bart_tokenizer(words, 300)  # ids 0..3 = <s> <pad> </s> <unk>, as BART's
    q_tok, _ = dpr_tokenizers(train_wordpiece_vocab(words, 100))
    b, e = sizes["bart"], sizes["bert"]
    bart = BartForConditionalGeneration(BartConfig(
        vocab_size=b["vocab"], d_model=b["d_model"], encoder_layers=b["layers"], decoder_layers=b["layers"],
        encoder_attention_heads=b["heads"], decoder_attention_heads=b["heads"], encoder_ffn_dim=b["ffn"],
        decoder_ffn_dim=b["ffn"], max_position_embeddings=1024, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2, forced_eos_token_id=2))
    bert = DPRQuestionEncoder(DPRConfig(vocab_size=e["vocab"], hidden_size=e["hidden"], num_hidden_layers=e["layers"],
                                        num_attention_heads=e["heads"], intermediate_size=e["ffn"]))
    return RagModel(question_encoder=DenseEncoder(bert.train()), question_tokenizer=q_tok,
                    generator=Generator(bart.train(), bart_tok, max_source_length=512), n_docs=n_docs,
                    label_smoothing=0.1)


def random_batch(model: RagModel, batch: int, n_docs: int, device: torch.device) -> dict:
    """Inputs of one step: question ids (B, 24), docs (B, K), generator ids (B*K, 256), targets (B, 12)."""
    q_vocab = model.question_encoder.model.config.vocab_size
    g_vocab = model.generator.model.config.vocab_size
    dim = model.question_encoder.dim

    def ids(rows: int, length: int, vocab: int) -> torch.Tensor:
        """Random token ids (rows, length), clear of the first 4 special ids."""
        return torch.randint(4, vocab, (rows, length), device=device)

    target = ids(batch, 12, g_vocab)
    target[:, 0], target[:, -1] = 0, 2  # <s> ... </s>
    decoder_input_ids = torch.cat([torch.full((batch, 1), 2, device=device), target[:, :-1]], dim=1)  # (B, T)
    docs = RetrievedDocs(ids=torch.zeros(batch, n_docs, dtype=torch.long, device=device),
                         scores=torch.zeros(batch, n_docs, device=device),
                         vectors=torch.randn(batch, n_docs, dim, device=device),
                         titles=[[""] * n_docs] * batch, texts=[[""] * n_docs] * batch)
    return {"question_input_ids": ids(batch, 24, q_vocab),
            "question_attention_mask": torch.ones(batch, 24, dtype=torch.long, device=device),
            "docs": docs, "context_input_ids": ids(batch * n_docs, 256, g_vocab),
            "context_attention_mask": torch.ones(batch * n_docs, 256, dtype=torch.long, device=device),
            "decoder_input_ids": decoder_input_ids, "target": target}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--docs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: check the script, not the hardware")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(TINY if args.tiny else LARGE, args.docs).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-5)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
    scaler = torch.amp.GradScaler(enabled=args.precision == "fp16" and device.type == "cuda")
    batch = random_batch(model, args.batch, args.docs, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    timings = []
    for step in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=args.precision != "fp32"):
            loss = model(**batch).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if step >= args.warmup:
            timings.append(time.perf_counter() - start)
    seconds = sum(timings) / len(timings)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "sizes": "tiny" if args.tiny else "bart-large + dpr-base",
        "parameters_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "precision": args.precision, "batch": args.batch, "docs": args.docs,
        "seconds_per_step": round(seconds, 4), "questions_per_s": round(args.batch / seconds, 2),
        "peak_gpu_memory_GiB": round(torch.cuda.max_memory_allocated(device) / 2**30,
                                     2) if device.type == "cuda" else None,
        "final_loss": round(float(loss.detach()), 4),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
