"""Reproducibility check: does a recipe repeat, and does a resumed run continue, bit for bit?

For each recipe, three short runs of the real training loop on the same data and seed:

* ``first`` and ``again``: uninterrupted, ``--steps`` optimiser steps each;
* ``resumed``: stopped after ``--cut`` steps (as Ctrl-C would stop it), then ``--resume``d to the end.

It reports whether ``again`` and ``resumed`` give the first run's loss sequence exactly, and the
largest difference when they do not.  On the CPU both hold for every recipe (the test suite checks
it on small models).  On CUDA they hold only with ``trainer.deterministic=true``; compare

    python bench/resume_check.py simclr swav --device cuda
    python bench/resume_check.py simclr swav --device cuda --set trainer.deterministic=true

Results are merged into bench/results/resume.json and the table bench/results/resume.md; each row
carries the ``recipe_hash`` of the resolved recipe it ran (``_common.recipe_hash``).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from _common import CIFAR, ROOT, environment, markdown_table, merge_results, metric_rows, recipe_hash
from rich.console import Console

from clcli.assemble import prepare_training
from clcli.recipe import load_recipe

RESULTS = ROOT / "bench" / "results"
COLUMNS = [
    "method",
    "device",
    "precision",
    "deterministic",
    "steps",
    "cut",
    "repeat_exact",
    "repeat_max_diff",
    "resume_exact",
    "resume_max_diff",
    "when",
]


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in metric_rows(run) if "loss" in r]


def max_diff(a: list[float], b: list[float]) -> float | None:
    """Largest absolute difference of two loss sequences; None when their lengths differ."""
    if len(a) != len(b):
        return None
    return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)


def check(recipe_name: str, args: argparse.Namespace, console: Console) -> dict:
    overrides = [
        f"data.source={args.data}",
        f"data.limit={args.limit}",
        f"data.num_workers={args.workers}",
        f"trainer.batch_size={args.batch}",
        f"trainer.steps={args.steps}",
        f"trainer.device={args.device}",
        "trainer.log_every=1",
        "trainer.checkpoint_every=1000000",
        *(args.set or []),
    ]
    recipe = load_recipe(recipe_name, overrides)
    tmp = Path(tempfile.mkdtemp(prefix="clcli-resume-"))
    try:
        seqs = {}
        for name in ("first", "again"):
            stages = prepare_training(recipe, tmp / name, show_progress=False)
            stages.trainer.fit()
            seqs[name] = losses(tmp / name)
        stages = prepare_training(recipe, tmp / "resumed", show_progress=False)
        used, device, hashed = stages.recipe.trainer, stages.trainer.device.type, recipe_hash(stages.recipe)
        stages.trainer.fit(stop_after=args.cut)
        del stages
        prepare_training(recipe, tmp / "resumed", resume=True, show_progress=False).trainer.fit()
        seqs["resumed"] = losses(tmp / "resumed")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    first = seqs["first"]
    row = {
        "method": recipe_name,
        "device": device,
        "precision": used.precision,
        "deterministic": used.deterministic,
        "steps": args.steps,
        "cut": args.cut,
        "repeat_exact": seqs["again"] == first,
        "repeat_max_diff": max_diff(first, seqs["again"]),
        "resume_exact": seqs["resumed"] == first,
        "resume_max_diff": max_diff(first, seqs["resumed"]),
        "overrides": list(args.set or []),
        "recipe_hash": hashed,
        **environment(),
    }
    console.print(
        f"{recipe_name} on {device}: repeat {'exact' if row['repeat_exact'] else row['repeat_max_diff']}, "
        f"resume {'exact' if row['resume_exact'] else row['resume_max_diff']}"
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("methods", nargs="+", help="recipe names")
    parser.add_argument("--data", default=str(CIFAR / "train.parquet"))
    parser.add_argument("--limit", type=int, default=2048, help="images used (the runs are short)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--cut", type=int, default=5, help="steps before the interruption")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--set", action="append", help="extra recipe override (repeatable)")
    args = parser.parse_args()
    if not 0 < args.cut < args.steps:
        parser.error("--cut must lie between 0 and --steps")
    console = Console()
    rows = [check(m, args, console) for m in args.methods]
    key = ("method", "device", "precision", "deterministic", "recipe_hash")
    merged = merge_results(RESULTS / "resume.json", rows, key)
    (RESULTS / "resume.md").write_text(markdown_table(merged, COLUMNS))
    console.print(markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    main()
