"""What a resumed run must share with the run that wrote its checkpoint: training data, batch size and seed.

An exact mid-epoch resume (training/lit/resume.py) repositions the sampler by *batches*: with another
batch size, seed or training file the rest of the epoch would hold other examples than the killed
run's, and the resumed run would silently differ from an uninterrupted one. `run_identity` is saved
in every checkpoint; `check_same_run` refuses a resume whose values differ, naming both.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rag_models.errors import InputError

log = logging.getLogger(__name__)


def _train_file(datamodule: Any) -> str | None:
    """The training file (or hf: source) of a QADataModule (``files``) or a DprDataModule (``train_file``)."""
    files = getattr(datamodule, "files", None)
    if isinstance(files, dict) and "train" in files:
        return None if files["train"][0] is None else str(files["train"][0])
    path = getattr(datamodule, "train_file", None)
    return None if path is None else str(path)


def run_identity(datamodule: Any, world_size: int) -> dict[str, Any]:
    """The settings an exact resume depends on, by setting name (saved in every checkpoint)."""
    train_file = _train_file(datamodule)
    size = Path(train_file).stat().st_size if train_file and Path(train_file).is_file() else None
    return {"data.train_file": train_file, "data.train_file bytes": size,
            "data.batch_size": getattr(datamodule, "batch_size", None), "seed": getattr(datamodule, "seed", None),
            "trainer.devices (processes)": world_size}


def check_same_run(saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """InputError when the checkpoint's data, batch size or seed differ from this run's (both values named).

    A checkpoint without the record (written before it existed) is accepted. Another training file path
    with the same size (a moved copy) and another number of processes (a resume then cannot be exact, as
    `ResumeCallback` says) only warn.
    """
    if not saved:
        return
    for setting in ("data.batch_size", "seed", "data.train_file bytes"):
        before, now = saved.get(setting), current.get(setting)
        if before is not None and now is not None and before != now:
            name = setting.split(" ")[0]
            raise InputError(f"the checkpoint was trained with {setting} {before}, this run has {now}: the resumed "
                             "epoch would hold other examples", setting=name,
                             fix=f"Resume with the checkpoint's {name}, or start a new run (ckpt_path=null; "
                             "init_from=<run_dir>/model to start from its weights)")
    for setting in ("data.train_file", "trainer.devices (processes)"):
        before, now = saved.get(setting), current.get(setting)
        if before is not None and now is not None and before != now:
            log.warning("resume: the checkpoint was written with %s %s, this run has %s", setting, before, now)
