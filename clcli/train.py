"""Pre-training as a workflow: build the stages of a recipe, attach online evaluation, train.

:func:`pretrain` is what ``clcli pretrain`` runs and the library's entry point for training from
Python; :func:`clcli.assemble.prepare_training` builds the same stages without running them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.console import Console

from clcli.assemble import prepare_training
from clcli.engine.loggers import check_loggers
from clcli.evaluate.online import make_online_knn
from clcli.fsio import check_output_folder
from clcli.recipe import Recipe
from clcli.runs import check_run_files, read_metrics


def pretrain(
    recipe: Recipe,
    out: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train a recipe into the run folder ``out``; returns a summary of the run.

    With ``trainer.online_knn_every`` the backbone is scored by kNN on the recipe's own splits
    (:func:`clcli.evaluate.online.make_online_knn`) every that many epochs.
    """
    check_output_folder(out)  # before the data is read and the model built
    check_loggers(recipe.trainer)
    if resume:
        check_run_files(out)
    stages = prepare_training(
        recipe,
        out,
        resume=resume,
        overwrite=overwrite,
        console=console,
        show_progress=show_progress,
        online_eval=make_online_knn,
    )
    if console is not None:
        stages.trainer.console.print(stages.trainer.schedule_table())  # quiet on all but the main process
    summary = stages.trainer.fit()
    if not math.isfinite(summary.get("final_loss", math.nan)):  # nothing trained now (a finished run resumed)
        losses = [r["loss"] for r in read_metrics(out) if isinstance(r.get("loss"), int | float)]
        summary["final_loss"] = losses[-1] if losses else None
        stages.trainer.console.print(f"{out} is already finished at step {summary['steps']}: nothing to train")
    summary["recipe"] = recipe.name
    summary["method"] = recipe.method.name
    return summary
