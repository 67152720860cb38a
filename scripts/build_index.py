"""Build a document index: passages file -> passage store -> encoded shards -> faiss index.

Same as the `rag-build-index` console command, for a checkout without `pip install -e .`:

    python scripts/build_index.py --passages psgs_w100.tsv \\
        --encoder facebook/dpr-ctx_encoder-single-nq-base --out indexes/wiki
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's packages, installed or not

from index.build_cli import main  # noqa: E402

if __name__ == "__main__":
    main()
