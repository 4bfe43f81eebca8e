"""End-to-end training speed of a recipe with views.backend=per_sample against views.backend=batched.

Runs the real training loop (data loading, views, model step) in a fresh process per run, the two
back-ends interleaved (A, B, A, B, ...), and reports per run: images/s over the timed steps (after
``--warmup`` steps, from the run's metrics) and the CPU seconds the whole fit used per trained image
(the process and its DataLoader workers), which a busy machine disturbs less than the wall clock.

    PYTHONPATH=.:bench python bench/notes/views_backend_speed.py simclr --batch 128 --steps 4 --warmup 2 \\
        --pairs 3 --workers 1 --set trainer.threads=2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import CIFAR

CHILD = r"""
import json, resource, sys, time
from clcli.assemble import prepare_training
from clcli.recipe import load_recipe
from clcli.runs import read_metrics
name, out, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
recipe = load_recipe(name, overrides)
stages = prepare_training(recipe, out)
def cpu():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime
c0, t0 = cpu(), time.perf_counter()
summary = stages.trainer.fit()
c1, t1 = cpu(), time.perf_counter()
rows = [r for r in read_metrics(out) if "images_per_s" in r]
print(json.dumps({"images_per_s": rows[-1]["images_per_s"], "cpu_s_per_image": (c1 - c0) / summary["images"],
                  "fit_s": t1 - t0, "backend": summary["views_backend"], "images": summary["images"]}))
"""


def run(name: str, backend: str, args: argparse.Namespace) -> dict:
    overrides = [
        f"data.source={args.data}",
        f"trainer.batch_size={args.batch}",
        f"trainer.precision={args.precision}",
        f"trainer.steps={args.warmup + args.steps}",
        f"trainer.log_every={args.warmup}",
        "trainer.checkpoint_every=1000000",
        f"data.num_workers={args.workers}",
        f"data.limit={args.batch * (args.warmup + args.steps)}",
        f"views.backend={backend}",
        *(args.set or []),
    ]
    with tempfile.TemporaryDirectory(prefix="clcli-vbs-") as tmp:
        cmd = [sys.executable, "-c", CHILD, name, str(Path(tmp) / "run"), json.dumps(overrides)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("recipe")
    p.add_argument("--data", default=str(CIFAR / "train.parquet"))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--set", action="append")
    args = p.parse_args()
    rows: dict[str, list[dict]] = {"per_sample": [], "batched": []}
    for k in range(args.pairs):
        for backend in rows:
            r = run(args.recipe, backend, args)
            rows[backend].append(r)
            print(
                f"pair {k + 1} {backend:>10}: {r['images_per_s']:7.2f} images/s, "
                f"{r['cpu_s_per_image'] * 1e3:7.2f} ms CPU per image",
                flush=True,
            )
    ips = {b: statistics.median(r["images_per_s"] for r in rs) for b, rs in rows.items()}
    cpu = {b: statistics.median(r["cpu_s_per_image"] for r in rs) for b, rs in rows.items()}
    print(
        f"{args.recipe}, batch {args.batch}, {args.precision}, workers {args.workers}, {args.set or []}: "
        f"median images/s per_sample {ips['per_sample']:.2f}, batched {ips['batched']:.2f} "
        f"(batched/per_sample {ips['batched'] / ips['per_sample']:.2f}); CPU per image per_sample "
        f"{cpu['per_sample'] * 1e3:.1f} ms, batched {cpu['batched'] * 1e3:.1f} ms "
        f"(per_sample/batched {cpu['per_sample'] / cpu['batched']:.2f})"
    )


if __name__ == "__main__":
    main()
