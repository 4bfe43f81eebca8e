"""A plug-in for clcli: the alignment + uniformity objective (Wang & Isola 2020, arXiv:2005.10242)
and a very small backbone, added through the ``clcli.methods`` and ``clcli.backbones`` entry points."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from clcli.methods.base import Batch, BuildContext, Method, StepOutput
from clcli.recipe import BackboneConfig, MethodConfig


class TinyNet(nn.Module):
    def __init__(self, width: int, in_channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.feature_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_tinynet(cfg: BackboneConfig) -> nn.Module:
    return TinyNet(cfg.width, cfg.in_channels)


class AlignUniformConfig(MethodConfig):
    name: str = "tinyplug"
    dim: int = Field(16, ge=1)
    t: float = 2.0


class AlignUniform(Method):
    config_class = AlignUniformConfig
    paper = "arXiv:2005.10242"

    def __init__(self, cfg: AlignUniformConfig, ctx: BuildContext) -> None:
        super().__init__(cfg, ctx)
        self.backbone = ctx.build_backbone()
        self.head = nn.Linear(self.backbone.feature_dim, cfg.dim)

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        z1, z2 = (F.normalize(self.head(self.backbone(v)), dim=1) for v in batch.views[:2])
        align = (z1 - z2).norm(dim=1).pow(2).mean()
        uniform = torch.pdist(z1).pow(2).mul(-self.cfg.t).exp().mean().log()
        return StepOutput(align + uniform, {"align": align.detach(), "uniform": uniform.detach()})
