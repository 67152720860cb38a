"""Answer questions with a trained RagModel and an index (same as the `rag-ask` console script).

    python scripts/ask.py --checkpoint runs/demo-<time>/rag_sequence/model \\
        --index runs/demo-<time>/index "who founded Marrowick?"
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from decoding.ask_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
