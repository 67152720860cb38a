"""Shared test set-up: offline Hugging Face, small thread counts, paths to shared data, the tiny world.

The tiny demo world, its tokenizers, models and index (tests/tiny_setup.py) are
built once per test session and shared by every module that trains or evaluates
on them; tests write their own outputs under their own ``tmp_path``.
"""
from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable
from pathlib import Path

# Before transformers / datasets are imported anywhere: no hub look-ups, ever.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO_ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HOME", str(REPO_ROOT / ".hf_home"))

import pytest  # noqa: E402
import torch  # noqa: E402

from tiny_setup import TinySetup, make_tiny_setup, without_dropout  # noqa: E402

# Tiny models gain nothing from intra-op threads, and the suite shares 2 cores:
# one thread keeps timings steady and avoids oversubscription.
torch.set_num_threads(1)

# Real data lives beside a development checkout, never inside the project.
SHARED_DIR = REPO_ROOT.parent / "shared"
NQ_DEV = SHARED_DIR / "data" / "nq_open" / "NQ-open.dev.jsonl"


def write_passages_jsonl(passages: Iterable, path: Path) -> int:
    """Write a passages JSONL file (gzipped for .gz), one ``{"id", "title", "text"}`` a line; returns the count.

    The format `index.passage_files.iter_passages` reads; the library writes TSV only.
    """
    lines = [json.dumps({"id": p.id, "title": p.title, "text": p.text}, ensure_ascii=False) for p in passages]
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    path.write_bytes(gzip.compress(data, mtime=0) if path.name.endswith(".gz") else data)
    return len(lines)


def require_nq_dev() -> Path:
    """Path of the real NQ-Open dev file, or skip the test saying why."""
    if not NQ_DEV.is_file():
        pytest.skip("real NQ-Open dev file not found at ../shared/data/nq_open/ (absent in a user's clone)")
    return NQ_DEV


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory: pytest.TempPathFactory) -> TinySetup:
    """A 100-town world, tiny checkpoints trained on its text, and a Flat index of its v1 passages (dropout on)."""
    return make_tiny_setup(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_setup_no_dropout(tiny_setup: TinySetup, tmp_path_factory: pytest.TempPathFactory) -> TinySetup:
    """`tiny_setup` with checkpoints whose dropout is off: for tests that compare weights exactly."""
    return without_dropout(tiny_setup, tmp_path_factory.mktemp("tiny_no_dropout"))
