"""One training loop for every method.

The trainer receives built stages (a method, a dataset of views, the resolved run length) and
knows nothing about any particular method.  It handles mixed precision, gradient accumulation,
schedules computed from the global step, checkpoints, exact resume, progress and metrics.
"""

from __future__ import annotations

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

from clcli import dist
from clcli.engine import checkpoint as ckpt
from clcli.engine.batched_views import device_views
from clcli.engine.compiled import compile_networks
from clcli.engine.ddp import accumulating, any_rank, data_parallel, mean_over_ranks, share_main_state
from clcli.engine.finite import last_finite_hint, refuse_non_finite_state
from clcli.engine.loader import CollatedBatch, ViewsDataset, epoch_loader, sample_seed, stream_loader
from clcli.engine.loggers import RunLoggers, open_loggers
from clcli.engine.metrics_log import cut_back, metrics_line
from clcli.engine.optim import LossScaling, build_optimizer, set_update_kernels
from clcli.errors import CheckpointError, TrainingError
from clcli.methods.base import Batch, Method
from clcli.precision import autocast_dtype, use_channels_last
from clcli.recipe import Recipe
from clcli.schedules import RunPlan
from clcli.views import declared_view_names, normalize_batch


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    position: int = 0  # micro-batches already consumed in the current epoch
    images: int = 0
    skipped_bad_images: int = 0  # reads of unreadable images (one per epoch per file)
    elapsed: float = 0.0
    skipped_files: set[int] = field(default_factory=set)  # sample indices of the unreadable images
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


@dataclass
class _Interval:
    """What the loop gathers between two log records; the tensors stay on the device until a record."""

    bad: torch.Tensor  # any non-finite loss since fit started (never reset): checked before a record or save
    loss: torch.Tensor  # sum over the steps since the last record of each step's mean micro-batch loss
    start: float  # when the interval began (perf_counter)
    steps: int = 0
    images: int = 0
    lr: float = float("nan")  # the scheduled learning rate of the current step
    metrics: dict[str, Any] = field(default_factory=dict)  # the method's metrics of the last micro-batch
    health: dict[str, torch.Tensor] = field(default_factory=dict)  # what Method.health reads at a record
    last_loss: float = float("nan")  # the loss of the last record

    @classmethod
    def starting(cls, device: torch.device) -> _Interval:
        zeros = torch.zeros((), device=device)
        return cls(bad=torch.zeros((), dtype=torch.bool, device=device), loss=zeros, start=time.perf_counter())

    def restart(self, now: float) -> None:
        self.loss.zero_()
        self.steps = self.images = 0
        self.start = now


class _ProgressBar:
    """The run's progress line: steps done of the total, a status text, elapsed time and an estimate."""

    def __init__(self, console: Console, *, enabled: bool, description: str, total: int, completed: int) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
            transient=False,
        )
        self._task_args = (description, total, completed)
        self._task: Any = None

    def __enter__(self) -> _ProgressBar:
        self._progress.__enter__()
        description, total, completed = self._task_args
        self._task = self._progress.add_task(description, total=total, completed=completed, info="")
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.__exit__(*exc)

    def say(self, info: str) -> None:
        self._progress.update(self._task, info=info)

    def at(self, step: int) -> None:
        self._progress.update(self._task, completed=step)


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
        self.is_main = dist.is_main()  # under torchrun only the main process prints, logs and writes
        self.console = console if console is not None and self.is_main else Console(quiet=True)
        self.show_progress = show_progress and self.is_main
        self.evaluator = evaluator
        self.stream_dataset_factory = stream_dataset_factory
        self.state = TrainState()
        self.channels_last = use_channels_last(recipe.trainer.channels_last, device)
        if self.channels_last:
            self.method.to(memory_format=torch.channels_last)
        if recipe.trainer.compile:
            compile_networks(self.method)
        self.optimizer = build_optimizer(method.param_groups(), recipe.optim, plan.peak_lr, device)
        self.scaling = LossScaling(recipe.trainer.precision, device)  # fp16's gradient scaler; plain otherwise
        # what a training step calls: the method, or DDP around it when several processes train
        self.step_module = data_parallel(
            self.method,
            device,
            sync_batchnorm=recipe.method.sync_batchnorm,
            find_unused_parameters=method.ddp_find_unused_parameters,
        )
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.loggers = RunLoggers()  # TensorBoard / W&B (clcli.engine.loggers), opened by fit

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
            + (" / channels-last" if self.channels_last else "")
            + (" / compiled" if r.trainer.compile else "")
            + (" / deterministic kernels" if r.trainer.deterministic and self.device.type == "cuda" else ""),
            "images per epoch": str(p.dataset_size) if p.dataset_size is not None else "streaming",
            "batch x accumulate": f"{r.trainer.batch_size} x {r.trainer.accumulate}",
            "steps per epoch": str(p.steps_per_epoch),
            "views": getattr(self.dataset, "backend", "per_sample"),
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
            "skipped_bad_files": sorted(s.skipped_files),
            "elapsed": s.elapsed,
            "dataset_size": self.plan.dataset_size,
            "recipe_hash": self.recipe.digest(),
            "recipe": self.recipe.to_dict(),
            "metrics_bytes": self.metrics_path.stat().st_size if self.metrics_path.is_file() else 0,
            "grad_scaler": self.scaling.state_dict(),  # fp16's loss scale (None otherwise)
        }

    def save(self) -> Path:
        """The main process writes the checkpoint (never from nan or inf); every process waits until it is complete."""
        path = self.run_dir / ckpt.CKPT_DIR / f"step-{self.state.step:08d}"
        model_state, optimizer_state = self.method.state_dict(), self.optimizer.state_dict()
        s = self.state
        refuse_non_finite_state(self.method, self.optimizer, model_state, optimizer_state, s.step, self.run_dir)
        if self.is_main:
            path = ckpt.save_checkpoint(
                self.run_dir,
                self.state.step,
                model_state,
                optimizer_state,
                self._trainer_state(),
                keep=self.recipe.trainer.keep_checkpoints,
            )
        dist.barrier()
        return path

    def restore(self, path: Path) -> None:
        model, opt, rng, state = ckpt.load_checkpoint(path)
        try:
            self.method.load_state_dict(model, strict=True)
            self.optimizer.load_state_dict(opt)
            set_update_kernels(self.optimizer, self.device)  # the checkpoint's are those of the device it came from
            self.scaling.load_state_dict(state.get("grad_scaler"))
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
            skipped_files=set(state.get("skipped_bad_files", [])),
        )
        if self.is_main:  # what was logged after this checkpoint is logged again as the run continues
            cut_back(self.metrics_path, self.state.step, state.get("metrics_bytes"))

    # ---------------------------------------------------------------------------------- loop
    def _to_batch(self, cb: CollatedBatch) -> Batch:
        r = self.recipe
        views = [
            normalize_batch(v, r.views.mean, r.views.std, channels_last=self.channels_last)
            for v in device_views(cb, self.dataset, self.device)
        ]
        names = declared_view_names(r.views.groups)
        index, label = (t.to(self.device, non_blocking=True) for t in (cb.index, cb.label))  # no stream sync
        return Batch(views, names, index, label, cb.text)

    def _log(self, record: dict[str, Any]) -> None:
        if self.is_main:
            with open(self.metrics_path, "a") as f:
                f.write(metrics_line(record))
        self.loggers.log(record)
        self.state.history.append(record)

    def _check_finite(self, bad: torch.Tensor) -> None:
        if any_rank(bad):
            raise TrainingError(
                f"the loss became non-finite (nan or inf) at or before step {self.state.step}; stopped without "
                f"saving; {last_finite_hint(self.run_dir)}. Try a lower optim.lr, trainer.precision=fp32 or a "
                "gradient clip (optim.grad_clip)."
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
            shard=(dist.rank(), dist.world_size()),
        )

    def _progress_bar(self) -> _ProgressBar:
        return _ProgressBar(
            self.console,
            enabled=self.show_progress,
            description=self.recipe.method.name,
            total=self.plan.total_steps,
            completed=self.state.step,
        )

    def fit(self, stop_after: int | None = None) -> dict[str, Any]:
        """Train to the end of the plan; ``stop_after`` stops (with a checkpoint) as Ctrl-C would.

        Each pass of the outer loop is one epoch (or the whole stream); an optimiser step takes
        ``trainer.accumulate`` micro-batches and is followed by the record, the online evaluation
        and the checkpoint that are due.
        """
        r, s, plan = self.recipe, self.state, self.plan
        self.method.train()
        live = _Interval.starting(self.device)
        interrupted = False
        run_start = time.perf_counter() - s.elapsed
        self.loggers = open_loggers(r, self.run_dir, start_step=s.step, enabled=self.is_main, console=self.console)
        with _StopFlag() as stop, self._progress_bar() as bar, self.loggers:
            while s.step < plan.total_steps and not interrupted:
                self._start_epoch(bar)
                micro = 0
                for cb in self._batches():
                    s.skipped_bad_images += cb.skipped
                    s.skipped_files.update(cb.skipped_index)
                    if cb.index.numel() == 0:
                        s.position += 1
                        continue
                    batch = self._to_batch(cb)
                    if micro == 0:
                        live.lr = self._set_hyperparameters(s.step)
                    self._forward_backward(batch, live, last_micro_batch=micro + 1 == r.trainer.accumulate)
                    micro += 1
                    if micro < r.trainer.accumulate:
                        continue
                    micro = 0
                    self._optimizer_step(live)
                    if stop_after is not None and s.step >= stop_after:
                        stop.requested = True
                    if dist.is_distributed():
                        stop.requested = any_rank(stop.requested)  # Ctrl-C reaches the ranks at different steps
                    epoch_done = self._end_epoch_if_done()
                    last_step = s.step >= plan.total_steps
                    due = last_step or stop.requested
                    if due or s.step % r.trainer.log_every == 0:
                        self._log_interval(live, bar)
                    bar.at(s.step)
                    if epoch_done:
                        self._online_eval_if_due()
                    s.elapsed = time.perf_counter() - run_start
                    if due or s.step % r.trainer.checkpoint_every == 0:
                        self._check_finite(live.bad)
                        self.save()
                    if stop.requested:
                        interrupted = True
                    if last_step or interrupted or epoch_done:
                        break
                else:
                    if self.stream_dataset_factory is not None and s.step < plan.total_steps:
                        raise TrainingError(f"the stream ended after {s.step} steps; set trainer.steps to at most that")
        s.elapsed = time.perf_counter() - run_start
        return self._summary(live.last_loss, interrupted)

    # ------------------------------------------------------------------------ steps of fit
    def _start_epoch(self, bar: _ProgressBar) -> None:
        """At an epoch's first batch (not on a stream): the method's epoch set-up, and its metrics logged."""
        s = self.state
        if s.position != 0 or self.stream_dataset_factory is not None:
            return
        # a method's epoch set-up can take minutes (filling a memory bank, k-means): say so
        bar.say(f"epoch {s.epoch + 1}: {self.recipe.method.name} epoch set-up")
        epoch_metrics = self.method.on_epoch_start(s.epoch, s.step)
        share_main_state(self.method)
        if epoch_metrics:
            self._log({"step": s.step, "epoch": s.epoch, **epoch_metrics})

    def _forward_backward(self, batch: Batch, live: _Interval, last_micro_batch: bool = True) -> None:
        """One micro-batch: the method's loss under the run's precision, backward at 1/accumulate."""
        r, s = self.recipe, self.state
        acc = r.trainer.accumulate
        autocast_to = autocast_dtype(r.trainer.precision)
        # DDP averages the gradients in the last micro-batch's backward pass only
        with accumulating(self.step_module, last_micro_batch):
            with torch.autocast(self.device.type, dtype=autocast_to or torch.float32, enabled=autocast_to is not None):
                out = self.step_module(batch, s.step)
            loss = out.loss
            self.scaling.backward(loss / acc)
        detached = loss.detach().float()
        live.bad |= ~torch.isfinite(detached)
        live.loss += detached / acc
        live.metrics, live.health = out.metrics, out.health
        s.position += 1
        live.images += batch.size * dist.world_size()  # the processes' batches are equal
        s.images += batch.size * dist.world_size()

    def _optimizer_step(self, live: _Interval) -> None:
        """One optimiser step on the accumulated gradient, between the method's before/after hooks."""
        s, clip = self.state, self.recipe.optim.grad_clip
        self.scaling.unscale(self.optimizer)  # fp16: the hooks and the clip see true gradients
        self.method.before_step(s.step)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(self.method.parameters(), clip)
        self.scaling.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        self.method.after_step(s.step)
        s.step += 1
        live.steps += 1

    def _end_epoch_if_done(self) -> bool:
        """Move to the next epoch when this one's batches are used up (never on a stream)."""
        s = self.state
        done = self.stream_dataset_factory is None and s.position >= self.plan.batches_per_epoch
        if done:
            s.epoch += 1
            s.position = 0
        return done

    def _log_interval(self, live: _Interval, bar: _ProgressBar) -> None:
        """Write one record (mean loss since the last one, lr, throughput, the method's metrics)."""
        s = self.state
        self._check_finite(live.bad)
        now = time.perf_counter()
        rate = live.images / max(now - live.start, 1e-9)
        live.last_loss = float(mean_over_ranks(live.loss)) / max(live.steps, 1)  # the global batch's loss
        record = {"step": s.step, "epoch": s.epoch, "loss": live.last_loss, "lr": live.lr, "images_per_s": rate}
        record["weight_decay"] = max(g["weight_decay"] for g in self.optimizer.param_groups)
        for k, v in {**live.metrics, **self.method.health(live.health)}.items():
            record[k] = float(mean_over_ranks(torch.as_tensor(v, device=self.device)))
        self._log(record)
        bar.say(f"loss {live.last_loss:.4f}  lr {live.lr:.3g}  {rate:.0f} img/s")
        live.restart(now)

    def _online_eval_if_due(self) -> None:
        """After an epoch: the online kNN evaluation every ``trainer.online_knn_every`` epochs."""
        every = self.recipe.trainer.online_knn_every
        if self.evaluator is None or not every:
            return
        if self.state.epoch % max(1, round(every)) == 0:
            self._online_eval()

    def _summary(self, final_loss: float, interrupted: bool) -> dict[str, Any]:
        """What ``fit`` returns: where the run is and how it ended."""
        s = self.state
        return {
            "run": str(self.run_dir),
            "steps": s.step,
            "epochs": s.epoch,
            "images": s.images,
            "final_loss": final_loss,
            "seconds": round(s.elapsed, 2),
            "skipped_bad_images": len(s.skipped_files),  # files, each counted once
            "skipped_bad_reads": s.skipped_bad_images,  # reads: a file is read once per epoch
            "views_backend": getattr(self.dataset, "backend", "per_sample"),
            "interrupted": interrupted,
            "checkpoint": str(ckpt.latest_checkpoint(self.run_dir)),
        }

    def _online_eval(self) -> None:
        assert self.evaluator is not None
        if not self.is_main:
            dist.barrier()  # the main process evaluates (no collectives: BN in evaluation mode)
            return
        self.method.eval()
        try:
            result = self.evaluator(self.method)
        finally:
            self.method.train()
        self._log({"step": self.state.step, "epoch": self.state.epoch, **{f"online_{k}": v for k, v in result.items()}})
        top1, skipped = result.get("knn_top1", float("nan")), result.get("knn_skipped_images")
        self.console.print(
            f"epoch {self.state.epoch}: online kNN top-1 {top1:.4f}"
            + (f" ({skipped:g} unreadable images skipped)" if skipped else "")
        )
        dist.barrier()
