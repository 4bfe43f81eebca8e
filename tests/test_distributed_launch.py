"""``clcli pretrain`` under torchrun, as a user runs it: two CPU processes (gloo) on one node or two.

One two-process run of a tiny SimCLR recipe is the reference (module fixture).  Against it: what
the run folder holds (rank 0 alone writes), the multi-node form (two torchrun launches, one
process each, rendezvous on 127.0.0.1) and a run SIGKILLed mid-way and resumed, which must end
exactly where the uninterrupted one did.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clcli.engine import checkpoint as ckpt
from tests.dist_harness import free_port

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
STEPS = 40
SETS = [
    "model.backbone.name=convnet",
    "model.backbone.width=8",
    "views.groups.0.size=16",
    "views.eval_size=16",
    "method.projector=[32, 16]",
    "trainer.batch_size=16",
    f"trainer.steps={STEPS}",
    "trainer.log_every=1",
    "trainer.checkpoint_every=4",
    "trainer.precision=fp32",
    "trainer.threads=1",
    "data.limit=64",
    "optim.warmup_epochs=0",
]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

pytestmark = [
    pytest.mark.skipif(not TORCHRUN.exists(), reason=f"no torchrun beside {sys.executable}"),
    pytest.mark.skipif(not Path("/proc").is_dir(), reason="finding torchrun's workers needs /proc"),
]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update({"PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    return env


def _pretrain_args(out: Path, *extra: str) -> list[str]:
    sets = [a for s in SETS for a in ("--set", s)]
    return ["-m", "clcli", "pretrain", "--recipe", "simclr", "--out", str(out), "--json", *sets, *extra]


def _torchrun(launch: list[str], out: Path, *extra: str, **popen: object) -> subprocess.Popen:
    return subprocess.Popen(
        [str(TORCHRUN), *launch, *_pretrain_args(out, *extra)],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,  # type: ignore[arg-type]
    )


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{stderr[-4000:]}")
    assert proc.returncode == 0, f"torchrun exited with {proc.returncode}:\n{stderr[-6000:]}"
    return stdout


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc), deepest last."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    found = ckpt.latest_checkpoint(run)
    assert found is not None and found.name == f"step-{STEPS:08d}"
    return load_file(str(found / ckpt.MODEL_FILE))


def _losses_by_step(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}  # a resumed run's repeated steps: the last


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The README's command: ``torchrun --standalone --nproc-per-node 2 -m clcli pretrain ...``."""
    out = tmp_path_factory.mktemp("torchrun") / "run"
    stdout = _finish(_torchrun(["--standalone", "--nproc-per-node", "2"], out))
    return out, stdout


def test_torchrun_two_processes_one_report_one_writer(reference: tuple[Path, str]) -> None:
    out, stdout = reference
    summary = json.loads(stdout)  # rank 0 alone reports: exactly one JSON document
    assert summary["steps"] == STEPS and summary["images"] == STEPS * 16  # the global batch is 16
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # one record per step, not one per rank
    assert json.loads((out / "provenance.json").read_text())["processes"] == 2
    top = sorted(p.name for p in out.iterdir())
    logs = ["tensorboard"] if importlib.util.find_spec("tensorboard") is not None else []
    assert top == sorted(["checkpoints", "metrics.jsonl", "provenance.json", "recipe.yaml", *logs])
    if logs:  # one event file: rank 0 alone logs
        assert len([p for p in (out / "tensorboard").rglob("*") if "tfevents" in p.name]) == 1
    kept = sorted(p.name for p in (out / ckpt.CKPT_DIR).iterdir())
    assert kept == [ckpt.LATEST, f"step-{STEPS - 4:08d}", f"step-{STEPS:08d}"]  # no temporaries left


def test_two_nodes_train_like_one_node(reference: tuple[Path, str], tmp_path: Path) -> None:
    out = tmp_path / "run"
    port = str(free_port())
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port]
    nodes = [_torchrun([*common, "--node-rank", str(rank)], out) for rank in (0, 1)]
    outputs = [_finish(node) for node in nodes]
    assert json.loads(outputs[0])["steps"] == STEPS and outputs[1].strip() == ""  # node 1 (rank 1) says nothing
    want = _final_weights(reference[0])
    got = _final_weights(out)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=0, rtol=0, msg=key)


def test_sigkilled_run_resumes_to_the_uninterrupted_result(reference: tuple[Path, str], tmp_path: Path) -> None:
    out = tmp_path / "run"
    launch = ["--standalone", "--nproc-per-node", "2"]
    proc = _torchrun(launch, out)
    pointer = out / ckpt.CKPT_DIR / ckpt.LATEST
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if pointer.exists() and pointer.read_text().strip() >= "step-00000004":
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed; make it longer"
    for pid in [*_descendants(proc.pid), proc.pid]:  # both workers (torchrun gives them sessions of their own)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.communicate()
    killed_at = ckpt.latest_checkpoint(out)
    assert killed_at is not None and killed_at.name < f"step-{STEPS:08d}"

    _finish(_torchrun(launch, out, "--resume"))
    want, got = _final_weights(reference[0]), _final_weights(out)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=0, rtol=0, msg=key)
    assert _losses_by_step(out) == _losses_by_step(reference[0])
