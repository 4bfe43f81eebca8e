"""Issue 24, part 2: no checkpoint is written from, or evaluated with, nan or inf weights; metrics are strict JSON.

A finite loss does not make a finite update: the trainer checks the parameters, the method's
buffers (queues, teachers, centres) and the optimiser's state before each checkpoint, stops with
one message naming the last truly finite checkpoint, and ``clcli eval`` refuses weights holding
nan or inf.  Each fault is planted right after the optimiser step of a checkpoint step, so the
step's own loss is finite and only the new guard can catch it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from clcli.assemble import prepare_training
from clcli.cli import app
from clcli.engine import checkpoint as ckpt
from clcli.engine.finite import last_finite_checkpoint, non_finite
from clcli.engine.metrics_log import metrics_line, read_records
from clcli.engine.trainer import Trainer
from clcli.errors import TrainingError
from clcli.train import pretrain

from .helpers import losses, set_args, tiny_overrides, tiny_recipe

runner = CliRunner()


def strict_rows(run: Path) -> list[dict]:
    """metrics.jsonl read by a strict JSON parser (no NaN/Infinity tokens), as other tools read it."""

    def refuse(token: str):
        raise ValueError(f"non-standard JSON token {token}")

    return [json.loads(line, parse_constant=refuse) for line in (run / "metrics.jsonl").read_text().splitlines()]


def plant_after_step(monkeypatch, at_step: int, plant) -> None:
    """Call ``plant(trainer)`` right after optimiser step ``at_step`` (its loss is already finite)."""
    original = Trainer._optimizer_step

    def step_then_plant(self, live):
        original(self, live)
        if self.state.step == at_step:
            with torch.no_grad():
                plant(self)

    monkeypatch.setattr(Trainer, "_optimizer_step", step_then_plant)


SIX_STEPS = ("trainer.steps=6", "trainer.checkpoint_every=2", "trainer.log_every=1")


def test_lr_inf_is_refused_before_anything_is_written(tmp_path):
    run = tmp_path / "run"
    res = runner.invoke(
        app, ["pretrain", "--recipe", "simclr", "--out", str(run), *set_args(*tiny_overrides("simclr", "optim.lr=inf"))]
    )
    assert res.exit_code == 2 and "optim.lr" in res.output and "finite" in res.output, res.output
    assert "Traceback" not in res.output and not run.exists()


def test_weights_turning_non_finite_stop_the_cli_run_without_a_checkpoint(tmp_path, monkeypatch):
    """The issue's --set optim.lr=inf case as the recipe now allows it: a finite loss, an update to inf."""
    run = tmp_path / "run"

    def blow_up(trainer):
        next(trainer.method.parameters()).fill_(math.inf)

    plant_after_step(monkeypatch, 4, blow_up)
    args = ["pretrain", "--recipe", "simclr", "--out", str(run), "--no-progress"]
    res = runner.invoke(app, [*args, *set_args(*tiny_overrides("simclr", *SIX_STEPS))])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    text = " ".join(res.output.split())
    assert "weights or optimiser state became non-finite" in text and "step 4" in text
    first_param = next(n for n, _ in prepare_training(tiny_recipe("simclr"), tmp_path / "x").method.named_parameters())
    assert first_param in text
    assert f"the last finite checkpoint is {run / 'checkpoints' / 'step-00000002'}" in text
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == ["step-00000002"]  # step 4 never written
    assert [r["step"] for r in strict_rows(run)] == [1, 2, 3, 4]  # step 4's loss was finite and is logged
    # the finite checkpoint evaluates
    res = runner.invoke(app, ["eval", "knn", "--run", str(run), "--test-limit", "20", "--json"])
    assert res.exit_code == 0, res.output


def test_nan_planted_in_the_optimiser_state_stops_before_the_checkpoint(tmp_path, monkeypatch):
    recipe = tiny_recipe("simclr", *SIX_STEPS)  # SGD with momentum: a momentum buffer per parameter

    def poison_momentum(trainer):
        param = trainer.optimizer.param_groups[0]["params"][0]
        trainer.optimizer.state[param]["momentum_buffer"][0] = math.nan

    plant_after_step(monkeypatch, 4, poison_momentum)
    stages = prepare_training(recipe, tmp_path / "run")
    first = stages.trainer.optimizer.param_groups[0]["params"][0]
    name = next(n for n, p in stages.method.named_parameters() if p is first)
    with pytest.raises(TrainingError) as err:
        stages.trainer.fit()
    message = str(err.value)
    assert f"momentum_buffer of {name} in the optimiser state" in message and "1 of " in message
    assert "the last finite checkpoint is" in message and message.count("step-00000002") == 1
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step-00000002"
    assert all(torch.isfinite(p).all() for p in stages.method.parameters())  # the weights themselves were finite


@pytest.mark.parametrize(("recipe_name", "buffer"), [("moco-v2", "queue.data"), ("dino", "center")])
def test_nan_in_a_methods_buffer_stops_before_the_checkpoint(tmp_path, monkeypatch, recipe_name, buffer):
    """A queue or a centre is saved with the weights: a nan there would poison every later step."""
    recipe = tiny_recipe(recipe_name, *SIX_STEPS)

    def poison(trainer):
        dict(trainer.method.named_buffers())[buffer].view(-1)[0] = math.nan

    plant_after_step(monkeypatch, 4, poison)
    stages = prepare_training(recipe, tmp_path / "run")
    with pytest.raises(TrainingError, match=f"1 of [0-9]+ tensors \\({buffer}\\)"):
        stages.trainer.fit()
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step-00000002"


def test_eval_and_export_refuse_a_checkpoint_holding_non_finite_weights(tmp_path):
    """A checkpoint poisoned before the guard existed is not scored silently: the finite one is named."""
    run = tmp_path / "run"
    pretrain(tiny_recipe("simclr", "trainer.steps=4", "trainer.checkpoint_every=2"), run)
    poisoned = run / "checkpoints" / "step-00000004"
    weights = ckpt.load_model_state(poisoned)
    names = [n for n, v in weights.items() if v.is_floating_point()]
    weights[names[0]] = torch.full_like(weights[names[0]], math.nan)
    weights[names[1]][0] = math.inf
    save_file(weights, str(poisoned / ckpt.MODEL_FILE))
    assert non_finite(weights) == names[:2]
    assert last_finite_checkpoint(run).name == "step-00000002"
    for args in (
        ["eval", "knn", "--run", str(run), "--test-limit", "20"],
        ["eval", "knn", "--run", str(run), "--checkpoint", str(poisoned)],
        ["export", "--run", str(run), "--out", str(tmp_path / "e.safetensors")],
    ):
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        text = " ".join(res.output.split())
        assert f"checkpoint {poisoned} holds non-finite weights (nan or inf) in 2 of " in text
        assert f"pass --checkpoint {run / 'checkpoints' / 'step-00000002'}" in text
    assert not (tmp_path / "e.safetensors").exists()


def test_metrics_lines_are_strict_json_and_read_back_as_floats(tmp_path):
    record = {"step": 3, "loss": 1.25, "lr": math.nan, "grad": math.inf, "low": -math.inf, "top": [0.5, math.nan]}
    line = metrics_line(record)
    assert line.endswith("\n") and "NaN" not in line and "Infinity" not in line
    assert json.loads(line, parse_constant=lambda t: pytest.fail(t)) == {
        "step": 3, "loss": 1.25, "lr": "nan", "grad": "inf", "low": "-inf", "top": [0.5, "nan"]
    }  # fmt: skip
    path = tmp_path / "metrics.jsonl"
    # a line of an earlier version (a bare NaN token) and a last line cut short by a kill
    path.write_text(line + '{"step": 4, "lr": NaN}\n' + '{"step": 5, "lo')
    back = read_records(path)
    assert len(back) == 2 and back[0]["loss"] == 1.25 and back[0]["grad"] == math.inf and back[0]["low"] == -math.inf
    assert math.isnan(back[0]["lr"]) and math.isnan(back[0]["top"][1]) and math.isnan(back[1]["lr"])


def test_a_finished_run_resumed_reports_its_last_loss(tmp_path):
    """Issue 25: --resume on a finished run printed final_loss nan."""
    run = tmp_path / "run"
    sets = set_args(*tiny_overrides("simclr", "trainer.steps=2"))
    assert runner.invoke(app, ["pretrain", "--recipe", "simclr", "--out", str(run), "--json", *sets]).exit_code == 0
    before = (run / "metrics.jsonl").read_text()
    res = runner.invoke(app, ["pretrain", "--resume", "--out", str(run), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index("{") :])
    assert summary["final_loss"] == losses(run)[-1] and summary["steps"] == 2
    res = runner.invoke(app, ["pretrain", "--resume", "--out", str(run), "--no-progress"])
    assert res.exit_code == 0 and "already finished at step 2: nothing to train" in " ".join(res.output.split())
    assert "nan" not in res.output
    assert (run / "metrics.jsonl").read_text() == before  # nothing logged again
