"""Counter-based per-sample randomness for batched views (clcli/views/sample_random.py)."""

from __future__ import annotations

import numpy as np
import torch

from clcli.views.sample_random import SampleRandom


def test_a_samples_draws_depend_only_on_its_seed_and_stream() -> None:
    batch = SampleRandom([11, 22, 33]).uniform(5)
    alone = SampleRandom([22]).uniform(5)
    assert torch.equal(batch[1], alone[0])
    assert not torch.equal(SampleRandom([22], stream=1).uniform(5), alone)
    rng = SampleRandom([22])
    first, second = rng.uniform(2), rng.uniform(3)
    assert torch.equal(torch.cat([first, second], dim=1), alone)


def test_draws_are_uniform_and_independent() -> None:
    u = SampleRandom(np.arange(100_000)).uniform(3).numpy()
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
    corr = np.corrcoef(u.T)
    assert np.abs(corr - np.eye(3)).max() < 0.02
    hist, _ = np.histogram(u[:, 0], bins=10, range=(0, 1))
    assert np.abs(hist / len(u) - 0.1).max() < 0.005


def test_bernoulli_rate_and_permutations_cover_every_order() -> None:
    rng = SampleRandom(np.arange(48_000))
    assert abs(rng.bernoulli(0.2).float().mean().item() - 0.2) < 0.01
    perms = rng.permutations(4)
    orders = {tuple(p) for p in perms.tolist()}
    assert len(orders) == 24
    assert sorted(perms[0].tolist()) == [0, 1, 2, 3]
