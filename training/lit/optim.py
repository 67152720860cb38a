"""Optimizer param groups with one learning rate per component, and the Lightning optimizer config.

RAG fine-tunes parts that start from very different places: a question encoder
warm-started from DPR wants a small lr, a freshly initialized reader a large one
(the demo: 1e-4 vs 1e-3). Each component gets its own named group, so the
learning-rate monitor logs them apart (``lr-AdamW/question_encoder``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn
from torch.optim import Optimizer

from rag_models.errors import InputError
from training.lit.schedule import SCHEDULES


def param_groups(components: dict[str, tuple[nn.Module, float]], *, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """One group per named component (its trainable parameters, its lr); biases and norms skip weight decay.

    With ``weight_decay > 0`` each component splits into ``NAME`` (matrices, decayed)
    and ``NAME/no_decay`` (vectors: biases, LayerNorm gains), the usual transformer recipe.
    """
    groups: list[dict[str, Any]] = []
    seen: set[int] = set()
    for name, (module, lr) in components.items():
        if lr <= 0:
            raise InputError(f"lr={lr} for {name}", setting=f"module.lr_{name}",
                             fix="use a positive lr, or freeze the component instead")
        params = [p for p in module.parameters() if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in params)  # tied weights (BART's lm_head) belong to one group only
        if not params:
            continue
        if weight_decay > 0:
            groups.append({"name": name, "params": [p for p in params if p.ndim >= 2], "lr": lr,
                           "weight_decay": weight_decay})
            groups.append({"name": f"{name}/no_decay", "params": [p for p in params if p.ndim < 2], "lr": lr,
                           "weight_decay": 0.0})
        else:
            groups.append({"name": name, "params": params, "lr": lr, "weight_decay": 0.0})
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise InputError("nothing to train: every component is frozen", setting="module",
                         fix="train at least the generator or the question encoder")
    return groups


def configure_optimizer(
    groups: Iterable[dict[str, Any]],
    optimizer: Callable[..., Optimizer],
    *,
    schedule: str,
    warmup_steps: int,
    total_steps: int,
    final_lr_factor: float,
) -> dict[str, Any]:
    """What ``configure_optimizers`` returns: the optimizer and a per-step lr schedule."""
    if schedule not in SCHEDULES:
        raise InputError(f"unknown schedule {schedule!r}", setting="module.schedule",
                         fix=f"use one of {sorted(SCHEDULES)}")
    opt = optimizer(list(groups))
    scheduler = SCHEDULES[schedule](opt, warmup_steps=warmup_steps, total_steps=total_steps,
                                    final_factor=final_lr_factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
