"""Issue 24, file-system part: every misuse of a path ends in one message and exit code 2, nothing half-written
is left behind, a damaged checkpoint is named, and --resume falls back to the newest intact one."""

from __future__ import annotations

import errno
import json
import re
import shutil
import signal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clcli.cli import app
from clcli.engine import checkpoint as ckpt
from clcli.errors import FileSystemError
from clcli.fsio import atomic_output
from clcli.runs import read_metrics

from .helpers import set_args, tiny_overrides

runner = CliRunner()


def invoke(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "1000"})  # notes on one line each


def assert_user_error(res, *fragments: str, alone: bool = True) -> str:
    """Exit code 2 and one ``error:`` line, the last of the output (no traceback), holding every fragment.

    ``alone``: nothing else was printed (the error came before any work); else what training printed
    before it may precede it.
    """
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), res.output
    assert sum(ln.startswith("error:") for ln in lines) == 1 and (len(lines) == 1 or not alone), res.output
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])
    return lines[-1]


def leftovers(folder: Path) -> list[str]:
    """Temporary files (``*.tmp*``, ``.tmp-*``, write checks) anywhere under ``folder``."""
    return sorted(str(p) for p in Path(folder).rglob("*") if ".tmp" in p.name or p.name.startswith(".clcli-"))


def tiny(*extra: str) -> list[str]:
    return set_args(*tiny_overrides("simclr", *extra))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny SimCLR run of 4 steps with checkpoints after steps 2 and 4."""
    out = tmp_path_factory.mktemp("io") / "run"
    res = invoke(
        "pretrain", "--recipe", "simclr", "--out", out, "--no-progress",
        *tiny("trainer.steps=4", "trainer.checkpoint_every=2", "trainer.keep_checkpoints=3"),
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert [p.name for p in ckpt.complete_checkpoints(out)] == ["step-00000002", "step-00000004"]
    return out


def copy_of(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


# ------------------------------------------------------------------------------ unwritable outputs
@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "a-file.txt"
    path.write_text("not a folder\n")
    return path


def test_pretrain_refuses_an_unwritable_out_before_building_anything(tmp_path, a_file, monkeypatch):
    import clcli.assemble

    def never(*args, **kwargs):  # the data must not be opened before --out is checked
        raise AssertionError("the data was opened before --out was checked")

    monkeypatch.setattr(clcli.assemble, "open_data", never)
    assert_user_error(invoke("pretrain", "--recipe", "simclr", "--out", "/proc/x", *tiny()), "/proc/x")
    assert_user_error(
        invoke("pretrain", "--recipe", "simclr", "--out", a_file, *tiny()), str(a_file), "is a file, not a folder"
    )
    assert_user_error(
        invoke("pretrain", "--recipe", "simclr", "--out", a_file / "sub", *tiny()), "is a file, not a folder"
    )
    assert leftovers(tmp_path) == []


def test_eval_output_that_cannot_be_written_is_refused_before_the_model_loads(run, tmp_path, a_file):
    for protocol in ("knn", "linear"):
        assert_user_error(invoke("eval", protocol, "--run", run, "--output", "/proc/x/r.json"), "/proc/x/r.json")
        assert_user_error(invoke("eval", protocol, "--run", run, "--output", tmp_path), "is a folder")
        assert_user_error(
            invoke("eval", protocol, "--run", run, "--output", a_file / "r.json"), "is a file, not a folder"
        )
    assert leftovers(tmp_path) == [] and leftovers(run) == []


def test_export_to_a_folder_or_an_unwritable_place_leaves_nothing_behind(run, tmp_path, a_file):
    assert_user_error(invoke("export", "--run", run, "--out", "/proc/x/e.safetensors"), "/proc/x/e.safetensors")
    assert_user_error(invoke("export", "--run", run, "--out", tmp_path), "is a folder", "encoder.safetensors")
    assert_user_error(invoke("export", "--run", run, "--out", a_file / "e.safetensors"), "is a file, not a folder")
    assert leftovers(tmp_path) == []
    # an existing file is replaced, through a temporary that does not stay
    out = tmp_path / "encoder.safetensors"
    out.write_text("old")
    assert invoke("export", "--run", run, "--out", out).exit_code == 0
    assert out.stat().st_size > 1000 and leftovers(tmp_path) == []


def _disk_full(path, *args, **kwargs):
    Path(path).write_bytes(b"\0" * 100)  # a partial file, as a full disk leaves it
    raise OSError(errno.ENOSPC, "No space left on device")


def test_export_on_a_full_disk_is_one_message_and_keeps_the_old_file(run, tmp_path, monkeypatch):
    import clcli.export

    out = tmp_path / "encoder.safetensors"
    out.write_bytes(b"the previous export")
    monkeypatch.setattr(clcli.export, "save_file", lambda tensors, path, metadata=None: _disk_full(path))
    assert_user_error(invoke("export", "--run", run, "--out", out), "the disk is full", str(out))
    assert out.read_bytes() == b"the previous export" and leftovers(tmp_path) == []


def test_a_full_disk_during_a_checkpoint_stops_training_cleanly(tmp_path, monkeypatch):
    real = ckpt.save_file
    calls = {"n": 0}

    def second_save_fails(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] > 2:  # the first checkpoint (two files) is written, the second is not
            _disk_full(path)
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", second_save_fails)
    out = tmp_path / "run"
    res = invoke(
        "pretrain", "--recipe", "simclr", "--out", out, "--no-progress",
        *tiny("trainer.steps=4", "trainer.checkpoint_every=2"),
    )  # fmt: skip
    line = assert_user_error(res, "cannot write the checkpoint of step 4", "the disk is full", alone=False)
    assert "step-00000002" in line  # the newest complete checkpoint is named
    assert [p.name for p in ckpt.complete_checkpoints(out)] == ["step-00000002"]
    assert leftovers(out) == []


def test_atomic_output_removes_its_temporary_on_any_failure(tmp_path):
    target = tmp_path / "sub" / "result.json"
    with pytest.raises(FileSystemError, match="result.json: no space left"), atomic_output(target, "the result") as tmp:
        tmp.write_text("partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(KeyboardInterrupt), atomic_output(target, "the result") as tmp:
        tmp.write_text("partial")
        raise KeyboardInterrupt
    assert not target.exists() and leftovers(tmp_path) == []
    with atomic_output(target, "the result") as tmp:
        tmp.write_text("done")
    assert target.read_text() == "done" and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------ command-line values
def test_bad_limits_data_specs_and_override_paths_are_user_errors(run, tmp_path):
    assert_user_error(invoke("eval", "knn", "--run", run, "--test-limit", "-5"), "--test-limit", "-5")
    assert_user_error(invoke("eval", "linear", "--run", run, "--train-limit", "0"), "--train-limit")
    assert_user_error(invoke("eval", "knn", "--run", run, "--data", ""), "data spec", "empty")
    line = assert_user_error(
        invoke("pretrain", "--recipe", "simclr", "--data", "", "--out", tmp_path / "o"), "data spec", "empty"
    )
    assert "does not exist" not in line
    assert_user_error(
        invoke("pretrain", "--recipe", "simclr", "--out", tmp_path / "o", "--set", "trainer..epochs=1"),
        "trainer..epochs",
        "empty part",
    )
    assert_user_error(invoke("recipes", "show", "simclr", "--set", ".seed=1"), "empty part")
    assert invoke("recipes", "show", "simclr", "--set", "trainer.epochs=3").exit_code == 0
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ damaged checkpoints
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


@pytest.mark.parametrize(
    "damaged", [ckpt.STATE_FILE, ckpt.MODEL_FILE, ckpt.OPTIM_FILE], ids=["trainer.json", "model", "optimizer"]
)
def test_eval_and_export_name_the_damaged_file_and_the_intact_checkpoint(run, tmp_path, damaged):
    broken = copy_of(run, tmp_path / "run")
    _truncate(broken / "checkpoints" / "step-00000004" / damaged)
    expect = str(broken / "checkpoints" / "step-00000004" / damaged)
    line = assert_user_error(invoke("eval", "knn", "--run", broken), expect, "damaged", "--checkpoint")
    assert "step-00000002" in line
    assert_user_error(invoke("export", "--run", broken, "--out", tmp_path / "e.safetensors"), expect)
    # the intact checkpoint it names is usable
    res = invoke("eval", "knn", "--run", broken, "--checkpoint", broken / "checkpoints" / "step-00000002", "--json")
    assert res.exit_code == 0 and json.loads(res.output)["checkpoint"].endswith("step-00000002")
    # given explicitly, a checkpoint is read for its weights: a damaged weights or state file is named
    if damaged != ckpt.OPTIM_FILE:
        assert_user_error(
            invoke("eval", "knn", "--run", broken, "--checkpoint", broken / "checkpoints" / "step-00000004"), expect
        )


def test_resume_falls_back_to_the_newest_intact_checkpoint_and_says_so(run, tmp_path):
    broken = copy_of(run, tmp_path / "run")
    (broken / "checkpoints" / "step-00000004" / ckpt.STATE_FILE).write_text('{"step": 4, "epo')  # truncated
    res = invoke("pretrain", "--resume", "--out", broken, "--no-progress")
    assert res.exit_code == 0, res.output
    note = next(ln for ln in res.output.splitlines() if ln.startswith("note:") and "damaged" in ln)
    assert str(broken / "checkpoints" / "step-00000004" / "trainer.json") in note
    assert note.endswith("resuming from the newest intact checkpoint, step-00000002")
    # the steps after the intact checkpoint are trained again, exactly as the first time
    rows = [r for r in read_metrics(broken) if "loss" in r]
    first = {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}
    assert [r["step"] for r in rows][-2:] == [3, 4]
    assert [r["loss"] for r in rows][-2:] == [first[3], first[4]]
    assert ckpt.checkpoint_problem(broken / "checkpoints" / "step-00000004") is None  # written again, intact


def test_resume_with_every_checkpoint_damaged_refuses(run, tmp_path):
    broken = copy_of(run, tmp_path / "run")
    for step in ("step-00000002", "step-00000004"):
        (broken / "checkpoints" / step / ckpt.MODEL_FILE).write_bytes(b"garbage")
    line = assert_user_error(invoke("pretrain", "--resume", "--out", broken), "no intact checkpoint", "--overwrite")
    assert "model.safetensors" in line


def test_damaged_run_files_outside_checkpoints_are_named(run, tmp_path):
    broken = copy_of(run, tmp_path / "prov")
    (broken / "provenance.json").write_text("{")
    assert_user_error(invoke("pretrain", "--resume", "--out", broken), str(broken / "provenance.json"), "damaged")
    broken = copy_of(run, tmp_path / "latest")
    (broken / "checkpoints" / "latest").write_bytes(b"\xff\xfe\x00")  # a garbled pointer: the folders decide
    assert ckpt.latest_checkpoint(broken) == broken / "checkpoints" / "step-00000004"
    broken = copy_of(run, tmp_path / "keys")
    state = broken / "checkpoints" / "step-00000004" / ckpt.STATE_FILE
    state.write_text(json.dumps({"step": 4}))  # valid JSON without the trainer's fields: named on resume
    assert_user_error(invoke("pretrain", "--resume", "--out", broken), str(state), "lacks", "epoch")


# ------------------------------------------------------------------------------ Ctrl-C
def _interrupt_after(monkeypatch, step: int, times: int = 1) -> None:
    """Deliver SIGINT (Ctrl-C) ``times`` times right after optimiser step ``step``."""
    from clcli.engine.trainer import Trainer

    real = Trainer._optimizer_step

    def step_then_interrupt(self, live):
        real(self, live)
        if self.state.step == step:
            for _ in range(times):
                signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(Trainer, "_optimizer_step", step_then_interrupt)


def test_one_ctrl_c_saves_then_exits_130(tmp_path, monkeypatch):
    _interrupt_after(monkeypatch, 2)
    out = tmp_path / "run"
    res = invoke("pretrain", "--recipe", "simclr", "--out", out, "--no-progress", *tiny("trainer.steps=5"))
    assert res.exit_code == 130, res.output
    assert "stopped at step 2" in res.output and "--resume" in res.output
    assert ckpt.latest_checkpoint(out) == out / "checkpoints" / "step-00000002"
    res = invoke("pretrain", "--resume", "--out", out, "--no-progress", "--json")
    assert res.exit_code == 0 and json.loads(res.output)["steps"] == 5


def test_a_second_ctrl_c_stops_at_once_with_130(tmp_path, monkeypatch):
    _interrupt_after(monkeypatch, 1, times=2)
    out = tmp_path / "run"
    res = invoke("pretrain", "--recipe", "simclr", "--out", out, "--no-progress", *tiny("trainer.steps=5"))
    assert res.exit_code == 130 and "interrupted" in res.output and "Traceback" not in res.output
    assert leftovers(out) == []


@pytest.mark.parametrize(
    ("code", "words"),
    [(errno.EACCES, "permission denied"), (errno.EROFS, "read-only"), (errno.ENOSPC, "the disk is full")],
)
def test_a_folder_that_refuses_new_files_is_named_with_the_reason(tmp_path, monkeypatch, code, words):
    import clcli.fsio

    def refuse(*args, **kwargs):
        raise OSError(code, "refused")

    monkeypatch.setattr(clcli.fsio.tempfile, "mkstemp", refuse)  # root passes permission checks: simulate
    with pytest.raises(FileSystemError, match=f"run folder {re.escape(str(tmp_path / 'run'))}: .*{words}"):
        clcli.fsio.check_output_folder(tmp_path / "run")
    with pytest.raises(FileSystemError, match=words):
        clcli.fsio.check_output_file(tmp_path / "out" / "r.json", "the result file")
    res = invoke("pretrain", "--recipe", "simclr", "--out", tmp_path / "run", *tiny())
    assert_user_error(res, words)
    assert not (tmp_path / "run").exists()
