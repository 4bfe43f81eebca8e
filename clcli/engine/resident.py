"""Decoded images held in the training device's memory, batches gathered there (``data.on_device``).

With the batched views and a decoded-image cache (:mod:`clcli.data.cache`), a training step needs only
the uint8 images of its batch. When they all fit in the device's memory they are copied there once,
and each batch is an index into that tensor: no DataLoader, no host-to-device copy per step. The
batches are those of :func:`~clcli.engine.loader.epoch_loader` (the same sampler, so the same order,
sample seeds, sharding and resume position), and unreadable images are skipped or refused as the
DataLoader path does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

from clcli.data.cache import CachedSource
from clcli.engine.loader import CollatedBatch
from clcli.errors import RecipeError

__all__ = ["ResidentImages", "resident_images"]


class ResidentImages:
    """A cached source's images as one ``uint8`` ``[N, C, H, W]`` tensor on ``device``, with the labels."""

    def __init__(self, source: CachedSource, device: torch.device) -> None:
        self.source = source
        self.device = device
        self.images = source.as_tensor(device)
        labels = source.labels()
        if labels is None:
            labels = torch.tensor([source.label(i) for i in range(len(source))], dtype=torch.long)
        self.labels = labels.to(torch.long)
        self.bad = set(source.bad_indices)

    def batches(
        self, sampler: Sampler[list[tuple[int, int]]], skip_bad_images: bool, with_text: bool
    ) -> Iterator[CollatedBatch]:
        """The sampler's batches of (index, seed) as collated batches whose images are on the device."""
        for items in sampler:
            good = [(i, s) for i, s in items if i not in self.bad]
            bad = tuple(i for i, _ in items if i in self.bad)
            if bad and not skip_bad_images:
                self.source.load_image(bad[0])  # raises the same BadImageError the DataLoader path raises
            index = torch.tensor([i for i, _ in good], dtype=torch.long)
            seeds = torch.tensor([s for _, s in good], dtype=torch.long)
            text = [self.source.text(i) for i, _ in good] if with_text else None
            if text is not None and all(t is None for t in text):
                text = None
            images = self.images[index.to(self.device)] if good else None
            yield CollatedBatch(
                [], index, self.labels[index], len(bad), text, images=images, seeds=seeds, skipped_index=bad
            )


def _free_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def resident_images(recipe: Any, source: Any, backend: str, device: torch.device) -> tuple[ResidentImages | None, str]:
    """``(images or None, why)`` for ``data.on_device``: ``true`` refuses where it cannot apply, ``auto``
    holds the images on a GPU when they fit ``data.cache_budget`` of its free memory."""
    choice = recipe.data.on_device
    applies = backend == "batched" and isinstance(source, CachedSource) and source.extents is None
    if choice is False:
        return None, "data.on_device=false"
    if not applies:
        if choice is True:
            raise RecipeError(
                "data.on_device=true needs the batched views (views.backend) and images of one size decoded into "
                "the cache (data.cache); set data.on_device=auto or false"
            )
        return None, "not a cached source with batched views"
    if choice == "auto":
        free = _free_bytes(device)
        need = int(torch.Size(source.shape).numel())
        if free is None:
            return None, f"auto on {device.type}"
        if need > recipe.data.cache_budget * free:
            return None, f"{need / 2**30:.1f} GiB of images do not fit data.cache_budget of the free device memory"
    return ResidentImages(source, device), f"{len(source)} images held on {device.type}"
