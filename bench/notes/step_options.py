"""The model step (forward, backward, optimiser step; no data loading) of a recipe under a few
trainer options, timed interleaved (A, B, A, B, ...) on one fixed batch, to decide defaults such as
``trainer.channels_last: auto`` and to report what ``trainer.compile`` does on a device.

    PYTHONPATH=.:bench python bench/notes/step_options.py simclr --batch 128 --precision fp32 --clock cpu --threads 1 \\
        --variant off trainer.channels_last=false --variant on trainer.channels_last=true

Each variant is a name and its overrides.  The first ``--warmup`` steps of each variant (where
torch.compile compiles) are timed apart.  Prints one JSON line per variant and, with ``--out``,
writes them to a file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import environment

from clcli.assemble import prepare_training
from clcli.engine.loader import CollatedBatch
from clcli.engine.trainer import _Interval
from clcli.recipe import load_recipe


def build(name: str, overrides: list[str], args: argparse.Namespace, folder: Path):
    recipe = load_recipe(
        name,
        [
            f"trainer.batch_size={args.batch}",
            f"trainer.precision={args.precision}",
            f"trainer.threads={args.threads}",
            "trainer.steps=100000",
            "optim.warmup_epochs=0",
            "data.limit=512",
            *overrides,
        ],
    )
    stages = prepare_training(recipe, folder, show_progress=False)
    gen = torch.Generator().manual_seed(0)
    sizes = [g.size for g in stages.recipe.views.groups for _ in range(g.count)]
    views = [torch.randint(0, 256, (args.batch, 3, s, s), dtype=torch.uint8, generator=gen) for s in sizes]
    cb = CollatedBatch(views, torch.arange(args.batch), torch.zeros(args.batch, dtype=torch.long), 0)
    return stages.trainer, cb


def one_step(trainer, cb, live, clock) -> float:
    start = clock()
    batch = trainer._to_batch(cb)
    trainer._forward_backward(batch, live)
    trainer._optimizer_step(live)
    trainer.state.position = 0
    float(live.loss)  # wait for the device
    return clock() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("--variant", nargs="+", action="append", required=True, metavar="NAME [OVERRIDE ...]")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path)
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: this process's CPU time (time.process_time), which other processes on a busy machine disturb "
        "far less than the wall clock; use it with --threads 1 on the CPU (waiting threads may spin)",
    )
    args = p.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    tmp = Path(tempfile.mkdtemp(prefix="clcli-steps-"))
    built = {v[0]: build(args.recipe, v[1:], args, tmp / v[0]) for v in args.variant}
    lives = {name: _Interval.starting(t.device) for name, (t, _) in built.items()}
    warm: dict[str, list[float]] = {}
    warm_wall: dict[str, float] = {}
    for name, (t, cb) in built.items():
        start = time.perf_counter()
        warm[name] = [one_step(t, cb, lives[name], clock) for _ in range(args.warmup)]
        warm_wall[name] = time.perf_counter() - start
    times: dict[str, list[float]] = {name: [] for name in built}
    for _ in range(args.rounds):
        for name, (t, cb) in built.items():
            times[name] += [one_step(t, cb, lives[name], clock) for _ in range(args.steps)]
    env = environment()
    rows = []
    first = next(iter(built))
    for v in args.variant:
        name = v[0]
        med = statistics.median(times[name])
        rows.append(
            {
                "recipe": args.recipe,
                "variant": name,
                "overrides": v[1:],
                "batch": args.batch,
                "threads": args.threads,
                "clock": args.clock,
                "precision": built[name][0].recipe.trainer.precision,
                "channels_last": built[name][0].channels_last,
                "warmup_s": [round(x, 3) for x in warm[name]],
                "warmup_wall_s": round(warm_wall[name], 2),
                "step_s": [round(x, 3) for x in times[name]],
                "median_step_s": round(med, 4),
                "speed_vs_first": round(statistics.median(times[first]) / med, 3),
                **env,
            }
        )
    ratios = [a / b for a, b in zip(times[first], times[rows[-1]["variant"]], strict=True)]
    shown = ("variant", "warmup_s", "warmup_wall_s", "median_step_s", "speed_vs_first")
    for r in rows:
        print(json.dumps({k: r[k] for k in shown}))
    print(json.dumps({"paired_ratio_first_over_last": [round(x, 3) for x in ratios]}))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
