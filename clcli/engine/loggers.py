"""Live metrics besides ``metrics.jsonl``: TensorBoard event files and Weights & Biases.

``trainer.loggers`` names the writers of a run.  ``metrics.jsonl`` is always written (by the
trainer itself); ``tensorboard`` writes event files to ``RUN/tensorboard`` when the
``tensorboard`` package is installed (``pip install 'clcli[report]'``; without it the run says so
once and goes on); ``wandb`` logs to Weights & Biases in ``RUN/wandb`` (offline unless
``trainer.wandb_mode=online``), and is refused before training when ``wandb`` is not installed.

Every record the trainer writes reaches every logger, on the main process only.  Keys are grouped
into tags by :func:`tag_of` (``train/loss``, ``schedule/lr``, ``health/effective_rank``,
``online/knn_top1``).  A resumed run hides the TensorBoard events written after its checkpoint
(``purge_step``), so the curves continue from the checkpoint as the run itself does.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console

from clcli.errors import RecipeError
from clcli.recipe import Recipe, TrainerConfig

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
WANDB_ID_FILE = "wandb_id.txt"
# record keys that are schedules (set by the plan or learned), not measurements
SCHEDULE_KEYS = frozenset({"lr", "weight_decay", "ema_momentum", "teacher_temperature", "logit_scale", "nce_z"})
TRAIN_KEYS = frozenset({"loss", "images_per_s", "epoch"})


def tag_of(key: str) -> str:
    """The grouped tag of a record key: ``online/…`` (online kNN), ``schedule/…``, ``train/…`` or ``health/…``."""
    if key.startswith("online_"):
        return "online/" + key.removeprefix("online_")
    if key in SCHEDULE_KEYS:
        return "schedule/" + key
    return ("train/" if key in TRAIN_KEYS else "health/") + key


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers by tag (``step`` is the x axis, not a scalar; text and lists are left out)."""
    out = {}
    for k, v in record.items():
        if k != "step" and isinstance(v, int | float):
            out[tag_of(k)] = float(v)
    return out


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def check_loggers(trainer: TrainerConfig) -> None:
    """Before a run starts: a :class:`RecipeError` when a named logger that must run cannot (wandb not installed)."""
    if "wandb" in trainer.loggers and not installed("wandb"):
        raise RecipeError(
            "trainer.loggers names wandb, but the wandb package is not installed: pip install wandb "
            "(or drop wandb from trainer.loggers; metrics.jsonl and TensorBoard need no account)"
        )


class _Writer(Protocol):
    def log(self, step: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class _TensorBoard:
    def __init__(self, run_dir: Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        folder = run_dir / TENSORBOARD_DIR
        # a resumed run: events after the checkpoint's step (written before a crash) are hidden
        purge = start_step + 1 if start_step > 0 else (0 if folder.exists() else None)
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=purge)

    def log(self, step: int, values: dict[str, float]) -> None:
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, global_step=step)

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, recipe: Recipe, run_dir: Path) -> None:
        import secrets

        import wandb

        id_file = run_dir / WANDB_ID_FILE  # the same W&B run across resumptions
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(8)
        id_file.write_text(run_id + "\n")
        (run_dir / WANDB_DIR).mkdir(exist_ok=True)
        self.run = wandb.init(
            project=recipe.trainer.wandb_project,
            name=recipe.name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            mode=recipe.trainer.wandb_mode,
            config=recipe.to_dict(),
        )

    def log(self, step: int, values: dict[str, float]) -> None:
        # W&B drops a step lower than one it has (a resumed run repeats none below its checkpoint)
        self.run.log({k: v for k, v in values.items() if not math.isnan(v)}, step=step)

    def close(self) -> None:
        self.run.finish()


class RunLoggers:
    """The live-metric writers of one run (none on processes other than the main one)."""

    def __init__(self, writers: list[_Writer] | None = None) -> None:
        self.writers = list(writers or [])

    def log(self, record: dict[str, Any]) -> None:
        if not self.writers or "step" not in record:
            return
        values = scalars(record)
        for w in self.writers:
            w.log(int(record["step"]), values)

    def close(self) -> None:
        for w in self.writers:
            w.close()
        self.writers = []

    def __enter__(self) -> RunLoggers:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_loggers(
    recipe: Recipe, run_dir: Path, *, start_step: int, enabled: bool, console: Console | None = None
) -> RunLoggers:
    """The writers ``trainer.loggers`` names, for a run starting (or resuming) at ``start_step``.

    ``enabled`` is false on every process but the main one: nothing is opened there.
    """
    names = recipe.trainer.loggers
    if not enabled:
        return RunLoggers()
    check_loggers(recipe.trainer)
    writers: list[_Writer] = []
    if "tensorboard" in names:
        if installed("tensorboard"):
            writers.append(_TensorBoard(Path(run_dir), start_step))
        elif console is not None:
            console.print(  # markup off: the brackets are the extra's and the list's, not rich styles
                "note: tensorboard is not installed: no TensorBoard event files for this run "
                "(pip install 'clcli[report]', or --set 'trainer.loggers=[jsonl]' to silence this)",
                markup=False,
                style="dim",
            )
    if "wandb" in names:
        writers.append(_Wandb(recipe, Path(run_dir)))
    return RunLoggers(writers)
