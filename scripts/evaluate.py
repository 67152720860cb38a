"""Evaluate a trained RagModel on a question file; same as the `rag-eval` console script (Hydra overrides)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from training.evaluation.eval_cli import main  # noqa: E402

if __name__ == "__main__":
    main()
