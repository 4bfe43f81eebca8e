"""The report's training figures, from ``metrics.jsonl`` and the run plan: loss with the learning-rate
schedule, schedules, health measures and online kNN, each against steps (bottom axis) and epochs (top axis)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clcli.engine.loggers import tag_of


@dataclass
class Figure:
    """One PNG of the report: its file name (in the report folder), a title and a caption."""

    file: str
    title: str
    caption: str


@dataclass
class RunCurves:
    """What the curves are drawn from: the records, the steps of one epoch and the scheduled lr per step."""

    records: list[dict[str, Any]]
    steps_per_epoch: int | None
    total_steps: int
    lr: Callable[[int], float] | None


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(int(r["step"]), float(r[key])) for r in records if isinstance(r.get(key), int | float) and "step" in r]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _keys(records: list[dict[str, Any]], group: str) -> list[str]:
    """The record keys whose tag is in ``group`` (``schedule``, ``health``, ``online``), in first-seen order."""
    seen: dict[str, None] = {}
    for r in records:
        for k, v in r.items():
            if k not in ("step", "epoch") and isinstance(v, int | float) and tag_of(k).startswith(group + "/"):
                seen[k] = None
    return list(seen)


def _epoch_axis(ax: Any, steps_per_epoch: int | None) -> None:
    """A top axis in epochs over the bottom axis in steps."""
    if steps_per_epoch:
        top = ax.secondary_xaxis("top", functions=(lambda s: s / steps_per_epoch, lambda e: e * steps_per_epoch))
        top.set_xlabel("epoch", fontsize=8)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)


def _grid(plt: Any, n: int, title: str) -> tuple[Any, list[Any]]:
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    fig.suptitle(title)
    flat = [a for row in axes for a in row]
    for a in flat[n:]:
        a.set_visible(False)
    return fig, flat[:n]


def loss_figure(plt: Any, run: RunCurves, folder: Path) -> Figure | None:
    """The loss of every record, the scheduled learning rate of every step overlaid (right axis)."""
    steps, loss = _series(run.records, "loss")
    if not steps:
        return None
    fig, ax = plt.subplots(figsize=(9, 4.2))
    ax.plot(steps, loss, color="tab:blue", lw=1.6, label="loss")
    ax.set_ylabel("loss", color="tab:blue")
    _epoch_axis(ax, run.steps_per_epoch)
    right = ax.twinx()
    if run.lr is not None:
        every = list(range(0, run.total_steps + 1, max(1, run.total_steps // 400)))
        right.plot(every, [run.lr(s) for s in every], color="tab:orange", lw=1.2, ls="--", label="lr (schedule)")
    else:
        right.plot(*_series(run.records, "lr"), color="tab:orange", lw=1.2, ls="--", label="lr")
    right.set_ylabel("learning rate", color="tab:orange")
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(handles, [str(h.get_label()) for h in handles], loc="upper right")
    fig.tight_layout()
    fig.savefig(folder / "loss.png", dpi=110)
    plt.close(fig)
    return Figure(
        "loss.png", "Loss and learning rate", "Mean training loss of each record; dashed: the learning-rate schedule."
    )


def group_figure(plt: Any, run: RunCurves, folder: Path, group: str, title: str, caption: str) -> Figure | None:
    """One small panel per key of ``group`` (schedules, health measures, online kNN)."""
    keys = _keys(run.records, group)
    if not keys:
        return None
    fig, axes = _grid(plt, len(keys), title)
    for ax, key in zip(axes, keys, strict=True):
        steps, values = _series(run.records, key)
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3, lw=1.4)
        ax.set_title(key, fontsize=10, pad=30)  # above the epoch axis
        _epoch_axis(ax, run.steps_per_epoch)
    fig.tight_layout()
    name = f"{group}.png"
    fig.savefig(folder / name, dpi=100)
    plt.close(fig)
    return Figure(name, title, caption)


def training_figures(plt: Any, run: RunCurves, folder: Path) -> list[Figure]:
    """Every training figure the records allow, in the page's order."""
    figures = [
        loss_figure(plt, run, folder),
        group_figure(
            plt,
            run,
            folder,
            "online",
            "Online kNN",
            "kNN accuracy of the backbone measured during training (trainer.online_knn_every).",
        ),
        group_figure(
            plt,
            run,
            folder,
            "health",
            "Health",
            "Collapse and method measures: embedding std (about 1/sqrt(D) when spread, 0 when collapsed), "
            "effective rank (1 when collapsed), and the method's own (code or teacher entropy, positive similarity).",
        ),
        group_figure(
            plt,
            run,
            folder,
            "schedule",
            "Schedules",
            "Learning rate, weight decay, momentum and temperatures as the run used them.",
        ),
    ]
    return [f for f in figures if f is not None]
