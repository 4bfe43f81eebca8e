"""The GPU check script's job handling, run with a stand-in Python that records each benchmark call."""

from __future__ import annotations

import os
import shutil
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
