"""Quality benchmark: kNN top-1 on CIFAR-10 after a fixed training budget.

The budget (the foundation issue's): one epoch of the CIFAR-10 train split (50,000 images) at
batch 128 in bf16, then weighted kNN (k = 200, T = 0.1, backbone features) from the train split
to the test split.  ``untrained`` scores the randomly initialised backbone of the same recipe.

    python bench/quality.py simclr untrained --seed 0
    python bench/quality.py moco-v2 --epochs 4            # a method that starts slowly

Results are merged into bench/results/quality.json and the table bench/results/quality.md.  Each
row carries ``recipe_hash``, the fingerprint of the resolved recipe the run used (as saved in its
run folder, so with the precision it really ran in; see ``_common.recipe_hash``): ``bench/bars.py``
selects rows by it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from _common import (
    CIFAR,
    ROOT,
    environment,
    markdown_table,
    merge_results,
    metric_rows,
    quality_overrides,
    recipe_hash,
)
from rich.console import Console

from clcli.assemble import prepare_training
from clcli.evaluate.protocols import knn_eval
from clcli.recipe import load_recipe
from clcli.train import pretrain

RESULTS = ROOT / "bench" / "results"


def budget_overrides(args: argparse.Namespace) -> list[str]:
    return quality_overrides(
        args.data,
        epochs=args.epochs,
        batch=args.batch,
        precision=args.precision,
        seed=args.seed,
        k=args.k,
        temperature=args.temperature,
        workers=args.workers,
    )


def run_one(name: str, args: argparse.Namespace, console: Console) -> dict:
    recipe_name = args.baseline_recipe if name == "untrained" else name
    recipe = load_recipe(recipe_name, budget_overrides(args) + list(args.set or []))
    row_name = args.name or name  # e.g. 'untrained-cmc' for the untrained encoder of another recipe
    run_dir = args.workdir / f"{row_name}-e{args.epochs}-s{args.seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    start = time.perf_counter()
    if name == "untrained":
        stages = prepare_training(recipe, run_dir, console=console)
        stages.trainer.save()  # the initial weights, evaluated as they are
        train_seconds = 0.0
        steps = 0
    else:
        summary = pretrain(recipe, run_dir, console=console, show_progress=args.progress)
        train_seconds = time.perf_counter() - start
        steps = summary["steps"]
    ran = load_recipe(run_dir / "recipe.yaml")  # the resolved recipe as run: bf16 -> fp32 on a CPU without bf16
    logged = metric_rows(run_dir) if steps else []
    last_log = next((r for r in reversed(logged) if "loss" in r), {})  # e.g. SimSiam's collapse metric, SwAV's entropy
    result = knn_eval(
        run_dir,
        k=args.k,
        temperature=args.temperature,
        features="backbone",
        test_split="test",
        train_split="train",
        console=console,
        show_progress=args.progress,
    )
    zeroshot_row = {}
    if recipe.method.name == "clip" and name != "untrained":  # CLIP: zero-shot top-1 from label text too
        from clcli.evaluate.zeroshot import zeroshot

        zs = zeroshot(run_dir, data=str(args.data), split="test", templates="cifar10", console=console)
        zeroshot_row = {"zeroshot_top1": zs["top1"], "zeroshot_top5": zs["top5"], "zeroshot_templates": "cifar10 (18)"}
    return {
        "method": row_name,
        "recipe": recipe_name,
        "backbone": recipe.model.backbone.name,
        "epochs": args.epochs,
        "batch": args.batch,
        "precision": ran.trainer.precision,
        "seed": args.seed,
        "steps": steps,
        "knn_top1": result["top1"],
        "knn_top5": result["top5"],
        "k": args.k,
        "temperature": args.temperature,
        "train_seconds": round(train_seconds, 1),
        "overrides": list(args.set or []),
        "recipe_hash": recipe_hash(ran),
        "last_log": last_log,
        **zeroshot_row,
        **environment(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("methods", nargs="+", help="recipe names, or 'untrained' for the initial backbone")
    p.add_argument("--data", type=Path, default=CIFAR, help="folder with train.parquet and test.parquet")
    p.add_argument("--epochs", type=float, default=1)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--baseline-recipe", default="simclr", help="recipe whose backbone 'untrained' scores")
    p.add_argument("--set", action="append", help="extra recipe override (repeatable)")
    p.add_argument("--name", default=None, help="row name to record (one method only), e.g. untrained-cmc")
    p.add_argument("--workdir", type=Path, default=ROOT / "bench" / "work")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args()
    if args.name and len(args.methods) != 1:
        p.error("--name names one row: give exactly one method")
    console = Console(stderr=True)
    for name in args.methods:
        row = run_one(name, args, console)
        console.print(json.dumps({k: row[k] for k in ("method", "epochs", "seed", "knn_top1", "train_seconds")}))
        key = ("method", "epochs", "batch", "precision", "seed", "overrides", "recipe_hash")
        rows = merge_results(RESULTS / "quality.json", [row], key)
        cols = [
            "method",
            "backbone",
            "epochs",
            "batch",
            "precision",
            "seed",
            "steps",
            "knn_top1",
            "knn_top5",
            "zeroshot_top1",
            "train_seconds",
            "overrides",
            "when",
        ]
        rows = sorted(rows, key=lambda r: (r["epochs"], r["method"]))
        (RESULTS / "quality.md").write_text(markdown_table(rows, cols))


if __name__ == "__main__":
    main()
