"""Batch normalisation over the global batch, on any device and backend.

Data-parallel training normalises, by default, with each process's own batch statistics, which
changes the method: BN then sees B/N images instead of B.  SimCLR (arXiv:2002.05709, section 5.1
"global BN"), BYOL (arXiv:2006.07733), SwAV (arXiv:2006.09882), DINO (arXiv:2104.14294) and MoCo v3
(arXiv:2104.02057) aggregate the statistics over all devices.  torch's ``nn.SyncBatchNorm`` does
that with CUDA kernels only; :class:`PortableSyncBatchNorm` does it with any tensor and any backend
(gloo on the CPU), and :func:`convert_sync_batchnorm` picks one of the two.

How it works: each process computes, per channel, its sample count, mean and sum of squared
deviations; these are gathered with :func:`clcli.dist.gather_with_grad` and combined exactly (Chan
et al.'s pairwise update), so every process normalises with the global mean and biased variance.
The gradient flows back through the gather, whose backward sums the processes' contributions:
each process gets the gradient of the sum of all processes' losses with respect to its inputs,
which, after data-parallel averaging of parameter gradients, is the gradient of the global batch's
mean loss, the same as plain BN on the concatenated batch.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from clcli import dist


class PortableSyncBatchNorm(_BatchNorm):
    """BatchNorm{1,2,3}d whose training statistics are those of the batch over all processes.

    Parameters, buffers and their names are those of ``nn.BatchNorm*d``, so checkpoints move freely
    between the two.  In evaluation mode, and in a single process, it is plain batch norm.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least a 2D input (batch, channels, ...), got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        uses_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not uses_batch_stats or dist.world_size() == 1:
            return super().forward(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        mean, var, count = _global_moments(x)
        if count <= 1:
            raise ValueError(f"expected more than 1 value per channel when training, got {int(count)} in all")
        if self.training and self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.running_mean.mul_(1 - factor).add_(mean.detach().to(self.running_mean.dtype), alpha=factor)
                unbiased = var.detach() * (count / (count - 1))
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = (x.float() - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.float().view(shape) + self.bias.float().view(shape)
        return y.to(x.dtype)


def _global_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Per-channel mean and biased variance of ``x`` over all processes' batches, and the total count."""
    channels = x.shape[1]
    dims = [0, *range(2, x.dim())]
    xf = x.float()
    n = x.numel() // channels if channels else 0
    if n > 0:
        mean = xf.mean(dims)
        m2 = (xf - mean.view([1, -1] + [1] * (x.dim() - 2))).square().sum(dims)
    else:
        mean = m2 = xf.sum(dims)  # zeros that still belong to the graph
    count = torch.full((1,), float(n), device=x.device)
    stats = dist.gather_with_grad(torch.cat([count, mean, m2]).unsqueeze(0))  # [world, 1 + 2C]
    counts, means, m2s = stats[:, :1], stats[:, 1 : 1 + channels], stats[:, 1 + channels :]
    total = counts.sum()
    global_mean = (counts * means).sum(0) / total
    global_m2 = (m2s + counts * (means - global_mean).square()).sum(0)
    return global_mean, global_m2 / total, float(total.detach())


#: The layers a conversion replaces: torch's own batch norms, never a subclass with its own rule
#: (MoCo's shuffling/split BN keeps its per-group statistics).
PLAIN_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _convert(module: nn.Module, layer: type[_BatchNorm]) -> nn.Module:
    out = module
    if type(module) in PLAIN_BATCHNORMS:
        out = layer(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            out.weight = module.weight  # the same Parameters: an optimiser built before still updates them
            out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert(child, layer))
    return out


def convert_sync_batchnorm(module: nn.Module, device: torch.device | None = None) -> nn.Module:
    """Every plain batch norm layer of ``module`` made global-batch: torch's on CUDA, the portable one elsewhere.

    In a single process ``module`` is returned unchanged.  ``device`` defaults to the device of
    ``module``'s first parameter (CPU when it has none).  The layers keep their parameters and
    buffers (the same tensors), and ``module`` itself is changed in place unless it is a batch norm.
    """
    if dist.world_size() == 1:
        return module
    if device is None:
        first = next(module.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    return _convert(module, nn.SyncBatchNorm if device.type == "cuda" else PortableSyncBatchNorm)


def has_sync_batchnorm(module: nn.Module) -> bool:
    """Whether any layer of ``module`` normalises over the global batch."""
    return any(isinstance(m, (nn.SyncBatchNorm, PortableSyncBatchNorm)) for m in module.modules())


__all__ = ["PLAIN_BATCHNORMS", "PortableSyncBatchNorm", "convert_sync_batchnorm", "has_sync_batchnorm"]
