"""CPU time to make a recipe's views of one batch: the per-sample pipelines against BatchedViews.

For each recipe: the views of ``--batch`` CIFAR-10 images made image by image (the per-sample
ViewMaker under each sample's seeded RNG, as the DataLoader makes them) and from the whole batch
(clcli.views.batched.BatchedViews), interleaved, on one thread; process CPU time, median of
``--reps``, which a busy machine disturbs less than the wall clock.

    PYTHONPATH=.:bench python bench/notes/views_cost.py simclr byol swav dino cpc --batch 128 --reps 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import CIFAR

from clcli.data.sources import open_data
from clcli.engine.loader import _augment, sample_seed
from clcli.recipe import DataConfig, load_recipe
from clcli.views import ViewMaker
from clcli.views.batched import BatchedViews


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("recipes", nargs="+")
    p.add_argument("--data", default=str(CIFAR / "train.parquet"))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    src = open_data(args.data, "train", DataConfig())
    x = torch.stack([src.load_image(i) for i in range(args.batch)])
    seeds = [sample_seed(0, 0, i) for i in range(args.batch)]
    print(f"{args.batch} images of {tuple(x.shape[1:])}, one thread, process CPU time (median of {args.reps})")
    for name in args.recipes:
        views = load_recipe(name).views
        batched, per_sample = BatchedViews(views), ViewMaker(views)

        def run_batched(maker: BatchedViews = batched) -> None:
            maker(x, seeds)

        def run_per_sample(maker: ViewMaker = per_sample) -> None:
            for img, s in zip(x, seeds, strict=True):
                _augment(maker, img, s)

        times: dict[str, list[float]] = {"batched": [], "per_sample": []}
        run_batched(), run_per_sample()
        for _ in range(args.reps):
            for key, fn in (("batched", run_batched), ("per_sample", run_per_sample)):
                c = time.process_time()
                fn()
                times[key].append(time.process_time() - c)
        b, s = statistics.median(times["batched"]), statistics.median(times["per_sample"])
        print(
            f"{name:>8}: batched {b * 1e3:7.1f} ms, per-sample {s * 1e3:7.1f} ms per batch "
            f"({s / b:5.1f}x; {s / args.batch * 1e3:.2f} and {b / args.batch * 1e3:.2f} ms per image)"
        )


if __name__ == "__main__":
    main()
