"""Crops, resizes and flips of a whole batch at once, each sample with its own box.

The random resized crop of Inception/SimCLR (Szegedy et al. 2015, arXiv:1409.4842; Chen et al. 2020,
arXiv:2002.05709) as torchvision's ``RandomResizedCrop`` samples it: per sample, up to ten tries of an
area fraction drawn uniformly from ``scale`` and a log aspect ratio drawn uniformly from
``log(ratio)``; the first box that fits the image is taken at a uniformly drawn position, and when
none fits, the largest centred box whose aspect ratio lies in ``ratio``. The numbers come from a
:class:`~clcli.views.sample_random.SampleRandom` (a fixed count per view: ``2 * tries`` for the tries,
two for the position, one for the flip), so a sample's box never depends on the rest of the batch.

Resizing a box to ``size`` pixels is separable: with one weight matrix per sample for the rows
(``[B, size, H]``) and one for the columns (``[B, size, W]``), the crop, the resize and the
horizontal flip (the column matrix reversed) are two batched matrix products. The weights are those
of antialiased bilinear interpolation (a triangle filter stretched by the downscale factor, clipped to
the box and renormalised, half-pixel centres), the rule PyTorch's ``interpolate(..., antialias=True)``
and Pillow use, so a given box resizes as ``torchvision.transforms.v2.functional.resized_crop`` does.
"""

from __future__ import annotations

import math

import torch

from clcli.views.sample_random import SampleRandom

__all__ = [
    "CROP_TRIES",
    "Boxes",
    "center_crop_weights",
    "crop_draws",
    "resample",
    "resize_weights",
    "resized_crop",
    "sample_boxes",
]

CROP_TRIES = 10
# Numbers one random resized crop and flip draw from a view's SampleRandom.
crop_draws = 2 * CROP_TRIES + 2 + 1

Boxes = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # top, left, height, width: int64 [B]


def sample_boxes(
    rng: SampleRandom,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    tries: int = CROP_TRIES,
) -> Boxes:
    """Per-sample crop boxes ``(top, left, h, w)`` drawn as ``RandomResizedCrop.get_params`` draws them.

    Draws ``2 * tries + 2`` numbers per sample from ``rng``, whatever the outcome.
    """
    u = rng.uniform(2 * tries)
    area = float(height * width)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[:, :tries])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * u[:, tries:])
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first try that fits (0 when none does)
    h = h.gather(1, first).squeeze(1)
    w = w.gather(1, first).squeeze(1)
    pos = rng.uniform(2)
    top = torch.floor(pos[:, 0] * (height - h + 1))
    left = torch.floor(pos[:, 1] * (width - w + 1))
    found = fits.any(dim=1)
    if not bool(found.all()):
        fh, fw = _fallback_box(height, width, ratio)
        h = torch.where(found, h, torch.tensor(float(fh), dtype=h.dtype))
        w = torch.where(found, w, torch.tensor(float(fw), dtype=w.dtype))
        top = torch.where(found, top, torch.tensor(float((height - fh) // 2), dtype=top.dtype))
        left = torch.where(found, left, torch.tensor(float((width - fw) // 2), dtype=left.dtype))
    return top.long(), left.long(), h.long(), w.long()


def _fallback_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """The centre box after ten failed tries: the whole image, narrowed to the nearest allowed ratio."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return h, w


def resize_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """Antialiased bilinear weights, float32 ``[B, out_size, in_size]``, on ``start``'s device.

    Row ``i`` of sample ``b`` holds the weights of output pixel ``i`` over the input pixels, taking
    input pixels ``start[b] .. start[b] + length[b] - 1`` to ``out_size`` pixels: with the scale
    ``s = length / out_size`` and the support ``max(s, 1)``, input pixel ``j`` gets
    ``max(0, 1 - |j - start + 0.5 - s (i + 0.5)| / max(s, 1))`` inside the box and 0 outside, and
    each row is normalised to sum to one.
    """
    start = start.to(torch.float64)
    length = length.to(torch.float64)
    device = start.device
    scale = (length / out_size).view(-1, 1, 1)
    support = scale.clamp(min=1.0)
    i = torch.arange(out_size, dtype=torch.float64, device=device).view(1, -1, 1)
    j = torch.arange(in_size, dtype=torch.float64, device=device).view(1, 1, -1)
    rel = j - start.view(-1, 1, 1)
    w = (1.0 - ((rel + 0.5 - scale * (i + 0.5)) / support).abs()).clamp(min=0.0)
    w = w * ((rel >= 0) & (rel < length.view(-1, 1, 1)))
    return (w / w.sum(dim=-1, keepdim=True)).to(torch.float32)


def resample(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``rows @ x @ cols^T`` per sample: float ``x`` [B, C, H, W], ``rows`` [B, h, H], ``cols`` [B, w, W]
    -> [B, C, h, w]."""
    y = torch.matmul(rows.unsqueeze(1), x)  # [B, C, h, W]
    return torch.matmul(y, cols.transpose(1, 2).unsqueeze(1))


def resized_crop(x: torch.Tensor, boxes: Boxes, size: int, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Crop each sample of float ``x`` [B, C, H, W] to its box, resize to ``size`` x ``size`` and flip the
    samples where ``flip`` (bool [B]) is True horizontally; float32 [B, C, size, size]."""
    top, left, h, w = (t.to(x.device) for t in boxes)
    rows = resize_weights(top, h, x.shape[-2], size)
    cols = resize_weights(left, w, x.shape[-1], size)
    if flip is not None:
        cols = torch.where(flip.to(x.device).view(-1, 1, 1), cols.flip(1), cols)
    return resample(x.float(), rows, cols)


def center_crop_weights(height: int, width: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column weights ``[size, H]``, ``[size, W]`` of the ``center`` pipeline: shorter side resized to
    ``size`` (the longer one in proportion, truncated), then the centre ``size`` x ``size`` crop."""
    if height <= width:
        new_h, new_w = size, int(size * width / height)
    else:
        new_h, new_w = int(size * height / width), size
    zero = torch.zeros(1, device=device)
    rows = resize_weights(zero, torch.full((1,), float(height), device=device), height, new_h)[0]
    cols = resize_weights(zero, torch.full((1,), float(width), device=device), width, new_w)[0]
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return rows[top : top + size], cols[left : left + size]
