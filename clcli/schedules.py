"""Run planning and per-step schedules: every value is a pure function of the global step.

Computing schedules from the step (as DINO's code does with per-step tables, arXiv:2104.14294)
makes resuming at step k exact and lets the trainer print the whole resolved schedule before it
starts.  Run planning lives here too, in one place: :func:`make_plan` resolves a recipe's length
(epochs or steps) against the dataset size into a :class:`RunPlan`, and :func:`steps_for_epochs`
is the one rounding from epochs to optimiser steps that the plan, the methods
(:class:`clcli.methods.base.BuildContext`) and the schedule table all use.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from clcli.errors import TrainingError
from clcli.recipe import OptimConfig, Recipe


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


# ------------------------------------------------------------------------------ run planning
def steps_for_epochs(
    epochs: float, steps_per_epoch: int, run_epochs: float | None = None, reference_epochs: float | None = None
) -> int:
    """Resolve an epoch-given schedule point to optimiser steps (rounded half up).

    When a ``reference_epochs`` is given and the run (``run_epochs`` long) is shorter than it, the
    point keeps its fraction of the run; otherwise it is taken as it is.
    """
    scale = 1.0
    if reference_epochs is not None and run_epochs is not None and run_epochs < reference_epochs:
        scale = run_epochs / reference_epochs
    return int(math.floor(epochs * scale * steps_per_epoch + 0.5))


def scaled_lr(cfg: OptimConfig, batch_size: int) -> float:
    """The peak learning rate after the recipe's batch-size scaling rule."""
    ratio = batch_size / cfg.reference_batch
    if cfg.lr_scaling == "linear":
        return cfg.lr * ratio
    if cfg.lr_scaling == "sqrt":
        return cfg.lr * ratio**0.5
    return cfg.lr


@dataclass
class RunPlan:
    """The resolved length of a run and the schedules derived from it."""

    steps_per_epoch: int
    total_steps: int
    batches_per_epoch: int
    peak_lr: float
    lr: LRSchedule
    weight_decay: CosineSchedule | None
    epochs_to_steps: Callable[[float], int]
    dataset_size: int | None


def make_plan(recipe: Recipe, dataset_size: int | None) -> RunPlan:
    """Resolve the run's length and schedules against the dataset size (None: a stream)."""
    t, o = recipe.trainer, recipe.optim
    micro = t.batch_size
    if dataset_size is not None:
        batches = dataset_size // micro
        if batches < t.accumulate:
            raise TrainingError(
                f"the training set has {dataset_size} images, fewer than one step of "
                f"{t.batch_size} x {t.accumulate}; lower trainer.batch_size"
            )
        steps_per_epoch = batches // t.accumulate
        batches_per_epoch = steps_per_epoch * t.accumulate
        total = t.steps if t.steps is not None else max(1, steps_for_epochs(t.epochs, steps_per_epoch))
    else:
        if t.steps is None:
            raise TrainingError("a streaming source has no length: set trainer.steps")
        steps_per_epoch = t.steps
        batches_per_epoch = t.steps * t.accumulate
        total = t.steps
    run_epochs = total / steps_per_epoch

    def to_steps(epochs: float) -> int:
        return steps_for_epochs(epochs, steps_per_epoch, run_epochs, t.reference_epochs)

    peak = scaled_lr(o, t.batch_size * t.accumulate)
    lr = LRSchedule(
        peak=peak,
        total_steps=total,
        warmup_steps=min(to_steps(o.warmup_epochs), total),
        warmup_start_ratio=o.warmup_start_ratio,
        kind=o.schedule,
        final_ratio=o.final_lr_ratio,
        milestones=tuple(to_steps(m) for m in o.milestones),
        gamma=o.gamma,
    )
    wd = CosineSchedule(o.weight_decay, o.weight_decay_end, total) if o.weight_decay_end is not None else None
    return RunPlan(steps_per_epoch, total, batches_per_epoch, peak, lr, wd, to_steps, dataset_size)
