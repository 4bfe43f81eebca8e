"""Images without augmentation, for everything that reads a whole split in order.

Feature extraction for evaluation, zero-shot classification, DeepCluster's clustering pass and the
fill of an encoded memory bank all load each image once, apply a deterministic transform (resize,
centre crop) and keep its index; an unreadable image either stops the pass (naming the file) or,
with ``skip_bad``, is left out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from clcli.errors import BadImageError


class PlainImages(Dataset):
    """``(uint8 image after transform, index)``; ``(None, index)`` for an unreadable image with ``skip_bad``."""

    def __init__(self, source: Any, transform: Callable[[torch.Tensor], torch.Tensor], skip_bad: bool) -> None:
        self.source, self.transform, self.skip_bad = source, transform, skip_bad

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int]:
        try:
            return self.transform(self.source.load_image(i)), i
        except BadImageError:
            if self.skip_bad:
                return None, i
            raise


def collate_readable(items: list[tuple[torch.Tensor | None, int]]) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Stack the readable images of a batch; ``(None, empty)`` when none was readable."""
    good = [(x, i) for x, i in items if x is not None]
    if not good:
        return None, torch.empty(0, dtype=torch.long)
    return torch.stack([x for x, _ in good]), torch.tensor([i for _, i in good], dtype=torch.long)


def plain_loader(
    source: Any,
    transform: Callable[[torch.Tensor], torch.Tensor],
    *,
    batch_size: int,
    num_workers: int = 0,
    skip_bad: bool = False,
) -> DataLoader:
    """Batches ``(images or None, indices)`` of ``source`` in order."""
    return DataLoader(
        PlainImages(source, transform, skip_bad),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_readable,
    )
