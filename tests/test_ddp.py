"""Two-process CPU DDP (gloo) trains exactly like one process on the same global batch.

The DDP run goes through the real entry point (`scripts/train.py`, Hydra, Lightning's
launcher re-running the script for rank 1) with `index.sharded=true`: each rank holds
half of the passages and retrieval is a collective. One process with batch 8 and two
ranks with batch 4 each must end with the same weights (dropout off, 3 steps).
Plain SGD: Adam divides by the root of tiny second moments, which turns float
rounding (each rank pads its own batch) into visible differences (measured 2e-5
after 3 Adam steps); SGD keeps the comparison at float precision.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from tiny_setup import TinySetup, tiny_overrides
from training.config import compose
from training.lit.train_cli import train

REPO = Path(__file__).resolve().parents[1]
COMMON = ["experiment=demo", "trainer.max_steps=3", "trainer.limit_val_batches=0", "test=false", "logger=none",
          "callbacks.lr_monitor=null", "callbacks.samples=null", "module.warmup_steps=1", "trainer.deterministic=true",
          "module.optimizer._target_=torch.optim.SGD", "~module.optimizer.betas", "~module.optimizer.eps",
          "module.lr_question_encoder=0.05", "module.lr_generator=0.05"]


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {f"{part}.{k}": v for part in ("question_encoder", "generator")
            for k, v in load_file(str(model_dir / part / "model.safetensors")).items()}


def test_two_rank_ddp_matches_one_process_on_the_global_batch(tiny_setup_no_dropout: TinySetup, tmp_path: Path):
    single = train(compose([*COMMON, *tiny_overrides(tiny_setup_no_dropout, tmp_path / "single"), "data.batch_size=8"]))

    ddp_dir = tmp_path / "ddp"
    overrides = [*COMMON, *tiny_overrides(tiny_setup_no_dropout, ddp_dir), "data.batch_size=4", "trainer.strategy=ddp",
                 "trainer.devices=2", "index.sharded=true", f"hydra.run.dir={ddp_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PL_DISABLE_FORK": "1"}
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), *overrides], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    expected, got = _weights(single.export_dir), _weights(ddp_dir / "model")
    assert expected.keys() == got.keys()
    initial = _weights_of_start(tiny_setup_no_dropout)
    moved = max((expected[k] - initial[k]).abs().max().item() for k in expected)
    assert moved > 1e-3  # the runs did train: equality is not that of two untouched models
    worst = max((expected[k] - got[k]).abs().max().item() for k in expected)
    assert worst < 1e-6, f"largest weight difference {worst} (largest update {moved})"


def test_gradient_accumulation_matches_the_larger_batch(tiny_setup_no_dropout: TinySetup, tmp_path: Path):
    """Two accumulated batches of 4 make the same update as one batch of 8 (same 8 questions, same order)."""
    big = train(compose([*COMMON, *tiny_overrides(tiny_setup_no_dropout, tmp_path / "big"), "data.batch_size=8"]))
    accumulated = train(compose([*COMMON, *tiny_overrides(tiny_setup_no_dropout, tmp_path / "acc"), "data.batch_size=4",
                                        "trainer.accumulate_grad_batches=2"]))
    expected, got = _weights(big.export_dir), _weights(accumulated.export_dir)
    worst = max((expected[k] - got[k]).abs().max().item() for k in expected)
    assert worst < 1e-6, f"largest weight difference {worst}"


def _weights_of_start(tiny_setup_no_dropout: TinySetup) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {**{f"question_encoder.{k}": v for k,
               v in load_file(str(tiny_setup_no_dropout.models.question_encoder / "model.safetensors")).items()},
            **{f"generator.{k}": v for k,
               v in load_file(str(tiny_setup_no_dropout.models.generator / "model.safetensors")).items()}}
