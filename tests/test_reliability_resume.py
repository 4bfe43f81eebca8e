"""Issue 24, part 4: after any number of kills and resumes, metrics.jsonl is one clean sequence of steps.

A kill between two checkpoints leaves records of steps the resumed run trains again; on resume
the file is cut back to what it held when the checkpoint was written (its length is saved in the
checkpoint), so those steps appear once, with the uninterrupted run's values.  A kill is simulated
by an exception no code catches, raised right after a record is written (before its checkpoint).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clcli.engine import checkpoint as ckpt
from clcli.engine.metrics_log import cut_back, read_records
from clcli.engine.trainer import Trainer
from clcli.train import pretrain

from .helpers import losses, metric_rows, tiny_recipe

_LOG_INTERVAL = Trainer._log_interval


class Killed(BaseException):
    """Stands for SIGKILL: nothing in clcli catches it, nothing after it runs."""


def kill_after_record(monkeypatch, step: int | None, partial_line: bool = False) -> None:
    """The next runs die right after writing the record of ``step`` (None: they run to the end)."""

    def log_then_die(self, live, bar):
        _LOG_INTERVAL(self, live, bar)
        if self.state.step == step:
            if partial_line:  # killed while writing the next line
                with open(self.metrics_path, "a") as f:
                    f.write('{"step": 99, "loss": 1.')
            raise Killed

    monkeypatch.setattr(Trainer, "_log_interval", log_then_die)


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "cluster_seconds")} for r in rows]


def test_kills_between_checkpoints_leave_one_clean_sequence(tmp_path, monkeypatch):
    recipe = tiny_recipe("simclr", "trainer.steps=8", "trainer.checkpoint_every=3")
    reference = losses(pretrain(recipe, tmp_path / "full")["run"])
    run = tmp_path / "cut"
    # before the first checkpoint (the resume starts at step 0), between checkpoints 3 and 6, and just
    # before checkpoint 6 is written
    for kill_at, partial in ((2, True), (5, False), (6, True)):
        kill_after_record(monkeypatch, kill_at, partial)
        with pytest.raises(Killed):
            pretrain(recipe, run, resume=kill_at != 2)
        assert [r["step"] for r in metric_rows(run)][-1] == kill_at  # the partial line is not a record
    assert ckpt.latest_checkpoint(run).name == "step-00000003"
    kill_after_record(monkeypatch, None)
    pretrain(recipe, run, resume=True)
    assert [r["step"] for r in metric_rows(run)] == list(range(1, 9))
    assert losses(run) == reference  # bitwise: JSON floats round-trip exactly
    assert all(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())


def test_records_logged_at_the_checkpoint_step_after_it_are_not_repeated(tmp_path, monkeypatch):
    """DeepCluster logs its k-means at each epoch's start, at the step of the checkpoint just written:
    cutting by step alone would keep that record and log it again."""
    recipe = tiny_recipe("deepcluster", "trainer.checkpoint_every=3")  # 3 steps an epoch, 7 steps
    pretrain(recipe, tmp_path / "full")
    full = without_timing(metric_rows(tmp_path / "full"))
    assert sum(r["step"] == 3 for r in full) == 2  # step 3's loss, then the next epoch's k-means
    kill_after_record(monkeypatch, 4)
    with pytest.raises(Killed):
        pretrain(recipe, tmp_path / "cut")
    kill_after_record(monkeypatch, None)
    pretrain(recipe, tmp_path / "cut", resume=True)
    assert without_timing(metric_rows(tmp_path / "cut")) == full


def _lines(*steps: int) -> str:
    return "".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in steps)


def test_cut_back_by_saved_length_and_by_step(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    kept = _lines(1, 2, 3, 3)
    path.write_text(kept + _lines(4, 5) + '{"step": 6, "lo')
    assert cut_back(path, 3, len(kept.encode())) == 3 and path.read_text() == kept
    # a checkpoint from an earlier version (no saved length), or a file changed since: by step
    for size in (None, 10**6, 5):
        path.write_text(_lines(1, 2, 3, 4, 5) + '{"step": 6, "lo')
        assert cut_back(path, 3, size) == 3
        assert [r["step"] for r in read_records(path)] == [1, 2, 3]
    path.write_text(_lines(1, 2))
    assert cut_back(path, 0, 0) == 2 and path.read_text() == ""
    assert cut_back(tmp_path / "none.jsonl", 3, 10) == 0
