"""ResNets of any width, depth and normalisation: CPC's patch encoder and CMC's per-view encoders.

:class:`ResNetEncoder` is a ResNet (He et al. 2015, arXiv:1512.03385) built from torchvision's own
``BasicBlock`` / ``Bottleneck`` blocks, with what the plain torchvision model fixes made free:

* ``width``: channels of the first stage (torchvision: 64); stage s has ``width * 2**s``.  CMC
  (arXiv:1906.05849) gives each view a half-width encoder, ``width = 32`` for a ResNet-18.
* ``layers``: blocks per stage, any number of stages.  CPC (arXiv:1807.03748) encodes a patch with
  the first three stacks of a ResNet and mean-pools their output.
* ``norm``: BatchNorm (``bn``), layer norm (``ln``) or none.  CPC v2 (arXiv:1905.09272) replaces
  batch norm by layer norm because batch statistics shared by the patches of one image let the
  contrastive task be solved through them.  Layer norm over a [C, H, W] feature map, with a
  per-channel scale and shift, is ``GroupNorm(1, C)``.
* ``in_channels`` and the stem: ``cifar`` (3x3 stride-1 convolution, no max-pool, for 32 px
  images and 8 px patches) or ``imagenet`` (7x7 stride-2 convolution and a 3x3 stride-2 max-pool).

``forward`` maps [B, C, H, W] to the globally average-pooled features [B, feature_dim].
Initialisation is torchvision's (Kaiming-normal convolutions, fan-out; unit-scale norms), or with
``init="pytorch"`` each convolution's PyTorch default, as :func:`clcli.models.backbones.resnet`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from clcli.errors import RecipeError

__all__ = ["DEPTHS", "ResNetEncoder", "norm_layer", "resnet_encoder"]

NormKind = Literal["bn", "ln", "none"]
BlockKind = Literal["basic", "bottleneck"]

# depth -> (block, blocks per stage) of the standard ResNets
DEPTHS: dict[int, tuple[BlockKind, list[int]]] = {
    18: ("basic", [2, 2, 2, 2]),
    34: ("basic", [3, 4, 6, 3]),
    50: ("bottleneck", [3, 4, 6, 3]),
    101: ("bottleneck", [3, 4, 23, 3]),
    152: ("bottleneck", [3, 8, 36, 3]),
}


def norm_layer(kind: NormKind) -> Callable[[int], nn.Module]:
    """A factory ``channels -> module`` for the normalisation ``kind``."""
    if kind == "bn":
        return nn.BatchNorm2d
    if kind == "ln":
        return lambda channels: nn.GroupNorm(1, channels)
    if kind == "none":
        return lambda channels: nn.Identity()
    raise RecipeError(f"norm must be one of bn, ln, none; got {kind!r}")


class ResNetEncoder(nn.Module):
    """A ResNet with free width, stages, normalisation, stem and input channels (see the module doc)."""

    def __init__(
        self,
        layers: Sequence[int],
        *,
        block: BlockKind = "basic",
        width: int = 64,
        in_channels: int = 3,
        stem: Literal["cifar", "imagenet"] = "cifar",
        norm: NormKind = "bn",
        init: Literal["torchvision", "pytorch"] = "torchvision",
    ) -> None:
        super().__init__()
        if init not in ("torchvision", "pytorch"):
            raise RecipeError(f"resnet init must be 'torchvision' or 'pytorch', got {init!r}")
        if not layers or any(n < 1 for n in layers):
            raise RecipeError(f"a ResNet needs at least one stage of at least one block, got {list(layers)}")
        if width < 1 or in_channels < 1:
            raise RecipeError(f"ResNet width and input channels must be positive, got {width} and {in_channels}")
        block_cls: type[BasicBlock] | type[Bottleneck]
        if block == "basic":
            block_cls = BasicBlock
        elif block == "bottleneck":
            block_cls = Bottleneck
        else:
            raise RecipeError(f"block must be 'basic' or 'bottleneck', got {block!r}")
        make_norm = norm_layer(norm)
        self.norm_kind = norm
        if stem == "cifar":
            stem_layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)]
            stem_layers += [make_norm(width), nn.ReLU(inplace=True)]
        elif stem == "imagenet":
            stem_layers = [nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)]
            stem_layers += [make_norm(width), nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1)]
        else:
            raise RecipeError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        self.stem = nn.Sequential(*stem_layers)
        stages: list[nn.Module] = []
        inplanes = width
        for s, count in enumerate(layers):
            planes = width * 2**s
            stride = 1 if s == 0 else 2
            blocks: list[nn.Module] = []
            for b in range(count):
                downsample = None
                out = planes * block_cls.expansion
                if b == 0 and (stride != 1 or inplanes != out):
                    downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), make_norm(out))
                blocks.append(
                    block_cls(inplanes, planes, stride if b == 0 else 1, downsample, norm_layer=make_norm)  # type: ignore[arg-type]
                )
                inplanes = out
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.feature_dim = inplanes
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and init == "torchvision":  # pytorch: as the layer built it
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features [B, feature_dim] of ``x`` [B, C, H, W]."""
        return self.stages(self.stem(x)).mean(dim=(2, 3))


def resnet_encoder(
    depth: int,
    *,
    stages: int = 4,
    width: int = 64,
    in_channels: int = 3,
    cifar_stem: bool = True,
    norm: NormKind = "bn",
    init: Literal["torchvision", "pytorch"] = "torchvision",
) -> ResNetEncoder:
    """The first ``stages`` stacks of a standard ResNet-``depth`` (18, 34, 50, 101, 152) at ``width``."""
    if depth not in DEPTHS:
        raise RecipeError(f"resnet depth must be one of {sorted(DEPTHS)}, got {depth}")
    if not 1 <= stages <= 4:
        raise RecipeError(f"a ResNet has 1 to 4 stacks, got {stages}")
    block, layers = DEPTHS[depth]
    return ResNetEncoder(
        layers[:stages],
        block=block,
        width=width,
        in_channels=in_channels,
        stem="cifar" if cifar_stem else "imagenet",
        norm=norm,
        init=init,
    )
