"""DINO (arXiv:2104.14294): the loss, the EMA teacher, centring, the head, multi-crop, resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import clcli.methods.dino as dino_module
from clcli.assemble import prepare_training
from clcli.data.sources import open_data
from clcli.errors import RecipeError
from clcli.losses import dino_loss
from clcli.methods.dino import DINO
from clcli.recipe import load_recipe
from clcli.schedules import make_plan
from clcli.train import pretrain
from clcli.views.pipelines import eval_pipeline, normalize_batch

from .helpers import (
    CIFAR,
    assert_exact_resume,
    batch_of,
    build_context,
    local_crops_move_running_stats,
    metric_rows,
    random_views,
    tiny_recipe,
)


def tiny(*extra: str, recipe: str = "dino"):
    return tiny_recipe(recipe, *extra)


def build(recipe, steps_per_epoch: int = 8, total_steps: int = 16, epochs_to_steps=None) -> DINO:
    """The method as a run would build it; ``epochs_to_steps`` defaults to unshrunk epochs."""
    ctx = build_context(
        recipe, steps_per_epoch=steps_per_epoch, total_steps=total_steps, epochs_to_steps=epochs_to_steps
    )
    return DINO(recipe.method, ctx)


# ------------------------------------------------------------------------------------ the loss
def reference_dino_loss(student, teacher, center, teacher_views, tau_s, tau_t) -> float:
    """Eqs. (1)-(3): P_t = softmax((g_t − c)/τ_t), P_s = softmax(g_s/τ_s); mean over pairs (t, s ≠ t)
    of the batch mean of −Σ_k P_t log P_s.  Plain loops, float64."""

    def softmax(x):
        m = max(x)
        e = [math.exp(v - m) for v in x]
        return [v / sum(e) for v in e]

    v, b, k = student.shape
    total, pairs = 0.0, 0
    for t, own in enumerate(teacher_views):
        for s in range(v):
            if s == own:
                continue
            term = 0.0
            for i in range(b):
                p_t = softmax([(teacher[t, i, j] - center[j]) / tau_t for j in range(k)])
                p_s = softmax([student[s, i, j] / tau_s for j in range(k)])
                term += -sum(p_t[j] * math.log(p_s[j]) for j in range(k)) / b
            total += term
            pairs += 1
    return total / pairs


@pytest.mark.parametrize(("teacher_views", "tau_t"), [([0, 1], 0.04), ([0, 1], 0.07), ([1, 3], 0.05)])
def test_dino_loss_matches_the_papers_formula(teacher_views, tau_t):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(5, 3, 6, generator=g, dtype=torch.float64)
    teacher = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    center = torch.randn(6, generator=g, dtype=torch.float64) * 0.3
    got = dino_loss(student, teacher, center, teacher_views, 0.1, tau_t).item()
    want = reference_dino_loss(student.numpy(), teacher.numpy(), center.numpy(), teacher_views, 0.1, tau_t)
    assert got == pytest.approx(want, rel=1e-5)


def test_centring_and_sharpening_change_the_target_as_the_formula_says():
    g = torch.Generator().manual_seed(1)
    student = torch.randn(3, 4, 5, generator=g)
    teacher = torch.randn(2, 4, 5, generator=g)
    zero = torch.zeros(5)
    # a centre equal for every dimension changes nothing (softmax is shift invariant) ...
    assert dino_loss(student, teacher, zero + 2.0, [0, 1]).item() == pytest.approx(
        dino_loss(student, teacher, zero, [0, 1]).item(), rel=1e-6
    )
    # ... a centre that cancels the teacher's preferred dimension does
    center = torch.tensor([3.0, 0, 0, 0, 0])
    assert dino_loss(student, teacher, center, [0, 1]).item() != pytest.approx(
        dino_loss(student, teacher, zero, [0, 1]).item(), rel=1e-3
    )


def test_dino_loss_sends_no_gradient_into_the_teacher_or_the_centre():
    student = torch.randn(4, 3, 8, requires_grad=True)
    teacher = torch.randn(2, 3, 8, requires_grad=True)
    center = torch.zeros(8, requires_grad=True)
    dino_loss(student, teacher, center, [0, 1]).backward()
    assert teacher.grad is None and center.grad is None and student.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="teacher_views"):
        dino_loss(student.detach(), teacher.detach(), center.detach(), [0, 4])


# ---------------------------------------------------------------------------------- the method
def test_no_gradient_reaches_the_teacher_and_the_optimiser_never_sees_it():
    method = build(tiny()).train()
    views, names = random_views()
    method.training_step(batch_of(views, names), 0).loss.backward()
    teacher = list(method.teacher_backbone.parameters()) + list(method.teacher_head.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.backbone.parameters())
    trained = {id(p) for g in method.param_groups() for p in g.params}
    assert not trained & {id(p) for p in teacher}


def test_the_teacher_output_does_not_depend_on_the_local_crops(monkeypatch):
    method = build(tiny()).train()
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = dino_module.dino_loss

    def recording(student, teacher, *a, **k):
        seen.append((student.detach().clone(), teacher.detach().clone()))
        return real(student, teacher, *a, **k)

    monkeypatch.setattr(dino_module, "dino_loss", recording)
    views, names = random_views()
    method.training_step(batch_of(views, names), 0)
    perturbed = views[:2] + [v * 3 + torch.randn_like(v) for v in views[2:]]
    method.training_step(batch_of(perturbed, names), 0)
    assert seen[0][1].shape == (2, 8, 64)  # the teacher saw the two global crops only
    assert torch.equal(seen[0][1], seen[1][1])
    assert not torch.allclose(seen[0][0][2:], seen[1][0][2:])  # the student did see the local crops


@pytest.mark.parametrize("all_crops", [False, True])
def test_student_running_statistics_come_from_the_global_crops_unless_asked_otherwise(all_crops):
    torch.manual_seed(0)
    method = build(tiny(f"method.all_crops_update_bn_stats={str(all_crops).lower()}")).train()
    assert local_crops_move_running_stats(method, skip="teacher") is all_crops


def test_backbones_run_once_per_resolution_group():
    method = build(tiny()).train()
    student_calls: list[tuple[int, ...]] = []
    teacher_calls: list[tuple[int, ...]] = []
    method.backbone.register_forward_pre_hook(lambda m, a: student_calls.append(tuple(a[0].shape)))
    method.teacher_backbone.register_forward_pre_hook(lambda m, a: teacher_calls.append(tuple(a[0].shape)))
    views, names = random_views(b=4)
    method.training_step(batch_of(views, names), 0)
    assert student_calls == [(8, 3, 16, 16), (24, 3, 8, 8)]
    assert teacher_calls == [(8, 3, 16, 16)]


def test_teacher_is_the_ema_of_the_student_on_a_cosine_schedule():
    method = build(tiny("method.momentum_start=0.99"), total_steps=16)
    assert method.momentum(0) == pytest.approx(0.99) and method.momentum(16) == pytest.approx(1.0)
    assert method.momentum(8) == pytest.approx(1 - 0.01 * (math.cos(math.pi * 8 / 16) + 1) / 2)
    # starts as an exact copy
    for t, s in zip(method.teacher_backbone.parameters(), method.backbone.parameters(), strict=True):
        assert torch.equal(t, s)
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(1.0)
    before = [p.clone() for p in method.teacher_backbone.parameters()]
    method.after_step(4)
    m = 1 - 0.01 * (math.cos(math.pi * 4 / 16) + 1) / 2
    for t0, t, s in zip(before, method.teacher_backbone.parameters(), method.backbone.parameters(), strict=True):
        assert torch.allclose(t, m * t0 + (1 - m) * s, atol=1e-6)


def test_centre_is_a_running_mean_of_the_teacher_outputs(monkeypatch):
    method = build(tiny()).train()
    seen: list[torch.Tensor] = []
    real = dino_module.dino_loss

    def recording(student, teacher, *a, **k):
        seen.append(teacher.detach().clone())
        return real(student, teacher, *a, **k)

    monkeypatch.setattr(dino_module, "dino_loss", recording)
    views, names = random_views()
    method.training_step(batch_of(views, names), 0)
    c1 = 0.1 * seen[0].reshape(-1, 64).mean(0)
    assert torch.allclose(method.center[0], c1, atol=1e-6)
    views2, _ = random_views(seed=5)
    method.training_step(batch_of(views2, names), 1)
    assert torch.allclose(method.center[0], 0.9 * c1 + 0.1 * seen[1].reshape(-1, 64).mean(0), atol=1e-6)
    assert "center" in method.state_dict()  # checkpointed


def test_teacher_temperature_warms_up_over_the_resolved_steps():
    # 8 steps per epoch and no reference length: a 0.5-epoch warm-up is 4 steps
    method = build(
        tiny(
            "method.warmup_teacher_temperature_epochs=0.5",
            "method.warmup_teacher_temperature=0.04",
            "method.teacher_temperature=0.07",
        )
    )
    assert [round(method.teacher_temperature(s), 6) for s in range(6)] == [0.04, 0.0475, 0.055, 0.0625, 0.07, 0.07]
    # with a reference length, a one-epoch run's schedules keep their fraction of it ...
    recipe = tiny(
        "trainer.reference_epochs=4",
        "method.warmup_teacher_temperature_epochs=2",
        "method.freeze_last_layer_epochs=0.5",
        "trainer.steps=8",
    )
    plan = make_plan(recipe, 256)
    assert plan.epochs_to_steps(2) == 4  # half of the 8-step run
    # ... but the warm-up and the last layer's freeze guard the first steps and are not shrunk:
    # the warm-up spans 2 epochs of 8 steps (shrunk to 58 steps of a one-epoch CIFAR run, the teacher
    # turned uniform), the freeze half an epoch
    method = build(recipe, steps_per_epoch=8, total_steps=8, epochs_to_steps=plan.epochs_to_steps)
    assert method.teacher_temperature(4) == pytest.approx(0.04 + 0.03 * 4 / 16)
    assert method.teacher_temperature(7) < 0.06
    assert method.freeze_steps == 4


def test_the_head_has_a_weight_normalised_last_layer_with_unit_norm():
    method = build(tiny())
    last = method.head.last_layer
    assert last.gain is None and {n for n, _ in last.named_parameters()} == {"weight"}
    x = torch.randn(5, method.backbone.feature_dim)
    out = method.head(x)
    assert out.shape == (5, 64) and out.dtype == torch.float32 and out.abs().max() <= 1.0 + 1e-5
    # scaling v leaves the layer unchanged (w = v / |v|)
    with torch.no_grad():
        last.weight.mul_(7.0)
    assert torch.allclose(method.head(x), out, atol=1e-5)
    free = build(tiny("method.norm_last_layer=false"))
    assert free.head.last_layer.gain is not None and free.head.last_layer.gain.requires_grad


def test_last_layer_is_frozen_for_the_resolved_first_steps(tmp_path):
    recipe = tiny("method.freeze_last_layer_epochs=0.375", "trainer.steps=4")
    stages = prepare_training(recipe, tmp_path / "run")
    method = stages.trainer.method
    assert method.freeze_steps == 3
    initial = method.head.last_layer.weight.detach().clone()
    mlp0 = method.head.mlp[0].weight.detach().clone()
    snapshots = []
    original = method.after_step

    def record(step):
        original(step)
        snapshots.append((method.head.last_layer.weight.detach().clone(), method.head.mlp[0].weight.detach().clone()))

    method.after_step = record  # type: ignore[method-assign]
    stages.trainer.fit()
    assert all(torch.equal(w, initial) for w, _ in snapshots[:3])
    assert not torch.equal(snapshots[3][0], initial)
    assert not torch.equal(snapshots[0][1], mlp0)  # the rest of the head trains from the start


def test_evaluation_and_export_use_the_teacher_by_default():
    method = build(tiny()).eval()
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(0.5)
    x = torch.randn(3, 3, 16, 16)
    assert torch.equal(method.features(x), method.teacher_backbone(x))
    assert set(method.export_tensors()) == set(method.teacher_backbone.state_dict())
    student = build(tiny("method.eval_network=student")).eval()
    assert torch.equal(student.features(x), student.backbone(x))


def test_resume_reproduces_the_uninterrupted_loss_sequence_bitwise(tmp_path):
    # the cut at step 3 falls inside the last layer's freeze (4 steps) and the temperature warm-up
    recipe = tiny(
        "trainer.steps=7",
        "trainer.checkpoint_every=2",
        "method.freeze_last_layer_epochs=0.5",
        "method.warmup_teacher_temperature_epochs=0.75",
        "method.momentum_start=0.9",
    )
    assert_exact_resume(recipe, tmp_path, stop_after=3)


@pytest.mark.parametrize("recipe", ["dino", "dino-vit"])
def test_a_few_steps_of_the_recipe_lower_its_loss_on_real_images(tmp_path, recipe):
    r = tiny(
        "trainer.steps=8",
        "data.limit=64",
        "optim.lr=0.05" if recipe == "dino" else "optim.lr=0.001",
        "optim.schedule=constant",
        "method.freeze_last_layer_epochs=0",
        "method.out_dim=256",
        "method.head_bottleneck=128",
        "method.head_hidden=64",
        recipe=recipe,
    )
    pretrain(r, tmp_path / "run")
    rows = [x for x in metric_rows(tmp_path / "run") if "loss" in x]
    assert len(rows) == 8

    def drop(key: str) -> float:
        return sum(x[key] for x in rows[:3]) / 3 - sum(x[key] for x in rows[-3:]) / 3

    # the loss is H(P_t) + KL(P_t ‖ P_s); the student controls the KL, which must fall with either backbone
    assert drop("kl") > 0.25
    for x in rows:
        assert x["loss"] == pytest.approx(x["teacher_entropy"] + x["kl"], abs=1e-4)
    # (the cross-entropy itself need not fall in 8 steps: the tiny ViT starts with nearly the same output for
    # every image, so centring raises the teacher's entropy at first; the ResNet preset's BN head starts
    # with a sharp target whose entropy moves little, so the KL carries the learning)


@pytest.mark.skipif(not (CIFAR / "train.parquet").exists(), reason=f"CIFAR-10 parquet not found in {CIFAR}")
def test_the_cifar_presets_teacher_gives_a_sharp_target_from_the_first_step():
    # The head of the CIFAR preset normalises its hidden layers over the batch (head_norm: bn). Without
    # it a fresh ResNet-18 maps every image to nearly the same output, centring leaves almost nothing
    # to sharpen, and the teacher's target is uniform from the first step (measured: entropy 8.19 of
    # log 4096 = 8.32; with BN 7.34), the collapse mode that kept a one-epoch run from learning.
    recipe = load_recipe("dino", [f"data.source={CIFAR / 'train.parquet'}", "trainer.precision=fp32"])
    assert recipe.method.head_norm == "bn"
    torch.manual_seed(0)
    method = build(recipe)
    method.train()
    source = open_data(recipe.data.source, recipe.data.train_split, recipe.data)
    images = torch.stack([eval_pipeline(32)(source.load_image(i)) for i in range(64)])
    x = normalize_batch(images, recipe.views.mean, recipe.views.std)
    with torch.no_grad():
        out = method.teacher_head(method.teacher_backbone(x)).float()
    p = torch.softmax((out - out.mean(dim=0)) / recipe.method.warmup_teacher_temperature, dim=1)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(dim=1).mean().item()
    assert entropy < math.log(recipe.method.out_dim) - 0.5


def test_bad_configuration_gives_clear_errors():
    with pytest.raises(RecipeError, match="method.teacher_views.*'large'"):
        build(tiny("method.teacher_views=[large]"))
    with pytest.raises(RecipeError, match="two views"):
        build(tiny("views.groups=[{name: global, size: 16, count: 1}]"))
    with pytest.raises(RecipeError, match="eval_network"):
        tiny("method.eval_network=average")


def test_reference_values_are_the_papers():
    cfg = load_recipe("dino-imagenet").method
    assert (cfg.out_dim, cfg.head_hidden, cfg.head_bottleneck, cfg.student_temperature) == (65536, 2048, 256, 0.1)
    assert (cfg.momentum_start, cfg.momentum_end, cfg.center_momentum) == (0.996, 1.0, 0.9)
    assert cfg.teacher_views == ["global1", "global2"]
    assert np.isclose(load_recipe("dino-imagenet").optim.grad_clip, 3.0)
