"""``rag-train``: instantiate the configured data, module, trainer, callbacks and loggers; fit; test; export.

    rag-train experiment=demo paths.demo_dir=runs/demo-<time>      # a rag-demo directory: world, tiny, dpr, index
    rag-train experiment=nq_rag_sequence index.path=/data/index trainer=ddp trainer.devices=8
    rag-train experiment=demo hydra.run.dir=runs/demo/<time> ckpt_path=last    # resume a killed run

From Python (the demo does this): ``train(compose(["experiment=demo", "paths.run_dir=..."]))``
with `training.config.compose`.
Only instantiation happens here: what a component does lives in its own file.
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from rag_models.atomic import atomic_write_text
from rag_models.cli_errors import command, reported
from rag_models.errors import InputError
from rag_models.file_manifest import request_verify
from rag_models.leftovers import sweep_stale
from rag_models.lifeline import tie_to_launcher
from training.config import CONFIG_DIR, instantiate, instantiate_all
from training.hydra_cli import precheck
from training.lit.checkpoint_io import safe_torch_load
from training.lit.last_checkpoint import order_checkpoints
from training.settings_check import check_settings

EXPORTS = ("last", "best")
log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a training run produced: where, and how well.

    Fields:
        run_dir: the run directory (``paths.run_dir``): train_config.yaml, checkpoints/, logs, train_result.json.
        export_dir: ``<run_dir>/model``, the exported weights: a `save_rag_model` directory, or
            ``question_encoder/`` + ``context_encoder/`` for DPR (which weights: the ``export`` setting).
        best_checkpoint: the ``.ckpt`` of the best ``monitor`` value; None when no monitored checkpoint was written.
        last_checkpoint: ``checkpoints/last.ckpt``; None when no checkpoint callback saves one.
        metrics: the final scalars by key (``train/*``, ``val/*``, ``perf/*``, and ``test/*`` when tested).
    """

    run_dir: Path
    export_dir: Path | None  # save_rag_model dir (or question_encoder/ + context_encoder/ for DPR)
    best_checkpoint: Path | None
    last_checkpoint: Path | None
    metrics: dict[str, float] = field(default_factory=dict)  # final val/*, train/*, test/* values


def _checkpoints(trainer: pl.Trainer) -> tuple[Path | None, Path | None]:
    """(best, last) checkpoint paths written by the ModelCheckpoint callbacks, when any."""
    best = last = None
    for callback in trainer.checkpoint_callbacks:
        if getattr(callback, "best_model_path", "") and callback.monitor is not None:
            best = Path(callback.best_model_path)
        if getattr(callback, "last_model_path", ""):
            last = Path(callback.last_model_path)
    return best, last


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """Plain floats of the train/, val/, test/ and perf/ metrics (the learning rates live in the logs)."""
    return {key: float(value) for key,
            value in metrics.items() if key.split("/")[0] in ("train", "val", "test", "perf")}


def _check(cfg: DictConfig) -> Path:
    """The run directory; InputError for settings that cannot work."""
    if cfg.paths.run_dir is None:
        raise InputError("no run directory", setting="paths.run_dir",
                         fix="pass paths.run_dir=DIR (rag-train sets it to Hydra's run dir)")
    if cfg.export not in EXPORTS:
        raise InputError(f"export={cfg.export!r}", setting="export", fix=f"use one of {EXPORTS}")
    check_settings(cfg, "train")
    return Path(cfg.paths.run_dir)


def _without_logger_needs(callbacks: list[pl.Callback], loggers: list[Any]) -> list[pl.Callback]:
    """The callbacks, less those that need a logger (the learning-rate monitor) when ``logger=none``."""
    if loggers:
        return callbacks
    kept = [callback for callback in callbacks if not isinstance(callback, LearningRateMonitor)]
    if len(kept) < len(callbacks):
        log.info("logger=none: the learning rates are not recorded (LearningRateMonitor needs a logger)")
    return kept


def train(cfg: DictConfig, *, extra_callbacks: list[pl.Callback] | None = None) -> TrainResult:
    """Fit the configured module, optionally test it, export the chosen weights; every rank runs this.

    ``extra_callbacks`` join the configured ones (notebooks, fault-injection in tests).
    """
    run_dir = _check(cfg)
    request_verify(bool(cfg.get("verify", False)))  # hash every file loaded (init_from, index, checkpoints)
    if rank_zero_only.rank == 0:  # checkpoints, exports, indexes of a killed run (never a live run's)
        sweep_stale(run_dir, command="rag-train")
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.module)
    loggers = instantiate_all(cfg.get("logger"))
    callbacks = _without_logger_needs(instantiate_all(cfg.get("callbacks")) + list(extra_callbacks or []), loggers)
    callbacks = order_checkpoints(callbacks)  # last.ckpt after best.ckpt (training/lit/last_checkpoint.py)
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "train_config.yaml", OmegaConf.to_yaml(cfg, resolve=False))
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
    metrics = _scalars(trainer.callback_metrics)
    best, last = _checkpoints(trainer)
    if cfg.export == "best":
        if best is None or not best.is_file():
            raise InputError("no best checkpoint was written (did validation run?)", setting="export",
                             fix="use export=last")
        module.load_state_dict(safe_torch_load(best)["state_dict"])
    if cfg.test and _has_test_data(datamodule):
        for results in trainer.test(module, datamodule=datamodule, verbose=False, weights_only=True):
            metrics.update(_scalars(results))
    export_dir = run_dir / "model"
    if trainer.is_global_zero:
        module.export_pretrained(export_dir)
        result = TrainResult(run_dir, export_dir, best, last, metrics)
        atomic_write_text(run_dir / "train_result.json", json.dumps(asdict(result), indent=2, default=str) + "\n")
    trainer.strategy.barrier("export")
    return TrainResult(run_dir, export_dir, best, last, metrics)


def _has_test_data(datamodule: pl.LightningDataModule) -> bool:
    files = getattr(datamodule, "files", {})
    return bool(files.get("test", (None,))[0])


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base=None)
def _app(cfg: DictConfig) -> None:
    """The Hydra application: train, then print where the model went (errors reported inside, not by Hydra)."""
    tie_to_launcher()  # the DDP ranks Lightning starts die with this process, kill -9 included
    with reported("rag-train"):
        if cfg.paths.run_dir is None:
            with open_dict(cfg):
                cfg.paths.run_dir = HydraConfig.get().runtime.output_dir
        result = train(cfg)
    shown = {k: round(v, 4) for k, v in sorted(result.metrics.items()) if k.startswith(("val/", "test/"))}
    log.info("exported %s; metrics %s", result.export_dir, shown)
    print(f"model: {result.export_dir}\nmetrics: {json.dumps(shown)}")


@command("rag-train")
def main() -> None:
    """Console entry point ``rag-train``; any Hydra override, e.g. ``experiment=demo trainer.max_steps=50``.

    The overrides are composed and checked first (`training.hydra_cli.precheck`): a bad setting is one line
    on stderr and exit status 2, before Hydra creates the run directory.
    """
    precheck(sys.argv[1:], "train")
    _app()


if __name__ == "__main__":
    main()
