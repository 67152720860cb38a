"""Score predictions against NQ-Open references; same as the `rag-score` console script."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from training.evaluation.score_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
