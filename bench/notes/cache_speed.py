"""Decode once, measured: images/s of reading CIFAR-10 train through a DataLoader with and without the cache.

Three measurements, each run cached and uncached in turn (A, B, A, B, ...) so that the machine's
noise falls on both alike; compare the ratios, not the figures:

``read``
    decode (or read from the cache) and stack ``uint8`` tensors, a whole epoch of the split in the
    training order, through ``torch.utils.data.DataLoader`` with ``--workers`` workers;
``views``
    the training loader itself (``clcli.engine.loader.epoch_loader`` over ``ViewsDataset``) with the
    views of ``--recipe``, on the first ``--views-limit`` images;
``train``
    end-to-end training images/s of ``--recipe`` for ``--train-steps`` steps (after two warm-up steps)
    at ``--batch``, as ``bench/speed.py`` measures it (skipped with ``--train-steps 0``).

It also reports the one-off cost: decoding the split into the cache, and opening the entry again
(metadata, size and checksum checked).  The cache is written to a temporary folder, removed at the end.

    PYTHONPATH=bench python bench/notes/cache_speed.py --workers 0 1 --repeats 2 --train-steps 6

Results go to bench/notes/results/cache_speed.json and cache_speed.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from _common import CIFAR, ROOT, environment, markdown_table, metric_rows
from rich.console import Console

from clcli.assemble import prepare_training
from clcli.data import open_source
from clcli.data.cache import decoded_once
from clcli.data.sources import limit_source
from clcli.engine.loader import ViewsDataset, epoch_loader, epoch_permutation
from clcli.recipe import DataConfig, load_recipe
from clcli.views import ViewMaker

RESULTS = ROOT / "bench" / "notes" / "results"


class _Images(torch.utils.data.Dataset):
    def __init__(self, source) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.source.load_image(i)


def _stack(items: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(items)


def read_rate(source, workers: int, batch: int) -> float:
    order = epoch_permutation(len(source), 0, 0).tolist()
    batches = [order[k : k + batch] for k in range(0, len(order) - batch + 1, batch)]
    loader = torch.utils.data.DataLoader(_Images(source), batch_sampler=batches, num_workers=workers, collate_fn=_stack)
    start, seen = time.perf_counter(), 0
    for images in loader:
        seen += images.shape[0]
    return seen / (time.perf_counter() - start)


def views_rate(source, recipe, workers: int, batch: int) -> float:
    dataset = ViewsDataset(source, ViewMaker(recipe.views))
    start, seen = time.perf_counter(), 0
    for cb in epoch_loader(dataset, batch, 0, 0, 0, workers):
        seen += cb.views[0].shape[0]
    return seen / (time.perf_counter() - start)


def train_rate(args: argparse.Namespace, cache: str, cache_dir: Path) -> float:
    overrides = [
        f"data.source={args.data}",
        f"trainer.batch_size={args.batch}",
        f"trainer.precision={args.precision}",
        f"trainer.steps={2 + args.train_steps}",
        "trainer.log_every=2",
        "trainer.checkpoint_every=1000000",
        f"data.num_workers={args.train_workers}",
        f"data.limit={args.batch * (2 + args.train_steps)}",
        f"data.cache={cache}",
        f"data.cache_dir={cache_dir}",
        f"trainer.threads={args.threads}",
    ]
    recipe = load_recipe(args.recipe, overrides)
    tmp = Path(tempfile.mkdtemp(prefix="clcli-cache-speed-"))
    try:
        prepare_training(recipe, tmp / "run").trainer.fit()
        rows = metric_rows(tmp / "run")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [r for r in rows if "images_per_s" in r][-1]["images_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(CIFAR / "train.parquet"))
    p.add_argument("--recipe", default="simclr")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    p.add_argument("--batch", type=int, default=256, help="read and views batches")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--views-limit", type=int, default=5120)
    p.add_argument("--train-steps", type=int, default=6)
    p.add_argument("--train-batch", type=int, default=128)
    p.add_argument("--train-workers", type=int, default=1)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--threads", type=int, default=1, help="torch threads of this process (and of the training runs)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(stderr=True)
    cache_dir = Path(tempfile.mkdtemp(prefix="clcli-cache-bench-"))
    rows: list[dict] = []
    try:
        source = open_source(args.data)
        data = DataConfig(cache="disk", cache_dir=str(cache_dir))
        start = time.perf_counter()
        cached = decoded_once(source, data, console=console)
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        cached = decoded_once(open_source(args.data), data)
        open_s = time.perf_counter() - start
        console.print(f"build {build_s:.2f} s, reopen {open_s:.2f} s for {len(source)} images")
        rows.append({"what": "one-off", "images": len(source), "build_s": round(build_s, 2)})
        rows[-1]["open_s"] = round(open_s, 2)
        recipe = load_recipe(args.recipe)
        sources = {"uncached": source, "cached": cached}
        for workers in args.workers:
            rates: dict[str, list[float]] = {"read uncached": [], "read cached": []}
            vrates: dict[str, list[float]] = {"views uncached": [], "views cached": []}
            for _ in range(args.repeats):
                for name, src in sources.items():
                    rates[f"read {name}"].append(read_rate(src, workers, args.batch))
                    vrates[f"views {name}"].append(
                        views_rate(limit_source(src, args.views_limit), recipe, workers, args.batch)
                    )
            for table in (rates, vrates):
                (a, ua), (b, ub) = table.items()
                row = {"what": a.split()[0], "workers": workers, a: [round(x) for x in ua], b: [round(x) for x in ub]}
                row["ratio"] = round(sum(ub) / sum(ua), 2)
                rows.append(row)
                console.print(json.dumps(row))
        if args.train_steps:
            args.batch = args.train_batch
            e2e: dict[str, list[float]] = {"train off": [], "train disk": []}
            for _ in range(args.repeats):
                for cache in ("off", "disk"):
                    e2e[f"train {cache}"].append(train_rate(args, cache, cache_dir))
            row = {"what": f"train {args.recipe}", "workers": args.train_workers, "batch": args.train_batch}
            row.update({k: [round(x, 1) for x in v] for k, v in e2e.items()})
            row["ratio"] = round(sum(e2e["train disk"]) / sum(e2e["train off"]), 3)
            rows.append(row)
            console.print(json.dumps(row))
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    record = {"rows": rows, **environment()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cache_speed.json").write_text(json.dumps(record, indent=2) + "\n")
    columns = sorted({k for r in rows for k in r}, key=lambda k: (k != "what", k))
    text = markdown_table(rows, columns) + f"\n`{record['command']}` ({record['when']}, {record['torch']})\n"
    (RESULTS / "cache_speed.md").write_text(text)


if __name__ == "__main__":
    main()
