"""`rag-import` and `rag-export`: transformers RAG checkpoints <-> our RagModel directories.

    rag-import facebook/rag-sequence-nq --out models/rag-sequence-nq      # hub name (needs network)
    rag-import path/to/saved_rag_dir --out models/mine [--marginalization token]
    rag-export runs/nq/<time>/model --out hf/my-rag                       # loads in transformers
    rag-export-index runs/nq/<time>/index --out hf/kb                      # (index/dataset_export.py)
    rag-export runs/nq/<time>/model --out hf/my-rag --knowledge hf/kb     # RagRetriever.from_pretrained works

See rag_models/transformers_rag.py for what is mapped and what is refused.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from rag_models.cli_errors import command
from rag_models.file_manifest import request_verify
from rag_models.transformers_rag import PROVENANCE_NAME, export_transformers_rag, import_transformers_rag


def _import_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rag-import", description="Convert a transformers RAG checkpoint "
                                     "(RagSequenceForGeneration / RagTokenForGeneration / RagModel) to a RagModel "
                                     "directory that rag-eval, rag-ask and rag-train (init_from=) read.")
    parser.add_argument("source", help="hub name (facebook/rag-sequence-nq) or a local save_pretrained directory")
    parser.add_argument("--out", required=True, help="the RagModel directory to write")
    parser.add_argument("--marginalization", choices=["sequence", "token"], default=None,
                        help="only for a bare RagModel checkpoint (the architecture decides otherwise)")
    return parser


def _export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rag-export", description="Write a RagModel directory as a transformers RAG "
                                     "checkpoint (RagSequenceForGeneration / RagTokenForGeneration + RagTokenizer).")
    parser.add_argument("model_dir", help="a RagModel directory (rag-train's <run_dir>/model or rag-import's --out)")
    parser.add_argument("--out", required=True, help="the transformers directory to write")
    parser.add_argument("--allow-input-format-change", action="store_true",
                        help="export a model trained with input_format question_first although transformers' "
                        "RagRetriever will feed it 'title / text // question'")
    parser.add_argument("--knowledge", default=None, help="a directory written by rag-export-index: the exported "
                        "config points RagRetriever(index_name='custom') at it")
    parser.add_argument("--verify", action="store_true",
                        help="hash every file of model_dir first (their sizes are always checked)")
    return parser


@command("rag-import")
def import_main(argv: list[str] | None = None) -> None:
    """Console entry point of ``rag-import``."""
    args = _import_parser().parse_args(argv)

    def action() -> None:
        out = import_transformers_rag(args.source, args.out, marginalization=args.marginalization)
        settings = json.loads((out / "rag_config.json").read_text())
        provenance = json.loads((out / PROVENANCE_NAME).read_text())
        print(f"rag-import: {args.source} -> {out}: RAG-{settings['marginalization'].capitalize()}, "
              f"n_docs {settings['n_docs']}, input_format transformers, max_source_length "
              f"{settings['max_source_length']}")
        print(f"rag-import: transformers would decode with {provenance['generation']} "
              "(rag-eval decodes with its decoding group: set decoding.num_beams / decoding.max_length to match)")
        index = provenance["index"]
        published = (f"its own knowledge base {index.get('passages_path')} (+ {index.get('index_path')})"
                     if index.get("index_name") == "custom" else f"index {index.get('dataset')} "
                     f"({index.get('index_name')})")
        print(f"rag-import: published with {published}; build ours with rag-build-index --from-dataset "
              "(README: Reproduce Lewis et al. with the released checkpoints)")

    action()


@command("rag-export")
def export_main(argv: list[str] | None = None) -> None:
    """Console entry point of ``rag-export``."""
    args = _export_parser().parse_args(argv)

    def action() -> None:
        request_verify(args.verify)
        out = export_transformers_rag(Path(args.model_dir), args.out,
                                      allow_input_format_change=args.allow_input_format_change,
                                      knowledge=args.knowledge)
        print(f"rag-export: {args.model_dir} -> {out} (RagTokenizer + RagSequence/TokenForGeneration.from_pretrained)")

    action()
