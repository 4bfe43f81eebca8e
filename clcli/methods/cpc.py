"""CPC: contrastive predictive coding on images (van den Oord et al. 2018, arXiv:1807.03748, §3.3;
v2: Hénaff et al. 2019, arXiv:1905.09272).

An image is read as a grid of overlapping patches (the ``cpc`` view pipeline,
:mod:`clcli.views.patches`: v1 cuts a 256 px image into 64 px patches every 32 px, a 7 x 7 grid;
the CIFAR scaling is 8 px patches every 4 px of a 32 px image).  Each patch x_{i,j} is encoded
independently by a ResNet, mean-pooled to a vector z_{i,j} (v1: the first three stacks of a
ResNet-101; v2 replaces batch norm by layer norm so that no statistics are shared between patches).

A PixelCNN-style context network (:class:`ContextNetwork`) runs over the grid of z with masked
convolutions whose kernels have no rows below their centre, so its output c_{i,j} summarises only
the rows u ≤ i of the grid, never a row below.  From c_{i,j} one linear map per offset predicts
the patch k rows further down, ẑ_{i+k,j} = W_k c_{i,j}, for k = 1..K (K = 5 in v1: "predict up to
five rows").  The loss is InfoNCE with the log-bilinear score exp(zᵀ W_k c): each prediction must
pick its true patch among all patches of the batch, every position of every image
(:func:`~clcli.losses.cpc_infonce`).

v2 scores in a smaller space (appendix A.2 of arXiv:1905.09272): with ``target_dim`` set, a linear
map P (a 1x1 convolution over the grid, shared by every step) projects each candidate patch vector
to P z, each step's W_k predicts in that space, and the predictions are multiplied by
``emb_scale`` (0.1 in v2), so the score is exp(s (P z)ᵀ W_k c), still log-bilinear in z and c.
The patch encoder's z stays the representation; P is a head, like a projection head, and is not
exported.  Without ``target_dim`` (v1) the predictions are made in z's own space.

v2 also predicts in several directions: ``directions`` lists them, each with its own context
network and predictors (``bottom_up`` runs the same construction on the grid flipped upside down,
``left_right`` / ``right_left`` on the transposed grid, i.e. columns predicted from the columns
to their left / right).  Gradients flow into the patch encoder through the predictions' context
and through every candidate patch; there is no stop-gradient anywhere.

The model for evaluation (:class:`PatchGridEncoder`, the method's ``backbone``) cuts a whole
image into the same grid deterministically, encodes every patch and mean-pools over the grid, so
``clcli eval`` and ``clcli export`` use it like any backbone; :meth:`CPC.rebuild_encoder` rebuilds
it from an exported file.

v1 and v2 differ in settings only: v1 is ``encoder_norm: bn``, ``directions: [top_down]``, no
``target_dim``, ``emb_scale: 1`` and no patch-wise augmentation (``jitter_p``, ``grayscale_p``,
``patch_jitter``, ``patch_color_drop_p`` all 0); the built-in recipes take v2's layer norm and
patch augmentation on v1's grid layout.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from clcli.errors import RecipeError
from clcli.losses import cpc_infonce
from clcli.methods.base import Batch, BuildContext, Method, StepOutput, rebuild_from_recipe
from clcli.models.resnet_variants import DEPTHS, resnet_encoder
from clcli.recipe import MethodConfig, Recipe, ViewGroup
from clcli.recipe_checks import MAX_BLOCKS, MemoryItems, SizeContext
from clcli.views.patches import grid_size, patch_grid

Direction = Literal["top_down", "bottom_up", "left_right", "right_left"]


class CPCConfig(MethodConfig):
    """CPC's settings.  The patch encoder is the first ``encoder_stages`` stacks of the ResNet named
    by ``model.backbone`` (its depth and CIFAR stem), at ``encoder_width`` and with ``encoder_norm``."""

    name: str = "cpc"
    own_backbone: ClassVar[bool] = True
    encoder_stages: int = Field(3, ge=1, le=4, description="ResNet stacks of the patch encoder (v1: the first 3)")
    encoder_width: int = Field(64, ge=1, description="channels of the patch encoder's first stack")
    encoder_norm: Literal["ln", "bn", "none"] = Field("ln", description="v2: layer norm; v1: batch norm")
    context_dim: int | None = Field(None, ge=1, description="channels of the context network (default: z's)")
    context_blocks: int = Field(5, ge=1, le=MAX_BLOCKS, description="masked residual blocks of the context network")
    steps: int = Field(5, ge=1, description="K: predict rows i + min_step .. i + K from the context at row i")
    min_step: int = Field(1, ge=1, description="the nearest row predicted (1: the next row)")
    directions: list[Direction] = Field(
        default_factory=lambda: ["top_down"], min_length=1, description="v2 predicts from all four directions"
    )
    target_dim: int | None = Field(
        None, ge=1, description="v2: score in a space of this size (P z for the candidates; v2: 64); none: z's own (v1)"
    )
    emb_scale: float = Field(
        1.0, gt=0, le=1000, description="the predictions are multiplied by this before scoring (v2: 0.1)"
    )

    @field_validator("directions")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"directions must not repeat, got {v}")
        return v

    @model_validator(mode="after")
    def _steps_ordered(self) -> CPCConfig:
        if self.min_step > self.steps:
            raise ValueError(f"min_step ({self.min_step}) must not exceed steps ({self.steps})")
        return self

    def recipe_problems(self, recipe: Recipe) -> list[tuple[str, str]]:
        groups, backbone = recipe.views.groups, recipe.model.backbone
        out: list[tuple[str, str]] = []
        depth = backbone.name.removeprefix("resnet")
        if not (backbone.name.startswith("resnet") and depth.isdigit() and int(depth) in DEPTHS):
            names = ", ".join(f"resnet{d}" for d in DEPTHS)
            out.append(("model.backbone.name", f"cpc's patch encoder is a ResNet ({names}), not {backbone.name!r}"))
        if len(groups) != 1 or groups[0].count != 1 or groups[0].pipeline != "cpc":
            out.append(("views.groups", "cpc reads one patch grid per image: one group with pipeline: cpc, count: 1"))
            return out
        g = groups[0]
        rows = (g.size - g.patch_size) // g.patch_stride + 1
        if self.steps >= rows:
            out.append(
                ("method.steps", f"K = {self.steps} must be smaller than the grid's {rows} rows (views.groups.0)")
            )
        if recipe.views.eval_size != g.size:
            out.append(
                ("views.eval_size", f"{recipe.views.eval_size} must equal the patch grid's image size ({g.size})")
            )
        return out

    def memory_items(self, recipe: Recipe, sizes: SizeContext) -> MemoryItems:
        g = recipe.views.groups[0]
        rows = max(0, (g.size - g.patch_size) // g.patch_stride + 1)
        return {
            "patch grids of one batch (patches x 3 x patch_size^2)": (
                sizes.batch_size * rows**2 * 3 * g.patch_size**2,
                "work",
            )
        }


# ---------------------------------------------------------------------------- patch encoder
class PatchGridEncoder(nn.Module):
    """Patch grid -> per-patch vectors z_{i,j} (training) or their mean over the grid (evaluation).

    ``forward`` takes whole images [B, C, H, W], cuts the ``patch_size`` / ``patch_stride`` grid
    (no augmentation), encodes every patch and returns the mean of the patch vectors [B, D].
    """

    def __init__(self, encoder: nn.Module, patch_size: int, patch_stride: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.patch_size = patch_size
        self.patch_stride = patch_stride
        self.feature_dim = int(encoder.feature_dim)  # type: ignore[arg-type]

    def encode_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """[B, P, C, p, p] -> [B, P, D]."""
        b, n = patches.shape[:2]
        return self.encoder(patches.flatten(0, 1)).view(b, n, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_patches(patch_grid(x, self.patch_size, self.patch_stride)).mean(dim=1)


def _grid_group(recipe: Recipe) -> ViewGroup:
    groups = recipe.views.groups
    if len(groups) != 1 or groups[0].count != 1 or groups[0].pipeline != "cpc":
        raise RecipeError(
            "cpc reads one patch grid per image: views.groups must be a single group with pipeline: cpc and count: 1"
        )
    return groups[0]


def build_patch_encoder(recipe: Recipe) -> PatchGridEncoder:
    """The patch encoder of a CPC recipe, wrapped for whole-image evaluation."""
    cfg = recipe.method
    assert isinstance(cfg, CPCConfig)
    backbone = recipe.model.backbone
    depth = backbone.name.removeprefix("resnet")
    if not backbone.name.startswith("resnet") or not depth.isdigit() or int(depth) not in DEPTHS:
        raise RecipeError(
            f"cpc's patch encoder is a ResNet: model.backbone.name must be one of "
            f"{', '.join(f'resnet{d}' for d in DEPTHS)}, got {backbone.name!r}"
        )
    encoder = resnet_encoder(
        int(depth),
        stages=cfg.encoder_stages,
        width=cfg.encoder_width,
        in_channels=backbone.in_channels,
        cifar_stem=backbone.cifar_stem,
        norm=cfg.encoder_norm,
        init=backbone.init,
    )
    group = _grid_group(recipe)
    return PatchGridEncoder(encoder, group.patch_size, group.patch_stride)


# -------------------------------------------------------------------------- context network
class MaskedConv2d(nn.Conv2d):
    """A k x k convolution (k odd) whose kernel rows below the centre are zero.

    Output row i therefore depends on input rows i − k//2 .. i only (all columns of those rows):
    the PixelCNN mask (van den Oord et al. 2016, arXiv:1601.06759) applied to whole rows, as CPC's
    context network needs.  The centre row is included, so c_{i,j} may use z_{i,·} itself.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        if kernel_size % 2 != 1:
            raise ValueError(f"a masked convolution needs an odd kernel, got {kernel_size}")
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        mask = torch.ones_like(self.weight)
        mask[:, :, kernel_size // 2 + 1 :, :] = 0
        self.register_buffer("mask", mask, persistent=False)
        with torch.no_grad():
            self.weight.mul_(mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, self.stride, self.padding)


class ContextBlock(nn.Module):
    """Bottleneck residual block of the context network: x + 1x1(ReLU(masked 3x3(ReLU(1x1(x))))).

    The 1x1 convolutions narrow the width to a quarter and widen it back; the masked 3x3 covers
    rows i − 1 and i (columns j − 1 .. j + 1), so each block extends the context one row upwards.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        hidden = max(1, dim // 4)
        self.body = nn.Sequential(
            nn.Conv2d(dim, hidden, 1),
            nn.ReLU(),
            MaskedConv2d(hidden, hidden, 3),
            nn.ReLU(),
            nn.Conv2d(hidden, dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ContextNetwork(nn.Module):
    """PixelCNN-style context network over a grid [B, D, R, C]: c_{i,j} depends on rows ≤ i only.

    A 1x1 projection to ``dim`` channels, ``blocks`` masked bottleneck residual blocks (5 in CPC
    v2's appendix A.2), then a ReLU.
    """

    def __init__(self, in_dim: int, dim: int, blocks: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_dim, dim, 1)
        self.blocks = nn.Sequential(*(ContextBlock(dim) for _ in range(blocks)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.relu(self.blocks(self.proj(z)))


class DirectionalPredictor(nn.Module):
    """One direction's context network and its linear predictions W_k, k = min_step..steps, made in
    a space of ``out_dim`` dimensions (z's own, or v2's target space)."""

    def __init__(self, z_dim: int, c_dim: int, blocks: int, min_step: int, steps: int, out_dim: int) -> None:
        super().__init__()
        self.min_step, self.steps = min_step, steps
        self.context = ContextNetwork(z_dim, c_dim, blocks)
        self.predict = nn.ModuleList(nn.Linear(c_dim, out_dim, bias=False) for _ in range(min_step, steps + 1))

    def forward(self, grid: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``grid`` [B, D, R, C] (rows in prediction order), ``index`` [B, R, C] each cell's row in
        the candidate list -> predictions [N, D] and the candidate rows of their true patches [N]."""
        c = self.context(grid).permute(0, 2, 3, 1)  # [B, R, C, Dc]
        rows = c.shape[1]
        preds, targets = [], []
        for k, w in zip(range(self.min_step, self.steps + 1), self.predict, strict=True):
            preds.append(w(c[:, : rows - k]).flatten(0, 2))  # context rows 0 .. R-1-k
            targets.append(index[:, k:].flatten())  # their targets: rows k .. R-1
        return torch.cat(preds), torch.cat(targets)


def orient(x: torch.Tensor, direction: str) -> torch.Tensor:
    """Reorder a grid [..., R, C] so that prediction runs down its rows."""
    if direction == "top_down":
        return x
    if direction == "bottom_up":
        return x.flip(-2)
    if direction == "left_right":
        return x.transpose(-1, -2)
    if direction == "right_left":
        return x.transpose(-1, -2).flip(-2)
    raise ValueError(f"unknown direction {direction!r}")


# ------------------------------------------------------------------------------------ method
class CPC(Method):
    config_class = CPCConfig
    paper = "arXiv:1807.03748, arXiv:1905.09272"

    def __init__(self, cfg: CPCConfig, ctx: BuildContext) -> None:
        super().__init__(cfg, ctx)
        self.cfg: CPCConfig = cfg
        group = _grid_group(ctx.recipe)
        self.rows = grid_size(group.size, group.patch_size, group.patch_stride)
        if cfg.min_step > cfg.steps:
            raise RecipeError(f"method.min_step ({cfg.min_step}) must not exceed method.steps ({cfg.steps})")
        if cfg.steps >= self.rows:
            raise RecipeError(
                f"method.steps (K = {cfg.steps}) must be smaller than the grid's {self.rows} rows "
                f"({group.size} px image, {group.patch_size} px patches every {group.patch_stride} px)"
            )
        if ctx.recipe.views.eval_size != group.size:
            raise RecipeError(
                f"views.eval_size ({ctx.recipe.views.eval_size}) must equal the patch-grid image size "
                f"({group.size}) so that evaluation sees the grid training saw"
            )
        self.backbone = build_patch_encoder(ctx.recipe)
        z_dim = self.backbone.feature_dim
        c_dim = cfg.context_dim or z_dim
        out_dim = cfg.target_dim or z_dim
        self.heads = nn.ModuleDict(
            {
                d: DirectionalPredictor(z_dim, c_dim, cfg.context_blocks, cfg.min_step, cfg.steps, out_dim)
                for d in cfg.directions
            }
        )
        # v2's target projection P; a bias would add the same term to every candidate's score, so there is none
        self.target = nn.Linear(z_dim, cfg.target_dim, bias=False) if cfg.target_dim else None

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        if len(batch.views) != 1 or batch.views[0].dim() != 5:
            shapes = [tuple(v.shape) for v in batch.views]
            raise RecipeError(f"cpc expects one patch-grid view [B, P, 3, p, p] per image (cpc pipeline), got {shapes}")
        x = batch.views[0]
        b, n = x.shape[:2]
        if n != self.rows * self.rows:
            raise RecipeError(f"cpc expects {self.rows} x {self.rows} patches per image, got {n}")
        z = self.backbone.encode_patches(x)  # [B, P, D]
        grid = z.view(b, self.rows, self.rows, -1).permute(0, 3, 1, 2)  # [B, D, R, C]
        index = torch.arange(b * n, device=z.device).view(b, self.rows, self.rows)
        preds, targets = [], []
        for direction, head in self.heads.items():
            p, t = head(orient(grid, direction), orient(index, direction))
            preds.append(p)
            targets.append(t)
        candidates = z.reshape(b * n, -1)
        if self.target is not None:
            candidates = self.target(candidates)
        loss = cpc_infonce(torch.cat(preds) * self.cfg.emb_scale, candidates, torch.cat(targets))
        metrics = {"patch_norm": z.detach().float().norm(dim=-1).mean()}
        return StepOutput(loss, metrics, health={"embedding": z.detach().reshape(b * n, -1)})

    def schedule_summary(self) -> dict[str, str]:
        cfg, g = self.cfg, self.backbone
        per_dir = sum(self.rows - k for k in range(cfg.min_step, cfg.steps + 1)) * self.rows
        return {
            "patch grid": f"{self.rows} x {self.rows} patches of {g.patch_size} px every {g.patch_stride} px",
            "patch encoder": f"{cfg.encoder_stages} ResNet stacks, width {cfg.encoder_width}, {cfg.encoder_norm} "
            f"-> {g.feature_dim}-d",
            "prediction": f"rows i+{cfg.min_step}..i+{cfg.steps} from context row i, directions "
            f"{', '.join(cfg.directions)} ({per_dir * len(cfg.directions)} predictions per image)",
            "negatives": f"all {self.rows * self.rows} patches of every image in the batch",
            "scores": (
                f"in a {cfg.target_dim}-d target space (P z)" if cfg.target_dim else f"in z's {g.feature_dim}-d space"
            )
            + f", predictions x {cfg.emb_scale:g}",
        }

    # -- export -----------------------------------------------------------------------------
    def extra_metadata(self) -> dict[str, Any]:
        return {
            "composite": True,
            "encoder": "cpc patch grid: patches -> ResNet -> mean over the grid",
            "patch_size": self.backbone.patch_size,
            "patch_stride": self.backbone.patch_stride,
        }

    @classmethod
    def rebuild_encoder(cls, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> nn.Module:
        """The exported :class:`PatchGridEncoder` from its tensors and the recipe in the metadata."""
        return rebuild_from_recipe(tensors, meta, build_patch_encoder, "the CPC patch encoder")
