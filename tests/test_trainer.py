"""The training loop: learning, exact resume, atomic checkpoints, non-finite losses, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from clcli import precision
from clcli.assemble import prepare_training
from clcli.engine import checkpoint as ckpt
from clcli.errors import CheckpointError, ClcliError, TrainingError
from clcli.methods.base import StepOutput
from clcli.runs import load_run
from clcli.train import pretrain

from .helpers import assert_exact_resume, fixed_batch, losses, metric_rows, run_losses, tiny_recipe


def test_simclr_steps_lower_the_loss_on_real_images(tmp_path):
    # one fixed batch of real images, many steps: the contrastive loss must fall clearly
    recipe = tiny_recipe(
        "simclr",
        *fixed_batch(images=64, steps=30, lr=0.5),
        "views.groups.0.crop_scale=[0.5, 1.0]",
        "method.temperature=0.2",
    )
    seq = run_losses(recipe, tmp_path / "run")
    assert len(seq) == 30
    assert sum(seq[-5:]) / 5 < sum(seq[:5]) / 5 - 0.3


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_reproduces_the_uninterrupted_loss_sequence_bitwise(tmp_path, workers):
    recipe = tiny_recipe("simclr", f"data.num_workers={workers}", "trainer.steps=7", "trainer.checkpoint_every=2")
    # mid-epoch (8 batches per epoch), as Ctrl-C would; bitwise: json floats round-trip exactly
    assert_exact_resume(recipe, tmp_path, stop_after=3)


def test_resume_across_an_epoch_boundary(tmp_path):
    recipe = tiny_recipe("simclr", "data.limit=96", "trainer.steps=7")  # 3 steps per epoch
    assert_exact_resume(recipe, tmp_path, stop_after=3)


def test_resume_refuses_another_recipe_and_existing_runs_are_kept(tmp_path):
    recipe = tiny_recipe("simclr", "trainer.steps=2")
    pretrain(recipe, tmp_path / "run")
    with pytest.raises(ClcliError, match="already holds a run"):
        pretrain(recipe, tmp_path / "run")
    with pytest.raises(ClcliError, match="method.temperature"):
        pretrain(tiny_recipe("simclr", "trainer.steps=2", "method.temperature=0.2"), tmp_path / "run", resume=True)
    assert ckpt.latest_checkpoint(tmp_path / "run") is not None


def test_checkpoint_killed_mid_write_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    recipe = tiny_recipe("simclr", "trainer.steps=4", "trainer.checkpoint_every=2")
    stages = prepare_training(recipe, tmp_path / "run")
    real_save = ckpt.save_file
    calls = {"n": 0}

    def dying_save(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # the second checkpoint's model file: write half of it, then die
            real_save(tensors, path, *a, **k)
            with open(path, "r+b") as f:
                f.truncate(100)
            raise KeyboardInterrupt("killed")
        return real_save(tensors, path, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        stages.trainer.fit()
    latest = ckpt.latest_checkpoint(tmp_path / "run")
    assert latest is not None and latest.name == "step-00000002"
    recipe2, method, path = load_run(tmp_path / "run")
    assert path == latest
    monkeypatch.setattr(ckpt, "save_file", real_save)
    pretrain(recipe, tmp_path / "run", resume=True)  # the run continues from step 2
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step-00000004"


def test_non_finite_loss_stops_without_writing_a_checkpoint(tmp_path):
    recipe = tiny_recipe("simclr", "trainer.steps=6", "trainer.checkpoint_every=2", "trainer.log_every=3")
    stages = prepare_training(recipe, tmp_path / "run")
    method = stages.method
    original = method.training_step

    def poisoned(batch, step):
        out = original(batch, step)
        return StepOutput(out.loss * float("nan")) if step == 2 else out

    method.training_step = poisoned  # type: ignore[method-assign]
    with pytest.raises(TrainingError, match="non-finite"):
        stages.trainer.fit()
    # step 2's checkpoint was written before the poisoned step; nothing after it
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step-00000002"
    for p in (tmp_path / "run" / "checkpoints").glob("step-*"):
        state = ckpt.load_model_state(p)
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_ctrl_c_saves_and_stops_cleanly(tmp_path):
    recipe = tiny_recipe("simclr", "trainer.steps=6")
    stages = prepare_training(recipe, tmp_path / "run")
    method = stages.method
    original = method.after_step

    def interrupt(step):
        original(step)
        if step == 1:
            signal.raise_signal(signal.SIGINT)

    method.after_step = interrupt  # type: ignore[method-assign]
    summary = stages.trainer.fit()
    assert summary["interrupted"] and summary["steps"] == 2
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step-00000002"


def test_gradient_accumulation_and_bf16_run(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_is_fast", lambda: True)  # bf16 itself, also on a CPU without it
    recipe = tiny_recipe(
        "simclr", "trainer.steps=2", "trainer.accumulate=2", "trainer.precision=bf16", "trainer.channels_last=true"
    )
    summary = pretrain(recipe, tmp_path / "run")
    assert summary["steps"] == 2 and summary["images"] == 2 * 2 * 32
    rows = metric_rows(tmp_path / "run")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_run_folder_records_recipe_and_provenance(tmp_path):
    recipe = tiny_recipe("simclr", "trainer.steps=1")
    pretrain(recipe, tmp_path / "run")
    prov = json.loads((tmp_path / "run" / "provenance.json").read_text())
    assert prov["recipe_hash"] == recipe.digest()
    assert {"clcli", "torch", "torchvision", "git_commit"} <= set(prov)
    assert "trainer:" in (tmp_path / "run" / "recipe.yaml").read_text()


@pytest.fixture
def restore_determinism(monkeypatch):
    """Give the process back its deterministic-kernel settings after the test."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]


def test_deterministic_run_switches_pytorch_to_deterministic_kernels_and_resumes(tmp_path, restore_determinism):
    torch.backends.cudnn.benchmark = True  # as a user's notebook might have left it
    plain = tiny_recipe("simclr", "trainer.steps=4")
    pretrain(plain, tmp_path / "plain")
    assert not torch.are_deterministic_algorithms_enabled()  # off unless asked for
    prov = json.loads((tmp_path / "plain" / "provenance.json").read_text())
    assert prov["determinism"]["deterministic_algorithms"] is False

    recipe = tiny_recipe("simclr", "trainer.steps=4", "trainer.deterministic=true")
    stages = prepare_training(recipe, tmp_path / "det")
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()  # an op without a deterministic kernel warns
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    prov = json.loads((tmp_path / "det" / "provenance.json").read_text())
    assert prov["determinism"] == {
        "deterministic_algorithms": True,
        "cudnn_deterministic": True,
        "cudnn_benchmark": False,
        "cublas_workspace_config": ":4096:8",
    }
    stages.trainer.fit(stop_after=2)
    # the flag changes kernels, not the maths: a resume may switch it, and on the CPU nothing changes
    pretrain(tiny_recipe("simclr", "trainer.steps=4"), tmp_path / "det", resume=True)
    assert losses(tmp_path / "det") == losses(tmp_path / "plain")


def test_a_users_cublas_setting_is_kept(tmp_path, restore_determinism, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    prepare_training(tiny_recipe("simclr", "trainer.deterministic=true"), tmp_path / "run")
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_a_run_saved_before_a_field_existed_still_resumes_and_evaluates(tmp_path):
    """A field added to the schema later (here method.sync_batchnorm) counts at its default, so a run
    folder written without it is neither refused on resume nor on evaluation."""
    from clcli.runs import check_resumable

    recipe = tiny_recipe("simclr")
    saved = recipe.to_dict()
    del saved["method"]["sync_batchnorm"]
    check_resumable(saved, recipe)  # no CheckpointError
    changed = recipe.to_dict()
    changed["optim"]["lr"] = recipe.optim.lr * 2
    with pytest.raises(CheckpointError):
        check_resumable(changed, recipe)
