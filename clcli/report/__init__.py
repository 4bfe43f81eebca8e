"""``clcli report``: one HTML page and its PNGs about a run, in ``RUN/report/``.

The page shows the run's facts, its training curves against steps and epochs with the
learning-rate schedule overlaid (:mod:`clcli.report.curves`), its evaluation results
(``RUN/eval/*.json``), and the encoder at work on a small random sample of a labelled split: a
2-D map of the features coloured by label, query images with their nearest neighbours and, for a
ViT backbone, the class token's attention (:mod:`clcli.report.samples`).  The page has its style
inline and loads nothing from the network.  Figures need matplotlib (``pip install 'clcli[report]'``).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from rich.console import Console

from clcli.engine import checkpoint as ckpt
from clcli.errors import ClcliError, DataError
from clcli.fsio import atomic_output, check_output_folder
from clcli.recipe import Recipe
from clcli.report.curves import Figure, RunCurves, training_figures
from clcli.report.page import render
from clcli.runs import read_metrics, read_run_recipe
from clcli.schedules import make_plan

REPORT_DIR = "report"
EXTRA_HINT = "pip install 'clcli[report]'"


def require_figures() -> None:
    """A :class:`ClcliError` naming the extra when matplotlib is not installed."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ClcliError(f"clcli report draws its figures with matplotlib, which is not installed: {EXTRA_HINT}")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _curves(run: Path, recipe: Recipe) -> tuple[RunCurves, dict[str, Any]]:
    """The records, and the plan of the run (steps per epoch, the lr schedule) from its newest checkpoint."""
    records = read_metrics(run)
    last = ckpt.latest_checkpoint(run)
    state = ckpt.read_state(last, require=("step",)) if last is not None else {}
    size = state.get("dataset_size")
    plan = make_plan(recipe, size) if size is not None else None
    steps = int(state.get("step", max((int(r.get("step", 0)) for r in records), default=0)))
    curves = RunCurves(
        records,
        steps_per_epoch=plan.steps_per_epoch if plan else None,
        total_steps=plan.total_steps if plan else steps,
        lr=plan.lr if plan else None,
    )
    return curves, {"step": steps, "checkpoint": last, "images_per_epoch": size}


def _eval_results(run: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted((run / "eval").glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a damaged result is left out of the page, not fatal
        if isinstance(data, dict):
            out[path.stem] = data
    return out


def _labelled_split(recipe: Recipe, data: str | None, split: str | None) -> Any:
    """The sample's split: ``split`` of ``data`` (default: the run's data), else its test, then its train split."""
    from clcli.evaluate.loader import open_split

    spec = data or recipe.data.source
    if split is not None:
        return open_split(recipe, spec, split, None)
    problems = []
    for name in dict.fromkeys((recipe.data.test_split, recipe.data.train_split)):
        try:
            return open_split(recipe, spec, name, None)
        except DataError as exc:
            problems.append(str(exc))
    raise DataError(
        f"no labelled split of {spec} to draw the report's sample from ({'; '.join(problems)}); "
        "give --data SPEC with labels, or --sample 0 to leave the sample out"
    )


def make_report(
    run: Path,
    *,
    out: Path | None = None,
    data: str | None = None,
    split: str | None = None,
    sample: int = 500,
    queries: int = 8,
    neighbours: int = 6,
    map_method: str = "auto",
    seed: int = 0,
    console: Console | None = None,
) -> dict[str, Any]:
    """Write the report of ``run`` to ``out`` (default ``RUN/report``); returns what it wrote.

    ``sample`` images (0: no sample section) of ``split`` of ``data`` (defaults: the run's data,
    its test split, else its train split; it must be labelled) are drawn with ``seed`` for the map,
    ``queries`` rows of ``neighbours`` nearest neighbours, and the attention maps of a ViT.
    """
    require_figures()
    run = Path(run)
    recipe = read_run_recipe(run)
    folder = Path(out) if out is not None else run / REPORT_DIR
    check_output_folder(folder, "the report folder")
    if sample < 0 or queries < 1 or neighbours < 1:
        raise ClcliError("--sample must be >= 0, --queries and --neighbours >= 1")
    console = console or Console(quiet=True)
    folder.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    curves, where = _curves(run, recipe)
    training = training_figures(plt, curves, folder)
    results = _eval_results(run)
    samples: list[Figure] = []
    notes: list[str] = []
    numbers: dict[str, Any] = {}
    if sample > 0 and where["checkpoint"] is not None:
        from clcli.evaluate.loader import load_model
        from clcli.report.samples import draw_sample, sample_figures

        loaded = load_model(run)
        drawn = draw_sample(_labelled_split(loaded.recipe, data, split), sample, seed)
        console.print(f"report: features of {len(drawn)} images of {drawn.spec} ({drawn.split})")
        samples, numbers = sample_figures(
            plt, loaded, drawn, how=map_method, queries=queries, neighbours=neighbours, seed=seed, folder=folder
        )
    elif sample > 0:
        notes.append("The run has no checkpoint yet: no embedding map or neighbours.")
    facts = [
        ("recipe", recipe.name),
        ("method", recipe.method.name),
        ("backbone", recipe.model.backbone.name),
        ("data", recipe.data.source),
        ("steps", f"{where['step']} of {curves.total_steps}"),
        ("steps per epoch", curves.steps_per_epoch or "?"),
        ("batch size", recipe.trainer.batch_size * recipe.trainer.accumulate),
        ("checkpoint", where["checkpoint"] or "none"),
        ("run folder", run),
    ]
    last_loss = [r["loss"] for r in curves.records if isinstance(r.get("loss"), int | float)]
    if last_loss:
        facts.insert(5, ("last loss", last_loss[-1]))
    page = render(
        recipe_name=recipe.name,
        facts=facts,
        training=training,
        results=results,
        samples=samples,
        notes=notes,
        recipe_yaml=recipe.to_yaml(),
    )
    index = folder / "index.html"
    with atomic_output(index, "the report page", "index.html") as tmp:
        tmp.write_text(page)
    return {
        "report": str(index),
        "figures": [str(folder / f.file) for f in training + samples],
        "evaluations": sorted(results),
        **numbers,
    }
