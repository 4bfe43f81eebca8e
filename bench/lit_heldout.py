"""Held-out classes with a locked text tower (LiT, arXiv:2111.07991) on CIFAR-10.

Trains the ``clip-lit`` recipe (ResNet-18 image tower against frozen all-MiniLM-L6-v2 sentence
embeddings) on the CIFAR-10 train images of 8 classes only, at the quality budget (one epoch,
batch 128, bf16), then classifies the test images of the 2 held-out classes from label text:

* among the 2 held-out labels only (zero-shot learning; chance 0.5),
* among all 10 labels (generalised zero-shot; chance 0.1 top-1, 0.5 top-5, mean rank 5.5),

and all 10,000 test images among all 10 labels.  Prompts: the 18 CIFAR-10 templates.

    python bench/lit_heldout.py --held cat,truck

Results are merged into bench/results/lit_heldout.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from _common import CIFAR, ROOT, environment, merge_results
from rich.console import Console

from clcli.assemble import pretrain
from clcli.evaluate.zeroshot import zeroshot
from clcli.recipe import load_recipe

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
RESULTS = ROOT / "bench" / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--held", default="cat,truck", help="the two (or more) CIFAR-10 classes left out of training")
    p.add_argument("--recipe", default="clip-lit")
    p.add_argument("--epochs", type=float, default=1)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--set", action="append", help="extra recipe override (repeatable)")
    p.add_argument("--workdir", type=Path, default=ROOT / "bench" / "work")
    args = p.parse_args()
    held_names = [h.strip() for h in args.held.split(",") if h.strip()]
    held = [NAMES.index(h) for h in held_names]
    console = Console(stderr=True)
    tag = f"lit-heldout-{'-'.join(held_names)}-e{args.epochs:g}-s{args.seed}"
    data = args.workdir / f"{tag}-data"
    run = args.workdir / tag
    shutil.rmtree(data, ignore_errors=True)
    shutil.rmtree(run, ignore_errors=True)
    data.mkdir(parents=True)
    values = pa.array(held, pa.int64())
    train = pq.read_table(CIFAR / "train.parquet")
    pq.write_table(train.filter(pc.invert(pc.is_in(train["label"], value_set=values))), data / "train.parquet")
    test = pq.read_table(CIFAR / "test.parquet")
    pq.write_table(test.filter(pc.is_in(test["label"], value_set=values)), data / "test.parquet")
    overrides = [
        f"data.source={data}",
        f"trainer.epochs={args.epochs}",
        f"trainer.batch_size={args.batch}",
        f"trainer.precision={args.precision}",
        f"seed={args.seed}",
        f"data.num_workers={args.workers}",
        "trainer.checkpoint_every=100000",
        "trainer.log_every=20",
        *(args.set or []),
    ]
    recipe = load_recipe(args.recipe, overrides)
    start = time.perf_counter()
    summary = pretrain(recipe, run, console=console, show_progress=False)
    seconds = time.perf_counter() - start
    kw = {"split": "test", "templates": "cifar10", "console": console}
    unseen = zeroshot(run, data=str(data), labels=held_names, **kw)
    general = zeroshot(run, data=str(data), labels=NAMES, **kw)
    full = zeroshot(run, data=str(CIFAR), labels=NAMES, **kw)
    seen_rows = [r for r in full["per_class"] if r["class"] not in held_names]
    row = {
        "recipe": args.recipe,
        "held_out": ",".join(held_names),
        "epochs": args.epochs,
        "batch": args.batch,
        "precision": args.precision,
        "seed": args.seed,
        "steps": summary["steps"],
        "train_images": summary["images"],
        "zsl_top1_heldout_among_heldout_labels": unseen["top1"],
        "gzsl_top1_heldout_among_all_labels": general["top1"],
        "gzsl_top5_heldout_among_all_labels": general["top5"],
        "gzsl_mean_rank_heldout": general["mean_rank"],
        "gzsl_per_class": [{k: r[k] for k in ("class", "top1", "top5", "mean_rank")} for r in general["per_class"]],
        "all_test_top1_all_labels": full["top1"],
        "seen_classes_top1": sum(r["top1"] * r["images"] for r in seen_rows) / sum(r["images"] for r in seen_rows),
        "templates": "cifar10 (18)",
        "train_seconds": round(seconds, 1),
        "overrides": list(args.set or []),
        **environment(),
    }
    shutil.rmtree(data, ignore_errors=True)
    console.print(json.dumps({k: v for k, v in row.items() if k != "gzsl_per_class"}, indent=1, default=str))
    merge_results(RESULTS / "lit_heldout.json", [row], ("recipe", "held_out", "epochs", "batch", "precision", "seed"))


if __name__ == "__main__":
    main()
