"""Every collective the project uses, in one place.

In a single process (no initialised process group) each call is a no-op or the identity, so
methods call these unconditionally and the same code runs under ``torchrun`` and on a laptop.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as torch_dist


def is_distributed() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def world_size() -> int:
    return torch_dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return torch_dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward returns each rank its slice of the summed gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        out = [torch.zeros_like(x) for _ in range(world_size())]
        torch_dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        stacked = torch.stack(grads)
        torch_dist.all_reduce(stacked)
        return stacked[rank()]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every process along dim 0, keeping the gradient (SimCLR, CLIP negatives)."""
    if not is_distributed():
        return x
    return torch.cat(_GatherWithGrad.apply(x), dim=0)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every process along dim 0 without gradient (keys, queues)."""
    if not is_distributed():
        return x
    out = [torch.zeros_like(x) for _ in range(world_size())]
    torch_dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def local_share(x: torch.Tensor) -> torch.Tensor:
    """This process's contiguous share along dim 0 of a tensor every process holds whole; all of it in one process.

    For draws and buffers that are global (the same on every rank): rank r of W gets rows
    r*n/W .. (r+1)*n/W - 1, the rows its part of the global batch would have had in one process.
    """
    if not is_distributed():
        return x
    world = world_size()
    if x.shape[0] % world != 0:
        raise ValueError(f"{x.shape[0]} rows do not split evenly over {world} processes")
    return x.chunk(world)[rank()]


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Average ``x`` over processes (in place where distributed); identity in one process."""
    if is_distributed():
        torch_dist.all_reduce(x)
        x /= world_size()
    return x


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        torch_dist.all_reduce(x)
    return x


def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    if is_distributed():
        torch_dist.broadcast(x, src)
    return x


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as process ``src`` has it (any picklable value); ``obj`` itself in one process."""
    if not is_distributed():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if is_distributed():
        torch_dist.barrier()
