"""A recipe's views made from a whole batch of images at once, on the batch's device.

:class:`BatchedViews` is the batched twin of :class:`~clcli.views.pipelines.ViewMaker`: from uint8
images ``[B, C, H, W]`` (all one size) and the samples' seeds it makes every view group's views, in
declared order, as uint8 tensors like the per-sample pipelines return. Each view of each sample draws
its parameters from its own :class:`~clcli.views.sample_random.SampleRandom` stream (keyed by the
sample seed and :func:`view_stream` of the group and copy), first the crop and flip
(:mod:`clcli.views.batched_crop`), then, on the same object, the colour operations
(``apply_photometric``) and a pipeline's special output (``apply_special``). A sample's views therefore
depend only on its seed and its image, never on the batch it lands in or on the device.

Pipelines, mirroring :mod:`clcli.views.pipelines`:

* ``simclr``: random resized crop (``crop_scale``, ``crop_ratio``) to ``size``, horizontal flip
  (``hflip_p``), then the group's colour jitter, grayscale, blur and solarisation
  (:func:`~clcli.views.batched_color.apply_photometric`);
* ``cpc``: the same crop and flip, then the augmented patch grid [B, P, 3, p, p]
  (:func:`~clcli.views.batched_special.apply_special`);
* ``center``: shorter side resized to ``size``, centre crop, nothing random.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from clcli.errors import DataError, RecipeError
from clcli.recipe import ViewGroup, ViewsConfig
from clcli.views.batched_color import BATCHED_PIPELINES, apply_photometric
from clcli.views.batched_crop import center_crop_weights, resample, resized_crop, sample_boxes
from clcli.views.batched_special import apply_special
from clcli.views.pipelines import declared_view_names
from clcli.views.sample_random import SampleRandom

__all__ = ["BATCHED_PIPELINES", "BatchedViews", "make_group_view", "unsupported_pipelines", "view_stream"]


def view_stream(group_index: int, copy_index: int) -> int:
    """The SampleRandom stream of copy ``copy_index`` of view group ``group_index``."""
    return group_index * 4096 + copy_index


def unsupported_pipelines(cfg: ViewsConfig) -> list[str]:
    """The recipe's view pipelines that have no batched form (they keep the per-sample path)."""
    return sorted({g.pipeline for g in cfg.groups if g.pipeline not in BATCHED_PIPELINES})


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float in [0, 1] -> uint8, rounded to the nearest level."""
    return (x * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def make_group_view(x: torch.Tensor, group: ViewGroup, rng: SampleRandom) -> torch.Tensor:
    """One view of ``group`` for every sample of float ``x`` [B, C, H, W] in [0, 1]; uint8 output.

    ``rng`` is the view's stream; the crop and flip draw from it first, the colour operations after.
    """
    height, width = x.shape[-2:]
    if group.pipeline == "center":
        rows, cols = center_crop_weights(height, width, group.size, x.device)
        b = x.shape[0]
        return _to_uint8(resample(x, rows.expand(b, -1, -1), cols.expand(b, -1, -1)))
    boxes = sample_boxes(rng, height, width, group.crop_scale, group.crop_ratio)
    flip = rng.uniform(1)[:, 0] < group.hflip_p
    out = resized_crop(x, boxes, group.size, flip).clamp_(0.0, 1.0)
    out = apply_photometric(out, group, rng)
    return _to_uint8(apply_special(out, group, rng))


class BatchedViews:
    """uint8 images [B, C, H, W] (one size) + sample seeds [B] -> the recipe's views, in declared order."""

    def __init__(self, cfg: ViewsConfig) -> None:
        missing = unsupported_pipelines(cfg)
        if missing:
            raise RecipeError(
                f"views.backend=batched: the view pipeline(s) {', '.join(missing)} have no batched form "
                f"(batched: {', '.join(BATCHED_PIPELINES)}); set views.backend to per_sample or auto"
            )
        self.groups = list(cfg.groups)

    @property
    def names(self) -> list[str]:
        return declared_view_names(self.groups)

    @property
    def sizes(self) -> list[int]:
        return [g.size for g in self.groups for _ in range(g.count)]

    def __call__(self, images: torch.Tensor, seeds: Sequence[int] | np.ndarray | torch.Tensor) -> list[torch.Tensor]:
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise DataError(
                f"batched views need uint8 images [B, C, H, W] of one size, got {images.dtype} {tuple(images.shape)}"
            )
        if len(seeds) != images.shape[0]:
            raise DataError(f"batched views got {images.shape[0]} images but {len(seeds)} sample seeds")
        x = images.float().div_(255.0)
        views = []
        for gi, group in enumerate(self.groups):
            for ci in range(group.count):
                views.append(make_group_view(x, group, SampleRandom(seeds, view_stream(gi, ci))))
        return views
