"""kill -9 at a random moment, then ``--resume``: does the run finish with the uninterrupted run's losses?

One uninterrupted tiny SimCLR run (``clcli pretrain`` in a subprocess, a checkpoint every 2 steps, a
metrics row every step) gives the reference loss of each step.  Each trial starts the same run in a
fresh folder, waits until it has logged a random number of steps (1 to 11 of 12, seeded), sends
SIGKILL after a further random delay of up to one step's time, then runs ``clcli pretrain --resume``
until it exits 0.  A trial is *resumed* when that happens, and *identical*
when every loss row of its metrics file (rows logged before the kill and repeated after the resume
included) equals the reference loss of its step, bit for bit, and *one sequence* when its metrics
file holds each step once, in increasing order, with no line cut short (the resume cuts the file
back to its checkpoint).  Run from the repository root::

    PYTHONPATH=$PWD python bench/notes/kill_resume.py --trials 10
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETS = [
    "model.backbone.name=convnet",
    "model.backbone.width=8",
    "views.groups.0.size=16",
    "views.eval_size=16",
    "method.projector=[32, 16]",
    "trainer.batch_size=32",
    "trainer.steps=12",
    "trainer.precision=fp32",
    "trainer.threads=1",
    "trainer.log_every=1",
    "trainer.checkpoint_every=2",
    "optim.warmup_epochs=0",
    "data.limit=256",
]
CODE = "import sys; from clcli.cli import main; sys.argv[0] = 'clcli'; sys.exit(main())"


def command(out: Path, resume: bool) -> list[str]:
    args = ["pretrain", "--out", str(out), "--no-progress"]
    if resume:
        return [sys.executable, "-c", CODE, *args, "--resume"]
    sets = [a for s in SETS for a in ("--set", s)]
    return [sys.executable, "-c", CODE, *args, "--json", "--recipe", "simclr", *sets]


def loss_rows(run: Path) -> tuple[list[tuple[int, float]], int]:
    """(step, loss) of every readable metrics row, and how many lines did not parse (a write cut by the kill)."""
    rows, bad = [], 0
    path = run / "metrics.jsonl"
    if not path.is_file():
        return rows, bad
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if "loss" in record:
            rows.append((record["step"], record["loss"]))
    return rows, bad


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="clcli-kill-"))
    start = time.perf_counter()
    ref = subprocess.run(command(tmp / "reference", False), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if ref.returncode != 0:
        sys.exit(ref.stderr)
    reference = dict(loss_rows(tmp / "reference")[0])
    step_time = float(json.loads(ref.stdout[ref.stdout.index("{") :])["seconds"]) / len(reference)
    print(f"reference: {len(reference)} steps in {wall:.1f} s ({step_time:.2f} s a step)", flush=True)
    results = []
    for trial in range(args.trials):
        out = tmp / f"trial-{trial}"
        target, delay = rng.randint(1, len(reference) - 1), rng.uniform(0.0, step_time)
        proc = subprocess.Popen(command(out, False), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and len(loss_rows(out)[0]) < target:
            time.sleep(0.02)
        time.sleep(delay)
        finished_first = proc.poll() is not None
        if not finished_first:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        ckpts = sorted(p.name for p in (out / "checkpoints").glob("step-*")) if (out / "checkpoints").is_dir() else []
        temps = sorted(p.name for p in (out / "checkpoints").glob(".*")) if (out / "checkpoints").is_dir() else []
        resumes, rc = 0, None
        while resumes < 3:
            resumes += 1
            res = subprocess.run(command(out, True), capture_output=True, text=True)
            rc = res.returncode
            if rc == 0:
                break
        rows, bad_lines = loss_rows(out)
        identical = rc == 0 and bool(rows) and all(reference.get(step) == loss for step, loss in rows)
        identical = identical and {s for s, _ in rows} == set(reference)
        one_sequence = rc == 0 and [s for s, _ in rows] == sorted(reference) and bad_lines == 0
        left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if ".tmp" in p.name)
        row = {
            "trial": trial,
            "kill_after_step": target,
            "then_s": round(delay, 3),
            "finished_before_kill": finished_first,
            "checkpoints_at_kill": ckpts,
            "temporaries_at_kill": temps,
            "resume_exit": rc,
            "resumed": rc == 0,
            "identical": identical,
            "one_sequence": one_sequence,
            "cut_metric_lines": bad_lines,
            "temporaries_after_resume": left,
            "error": None if rc == 0 else res.stderr.strip().splitlines()[-1:],
        }
        results.append(row)
        print(json.dumps(row), flush=True)
    summary = {
        "trials": len(results),
        "resumed": sum(r["resumed"] for r in results),
        "identical": sum(r["identical"] for r in results),
        "one_sequence": sum(r["one_sequence"] for r in results),
        "killed_during_a_checkpoint_write": sum(bool(r["temporaries_at_kill"]) for r in results),
        "temporaries_left_after_resume": sum(bool(r["temporaries_after_resume"]) for r in results),
    }
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "trials": results}, indent=2) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
