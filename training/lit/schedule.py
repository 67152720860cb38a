"""Schedules: the learning rate (linear warm-up then linear decay) and when to refresh the index.

The refresh schedule is a string of ranges, as Atlas writes it:
``"0-1000:500,1000-10000:2000"`` means "every 500 steps in [0, 1000), then every
2000 steps in [1000, 10000)". A step s matches a range (start, end, every) when
``start <= s < end`` and ``(s - start) % every == 0``.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from rag_models.errors import InputError


def warmup_decay_factor(step: int, *, warmup_steps: int, total_steps: int, final_factor: float = 0.0) -> float:
    """Multiplier of the base lr at ``step``: 0 -> 1 over warm-up, then 1 -> final_factor at total_steps."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)  # never exactly 0: the first step already learns a little
    if total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return 1.0 - (1.0 - final_factor) * progress


def linear_warmup_decay(optimizer: Optimizer, *, warmup_steps: int, total_steps: int,
                        final_factor: float = 0.0) -> LambdaLR:
    """A per-step LambdaLR: linear warm-up over ``warmup_steps``, linear decay to ``final_factor`` at the end.

    Every param group keeps its own base lr (question encoder and generator differ).
    """
    if warmup_steps < 0 or total_steps < 1:
        raise InputError(f"warmup_steps={warmup_steps}, total_steps={total_steps}", setting="module.warmup_steps",
                         fix="use warmup_steps >= 0 and a positive trainer.max_steps (or max_epochs)")
    if not 0.0 <= final_factor <= 1.0:
        raise InputError(f"final_factor={final_factor}", setting="module.final_lr_factor", fix="use a value in [0, 1]")

    def factor(step: int) -> float:
        return warmup_decay_factor(step, warmup_steps=warmup_steps, total_steps=total_steps, final_factor=final_factor)

    return LambdaLR(optimizer, factor)


def constant_after_warmup(optimizer: Optimizer, *, warmup_steps: int, total_steps: int,
                          final_factor: float = 1.0) -> LambdaLR:
    """Linear warm-up, then the base lr unchanged (``total_steps`` only validated)."""
    return linear_warmup_decay(optimizer, warmup_steps=warmup_steps, total_steps=max(total_steps, 1), final_factor=1.0)


# module.schedule -> scheduler factory(optimizer, warmup_steps=, total_steps=, final_factor=)
SCHEDULES = {"linear": linear_warmup_decay, "constant": constant_after_warmup}


@dataclass(frozen=True)
class RefreshRange:
    """Refresh every ``every`` steps for ``start <= step < end``.

    Fields:
        start: the first refresh step of the range (optimizer steps, inclusive), >= 0.
        end: the step where the range ends (exclusive), > start.
        every: optimizer steps between refreshes, >= 1.

    `parse_refresh_schedule` checks these and raises InputError; the dataclass itself does not.
    """

    start: int
    end: int
    every: int

    def matches(self, step: int) -> bool:
        """True when ``step`` is one of this range's refresh steps."""
        return self.start <= step < self.end and (step - self.start) % self.every == 0


def parse_refresh_schedule(text: str) -> tuple[RefreshRange, ...]:
    """Parse ``"start-end:every,..."`` (e.g. ``"0-1000:500,1000-10000:2000"``); empty string = never."""
    ranges = []
    fix = 'write ranges as "start-end:every" separated by commas, e.g. "0-1000:500,1000-10000:2000"'
    for piece in filter(None, (p.strip() for p in text.split(","))):
        span, colon, every = piece.partition(":")
        start, dash, end = span.partition("-")
        try:
            parsed = RefreshRange(int(start), int(end), int(every))
        except ValueError:
            raise InputError(f"cannot read {piece!r}", setting="callbacks.index_refresh.schedule", fix=fix) from None
        if not (colon and dash) or parsed.every < 1 or parsed.start < 0 or parsed.end <= parsed.start:
            raise InputError(f"bad range {piece!r}: need 0 <= start < end and every >= 1",
                             setting="callbacks.index_refresh.schedule", fix=fix)
        if ranges and parsed.start < ranges[-1].end:
            raise InputError(f"range {piece!r} overlaps the one before it",
                             setting="callbacks.index_refresh.schedule",
                             fix="list ranges in increasing, disjoint order")
        ranges.append(parsed)
    return tuple(ranges)


def refresh_due(step: int, schedule: tuple[RefreshRange, ...]) -> bool:
    """True when ``step`` (optimizer steps taken so far) is a refresh step; step 0 never is (the index is fresh)."""
    return step > 0 and any(r.matches(step) for r in schedule)
