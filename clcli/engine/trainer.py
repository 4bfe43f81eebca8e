"""One training loop for every method.

The trainer receives built stages (a method, a dataset of views, the resolved run length) and
knows nothing about any particular method.  It handles mixed precision, gradient accumulation,
schedules computed from the global step, checkpoints, exact resume, progress and metrics.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from clcli.engine import checkpoint as ckpt
from clcli.engine.loader import CollatedBatch, ViewsDataset, epoch_loader, sample_seed, stream_loader
from clcli.engine.optim import build_optimizer, scaled_lr
from clcli.errors import CheckpointError, TrainingError
from clcli.methods.base import Batch, Method
from clcli.recipe import Recipe
from clcli.schedules import CosineSchedule, LRSchedule
from clcli.views import normalize_batch


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


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    position: int = 0  # micro-batches already consumed in the current epoch
    images: int = 0
    skipped_bad_images: int = 0
    elapsed: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


class _StopFlag:
    """First Ctrl-C asks the loop to save and stop after the current step; a second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class Trainer:
    def __init__(
        self,
        recipe: Recipe,
        method: Method,
        dataset: Any,
        plan: RunPlan,
        run_dir: Path,
        device: torch.device,
        *,
        console: Console | None = None,
        show_progress: bool = True,
        evaluator: Callable[[Method], dict[str, float]] | None = None,
        stream_dataset_factory: Callable[[int], Any] | None = None,
    ) -> None:
        self.recipe = recipe
        self.method = method.to(device)
        self.dataset = dataset
        self.plan = plan
        self.run_dir = Path(run_dir)
        self.device = device
        self.console = console or Console(quiet=True)
        self.show_progress = show_progress
        self.evaluator = evaluator
        self.stream_dataset_factory = stream_dataset_factory
        self.state = TrainState()
        if recipe.trainer.channels_last:
            self.method.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(method.param_groups(), recipe.optim, plan.peak_lr)
        self.metrics_path = self.run_dir / "metrics.jsonl"

    # ----------------------------------------------------------------------------- schedule
    def _set_hyperparameters(self, step: int) -> float:
        lr = self.plan.lr(step)
        wd = self.plan.weight_decay(step) if self.plan.weight_decay is not None else None
        for group in self.optimizer.param_groups:
            base = self.plan.peak_lr if group.get("fixed_lr") else lr
            group["lr"] = base * group.get("lr_scale", 1.0)
            if wd is not None and group.get("apply_wd_schedule"):
                group["weight_decay"] = wd
        return lr

    def schedule_table(self) -> Table:
        r, p = self.recipe, self.plan
        table = Table(title="resolved schedule", show_header=False, box=None)
        rows = {
            "method": r.method.name,
            "device / precision": f"{self.device.type} / {r.trainer.precision}"
            + (" / deterministic kernels" if r.trainer.deterministic and self.device.type == "cuda" else ""),
            "images per epoch": str(p.dataset_size) if p.dataset_size is not None else "streaming",
            "batch x accumulate": f"{r.trainer.batch_size} x {r.trainer.accumulate}",
            "steps per epoch": str(p.steps_per_epoch),
            "total steps": str(p.total_steps),
            "optimiser": f"{r.optim.name}, peak lr {p.peak_lr:g} ({r.optim.lr_scaling} scaling of {r.optim.lr:g})",
            "lr schedule": f"{p.lr.warmup_steps} warm-up steps, then {p.lr.kind}",
            "weight decay": (
                f"{r.optim.weight_decay:g} -> {r.optim.weight_decay_end:g} (cosine)"
                if r.optim.weight_decay_end is not None
                else f"{r.optim.weight_decay:g}"
            ),
        }
        rows.update(self.method.schedule_summary())
        for k, v in rows.items():
            table.add_row(k, v)
        return table

    # ---------------------------------------------------------------------------- checkpoint
    def _trainer_state(self) -> dict[str, Any]:
        s = self.state
        return {
            "step": s.step,
            "epoch": s.epoch,
            "position": s.position,
            "images": s.images,
            "skipped_bad_images": s.skipped_bad_images,
            "elapsed": s.elapsed,
            "dataset_size": self.plan.dataset_size,
            "recipe_hash": self.recipe.digest(),
            "recipe": self.recipe.to_dict(),
        }

    def save(self) -> Path:
        return ckpt.save_checkpoint(
            self.run_dir,
            self.state.step,
            self.method.state_dict(),
            self.optimizer.state_dict(),
            self._trainer_state(),
            keep=self.recipe.trainer.keep_checkpoints,
        )

    def restore(self, path: Path) -> None:
        model, opt, rng, state = ckpt.load_checkpoint(path)
        try:
            self.method.load_state_dict(model, strict=True)
            self.optimizer.load_state_dict(opt)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint {path} does not fit this recipe's model: {exc}") from None
        ckpt.set_rng_state(rng, state["rng"])
        self.state = TrainState(
            step=state["step"],
            epoch=state["epoch"],
            position=state["position"],
            images=state["images"],
            skipped_bad_images=state["skipped_bad_images"],
            elapsed=state["elapsed"],
        )

    # ---------------------------------------------------------------------------------- loop
    def _to_batch(self, cb: CollatedBatch) -> Batch:
        r = self.recipe
        views = [
            normalize_batch(
                v.to(self.device, non_blocking=True), r.views.mean, r.views.std, channels_last=r.trainer.channels_last
            )
            for v in cb.views
        ]
        names = [g.name for g in r.views.groups for _ in range(g.count)]
        return Batch(views, names, cb.index.to(self.device), cb.label.to(self.device), cb.text)

    def _log(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.state.history.append(record)

    def _check_finite(self, bad: torch.Tensor) -> None:
        if bool(bad):
            last = ckpt.latest_checkpoint(self.run_dir)
            hint = f"; the last good checkpoint is {last}" if last else ""
            raise TrainingError(
                f"the loss became non-finite (nan or inf) at or before step {self.state.step}; stopped without "
                f"saving{hint}. Try a lower optim.lr, trainer.precision=fp32 or a gradient clip (optim.grad_clip)."
            )

    def _batches(self) -> Any:
        r = self.recipe
        if self.stream_dataset_factory is not None:
            skip = self.state.step * r.trainer.accumulate * r.trainer.batch_size
            return stream_loader(self.stream_dataset_factory(skip), r.trainer.batch_size, r.data.num_workers)
        assert isinstance(self.dataset, ViewsDataset)
        generator = torch.Generator().manual_seed(sample_seed(r.seed, self.state.epoch, -3))
        order = self.method.epoch_order(self.state.epoch, generator)
        return epoch_loader(
            self.dataset,
            r.trainer.batch_size,
            r.seed,
            self.state.epoch,
            self.state.position,
            r.data.num_workers,
            num_batches=self.plan.batches_per_epoch,
            order=order,
        )

    def fit(self, stop_after: int | None = None) -> dict[str, Any]:
        """Train to the end of the plan; ``stop_after`` stops (with a checkpoint) as Ctrl-C would."""
        r, s, plan = self.recipe, self.state, self.plan
        acc = r.trainer.accumulate
        autocast_dtype = torch.bfloat16 if r.trainer.precision == "bf16" else None
        self.method.train()
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        interval_loss = torch.zeros((), device=self.device)
        interval_steps = 0
        interval_images = 0
        interval_start = time.perf_counter()
        last_metrics: dict[str, Any] = {}
        last_loss = float("nan")
        interrupted = False
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.show_progress,
            transient=False,
        )
        run_start = time.perf_counter() - s.elapsed
        with _StopFlag() as stop, progress:
            task = progress.add_task(r.method.name, total=plan.total_steps, completed=s.step, info="")
            while s.step < plan.total_steps and not interrupted:
                if s.position == 0 and self.stream_dataset_factory is None:
                    # a method's epoch set-up can take minutes (filling a memory bank, k-means): say so
                    progress.update(task, info=f"epoch {s.epoch + 1}: {r.method.name} epoch set-up")
                    epoch_metrics = self.method.on_epoch_start(s.epoch, s.step)
                    if epoch_metrics:
                        self._log({"step": s.step, "epoch": s.epoch, **epoch_metrics})
                micro = 0
                for cb in self._batches():
                    s.skipped_bad_images += cb.skipped
                    if cb.index.numel() == 0:
                        s.position += 1
                        continue
                    batch = self._to_batch(cb)
                    if micro == 0:
                        lr = self._set_hyperparameters(s.step)
                    with torch.autocast(
                        self.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
                    ):
                        out = self.method.training_step(batch, s.step)
                    loss = out.loss
                    (loss / acc).backward()
                    detached = loss.detach().float()
                    bad |= ~torch.isfinite(detached)
                    interval_loss += detached / acc
                    last_metrics = out.metrics
                    micro += 1
                    s.position += 1
                    interval_images += batch.size
                    s.images += batch.size
                    if micro < acc:
                        continue
                    micro = 0
                    self.method.before_step(s.step)
                    if r.optim.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(self.method.parameters(), r.optim.grad_clip)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.method.after_step(s.step)
                    s.step += 1
                    interval_steps += 1
                    if stop_after is not None and s.step >= stop_after:
                        stop.requested = True
                    epoch_done = self.stream_dataset_factory is None and s.position >= plan.batches_per_epoch
                    if epoch_done:
                        s.epoch += 1
                        s.position = 0
                    last_step = s.step >= plan.total_steps
                    if s.step % r.trainer.log_every == 0 or last_step or stop.requested:
                        self._check_finite(bad)
                        now = time.perf_counter()
                        rate = interval_images / max(now - interval_start, 1e-9)
                        last_loss = float(interval_loss) / max(interval_steps, 1)
                        record = {"step": s.step, "epoch": s.epoch, "loss": last_loss, "lr": lr, "images_per_s": rate}
                        for k, v in last_metrics.items():
                            record[k] = float(v)
                        self._log(record)
                        progress.update(task, info=f"loss {last_loss:.4f}  lr {lr:.3g}  {rate:.0f} img/s")
                        interval_loss.zero_()
                        interval_steps = interval_images = 0
                        interval_start = now
                    progress.update(task, completed=s.step)
                    if epoch_done and self.evaluator is not None and r.trainer.online_knn_every:
                        every = max(1, round(r.trainer.online_knn_every))
                        if s.epoch % every == 0:
                            self._online_eval()
                    s.elapsed = time.perf_counter() - run_start
                    if s.step % r.trainer.checkpoint_every == 0 or last_step or stop.requested:
                        self._check_finite(bad)
                        self.save()
                    if stop.requested:
                        interrupted = True
                    if last_step or interrupted or epoch_done:
                        break
                else:
                    if self.stream_dataset_factory is not None and s.step < plan.total_steps:
                        raise TrainingError(f"the stream ended after {s.step} steps; set trainer.steps to at most that")
        s.elapsed = time.perf_counter() - run_start
        return {
            "run": str(self.run_dir),
            "steps": s.step,
            "epochs": s.epoch,
            "images": s.images,
            "final_loss": last_loss,
            "seconds": round(s.elapsed, 2),
            "skipped_bad_images": s.skipped_bad_images,
            "interrupted": interrupted,
            "checkpoint": str(ckpt.latest_checkpoint(self.run_dir)),
        }

    def _online_eval(self) -> None:
        assert self.evaluator is not None
        self.method.eval()
        try:
            result = self.evaluator(self.method)
        finally:
            self.method.train()
        self._log({"step": self.state.step, "epoch": self.state.epoch, **{f"online_{k}": v for k, v in result.items()}})
        self.console.print(
            f"epoch {self.state.epoch}: online kNN " + ", ".join(f"{k} {v:.4f}" for k, v in result.items())
        )


def make_plan(recipe: Recipe, dataset_size: int | None) -> RunPlan:
    """Resolve the run's length and schedules against the dataset size."""
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
        total = t.steps if t.steps is not None else max(1, int(math.floor(t.epochs * steps_per_epoch + 0.5)))
    else:
        if t.steps is None:
            raise TrainingError("a streaming source has no length: set trainer.steps")
        steps_per_epoch = t.steps
        batches_per_epoch = t.steps * t.accumulate
        total = t.steps
    run_epochs = total / steps_per_epoch

    def to_steps(epochs: float) -> int:
        from clcli.recipe import steps_for_epochs

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
