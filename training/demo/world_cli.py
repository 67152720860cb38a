"""`rag-make-world`: write the synthetic demo world (v1 and the changed v2) to a directory."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rag_models.cli_errors import command
from rag_models.errors import InputError
from training.demo.world import write_world


def build_parser() -> argparse.ArgumentParser:
    """Command-line settings of the world generator."""
    parser = argparse.ArgumentParser(
        prog="rag-make-world",
        description="Generate the deterministic demo world: fictional towns as passages (DPR psgs_w100.tsv), "
        "NQ-Open style train/dev/test questions about disjoint towns, DPR training files with hard "
        "negatives, and a v2 world where some test towns' facts changed.",
    )
    parser.add_argument("--out", default="outputs/demo_world", help="output directory (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default: 0)")
    # dest names match write_world's keywords, which its error messages name.
    parser.add_argument("--entities", dest="n_entities", type=int, default=1200, metavar="N",
                        help="number of towns (default: 1200)")
    parser.add_argument("--dev", dest="n_dev", type=int, default=100, metavar="N",
                        help="towns held out for dev questions (default: 100)")
    parser.add_argument("--test", dest="n_test", type=int, default=200, metavar="N",
                        help="towns held out for test questions (default: 200)")
    parser.add_argument("--change-fraction", dest="change_fraction", type=float, default=0.4, metavar="F",
                        help="fraction of test towns whose facts change in v2 (default: 0.4)")
    parser.add_argument("--hard-negatives", dest="n_hard_negatives", type=int, default=3, metavar="N",
                        help="hard negatives per question in the DPR files (default: 3)")
    return parser


@command("rag-make-world")
def main(argv: list[str] | None = None) -> None:
    """Write the world and print where it went and what it holds; a bad setting: one line, exit status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise InputError("exists and is not a directory", path=args.out, fix="Pass --out a new or existing directory")
    # a bad setting is named as in write_world (e.g. n_entities for --entities)
    files = write_world(
        args.out,
        seed=args.seed,
        n_entities=args.n_entities,
        n_dev=args.n_dev,
        n_test=args.n_test,
        change_fraction=args.change_fraction,
        n_hard_negatives=args.n_hard_negatives,
    )
    summary = json.loads(files.summary.read_text(encoding="utf-8"))
    entities, questions, v2 = summary["entities"], summary["questions"], summary["v2"]
    print(f"demo world (seed {summary['seed']}) written to {files.root} in {time.perf_counter() - start:.1f} s")
    print(f"  towns     train {entities['train']}, dev {entities['dev']}, test {entities['test']} "
          f"(total {entities['total']}, one passage each)")
    print(f"  questions train {questions['train']}, dev {questions['dev']}, test {questions['test']}")
    print(f"  v2        {v2['changed_test_entities']} test towns changed ({v2['fraction_changed']:.0%}), "
          f"{v2['changed_test_questions']} test questions have new answers")
    for label, path in (
        ("v1 passages", files.v1_passages), ("train", files.train), ("dev", files.dev), ("test", files.test),
        ("DPR train", files.dpr_train), ("DPR dev", files.dpr_dev), ("v2 passages", files.v2_passages),
        ("v2 test", files.v2_test), ("v2 changed", files.v2_changed_test), ("summary", files.summary),
    ):
        print(f"  {label:<12}{path}")


if __name__ == "__main__":
    main()
