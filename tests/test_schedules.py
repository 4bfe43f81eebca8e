import io
import math

import pytest
from rich.console import Console

from clcli.assemble import prepare_training
from clcli.recipe import load_recipe
from clcli.schedules import CosineSchedule, LRSchedule, WarmupConstant, steps_for_epochs


def test_lr_warmup_then_cosine():
    s = LRSchedule(peak=1.0, total_steps=110, warmup_steps=10)
    assert s(0) == 0.0 and s(5) == pytest.approx(0.5) and s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.5) and s(110) == pytest.approx(0.0)
    assert all(s(i) >= s(i + 1) for i in range(10, 110))


def test_step_and_constant():
    s = LRSchedule(peak=1.0, total_steps=100, kind="step", milestones=(50, 80), gamma=0.1)
    assert s(49) == 1.0 and s(50) == pytest.approx(0.1) and s(80) == pytest.approx(0.01)
    assert LRSchedule(peak=0.3, total_steps=10, kind="constant")(7) == 0.3


def test_ema_momentum_cosine_matches_byol_formula():
    k_total = 1000
    sched = CosineSchedule(0.996, 1.0, k_total)
    for k in (0, 1, 250, 500, 999, 1000):
        expected = 1 - (1 - 0.996) * (math.cos(math.pi * k / k_total) + 1) / 2
        assert sched(k) == pytest.approx(expected, abs=1e-12)


def test_warmup_constant():
    t = WarmupConstant(0.04, 0.07, 30)
    assert t(0) == 0.04 and t(15) == pytest.approx(0.055) and t(30) == 0.07 and t(1000) == 0.07


def test_steps_for_epochs_rounds_half_up_and_shrinks_only_below_the_reference_length():
    assert steps_for_epochs(0.5, 3) == 2 and steps_for_epochs(0.4, 5) == 2 and steps_for_epochs(0.3, 5) == 2
    assert steps_for_epochs(2, 6, run_epochs=1.5, reference_epochs=6) == 3  # 2 * (1.5 / 6) * 6
    assert steps_for_epochs(2, 6, run_epochs=8, reference_epochs=6) == 12  # a longer run: as it is
    assert steps_for_epochs(2, 6, run_epochs=1.5) == 12  # no reference length: as it is


def test_the_printed_plan_and_the_methods_build_context_use_one_rounding(tmp_path):
    """The run's length, the plan's epoch-given points and a method's first-epoch safeguards all
    come from steps_for_epochs, and the schedule table shows those same numbers."""
    recipe = load_recipe(
        "swav",
        [
            "model.backbone.name=convnet",
            "model.backbone.width=8",
            "views.groups.0.size=16",
            "views.groups.1.size=8",
            "views.groups.1.count=2",
            "views.eval_size=16",
            "method.projector=[32, 16]",
            "method.num_prototypes=24",
            "method.freeze_prototypes_epochs=0.5",
            "method.queue_length=64",
            "method.queue_start_epoch=1",
            "trainer.batch_size=32",
            "trainer.epochs=1.5",
            "trainer.reference_epochs=6",
            "trainer.precision=fp32",
            "trainer.threads=1",
            "data.limit=200",  # 6 batches of 32: 6 steps per epoch
            "optim.warmup_epochs=2",
        ],
    )
    stages = prepare_training(recipe, tmp_path / "run")
    plan = stages.trainer.plan
    assert plan.steps_per_epoch == 6 and plan.total_steps == steps_for_epochs(1.5, 6) == 9
    # epoch-given schedule points keep their fraction of the reference length ...
    assert plan.lr.warmup_steps == plan.epochs_to_steps(2) == steps_for_epochs(2, 6, 1.5, 6) == 3
    # ... the method's safeguards count the run's own epochs, with the same rounding
    method = stages.method
    assert method.freeze_steps == steps_for_epochs(0.5, 6) == 3
    assert method.queue_start_step == steps_for_epochs(1, 6) == 6
    table = io.StringIO()
    Console(file=table, width=200).print(stages.trainer.schedule_table())
    text = " ".join(table.getvalue().split())
    assert "steps per epoch 6" in text and "total steps 9" in text and "3 warm-up steps" in text
    assert "frozen for the first 3 steps" in text and "filling from step 6" in text
