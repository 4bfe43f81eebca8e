"""SimCLR: a simple framework for contrastive learning (Chen et al. 2020, arXiv:2002.05709).

Two augmented views of each image go through one backbone and a projection MLP; NT-Xent pulls
the two projections of an image together against the other 2N − 2 views of the batch.  Across
processes the projections are gathered *with* gradient, so every view sees the global batch's
negatives.  Gradient accumulation does not add negatives: each micro-batch is its own contrast.
"""

from __future__ import annotations

import torch
from pydantic import Field

from clcli import dist
from clcli.losses import nt_xent
from clcli.methods.base import Batch, BuildContext, Method, StepOutput
from clcli.models.heads import MLP
from clcli.recipe import MethodConfig, Recipe
from clcli.recipe_checks import HeadDims, MemoryItems, SizeContext, Temperature, mlp_params, views_problem


class SimCLRConfig(MethodConfig):
    """SimCLR's settings: projector dims after the backbone, e.g. [2048, 128] (v1), and τ."""

    name: str = "simclr"
    sync_batchnorm: bool = True  # the paper normalises over the global batch
    projector: HeadDims = Field(default_factory=lambda: [2048, 128])
    projector_norm: str = Field("bn", pattern="^(bn|ln|none)$")
    temperature: Temperature = 0.5

    def recipe_problems(self, recipe: Recipe) -> list[tuple[str, str]]:
        return views_problem(recipe, "simclr", exactly=2)

    def memory_items(self, recipe: Recipe, sizes: SizeContext) -> MemoryItems:
        return {
            "projector (method.projector)": (mlp_params([sizes.feature_dim, *self.projector]), "param"),
            "similarity matrix ((2 x trainer.batch_size)^2)": ((2 * sizes.batch_size) ** 2, "work"),
        }


class SimCLR(Method):
    config_class = SimCLRConfig
    paper = "arXiv:2002.05709"

    def __init__(self, cfg: SimCLRConfig, ctx: BuildContext) -> None:
        super().__init__(cfg, ctx)
        self.cfg: SimCLRConfig = cfg
        self.backbone = ctx.build_backbone()
        self.projector = MLP([self.backbone.feature_dim, *cfg.projector], norm=cfg.projector_norm)

    def embed(self, x):  # type: ignore[no-untyped-def]
        return self.projector(self.backbone(x))

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        if len(batch.views) != 2:
            raise ValueError(f"SimCLR uses exactly two views per image, the recipe makes {len(batch.views)}")
        x = batch.views
        # one backbone pass over both views (same resolution): BN sees the 2N images together
        h = self.backbone(torch.cat(x, dim=0))
        z = self.projector(h)
        z1, z2 = z.chunk(2)
        z1, z2 = dist.gather_with_grad(z1), dist.gather_with_grad(z2)
        loss = nt_xent(z1, z2, self.cfg.temperature)
        return StepOutput(loss, health={"embedding": z.detach()})
