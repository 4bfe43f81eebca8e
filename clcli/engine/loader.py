"""Training batches: a resumable epoch sampler and the views dataset.

Augmentation randomness is a pure function of (seed, epoch, sample index): each sample is
augmented under its own seeded RNG, so the batches do not depend on the number of DataLoader
workers, and resuming at any batch of any epoch reproduces exactly the batches an uninterrupted
run would have seen.  The sampler's position (epoch, batch in epoch) is part of the trainer state.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from clcli.data import ImageSource, StreamSource
from clcli.engine.sharding import ShardedBatchSampler
from clcli.errors import BadImageError, DataError
from clcli.views import ViewMaker

_MIX = 0x9E3779B97F4A7C15


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample of one epoch (splitmix64 of the three numbers)."""
    z = (seed * 1_000_003 + epoch * 7_919 + index * _MIX) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(sample_seed(seed, epoch, -1))
    return torch.randperm(n, generator=g)


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of (sample index, sample seed) for one epoch, starting at batch ``start``.

    Incomplete last batches are dropped, so every step has the configured batch size.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        epoch: int,
        start: int = 0,
        num_batches: int | None = None,
        order: torch.Tensor | None = None,
    ) -> None:
        self.n, self.batch_size, self.seed, self.epoch, self.start = n, batch_size, seed, epoch, start
        self.order = order
        full = (n if order is None else len(order)) // batch_size
        self.num_batches = full if num_batches is None else min(num_batches, full)

    def __len__(self) -> int:
        return max(self.num_batches - self.start, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.order is not None:
            perm = self.order.tolist()
        else:
            perm = epoch_permutation(self.n, self.seed, self.epoch).tolist()
        for b in range(self.start, self.num_batches):
            idx = perm[b * self.batch_size : (b + 1) * self.batch_size]
            yield [(i, sample_seed(self.seed, self.epoch, i)) for i in idx]


@dataclass(frozen=True)
class Skipped:
    """An unreadable image left out with ``data.skip_bad_images``: its sample index (``-1 - position`` on a stream)."""

    index: int


@dataclass
class Sample:
    views: list[torch.Tensor]
    index: int
    label: int
    text: str | None = None


def _augment(views: ViewMaker, image: torch.Tensor, seed: int) -> list[torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return views(image)


class ViewsDataset(Dataset):
    """Map-style: (index, seed) -> the image's views, or :class:`Skipped` for a skipped bad image."""

    backend = "per_sample"

    def __init__(
        self, source: ImageSource, views: ViewMaker, skip_bad_images: bool = False, with_text: bool = False
    ) -> None:
        self.source, self.views, self.skip_bad_images, self.with_text = source, views, skip_bad_images, with_text

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[int, int]) -> Sample | Skipped:
        index, seed = item
        try:
            image = self.source.load_image(index)
        except BadImageError:
            if self.skip_bad_images:
                return Skipped(index)
            raise
        text = self.source.text(index) if self.with_text else None
        return Sample(_augment(self.views, image, seed), index, self.source.label(index), text)


class StreamViewsDataset(IterableDataset):
    """Iterable views of a streaming source (no sample index: ``index`` is -1)."""

    def __init__(self, source: StreamSource, views: ViewMaker, seed: int, skip: int = 0, skip_bad_images: bool = False):
        self.source, self.views, self.seed, self.skip, self.skip_bad_images = source, views, seed, skip, skip_bad_images

    def __iter__(self) -> Iterator[Sample | Skipped]:
        info = torch.utils.data.get_worker_info()
        if info is not None and info.num_workers > 1:
            raise DataError(
                "a streaming source is read by one DataLoader worker at most (set data.num_workers to 0 or 1)"
            )
        for position, record in enumerate(self.source):
            if position < self.skip:
                continue
            image, label = record[0], record[1]
            if image is None:
                if self.skip_bad_images:
                    yield Skipped(-1 - position)  # a stream is read once: each position is one file
                    continue
                raise BadImageError(record[3])
            yield Sample(_augment(self.views, image, sample_seed(self.seed, 0, position)), -1, label, record[2])


@dataclass
class CollatedBatch:
    views: list[torch.Tensor]  # uint8 [B, C, H, W] per view
    index: torch.Tensor
    label: torch.Tensor
    skipped: int  # unreadable images left out of this batch
    text: list[str | None] | None = None
    images: torch.Tensor | None = None  # batched views: uint8 [B, C, H, W], views made on the device
    seeds: torch.Tensor | None = None  # batched views: the samples' seeds, int64 [B]
    skipped_index: tuple[int, ...] = ()  # their sample indices (-1 - position on a stream)


def collate(samples: list[Sample | Skipped | None]) -> CollatedBatch:
    good = [s for s in samples if isinstance(s, Sample)]
    skipped = len(samples) - len(good)
    bad = tuple(s.index for s in samples if isinstance(s, Skipped))
    if not good:
        empty = torch.empty(0, dtype=torch.long)
        return CollatedBatch([], empty, empty.clone(), skipped, None, skipped_index=bad)
    views = [torch.stack([s.views[v] for s in good]) for v in range(len(good[0].views))]
    index = torch.tensor([s.index for s in good], dtype=torch.long)
    label = torch.tensor([s.label for s in good], dtype=torch.long)
    text = [s.text for s in good] if any(s.text is not None for s in good) else None
    return CollatedBatch(views, index, label, skipped, text, skipped_index=bad)


def epoch_loader(
    dataset: ViewsDataset,
    batch_size: int,
    seed: int,
    epoch: int,
    start: int,
    num_workers: int,
    num_batches: int | None = None,
    order: torch.Tensor | None = None,
    shard: tuple[int, int] = (0, 1),
) -> DataLoader | Iterator[CollatedBatch]:
    """A DataLoader for one epoch from batch ``start`` (batches gathered on the device when the dataset's
    images are held there).

    It gets a generator of its own, so creating it (at an epoch start, or mid-epoch on resume) never
    draws from the global RNG that methods use.  ``batch_size`` is the global batch; with ``shard``
    = (rank, world size) this process loads its contiguous slice of each global batch
    (:mod:`clcli.engine.sharding`), and ``start`` still counts global batches.
    """
    sampler: Sampler = EpochBatchSampler(len(dataset), batch_size, seed, epoch, start, num_batches, order)
    if shard[1] > 1:
        sampler = ShardedBatchSampler(sampler, *shard)
    resident = getattr(dataset, "resident", None)  # images held on the device (clcli.engine.resident)
    if resident is not None:
        return resident.batches(sampler, dataset.skip_bad_images, dataset.with_text)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=getattr(dataset, "collate_fn", collate),
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(sample_seed(seed, epoch, -2)),
    )


def stream_loader(dataset: StreamViewsDataset, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=min(num_workers, 1),
        collate_fn=collate,
        drop_last=True,
        generator=torch.Generator().manual_seed(0),
    )
