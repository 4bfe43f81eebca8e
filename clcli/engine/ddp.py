"""Data parallelism for the trainer: the method's networks inside DistributedDataParallel.

A method is trained through :meth:`~clcli.methods.base.Method.training_step`, not ``forward``;
:class:`StepModule` is the thin module whose ``forward`` is that step, so DDP's hooks see every
parameter the step uses and average the gradients over the processes in the backward pass.
What DDP must not touch stays outside its reach:

* buffers (memory banks, queues, DINO's centre, BN running statistics) are never broadcast from
  rank 0 after the start (``broadcast_buffers=False``); each method updates them identically on
  every rank from gathered values;
* parameters without gradient (momentum encoders, frozen towers) are not DDP's: the methods' EMA
  updates run on every rank from identical, averaged weights.

In a single process everything here is the identity: the step module is called directly.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from clcli import dist
from clcli.engine.syncbn import convert_sync_batchnorm


class StepModule(nn.Module):
    """``forward(batch, step)`` is ``method.training_step(batch, step)``: what DDP wraps."""

    def __init__(self, method: nn.Module) -> None:
        super().__init__()
        self.method = method

    def forward(self, batch: Any, step: int) -> Any:
        return self.method.training_step(batch, step)


def data_parallel(
    method: nn.Module, device: torch.device, *, sync_batchnorm: bool = False, find_unused_parameters: bool = False
) -> nn.Module:
    """The module the trainer calls for a training step: DDP around ``method`` when several processes train.

    ``sync_batchnorm`` first makes the method's plain batch norms global-batch (see
    :mod:`clcli.engine.syncbn`).  ``find_unused_parameters`` (a method's
    ``ddp_find_unused_parameters``) lets a step leave trainable parameters out (a head used every
    other step): without it DDP never averages the gradient bucket that holds them and stops with
    an error at the next step.  The method's parameters are the same objects afterwards, so an
    optimiser built on them before still trains them.
    """
    if dist.world_size() == 1:
        return StepModule(method)
    if sync_batchnorm:
        convert_sync_batchnorm(method, device)
    with warnings.catch_warnings():
        # torch >= 2.14 calls broadcast_buffers deprecated but keeps it as the way to leave buffers
        # (banks, queues) unsynchronised, at the start too; its replacement syncs them at the start
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        return nn.parallel.DistributedDataParallel(
            StepModule(method),
            device_ids=[device.index] if device.type == "cuda" and device.index is not None else None,
            broadcast_buffers=False,
            find_unused_parameters=find_unused_parameters,
        )


@contextlib.contextmanager
def accumulating(module: nn.Module, last_micro_batch: bool) -> Iterator[None]:
    """Gradient accumulation: hold DDP's gradient averaging back until the last micro-batch of a step."""
    if isinstance(module, nn.parallel.DistributedDataParallel) and not last_micro_batch:
        with module.no_sync():
            yield
    else:
        yield


@torch.no_grad()
def share_main_state(module: nn.Module) -> None:
    """Every rank takes rank 0's parameters and buffers (after state computed outside a step).

    A method's epoch set-up (a memory bank filled by encoding every image, k-means pseudo-labels)
    runs on every rank from the same weights and seeds; CUDA kernels need not be bitwise
    reproducible, so rank 0's result is made everyone's.
    """
    if not dist.is_distributed():
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, 0)


def any_rank(flag: bool | torch.Tensor) -> bool:
    """True on every rank when ``flag`` is true on at least one (a stop request, a non-finite loss)."""
    if not dist.is_distributed():
        return bool(flag)
    t = torch.as_tensor(flag, dtype=torch.float32).detach().reshape(1).clone()
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The average of a scalar over the processes (a copy; the input is left alone)."""
    return dist.all_reduce_mean(value.detach().clone().float())


def sum_over_ranks(value: int, device: torch.device) -> int:
    """The sum of a count over the processes (images seen, images skipped)."""
    if not dist.is_distributed():
        return value
    return int(dist.all_reduce_sum(torch.tensor([value], dtype=torch.long, device=device)).item())
