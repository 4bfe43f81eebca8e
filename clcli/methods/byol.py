"""BYOL: bootstrap your own latent (Grill et al. 2020, arXiv:2006.07733).

An online network (encoder → projector → predictor) learns to predict, from one view of an image,
the projection that a target network gives of the other view.  The target (encoder and projector)
has no gradient: after every optimiser step it moves towards the online weights as an exponential
moving average, ξ ← τξ + (1 − τ)θ, with τ = 1 − (1 − τ₀)(cos(πk/K) + 1)/2 rising from τ₀ to 1
over the K steps of the run (:func:`clcli.methods.momentum.momentum_schedule`).  The loss is
2 − 2·cos(q, z′), symmetrised over the two views; there are no negatives.

The two views are separate view groups in the recipe (BYOL's augmentation is asymmetric: blur
with probability 1.0 / 0.1 and solarisation 0 / 0.2), in declared order: view 1, view 2.
``view_passes`` says how they go through each network: ``separate`` (the default) is the paper's
released code (the network is applied once to view 1 and once to view 2), so batch normalisation
takes its statistics over one view's N images; ``joint`` runs both views in one pass, batch norm
over the 2N images together.  The target runs in training mode too (batch statistics), under
``torch.no_grad``, and keeps its own running statistics.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from clcli.losses import byol_loss
from clcli.methods.base import Batch, BuildContext, Method, StepOutput
from clcli.methods.momentum import ema_update, momentum_copy, momentum_schedule
from clcli.methods.multicrop import ViewPasses, describe_view_passes, pass_views
from clcli.models.heads import MLP
from clcli.recipe import MethodConfig, Recipe
from clcli.recipe_checks import HeadDims, MemoryItems, SizeContext, mlp_params, views_problem


class BYOLConfig(MethodConfig):
    """BYOL's settings: head dimensions after the backbone and the EMA momentum's start and end.

    ``projector``: hidden and output dims, e.g. [4096, 256] (the paper's); ``predictor``: hidden
    and output dims from the projector's output, the output equal to the projector's.
    """

    name: str = "byol"
    sync_batchnorm: bool = True  # the paper normalises over the global batch
    projector: HeadDims = Field(default_factory=lambda: [4096, 256])
    predictor: HeadDims = Field(default_factory=lambda: [4096, 256])
    head_norm: str = Field("bn", pattern="^(bn|ln|none)$", description="normalisation of the heads' hidden layers")
    view_passes: ViewPasses = "separate"  # the paper's code: one pass per view
    momentum: float = Field(0.996, ge=0, le=1, description="τ₀, the target EMA momentum at step 0")
    momentum_end: float = Field(1.0, ge=0, le=1, description="τ at the last step (cosine from τ₀)")

    @model_validator(mode="after")
    def _heads_fit(self) -> BYOLConfig:
        if self.predictor[-1] != self.projector[-1]:
            raise ValueError(
                f"predictor's output ({self.predictor[-1]}) must equal the projector's ({self.projector[-1]}): "
                "it predicts the target's projection"
            )
        return self

    def recipe_problems(self, recipe: Recipe) -> list[tuple[str, str]]:
        return views_problem(recipe, "byol", exactly=2)

    def memory_items(self, recipe: Recipe, sizes: SizeContext) -> MemoryItems:
        projector = mlp_params([sizes.feature_dim, *self.projector])
        return {
            "projector and predictor (method.projector, method.predictor)": (
                projector + mlp_params([self.projector[-1], *self.predictor]),
                "param",
            ),
            "target network (a copy of backbone and projector)": (sizes.backbone_params + projector, "state"),
        }


class BYOL(Method):
    config_class = BYOLConfig
    paper = "arXiv:2006.07733"

    def __init__(self, cfg: BYOLConfig, ctx: BuildContext) -> None:
        super().__init__(cfg, ctx)
        self.cfg: BYOLConfig = cfg
        self.backbone = ctx.build_backbone()
        self.projector = MLP([self.backbone.feature_dim, *cfg.projector], norm=cfg.head_norm)  # type: ignore[arg-type]
        self.predictor = MLP([cfg.projector[-1], *cfg.predictor], norm=cfg.head_norm)  # type: ignore[arg-type]
        self.target_backbone = momentum_copy(self.backbone)
        self.target_projector = momentum_copy(self.projector)
        self.total_steps = ctx.total_steps
        self.momentum = momentum_schedule(cfg.momentum, cfg.momentum_end, ctx.total_steps)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))

    def _online(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """The online predictions q, both views in one pass or each in its own (``view_passes``)."""
        return pass_views(lambda x: self.predictor(self.projector(self.backbone(x))), views, self.cfg.view_passes)

    @torch.no_grad()
    def _target(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """The target projections z′, passed like the online network's, without gradient."""
        return pass_views(lambda x: self.target_projector(self.target_backbone(x)), views, self.cfg.view_passes)

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        if len(batch.views) != 2:
            raise ValueError(
                f"BYOL uses exactly two views per image (two view groups of count 1, or one of count 2); "
                f"the recipe makes {len(batch.views)}"
            )
        p1, p2 = self._online(batch.views)
        z1, z2 = self._target(batch.views)
        loss = byol_loss(p1, p2, z1, z2)
        return StepOutput(loss, {"ema_momentum": self.momentum(step)}, health={"embedding": p1.detach()})

    def after_step(self, step: int) -> None:
        tau = self.momentum(step)
        ema_update(self.target_backbone, self.backbone, tau)
        ema_update(self.target_projector, self.projector, tau)

    def schedule_summary(self) -> dict[str, str]:
        c = self.cfg
        return {
            "target EMA momentum": f"{c.momentum:g} -> {c.momentum_end:g} (cosine over {self.total_steps} steps)",
            "view passes": describe_view_passes(c.view_passes),
            "projector": str([self.backbone.feature_dim, *c.projector]),
            "predictor": str([c.projector[-1], *c.predictor]),
        }
