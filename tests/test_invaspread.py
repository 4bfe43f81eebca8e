"""InvaSpread (arXiv:1904.03436): the loss against an independent loop over anchors (the positive
term and the spreading term), the official code's detaching of the non-anchor side, fp32 under
bf16, the two-view requirement, and learning on real images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clcli.assemble import build_method
from clcli.data.sources import limit_source, open_data
from clcli.errors import RecipeError
from clcli.losses import invaspread_loss, nt_xent
from clcli.methods.base import Batch
from clcli.schedules import make_plan

from .helpers import tiny_recipe


def reference_invaspread(z1: np.ndarray, z2: np.ndarray, tau: float) -> float:
    """Loop over the 2B anchors a: log P_a plus Σ over the other instances k ∉ {a, p(a)} of log(1 − P_ak)."""
    f = [v / np.linalg.norm(v) for v in [*z1, *z2]]
    n = len(z1)
    total = 0.0
    for a in range(2 * n):
        p = a + n if a < n else a - n
        den = sum(math.exp(float(f[a] @ f[k]) / tau) for k in range(2 * n) if k != a)
        total += math.log(math.exp(float(f[a] @ f[p]) / tau) / den)
        for k in range(2 * n):
            if k in (a, p):
                continue
            total += math.log(1.0 - math.exp(float(f[a] @ f[k]) / tau) / den)
    return -total / (2 * n)


@pytest.mark.parametrize(("tau", "detach"), [(0.1, True), (0.5, False), (1.0, True)])
def test_loss_matches_an_independent_loop_including_the_spreading_term(tau, detach):
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(5, 7, generator=g, dtype=torch.float64)
    z2 = torch.randn(5, 7, generator=g, dtype=torch.float64)
    got = invaspread_loss(z1, z2, tau, detach_others=detach).item()
    assert got == pytest.approx(reference_invaspread(z1.numpy(), z2.numpy(), tau), rel=1e-5)
    # not NT-Xent: the spreading term adds Σ −log(1 − P_ak) > 0
    assert got > nt_xent(z1, z2, tau).item() + 1e-3


def test_spreading_term_on_hand_made_vectors():
    # two images, orthogonal except each pair: f = e1, e1 (image 0), e2, e2 (image 1); τ = 1
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # every anchor: partner similarity 1, the two other instances 0: den = e + 2
    den = math.e + 2
    per_anchor = math.log(math.e / den) + 2 * math.log(1 - 1 / den)
    assert invaspread_loss(z1, z2, 1.0).item() == pytest.approx(-per_anchor, rel=1e-6)


def loop_with_grad(z1: torch.Tensor, z2: torch.Tensor, tau: float, detach: bool) -> torch.Tensor:
    """The same loss as a loop in torch; with ``detach`` every non-anchor factor is a constant."""
    n = z1.shape[0]
    f = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    total = f.new_zeros(())
    for a in range(2 * n):
        p = a + n if a < n else a - n
        others = [k for k in range(2 * n) if k != a]
        side = f.detach() if detach else f
        e = {k: torch.exp(f[a] @ side[k] / tau) for k in others}
        den = sum(e.values())
        total = total + torch.log(e[p] / den)
        for k in others:
            if k != p:
                total = total + torch.log(1 - e[k] / den)
    return -total / (2 * n)


@pytest.mark.parametrize("detach", [True, False])
def test_gradient_flows_only_through_the_anchor_side_when_detached(detach):
    g = torch.Generator().manual_seed(3)
    z1 = torch.randn(4, 6, generator=g, requires_grad=True)
    z2 = torch.randn(4, 6, generator=g, requires_grad=True)
    invaspread_loss(z1, z2, 0.2, detach_others=detach).backward()
    got = (z1.grad.clone(), z2.grad.clone())
    z1.grad = z2.grad = None
    loop_with_grad(z1, z2, 0.2, detach).backward()
    torch.testing.assert_close(got[0], z1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[1], z2.grad, rtol=1e-4, atol=1e-6)
    if detach:  # the two readings differ: detaching changes the gradient, not the value
        z1.grad = z2.grad = None
        loop_with_grad(z1, z2, 0.2, False).backward()
        assert not torch.allclose(got[0], z1.grad, atol=1e-4)


def test_loss_is_fp32_under_bf16_autocast_and_rejects_bad_shapes():
    g = torch.Generator().manual_seed(4)
    z1, z2 = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = invaspread_loss(z1.bfloat16(), z2.bfloat16(), 0.1)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(invaspread_loss(z1.bfloat16().float(), z2.bfloat16().float(), 0.1).item())
    with pytest.raises(ValueError):
        invaspread_loss(torch.randn(4, 8), torch.randn(3, 8))
    with pytest.raises(ValueError, match="two images"):
        invaspread_loss(torch.randn(1, 8), torch.randn(1, 8))


def build(*extra: str):
    recipe = tiny_recipe("invaspread", *extra)
    source = limit_source(open_data(recipe.data.source, recipe.data.train_split, recipe.data), recipe.data.limit)
    return recipe, build_method(recipe, make_plan(recipe, len(source)), source, torch.device("cpu")), source


def test_recipe_must_make_exactly_two_views():
    with pytest.raises(RecipeError, match="exactly two"):
        build("views.groups.0.count=1")


def test_the_step_is_the_loss_of_the_two_views_embeddings():
    recipe, method, source = build()
    from clcli.views import ViewMaker, normalize_batch

    views = ViewMaker(recipe.views)
    pairs = [views(source.load_image(i)) for i in range(8)]
    x = [normalize_batch(torch.stack([p[v] for p in pairs]), recipe.views.mean, recipe.views.std) for v in (0, 1)]
    out = method.training_step(Batch(x, ["global", "global"], torch.arange(8), torch.zeros(8, dtype=torch.long)), 0)
    f = method.embed(torch.cat(x)).detach()  # one pass over both views (BN over the 2B images)
    assert f.shape == (16, 128) and torch.allclose(f.norm(dim=1), torch.ones(16), atol=1e-5)
    ref = reference_invaspread(f[:8].double().numpy(), f[8:].double().numpy(), 0.1)
    assert out.loss.item() == pytest.approx(ref, rel=1e-4)


def test_steps_lower_the_loss_on_real_images():
    # one batch of 64 real digits, fixed pre-made views (made once, to keep the test fast)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        recipe, method, source = build("trainer.batch_size=64", "views.groups.0.crop_scale=[0.5, 1.0]")
        from clcli.views import ViewMaker, normalize_batch

        maker = ViewMaker(recipe.views)
        torch.manual_seed(0)
        sets = []
        for _ in range(3):
            pairs = [maker(source.load_image(i)) for i in range(64)]
            sets.append(
                [
                    normalize_batch(torch.stack([p[v] for p in pairs]), recipe.views.mean, recipe.views.std)
                    for v in (0, 1)
                ]
            )
        opt = torch.optim.SGD(method.parameters(), lr=0.03, momentum=0.9, weight_decay=5e-4)
        index, label = torch.arange(64), torch.zeros(64, dtype=torch.long)
        seq = []
        for step in range(20):
            out = method.training_step(Batch(sets[step % 3], ["global", "global"], index, label), step)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            seq.append(out.loss.item())
    finally:
        torch.set_num_threads(threads)
    assert sum(seq[-4:]) / 4 < sum(seq[:4]) / 4 - 0.3, seq
