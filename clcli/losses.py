"""Loss functions: pure, tensors in, scalar out, computed in fp32.

Every function casts its inputs to float32 and disables autocast inside, because temperatures as
low as 0.04 amplify bf16 rounding.  Shapes are documented per function; each docstring gives the
paper's equation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F

T = TypeVar("T", bound=Callable[..., torch.Tensor])


def fp32(fn: T) -> T:
    """Run ``fn`` with autocast off and every floating tensor argument cast to float32."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        def cast(x):  # type: ignore[no-untyped-def]
            return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

        args = tuple(cast(a) for a in args)
        kwargs = {k: cast(v) for k, v in kwargs.items()}
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@fp32
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (arXiv:2002.05709, eq. 1).

    ``z1`` and ``z2``: [N, D] projections of two views of the same N images (row i of each is a
    positive pair).  With sim(u, v) = uᵀv / (‖u‖‖v‖) over the 2N views,

        ℓ(i, j) = −log  exp(sim(z_i, z_j)/τ) / Σ_{k≠i} exp(sim(z_i, z_k)/τ)

    and the loss is the mean of ℓ over all 2N ordered positive pairs (each view is an anchor once;
    its 2N − 2 negatives are every other view but itself and its partner).
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(
            f"nt_xent expects two [N, D] tensors of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], dim=0), dim=1)
    logits = z @ z.t() / temperature
    logits.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)
