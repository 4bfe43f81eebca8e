"""Training batches whose views are made on the device: the ``views.backend`` choice and its dataset.

With the batched backend the dataset yields each decoded uint8 image with its index, label, caption
and sample seed (:func:`~clcli.engine.loader.sample_seed` of the run seed, epoch and index), the
collate stacks the images, and the trainer turns the batch into views on the training device
(:func:`device_views`, with :class:`~clcli.views.batched.BatchedViews`) just before normalisation.
The randomness of a sample's views is keyed by its seed alone, so runs repeat and resume exactly and
do not depend on the number of DataLoader workers or on how samples are grouped into batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from clcli.data import ImageSource
from clcli.engine.loader import CollatedBatch, Skipped, ViewsDataset
from clcli.errors import BadImageError, DataError, RecipeError
from clcli.recipe import Recipe
from clcli.views.batched import BatchedViews, unsupported_pipelines

__all__ = [
    "CPU_BACKEND",
    "BatchedViewsDataset",
    "ImageSample",
    "collate_images",
    "device_views",
    "resolve_backend",
    "source_image_shape",
]

# What ``views.backend=auto`` picks on the CPU where the batched form applies (see resolve_backend): the
# batched views cost a tenth or less of the per-sample pipelines' CPU time (bench/notes/views_cost.py).
CPU_BACKEND = "batched"
PROBE_IMAGES = 16


@dataclass
class ImageSample:
    image: torch.Tensor  # uint8 [C, H, W]
    index: int
    label: int
    seed: int
    text: str | None = None


class BatchedViewsDataset(ViewsDataset):
    """Map-style: (index, seed) -> the decoded image with its seed (no augmentation), None for a skipped bad image."""

    backend = "batched"

    def __init__(
        self, source: ImageSource, views: BatchedViews, skip_bad_images: bool = False, with_text: bool = False
    ) -> None:
        super().__init__(source, views, skip_bad_images, with_text)  # type: ignore[arg-type]
        self.batched_views = views
        self.resident: Any = None  # clcli.engine.resident.ResidentImages when data.on_device holds the images

    def __getitem__(self, item: tuple[int, int]) -> ImageSample | Skipped:  # type: ignore[override]
        index, seed = item
        try:
            image = self.source.load_image(index)
        except BadImageError:
            if self.skip_bad_images:
                return Skipped(index)
            raise
        text = self.source.text(index) if self.with_text else None
        return ImageSample(image, index, self.source.label(index), seed, text)

    @staticmethod
    def collate_fn(samples: list[ImageSample | Skipped | None]) -> CollatedBatch:
        return collate_images(samples)


def collate_images(samples: list[ImageSample | Skipped | None]) -> CollatedBatch:
    """Stack a batch's images (they must be one size) and seeds; ``views`` stays empty until the device."""
    good = [s for s in samples if isinstance(s, ImageSample)]
    skipped = len(samples) - len(good)
    bad = tuple(s.index for s in samples if isinstance(s, Skipped))
    empty = torch.empty(0, dtype=torch.long)
    if not good:
        return CollatedBatch([], empty, empty, skipped, images=None, seeds=empty, skipped_index=bad)
    shapes = {tuple(s.image.shape) for s in good}
    if len(shapes) > 1:
        listed = ", ".join("x".join(map(str, shape)) for shape in sorted(shapes)[:4])
        raise DataError(
            f"views.backend=batched needs images of one size, but one batch holds images of {listed} "
            "(C x H x W); set views.backend=per_sample"
        )
    images = torch.stack([s.image for s in good])
    index = torch.tensor([s.index for s in good], dtype=torch.long)
    label = torch.tensor([s.label for s in good], dtype=torch.long)
    seeds = torch.tensor([s.seed for s in good], dtype=torch.long)
    text = [s.text for s in good] if any(s.text is not None for s in good) else None
    return CollatedBatch([], index, label, skipped, text, images=images, seeds=seeds, skipped_index=bad)


def device_views(cb: CollatedBatch, dataset: Any, device: torch.device) -> list[torch.Tensor]:
    """The batch's uint8 views on ``device``: made there from the images (batched) or moved there (per sample)."""
    if cb.images is None:
        return [v.to(device, non_blocking=True) for v in cb.views]
    assert isinstance(dataset, BatchedViewsDataset) and cb.seeds is not None
    return dataset.batched_views(cb.images.to(device, non_blocking=True), cb.seeds)


def source_image_shape(source: ImageSource, probe: int = PROBE_IMAGES) -> tuple[int, ...] | None:
    """The one image shape ``(C, H, W)`` of ``source``, or None when its images differ in size.

    A source that declares ``image_shape`` (fixed-size decoded arrays) is taken at its word; otherwise
    up to ``probe`` images spread evenly over the source are decoded and compared (unreadable ones are
    passed over). Every batch is checked again when it is stacked.
    """
    declared = getattr(source, "image_shape", None)
    if declared is not None:
        return tuple(int(d) for d in declared)
    n = len(source)
    shapes = set()
    for i in sorted(set(np.linspace(0, n - 1, min(n, probe)).round().astype(int).tolist())):
        try:
            shapes.add(tuple(source.load_image(i).shape))
        except BadImageError:
            continue
    return shapes.pop() if len(shapes) == 1 else None


def resolve_backend(recipe: Recipe, source: Any, device: torch.device) -> tuple[str, str]:
    """``(backend, why)``: the views back-end a run uses, ``per_sample`` or ``batched``.

    ``views.backend=batched`` refuses (RecipeError, DataError) where it cannot apply: a streamed source,
    a view pipeline without a batched form, images of different sizes. ``auto`` takes the batched path
    where it applies, on CUDA always and on the CPU when :data:`CPU_BACKEND` says so, and the per-sample
    one elsewhere.
    """
    choice = recipe.views.backend
    if choice == "per_sample":
        return "per_sample", "views.backend=per_sample"
    strict = choice == "batched"
    if not isinstance(source, ImageSource):
        if strict:
            raise RecipeError(
                "views.backend=batched needs a map-style data source; a streamed one keeps the per-sample "
                "views (set views.backend=per_sample or auto, or data.streaming=false)"
            )
        return "per_sample", "streamed data"
    missing = unsupported_pipelines(recipe.views)
    if missing:
        if strict:
            BatchedViews(recipe.views)  # raises the RecipeError that names them
        return "per_sample", f"pipeline {', '.join(missing)} has no batched form"
    if not strict and device.type != "cuda" and CPU_BACKEND == "per_sample":
        return "per_sample", "auto on the CPU"
    if source_image_shape(source) is None:
        if strict:
            raise DataError(
                f"views.backend=batched needs images of one size, and {source.spec} holds images of several "
                "sizes; set views.backend=per_sample"
            )
        return "per_sample", "images of several sizes"
    return "batched", "views.backend=batched" if strict else f"auto on {device.type}"
