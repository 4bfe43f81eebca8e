"""Photometric augmentation made in batches: the ``simclr`` pipeline's colour ops on [B, 3, H, W] at once.

Every op takes a float batch in [0, 1] on any device and per-sample parameters, so a batch of views
made on the training device follows the per-sample pipeline (:func:`clcli.views.pipelines.augment_pipeline`,
built on torchvision.transforms.v2) sample by sample:

* colour jitter, applied with probability ``jitter_p``: brightness, contrast and saturation factors
  uniform in [max(0, 1 − s), 1 + s] and a hue shift uniform in [−h, h] (``s``, ``h`` the group's
  ``jitter`` x ``jitter_strength``, hue capped at 0.5), the four ops applied in a uniformly random
  order per sample (torchvision's ``ColorJitter``).  Brightness scales, contrast blends with the mean
  of the grayscale image, saturation with the grayscale image, each clamped to [0, 1]; hue shifts H
  in HSV (Smith 1978).  An op whose strength is 0 is skipped, as torchvision skips it;
* random grayscale (``grayscale_p``): ITU-R 601 luma with torchvision's weights (0.2989, 0.587,
  0.114), on all three channels;
* Gaussian blur (``blur_p``): sigma uniform in ``blur_sigma`` per sample, kernel of
  ``blur_kernel_fraction`` of the view size (odd, at least 3), reflected borders, as a separable
  convolution with one kernel per sample;
* solarisation (``solarize_p``, BYOL arXiv:2006.07733): pixels at or above 128/255 become 1 − x.

Each op is also exposed with explicit per-sample parameters (:func:`adjust_brightness`,
:func:`color_jitter`, :func:`gaussian_blur`, ...), which agree with torchvision's functional ops on
float images.  The per-sample pipeline works on uint8 images and truncates to integers after every
op; the batched ops keep floats throughout.

Parameters come from a :class:`~clcli.views.sample_random.SampleRandom` (the view's stream, after
the crop and flip draws), drawn on the CPU in a fixed layout per group and moved to the images'
device in one copy: for each op the group has, in pipeline order, jitter (9 draws: apply, the four
factors, four for the order), grayscale (1: apply), blur (2: apply, sigma), solarise (1: apply).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import TypeVar

import torch
import torch.nn.functional as F

from clcli.recipe import ViewGroup
from clcli.views.pipelines import _odd
from clcli.views.sample_random import SampleRandom

__all__ = [
    "LUMA",
    "SOLARIZE_THRESHOLD",
    "PhotometricParams",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "apply_photometric",
    "blur_kernel_size",
    "color_jitter",
    "gaussian_blur",
    "jitter_ranges",
    "move_params",
    "photometric",
    "random_grayscale",
    "rgb_to_grayscale",
    "sample_photometric",
    "solarize",
    "supports_batched",
]

LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
SOLARIZE_THRESHOLD = 128 / 255  # the pipeline's RandomSolarize(threshold=128) on uint8 images
IDENTITY = (1.0, 1.0, 1.0, 0.0)  # brightness, contrast, saturation factors and hue shift that change nothing
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
BATCHED_PIPELINES = ("simclr", "center", "cpc")  # the registered pipelines the batched ops mirror
P = TypeVar("P")
CPU_CHUNK_PIXELS = 1 << 18  # pixels per chunk of a batch on the CPU (a 512 x 32 px batch: 2 chunks; 224 px: 5 images)


def supports_batched(group: ViewGroup) -> bool:
    """Whether the group's pipeline has a batched version (a plugin's pipeline has none)."""
    return group.pipeline in BATCHED_PIPELINES


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample parameter [B] as [B, 1, 1, 1] in x's dtype and device."""
    return v.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def _select(apply: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y where the per-sample ``apply`` [B] is True, else x: exactly (a lerp with weight 0 or 1, which on
    the CPU is several times faster than ``torch.where``)."""
    return torch.lerp(x, y, _per_sample(apply, x))


def move_params(params: P, device: torch.device | str) -> P:
    """A copy of a frozen dataclass of CPU tensors (``None`` fields kept) on ``device``, moved in one copy.

    The tensors are packed as float32 columns (exact for bools, integers below 2**24 and float32),
    copied once and unpacked in their own dtypes and shapes.
    """
    present = {f.name: getattr(params, f.name) for f in fields(params)}  # type: ignore[arg-type]
    present = {name: v for name, v in present.items() if v is not None}
    if not present:
        return params
    columns = [v.to(torch.float32).reshape(v.shape[0], -1) for v in present.values()]
    packed = torch.cat(columns, dim=1).to(device, non_blocking=True)
    moved, start = {}, 0
    for (name, v), col in zip(present.items(), columns, strict=True):
        part = packed[:, start : start + col.shape[1]].reshape(v.shape)
        start += col.shape[1]
        moved[name] = part > 0.5 if v.dtype == torch.bool else part.to(v.dtype)
    return replace(params, **moved)  # type: ignore[type-var]


# ---------------------------------------------------------------------------------- explicit ops
def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma [B, 1, H, W] of RGB [B, 3, H, W] with torchvision's weights."""
    r, g, b = x.unbind(dim=-3)
    return (r * LUMA[0]).add_(g, alpha=LUMA[1]).add_(b, alpha=LUMA[2]).unsqueeze(-3)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x · f, clamped to [0, 1]; ``factor`` [B]."""
    return (x * _per_sample(factor, x)).clamp_(0.0, 1.0)


def _blend(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * f).add_(other * (1.0 - f)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """f · x + (1 − f) · mean(grayscale(x)) per sample, clamped to [0, 1]."""
    mean = rgb_to_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(x, mean, _per_sample(factor, x))


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """f · x + (1 − f) · grayscale(x), clamped to [0, 1]."""
    return _blend(x, rgb_to_grayscale(x), _per_sample(factor, x))


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Shift the HSV hue of each sample by ``shift`` [B] turns (in [−0.5, 0.5]) and convert back to RGB.

    Hue in sixths of a turn, h = (g − b)/d, (b − r)/d + 2 or (r − g)/d + 4 where the maximum is r, g or
    b (r before g before b on ties; 0 for grays), d = max − min; back to RGB each channel is
    max − d · w(h) with w = clamp(2 − |h − 3|, 0, 1), clamp(|h − 2| − 1, 0, 1), clamp(|h − 4| − 1, 0, 1)
    for r, g, b: the same hexcone mapping as torchvision's, written without branches (selections
    are products with 0/1 masks, as ``torch.where`` is slow on the CPU).
    """
    r, g, b = x.unbind(dim=-3)
    maxc = torch.maximum(torch.maximum(r, g), b)
    d = maxc - torch.minimum(torch.minimum(r, g), b)
    is_r = torch.sign(r - maxc).add_(1.0)  # 1 where r is the maximum, else 0
    is_g = torch.sign(g - maxc).add_(1.0).mul_(1.0 - is_r)
    is_b = 1.0 - is_r - is_g
    num = (g - b).mul_(is_r).add_((b - r).mul_(is_g)).add_((r - g).mul_(is_b))
    h6 = num.div_(d + (1.0 - torch.sign(d))).add_(is_g, alpha=2.0).add_(is_b, alpha=4.0)  # in [-1, 5)
    h6.add_(_per_sample(shift, x).squeeze(-3) * 6.0 + 6.0)  # in [2, 14)
    h6.sub_(torch.floor(h6 / 6.0).mul_(6.0))  # in [0, 6)
    weights = (
        (h6 - 3.0).abs_().neg_().add_(2.0),
        (h6 - 2.0).abs_().sub_(1.0),
        (h6 - 4.0).abs_().sub_(1.0),
    )
    out = torch.stack([maxc - d * w.clamp_(0.0, 1.0) for w in weights], dim=-3)
    return out.clamp_(0.0, 1.0)


def _blend_step(x: torch.Tensor, kind: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """One jitter step in which each sample does brightness, contrast or saturation (``kind`` [B]).

    All three are ``f · x + (1 − f) · m`` with m = 0, the mean of the grayscale image or the
    grayscale image; a factor of 1 leaves the sample unchanged exactly.
    """
    gray = rgb_to_grayscale(x)
    mean = gray.mean(dim=(-3, -2, -1), keepdim=True)
    kind = kind.to(x.device)
    other = gray.mul_(_per_sample(kind == SATURATION, x)).add_(mean * _per_sample(kind == CONTRAST, x))
    return _blend(x, other, _per_sample(factor, x))


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, *, hue: bool = True) -> torch.Tensor:
    """Brightness, contrast, saturation and hue with per-sample ``factors`` [B, 4] in per-sample ``order`` [B, 4].

    ``order[i]`` is a permutation of 0..3 (brightness, contrast, saturation, hue): the ops in the
    order sample i applies them.  ``hue=False`` skips the hue op (torchvision's ``hue=0``).  Each
    sample's three blend ops are split around its hue step: the ones before it run in three slots
    (a factor of 1 where a slot comes after the hue), then the hue shift, then three slots after
    it, so the batch does six cheap blends and one HSV round trip whatever the orders are.
    """
    factors = factors.to(x.device)
    order = order.to(device=x.device, dtype=torch.long)
    hue_pos = (order == HUE).long().argmax(dim=1)  # [B]
    ones = torch.ones_like(factors[:, 0])
    slots = []
    for j in range(3):  # the j-th non-hue op of each sample's order
        kind = order.gather(1, (j + (j >= hue_pos).long()).unsqueeze(1)).squeeze(1)
        slots.append((j, kind, factors.gather(1, kind.unsqueeze(1)).squeeze(1)))
    for j, kind, f in slots:
        x = _blend_step(x, kind, torch.where(j < hue_pos, f, ones))
    if hue:
        x = adjust_hue(x, factors[:, HUE])
    for j, kind, f in slots:
        x = _blend_step(x, kind, torch.where(j >= hue_pos, f, ones))
    return x


def random_grayscale(x: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """Grayscale on all three channels where ``apply`` [B] is True."""
    return _select(apply, x, rgb_to_grayscale(x).expand_as(x))


def gaussian_kernels(kernel_size: int, sigma: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One normalised 1-D Gaussian per sample, [B, kernel_size], taps at the integers −k//2 … k//2."""
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))  # taps / √2, so that exp(−(t/σ)²) = exp(−i²/(2σ²))
    taps = torch.linspace(-lim, lim, steps=kernel_size, dtype=dtype, device=sigma.device)
    return torch.softmax(-((taps / sigma.to(dtype).view(-1, 1)) ** 2), dim=1)


def _conv_rows(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Convolve along the last axis of x [B, C, H, W] with per-sample kernels [B, k], reflected borders."""
    b, c, h, w = x.shape
    k = kernels.shape[1]
    padded = F.pad(x.reshape(1, b * c, h, w), (k // 2, k // 2, 0, 0), mode="reflect")
    weight = kernels.repeat_interleave(c, dim=0).view(b * c, 1, 1, k)
    return F.conv2d(padded, weight, groups=b * c).view(b, c, h, w)


def gaussian_blur(
    x: torch.Tensor, kernel_size: int, sigma: torch.Tensor, apply: torch.Tensor | None = None
) -> torch.Tensor:
    """Gaussian blur with per-sample ``sigma`` [B] (same in x and y), odd ``kernel_size``, reflected borders.

    Separable: rows, then columns.  Rows where ``apply`` [B] is False are returned unchanged.
    """
    if kernel_size % 2 != 1:
        raise ValueError(f"the blur kernel size must be odd, got {kernel_size}")
    kernels = gaussian_kernels(kernel_size, sigma.to(x.device), x.dtype)
    out = _conv_rows(x, kernels)
    out = _conv_rows(out.transpose(-1, -2), kernels).transpose(-1, -2)
    if apply is None:
        return out
    return _select(apply, x, out)


def solarize(x: torch.Tensor, apply: torch.Tensor | None = None, threshold: float = SOLARIZE_THRESHOLD) -> torch.Tensor:
    """Pixels at or above ``threshold`` become 1 − x, in the samples where ``apply`` [B] is True (all if None)."""
    hit = torch.sign(x - threshold).add_(1.0).clamp_(max=1.0)  # 1 where x >= threshold, else 0
    if apply is not None:
        hit.mul_(_per_sample(apply, x))
    return torch.lerp(x, 1.0 - x, hit)


# ------------------------------------------------------------------------ the group's parameters
def jitter_ranges(group: ViewGroup) -> list[tuple[float, float] | None]:
    """The ranges ColorJitter draws brightness, contrast, saturation factors and the hue shift from.

    ``None`` for an op the pipeline's ColorJitter skips (strength 0); all ``None`` when the group
    has no colour jitter (``jitter_p`` or ``jitter_strength`` 0).
    """
    if not (group.jitter_p > 0 and group.jitter_strength > 0):
        return [None] * 4
    b, c, s, h = (v * group.jitter_strength for v in group.jitter)
    ranges: list[tuple[float, float] | None] = [(max(0.0, 1.0 - v), 1.0 + v) if v > 0 else None for v in (b, c, s)]
    h = min(h, 0.5)
    ranges.append((-h, h) if h > 0 else None)
    return ranges


def blur_kernel_size(group: ViewGroup) -> int:
    """The per-sample pipeline's blur kernel: ``blur_kernel_fraction`` of the view size, odd, at least 3."""
    return _odd(group.blur_kernel_fraction * group.size)


@dataclass(frozen=True)
class PhotometricParams:
    """Per-sample parameters of a ``simclr`` group's photometric ops; ``None`` for an op the group lacks.

    ``jitter_apply`` bool [B]; ``factors`` float [B, 4] (brightness, contrast, saturation factors,
    hue shift; identity values for ops ColorJitter skips); ``order`` long [B, 4] (a permutation of
    0..3 per sample); ``grayscale``, ``blur``, ``solarize`` bool [B]; ``sigma`` float [B].
    """

    jitter_apply: torch.Tensor | None = None
    factors: torch.Tensor | None = None
    order: torch.Tensor | None = None
    grayscale: torch.Tensor | None = None
    blur: torch.Tensor | None = None
    sigma: torch.Tensor | None = None
    solarize: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> PhotometricParams:
        """The same parameters on ``device``, moved in one copy."""
        return move_params(self, device)

    def rows(self, start: int, stop: int) -> PhotometricParams:
        """The parameters of samples ``start:stop``."""
        return replace(
            self,
            **{f.name: getattr(self, f.name)[start:stop] for f in fields(self) if getattr(self, f.name) is not None},
        )


def sample_photometric(group: ViewGroup, rng: SampleRandom) -> PhotometricParams:
    """Draw a ``simclr`` group's photometric parameters (on the CPU) in the layout of the module doc."""
    params: dict[str, torch.Tensor] = {}
    ranges = jitter_ranges(group)
    if any(r is not None for r in ranges):
        u = rng.uniform(9)
        params["jitter_apply"] = u[:, 0] < group.jitter_p
        factors = torch.empty(len(rng), 4, dtype=torch.float64)
        for i, r in enumerate(ranges):
            factors[:, i] = IDENTITY[i] if r is None else r[0] + (r[1] - r[0]) * u[:, 1 + i]
        params["factors"] = factors.float()
        params["order"] = torch.argsort(u[:, 5:9], dim=1)
    if group.grayscale_p > 0:
        params["grayscale"] = rng.uniform(1)[:, 0] < group.grayscale_p
    if group.blur_p > 0:
        u = rng.uniform(2)
        params["blur"] = u[:, 0] < group.blur_p
        lo, hi = group.blur_sigma
        params["sigma"] = (lo + (hi - lo) * u[:, 1]).float()
    if group.solarize_p > 0:
        params["solarize"] = rng.uniform(1)[:, 0] < group.solarize_p
    return PhotometricParams(**params)


def photometric(x: torch.Tensor, group: ViewGroup, params: PhotometricParams) -> torch.Tensor:
    """Apply a ``simclr`` group's photometric ops with explicit parameters, in the pipeline's order.

    On the CPU a large batch goes in chunks of about :data:`CPU_CHUNK_PIXELS` pixels, whose
    intermediate tensors stay in the processor's cache (each sample's result is the same).
    """
    b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    chunk = max(1, CPU_CHUNK_PIXELS // (h * w))
    if x.device.type == "cpu" and b > chunk:
        parts = [_photometric(x[i : i + chunk], group, params.rows(i, i + chunk)) for i in range(0, b, chunk)]
        return torch.cat(parts)
    return _photometric(x, group, params)


def _photometric(x: torch.Tensor, group: ViewGroup, params: PhotometricParams) -> torch.Tensor:
    if params.factors is not None and params.order is not None and params.jitter_apply is not None:
        hue = jitter_ranges(group)[HUE] is not None
        jittered = color_jitter(x, params.factors, params.order, hue=hue)
        x = _select(params.jitter_apply, x, jittered)
    if params.grayscale is not None:
        x = random_grayscale(x, params.grayscale)
    if params.blur is not None and params.sigma is not None:
        x = gaussian_blur(x, blur_kernel_size(group), params.sigma, params.blur)
    if params.solarize is not None:
        x = solarize(x, params.solarize)
    return x


def apply_photometric(x: torch.Tensor, group: ViewGroup, rng: SampleRandom) -> torch.Tensor:
    """Everything the group's pipeline does after crop and flip, on a float batch [B, 3, H, W] in [0, 1].

    ``simclr``: jitter, grayscale, blur, solarise as configured; ``center`` and ``cpc``: nothing (CPC's
    colour ops act on patches, in :func:`apply_special`).  Draws from ``rng`` (the view's stream,
    after the crop and flip draws) and returns a new tensor on x's device.
    """
    if not supports_batched(group):
        raise ValueError(f"no batched version of the view pipeline {group.pipeline!r}")
    if group.pipeline != "simclr":
        return x
    if len(rng) != x.shape[0]:
        raise ValueError(f"{len(rng)} sample seeds for a batch of {x.shape[0]} images")
    return photometric(x, group, sample_photometric(group, rng).to(x.device))
