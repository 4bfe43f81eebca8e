import math

import pytest

from clcli.schedules import CosineSchedule, LRSchedule, WarmupConstant


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
