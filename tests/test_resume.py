"""A run killed mid-epoch and resumed from its last checkpoint ends with the weights of an uninterrupted run."""
from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from rag_models.errors import InputError
from tiny_setup import TinySetup, tiny_overrides
from training.config import compose
from training.data.sampler import ResumableSampler
from training.lit.checkpoint_io import atomic_torch_save, safe_torch_load
from training.lit.resume import capture_rng_state, restore_rng_state
from training.lit.train_cli import train


class Killed(RuntimeError):
    """Stands for SIGKILL: the process stops between two steps, nothing is saved on the way out."""


class KillAtStep(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Killed(f"killed before step {self.step + 1}")


def _config(tiny_setup: TinySetup, run_dir: Path, *extra: str):
    # 358 training questions / batch 8 = 45 batches per epoch: steps 1-7 are all mid-epoch.
    return compose([
        "experiment=demo", *tiny_overrides(tiny_setup, run_dir), "trainer.deterministic=true", "trainer.max_steps=7",
        "data.batch_size=8", "trainer.val_check_interval=3", "data.max_val_examples=4", "test=false",
        "callbacks.checkpoint_last.every_n_train_steps=2", "module.warmup_steps=2", "logger=none",
        "callbacks.lr_monitor=null", *extra,
    ])


def _weights(module_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    found = {}
    for part in ("question_encoder", "generator"):
        for key, value in load_file(str(module_dir / part / "model.safetensors")).items():
            found[f"{part}.{key}"] = value
    return found


def test_killed_run_resumes_to_identical_weights(tiny_setup: TinySetup, tmp_path: Path):
    straight = train(_config(tiny_setup, tmp_path / "straight"))

    with pytest.raises(Killed):
        train(_config(tiny_setup, tmp_path / "killed"), extra_callbacks=[KillAtStep(5)])
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert safe_torch_load(last)["global_step"] == 4  # the checkpoint of step 4; step 5 is lost
    assert not list(last.parent.glob(".*tmp*"))  # no temporary file left behind
    resumed = train(_config(tiny_setup, tmp_path / "killed", "ckpt_path=last"))

    expected, got = _weights(straight.export_dir), _weights(resumed.export_dir)
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_rng_state_round_trip_decides_dropout_masks():
    """Why the RNG is saved: dropout masks come from it, and restoring it replays them."""
    torch.manual_seed(0)
    state = capture_rng_state()
    a = torch.nn.functional.dropout(torch.ones(100), 0.5)
    b = torch.nn.functional.dropout(torch.ones(100), 0.5)
    restore_rng_state(state)
    assert torch.equal(torch.nn.functional.dropout(torch.ones(100), 0.5), a) and not torch.equal(a, b)


def test_sampler_ranks_partition_the_global_batch_and_resume():
    single = ResumableSampler(10, seed=3)
    ranks = [ResumableSampler(10, seed=3, rank=r, world_size=2) for r in range(2)]
    order = list(single)
    assert sorted(order) == list(range(10)) and order != list(range(10))
    per_rank = [list(s) for s in ranks]
    # Step i of rank r with batch 2 holds global positions 4i+r, 4i+r+2: the single process's batch of 4.
    for step in range(2):
        global_batch = set(order[4 * step: 4 * step + 4])
        assert set(per_rank[0][2 * step: 2 * step + 2]) | set(per_rank[1][2 * step: 2 * step + 2]) == global_batch
    single.set_epoch(1)
    assert list(single) != order  # a new order each epoch
    single.resume_at(0, 4)
    single.set_epoch(0)
    assert list(single) == order[4:] and list(single) == order  # the skip is used once
    uneven = [ResumableSampler(5, rank=r, world_size=2) for r in range(2)]
    assert len(uneven[0]) == len(uneven[1]) == 3 and len(list(uneven[1])) == 3  # padded: equal steps per rank


def test_checkpoint_files_are_atomic_and_loaded_safely(tmp_path: Path):
    path = atomic_torch_save({"w": torch.arange(3)}, tmp_path / "a.ckpt")
    assert torch.equal(safe_torch_load(path)["w"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["a.ckpt"]
    path.write_bytes(path.read_bytes()[:20])  # what a non-atomic writer leaves after a kill
    with pytest.raises(InputError, match="a.ckpt"):
        safe_torch_load(path)

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"x": Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(InputError):
        safe_torch_load(tmp_path / "evil.ckpt")  # weights_only refuses arbitrary objects


class StepMetric(pl.Callback):
    """Logs the global step at every validation: a monitored value that improves each time (best is saved)."""

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        pl_module.log("check/step", float(trainer.global_step))


def test_resumed_run_overwrites_best_ckpt(tiny_setup: TinySetup, tmp_path: Path):
    """Lightning's version counter would write best-v1.ckpt beside the best.ckpt of the first run."""
    options = ("trainer.val_check_interval=2", "monitor=check/step", "monitor_mode=max")
    train(_config(tiny_setup, tmp_path, "trainer.max_steps=2", *options), extra_callbacks=[StepMetric()])
    checkpoints = tmp_path / "checkpoints"
    assert safe_torch_load(checkpoints / "best.ckpt")["global_step"] == 2
    train(_config(tiny_setup, tmp_path, "trainer.max_steps=4", "ckpt_path=last", *options),
          extra_callbacks=[StepMetric()])
    assert sorted(p.name for p in checkpoints.glob("best*.ckpt")) == ["best.ckpt"]
    assert safe_torch_load(checkpoints / "best.ckpt")["global_step"] == 4  # the later, better one
