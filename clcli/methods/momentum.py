"""Momentum (EMA) networks: one shared piece for MoCo, BYOL, DINO and every other teacher.

A momentum copy has no gradient; after each optimiser step its parameters move towards the
online network's, ξ ← m·ξ + (1 − m)·θ (MoCo arXiv:1911.05722 eq. 2; BYOL arXiv:2006.07733).  The
copy's buffers (BN running statistics) are its own, updated by its own forward passes.  The
momentum's schedule (constant, or BYOL's cosine from m₀ to 1) is a
:class:`~clcli.schedules.CosineSchedule` of the global step.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from clcli.schedules import CosineSchedule


def momentum_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters never receive gradients."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """ξ ← m·ξ + (1 − m)·θ for every parameter pair (same architecture, same order)."""
    t_params = list(target.parameters())
    o_params = list(online.parameters())
    if len(t_params) != len(o_params):
        raise ValueError("ema_update needs two networks of the same architecture")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, [p.detach() for p in o_params], alpha=1.0 - momentum)


def momentum_schedule(start: float, end: float, total_steps: int) -> CosineSchedule:
    """EMA momentum per step: ``start`` → ``end`` on a half-cosine (constant when start == end)."""
    return CosineSchedule(start, end, total_steps)
