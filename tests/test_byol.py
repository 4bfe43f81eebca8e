"""BYOL (arXiv:2006.07733): loss, EMA target, its schedule, resume and learning on real images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clcli.assemble import prepare_training
from clcli.errors import RecipeError
from clcli.losses import byol_loss
from clcli.methods.base import Batch
from clcli.methods.momentum import momentum_schedule
from clcli.recipe import load_recipe

from .helpers import assert_exact_resume, fixed_batch, run_losses, tiny_recipe


def tiny(*extra: str):
    return tiny_recipe("byol", *extra)


def reference_byol(q1: np.ndarray, q2: np.ndarray, z1: np.ndarray, z2: np.ndarray) -> float:
    """Eq. 2 written out: ‖q̄ − z̄′‖² for (q1, z2) plus, symmetrised, for (q2, z1); mean over images."""
    total = 0.0
    for i in range(len(q1)):
        for q, z in ((q1[i], z2[i]), (q2[i], z1[i])):
            qn = q / math.sqrt(sum(v * v for v in q))
            zn = z / math.sqrt(sum(v * v for v in z))
            total += sum((a - b) ** 2 for a, b in zip(qn, zn, strict=True))
    return total / len(q1)


def test_byol_loss_matches_the_papers_formula():
    g = torch.Generator().manual_seed(0)
    t = [torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(4)]
    got = byol_loss(*t).item()
    assert got == pytest.approx(reference_byol(*(x.numpy() for x in t)), rel=1e-6)
    # identical directions give 0, opposite ones the maximum 8
    z = torch.randn(4, 3, generator=g)
    assert byol_loss(z, z, 2 * z, 3 * z).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(z, z, -z, -z).item() == pytest.approx(8.0, abs=1e-5)
    with pytest.raises(ValueError, match="byol_loss"):
        byol_loss(z, z, z, z[:3])


def test_ema_schedule_values(tmp_path):
    k_total = 100
    sched = momentum_schedule(0.996, 1.0, k_total)
    for k in (0, 1, 25, 50, 99, 100):
        expected = 1 - (1 - 0.996) * (math.cos(math.pi * k / k_total) + 1) / 2
        assert sched(k) == pytest.approx(expected, abs=1e-12)
    assert sched(0) == pytest.approx(0.996) and sched(50) == pytest.approx(0.998) and sched(100) == 1.0
    # the method resolves it against the run's total steps
    stages = prepare_training(tiny("trainer.steps=40", "method.momentum=0.99"), tmp_path / "run")
    m = stages.method
    assert m.momentum(0) == pytest.approx(0.99) and m.momentum(20) == pytest.approx(0.995) and m.momentum(40) == 1.0


def _batch(recipe, n=16):
    g = torch.Generator().manual_seed(1)
    size = recipe.views.groups[0].size
    views = [torch.randn(n, 3, size, size, generator=g) for _ in range(2)]
    return Batch(views, ["view1", "view2"], torch.arange(n), torch.zeros(n, dtype=torch.long))


def test_no_gradient_reaches_the_target_and_the_optimiser_never_sees_it(tmp_path):
    recipe = tiny()
    stages = prepare_training(recipe, tmp_path / "run")
    m = stages.method
    out = m.training_step(_batch(recipe), 0)
    out.loss.backward()
    target = list(m.target_backbone.parameters()) + list(m.target_projector.parameters())
    assert target and all(p.grad is None and not p.requires_grad for p in target)
    online = list(m.backbone.parameters()) + list(m.projector.parameters()) + list(m.predictor.parameters())
    assert all(p.grad is not None for p in online)
    assert any(float(p.grad.abs().sum()) > 0 for p in m.backbone.parameters())
    in_optimizer = {id(p) for g in stages.trainer.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_optimizer for p in target)
    assert {id(p) for p in online} <= in_optimizer


@pytest.mark.parametrize("passes", ["separate", "joint"])
def test_view_passes_decide_whether_the_views_share_batch_statistics(tmp_path, passes):
    """``separate`` is the paper's code (each network applied once per view): in training mode, what view 1
    gives must not depend on view 2's images.  ``joint`` runs both in one pass, so batch norm mixes them."""
    recipe = tiny(f"method.view_passes={passes}")
    m = prepare_training(recipe, tmp_path / "run").method
    m.train()
    views = _batch(recipe).views
    other = [views[0], views[1] * 3.0 + 1.0]
    with torch.no_grad():
        q, q_other = m._online(views), m._online(other)
    z, z_other = m._target(views), m._target(other)
    assert not torch.allclose(q[1], q_other[1])  # view 2's own output changes either way
    same = (torch.equal(q[0], q_other[0]), torch.equal(z[0], z_other[0]))
    assert same == ((True, True) if passes == "separate" else (False, False))


def test_target_moves_by_the_ema_after_each_step(tmp_path):
    recipe = tiny("trainer.steps=10", "method.momentum=0.9")
    m = prepare_training(recipe, tmp_path / "run").method
    assert all(torch.equal(a, b) for a, b in zip(m.target_backbone.parameters(), m.backbone.parameters(), strict=True))
    with torch.no_grad():
        for p in m.backbone.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in m.target_backbone.parameters()]
    m.after_step(3)
    tau = m.momentum(3)
    assert 0.9 < tau < 1.0
    for t, b, o in zip(m.target_backbone.parameters(), before, m.backbone.parameters(), strict=True):
        assert torch.allclose(t, tau * b + (1 - tau) * o, atol=1e-6)


def test_resume_reproduces_the_uninterrupted_loss_sequence_bitwise(tmp_path):
    recipe = tiny("trainer.steps=6", "trainer.checkpoint_every=2")  # 4 steps per epoch: crosses an epoch
    assert_exact_resume(recipe, tmp_path, stop_after=3)


def test_a_few_steps_lower_the_loss_on_real_images(tmp_path):
    recipe = tiny(
        *fixed_batch(images=64, steps=15, lr=0.1),
        "views.groups.0.crop_scale=[0.5, 1.0]",
        "views.groups.1.crop_scale=[0.5, 1.0]",
    )
    seq = run_losses(recipe, tmp_path / "run")
    assert len(seq) == 15
    assert sum(seq[-5:]) / 5 < sum(seq[:5]) / 5 - 0.3


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(RecipeError, match="predictor's output"):
        tiny("method.predictor=[32, 8]")
    recipe = tiny()
    m = prepare_training(recipe, tmp_path / "run").method
    b = _batch(recipe)
    with pytest.raises(ValueError, match="exactly two views"):
        m.training_step(Batch(b.views * 2, ["a"] * 4, b.index, b.label), 0)


def test_presets_have_the_asymmetric_augmentation():
    paper = load_recipe("byol-imagenet")
    v1, v2 = paper.views.groups
    assert (v1.count, v2.count) == (1, 1)
    assert (v1.blur_p, v2.blur_p) == (1.0, 0.1) and (v1.solarize_p, v2.solarize_p) == (0.0, 0.2)
    assert paper.method.momentum == 0.996 and paper.optim.name == "lars"
    assert paper.method.view_passes == "separate" == load_recipe("byol").method.view_passes
    cifar = load_recipe("byol")
    c1, c2 = cifar.views.groups
    assert (c1.blur_p, c2.blur_p) == (0.0, 0.0) and (c1.solarize_p, c2.solarize_p) == (0.0, 0.2)
    assert cifar.model.backbone.cifar_stem and cifar.views.groups[0].size == 32
