"""View pipelines on uint8 image tensors.

A recipe's ``views.groups`` is a list of :class:`~clcli.recipe.ViewGroup`; each names a pipeline
from the ``clcli.views`` registry (``simclr`` for the SimCLR-family augmentation, ``center`` for
resize + centre crop) and says how many crops of which size it makes.  Pipelines return uint8
tensors; conversion to float and normalisation happen batched on the training device
(:func:`normalize_batch`), which is cheaper than per image.

The ``simclr`` pipeline follows SimCLR's augmentation (arXiv:2002.05709, appendix A): random
resized crop, horizontal flip, colour jitter applied with probability 0.8 and strength
s·(0.8, 0.8, 0.8, 0.2), random grayscale 0.2, Gaussian blur (kernel 10% of the image) and, for
BYOL's asymmetric views (arXiv:2006.07733), solarisation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import v2

from clcli.recipe import ViewGroup, ViewsConfig
from clcli.registry import VIEWS

Pipeline = Callable[[torch.Tensor], torch.Tensor]


def _odd(n: float) -> int:
    k = max(3, int(round(n)))
    return k if k % 2 == 1 else k + 1


def augment_pipeline(group: ViewGroup) -> Pipeline:
    """The SimCLR-family augmentation for one view group, on uint8 [3, H, W] tensors."""
    ops: list[torch.nn.Module] = [
        v2.RandomResizedCrop(group.size, scale=group.crop_scale, ratio=group.crop_ratio, antialias=True),
    ]
    if group.hflip_p > 0:
        ops.append(v2.RandomHorizontalFlip(p=group.hflip_p))
    if group.jitter_p > 0 and group.jitter_strength > 0:
        b, c, s, h = (x * group.jitter_strength for x in group.jitter)
        ops.append(
            v2.RandomApply([v2.ColorJitter(brightness=b, contrast=c, saturation=s, hue=min(h, 0.5))], p=group.jitter_p)
        )
    if group.grayscale_p > 0:
        ops.append(v2.RandomGrayscale(p=group.grayscale_p))
    if group.blur_p > 0:
        kernel = _odd(group.blur_kernel_fraction * group.size)
        ops.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=group.blur_sigma)], p=group.blur_p))
    if group.solarize_p > 0:
        ops.append(v2.RandomSolarize(threshold=128, p=group.solarize_p))
    return v2.Compose(ops)


def center_pipeline(group: ViewGroup) -> Pipeline:
    """Resize the shorter side to the group's size and take the centre crop (no randomness)."""
    return eval_pipeline(group.size, group.size)


def eval_pipeline(size: int, resize: int | None = None, interpolation: str = "bilinear") -> Pipeline:
    """The evaluation transform: shorter side to ``resize`` (default ``size``), centre crop ``size``.

    ``interpolation``: ``bilinear`` (ours) or ``bicubic`` (what imported CLIP models were trained with).
    """
    modes = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC}
    resize_to = v2.Resize(resize or size, interpolation=modes[interpolation], antialias=True)
    return v2.Compose([resize_to, v2.CenterCrop(size)])


def declared_view_names(groups: Sequence[ViewGroup]) -> list[str]:
    """One group name per view, in the order the views stage produces them (``global`` x2, ``local`` x6, ...).

    The one place that expands view groups into per-view names: :class:`ViewMaker`, the trainer's
    batches (``Batch.view_names``) and the methods that pick views by group name all use it.
    """
    return [g.name for g in groups for _ in range(g.count)]


class ViewMaker:
    """Turns one uint8 image into the recipe's views, in declared order (group by group)."""

    def __init__(self, cfg: ViewsConfig) -> None:
        self.groups = list(cfg.groups)
        self.pipelines: list[Pipeline] = [VIEWS.get(g.pipeline)(g) for g in self.groups]

    @property
    def names(self) -> list[str]:
        return declared_view_names(self.groups)

    @property
    def sizes(self) -> list[int]:
        return [g.size for g in self.groups for _ in range(g.count)]

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        views = []
        for group, pipeline in zip(self.groups, self.pipelines, strict=True):
            for _ in range(group.count):
                views.append(pipeline(image))
        return views


def normalize_batch(
    x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], *, channels_last: bool = False
) -> torch.Tensor:
    """uint8 [..., C, H, W] -> float32, scaled to [0, 1] and normalised per channel (on x's device)."""
    c = x.shape[-3]
    # made on the host and copied without waiting: a blocking copy would wait for the device's queued work
    m = torch.tensor(mean[:c], dtype=torch.float32).view(-1, 1, 1).to(x.device, non_blocking=True)
    s = torch.tensor(std[:c], dtype=torch.float32).view(-1, 1, 1).to(x.device, non_blocking=True)
    out = (x.float() / 255.0 - m) / s
    if channels_last and out.dim() == 4:
        out = out.contiguous(memory_format=torch.channels_last)
    return out
