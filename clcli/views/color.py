"""sRGB -> CIE L*a*b* in torch, as CMC's views need it (Tian et al. 2019, arXiv:1906.05849).

The conversion is the standard one (IEC 61966-2-1 sRGB, CIE 1976 L*a*b*, D65 white, 2° observer):

1. undo the sRGB transfer curve: c_lin = c / 12.92 if c ≤ 0.04045, else ((c + 0.055) / 1.055)^2.4;
2. linear RGB -> XYZ with the sRGB primaries' matrix (rows X, Y, Z)::

       0.4124564  0.3575761  0.1804375
       0.2126729  0.7151522  0.0721750
       0.0193339  0.1191920  0.9503041

3. divide by the D65 white (Xn, Yn, Zn) = (0.95047, 1.0, 1.08883), the matrix's row sums, so that
   sRGB white maps to L* = 100, a* = b* = 0 exactly;
4. f(t) = t^(1/3) if t > ε = (6/29)³ = 216/24389, else t / (3 (6/29)²) + 4/29, and
   L* = 116 f(Y/Yn) − 16,  a* = 500 (f(X/Xn) − f(Y/Yn)),  b* = 200 (f(Y/Yn) − f(Z/Zn)).

Over the sRGB gamut L* spans [0, 100], a* [−86.18, 98.23] and b* [−107.86, 94.48] (reached by
green, magenta, blue and yellow); :data:`LAB_MEAN` and :data:`LAB_STD` map each channel's range to
[−1, 1], the normalisation of CMC's released code.  Everything is computed in float32 (or the
input's wider dtype), never under autocast: the cube root and the 2.4 power lose too much in bf16.
"""

from __future__ import annotations

import torch

__all__ = ["LAB_MEAN", "LAB_STD", "normalize_lab", "rgb_to_lab"]

SRGB_TO_XYZ = (
    (0.4124564, 0.3575761, 0.1804375),
    (0.2126729, 0.7151522, 0.0721750),
    (0.0193339, 0.1191920, 0.9503041),
)
D65_WHITE = (0.95047, 1.0, 1.08883)
_EPSILON = 216.0 / 24389.0  # (6/29)^3
_SLOPE = 24389.0 / 27.0 / 116.0  # 1 / (3 (6/29)^2)

# Channel ranges over the sRGB gamut, L in [0, 100], a in [-86.183, 98.234], b in [-107.860, 94.478]:
LAB_RANGE = ((0.0, 100.0), (-86.183, 98.234), (-107.860, 94.478))
LAB_MEAN = tuple((lo + hi) / 2 for lo, hi in LAB_RANGE)
LAB_STD = tuple((hi - lo) / 2 for lo, hi in LAB_RANGE)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], [..., 3, H, W] -> L*a*b* [..., 3, H, W] (L in [0, 100]); see the module doc."""
    if rgb.dim() < 3 or rgb.shape[-3] != 3:
        raise ValueError(f"rgb_to_lab expects [..., 3, H, W] sRGB in [0, 1], got shape {tuple(rgb.shape)}")
    dtype = torch.promote_types(rgb.dtype, torch.float32) if rgb.is_floating_point() else torch.float32
    with torch.autocast(device_type=rgb.device.type, enabled=False):
        c = rgb.to(dtype).clamp(0.0, 1.0)
        linear = torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
        m = torch.tensor(SRGB_TO_XYZ, dtype=dtype, device=rgb.device)
        xyz = torch.einsum("ij,...jhw->...ihw", m, linear)
        white = torch.tensor(D65_WHITE, dtype=dtype, device=rgb.device).view(3, 1, 1)
        t = xyz / white
        f = torch.where(t > _EPSILON, t.clamp_min(_EPSILON) ** (1.0 / 3.0), t * _SLOPE + 4.0 / 29.0)
        fx, fy, fz = f.unbind(dim=-3)
        lab = torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=-3)
    return lab


def normalize_lab(lab: torch.Tensor) -> torch.Tensor:
    """Map each Lab channel's sRGB-gamut range to [−1, 1] (CMC's normalisation)."""
    mean = torch.tensor(LAB_MEAN, dtype=lab.dtype, device=lab.device).view(3, 1, 1)
    std = torch.tensor(LAB_STD, dtype=lab.dtype, device=lab.device).view(3, 1, 1)
    return (lab - mean) / std
