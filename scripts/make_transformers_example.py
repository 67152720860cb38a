"""Write a tiny transformers RAG checkpoint pair and knowledge base offline (training/demo/transformers_example.py).

    python scripts/make_transformers_example.py --out runs/hf_example
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from training.demo.transformers_example import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
