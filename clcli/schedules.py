"""Per-step schedules: every value is a pure function of the global step.

Computing schedules from the step (as DINO's code does with per-step tables) makes resuming at
step k exact and lets the trainer print the whole resolved schedule before it starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def cosine(step: int, total: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` at step 0 to ``end`` at step ``total`` (held after)."""
    if total <= 0:
        return end
    t = min(max(step, 0), total) / total
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def linear(step: int, total: int, start: float, end: float) -> float:
    """Straight line from ``start`` at step 0 to ``end`` at step ``total`` (held after)."""
    if total <= 0:
        return end
    t = min(max(step, 0), total) / total
    return start + (end - start) * t


@dataclass(frozen=True)
class LRSchedule:
    """Linear warm-up to ``peak``, then cosine to ``peak * final_ratio``, constant, or step decay."""

    peak: float
    total_steps: int
    warmup_steps: int = 0
    warmup_start_ratio: float = 0.0
    kind: str = "cosine"
    final_ratio: float = 0.0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return linear(step, self.warmup_steps, self.peak * self.warmup_start_ratio, self.peak)
        if self.kind == "constant":
            return self.peak
        if self.kind == "step":
            drops = sum(1 for m in self.milestones if step >= m)
            return self.peak * self.gamma**drops
        return cosine(
            step - self.warmup_steps,
            max(self.total_steps - self.warmup_steps, 1),
            self.peak,
            self.peak * self.final_ratio,
        )


@dataclass(frozen=True)
class CosineSchedule:
    """A value that moves from ``start`` to ``end`` on a half-cosine over ``total_steps``.

    Used for EMA momentum (BYOL's 1 - (1 - m0)(cos(pi k / K) + 1) / 2 is ``CosineSchedule(m0, 1, K)``),
    weight decay and temperatures.
    """

    start: float
    end: float
    total_steps: int

    def __call__(self, step: int) -> float:
        return cosine(step, self.total_steps, self.start, self.end)


@dataclass(frozen=True)
class WarmupConstant:
    """Linear from ``start`` to ``end`` over ``warmup_steps``, then ``end`` (DINO's teacher temperature)."""

    start: float
    end: float
    warmup_steps: int

    def __call__(self, step: int) -> float:
        if step >= self.warmup_steps:
            return self.end
        return linear(step, self.warmup_steps, self.start, self.end)


@dataclass(frozen=True)
class Constant:
    value: float

    def __call__(self, step: int) -> float:
        return self.value
