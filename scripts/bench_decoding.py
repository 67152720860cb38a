"""Time our RAG decoders against transformers' on the same model and inputs, side by side.

Random-init models (no download): ``--size tiny`` is the demo's BART (d_model 128,
2+2 layers, vocab 1000, 5 docs), ``mid`` has d_model 256, 4+4 layers, vocab 8000 and
10 docs, ``large`` has BART-large's dimensions (vocab 50265, 10 docs; use a GPU).
Every run decodes the same B questions x K docs with W beams and exactly
``--new-tokens`` new tokens (min_length = max_length, so no hypothesis ends early).
Cases run round-robin (a load change on a shared machine hits all alike); the table
gives median wall seconds and median CPU seconds of this process (on a busy CPU the
latter is the steadier figure; on a GPU it is host time only).

    python scripts/bench_decoding.py                      # CPU, tiny, prints a table
    python scripts/bench_decoding.py --size mid --json out/decoding.json
    python scripts/bench_decoding.py --size mid --n-docs 50 --batch 2 --runs 3
    python scripts/bench_decoding.py --size large --device cuda
"""
from __future__ import annotations

import argparse
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

from decoding.rag_sequence import rag_sequence_generate  # noqa: E402
from decoding.rag_token import rag_token_generate  # noqa: E402
from scripts.bench_contract import machine, write_rows  # noqa: E402

# name -> BartConfig sizes; init_std 0.06 keeps a random tiny BART's outputs from collapsing
SIZES: dict[str, dict[str, int | float]] = {
    "tiny": dict(vocab_size=1000, d_model=128, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256, init_std=0.06),
    "mid": dict(vocab_size=8000, d_model=256, encoder_layers=4, decoder_layers=4, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=1024, decoder_ffn_dim=1024, init_std=0.06),
    "large": dict(vocab_size=50265, d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
                       decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, init_std=0.02),
}


def build_models(size: str, n_docs: int,
                 device: str) -> tuple[BartForConditionalGeneration, RagTokenForGeneration, RagSequenceForGeneration]:
    """One random BART shared by transformers' two RAG models (the question encoder is unused)."""
    torch.manual_seed(0)
    bart = BartForConditionalGeneration(
        BartConfig(**SIZES[size], max_position_embeddings=1024, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                   decoder_start_token_id=2, forced_eos_token_id=2)
    ).eval()
    question = DPRQuestionEncoder(DPRConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=64)).eval()
    config = RagConfig.from_question_encoder_generator_configs(question.config, bart.config, n_docs=n_docs)
    rag_token = RagTokenForGeneration(config, question_encoder=question, generator=bart).eval().to(device)
    rag_sequence = RagSequenceForGeneration(config, question_encoder=question, generator=bart).eval().to(device)
    return bart.to(device), rag_token, rag_sequence


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_interleaved(cases: dict[str, Callable[[], torch.Tensor]], runs: int, device: str) -> dict[str, dict]:
    """Each case once as warm-up, then `runs` rounds of every case in turn.

    Round-robin, so that a change in machine load (the CPU may be shared) hits every case
    alike. Per case: median wall seconds, median CPU seconds of this process, last output.
    """
    results = {name: {"wall": [], "cpu": [], "out": fn()} for name, fn in cases.items()}
    for _ in tqdm(range(runs), desc="rounds", file=sys.stderr):
        for name, fn in cases.items():
            _sync(device)
            wall, cpu = time.perf_counter(), time.process_time()
            results[name]["out"] = fn()
            _sync(device)
            results[name]["wall"].append(time.perf_counter() - wall)
            results[name]["cpu"].append(time.process_time() - cpu)
    return {name: {"wall": statistics.median(r["wall"]), "cpu": statistics.median(r["cpu"]), "out": r["out"]}
            for name, r in results.items()}


def print_table(results: dict[str, dict]) -> None:
    """The medians and the three ratios the targets are about."""
    print(f"{'case':<48}{'wall s':>9}{'cpu s':>9}")
    for name, r in results.items():
        print(f"{name:<48}{r['wall']:>9.4f}{r['cpu']:>9.4f}")
    for label, slow, fast, _ in RATIOS:
        wall = results[slow]["wall"] / results[fast]["wall"]
        cpu = results[slow]["cpu"] / results[fast]["cpu"]
        print(f"{label:<48}{wall:>8.2f}x{cpu:>8.2f}x")


# size -> docs per question when --n-docs is not given
DEFAULT_DOCS = {"tiny": 5, "mid": 10, "large": 10}
# (measure, slow case, fast case, target on slow/fast); the first two compare with transformers, the last
# our thorough with our fast (there the ratio is ours/peer, lower is better)
RATIOS = [
    ("rag-token beam: transformers / ours", "rag-token beam / transformers", "rag-token beam / ours", None),
    ("rag-seq thorough: transformers / ours", "rag-seq thorough / transformers", "rag-seq thorough / ours", 3.0),
    ("rag-seq: our thorough / our fast", "rag-seq thorough / ours", "rag-seq fast / ours", 2.0),
]


def contract_rows(results: dict[str, dict], size: str, k: int) -> list[dict]:
    """The benchmark-contract rows: median wall seconds, ratio peer/ours (ours/peer for thorough/fast)."""
    rows = []
    for label, slow, fast, target in RATIOS:
        against_fast = slow.endswith("/ ours")  # our thorough against our fast: lower is better
        ours, peer = (results[slow], results[fast]) if against_fast else (results[fast], results[slow])
        ratio = ours["wall"] / peer["wall"] if against_fast else peer["wall"] / ours["wall"]
        met = None if target is None else (ratio <= target if against_fast else ratio >= target)
        rows.append({"measure": f"{label} ({k} docs)" + (" [ratio = ours/peer]" if against_fast else ""),
                     "size": size, "ours": round(ours["wall"], 4), "peer": round(peer["wall"], 4),
                     "peer_name": fast if against_fast else slow, "unit": "s", "ratio": round(ratio, 3),
                     "target": None if target is None else (f"<= {target}x" if against_fast else f">= {target}x"),
                     "met": met})
    return rows


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print a table of medians and speed ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", metavar="PATH", help="write the benchmark-contract rows here")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--n-docs", type=int, default=None, help="docs per question (default: 5 tiny, 10 mid/large)")
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--source-length", type=int, default=64, help="tokens per (question, doc) context")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()  # transformers' RAG-Sequence warns that it drops the attention mask

    k = args.n_docs or DEFAULT_DOCS[args.size]
    bart, hf_token, hf_sequence = build_models(args.size, k, args.device)
    b = args.batch
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, bart.config.vocab_size, (b * k, args.source_length), generator=gen)  # (B*K, L), no padding
    ids[:, 0], ids[:, -1] = 0, 2
    ids = ids.to(args.device)
    mask = torch.ones_like(ids)
    scores = (torch.randn(b, k, generator=gen) * 2).to(args.device)  # (B, K)
    length = args.new_tokens + 1  # + decoder start token
    search = dict(n_docs=k, num_beams=args.num_beams, max_length=length, min_length=length)
    inputs = dict(context_input_ids=ids, context_attention_mask=mask, doc_scores=scores)

    cases = {
        "rag-token beam / ours": lambda: rag_token_generate(bart, ids, mask, scores, **search).sequences,
        "rag-token beam / transformers": lambda: hf_token.generate(**inputs, **search),
        "rag-seq thorough / ours": lambda: rag_sequence_generate(bart, ids, mask, scores, mode="thorough",
                                                                 **search).sequences,
        "rag-seq thorough / transformers": lambda: hf_sequence.generate(**inputs, **search),
        "rag-seq fast / ours": lambda: rag_sequence_generate(bart, ids, mask, scores, mode="fast", **search).sequences,
        "bare generator beam (B*K rows) / transformers": lambda: bart.generate(
            ids, attention_mask=mask, num_beams=args.num_beams, max_length=length, min_length=length),
    }
    with torch.no_grad():
        results = run_interleaved(cases, args.runs, args.device)
    print(f"\nsize={args.size} device={args.device} threads={args.threads} B={b} K={k} beams={args.num_beams} "
          f"new_tokens={args.new_tokens} L={args.source_length}; "
          f"medians of {args.runs} interleaved runs after a warm-up")
    print_table(results)
    same_token = torch.equal(results["rag-token beam / ours"]["out"], results["rag-token beam / transformers"]["out"])
    same_seq = torch.equal(results["rag-seq thorough / ours"]["out"], results["rag-seq thorough / transformers"]["out"])
    print(f"identical token ids: rag-token beam {same_token}, rag-seq thorough {same_seq}")
    write_rows(args, contract_rows(results, args.size, k), machine())


if __name__ == "__main__":
    main()
