"""Splitting the global batch over processes so that N processes see exactly one process's batches.

The one-process sampler (:class:`clcli.engine.loader.EpochBatchSampler`) yields each global
batch as a list of ``(sample index, sample seed)``.  Under data parallelism every process runs the
same sampler (same seed, same epoch permutation) and keeps its contiguous slice: rank ``r`` of
``W`` takes items ``r*B/W .. (r+1)*B/W - 1``.  Concatenating the ranks' slices in rank order gives
back the global batch, with the same images and the same augmentation seeds; gathering along
dim 0 (:func:`clcli.dist.gather_with_grad`) therefore reproduces the one-process batch order.
The sampler's position stays counted in global batches, so a resume at batch ``k`` is exact
whatever the number of processes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

from torch.utils.data import Sampler

from clcli.errors import DistributedError

T = TypeVar("T")


def shard_bounds(global_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous slice of a global batch of ``global_size`` items."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    if global_size % world_size != 0:
        raise DistributedError(
            f"a global batch of {global_size} does not split evenly over {world_size} processes; "
            f"make trainer.batch_size a multiple of {world_size}"
        )
    per = global_size // world_size
    return rank * per, (rank + 1) * per


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rank ``rank``'s contiguous slice of ``items`` (one global batch)."""
    start, stop = shard_bounds(len(items), rank, world_size)
    return list(items[start:stop])


def owner(position: int, global_batch: int, world_size: int) -> int:
    """Which rank trains the record at ``position`` of a stream read in global batches of ``global_batch``."""
    start, stop = shard_bounds(global_batch, 0, world_size)
    return (position % global_batch) // (stop - start)


class ShardedBatchSampler(Sampler[list[T]]):
    """Wraps a sampler of global batches and yields this rank's slice of each.

    Its length and its position are those of the wrapped sampler (global batches), so a trainer
    that counts consumed batches resumes the same way on any number of processes.
    """

    def __init__(self, sampler: Iterable[list[T]], rank: int, world_size: int) -> None:
        shard_bounds(world_size, rank, world_size)  # validates rank/world
        self.sampler, self.rank, self.world_size = sampler, rank, world_size

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[T]]:
        for batch in self.sampler:
            yield shard(batch, self.rank, self.world_size)
