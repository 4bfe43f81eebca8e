"""Speed benchmark: training images per second for a recipe, backbone, batch size and precision.

Runs a few warm-up steps, then times ``--steps`` optimiser steps of the real training loop (data
loading and augmentation included) on CIFAR-10 images (or the embedded digits with --data
embedded:digits).  Compare figures as ratios within one run of this script: the machine is noisy.

    python bench/speed.py simclr --batch 128 --precision bf16 fp32 --steps 10

Results are merged into bench/results/speed.json and the table bench/results/speed.md; each row
carries the ``recipe_hash`` of the resolved recipe it ran (``_common.recipe_hash``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from _common import CIFAR, ROOT, environment, markdown_table, merge_results, metric_rows, recipe_hash
from rich.console import Console

from clcli.assemble import prepare_training
from clcli.recipe import load_recipe

RESULTS = ROOT / "bench" / "results"


def measure(recipe_name: str, precision: str, args: argparse.Namespace) -> dict:
    overrides = [
        f"data.source={args.data}",
        f"trainer.batch_size={args.batch}",
        f"trainer.precision={precision}",
        f"trainer.steps={args.warmup + args.steps}",
        f"trainer.log_every={args.warmup}",
        "trainer.checkpoint_every=1000000",
        f"data.num_workers={args.workers}",
        f"data.limit={max(args.batch * (args.warmup + args.steps), 2 * args.batch)}",
    ]
    if args.backbone:
        overrides.append(f"model.backbone.name={args.backbone}")
    recipe = load_recipe(recipe_name, overrides + list(args.set or []))
    tmp = Path(tempfile.mkdtemp(prefix="clcli-speed-"))
    try:
        stages = prepare_training(recipe, tmp / "run")
        used = stages.recipe.trainer.precision  # bf16 falls back to fp32 on a CPU without bf16 arithmetic
        hashed = recipe_hash(stages.recipe)
        device = stages.trainer.device.type
        stages.trainer.fit()
        rows = metric_rows(tmp / "run")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    timed = [r for r in rows if "images_per_s" in r][-1]
    views = sum(g.count for g in recipe.views.groups)
    return {
        "method": recipe_name,
        "backbone": recipe.model.backbone.name,
        "batch": args.batch,
        "precision": used,
        "device": device,
        "overrides": list(args.set or []),
        "recipe_hash": hashed,
        "views_per_image": views,
        "images_per_s": round(timed["images_per_s"], 1),
        "steps_timed": args.steps,
        **environment(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipes", nargs="+")
    p.add_argument("--data", default=str(CIFAR / "train.parquet"))
    p.add_argument("--backbone", default=None, help="override the recipe's backbone")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--precision", nargs="+", default=["bf16"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--set", action="append")
    args = p.parse_args()
    console = Console(stderr=True)
    rows = [measure(r, prec, args) for r in args.recipes for prec in args.precision]
    for row in rows:
        console.print(json.dumps({k: row[k] for k in ("method", "backbone", "batch", "precision", "images_per_s")}))
    key = ("method", "backbone", "batch", "precision", "device", "overrides")  # CPU and GPU rows side by side
    merged = merge_results(RESULTS / "speed.json", rows, (*key, "recipe_hash"))
    cols = [*key, "views_per_image", "images_per_s", "when"]
    ordered = sorted(merged, key=lambda r: (r["method"], r["device"], r["precision"]))
    (RESULTS / "speed.md").write_text(markdown_table(ordered, cols))


if __name__ == "__main__":
    main()
