"""SimSiam (arXiv:2011.10566): loss, stop-gradient, the collapse metric, the predictor's fixed lr, resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clcli.assemble import build_method, prepare_training
from clcli.data.sources import limit_source, open_data
from clcli.errors import RecipeError
from clcli.losses import simsiam_loss
from clcli.methods.base import Batch
from clcli.methods.simsiam import normalized_output_std
from clcli.recipe import load_recipe
from clcli.schedules import make_plan
from clcli.views import ViewMaker, normalize_batch

from .helpers import assert_exact_resume, metric_rows, tiny_recipe


def tiny(*extra: str):
    return tiny_recipe("simsiam", *extra)


def reference_simsiam(p1: np.ndarray, p2: np.ndarray, z1: np.ndarray, z2: np.ndarray) -> float:
    """½ D(p1, z2) + ½ D(p2, z1) with D(p, z) = −(p/‖p‖₂)·(z/‖z‖₂), each D a mean over images."""

    def d(p, z):
        return -sum(
            float(np.dot(p[i], z[i])) / (math.sqrt(float(np.dot(p[i], p[i]))) * math.sqrt(float(np.dot(z[i], z[i]))))
            for i in range(len(p))
        ) / len(p)

    return 0.5 * d(p1, z2) + 0.5 * d(p2, z1)


def test_simsiam_loss_matches_the_papers_formula():
    g = torch.Generator().manual_seed(0)
    t = [torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(4)]
    assert simsiam_loss(*t).item() == pytest.approx(reference_simsiam(*(x.numpy() for x in t)), rel=1e-6)
    z = torch.randn(3, 4, generator=g)
    assert simsiam_loss(z, z, 5 * z, z).item() == pytest.approx(-1.0, abs=1e-6)
    with pytest.raises(ValueError, match="simsiam_loss"):
        simsiam_loss(z, z, z, torch.randn(3, 5))


def test_collapse_metric_is_one_over_sqrt_d_when_spread_and_zero_when_collapsed():
    g = torch.Generator().manual_seed(1)
    d = 64
    spread = normalized_output_std(torch.randn(4096, d, generator=g))
    assert float(spread) == pytest.approx(1 / math.sqrt(d), rel=0.05)
    collapsed = normalized_output_std(torch.randn(1, d, generator=g).expand(256, d) * torch.rand(256, 1, generator=g))
    assert float(collapsed) < 1e-5


def _fixed_views(recipe, n=64):
    """Two augmented views of n real images (digits), made once."""
    torch.manual_seed(0)
    source = limit_source(open_data(recipe.data.source, "train", recipe.data), n)
    maker = ViewMaker(recipe.views)
    per_image = [maker(source.load_image(i)) for i in range(n)]
    views = [normalize_batch(torch.stack(v), recipe.views.mean, recipe.views.std) for v in zip(*per_image, strict=True)]
    return source, Batch(views, ["global", "global"], torch.arange(n), torch.zeros(n, dtype=torch.long))


def _train(stop_gradient: bool, steps: int = 30) -> tuple[list[float], list[float]]:
    """Train the recipe's method on one fixed batch of real images; returns (losses, z_std x sqrt(d))."""
    recipe = tiny("method.projector=[64, 64]", "method.predictor=[16, 64]", f"method.stop_gradient={stop_gradient}")
    source, batch = _fixed_views(recipe)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    method = build_method(recipe, make_plan(recipe, len(source)), source, torch.device("cpu"))
    opt = torch.optim.SGD(method.parameters(), lr=1.0, momentum=0.9)
    loss_seq, std_seq = [], []
    for step in range(steps):
        result = method.training_step(batch, step)
        opt.zero_grad()
        result.loss.backward()
        opt.step()
        loss_seq.append(result.loss.item())
        std_seq.append(float(result.metrics["z_std_sqrt_d"]))
    return loss_seq, std_seq


@pytest.fixture(scope="module")
def both_ways() -> dict[bool, tuple[list[float], list[float]]]:
    # same data, same initial weights, same optimiser: only the stop-gradient differs
    return {sg: _train(sg) for sg in (True, False)}


def test_collapse_metric_falls_when_the_stop_gradient_is_removed(both_ways):
    with_sg, without = both_ways[True][1], both_ways[False][1]
    assert with_sg[0] == pytest.approx(without[0])
    assert min(with_sg[-5:]) > 0.95  # ≈ (1/sqrt(d)) x sqrt(d): healthy
    assert max(without[-5:]) < 0.85  # falling towards collapse
    assert sum(without[-5:]) < sum(with_sg[-5:]) - 0.5
    # the collapsed solution is the trivial minimum of the loss: −1
    assert sum(both_ways[False][0][-5:]) / 5 < -0.95


def test_a_few_steps_lower_the_loss_on_real_images(both_ways):
    seq = both_ways[True][0]
    assert sum(seq[-5:]) / 5 < sum(seq[:5]) / 5 - 0.3


@pytest.mark.parametrize("passes", ["separate", "joint"])
def test_view_passes_decide_whether_the_views_share_batch_statistics(passes):
    """``separate`` is Algorithm 1 (f and h run on x1 and x2 apart): in training mode z1 and p1 must not
    depend on view 2's images.  ``joint`` runs both in one pass, so batch norm mixes them and they do."""
    recipe = tiny("trainer.batch_size=16", f"method.view_passes={passes}")
    source, batch = _fixed_views(recipe, n=16)
    torch.manual_seed(0)
    method = build_method(recipe, make_plan(recipe, len(source)), source, torch.device("cpu"))
    method.train()
    v1, v2 = batch.views
    with torch.no_grad():
        a = method.forward_views([v1, v2])
        b = method.forward_views([v1, v2.flip(0) * 2.0])
    assert not torch.allclose(a[1], b[1])  # z2 changes either way
    if passes == "separate":
        assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])  # z1, p1
    else:
        assert not torch.allclose(a[0], b[0]) and not torch.allclose(a[2], b[2])


def test_stop_gradient_changes_the_gradient_not_the_loss():
    grads = {}
    values = {}
    for sg in (True, False):
        recipe = tiny(f"method.stop_gradient={sg}", "trainer.batch_size=16")
        source, batch = _fixed_views(recipe, n=16)
        torch.manual_seed(0)
        method = build_method(recipe, make_plan(recipe, len(source)), source, torch.device("cpu"))
        out = method.training_step(batch, 0)
        out.loss.backward()
        values[sg] = out.loss.item()
        grads[sg] = torch.cat([p.grad.flatten() for p in method.projector.parameters() if p.grad is not None])
        # with or without, the predictor is trained through p
        assert all(p.grad is not None for p in method.predictor.parameters())
    assert values[True] == pytest.approx(values[False], abs=1e-6)
    assert not torch.allclose(grads[True], grads[False])


def test_predictor_lr_stays_fixed_while_the_others_decay(tmp_path):
    recipe = tiny("trainer.steps=5", "optim.lr=0.2", "optim.lr_scaling=none", "optim.schedule=cosine")
    stages = prepare_training(recipe, tmp_path / "run")
    opt = stages.trainer.optimizer
    seen: list[dict[str, float]] = []
    original = stages.method.after_step

    def record(step: int) -> None:
        seen.append({g["name"]: g["lr"] for g in opt.param_groups})
        original(step)

    stages.method.after_step = record  # type: ignore[method-assign]
    stages.trainer.fit()
    assert len(seen) == 5
    names = set(seen[0])
    assert {"predictor", "encoder"} <= names and any(n.startswith("predictor.") for n in names)
    for name in names:
        lrs = [s[name] for s in seen]
        if name.startswith("predictor"):
            assert lrs == [0.2] * 5
        else:
            assert lrs[0] == pytest.approx(0.2) and all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    # the predictor follows the schedule when asked to
    stages = prepare_training(tiny("trainer.steps=5", "method.fixed_predictor_lr=false"), tmp_path / "run2")
    assert not any(g["fixed_lr"] for g in stages.trainer.optimizer.param_groups)


def test_resume_reproduces_the_uninterrupted_loss_sequence_bitwise(tmp_path):
    recipe = tiny("trainer.steps=6", "trainer.checkpoint_every=2")
    assert_exact_resume(recipe, tmp_path, stop_after=3)
    assert all("z_std" in r for r in metric_rows(tmp_path / "full") if "loss" in r)


def test_bad_inputs_give_clear_errors():
    with pytest.raises(RecipeError, match="predictor's output"):
        tiny("method.predictor=[8, 16]")
    recipe = tiny("trainer.batch_size=8")
    source, batch = _fixed_views(recipe, n=8)
    method = build_method(recipe, make_plan(recipe, len(source)), source, torch.device("cpu"))
    with pytest.raises(ValueError, match="exactly two views"):
        method.training_step(Batch(batch.views[:1], ["global"], batch.index, batch.label), 0)


def test_presets():
    cifar = load_recipe("simsiam")
    assert len(cifar.method.projector) == 2 and cifar.method.predictor == [512, 2048]
    paper = load_recipe("simsiam-imagenet")
    assert paper.method.projector == [2048, 2048, 2048] and paper.optim.lr == 0.05
    assert paper.method.stop_gradient and paper.method.fixed_predictor_lr
    assert paper.method.view_passes == "separate" and cifar.method.view_passes == "joint"
