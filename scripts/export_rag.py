"""Convert between transformers RAG checkpoints and RagModel directories (same as the `rag-export` console script).

    python scripts/export_rag.py SOURCE --out DIR
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rag_models.convert_cli import export_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(export_main())
