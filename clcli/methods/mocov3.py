"""MoCo v3: an empirical study of training self-supervised ViTs (Chen, Xie & He 2021, arXiv:2104.02057).

No queue: the keys are the momentum encoder's outputs for the other view of the batch, gathered
across devices without gradient.  The query side has a prediction head after the projector;
the momentum encoder is the EMA of backbone + projector with m going from 0.99 to 1 on a cosine
over the run.  The loss is symmetric, ctr(q₁, k₂) + ctr(q₂, k₁), each term InfoNCE scaled by 2τ
(τ = 1.0 for ResNet, 0.2 for ViT).  Heads follow the official code: hidden layers
Linear (no bias) → BN → ReLU; the projector's output has a BatchNorm without affine parameters
(SimCLR's design, γ and β removed), the predictor's has none.  For a ViT the random patch
projection is frozen (``model.backbone.frozen_patch_embed``), which the paper found to remove the
training instability it studies; ViT recipes use AdamW.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from clcli import dist
from clcli.errors import RecipeError
from clcli.losses import mocov3_loss
from clcli.methods.base import Batch, BuildContext, Method, StepOutput
from clcli.methods.momentum import ema_update, momentum_copy, momentum_schedule
from clcli.models.heads import MLP
from clcli.recipe import MethodConfig, Recipe
from clcli.recipe_checks import HeadDims, MemoryItems, SizeContext, Temperature, mlp_params, views_problem

__all__ = ["MoCoV3", "MoCoV3Config"]


class MoCoV3Config(MethodConfig):
    """MoCo v3's settings; the defaults are the ResNet-50 values (arXiv:2104.02057, official code)."""

    name: str = "mocov3"
    sync_batchnorm: bool = True  # the paper normalises over the global batch
    projector: HeadDims = Field(
        default_factory=lambda: [4096, 256],
        description="projector dims after the backbone: 2 layers for ResNet, [4096, 4096, 256] for ViT",
    )
    projector_last_norm: bool = Field(True, description="BatchNorm (no affine) on the projector's output")
    predictor: HeadDims = Field(
        default_factory=lambda: [4096, 256], description="predictor dims after the projector, ending at its output"
    )
    predictor_last_norm: bool = Field(False, description="BatchNorm (no affine) on the predictor's output")
    temperature: Temperature = Field(1.0, description="tau: 1.0 for ResNet, 0.2 for ViT")
    momentum: float = Field(0.99, ge=0, le=1, description="momentum encoder EMA at the first step")
    momentum_end: float = Field(1.0, ge=0, le=1, description="EMA momentum at the last step (cosine)")

    @model_validator(mode="after")
    def _heads_fit(self) -> MoCoV3Config:
        if self.predictor[-1] != self.projector[-1]:
            raise ValueError(
                f"predictor must end at the projector's output size ({self.projector[-1]}), got {self.predictor[-1]}: "
                "queries are compared with the momentum projector's keys"
            )
        return self

    def recipe_problems(self, recipe: Recipe) -> list[tuple[str, str]]:
        return views_problem(recipe, "mocov3", exactly=2)

    def memory_items(self, recipe: Recipe, sizes: SizeContext) -> MemoryItems:
        projector = mlp_params([sizes.feature_dim, *self.projector])
        b = sizes.batch_size
        return {
            "projector and predictor (method.projector, method.predictor)": (
                projector + mlp_params([self.projector[-1], *self.predictor]),
                "param",
            ),
            "momentum encoder (a copy of backbone and projector)": (sizes.backbone_params + projector, "state"),
            "logits (2 x trainer.batch_size^2)": (2 * b * b, "work"),
        }


def _head(dims: list[int], last_norm: bool) -> MLP:
    """Linear (no bias) → BN → ReLU per hidden layer, Linear (no bias), optional BN without affine."""
    mlp = MLP(dims, norm="bn", last_norm=last_norm, last_bias=False)
    if last_norm:  # the official heads drop γ and β of the output BN
        mlp[-1] = nn.BatchNorm1d(dims[-1], affine=False)
    return mlp


class MoCoV3(Method):
    """MoCo v3: query encoder + predictor, momentum encoder, symmetric in-batch contrastive loss."""

    config_class = MoCoV3Config
    paper = "arXiv:2104.02057"

    def __init__(self, cfg: MoCoV3Config, ctx: BuildContext) -> None:
        super().__init__(cfg, ctx)
        self.cfg: MoCoV3Config = cfg
        self.backbone = ctx.build_backbone()
        self.projector = _head([self.backbone.feature_dim, *cfg.projector], cfg.projector_last_norm)
        self.predictor = _head([cfg.projector[-1], *cfg.predictor], cfg.predictor_last_norm)
        if cfg.predictor[-1] != cfg.projector[-1]:
            raise RecipeError(
                f"method.predictor must end at the projector's output size ({cfg.projector[-1]}), "
                f"got {cfg.predictor[-1]}: queries are compared with the momentum projector's keys"
            )
        self.momentum_backbone = momentum_copy(self.backbone)
        self.momentum_projector = momentum_copy(self.projector)
        self.momentum = momentum_schedule(cfg.momentum, cfg.momentum_end, ctx.total_steps)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        if len(batch.views) != 2:
            raise ValueError(f"MoCo v3 uses exactly two views per image, the recipe makes {len(batch.views)}")
        x1, x2 = batch.views
        # each view is its own forward pass, so BN statistics are per view (as in the official code)
        q1 = self.predictor(self.projector(self.backbone(x1)))
        q2 = self.predictor(self.projector(self.backbone(x2)))
        with torch.no_grad():
            k1 = dist.gather_no_grad(self.momentum_projector(self.momentum_backbone(x1)))
            k2 = dist.gather_no_grad(self.momentum_projector(self.momentum_backbone(x2)))
        offset = dist.rank() * batch.size
        loss = mocov3_loss(q1, q2, k1, k2, self.cfg.temperature, offset)
        with torch.no_grad():
            n = batch.size
            k2_mine = k2[offset : offset + n].float()
            pos_sim = F.cosine_similarity(q1.detach().float(), k2_mine, dim=1).mean()
        metrics = {"pos_sim": pos_sim, "ema_momentum": self.momentum(step)}
        return StepOutput(loss, metrics, health={"embedding": q1.detach()})

    def after_step(self, step: int) -> None:
        m = self.momentum(step)
        ema_update(self.momentum_backbone, self.backbone, m)
        ema_update(self.momentum_projector, self.projector, m)

    def schedule_summary(self) -> dict[str, str]:
        s = self.momentum
        return {
            "momentum encoder": f"{s.start:g} -> {s.end:g} (cosine over {s.total_steps} steps)",
            "loss": f"symmetric contrastive x 2tau, tau {self.cfg.temperature:g}",
        }
