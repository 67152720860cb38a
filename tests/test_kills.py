"""``kill -9`` at chosen moments of rag-build-index, rag-train and rag-eval: nothing looks complete, no process
of the run survives or writes after the kill, and the rerun removes the leftovers and gives the uninterrupted
result (vectors, index, passage store; weights and best checkpoint; predictions and metrics).

Each kill runs the real command in its own process group under `kill_harness.kill_at`. The fast suite keeps
the unit checks (sweep, a worker killed with its parent), one in-process best-checkpoint kill and one real
kill per command (store write, metrics write, best.ckpt write); the other moments are in the slow part
(``KILL_REPORT=kills.jsonl pytest -m slow tests/test_kills.py`` also writes one line of figures per kill).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from kill_harness import Moment, Outcome, kill_at, python_module, run, temporaries
from kill_hooks.step_metric import StepMetric

from index.faiss_index import DenseIndex
from index.passages import PassageStore
from rag_models.leftovers import process_alive, stale_temporaries, sweep_stale
from tiny_setup import TinySetup, save_untrained_rag, tiny_overrides
from training.config import compose
from training.evaluation.eval_cli import evaluate
from training.lit.checkpoint_io import AtomicCheckpointIO, safe_torch_load
from training.lit.train_cli import train

# --- the sweep of killed writers' temporaries ----------------------------------------------------------


def _dead_pid() -> int:
    """The PID of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_sweep_removes_dead_writers_temporaries_and_reports_the_bytes(tmp_path: Path, capsys):
    dead = _dead_pid()
    (tmp_path / f".last.ckpt.tmp-{dead}").write_bytes(b"x" * 1500)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / f".shard_00001.npy.tmp-{dead}").write_bytes(b"y" * 500)
    stale_dir = tmp_path / f".index.tmp-{dead}-a1b2c3"
    stale_dir.mkdir()
    (stale_dir / "vectors.npy").write_bytes(b"z" * 1000)
    live = tmp_path / f".metrics.json.tmp-{os.getpid()}"  # this process is alive: its temporary stays
    live.write_text("{}")
    (tmp_path / "last.ckpt").write_bytes(b"kept")
    assert not process_alive(dead) and process_alive(os.getpid())

    sweep = sweep_stale(tmp_path, command="rag-train")
    assert sweep.freed_bytes == 3000 and len(sweep.removed) == 3
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["last.ckpt", "shards", live.name])
    err = capsys.readouterr().err
    assert "rag-train: note: removed 3 temporaries of killed runs" in err and "3.0 kB freed" in err
    assert sweep_stale(tmp_path, command="rag-train").removed == [] and capsys.readouterr().err == ""


def test_sweep_puts_back_a_directory_moved_aside_by_a_killed_replace(tmp_path: Path):
    dead = _dead_pid()
    old = tmp_path / f".index.old-{dead}-xyz"  # publish_directory moved index/ aside, then was killed
    old.mkdir()
    (old / "manifest.json").write_text("{}")
    sweep = sweep_stale(tmp_path, command="rag-build-index")
    assert sweep.restored == [tmp_path / "index"] and (tmp_path / "index" / "manifest.json").is_file()
    (tmp_path / f".index.old-{dead}-abc").mkdir()  # superseded: index/ exists, the aside copy goes
    assert [p.name for p in stale_temporaries(tmp_path)] == [f".index.old-{dead}-abc"]
    assert sweep_stale(tmp_path, command="rag-build-index").removed == [tmp_path / f".index.old-{dead}-abc"]


WORKER = """
import os, sys, time
from rag_models.lifeline import die_with_parent
die_with_parent(int(sys.argv[1]))
print(os.getpid(), flush=True)
time.sleep(60)
"""
PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(__import__("os").getpid())], stdout=sys.stdout)
time.sleep(60)
"""


def test_a_worker_dies_with_its_parent_killed_by_sigkill(tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, WORKER], stdout=subprocess.PIPE, text=True, env=env,
                              start_new_session=True)
    try:
        worker = int(parent.stdout.readline())
        assert process_alive(worker)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 5
        while process_alive(worker) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not process_alive(worker), "the worker outlived its parent"
    finally:
        os.killpg(parent.pid, signal.SIGKILL)


# --- rag-train: a kill while best.ckpt is written must not lose that validation's best checkpoint ---------


class Killed(RuntimeError):
    """Stands for SIGKILL in-process: raised instead of publishing a checkpoint; nothing else runs after it."""


def _train_config(tiny_setup: TinySetup, run_dir: Path, *extra: str):
    # 45 batches an epoch: every step is mid-epoch; validations at 3 and 6, last.ckpt at 3 and 6 too.
    return compose([
        "experiment=demo", *tiny_overrides(tiny_setup, run_dir), "trainer.deterministic=true", "trainer.max_steps=7",
        "data.batch_size=8", "trainer.val_check_interval=3", "data.max_val_examples=4", "test=false",
        "callbacks.checkpoint_last.every_n_train_steps=3", "module.warmup_steps=2", "logger=none",
        "callbacks.lr_monitor=null", "callbacks.samples=null", "monitor=check/step", "monitor_mode=max", *extra,
    ])


def test_kill_while_best_ckpt_is_written_keeps_that_validations_best(tiny_setup: TinySetup, tmp_path: Path,
                                                                     monkeypatch):
    straight = train(_train_config(tiny_setup, tmp_path / "straight"), extra_callbacks=[StepMetric()])
    assert safe_torch_load(straight.best_checkpoint)["global_step"] == 6

    save = AtomicCheckpointIO.save_checkpoint

    def killed_at_best_of_step_6(self, checkpoint, path, storage_options=None):
        if Path(path).name == "best.ckpt" and checkpoint["global_step"] == 6:
            raise Killed("killed while best.ckpt of step 6 was written")
        save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", killed_at_best_of_step_6)
    run_dir = tmp_path / "killed"
    with pytest.raises(Killed):
        train(_train_config(tiny_setup, run_dir), extra_callbacks=[StepMetric()])
    # last.ckpt of step 6 waits for the validation and its best.ckpt: the last one on disk is step 3's.
    assert safe_torch_load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 3
    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", save)
    resumed = train(_train_config(tiny_setup, run_dir, "ckpt_path=last"), extra_callbacks=[StepMetric()])

    best = safe_torch_load(resumed.best_checkpoint)
    expected = safe_torch_load(straight.best_checkpoint)
    assert best["global_step"] == 6
    different = [k for k in expected["state_dict"] if not torch.equal(expected["state_dict"][k], best["state_dict"][k])]
    assert not different, f"best.ckpt weights differ from the uninterrupted run's: {different[:3]}"


# --- the harness: real commands killed with SIGKILL at file-system events -------------------------------


def _report(outcome: Outcome, command: str, rerun_equal: bool, freed_line: str) -> None:
    """Append one line per kill to $KILL_REPORT (JSON lines) when set: the figures of the kill table."""
    path = os.environ.get("KILL_REPORT")
    if not path:
        return
    row = {"command": command, "moment": outcome.moment.name, "killed": outcome.killed,
           "leader_only": outcome.moment.leader_only, "seconds_to_kill": round(outcome.seconds_to_kill, 2),
           "survivors": len(outcome.survivors), "written_after_kill": outcome.written_after_kill,
           "leftovers": len(outcome.leftovers), "leftover_bytes": outcome.leftover_bytes,
           "rerun_equal": rerun_equal, "rerun_says": freed_line}
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(row) + "\n")


def _check_kill(outcome: Outcome) -> None:
    """The kill happened; no process survived it; nothing was written after it."""
    assert outcome.killed, f"the command ended before {outcome.moment.name}:\n{outcome.output[-3000:]}"
    assert not outcome.survivors, f"processes of the run outlived the kill: {outcome.survivors}"
    assert not outcome.written_after_kill, f"written after the kill: {outcome.written_after_kill}"


def _check_rerun_cleaned(outcome: Outcome, rerun_stderr: str, root: Path) -> str:
    """The rerun said what it removed (when the kill left temporaries), and none remain; returns its line."""
    line = next((x for x in rerun_stderr.splitlines() if "temporar" in x and "freed" in x), "")
    if outcome.leftovers:
        assert line, f"the rerun did not report the {len(outcome.leftovers)} temporaries it should remove"
    assert temporaries(root) == []
    return line


# rag-build-index ------------------------------------------------------------------------------------------

BUILD_ARGS = ("--factory", "Flat", "--max-length", "128", "--shard-size", "40", "--batch-size", "16", "--no-progress")


def _build_command(setup: TinySetup, out: Path) -> list[str]:
    return python_module("index.build_cli", "--passages", str(setup.world.v1_passages), "--encoder",
                         str(setup.models.context_encoder), "--out", str(out), *BUILD_ARGS)


@pytest.fixture(scope="module")
def straight_build(tiny_setup: TinySetup, tmp_path_factory) -> Path:
    """An uninterrupted rag-build-index with the same arguments as the killed ones."""
    out = tmp_path_factory.mktemp("straight_build") / "out"
    run(_build_command(tiny_setup, out), cwd=out.parent)
    return out


def _store_files(directory: Path) -> dict[str, object]:
    """The bytes of a passage store's files; of meta.json, its content less the creation time; of checksums.json,
    its entries less meta.json's (whose hash covers that time). The hidden `.checksums.verified` marker names this
    copy's inodes, not its content: left out."""
    files: dict[str, object] = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith(".")):
        files[path.name] = path.read_bytes()
        if path.name == "meta.json":
            files[path.name] = {k: v for k, v in json.loads(path.read_text()).items() if k != "created"}
        if path.name == "checksums.json":
            listed = json.loads(path.read_text())["files"]
            files[path.name] = {name: entry for name, entry in listed.items() if name != "meta.json"}
    return files


def _check_build_leftovers(out: Path) -> None:
    """Every directory that looks published loads: passage store, index (a kill never leaves half of one)."""
    if (out / "passages").exists():
        PassageStore.open(out / "passages")
    if (out / "index").exists():
        DenseIndex.load(out / "index")


BUILD_MOMENTS = [
    # meta.json is the store's last file: the whole store is written, not yet renamed into place.
    # in `make test` (one real kill per command; the others are slow): ~10 s on 2 busy cores
    pytest.param(Moment("passage store write", "meta.json", stall=".passages.tmp-*")),
    pytest.param(Moment("encode shard write (2nd shard)", ".shard_00001.npy.tmp-*", stall=".shard_00001.npy.tmp-*"),
                 marks=pytest.mark.slow),
    pytest.param(Moment("merge of the shards into vectors.npy", ".vectors.npy.tmp-*", stall=".vectors.npy.tmp-*"),
                 marks=pytest.mark.slow),
    pytest.param(Moment("faiss index write", ".index.tmp-*", stall=".index.tmp-*"), marks=pytest.mark.slow),
]


@pytest.mark.parametrize("moment", BUILD_MOMENTS, ids=lambda m: m.name)
def test_build_index_killed(tiny_setup: TinySetup, straight_build: Path, tmp_path: Path, moment: Moment):
    out = tmp_path / "out"
    outcome = kill_at(_build_command(tiny_setup, out), root=out, moment=moment, cwd=tmp_path)
    _check_kill(outcome)
    assert outcome.leftovers, "the stalled write should have left its temporary"
    _check_build_leftovers(out)
    assert not (out / "index").exists()  # every moment comes before the index is published
    rerun = run(_build_command(tiny_setup, out), cwd=tmp_path)
    line = _check_rerun_cleaned(outcome, rerun.stderr, out)
    expected, got = straight_build, out
    assert np.array_equal(np.load(expected / "index" / "vectors.npy"), np.load(got / "index" / "vectors.npy"))
    assert (expected / "index" / "index.faiss").read_bytes() == (got / "index" / "index.faiss").read_bytes()
    assert _store_files(expected / "passages") == _store_files(got / "passages")
    _report(outcome, "rag-build-index", True, line)


# rag-eval -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_checkpoint(tiny_setup: TinySetup, tmp_path_factory) -> Path:
    """An (untrained) RagModel checkpoint over the tiny world."""
    root = tmp_path_factory.mktemp("kill_eval")
    save_untrained_rag(tiny_setup.models, root / "rag", n_docs=3)
    return root / "rag"


@pytest.fixture(scope="module")
def straight_eval(tiny_setup: TinySetup, eval_checkpoint: Path, tmp_path_factory):
    """Uninterrupted evaluations (in-process `evaluate`, rag-eval's code path), made on first use."""
    root, results = tmp_path_factory.mktemp("straight_eval"), {}

    def get(devices: int) -> tuple[str, dict]:
        if devices not in results:
            out = root / f"devices{devices}"
            evaluate(compose(_eval_overrides(tiny_setup, eval_checkpoint, out, devices), config_name="eval"))
            results[devices] = _eval_results(out)
        return results[devices]

    return get


def _eval_overrides(setup: TinySetup, checkpoint: Path, out: Path, devices: int) -> list[str]:
    return [f"checkpoint={checkpoint}", f"questions={setup.world.test}", f"index.path={setup.index_dir}",
            f"out_dir={out}", "limit=8", "batch_size=4", "progress=false", f"trainer.devices={devices}",
            "trainer.accelerator=cpu"]


def _eval_command(setup: TinySetup, checkpoint: Path, out: Path, devices: int) -> list[str]:
    return python_module("training.evaluation.eval_cli", *_eval_overrides(setup, checkpoint, out, devices))


def _eval_results(out: Path) -> tuple[str, dict]:
    metrics = json.loads((out / "metrics.json").read_text())
    return (out / "predictions.jsonl").read_text(), {k: v for k, v in metrics.items() if k != "seconds"}


EVAL_MOMENTS = [
    pytest.param(1, Moment("predictions write", ".predictions.jsonl.tmp-*", stall=".predictions.jsonl.tmp-*"),
                 marks=pytest.mark.slow),
    # in `make test` (one real kill per command): 2 runs of rag-eval, ~15 s on 2 busy cores
    pytest.param(1, Moment("metrics write", ".metrics.json.tmp-*", stall=".metrics.json.tmp-*")),
    # kill -9 of the parent alone: its 2 workers must die with it, before rank 0 publishes predictions.
    pytest.param(2, Moment("predictions write, parent only", ".predictions.jsonl.tmp-*",
                           stall=".predictions.jsonl.tmp-*", leader_only=True), marks=pytest.mark.slow),
    pytest.param(2, Moment("metrics write, whole group", ".metrics.json.tmp-*", stall=".metrics.json.tmp-*"),
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("devices", "moment"), EVAL_MOMENTS, ids=lambda x: getattr(x, "name", f"devices{x}"))
def test_eval_killed(tiny_setup: TinySetup, eval_checkpoint: Path, straight_eval, tmp_path: Path, devices: int,
                     moment: Moment):
    out = tmp_path / "eval"
    command = _eval_command(tiny_setup, eval_checkpoint, out, devices)
    outcome = kill_at(command, root=out, moment=moment, cwd=tmp_path)
    _check_kill(outcome)
    assert outcome.leftovers and not (out / "metrics.json").exists()  # metrics.json means a complete run
    rerun = run(command, cwd=tmp_path)
    line = _check_rerun_cleaned(outcome, rerun.stderr, out)
    assert _eval_results(out) == straight_eval(devices)
    _report(outcome, f"rag-eval devices={devices}", True, line)


# rag-train ------------------------------------------------------------------------------------------------


def _train_command(setup: TinySetup, run_dir: Path, *extra: str, devices: int = 1) -> list[str]:
    ddp = ["trainer.strategy=ddp", f"trainer.devices={devices}", "data.batch_size=4"] if devices > 1 else []
    return python_module(
        "training.lit.train_cli", "experiment=demo", *tiny_overrides(setup, run_dir), f"hydra.run.dir={run_dir}",
        "trainer.deterministic=true", "trainer.max_steps=7", "data.batch_size=8", "trainer.val_check_interval=3",
        "data.max_val_examples=4", "test=false", "callbacks.checkpoint_last.every_n_train_steps=3",
        "module.warmup_steps=2", "logger=none", "callbacks.lr_monitor=null", "callbacks.samples=null",
        "monitor=check/step", "monitor_mode=max", "+callbacks.step_metric._target_=step_metric.StepMetric",
        *ddp, *extra)


def _safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {f"{part}.{k}": v for part in ("question_encoder", "generator")
            for k, v in load_file(str(model_dir / part / "model.safetensors")).items()}


def _same_tensors(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> bool:
    return expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.fixture(scope="module")
def straight_train(tiny_setup: TinySetup, tmp_path_factory) -> dict[int, Path]:
    """Uninterrupted runs, made on first use: {devices: run_dir}."""
    root, runs = tmp_path_factory.mktemp("straight_train"), {}

    def get(devices: int) -> Path:
        if devices not in runs:
            runs[devices] = root / f"devices{devices}"
            run(_train_command(tiny_setup, runs[devices], devices=devices), cwd=root)
        return runs[devices]

    return get


def _check_train_leftovers(run_dir: Path) -> None:
    """Every checkpoint on disk loads; the run is not marked finished."""
    for checkpoint in (run_dir / "checkpoints").glob("*.ckpt"):
        safe_torch_load(checkpoint)
    assert not (run_dir / "train_result.json").exists()


TRAIN_MOMENTS = [
    pytest.param(1, Moment("last.ckpt write (step 3)", ".last.ckpt.tmp-*", min_bytes=1, stall=".last.ckpt.tmp-*"),
                 marks=pytest.mark.slow),
    # in `make test` (one real kill per command: the one that lost a best checkpoint), ~30 s on 2 busy cores
    pytest.param(1, Moment("best.ckpt write (step 6, the final best)", ".best.ckpt.tmp-*", nth=2, min_bytes=1,
                           stall=".best.ckpt.tmp-*")),
    pytest.param(1, Moment("mid-epoch, right after last.ckpt of step 3", "last.ckpt"), marks=pytest.mark.slow),
    # the generator's weights (the 2nd model.safetensors) are in the export's temporary directory
    pytest.param(1, Moment("model export", "model.safetensors", nth=2, min_bytes=1, stall=".model.tmp-*"),
                 marks=pytest.mark.slow),
    pytest.param(2, Moment("last.ckpt write, parent only", ".last.ckpt.tmp-*", min_bytes=1, stall=".last.ckpt.tmp-*",
                           leader_only=True), marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("devices", "moment"), TRAIN_MOMENTS, ids=lambda x: getattr(x, "name", f"devices{x}"))
def test_train_killed(tiny_setup: TinySetup, straight_train, tmp_path: Path, devices: int, moment: Moment):
    run_dir = tmp_path / "run"
    outcome = kill_at(_train_command(tiny_setup, run_dir, devices=devices), root=run_dir, moment=moment,
                      cwd=tmp_path)
    _check_kill(outcome)
    _check_train_leftovers(run_dir)
    rerun = run(_train_command(tiny_setup, run_dir, "ckpt_path=last", devices=devices), cwd=tmp_path)
    line = _check_rerun_cleaned(outcome, rerun.stderr, run_dir)
    straight = straight_train(devices)
    assert _same_tensors(_safetensors(straight / "model"), _safetensors(run_dir / "model"))
    expected, got = (safe_torch_load(d / "checkpoints" / "best.ckpt") for d in (straight, run_dir))
    assert got["global_step"] == expected["global_step"] == 6
    assert _same_tensors(expected["state_dict"], got["state_dict"])
    _report(outcome, f"rag-train devices={devices}", True, line)
