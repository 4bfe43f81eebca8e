"""Backbones (encoders) and heads (projectors, predictors)."""

from clcli.models.backbones import BUILTIN_BACKBONES, ConvNet, VisionTransformer, build_backbone, resnet
from clcli.models.heads import MLP

__all__ = ["BUILTIN_BACKBONES", "MLP", "ConvNet", "VisionTransformer", "build_backbone", "resnet"]
