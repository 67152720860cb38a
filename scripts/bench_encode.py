"""Passage encoding throughput with a DPR context encoder: ours (the index builder's embed) vs transformers' directly.

    python scripts/bench_encode.py --size large --device cuda --json runs/bench/encode.json   # DPR-base, GPU fp16
    python scripts/bench_encode.py --size tiny --json /tmp/encode.json                        # a CPU smoke run

Random init at the chosen size (large = DPR-base: BERT-base, 768-d, no download); the same weights and the
same passages (a title and a 100-word text, DPR's ``[CLS] title [SEP] text [SEP]``, at most 256 tokens) go
through ours, `index.encode.make_embed_fn` (what ``rag-build-index`` runs: tokenization, fp16 autocast on
CUDA, vectors back to the host), and through the peer, transformers' ``DPRContextEncoder(...).pooler_output``
called on the same tokenizer output under the same autocast. The two run interleaved, best of ``--repeats``.
Writes the benchmark contract's JSON: passages/s, ratio = ours / peer (a rate: > 1 means ours is faster).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import DPRConfig, DPRContextEncoder  # noqa: E402

from index.encode import make_embed_fn  # noqa: E402
from rag_models.retriever import DenseEncoder  # noqa: E402
from rag_models.tokenization import dpr_tokenizers, train_wordpiece_vocab  # noqa: E402
from scripts.bench_contract import machine, write_rows  # noqa: E402

# encoder sizes, passages encoded per timing, passages per forward pass
SIZES = {"tiny": dict(hidden=32, layers=2, heads=2, ffn=64, passages=256, batch=64),
         "mid": dict(hidden=256, layers=4, heads=4, ffn=1024, passages=1024, batch=128),
         "large": dict(hidden=768, layers=12, heads=12, ffn=3072, passages=8192, batch=512)}
WORDS = ("the town lies on a river and was founded by a trader from the north who sold copper salt and wool at "
         "the market near the old bridge in the year of the great flood").split()


def passages(n: int) -> tuple[list[str], list[str]]:
    """n titles and 100-word texts, varied so that padding differs between batches."""
    titles = [f"Town {i}" for i in range(n)]
    texts = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(60 + i % 41)) for i in range(n)]
    return titles, texts


def timed(encode: Callable[[list[str], list[str]], np.ndarray], titles: list[str], texts: list[str], batch: int,
          device: torch.device) -> tuple[float, np.ndarray]:
    """Seconds to encode every passage in batches of ``batch``, and the (N, D) vectors."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    out = [encode(titles[i:i + batch], texts[i:i + batch]) for i in range(0, len(titles), batch)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started, np.concatenate(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None, help="write the contract's report here")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    size, device = SIZES[args.size], torch.device(args.device)
    titles, texts = passages(size["passages"])
    _, tokenizer = dpr_tokenizers(train_wordpiece_vocab(texts[:200] + titles[:200], 1000))
    torch.manual_seed(0)
    model = DPRContextEncoder(DPRConfig(vocab_size=30522, hidden_size=size["hidden"], num_hidden_layers=size["layers"],
                                        num_attention_heads=size["heads"], intermediate_size=size["ffn"])).eval()
    model = model.to(device)
    fp16 = device.type == "cuda"
    ours = make_embed_fn(DenseEncoder(model, pooling="pooler"), tokenizer, max_length=256, device=device, fp16=fp16)

    @torch.no_grad()
    def peer(batch_titles: list[str], batch_texts: list[str]) -> np.ndarray:
        enc = tokenizer(batch_titles, batch_texts, truncation=True, max_length=256, padding=True,
                        return_tensors="pt").to(device)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=fp16):
            pooled = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output  # (B, D)
        return pooled.float().cpu().numpy()

    timed(ours, titles[:size["batch"]], texts[:size["batch"]], size["batch"], device)  # warm-up (kernels, caches)
    timed(peer, titles[:size["batch"]], texts[:size["batch"]], size["batch"], device)
    best = {"ours": float("inf"), "peer": float("inf")}
    for _ in range(args.repeats):  # interleaved: contention hits both alike
        for name, fn in (("ours", ours), ("peer", peer)):
            seconds, vectors = timed(fn, titles, texts, size["batch"], device)
            best[name] = min(best[name], seconds)
            if name == "ours":
                ours_vectors = vectors
            else:
                assert np.allclose(ours_vectors, vectors, atol=1e-2 if fp16 else 1e-4), "different vectors"
    rates = {name: size["passages"] / seconds for name, seconds in best.items()}
    row = {"measure": f"passage encoding, DPR {size['hidden']}-d x {size['layers']} layers, "
                      f"{'fp16' if fp16 else 'fp32'}, batch {size['batch']}",
           "size": args.size, "ours": round(rates["ours"], 1), "peer": round(rates["peer"], 1),
           "peer_name": "transformers DPRContextEncoder", "unit": "passages/s",
           "ratio": round(rates["ours"] / rates["peer"], 3), "ratio_is": "ours/peer (rates)", "target": ">= 0.95x",
           "met": rates["ours"] >= 0.95 * rates["peer"]}
    print(json.dumps(row, indent=2))
    write_rows(args, [row], machine())


if __name__ == "__main__":
    main()
