"""A callback for harnessed rag-train runs (``+callbacks.step_metric._target_=step_metric.StepMetric``)."""
from __future__ import annotations

import lightning.pytorch as pl


class StepMetric(pl.Callback):
    """Logs the global step as ``check/step`` at every validation: with ``monitor_mode=max`` each one is the best."""

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.log("check/step", float(trainer.global_step))
