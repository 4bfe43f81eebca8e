"""Benchmark scripts: the GPU check's job handling (a stand-in Python records each call), the bars summary."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run_gpu_check(tmp_path: Path, *jobs: str, **env: str) -> list[str]:
    calls = tmp_path / "calls"
    fake = tmp_path / "fakepy"
    fake.write_text(
        "#!/bin/bash\n"
        f'case "$1" in quality.py|resume_check.py|speed.py) echo "$*" >> {calls}; exit 0;; esac\n'
        f'exec {sys.executable} "$@"\n'
    )
    fake.chmod(0o755)
    repo = tmp_path / "repo"  # a copy of the script beside an empty bench/, so nothing is written in the checkout
    (repo / "bench").mkdir(parents=True)
    shutil.copy(ROOT / "bench" / "gpu_check.sh", repo / "bench" / "gpu_check.sh")
    for name in ("method.projector=5", "method.predictor=6"):  # what [512,512,128] would match as a file pattern
        (repo / "bench" / name).touch()
    subprocess.run(
        ["bash", "bench/gpu_check.sh", *jobs],
        cwd=repo,
        env={**os.environ, "PY": str(fake), "OUT": str(tmp_path / "out"), "DEADLINE": "100000", **env},
        capture_output=True,
        check=True,
        timeout=120,
    )
    return calls.read_text().splitlines() if calls.exists() else []


def test_gpu_check_runs_command_line_and_file_jobs_with_their_overrides(tmp_path):
    jobs = tmp_path / "jobs.txt"
    jobs.write_text(
        "# a comment, then a blank line\n\n"
        "ss-small   simsiam 3 method.projector=[512,512,128] method.predictor=[64,128]\n"
        "base-cmc   untrained-cmc 1\n"
    )
    data = tmp_path / "cifar"
    data.mkdir()
    calls = run_gpu_check(tmp_path, "swav:2", JOBS=str(jobs), DATA=str(data), RESUME="simclr")
    quality = [c for c in calls if c.startswith("quality.py")]
    assert quality[0].startswith("quality.py swav --seed 2 --name swav-gpu ")
    assert quality[1].startswith(
        "quality.py simsiam --seed 3 --name ss-small --workers 8 "
        "--set method.projector=[512,512,128] --set method.predictor=[64,128] "
    )  # the overrides arrive as written, not expanded as file patterns
    assert quality[2].startswith("quality.py untrained --baseline-recipe cmc --seed 1 --name base-cmc ")
    assert all(c.endswith(f"--data {data}") for c in quality)  # an absolute path, though the runs start in bench/
    resume = [c for c in calls if c.startswith("resume_check.py")]
    assert [c.split("--set ")[1].split()[0] for c in resume] == [
        "trainer.deterministic=false",
        "trainer.deterministic=true",
    ]
    speed = [c for c in calls if c.startswith("speed.py")]
    assert speed[0].startswith("speed.py simclr swav cmc --batch 256 --precision bf16 fp32 ")
    assert speed[1].startswith("speed.py simclr ") and "--set trainer.deterministic=true" in speed[1]


def test_gpu_check_skips_jobs_that_would_not_fit_the_deadline(tmp_path):
    calls = run_gpu_check(tmp_path, "simclr:0", DEADLINE="40")  # too short for a run and for the speed table
    assert calls == []
    assert "skip simclr-gpu seed 0 (time)" in (tmp_path / "out" / "main.log").read_text()


def _row(method: str, seed: int, knn: float, when: str, overrides: tuple[str, ...] = (), epochs: float = 1) -> dict:
    return {
        "method": method,
        "seed": seed,
        "knn_top1": knn,
        "when": when,
        "overrides": list(overrides),
        "epochs": epochs,
    }


def test_bars_pool_seeds_pair_them_with_the_untrained_seed_and_drop_rows_of_an_older_preset(tmp_path):
    rows = [
        _row("untrained", 0, 0.36, "2026-11-28T10:00:00+00:00"),
        _row("untrained", 1, 0.34, "2026-12-05T10:00:00+00:00"),
        _row("simsiam", 0, 0.38, "2026-11-28T12:00:00+00:00"),
        _row("simsiam-h200", 0, 0.40, "2026-12-04T12:00:00+00:00"),  # the same seed on another device
        _row("simsiam-gpu", 1, 0.35, "2026-12-05T12:00:00+00:00"),
        _row("simsiam", 1, 0.99, "2026-12-05T13:00:00+00:00", ("optim.lr=9",)),  # other settings: not the preset
        _row("swav", 0, 0.10, "2026-11-29T00:00:00+00:00"),  # before the preset's change: left out
        _row("swav-noqueue", 0, 0.39, "2026-11-29T01:00:00+00:00", ("method.queue_length=0",)),
        _row("swav", 1, 0.37, "2026-11-29T16:00:00+00:00"),
        _row("cmc", 0, 0.44, "2026-11-29T13:00:00+00:00", epochs=4),
        _row("untrained-pinit", 0, 0.33, "2026-12-05T10:00:00+00:00", ("model.backbone.init=pytorch",)),
    ]
    results = tmp_path / "quality.json"
    results.write_text(json.dumps(rows))
    out = tmp_path / "bars"
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bars.py"), "--results", str(results), "--out", str(out)],
        capture_output=True,
        check=True,
        timeout=120,
    )
    bars = {b["method"]: b for b in json.loads((out / "bars.json").read_text())}
    simsiam = bars["simsiam"]
    assert simsiam["runs_by_seed"] == {"0": [0.38, 0.40], "1": [0.35]}
    assert simsiam["knn_by_seed"] == pytest.approx({"0": 0.39, "1": 0.35})
    assert simsiam["knn_mean"] == pytest.approx(0.37)
    assert simsiam["knn_sd"] == pytest.approx(statistics.stdev([0.39, 0.35]))
    assert simsiam["paired_gain_mean"] == pytest.approx((0.03 + 0.01) / 2)  # each seed against its own untrained row
    assert simsiam["mean_minus_reference"] == pytest.approx(0.37 - 0.383)
    assert simsiam["seeds_at_reference"] == 1
    swav = bars["swav"]
    assert swav["knn_by_seed"] == pytest.approx({"0": 0.39, "1": 0.37})  # the older preset's 0.10 is not counted
    assert bars["cmc-4x"]["knn_by_seed"] == pytest.approx({"0": 0.44})
    assert bars["cmc"]["seeds"] == []  # the four-epoch row is not a one-epoch figure
    table = (out / "bars.md").read_text()
    assert "| simsiam | 4 | one epoch | s0 0.380/0.400 s1 0.350 | 0.370 |" in table
    assert "- torchvision init (the presets): s0 0.360 s1 0.340; mean 0.350, sd 0.014" in table
    assert "- pytorch init (lightly's): s0 0.330; mean 0.330\n" in table
