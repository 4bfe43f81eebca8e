"""Encoders ("backbones") that map an image batch to one pooled feature vector per image.

Every backbone is an :class:`torch.nn.Module` with an integer attribute ``feature_dim`` whose
``forward`` maps a float tensor ``[B, C, H, W]`` to ``[B, feature_dim]``.

* :func:`resnet` -- torchvision's ResNet-18/34/50 (He et al., arXiv:1512.03385) with the
  classifier removed and, optionally, the CIFAR stem used by SimCLR (arXiv:2002.05709, appendix
  B.9): a 3x3 stride-1 first convolution and no max-pool.  The parameter names are exactly
  torchvision's, so checkpoints move freely between the two.
* :class:`VisionTransformer` -- a pre-norm ViT (Dosovitskiy et al., arXiv:2010.11929) whose
  class token is the feature; position embeddings are interpolated for other input sizes (as in
  DINO, arXiv:2104.14294) and the patch projection can be frozen (MoCo v3, arXiv:2104.02057).
* :class:`ConvNet` -- a small four-stage convolutional network for quick CPU runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from clcli.errors import RecipeError
from clcli.recipe import BackboneConfig
from clcli.registry import BACKBONES

__all__ = [
    "BUILTIN_BACKBONES",
    "ConvNet",
    "VisionTransformer",
    "build_backbone",
    "resnet",
]

_RESNET_BUILDERS: dict[int, tuple[Callable[..., torchvision.models.ResNet], int]] = {
    18: (torchvision.models.resnet18, 512),
    34: (torchvision.models.resnet34, 512),
    50: (torchvision.models.resnet50, 2048),
}


# ------------------------------------------------------------------------------------ ResNet
def resnet(depth: int, *, cifar_stem: bool, in_channels: int = 3, init: str = "torchvision") -> nn.Module:
    """A randomly initialised torchvision ResNet of ``depth`` 18, 34 or 50, without classifier.

    The model is torchvision's own ``resnet{depth}(weights=None)`` with ``fc`` replaced by
    :class:`torch.nn.Identity`, so ``forward`` returns the globally average-pooled features and
    the ``state_dict`` keys are torchvision's minus ``fc.*``.  With ``cifar_stem`` the first
    convolution becomes a 3x3 stride-1 convolution without bias and the max-pool an identity
    (the small-image stem of SimCLR, arXiv:2002.05709).  A different ``in_channels`` replaces
    the first convolution likewise.  The returned module has ``feature_dim`` 512 (18, 34) or
    2048 (50).

    ``init``: ``torchvision`` keeps torchvision's Kaiming-normal (fan-out) convolutions, the first
    one included; ``pytorch`` resets every convolution to PyTorch's layer default (Kaiming-uniform
    with a = sqrt(5), a weight standard deviation of 1/sqrt(3 fan-in)), as ResNets written for CIFAR
    often leave it (lightly's benchmark ResNet among them).  Batch norm follows every convolution, so
    only the weights' direction matters, but their size sets how far a learning rate turns them.  The
    pytorch weights are smaller in every convolution but the first (sqrt(6) times where inputs and
    outputs are as many, sqrt(3) where the channels double; the first, 3 channels in and 64 out, is
    larger), so the same learning rate turns them further: settings tuned for one initialisation are
    not the same training with the other.
    """
    if depth not in _RESNET_BUILDERS:
        raise RecipeError(f"resnet depth must be one of {sorted(_RESNET_BUILDERS)}, got {depth}")
    if init not in ("torchvision", "pytorch"):
        raise RecipeError(f"resnet init must be 'torchvision' or 'pytorch', got {init!r}")
    builder, feature_dim = _RESNET_BUILDERS[depth]
    model = builder(weights=None)
    if cifar_stem:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if init == "pytorch":
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.reset_parameters()
    elif cifar_stem or in_channels != 3:
        # torchvision's initialisation of the first convolution.
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.fc = nn.Identity()
    model.feature_dim = feature_dim
    return model


# ------------------------------------------------------------------------- Vision Transformer
def interpolate_pos_embed(pos_embed: Tensor, grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """Resize patch position embeddings ``[1, gh*gw, D]`` laid out on ``grid`` to ``new_grid``.

    Bicubic interpolation of the embeddings seen as a ``D``-channel image, as DINO does for
    local crops (arXiv:2104.14294).  At the same grid the input is returned unchanged.
    """
    if tuple(grid) == tuple(new_grid):
        return pos_embed
    gh, gw = grid
    dim = pos_embed.shape[-1]
    image = pos_embed.reshape(1, gh, gw, dim).permute(0, 3, 1, 2)
    resized = F.interpolate(image.float(), size=new_grid, mode="bicubic", align_corners=False)
    return resized.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim)


class Attention(nn.Module):
    """Multi-head self-attention with a fused query/key/value projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads != 0:
            raise RecipeError(f"vit: dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Attend over the tokens of ``x`` ``[B, T, dim]``."""
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """A pre-norm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to tokens ``[B, T, dim]``."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """A pre-norm Vision Transformer (arXiv:2010.11929); the feature is the class token.

    Images are cut into ``patch_size`` patches by a strided convolution, a learned class token is
    prepended and learned position embeddings added; ``depth`` blocks of
    LayerNorm -> multi-head self-attention -> residual, LayerNorm -> GELU MLP -> residual follow,
    then a final LayerNorm.  Inputs of another size than ``image_size`` (for example 16 px local
    crops of a 32 px model) get bicubically interpolated patch position embeddings; the class
    token's embedding is kept as it is.  ``frozen_patch_embed`` keeps the random patch projection
    fixed, which MoCo v3 found to stabilise training (arXiv:2104.02057).  Position and class
    embeddings and every Linear weight start from a normal of std 0.02 truncated at two standard
    deviations; the patch projection is Xavier-uniform, as in MAE (arXiv:2111.06377).
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        in_channels: int = 3,
        frozen_patch_embed: bool = False,
    ) -> None:
        super().__init__()
        if image_size % patch_size != 0:
            raise RecipeError(f"vit: image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        self.feature_dim = dim
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid * self.grid, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self._init_weights()
        if frozen_patch_embed:
            for p in self.patch_embed.parameters():
                p.requires_grad_(False)

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-0.04, b=0.04)
        nn.init.trunc_normal_(self.cls_token, std=0.02, a=-0.04, b=0.04)
        # The patch projection is a linear map of the flattened patch: Xavier-uniform on that view.
        w = self.patch_embed.weight
        bound = math.sqrt(6.0 / (w.shape[0] + w[0].numel()))
        nn.init.uniform_(w, -bound, bound)
        nn.init.zeros_(self.patch_embed.bias)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def position_embedding(self, grid_h: int, grid_w: int) -> Tensor:
        """Position embeddings ``[1, 1 + grid_h*grid_w, dim]`` for a ``grid_h`` x ``grid_w`` patch grid."""
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        patch_pos = interpolate_pos_embed(patch_pos, (self.grid, self.grid), (grid_h, grid_w))
        return torch.cat([cls_pos, patch_pos], dim=1)

    def _embed(self, x: Tensor) -> tuple[Tensor, int, int]:
        """The input tokens ``[B, 1 + gh*gw, dim]`` (class token first, positions added) and the patch grid."""
        patches = self.patch_embed(x)  # [B, dim, gh, gw]
        b, _, gh, gw = patches.shape
        tokens = patches.flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        return tokens + self.position_embedding(gh, gw), gh, gw

    def forward_tokens(self, x: Tensor) -> Tensor:
        """All tokens after the final norm: ``[B, 1 + N, dim]``, the class token first."""
        tokens, _, _ = self._embed(x)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    @torch.no_grad()
    def cls_attention(self, x: Tensor) -> Tensor:
        """The last block's attention of the class token to each patch, per head: ``[B, heads, gh, gw]``.

        softmax(q_cls kᵀ / sqrt(d_head)) over all tokens, read at the patch tokens: the maps DINO
        shows (Caron et al. 2021, arXiv:2104.14294, Fig. 1).
        """
        tokens, gh, gw = self._embed(x)
        for block in self.blocks[:-1]:
            tokens = block(tokens)
        last = self.blocks[-1]
        b, t, d = tokens.shape
        h = last.attn.heads
        qkv = last.attn.qkv(last.norm1(tokens)).reshape(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        scores = (qkv[0][:, :, :1] @ qkv[1].transpose(-2, -1)) * (d // h) ** -0.5  # [B, heads, 1, T]
        return scores.float().softmax(dim=-1)[:, :, 0, 1:].reshape(b, h, gh, gw)

    def forward(self, x: Tensor) -> Tensor:
        """The class token of ``x`` ``[B, C, H, W]``: ``[B, dim]``."""
        return self.forward_tokens(x)[:, 0]


# -------------------------------------------------------------------------------- small CNN
class ConvNet(nn.Module):
    """A small, fast convolutional encoder for CPU experiments.

    Four stages of 3x3 convolution -> BatchNorm -> ReLU with ``width``, 2, 4 and 8 times
    ``width`` channels; the first stage keeps the resolution, the other three halve it (stride
    2); global average pooling gives ``feature_dim = 8 * width``.
    """

    def __init__(self, width: int = 32, in_channels: int = 3) -> None:
        super().__init__()
        channels = [in_channels, width, 2 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [
                nn.Conv2d(
                    channels[i], channels[i + 1], kernel_size=3, stride=1 if i == 0 else 2, padding=1, bias=False
                ),
                nn.BatchNorm2d(channels[i + 1]),
                nn.ReLU(inplace=True),
            ]
        self.features = nn.Sequential(*layers)
        self.feature_dim = 8 * width
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """Pooled features ``[B, 8*width]`` of ``x`` ``[B, C, H, W]``."""
        return self.features(x).mean(dim=(2, 3))


# ----------------------------------------------------------------------------- construction
def _build_resnet(depth: int) -> Callable[[BackboneConfig], nn.Module]:
    def build(cfg: BackboneConfig) -> nn.Module:
        return resnet(depth, cifar_stem=cfg.cifar_stem, in_channels=cfg.in_channels, init=cfg.init)

    build.__doc__ = f"ResNet-{depth} from a backbone configuration."
    return build


def _build_vit(cfg: BackboneConfig) -> nn.Module:
    """Vision Transformer from a backbone configuration."""
    return VisionTransformer(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        dim=cfg.dim,
        depth=cfg.depth,
        heads=cfg.heads,
        mlp_ratio=cfg.mlp_ratio,
        in_channels=cfg.in_channels,
        frozen_patch_embed=cfg.frozen_patch_embed,
    )


def _build_convnet(cfg: BackboneConfig) -> nn.Module:
    """Small ConvNet from a backbone configuration."""
    return ConvNet(width=cfg.width, in_channels=cfg.in_channels)


BUILTIN_BACKBONES: dict[str, Callable[[BackboneConfig], nn.Module]] = {
    "resnet18": _build_resnet(18),
    "resnet34": _build_resnet(34),
    "resnet50": _build_resnet(50),
    "vit": _build_vit,
    "convnet": _build_convnet,
}


def build_backbone(cfg: BackboneConfig, *, pretrained: bool = False) -> nn.Module:
    """A fresh backbone named by ``cfg.name``: a built-in, a timm architecture (``timm:NAME``,
    :mod:`clcli.models.timm_backbone`), or one a plug-in registered in :data:`BACKBONES`.

    An unknown name is a :class:`RecipeError` that lists the names available.  With ``pretrained``
    (a training run's start) the weights of ``cfg.pretrained_file`` are loaded when it names one;
    a run's checkpoint and an export carry their own weights and rebuild without it.
    """
    from clcli.models.timm_backbone import build_timm, is_timm, load_pretrained

    builder = BUILTIN_BACKBONES.get(cfg.name)
    if is_timm(cfg.name):
        builder = build_timm
    if builder is None:
        if cfg.name not in BACKBONES:
            allowed = ", ".join(BACKBONES.names())
            raise RecipeError(f"model.backbone.name: unknown backbone {cfg.name!r}; allowed: {allowed}")
        builder = BACKBONES.get(cfg.name)
    model = builder(cfg)
    if pretrained and cfg.pretrained_file:
        load_pretrained(model, cfg.pretrained_file)
    return model
