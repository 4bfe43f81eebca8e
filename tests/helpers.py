"""Shared helpers for tests: tiny, fast recipes on real images (scikit-learn's digits)."""

from __future__ import annotations

import json
from pathlib import Path

from clcli.recipe import Recipe, load_recipe

CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"

TINY = [
    "model.backbone.name=convnet",
    "model.backbone.width=8",
    "views.groups.0.size=16",
    "views.eval_size=16",
    "method.projector=[32, 16]",
    "trainer.batch_size=32",
    "trainer.steps=6",
    "trainer.log_every=1",
    "trainer.checkpoint_every=100",
    "trainer.precision=fp32",
    "trainer.threads=1",
    "data.limit=256",
    "optim.warmup_epochs=0",
]


def tiny_recipe(*extra: str, name: str = "simclr") -> Recipe:
    return load_recipe(name, [*TINY, *extra])


def metric_rows(run_dir: Path) -> list[dict]:
    """Every record of a run's metrics.jsonl, in order."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[float]:
    """The logged loss values of a run, in order."""
    return [r["loss"] for r in metric_rows(run_dir) if "loss" in r]
