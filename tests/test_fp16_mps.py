"""trainer.precision fp16 (a gradient scaler, CUDA only) and trainer.device mps (where torch has it)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from clcli import assemble, precision
from clcli.assemble import prepare_training
from clcli.cli import app
from clcli.engine.device import pick_device
from clcli.engine.optim import LossScaling
from clcli.errors import RecipeError, TrainingError

from .helpers import set_args, tiny_overrides, tiny_recipe
from .test_reliability_io import assert_user_error

CPU = torch.device("cpu")


def test_fp16_is_refused_off_cuda_and_kept_on_it(tmp_path):
    with pytest.raises(RecipeError, match="fp16 needs a CUDA GPU.*trainer.precision=fp32"):
        precision.resolve_precision("fp16", CPU)
    assert precision.resolve_precision("fp16", torch.device("cuda")) == ("fp16", None)
    assert not precision.use_bf16("fp16", CPU)  # evaluating an fp16 run on a CPU: plain fp32, no refusal
    assert precision.autocast_dtype("fp16") == torch.float16 and precision.autocast_dtype("fp32") is None
    res = CliRunner().invoke(
        app,
        ["pretrain", "--recipe", "simclr", "--out", str(tmp_path / "run"),
         *set_args(*tiny_overrides("simclr", "trainer.precision=fp16"))],
        env={"COLUMNS": "1000"},
    )  # fmt: skip
    assert_user_error(res, "trainer.precision fp16 needs a CUDA GPU")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_mps_is_accepted_only_where_torch_has_it(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(TrainingError, match="'mps'.*not available"):
        pick_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device("mps") == torch.device("mps")
    assert tiny_recipe("simclr", "trainer.device=mps").trainer.device == "mps"


def test_only_fp16_steps_through_the_scaler():
    assert LossScaling("fp32", CPU).scaler is None and LossScaling("bf16", CPU).scaler is None
    assert isinstance(LossScaling("fp16", CPU).scaler, torch.amp.GradScaler)


def test_the_fp16_step_scales_the_loss_and_unscales_before_the_step(tmp_path, monkeypatch):
    """The trainer's fp16 path on the CPU (GradScaler("cpu"), float16 autocast), the CUDA refusal lifted."""
    monkeypatch.setattr(assemble, "resolve_precision", lambda requested, device: (requested, None))
    recipe = tiny_recipe("simclr", "trainer.precision=fp16", "trainer.steps=3", "optim.grad_clip=1.0")
    stages = prepare_training(recipe, tmp_path / "run", show_progress=False)
    scaler = stages.trainer.scaling.scaler
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()
    order: list[str] = []
    scales: list[float] = []
    params = [p for p in stages.method.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    scale, unscale, step = scaler.scale, scaler.unscale_, scaler.step

    def scaled(loss):
        scales.append(scaler.get_scale())
        return scale(loss)

    def unscaled(optimizer):
        order.append("unscale")
        return unscale(optimizer)

    def stepped(optimizer, *args, **kwargs):
        order.append("step")
        return step(optimizer, *args, **kwargs)

    monkeypatch.setattr(scaler, "scale", scaled)
    monkeypatch.setattr(scaler, "unscale_", unscaled)
    monkeypatch.setattr(scaler, "step", stepped)
    stages.trainer.fit()
    # the gradients are unscaled before the method's hooks and the clip, then the scaler steps (or skips)
    assert order == ["unscale", "step"] * 3
    assert scales[0] == 65536.0 and all(b in (a, a / 2) for a, b in zip(scales, scales[1:], strict=False))
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, params, strict=True))


def test_an_fp16_run_resumes_with_its_loss_scale(tmp_path, monkeypatch):
    monkeypatch.setattr(assemble, "resolve_precision", lambda requested, device: (requested, None))
    recipe = tiny_recipe("simclr", "trainer.precision=fp16", "trainer.steps=5")
    stages = prepare_training(recipe, tmp_path / "run", show_progress=False)
    start = {
        "scale": 1024.0,
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": 2000,
        "_growth_tracker": 0,
    }
    stages.trainer.scaling.load_state_dict(start)  # not GradScaler's initial 65536, so a restart would show
    assert stages.trainer.fit(stop_after=3)["interrupted"]
    saved = json.loads((tmp_path / "run" / "checkpoints" / "step-00000003" / "trainer.json").read_text())
    assert saved["grad_scaler"]["scale"] == 1024.0 and saved["grad_scaler"]["_growth_tracker"] == 3
    resumed = prepare_training(recipe, tmp_path / "run", resume=True, show_progress=False).trainer.scaling.scaler
    assert resumed.get_scale() == 1024.0 and resumed.state_dict()["_growth_tracker"] == 3
    plain = prepare_training(tiny_recipe("simclr"), tmp_path / "fp32", show_progress=False).trainer
    assert plain.scaling.state_dict() is None and plain._trainer_state()["grad_scaler"] is None
