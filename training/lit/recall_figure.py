"""TensorBoard image ``val/recall_at_k``: answer recall@k against k after each validation (all ranks' questions).

The module notes each validation question's answer rank (`RagLitModule.eval_ranks`, the
rank of the first retrieved passage holding an answer, as ``val/recall@k`` counts it);
this callback turns them into hit counts per k, sums them over the ranks, and rank 0 draws
the curve (training/evaluation/figures.py) into every TensorBoard logger. Nothing is drawn
for a module without ranks (closed-book, DPR pre-training) or before any validation batch.
"""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from training.evaluation.metrics import recall_hit_curve


class RecallFigure(pl.Callback):
    """After each validation (not the sanity check), the recall@k-vs-k curve as a TensorBoard image."""

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ranks, depth = getattr(pl_module, "eval_ranks", None), int(getattr(pl_module, "eval_depth", 0))
        if trainer.sanity_checking or ranks is None or depth < 1:
            return
        # Every rank joins the sum (a collective), rank 0 draws.
        counts = [len(ranks), *recall_hit_curve(ranks, depth)]  # (1 + depth,): questions, then hits at k = 1..depth
        local = torch.tensor(counts, dtype=torch.float64, device=pl_module.device)
        totals = trainer.strategy.reduce(local, reduce_op="sum").tolist()  # (1 + depth,)
        loggers = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        if not trainer.is_global_zero or not loggers or totals[0] == 0:
            return
        image = recall_image([hits / totals[0] for hits in totals[1:]], f"recall@k at step {trainer.global_step}")
        for logger in loggers:
            logger.experiment.add_image("val/recall_at_k", image, global_step=trainer.global_step, dataformats="HWC")


def recall_image(curve: list[float], title: str) -> Any:
    """The recall@k figure of ``curve`` as an (H, W, 3) uint8 array (drawn on an Agg canvas, no pyplot)."""
    from training.evaluation.figures import recall_figure

    figure = recall_figure(curve, title)
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()  # (H, W, 3)
