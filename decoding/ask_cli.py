"""rag-ask: answer questions from the command line with a trained RagModel and an index.

    rag-ask --checkpoint runs/demo-<time>/rag_sequence/model --index runs/demo-<time>/index "who founded Marrowick?"
    echo "who founded Marrowick?" | rag-ask --checkpoint DIR --index DIR --strategy fast --n-docs 10

Questions come from the arguments, or else one per line from stdin (each answered as soon
as it is read, so it also works interactively). Each answer is printed with its score and
the titles of the passages that best explain it (highest p(z|x,y)), each followed by its
source file and page when the index was built from documents (rag-build-index --documents):

    A: Elsa Tarn    [score -0.412]
       from: Marrowick history (0.71) [notes/history.pdf#page=3], Towns (0.20) [notes/towns.md]

With ``--abstain-below X`` (a number, or the threshold.json of ``rag-eval ... abstain_coverage=C``) an answer
whose score (or top passage posterior, ``--abstain-on posterior``) is under X is printed as
``A: no confident answer (best guess: ...)``, still with its passages.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TextIO

import torch

from decoding.abstain import answer_confidence, read_threshold, transfer_warning
from decoding.answer import STRATEGIES, Answer, DecodingSettings, answer
from decoding.retrieve import RetrieverLike
from rag_models.cli_errors import at_least, command, positive_int
from rag_models.errors import InputError
from rag_models.rag import RagModel


def _parser() -> argparse.ArgumentParser:
    """The command line of rag-ask."""
    parser = argparse.ArgumentParser(prog="rag-ask",
                                     description="Answer questions with a RagModel and a passage index.")
    parser.add_argument("questions", nargs="*", help="questions to answer (default: one per line from stdin)")
    parser.add_argument("--checkpoint", required=True, help="a RagModel directory (rag-train's <run_dir>/model)")
    parser.add_argument("--index", required=True, help="an index directory written by rag-build-index")
    parser.add_argument("--strategy", choices=sorted(STRATEGIES), default=None,
                        help="decoder (default: the model's own, as the paper evaluates it: thorough with one beam "
                        "per doc for RAG-Sequence, greedy for RAG-Token)")
    parser.add_argument("--n-docs", type=positive_int, default=None,
                        help="passages read per answer (default: as trained)")
    parser.add_argument("--num-beams", type=positive_int, default=None,
                        help="beams (per doc for RAG-Sequence); default: 1, or 4 with --strategy beam")
    parser.add_argument("--max-length", type=at_least(2), default=40,
                        help="answer tokens, the decoder start token included")
    parser.add_argument("--num-answers", type=positive_int, default=1, help="n-best answers to print (<= --num-beams)")
    parser.add_argument("--top-docs", type=at_least(0), default=3, help="supporting passages shown per answer")
    parser.add_argument("--backend", choices=["faiss", "torch"], default="faiss", help="how the index is searched")
    # The index group's search knobs (configs/index/): IVF, HNSW and PQ indexes need them as in rag-eval.
    parser.add_argument("--nprobe", type=positive_int, default=None, help="IVF lists probed per query (IVF indexes)")
    parser.add_argument("--ef-search", type=positive_int, default=None, help="HNSW search width (HNSW indexes)")
    parser.add_argument("--refine", type=positive_int, default=None,
                        help="re-rank refine * n_docs candidates by exact q.d (PQ indexes)")
    parser.add_argument("--mmap", action="store_true", help="map index.faiss instead of reading it into RAM")
    parser.add_argument("--verify", action="store_true",
                        help="hash every file of the checkpoint and index (their sizes are always checked)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--abstain-below", default=None,
                        help="no confident answer under this confidence: a number, or rag-eval's threshold.json")
    parser.add_argument("--abstain-on", choices=["score", "posterior"], default=None,
                        help="the confidence: the answer's score (default) or its top passage posterior")
    return parser


def _support(candidate: Answer, top_docs: int, sources: Sequence[str]) -> str:
    """``title (p) [source], ...`` for the best-supporting passages; no brackets where the source is unknown."""
    shown = []
    for k in candidate.supporting_positions(top_docs):
        source = sources[k] if k < len(sources) else ""
        shown.append(f"{candidate.titles[k]} ({candidate.posteriors[k]:.2f})" + (f" [{source}]" if source else ""))
    return ", ".join(shown)


def is_confident(found: Answer, abstain: tuple[float, str] | None) -> bool:
    """Whether ``found`` is answered: no ``abstain`` (threshold, "score" | "posterior"), or confidence >= threshold."""
    return abstain is None or answer_confidence(found, abstain[1]) >= abstain[0]


def format_answer(question: str, found: Answer, top_docs: int, sources: Sequence[str] = (),
                  abstain: tuple[float, str] | None = None) -> str:
    """Question, answer(s) with scores, and the best-supporting passage titles.

    ``sources``: where each of ``found.doc_ids`` came from (e.g. ``notes/report.pdf#page=3``), shown in
    brackets after its title; empty (or "" for a passage) when unknown. ``abstain``: (threshold, confidence);
    an answer under it is shown as "no confident answer" with its best guess.
    """
    lines = [f"Q: {question}"]
    for rank, candidate in enumerate([found, *found.alternatives]):  # alternatives read the same docs
        label = "A:" if rank == 0 else f"{rank + 1}."
        support = _support(candidate, top_docs, sources)
        if rank == 0 and not is_confident(candidate, abstain):
            on = abstain[1] if abstain else "score"
            name = "top passage posterior" if on == "posterior" else "score"
            shown = f"{name} {answer_confidence(candidate, on):.3f}"
            lines.append(f"{label} no confident answer (best guess: {candidate.text}    [{shown}, under "
                         f"{abstain[0]:.3f}])")
        else:
            lines.append(f"{label} {candidate.text}    [score {candidate.score:.3f}]")
        if support:  # --top-docs 0: no passages shown
            lines.append(f"   from: {support}")
    return "\n".join(lines)


def _questions(given: list[str], stdin: TextIO) -> Iterator[str]:
    """The questions from argv, or else the non-empty lines of stdin as they arrive."""
    if given:
        yield from given
        return
    for line in stdin:
        if line.strip():
            yield line.strip()


def check_questions(questions: list[str]) -> None:
    """InputError for an empty or blank question given as an argument (it would retrieve and answer noise)."""
    for number, question in enumerate(questions, start=1):
        if not question.strip():
            raise InputError(f"question {number} of the command line is {'empty' if not question else 'blank'}",
                             setting="questions", fix="Ask a question in words, e.g. rag-ask ... \"who founded "
                             "Marrowick?\" (or pipe one question per line)")


def settings_from_args(args: argparse.Namespace) -> DecodingSettings:
    """The decoding settings the command line asks for."""
    return DecodingSettings(strategy=args.strategy, n_docs=args.n_docs, num_beams=args.num_beams,
                            max_length=args.max_length, num_return_sequences=args.num_answers)


def ask(questions: Iterable[str], retriever: RetrieverLike, model: RagModel, settings: DecodingSettings,
        top_docs: int, out: TextIO, sources: Callable[[list[int]], list[str]] | None = None,
        abstain: tuple[float, str] | None = None) -> int:
    """Answer and print each question as soon as it is read; returns how many were answered.

    A question longer than the model's length settings is cut to its beginning, with a warning on stderr.

    ``sources``: passage store rows -> where they came from (`PassageStore.sources`); None: titles only.
    ``abstain``: (threshold, "score" | "posterior"): answers under it print as "no confident answer".
    """
    count = 0
    for question in questions:
        cut = model.question_cuts([question])[0]
        if cut:  # answered from its beginning, as rag-eval and training do
            print(f"rag-ask: warning: question cut to fit {', '.join(map(str, cut))}, keeping its beginning: "
                  f"{question[:60]!r}...", file=sys.stderr, flush=True)
        found = answer([question], retriever, model, settings, progress=False)[0]
        shown = sources(found.doc_ids) if sources else ()
        print(format_answer(question, found, top_docs, shown, abstain), file=out, flush=True)
        count += 1
    return count


@command("rag-ask")
def main(argv: list[str] | None = None) -> int:
    """Entry point of rag-ask; a bad input: one line on stderr, exit status 2 (the message says what to do)."""
    args = _parser().parse_args(argv)
    check_questions(args.questions)
    # Imported here so that `rag-ask --help` answers without loading torch models or faiss.
    from index.build_cli import check_device
    from index.settings import IndexSettings
    from rag_models.checkpoint import load_rag_model
    from rag_models.file_manifest import request_verify

    check_device(args.device)
    request_verify(args.verify)
    if args.abstain_on is not None and args.abstain_below is None:
        raise InputError(f"--abstain-on {args.abstain_on} is given without a threshold", setting="--abstain-on",
                         fix="Add --abstain-below X (a number or rag-eval's threshold.json), or drop --abstain-on")
    abstain = None if args.abstain_below is None else read_threshold(args.abstain_below, args.abstain_on)
    model = load_rag_model(args.checkpoint).to(args.device).eval()
    index = IndexSettings(path=args.index, factory=None, backend=args.backend, nprobe=args.nprobe,
                          ef_search=args.ef_search, refine=args.refine, mmap=args.mmap)
    retriever = index.open()
    settings = settings_from_args(args).for_model(model)
    print(f"rag-ask: decoding: {settings.summary()}", file=sys.stderr)
    if abstain is not None:
        decoder = {"decoding_summary": settings.summary(), "strategy": settings.strategy, "n_docs": settings.n_docs}
        warning = transfer_warning(args.abstain_below, args.checkpoint, decoder)
        if warning:
            print(f"rag-ask: warning: {warning}", file=sys.stderr)
    ask(_questions(args.questions, sys.stdin), retriever, model, settings, args.top_docs,
        sys.stdout, sources=retriever.passages.sources, abstain=abstain)
    return 0


if __name__ == "__main__":
    sys.exit(main())
