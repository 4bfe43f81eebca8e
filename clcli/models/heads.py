"""Projection and prediction heads, declared as a list of dimensions.

``MLP([2048, 2048, 128])`` is the SimCLR projector (arXiv:2002.05709): Linear -> BN -> ReLU ->
Linear.  ``MLP([2048, 2048, 2048, 2048], last_norm=True)`` is the SimSiam projector
(arXiv:2011.10566), whose output is batch-normalised too; MoCo v3 (arXiv:2104.02057) and BYOL
(arXiv:2006.07733) heads are written the same way.
"""

from __future__ import annotations

import itertools
from typing import Literal

from torch import nn

__all__ = ["MLP"]

Norm = Literal["bn", "ln", "none"]
Activation = Literal["relu", "gelu"]


def _norm(kind: Norm, dim: int) -> nn.Module | None:
    if kind == "bn":
        return nn.BatchNorm1d(dim)
    if kind == "ln":
        return nn.LayerNorm(dim)
    if kind == "none":
        return None
    raise ValueError(f"norm must be 'bn', 'ln' or 'none', got {kind!r}")


def _activation(kind: Activation) -> nn.Module:
    if kind == "relu":
        return nn.ReLU(inplace=True)
    if kind == "gelu":
        return nn.GELU()
    raise ValueError(f"activation must be 'relu' or 'gelu', got {kind!r}")


class MLP(nn.Sequential):
    """A multi-layer perceptron from ``dims = [in, hidden..., out]``.

    There is one :class:`~torch.nn.Linear` between each pair of consecutive dimensions.  Every
    hidden layer is followed by the normalisation ``norm`` (BatchNorm1d, LayerNorm or none) and
    the ``activation``; a Linear followed by BatchNorm has no bias, since the normalisation would
    cancel it.  The last Linear (bias as ``last_bias``) has no activation and, with
    ``last_norm``, is followed by a plain BatchNorm1d, as in the SimSiam and MoCo v3 projectors
    (arXiv:2011.10566, arXiv:2104.02057).  ``in_dim`` and ``out_dim`` are the first and last
    dimension.
    """

    def __init__(
        self,
        dims: list[int],
        *,
        norm: Norm = "bn",
        last_norm: bool = False,
        last_bias: bool = True,
        activation: Activation = "relu",
    ) -> None:
        if len(dims) < 2:
            raise ValueError(f"an MLP needs at least an input and an output dimension, got {dims}")
        if any(d < 1 for d in dims):
            raise ValueError(f"MLP dimensions must be positive, got {dims}")
        layers: list[nn.Module] = []
        for d_in, d_out in itertools.pairwise(dims[:-1]):
            layers.append(nn.Linear(d_in, d_out, bias=norm != "bn"))
            norm_layer = _norm(norm, d_out)
            if norm_layer is not None:
                layers.append(norm_layer)
            layers.append(_activation(activation))
        layers.append(nn.Linear(dims[-2], dims[-1], bias=last_bias))
        if last_norm:
            layers.append(nn.BatchNorm1d(dims[-1]))
        super().__init__(*layers)
        self.in_dim = dims[0]
        self.out_dim = dims[-1]
        self.dims = list(dims)
