"""Where a training step waits for the GPU (CUDA only): the steps of a few recipes run with
``torch.cuda.set_sync_debug_mode("warn")`` switched on inside the step (batch to the device,
forward and backward, optimiser step and the method's hooks), and every synchronising call is
listed with the nearest line of clcli that made it.  The CPU tests count Python reads of tensor
values (tests/test_lean_step.py); this finds what they cannot see, such as blocking copies and
operations that read sizes off the device.

    PYTHONPATH=.:bench python bench/notes/sync_check.py simclr moco-v2 byol simsiam swav dino --out sync.json
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import traceback
import warnings
from pathlib import Path

import torch
from _common import CIFAR, environment

from clcli.assemble import prepare_training
from clcli.engine.trainer import Trainer
from clcli.recipe import load_recipe

CLCLI = str(Path(__file__).resolve().parents[2] / "clcli")


def check(name: str, args: argparse.Namespace) -> dict:
    overrides = [
        f"data.source={args.data}",
        f"data.limit={args.batch * args.steps}",
        f"trainer.batch_size={args.batch}",
        f"trainer.steps={args.steps}",
        f"trainer.log_every={args.steps}",
        "trainer.checkpoint_every=1000000",
        "trainer.device=cuda",
        *(args.set or []),
    ]
    stages = prepare_training(load_recipe(name, overrides), Path(tempfile.mkdtemp()) / "run", show_progress=False)
    found: collections.Counter[str] = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
        ours = [f for f in traceback.extract_stack() if f.filename.startswith(CLCLI)]
        where = f"{ours[-1].filename[len(CLCLI) - 5 :]}:{ours[-1].lineno} {ours[-1].name}" if ours else "?"
        found[f"{where}: {str(message).splitlines()[0]}"] += 1

    def synced(real):  # type: ignore[no-untyped-def]
        def run(*a, **k):  # type: ignore[no-untyped-def]
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return real(*a, **k)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        return run

    trainer: Trainer = stages.trainer
    for phase in ("_to_batch", "_forward_backward", "_optimizer_step"):
        setattr(trainer, phase, synced(getattr(trainer, phase)))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        trainer.fit()
    return {"recipe": name, "steps": args.steps, "syncs": dict(found)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipes", nargs="+")
    p.add_argument("--data", default=str(CIFAR / "train.parquet"))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--set", action="append")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("sync_check needs a CUDA device")
    rows = [check(name, args) for name in args.recipes]
    for row in rows:
        print(json.dumps(row, indent=1))
    if args.out:
        args.out.write_text(json.dumps([{**r, **environment()} for r in rows], indent=2) + "\n")


if __name__ == "__main__":
    main()
