"""Speed benchmark: training images per second for a recipe, backbone, batch size and precision.

Runs a few warm-up steps, then times ``--steps`` optimiser steps of the real training loop (data
loading and augmentation included) on CIFAR-10 images (or the embedded digits with --data
embedded:digits).  Compare figures as ratios within one run of this script: the machine is noisy.

    python bench/speed.py simclr --batch 128 --precision bf16 fp32 --steps 10

Results are merged into bench/results/speed.json and the table bench/results/speed.md; each row
carries the ``recipe_hash`` of the resolved recipe it ran (``_common.recipe_hash``).

With ``--peer``, each recipe (simclr, moco-v2, byol, simsiam, swav, dino) is measured side by side
with lightly's implementation of the method (``_lightly_peer.py``; ``pip install -e .[bench]``),
both on clcli's backbone module, at the same batch, precision, views, threads and workers,
interleaved (clcli, lightly, clcli, lightly, ... ``--rounds`` times).  Per side it reports the
end-to-end images per second over the timed steps (data loading and augmentation included) and the
model step (forward, loss, backward, optimiser step and momentum update; not the waiting for data),
and the ratios clcli / lightly; rows go to speed.json (``impl``: clcli or lightly) and the table
bench/results/peer.md.

    python bench/speed.py --peer simclr moco-v2 byol simsiam swav dino --precision fp32 --threads 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import CIFAR, ROOT, environment, markdown_table, merge_results, metric_rows, recipe_hash
from rich.console import Console

from clcli.assemble import prepare_training
from clcli.data.sources import limit_source, open_data
from clcli.recipe import Recipe, load_recipe

RESULTS = ROOT / "bench" / "results"
PEER_METHODS = ("simclr", "moco-v2", "byol", "simsiam", "swav", "dino")


def timed_images_per_s(rows: list[dict], batch: int) -> float:
    """Images per second over the records after the first (the warm-up's): each record's rate covers
    the steps since the record before it."""
    timed = [r for r in rows if "images_per_s" in r]
    images = seconds = 0.0
    for before, row in zip(timed, timed[1:], strict=False):
        n = (row["step"] - before["step"]) * batch
        images += n
        seconds += n / row["images_per_s"]
    return images / seconds if seconds else timed[-1]["images_per_s"]


def bench_overrides(args: argparse.Namespace, precision: str) -> list[str]:
    """The overrides every speed measurement runs a recipe with."""
    out = [
        f"data.source={args.data}",
        f"trainer.batch_size={args.batch}",
        f"trainer.precision={precision}",
        f"trainer.steps={args.warmup + args.steps}",
        f"trainer.log_every={args.warmup}",
        "trainer.checkpoint_every=1000000",
        f"data.num_workers={args.workers}",
        f"data.limit={max(args.batch * (args.warmup + args.steps), 2 * args.batch)}",
    ]
    if args.threads:
        out.append(f"trainer.threads={args.threads}")
    if args.backbone:
        out.append(f"model.backbone.name={args.backbone}")
    return out + list(args.set or [])


def measure(recipe_name: str, precision: str, args: argparse.Namespace) -> dict:
    recipe = load_recipe(recipe_name, bench_overrides(args, precision))
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
        "images_per_s": round(timed_images_per_s(rows, args.batch), 1),
        "steps_timed": args.steps,
        **environment(),
    }


# ------------------------------------------------------------------------------------- peer
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clocks() -> tuple[float, float]:
    """(wall clock, this process's CPU time): the second is what --clock cpu reads."""
    return time.perf_counter(), time.process_time()


def _timing(marks: list[tuple[float, float]], model: list[tuple[float, float]], args: argparse.Namespace) -> dict:
    """End-to-end images/s between the end of the last warm-up step and the end of the last step, and
    the mean model-step seconds of the timed steps, by the clock ``--clock`` names.

    ``cpu`` counts the CPU time of this process (all its threads): on a machine shared with other work it
    moves far less than the wall clock, and with ``--workers 0`` it holds all the work of a step (data
    reading and views included), so its ratios compare the work each implementation does per image.
    """
    w, c = args.warmup, 1 if args.clock == "cpu" else 0
    return {
        "images_per_s": args.steps * args.batch / (marks[w + args.steps - 1][c] - marks[w - 1][c]),
        "model_step_s": statistics.mean(m[c] for m in model[w : w + args.steps]),
    }


def run_clcli(name: str, precision: str, args: argparse.Namespace, tmp: Path) -> tuple[dict, Recipe, torch.device]:
    """One timed run of the clcli preset through its trainer."""
    recipe = load_recipe(name, [*bench_overrides(args, precision), "trainer.log_every=1000000"])
    stages = prepare_training(recipe, tmp, show_progress=False)
    trainer, device = stages.trainer, stages.trainer.device
    forward_backward, optimizer_step = trainer._forward_backward, trainer._optimizer_step
    marks: list[tuple[float, float]] = []
    model: list[tuple[float, float]] = []
    pending = [0.0, 0.0]

    def timed_forward_backward(*args_, **kwargs):  # type: ignore[no-untyped-def]
        start = _clocks()
        forward_backward(*args_, **kwargs)
        _sync(device)
        end = _clocks()
        pending[0] += end[0] - start[0]
        pending[1] += end[1] - start[1]

    def timed_optimizer_step(*args_, **kwargs):  # type: ignore[no-untyped-def]
        start = _clocks()
        optimizer_step(*args_, **kwargs)
        _sync(device)
        now = _clocks()
        model.append((pending[0] + now[0] - start[0], pending[1] + now[1] - start[1]))
        pending[:] = [0.0, 0.0]
        marks.append(now)

    trainer._forward_backward = timed_forward_backward  # type: ignore[method-assign]
    trainer._optimizer_step = timed_optimizer_step  # type: ignore[method-assign]
    trainer.fit()
    return _timing(marks, model, args), stages.recipe, device


def run_lightly(name: str, recipe: Recipe, device: torch.device, args: argparse.Namespace) -> dict:
    """One timed run of lightly's implementation, mirroring the resolved clcli ``recipe``."""
    from _lightly_peer import ImagesFor, build_peer, transform_for
    from torch.utils.data import DataLoader

    torch.manual_seed(recipe.seed)
    if recipe.trainer.threads:
        torch.set_num_threads(recipe.trainer.threads)
    data = recipe.data
    source = limit_source(open_data(data.source, data.train_split, data), data.limit)
    total = args.warmup + args.steps
    peer = build_peer(name, recipe, total).to(device).train()
    loader = DataLoader(
        ImagesFor(source, transform_for(name, recipe)),
        batch_size=args.batch,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        generator=torch.Generator().manual_seed(recipe.seed),
    )
    autocast = recipe.trainer.precision == "bf16"
    marks: list[tuple[float, float]] = []
    model: list[tuple[float, float]] = []
    for step, (views, _) in enumerate(loader):
        if step >= total:
            break
        views = [v.to(device, non_blocking=True) for v in views]
        start = _clocks()
        peer.train_step(views, step, autocast)
        _sync(device)
        now = _clocks()
        model.append((now[0] - start[0], now[1] - start[1]))
        marks.append(now)
    return _timing(marks, model, args)


def peer(args: argparse.Namespace, console: Console) -> list[dict]:
    """clcli and lightly side by side per method, interleaved; two rows per method and precision."""
    from _lightly_peer import DIFFERENCES

    rows = []
    for name in args.recipes:
        if name not in PEER_METHODS:
            raise SystemExit(f"--peer measures {', '.join(PEER_METHODS)}; {name!r} has no lightly peer here")
        for precision in args.precision:
            runs: dict[str, list[dict]] = {"clcli": [], "lightly": []}
            for r in range(args.rounds):
                tmp = Path(tempfile.mkdtemp(prefix="clcli-peer-"))
                try:
                    timing, recipe, device = run_clcli(name, precision, args, tmp / "run")
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                runs["clcli"].append(timing)
                runs["lightly"].append(run_lightly(name, recipe, device, args))
                console.print(
                    f"{name} {recipe.trainer.precision} round {r + 1}: "
                    + ", ".join(
                        f"{k} {v[-1]['images_per_s']:.1f} img/s {v[-1]['model_step_s']:.2f} s" for k, v in runs.items()
                    )
                )
            mean = {
                impl: {k: statistics.mean(t[k] for t in timings) for k in ("images_per_s", "model_step_s")}
                for impl, timings in runs.items()
            }
            ratio_images = mean["clcli"]["images_per_s"] / mean["lightly"]["images_per_s"]
            ratio_step = mean["lightly"]["model_step_s"] / mean["clcli"]["model_step_s"]
            for impl, timings in runs.items():
                rows.append(
                    {
                        "method": name,
                        "impl": impl,
                        "backbone": recipe.model.backbone.name,
                        "batch": args.batch,
                        "precision": recipe.trainer.precision,
                        "device": device.type,
                        "overrides": list(args.set or []),
                        "recipe_hash": recipe_hash(recipe),
                        "views_per_image": sum(g.count for g in recipe.views.groups),
                        "images_per_s": round(mean[impl]["images_per_s"], 2),
                        "images_per_s_runs": [round(t["images_per_s"], 2) for t in timings],
                        "model_step_s": round(mean[impl]["model_step_s"], 3),
                        "model_step_s_runs": [round(t["model_step_s"], 3) for t in timings],
                        "ratio_images_per_s": round(ratio_images, 3),
                        "ratio_model_step": round(ratio_step, 3),
                        "steps_timed": args.steps,
                        "warmup_steps": args.warmup,
                        "clock": args.clock,
                        "rounds": args.rounds,
                        "workers": args.workers,
                        "differences": DIFFERENCES[name] if impl == "lightly" else "",
                        **environment(),
                    }
                )
    return rows


def peer_table(rows: list[dict]) -> str:
    """One line per method and precision: both sides' figures and the ratios clcli / lightly."""
    by = {
        (r["method"], r["batch"], r["precision"], r["device"], r.get("clock", "wall"), r["impl"]): r
        for r in rows
        if r.get("impl")
    }
    lines = [
        "clcli/lightly ratios (above 1: clcli faster) from `bench/speed.py --peer`, the two implementations "
        "interleaved on the same backbone module, batch, precision, views, threads and workers; clcli with its "
        "defaults (`trainer.channels_last: auto`), lightly as its examples build it (PyTorch's default memory "
        "format). Model step: forward, loss, backward, optimiser step, momentum update; img/s: end to end. Clock: "
        "wall, or cpu (the process's CPU time, with the data read in the process: work per image).",
        "",
        "| method | batch | precision | device | clock | clcli img/s | lightly img/s | ratio | clcli step s "
        "| lightly step s | step speed ratio | what else differs | when |",
        "|" + "---|" * 13,
    ]
    for (method, batch, precision, device, clock, impl), r in sorted(by.items()):
        if impl != "clcli" or (method, batch, precision, device, clock, "lightly") not in by:
            continue
        other = by[(method, batch, precision, device, clock, "lightly")]
        lines.append(
            f"| {method} | {batch} | {precision} | {device} | {clock} | {r['images_per_s']:.1f} "
            f"| {other['images_per_s']:.1f} "
            f"| {r['ratio_images_per_s']:.2f} | {r['model_step_s']:.2f} | {other['model_step_s']:.2f} "
            f"| {r['ratio_model_step']:.2f} | {other['differences']} | {r['when']} |"
        )
    return "\n".join(lines) + "\n"


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
    p.add_argument("--threads", type=int, default=None, help="trainer.threads (torch CPU threads)")
    p.add_argument("--set", action="append")
    p.add_argument("--peer", action="store_true", help="side by side with lightly's implementation")
    p.add_argument("--rounds", type=int, default=2, help="--peer: interleaved rounds (clcli, lightly) per method")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="--peer: time by the wall clock or by this process's CPU time (steadier on a shared machine; "
        "use with --workers 0 so that the data work is counted)",
    )
    args = p.parse_args()
    console = Console(stderr=True)
    if args.peer:
        rows = peer(args, console)
    else:
        rows = [measure(r, prec, args) for r in args.recipes for prec in args.precision]
    for row in rows:
        console.print(json.dumps({k: row.get(k) for k in ("method", "impl", "batch", "precision", "images_per_s")}))
    key = ("method", "backbone", "batch", "precision", "device", "overrides")  # CPU and GPU rows side by side
    merged = merge_results(RESULTS / "speed.json", rows, (*key, "impl", "recipe_hash", "clock"))
    cols = [*key, "impl", "views_per_image", "images_per_s", "when"]
    ordered = sorted(merged, key=lambda r: (r["method"], r["device"], r["precision"], r.get("impl") or ""))
    (RESULTS / "speed.md").write_text(markdown_table(ordered, cols))
    if args.peer:
        (RESULTS / "peer.md").write_text(peer_table(merged))


if __name__ == "__main__":
    main()
