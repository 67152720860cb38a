"""Train from a checkout without installing: ``python scripts/train.py experiment=demo`` (= ``rag-train``).

Lightning's DDP launcher re-runs this very script once per extra rank, so the
work must stay behind the ``__main__`` guard.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.lit.train_cli import main  # noqa: E402

if __name__ == "__main__":
    main()
