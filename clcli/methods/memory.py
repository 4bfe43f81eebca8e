"""Per-image memory banks and FIFO queues: the shared state of memory-based methods.

:class:`MemoryBank` is InstDisc's non-parametric memory (arXiv:1805.01978 §3.1), also CMC's
(arXiv:1906.05849): one L2-normalised vector per training image, addressed by sample index and
updated with momentum after the loss.  :class:`FeatureQueue` is MoCo's dictionary
(arXiv:1911.05722 §3.2), also SwAV's feature queue: the latest K vectors, oldest replaced first.
Both keep their contents as buffers, so checkpoints save and restore them exactly.
:func:`fill_banks_from_encoder` is the ``bank_init: encoded`` start both bank methods offer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clcli.recipe import ViewsConfig
from clcli.views.pipelines import eval_pipeline, normalize_batch
from clcli.views.plain import plain_loader


class MemoryBank(nn.Module):
    """``size`` vectors of ``dim``, L2-normalised, initialised uniformly at random and normalised."""

    def __init__(self, size: int, dim: int, momentum: float = 0.5, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"a memory bank needs a positive size and dimension, got {size} x {dim}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"bank momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        bound = 1.0 / math.sqrt(dim / 3)
        init = torch.rand(size, dim, generator=generator).mul_(2 * bound).sub_(bound)
        self.register_buffer("vectors", F.normalize(init, dim=1))

    @property
    def size(self) -> int:
        return int(self.vectors.shape[0])

    def get(self, index: torch.Tensor) -> torch.Tensor:
        """The stored vectors of the given sample indices (a copy, no gradient)."""
        return self.vectors.index_select(0, index).detach().clone()

    def sample(self, shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample indices drawn uniformly with replacement (noise / negatives)."""
        return torch.randint(0, self.size, shape, device=self.vectors.device, generator=generator)

    @torch.no_grad()
    def update(self, index: torch.Tensor, features: torch.Tensor) -> None:
        """v_i ← normalise(m·v_i + (1 − m)·f_i) for the batch's rows only."""
        f = F.normalize(features.detach().float(), dim=1)
        mixed = self.vectors.index_select(0, index) * self.momentum + f * (1.0 - self.momentum)
        self.vectors.index_copy_(0, index, F.normalize(mixed, dim=1))


class FeatureQueue(nn.Module):
    """A FIFO of the latest ``length`` vectors of ``dim`` (any batch size; wraps around)."""

    def __init__(self, length: int, dim: int, init: str = "random", generator: torch.Generator | None = None) -> None:
        super().__init__()
        if length < 1:
            raise ValueError(f"queue length must be positive, got {length}")
        data = torch.randn(length, dim, generator=generator) if init == "random" else torch.zeros(length, dim)
        self.register_buffer("data", F.normalize(data, dim=1) if init == "random" else data)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self._written = 0  # ``count`` as a Python int, so that no step reads it off the device

    @property
    def length(self) -> int:
        return int(self.data.shape[0])

    @property
    def full(self) -> bool:
        """Whether every row has been written."""
        return self._written >= self.length

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "count" in state_dict:  # the loaded tensor (a checkpoint's is on the host)
            self._written = int(state_dict[prefix + "count"])

    def contents(self) -> torch.Tensor:
        """The stored vectors that have been written (all of them once the queue is full)."""
        return self.data if self.full else self.data[: self._written]

    @torch.no_grad()
    def enqueue(self, x: torch.Tensor) -> None:
        """Write ``x`` [B, dim] over the oldest entries."""
        x = x.detach().to(self.data.dtype)
        if x.shape[0] >= self.length:
            x = x[-self.length :]
        b = x.shape[0]
        # rows ptr, ptr + 1, ... (mod length), addressed on the device: the pointer is never read back
        rows = torch.arange(b, device=self.ptr.device).add_(self.ptr).remainder_(self.length)
        self.data.index_copy_(0, rows, x)
        self.ptr.add_(b).remainder_(self.length)
        self.count.add_(b)
        self._written += b


@torch.no_grad()
def fill_banks_from_encoder(
    banks: Sequence[MemoryBank],
    source: Any,
    embed: Callable[[torch.Tensor], list[torch.Tensor]],
    network: nn.Module,
    views: ViewsConfig,
    *,
    bf16: bool = False,
    batch_size: int = 256,
) -> int:
    """Write every row of ``banks`` with ``embed``'s vectors of that training image (one per bank).

    For ``bank_init: encoded``: with the papers' random banks every positive of a first epoch is a
    random vector (an image's entry is written only after its first visit), so a one-epoch run
    learns nothing; filled banks give it real, equally old positives and negatives.  Images get the
    recipe's evaluation transform (resize, centre crop; no randomness) and its ``views.mean`` /
    ``views.std`` normalisation, as the training views do.  Batch norm in ``network``
    normalises with each batch's statistics, as in training, but its running statistics are left
    as they were.  Unreadable images keep their random rows.  Returns the rows written.
    """
    loader = plain_loader(
        source, eval_pipeline(views.eval_size, views.eval_resize), batch_size=batch_size, skip_bad=True
    )
    device = banks[0].vectors.device
    norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 - 0) running + 0 batch: unchanged
    written = 0
    try:
        for images, rows in loader:
            if images is None:
                continue
            x = normalize_batch(images.to(device), views.mean, views.std)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                vectors = embed(x)
            index = rows.to(device)
            for bank, v in zip(banks, vectors, strict=True):
                bank.vectors.index_copy_(0, index, F.normalize(v.float(), dim=1))
            written += len(rows)
    finally:
        for m, momentum in zip(norms, saved, strict=True):
            m.momentum = momentum
    return written
