"""SwAV (arXiv:2006.09882): Sinkhorn-Knopp codes, the swapped prediction, prototypes, queue, resume."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clcli.methods.swav as swav_module
from clcli.assemble import prepare_training
from clcli.errors import RecipeError
from clcli.losses import sinkhorn, swav_loss
from clcli.methods.swav import SwAV
from clcli.recipe import load_recipe
from clcli.train import pretrain

from .helpers import (
    assert_exact_resume,
    batch_of,
    build_context,
    fixed_batch,
    local_crops_move_running_stats,
    metric_rows,
    random_views,
    run_losses,
    tiny_recipe,
)


def tiny(*extra: str):
    return tiny_recipe("swav", *extra)


def build(recipe, steps_per_epoch: int = 8, total_steps: int = 16, epochs_to_steps=None) -> SwAV:
    """The method as a run would build it; ``epochs_to_steps`` defaults to unshrunk epochs."""
    ctx = build_context(
        recipe, steps_per_epoch=steps_per_epoch, total_steps=total_steps, epochs_to_steps=epochs_to_steps
    )
    return SwAV(recipe.method, ctx)


# ------------------------------------------------------------------------------------- Sinkhorn
def reference_sinkhorn(scores: np.ndarray, eps: float, iterations: int) -> np.ndarray:
    """Written from the paper's appendix A.1: Q = exp(CᵀZ/ε) / total, then alternately scale the K
    prototype rows to 1/K and the B sample columns to 1/B; return B·Qᵀ.  Plain loops, float64."""
    b, k = scores.shape
    q = [[math.exp(scores[i, j] / eps) for i in range(b)] for j in range(k)]  # K x B
    total = sum(sum(row) for row in q)
    q = [[x / total for x in row] for row in q]
    for _ in range(iterations):
        for j in range(k):
            r = sum(q[j])
            q[j] = [x / r / k for x in q[j]]
        for i in range(b):
            c = sum(q[j][i] for j in range(k))
            for j in range(k):
                q[j][i] = q[j][i] / c / b
    return np.array([[q[j][i] * b for j in range(k)] for i in range(b)])


def cosine_scores(b: int, k: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(b, d, generator=g), dim=1)
    c = F.normalize(torch.randn(k, d, generator=g), dim=1)
    return z @ c.t()


def test_sinkhorn_each_code_sums_to_one_and_matches_an_independent_computation():
    scores = cosine_scores(10, 6)
    q = sinkhorn(scores, epsilon=0.05, iterations=3)
    assert q.shape == (10, 6) and (q >= 0).all()
    assert torch.allclose(q.sum(dim=1), torch.ones(10), atol=1e-5)
    ref = reference_sinkhorn(scores.double().numpy(), 0.05, 3)
    assert np.allclose(q.numpy(), ref, rtol=1e-4, atol=1e-6)


def test_sinkhorn_prototype_marginals_approach_uniform_as_iterations_grow():
    scores = cosine_scores(32, 8, seed=1)
    deviations = []
    for iterations in (1, 3, 10, 30, 300):
        q = sinkhorn(scores, epsilon=0.05, iterations=iterations)
        per_prototype = q.sum(dim=0)  # should approach B / K = 4 samples each
        deviations.append(float((per_prototype - 32 / 8).abs().max()))
    assert all(a > b for a, b in zip(deviations, deviations[1:], strict=False))
    assert deviations[0] > 1.0 and deviations[-1] < 1e-4


def test_sinkhorn_result_is_the_entropic_transport_plan_form():
    # Q = Diag(u) exp(CᵀZ/ε) Diag(v): log Q − S/ε must be a sum of a per-sample and a per-prototype term
    scores = cosine_scores(12, 5, seed=2).double()
    q = sinkhorn(scores, epsilon=0.1, iterations=3).double()
    residual = q.log() - scores / 0.1
    centred = residual - residual.mean(0, keepdim=True) - residual.mean(1, keepdim=True) + residual.mean()
    assert centred.abs().max() < 1e-4


def test_sinkhorn_sums_over_processes_like_one_global_batch():
    # two "processes" (threads) with different halves of a batch, joined by an all-reduce that sums
    scores = cosine_scores(12, 5, seed=3)
    halves = [scores[:6], scores[6:]]
    barrier = threading.Barrier(2)
    slots: dict[int, torch.Tensor] = {}
    results: dict[int, torch.Tensor] = {}

    def all_reduce_for(rank: int):
        def reduce(t: torch.Tensor) -> torch.Tensor:
            slots[rank] = t.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            t.copy_(total)
            return t

        return reduce

    def run(rank: int) -> None:
        results[rank] = sinkhorn(halves[rank], 0.05, 3, all_reduce=all_reduce_for(rank))

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    global_batch = sinkhorn(scores, 0.05, 3)
    assert torch.allclose(torch.cat([results[0], results[1]]), global_batch, atol=1e-6)
    assert not torch.allclose(results[0], sinkhorn(halves[0], 0.05, 3), atol=1e-3)  # not a per-process problem


def test_sinkhorn_has_no_gradient_and_runs_in_fp32_under_bf16():
    scores = cosine_scores(8, 4).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = sinkhorn(scores.bfloat16(), 0.05, 3)
    assert q.dtype == torch.float32 and not q.requires_grad
    with pytest.raises(ValueError, match="\\[B, K\\]"):
        sinkhorn(torch.randn(3, 4, 5))


# --------------------------------------------------------------------------- swapped prediction
def reference_swav_loss(scores: np.ndarray, codes: np.ndarray, code_views: list[int], tau: float) -> float:
    """Eq. (1)-(2) with multi-crop: (1/C) Σ_s (1/(V−1)) Σ_{t≠s} (1/B) Σ_b −Σ_k q_s log softmax(z_tᵀC/τ)."""
    v, b, k = scores.shape
    total = 0.0
    for c, s in enumerate(code_views):
        sub = 0.0
        for t in range(v):
            if t == s:
                continue
            for i in range(b):
                logits = [scores[t, i, j] / tau for j in range(k)]
                m = max(logits)
                lse = m + math.log(sum(math.exp(x - m) for x in logits))
                sub += -sum(codes[c, i, j] * (logits[j] - lse) for j in range(k)) / b
        total += sub / (v - 1)
    return total / len(code_views)


@pytest.mark.parametrize("code_views", [[0, 1], [1], [0, 2]])
def test_swav_loss_matches_the_papers_formula(code_views):
    g = torch.Generator().manual_seed(4)
    scores = torch.randn(5, 4, 7, generator=g, dtype=torch.float64).tanh()
    codes = torch.softmax(torch.randn(len(code_views), 4, 7, generator=g, dtype=torch.float64), dim=-1)
    got = swav_loss(scores, codes, code_views, 0.1).item()
    want = reference_swav_loss(scores.numpy(), codes.numpy(), code_views, 0.1)
    assert got == pytest.approx(want, rel=1e-5)


def test_swav_loss_sends_no_gradient_into_the_codes():
    scores = torch.randn(3, 4, 6).tanh().requires_grad_(True)
    codes = torch.softmax(torch.randn(2, 4, 6), dim=-1).requires_grad_(True)
    swav_loss(scores, codes, [0, 1], 0.1).backward()
    assert codes.grad is None and scores.grad is not None and scores.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="code_views"):
        swav_loss(scores, codes, [0, 3], 0.1)


# ---------------------------------------------------------------------------------- the method
def test_codes_do_not_change_when_the_local_crops_are_perturbed(monkeypatch):
    torch.manual_seed(0)
    method = build(tiny()).train()
    seen: list[torch.Tensor] = []
    real = swav_module.sinkhorn

    def recording(*a, **k):
        q = real(*a, **k)
        seen.append(q.clone())
        return q

    monkeypatch.setattr(swav_module, "sinkhorn", recording)
    views, names = random_views()
    method.training_step(batch_of(views, names), 0)
    perturbed = views[:2] + [v * 3 + torch.randn_like(v) for v in views[2:]]
    method.training_step(batch_of(perturbed, names), 0)
    assert len(seen) == 4  # two code crops per step
    assert torch.equal(seen[0], seen[2]) and torch.equal(seen[1], seen[3])
    # perturbing a global crop does change the codes (the test above is not vacuous)
    method.training_step(batch_of([views[0] + 1.0, *views[1:]], names), 0)
    assert not torch.allclose(seen[0], seen[4])


@pytest.mark.parametrize("all_crops", [False, True])
def test_running_statistics_come_from_the_code_crops_unless_asked_otherwise(all_crops):
    torch.manual_seed(0)
    method = build(tiny(f"method.all_crops_update_bn_stats={str(all_crops).lower()}")).train()
    assert local_crops_move_running_stats(method) is all_crops


def test_backbone_runs_once_per_resolution_group():
    method = build(tiny()).train()
    calls: list[tuple[int, ...]] = []
    method.backbone.register_forward_pre_hook(lambda m, args: calls.append(tuple(args[0].shape)))
    views, names = random_views(b=4)
    out = method.training_step(batch_of(views, names), 0)
    assert calls == [(8, 3, 16, 16), (24, 3, 8, 8)]
    assert torch.isfinite(out.loss) and {"code_entropy", "assignment_entropy", "queue_used"} <= set(out.metrics)
    # the logged entropies are in range: 0 <= H <= log K
    assert 0 <= float(out.metrics["code_entropy"]) <= math.log(24) + 1e-5


def test_prototypes_are_normalised_frozen_first_and_then_trained(tmp_path):
    recipe = tiny("method.freeze_prototypes_epochs=0.375", "trainer.steps=4")
    stages = prepare_training(recipe, tmp_path / "run")
    method = stages.trainer.method
    assert method.freeze_steps == 3
    norms = method.prototypes.weight.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)
    initial = method.prototypes.weight.detach().clone()
    snapshots = []
    original = method.after_step

    def record(step):
        original(step)
        snapshots.append(method.prototypes.weight.detach().clone())

    method.after_step = record  # type: ignore[method-assign]
    stages.trainer.fit()
    # steps 0, 1, 2: frozen (re-normalising a unit vector may move its last bit), then step 3 moves them
    assert all((s - initial).abs().max() < 1e-6 for s in snapshots[:3])
    assert (snapshots[3] - initial).abs().max() > 1e-4
    for s in snapshots:
        assert torch.allclose(s.norm(dim=1), torch.ones(24), atol=1e-5)  # re-normalised every step


def test_the_prototype_freeze_and_the_queue_start_are_not_shrunk_with_a_short_runs_schedule():
    # a run 1/25 of the reference length: the freeze lasts the paper's first epoch of this run and
    # the queue waits for epoch 5 of it.  Shrunk, the freeze let the prototypes and embeddings
    # collapse together, and the queue filled with a fast-moving network's embeddings and narrowed
    # the assignments (both in a one-epoch CIFAR run; see the module notes)
    def shrunk(e: float) -> int:
        return int(math.floor(e / 25 * 100 + 0.5))

    method = build(tiny("method.freeze_prototypes_epochs=1", "method.queue_start_epoch=5"), 100, 200, shrunk)
    assert method.queue_start_step == 500  # not 20
    assert method.freeze_steps == 100
    assert build(tiny("method.freeze_prototypes_epochs=3"), 100, 200, shrunk).freeze_steps == 200  # at most the run


def test_the_cifar_presets_one_epoch_run_has_no_queue_and_its_full_run_starts_it_at_epoch_50():
    # the benchmark budget: one epoch of CIFAR-10 at batch 128 (390 steps) of a 200-epoch preset
    recipe = load_recipe("swav", ["trainer.epochs=1", "trainer.batch_size=128"])
    assert recipe.method.queue_length > 0 and recipe.trainer.reference_epochs == 200

    def shrunk(e: float) -> int:
        return int(math.floor(e / 200 * 390 + 0.5))

    one_epoch = build(recipe, 390, 390, shrunk)
    assert one_epoch.queue_start_step >= 390  # never within the run
    assert one_epoch.queue_start_step == build(recipe, 390, 200 * 390).queue_start_step == 50 * 390


def test_queue_switches_on_at_the_resolved_point_and_is_used_once_full(tmp_path):
    # 8 steps per epoch: the queue starts filling at step 2 (epoch 0.25) and, 64 long at batch 32,
    # is full after two enqueues, so steps 4 and later use it
    recipe = tiny("method.queue_length=64", "method.queue_start_epoch=0.25", "trainer.steps=6")
    summary = pretrain(recipe, tmp_path / "run")
    assert summary["steps"] == 6
    used = [r["queue_used"] for r in metric_rows(tmp_path / "run") if "queue_used" in r]
    assert used == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    stages = prepare_training(recipe, tmp_path / "run", resume=True)
    queues = stages.method.queues
    assert len(queues) == 2 and all(int(q.count) == 4 * 32 for q in queues)  # enqueued at steps 2..5, restored
    assert torch.allclose(queues[0].data.norm(dim=1), torch.ones(64), atol=1e-5)


def test_the_queue_enters_sinkhorn_but_only_the_batch_rows_are_codes(monkeypatch):
    method = build(tiny("method.queue_length=16", "method.queue_start_epoch=0")).train()
    for q in method.queues:
        q.enqueue(F.normalize(torch.randn(16, 16), dim=1))
    sizes = []
    real = swav_module.sinkhorn

    def recording(scores, *a, **k):
        sizes.append(scores.shape[0])
        return real(scores, *a, **k)

    monkeypatch.setattr(swav_module, "sinkhorn", recording)
    views, names = random_views(b=4)
    out = method.training_step(batch_of(views, names), 0)
    assert sizes == [20, 20] and float(out.metrics["queue_used"]) == 1.0
    assert torch.isfinite(out.loss)


def test_resume_reproduces_the_uninterrupted_loss_sequence_bitwise(tmp_path):
    # the cut at step 3 falls after the queue started (step 2) and inside the prototype freeze (4 steps)
    recipe = tiny(
        "trainer.steps=7",
        "trainer.checkpoint_every=2",
        "method.queue_length=64",
        "method.queue_start_epoch=0.25",
        "method.freeze_prototypes_epochs=0.5",
    )
    assert_exact_resume(recipe, tmp_path, stop_after=3)
    assert [r["queue_used"] for r in metric_rows(tmp_path / "cut")] == [
        r["queue_used"] for r in metric_rows(tmp_path / "full")
    ]


def test_a_few_steps_of_the_recipe_lower_its_loss_on_real_images(tmp_path):
    recipe = tiny(
        *fixed_batch(images=32, steps=12, lr=0.2),
        "method.freeze_prototypes_epochs=0",
    )
    seq = run_losses(recipe, tmp_path / "run")
    assert len(seq) == 12
    assert sum(seq[-3:]) / 3 < sum(seq[:3]) / 3 - 0.5


def test_bad_configuration_gives_clear_errors():
    with pytest.raises(RecipeError, match="method.code_views.*'large'"):
        build(tiny("method.code_views=[large]"))
    with pytest.raises(RecipeError, match="at least one other view"):
        build(tiny("method.code_views=[global, local]"))
    with pytest.raises(RecipeError, match="two views"):
        build(tiny("views.groups=[{name: global, size: 16, count: 1}]"))


def test_recipes_carry_the_papers_values():
    paper = load_recipe("swav-imagenet")
    cfg = paper.method
    assert (cfg.num_prototypes, cfg.projector, cfg.temperature, cfg.epsilon, cfg.sinkhorn_iterations) == (
        3000,
        [2048, 128],
        0.1,
        0.05,
        3,
    )
    assert (cfg.queue_length, cfg.queue_start_epoch, cfg.code_views) == (3840, 15, ["global"])
    assert [(g.name, g.size, g.count, g.crop_scale) for g in paper.views.groups] == [
        ("global", 224, 2, (0.14, 1.0)),
        ("local", 96, 6, (0.05, 0.14)),
    ]
    cifar = load_recipe("swav")
    assert [(g.size, g.count) for g in cifar.views.groups] == [(32, 2), (16, 6)]
    assert cifar.model.backbone.cifar_stem and cifar.trainer.precision == "bf16"
