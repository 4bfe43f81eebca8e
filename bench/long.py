"""The long protocol: lightly's CIFAR-10 benchmark setting (ResNet-18 with CIFAR stem, batch 512,
200 epochs, online kNN k = 200, T = 0.1 of the backbone's features, the train split as reference
and the test split as queries) for a list of recipes, within a time limit per invocation.

    python bench/long.py simclr moco-v2 byol swav dino simsiam --time-limit 540
    python bench/long.py simclr moco-v2 byol swav dino simsiam --time-limit 540 --resume   # the next slice

The recipes run one after another, each in its own run folder under ``--runs``.  Training stops
(with a checkpoint, as Ctrl-C stops it) at the first step after ``--time-limit`` seconds of this
invocation (each invocation trains at least one step), so an invocation ends within about one
step, one checkpoint and one due kNN evaluation of the limit; ``--resume`` continues unfinished
runs (exactly, as the trainer resumes) and skips finished ones.  A GPU lent in slices of about ten
minutes can so run the protocol over several invocations.

After each invocation every recipe that has started has a row in ``bench/results/long.json`` (and
the table ``long.md``): epochs reached, seconds per epoch (the wall time of training, summed over
the invocations, less the kNN evaluations), the kNN curve (epoch, top-1) at every
``--knn-every`` epochs, and lightly's published figure beside it (its 200-epoch, batch-512 table,
``LIGHTLY``), with ``lightly_same_setting`` saying whether the row's length and batch are that table's.
"""

from __future__ import annotations

import argparse
import json
import signal
import time
from pathlib import Path
from typing import Any

from _common import CIFAR, ROOT, environment, markdown_table, merge_results, metric_rows, recipe_hash
from rich.console import Console

from clcli.assemble import prepare_training
from clcli.errors import ClcliError
from clcli.evaluate.online import make_online_knn
from clcli.recipe import load_recipe

RESULTS = ROOT / "bench" / "results"
RUNS = ROOT / "bench" / "runs" / "long"
# lightly's CIFAR-10 table (docs' cifar10_benchmark.py, 2023-03): kNN top-1 at 200 epochs, batch 512
LIGHTLY = {"simclr": 0.848, "moco-v2": 0.847, "byol": 0.868, "swav": 0.842, "dino": 0.813, "simsiam": 0.764}
LIGHTLY_SETTING = {"epochs": 200, "batch": 512}
SIDECAR = "long_bench.json"  # per run folder: the timed slices of each invocation


def protocol_overrides(args: argparse.Namespace) -> list[str]:
    data = args.data if args.data.startswith(("embedded:", "hf:")) else str(Path(args.data) / "train.parquet")
    return [
        f"data.source={data}",
        f"trainer.epochs={args.epochs}",
        f"trainer.batch_size={args.batch}",
        f"trainer.precision={args.precision}",
        f"trainer.online_knn_every={args.knn_every}",
        f"data.num_workers={args.workers}",
        f"seed={args.seed}",
        f"eval.knn_k={args.k}",
        f"eval.knn_temperature={args.temperature}",
        f"trainer.checkpoint_every={args.checkpoint_every}",
        "trainer.log_every=50",
        *(args.set or []),
    ]


def run_folder(name: str, args: argparse.Namespace) -> Path:
    return Path(args.runs) / f"{name}-b{args.batch}-e{args.epochs:g}-s{args.seed}"


def train_slice(name: str, args: argparse.Namespace, deadline: float, console: Console) -> tuple[dict[str, Any], int]:
    """Train (or continue) one recipe until it ends or the deadline passes; its row and the steps trained."""
    folder = run_folder(name, args)
    recipe = load_recipe(name, protocol_overrides(args))
    eval_seconds = [0.0]

    def timed_knn(recipe_, device):  # type: ignore[no-untyped-def]
        evaluate = make_online_knn(recipe_, device)
        if evaluate is None:
            return None

        def run(method):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            try:
                return evaluate(method)
            finally:
                eval_seconds[0] += time.perf_counter() - start

        return run

    try:
        stages = prepare_training(
            recipe, folder, resume=args.resume, console=console, show_progress=args.progress, online_eval=timed_knn
        )
    except ClcliError as exc:
        if not args.resume and (folder / "recipe.yaml").exists():
            raise SystemExit(f"{folder} holds a run already: pass --resume to continue it, or remove it") from None
        raise SystemExit(str(exc)) from None
    trainer = stages.trainer
    plan = trainer.plan
    if trainer.state.step >= plan.total_steps:
        return row_for(name, folder, stages.recipe, plan.steps_per_epoch, plan.total_steps, trainer), 0
    hook = stages.method.after_step
    asked = [False]

    def stop_at_deadline(step: int) -> None:
        hook(step)
        if time.time() >= deadline and not asked[0]:
            asked[0] = True
            signal.raise_signal(signal.SIGINT)  # the trainer's Ctrl-C: save, then stop after this step

    stages.method.after_step = stop_at_deadline  # type: ignore[method-assign]
    first_step = trainer.state.step
    start = time.perf_counter()
    summary = trainer.fit()
    seconds = time.perf_counter() - start - eval_seconds[0]
    sidecar = folder / SIDECAR
    slices = json.loads(sidecar.read_text()) if sidecar.exists() else []
    slices.append(
        {"from_step": first_step, "to_step": summary["steps"], "train_seconds": seconds, "knn_seconds": eval_seconds[0]}
    )
    sidecar.write_text(json.dumps(slices, indent=1) + "\n")
    console.print(f"{name}: steps {first_step} -> {summary['steps']} of {plan.total_steps} in {seconds:.0f} s")
    row = row_for(name, folder, stages.recipe, plan.steps_per_epoch, plan.total_steps, trainer)
    return row, summary["steps"] - first_step


def row_for(name: str, folder: Path, recipe: Any, steps_per_epoch: int, total_steps: int, trainer: Any) -> dict:
    """The results row of a run folder as it stands."""
    records = metric_rows(folder)
    curve = [[r["epoch"], r["online_knn_top1"]] for r in records if "online_knn_top1" in r]
    sidecar = folder / SIDECAR
    slices = json.loads(sidecar.read_text()) if sidecar.exists() else []
    steps = trainer.state.step
    timed_steps = sum(s["to_step"] - s["from_step"] for s in slices)
    train_seconds = sum(s["train_seconds"] for s in slices)
    epochs = recipe.trainer.epochs
    return {
        "method": name,
        "batch": recipe.trainer.batch_size,
        "epochs": epochs,
        "precision": recipe.trainer.precision,
        "device": trainer.device.type,
        "seed": recipe.seed,
        "overrides": [],
        "recipe_hash": recipe_hash(recipe),
        "steps": steps,
        "total_steps": total_steps,
        "epochs_reached": round(steps / steps_per_epoch, 3),
        "finished": steps >= total_steps,
        "invocations": len(slices),
        "seconds_per_epoch": round(train_seconds / timed_steps * steps_per_epoch, 2) if timed_steps else None,
        "knn_seconds": round(sum(s["knn_seconds"] for s in slices), 1),
        "knn_curve": curve,
        "knn_last": curve[-1][1] if curve else None,
        "knn_best": max(c[1] for c in curve) if curve else None,
        "lightly": LIGHTLY.get(name),
        "lightly_same_setting": epochs == LIGHTLY_SETTING["epochs"]
        and recipe.trainer.batch_size == LIGHTLY_SETTING["batch"],
        "run": str(folder),
        **environment(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipes", nargs="+")
    p.add_argument("--data", default=str(CIFAR), help="a folder with train/test parquet files, or embedded:digits")
    p.add_argument("--epochs", type=float, default=200)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--knn-every", type=float, default=10, help="epochs between online kNN evaluations")
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints")
    p.add_argument("--time-limit", type=float, required=True, help="seconds of training in this invocation")
    p.add_argument("--resume", action="store_true", help="continue unfinished runs, skip finished ones")
    p.add_argument("--runs", default=str(RUNS), help="where the run folders are")
    p.add_argument("--set", action="append", help="an extra recipe override (for every recipe)")
    p.add_argument("--progress", action="store_true", help="show the trainer's progress bar")
    args = p.parse_args()
    console = Console(stderr=True)
    deadline = time.time() + args.time_limit
    rows = []
    trained = False  # an invocation trains at least one step, so that every slice makes progress
    for name in args.recipes:
        if trained and time.time() >= deadline:
            console.print(f"{name}: not started (time limit reached)")
            continue
        row, steps = train_slice(name, args, deadline, console)
        trained = trained or steps > 0
        row["overrides"] = list(args.set or [])
        rows.append(row)
    key = ("method", "batch", "epochs", "precision", "device", "seed", "overrides", "recipe_hash")
    merged = merge_results(RESULTS / "long.json", rows, key)
    cols = ["method", "batch", "epochs", "precision", "device", "seed", "epochs_reached", "finished"]
    cols += ["seconds_per_epoch", "knn_last", "knn_best", "lightly", "lightly_same_setting", "when"]
    (RESULTS / "long.md").write_text(markdown_table(sorted(merged, key=lambda r: (r["method"], r["device"])), cols))


if __name__ == "__main__":
    main()
