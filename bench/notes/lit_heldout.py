"""Held-out classes with a locked text tower (LiT, arXiv:2111.07991) on CIFAR-10.

Trains the ``clip-lit`` recipe (ResNet-18 image tower against frozen all-MiniLM-L6-v2 sentence
embeddings) on the CIFAR-10 train images of 8 classes only, at the quality budget (one epoch,
batch 128, bf16), then classifies test images from label text with the 18 CIFAR-10 templates:

* the held-out classes' images among the 2 held-out labels only (zero-shot learning; chance 0.5);
* all 10,000 test images among all 10 labels (generalised zero-shot, the standard protocol),
  reporting top-1 on the held-out classes' images (chance 0.1), on the 8 trained classes' images
  and their harmonic mean, both plain and with each label's scores standardised over the test
  set (``--calibrate zscore``).

    PYTHONPATH=bench python bench/notes/lit_heldout.py --held cat,truck

Results are merged into bench/notes/results/lit_heldout.json.
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

from clcli.evaluate.zeroshot import zeroshot
from clcli.recipe import load_recipe
from clcli.train import pretrain

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
RESULTS = ROOT / "bench" / "notes" / "results"


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
    row_parts: dict = {}
    for calibrate in ("none", "zscore"):
        full = zeroshot(run, data=str(CIFAR), labels=NAMES, calibrate=calibrate, **kw)
        held_rows = [r for r in full["per_class"] if r["class"] in held_names]
        seen_rows = [r for r in full["per_class"] if r["class"] not in held_names]
        acc_u = sum(r["top1"] * r["images"] for r in held_rows) / sum(r["images"] for r in held_rows)
        acc_s = sum(r["top1"] * r["images"] for r in seen_rows) / sum(r["images"] for r in seen_rows)
        tag_c = "" if calibrate == "none" else "_zscore"
        row_parts[f"gzsl_top1_heldout{tag_c}"] = acc_u
        row_parts[f"gzsl_top1_seen{tag_c}"] = acc_s
        row_parts[f"gzsl_harmonic{tag_c}"] = 2 * acc_u * acc_s / (acc_u + acc_s) if acc_u + acc_s else 0.0
        row_parts[f"gzsl_per_heldout_class{tag_c}"] = {r["class"]: r["top1"] for r in held_rows}
        row_parts[f"all_test_top1{tag_c}"] = full["top1"]
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
        **row_parts,
        "templates": "cifar10 (18)",
        "train_seconds": round(seconds, 1),
        "overrides": list(args.set or []),
        **environment(),
    }
    shutil.rmtree(data, ignore_errors=True)
    console.print(json.dumps(row, indent=1, default=str))
    merge_results(RESULTS / "lit_heldout.json", [row], ("recipe", "held_out", "epochs", "batch", "precision", "seed"))


if __name__ == "__main__":
    main()
