"""CPC's patch-grid views (van den Oord et al. 2018, arXiv:1807.03748 §3.3; Hénaff et al. 2019, arXiv:1905.09272).

Contrastive predictive coding reads an image as a grid of overlapping patches: CPC v1 takes a
256 px image and cuts 64 px patches every 32 px, a 7 x 7 grid in which each patch overlaps half of
each neighbour; the CIFAR scaling is a 32 px image, 8 px patches every 4 px, again 7 x 7.  The
grid has ``(size − patch) // stride + 1`` rows and as many columns (row-major order: patch
``r * columns + c`` has its top-left corner at ``(r * stride, c * stride)``).

The ``cpc`` view pipeline turns one uint8 image [3, H, W] into its grid, a uint8 tensor
[P, 3, p, p] (batched: [B, P, 3, p, p]).  Before cutting, the whole image is randomly cropped
(``crop_scale``, ``crop_ratio``) to ``size`` and flipped (``hflip_p``).  CPC v2's patch-wise
augmentation follows, each patch drawing its own randomness:

* spatial jitter: each patch's corner moves by up to ``patch_jitter`` pixels in each direction
  (kept inside the image);
* colour jitter with probability ``jitter_p``: brightness, contrast, saturation and hue factors
  drawn as in torchvision's ``ColorJitter`` with strengths ``jitter`` x ``jitter_strength``, applied
  in that fixed order (torchvision shuffles the order per call);
* grayscale with probability ``grayscale_p``;
* colour dropping with probability ``patch_color_drop_p``: two of the three channels are replaced
  by mid-grey plus low-amplitude Gaussian noise (1/100 of the kept channel's standard deviation),
  as in Doersch et al. 2015 (arXiv:1505.05192), whom CPC v2 follows.

:func:`patch_grid` cuts the same grid, without augmentation, from float batches: CPC's evaluation
features use it on whole images.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from clcli.recipe import ViewGroup

__all__ = ["CPCPatches", "cpc_pipeline", "grid_positions", "grid_size", "patch_grid"]

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as torchvision's rgb_to_grayscale


def grid_size(image_size: int, patch_size: int, stride: int) -> int:
    """Patches along one side: ``(image_size − patch_size) // stride + 1``."""
    if patch_size < 1 or stride < 1:
        raise ValueError(f"patch size and stride must be positive, got {patch_size} and {stride}")
    if patch_size > image_size:
        raise ValueError(f"a {patch_size} px patch does not fit in a {image_size} px image")
    return (image_size - patch_size) // stride + 1


def grid_positions(image_size: int, patch_size: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners ``(top, left)`` of the grid's patches, row by row."""
    n = grid_size(image_size, patch_size, stride)
    return [(r * stride, c * stride) for r in range(n) for c in range(n)]


def patch_grid(x: torch.Tensor, patch_size: int, stride: int) -> torch.Tensor:
    """Cut ``x`` [..., C, H, W] into its grid: [..., R * Cols, C, p, p], patches in row-major order."""
    if x.dim() < 3:
        raise ValueError(f"patch_grid expects [..., C, H, W], got shape {tuple(x.shape)}")
    grid_size(x.shape[-2], patch_size, stride)
    grid_size(x.shape[-1], patch_size, stride)
    patches = x.unfold(-2, patch_size, stride).unfold(-2, patch_size, stride)  # [..., C, R, Cols, p, p]
    c = x.dim() - 3
    patches = patches.movedim(c, -3)  # [..., R, Cols, C, p, p]
    return patches.flatten(c, c + 1)


# ------------------------------------------------------------------------ colour, per patch
def _gray(x: torch.Tensor) -> torch.Tensor:
    """Luma of float RGB [P, 3, h, w] -> [P, 1, h, w]."""
    r, g, b = x.unbind(dim=-3)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(-3)


def grayscale_patches(x: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """Luma on all three channels of the patches [P, 3, h, w] where ``apply`` [P] is True."""
    return torch.lerp(x, _gray(x).expand_as(x), apply.view(-1, 1, 1, 1).to(x.dtype))  # weights 0/1: exact


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=-3)
    maxc = x.amax(dim=-3)
    minc = x.amin(dim=-3)
    chroma = maxc - minc
    s = chroma / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    div = torch.where(chroma == 0, torch.ones_like(chroma), chroma)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(chroma == 0, torch.zeros_like(h), h)
    h = torch.remainder(h / 6.0, 1.0)
    return torch.stack([h, s, maxc], dim=-3)


# Which of (v, p, q, t) each of r, g, b takes in the six sectors of the hue circle (Smith 1978).
_SECTOR_TABLE = ((0, 2, 1, 1, 3, 0), (3, 0, 0, 2, 1, 1), (1, 1, 3, 0, 0, 2))


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(dim=-3)
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    values = torch.stack([v, p, q, t])  # [4, ..., h, w]
    table = torch.tensor(_SECTOR_TABLE, device=x.device)
    return values.gather(0, table[:, i]).movedim(0, -3)  # [..., 3, h, w]


def _factors(n: int, strength: float, centre: float, low: float | None = None) -> torch.Tensor:
    lo = max(low if low is not None else 0.0, centre - strength)
    return torch.empty(n).uniform_(lo, centre + strength)


def jitter_patches(
    x: torch.Tensor,
    apply: torch.Tensor,
    brightness: torch.Tensor | None,
    contrast: torch.Tensor | None,
    saturation: torch.Tensor | None,
    hue: torch.Tensor | None,
) -> torch.Tensor:
    """ColorJitter per patch with explicit factors [P] (``None``: op skipped), in the fixed order
    brightness, contrast, saturation, hue, on float [P, 3, h, w] in [0, 1]; rows where ``apply`` is
    False are unchanged."""
    n = x.shape[0]
    view = (n, 1, 1, 1)
    chosen = apply.view(view).to(x.dtype)  # 0/1: a lerp with these weights selects exactly
    out = x
    if brightness is not None:
        f = brightness.to(x).view(view)
        out = torch.lerp(out, (out * f).clamp(0, 1), chosen)
    if contrast is not None:
        f = contrast.to(x).view(view)
        mean = _gray(out).mean(dim=(-3, -2, -1), keepdim=True)
        out = torch.lerp(out, (f * out + (1 - f) * mean).clamp(0, 1), chosen)
    if saturation is not None:
        f = saturation.to(x).view(view)
        out = torch.lerp(out, (f * out + (1 - f) * _gray(out)).clamp(0, 1), chosen)
    if hue is not None:
        shift = hue.to(x).view(n, 1, 1)
        hsv = _rgb_to_hsv(out)
        hsv = torch.stack([torch.remainder(hsv[:, 0] + shift, 1.0), hsv[:, 1], hsv[:, 2]], dim=1)
        out = torch.lerp(out, _hsv_to_rgb(hsv).clamp(0, 1), chosen)
    return out


def colour_jitter_patches(
    x: torch.Tensor, apply: torch.Tensor, brightness: float, contrast: float, saturation: float, hue: float
) -> torch.Tensor:
    """ColorJitter per patch on float [P, 3, h, w] in [0, 1]; rows where ``apply`` is False are unchanged."""
    n = x.shape[0]
    factors = [_factors(n, s, 1.0) if s > 0 else None for s in (brightness, contrast, saturation)]
    shift = torch.empty(n).uniform_(-hue, hue) if hue > 0 else None
    return jitter_patches(x, apply, *factors, shift)


def colour_drop(x: torch.Tensor, apply: torch.Tensor, kept: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """In the patches where ``apply`` [P] is True keep channel ``kept`` [P]; the other two become
    0.5 + ``noise`` (standard normal, like x) x the kept channel's standard deviation / 100."""
    n = x.shape[0]
    channel = torch.arange(3, device=x.device).view(1, 3)
    dropped = (channel != kept.view(n, 1)) & apply.view(n, 1)  # [P, 3]
    kept_std = x[torch.arange(n, device=x.device), kept].flatten(1).std(dim=1).view(n, 1, 1, 1)
    filler = 0.5 + noise * kept_std / 100.0
    return torch.where(dropped.view(n, 3, 1, 1), filler.clamp(0, 1), x)


def _colour_drop(x: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """Keep one random channel of the chosen patches; the other two become grey plus faint noise."""
    kept = torch.randint(0, 3, (x.shape[0],))
    return colour_drop(x, apply, kept, torch.randn_like(x))


class CPCPatches:
    """The ``cpc`` view pipeline: uint8 [3, H, W] -> uint8 patch grid [P, 3, p, p] (see the module doc)."""

    def __init__(self, group: ViewGroup) -> None:
        self.size = group.size
        self.patch = group.patch_size
        self.stride = group.patch_stride
        self.rows = grid_size(group.size, group.patch_size, group.patch_stride)
        ops: list[torch.nn.Module] = [
            v2.RandomResizedCrop(group.size, scale=group.crop_scale, ratio=group.crop_ratio, antialias=True)
        ]
        if group.hflip_p > 0:
            ops.append(v2.RandomHorizontalFlip(p=group.hflip_p))
        self.crop = v2.Compose(ops)
        self.jitter = group.patch_jitter
        self.jitter_p = group.jitter_p if group.jitter_strength > 0 else 0.0
        b, c, s, h = (v * group.jitter_strength for v in group.jitter)
        self.strengths = (b, c, s, min(h, 0.5))
        self.grayscale_p = group.grayscale_p
        self.drop_p = group.patch_color_drop_p
        base = torch.tensor(grid_positions(group.size, group.patch_size, group.patch_stride))
        self.tops, self.lefts = base[:, 0], base[:, 1]

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        img = self.crop(image)  # uint8 [3, size, size]
        p, n = self.patch, self.tops.shape[0]
        tops, lefts = self.tops, self.lefts
        if self.jitter > 0:
            hi = self.size - p
            tops = (tops + torch.randint(-self.jitter, self.jitter + 1, (n,))).clamp(0, hi)
            lefts = (lefts + torch.randint(-self.jitter, self.jitter + 1, (n,))).clamp(0, hi)
        offs = torch.arange(p)
        rows = (tops.view(n, 1) + offs).view(n, p, 1)
        cols = (lefts.view(n, 1) + offs).view(n, 1, p)
        patches = img[:, rows, cols].transpose(0, 1).contiguous()  # [P, 3, p, p]
        if self.jitter_p == 0 and self.grayscale_p == 0 and self.drop_p == 0:
            return patches
        x = patches.float() / 255.0
        if self.jitter_p > 0:
            x = colour_jitter_patches(x, torch.rand(n) < self.jitter_p, *self.strengths)
        if self.grayscale_p > 0:
            x = grayscale_patches(x, torch.rand(n) < self.grayscale_p)
        if self.drop_p > 0:
            x = _colour_drop(x, torch.rand(n) < self.drop_p)
        return (x * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def cpc_pipeline(group: ViewGroup) -> CPCPatches:
    """The registered ``cpc`` pipeline factory."""
    return CPCPatches(group)
