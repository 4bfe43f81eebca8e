"""NT-Xent against an independent computation written from SimCLR's equation (arXiv:2002.05709, eq. 1)."""

import math

import numpy as np
import pytest
import torch

from clcli.losses import nt_xent


def reference_nt_xent(z1: np.ndarray, z2: np.ndarray, tau: float) -> float:
    """Loop over the 2N anchors; the positive of view k of image i is the other view of image i."""
    views = [*z1, *z2]
    n = len(z1)
    total = 0.0
    for a in range(2 * n):
        p = a + n if a < n else a - n

        def sim(u, v):
            return float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))

        num = math.exp(sim(views[a], views[p]) / tau)
        den = sum(math.exp(sim(views[a], views[k]) / tau) for k in range(2 * n) if k != a)
        total += -math.log(num / den)
    return total / (2 * n)


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_nt_xent_matches_reference(tau):
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(6, 5, generator=g, dtype=torch.float64)
    z2 = torch.randn(6, 5, generator=g, dtype=torch.float64)
    got = nt_xent(z1, z2, tau).item()
    assert got == pytest.approx(reference_nt_xent(z1.numpy(), z2.numpy(), tau), rel=1e-5)


def test_nt_xent_is_low_for_aligned_pairs_and_high_for_swapped():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(8, 16, generator=g)
    aligned = nt_xent(z, z + 0.01 * torch.randn(8, 16, generator=g), 0.1)
    shuffled = nt_xent(z, z.roll(1, dims=0), 0.1)
    assert aligned < 0.1 < shuffled


def test_nt_xent_computes_in_fp32_under_bf16_autocast():
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    ref = nt_xent(z1, z2, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = nt_xent(z1.bfloat16(), z2.bfloat16(), 0.1)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(nt_xent(z1.bfloat16().float(), z2.bfloat16().float(), 0.1).item(), rel=1e-6)
    assert out.item() == pytest.approx(ref.item(), rel=5e-2)


def test_nt_xent_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(3)
    z1 = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    # the fp32 wrapper casts to float32; gradcheck needs float64, so compare autograd with a numeric estimate
    loss = nt_xent(z1, z2, 0.5)
    loss.backward()
    eps = 1e-3
    base = z1.detach().clone()
    numeric = torch.zeros_like(base)
    for i in range(base.shape[0]):
        for j in range(base.shape[1]):
            plus, minus = base.clone(), base.clone()
            plus[i, j] += eps
            minus[i, j] -= eps
            numeric[i, j] = (nt_xent(plus, z2.detach(), 0.5) - nt_xent(minus, z2.detach(), 0.5)) / (2 * eps)
    assert torch.allclose(z1.grad, numeric, atol=2e-3)


def test_nt_xent_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        nt_xent(torch.randn(4, 8), torch.randn(3, 8), 0.5)
