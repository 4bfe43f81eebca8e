"""Nothing lost (issue 23): SimCLR's CIFAR-10 kNN after a fixed short budget, batched views against per-sample.

For each seed and each ``views.backend`` it trains the SimCLR preset for ``--steps`` steps at ``--batch``
through the CLI, then scores weighted kNN (k = 200, T = 0.1, backbone features) from a fixed slice of the
train split to a fixed slice of the test split, and prints the table with each back-end's mean and spread.
Runs of one seed are started side by side (one thread each). Run from the repository root::

    PYTHONPATH=$PWD python bench/notes/views_backend_quality.py --seeds 0 1 --steps 100 --batch 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CIFAR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cifar10"
BACKENDS = ("per_sample", "batched")


def clcli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "clcli", *args], env=env, stdout=subprocess.PIPE, text=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(CIFAR), help="folder with CIFAR-10's train.parquet and test.parquet")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--train-limit", type=int, default=10000)
    p.add_argument("--test-limit", type=int, default=2000)
    p.add_argument("--workdir", default="/tmp/clcli-views-quality")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "views_backend_quality.json"))
    args = p.parse_args()
    rows = []
    for seed in args.seeds:
        runs = {b: Path(args.workdir) / f"simclr-{b}-s{seed}" for b in BACKENDS}
        procs = [
            clcli(
                "pretrain",
                "--recipe",
                "simclr",
                "--data",
                str(Path(args.data) / "train.parquet"),
                "--out",
                str(run),
                "--overwrite",
                "--json",
                "--no-progress",
                "--set",
                f"views.backend={b}",
                "--set",
                f"seed={seed}",
                "--set",
                f"trainer.steps={args.steps}",
                "--set",
                f"trainer.batch_size={args.batch}",
                "--set",
                "trainer.threads=1",
                "--set",
                "data.num_workers=0",
                "--set",
                "trainer.online_knn_every=null",
            )  # fmt: skip
            for b, run in runs.items()
        ]
        trained = {b: json.loads(proc.communicate()[0]) for b, proc in zip(runs, procs, strict=True)}
        procs = [
            clcli(
                "eval",
                "knn",
                "--run",
                str(run),
                "--json",
                "--train-limit",
                str(args.train_limit),
                "--test-limit",
                str(args.test_limit),
            )  # fmt: skip
            for run in runs.values()
        ]
        for (b, _), proc in zip(runs.items(), procs, strict=True):
            result = json.loads(proc.communicate()[0])
            rows.append(
                {
                    "backend": b,
                    "seed": seed,
                    "steps": args.steps,
                    "batch": args.batch,
                    "final_loss": trained[b]["final_loss"],
                    "knn_top1": result["top1"],
                    "train_limit": args.train_limit,
                    "test_limit": args.test_limit,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    for b in BACKENDS:
        top1 = [r["knn_top1"] for r in rows if r["backend"] == b]
        sd = statistics.stdev(top1) if len(top1) > 1 else 0.0
        print(f"{b}: kNN top-1 {statistics.mean(top1):.4f} (sd {sd:.4f}, seeds {len(top1)})")
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
