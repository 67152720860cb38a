"""``last.ckpt`` that never runs ahead of a validation: a kill while ``best.ckpt`` is written cannot lose it.

Lightning's step-triggered ModelCheckpoint writes ``last.ckpt`` when the training batch ends, *before*
the validation that follows the same batch. A run killed while that validation's ``best.ckpt`` is
written resumes from a ``last.ckpt`` whose loop state says the validation is done: the resumed run
skips it, and the best checkpoint of the uninterrupted run never appears.

`LastCheckpoint` writes such a ``last.ckpt`` after the validation instead, and `order_checkpoints`
puts it after every other checkpoint callback, so that at a step that validates the files are
published in this order: ``best.ckpt`` (if improved), then ``last.ckpt`` recording it. A kill at
any point then resumes from a ``last.ckpt`` either before the validation (which the resumed run
replays, best-save included) or after both.
"""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint


def validates_after_this_batch(trainer: pl.Trainer) -> bool:
    """Whether Lightning runs a validation right after the training batch that just ended."""
    loop = trainer.fit_loop.epoch_loop
    return bool(trainer.enable_validation and loop._should_check_val_fx(trainer.fit_loop._data_fetcher))


class LastCheckpoint(ModelCheckpoint):
    """A ModelCheckpoint (same arguments) whose step-triggered save, at a step that validates, waits for the end
    of that validation and of every monitored checkpoint's save (see `order_checkpoints`)."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Save as Lightning does, except at a step whose validation follows: then save in on_validation_end."""
        due = self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0
        if due and not self._should_skip_saving_checkpoint(trainer) and validates_after_this_batch(trainer):
            self._defer_save_until_validation = True  # ModelCheckpoint.on_validation_end saves and clears it
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def order_checkpoints(callbacks: list[pl.Callback]) -> list[pl.Callback]:
    """``callbacks`` with every LastCheckpoint after the other checkpoint callbacks (the rest keep their order).

    Lightning calls checkpoint callbacks last, in list order: the best checkpoint is then written before
    the last checkpoint that records it.
    """
    last = [c for c in callbacks if isinstance(c, LastCheckpoint)]
    others = [c for c in callbacks if not isinstance(c, LastCheckpoint)]
    checkpoints = [c for c in others if isinstance(c, Checkpoint)]
    plain = [c for c in others if not isinstance(c, Checkpoint)]
    return plain + checkpoints + last
