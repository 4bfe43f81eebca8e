"""SimSiam: exploring simple Siamese representation learning (Chen & He 2020, arXiv:2011.10566).

One encoder f (backbone + projection MLP, every layer batch-normalised, the output too) and a
bottleneck prediction MLP h (2048 → 512 → 2048).  For two views x₁, x₂ with z = f(x) and p = h(z):

    L = ½ D(p₁, stopgrad(z₂)) + ½ D(p₂, stopgrad(z₁)),   D(p, z) = −(p/‖p‖)·(z/‖z‖)

No negatives and no momentum encoder: the stop-gradient is what keeps the solution from collapsing
(``stop_gradient: false`` is the paper's ablation, which collapses).  The predictor's learning rate
is held at the peak while the rest follow the schedule (the paper's "fixed lr for the predictor").

Collapse shows in the metric ``z_std``: the standard deviation over the batch of each dimension of
z/‖z‖, averaged over dimensions; it stays near 1/√d for a healthy run and falls towards 0 when
every image maps to the same vector (the paper's Figure 2, middle).  ``z_std_sqrt_d`` is the same
number times √d (about 1 healthy, 0 collapsed).

``view_passes`` says how the two views go through f and h.  ``separate`` (the default) is the
paper's Algorithm 1, ``z1, z2 = f(x1), f(x2)``: one pass per view, so batch norm takes its
statistics over one view's N images.  ``joint`` runs both views in one pass, batch norm over the
2N images together, as SimCLR does.  The CIFAR preset takes ``joint``, which learned more at its
short budget than the paper's per-view passes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from clcli.losses import simsiam_loss
from clcli.methods.base import Batch, BuildContext, Method, ParamGroup, StepOutput
from clcli.methods.multicrop import ViewPasses, describe_view_passes, pass_views
from clcli.models.heads import MLP
from clcli.recipe import MethodConfig, Recipe
from clcli.recipe_checks import HeadDims, MemoryItems, SizeContext, mlp_params, views_problem


class SimSiamConfig(MethodConfig):
    """SimSiam's settings.

    ``projector``: dims after the backbone, every layer with BN (output too): [2048, 2048, 2048]
    is the paper's 3-layer ImageNet projector, [2048, 2048] its 2-layer CIFAR one.  ``predictor``:
    hidden and output dims from the projector's output, the output equal to it ([512, 2048]).
    """

    name: str = "simsiam"
    sync_batchnorm: bool = True  # the paper normalises over the global batch
    projector: HeadDims = Field(default_factory=lambda: [2048, 2048, 2048])
    predictor: HeadDims = Field(default_factory=lambda: [512, 2048])
    stop_gradient: bool = Field(True, description="false only for the paper's collapse ablation")
    fixed_predictor_lr: bool = Field(True, description="hold the predictor's learning rate at the peak")
    view_passes: ViewPasses = "separate"  # the paper's Algorithm 1: one pass per view

    @model_validator(mode="after")
    def _heads_fit(self) -> SimSiamConfig:
        if self.predictor[-1] != self.projector[-1]:
            raise ValueError(
                f"predictor's output ({self.predictor[-1]}) must equal the projector's ({self.projector[-1]})"
            )
        return self

    def recipe_problems(self, recipe: Recipe) -> list[tuple[str, str]]:
        return views_problem(recipe, "simsiam", exactly=2)

    def memory_items(self, recipe: Recipe, sizes: SizeContext) -> MemoryItems:
        heads = mlp_params([sizes.feature_dim, *self.projector]) + mlp_params([self.projector[-1], *self.predictor])
        return {"projector and predictor (method.projector, method.predictor)": (heads, "param")}


def projector_mlp(in_dim: int, dims: list[int]) -> MLP:
    """SimSiam's projector: Linear-BN-ReLU per hidden layer, then Linear (no bias, BN follows) → BN.

    The paper: "BN applied to each fc layer, including its output fc; its output fc has no ReLU".
    The output BN keeps its learnable scale and shift (the official code drops them; see the module
    notes): without a shift a batch-normalised output has zero mean over the batch in every
    dimension, so complete collapse could not show in the per-dimension std of z/‖z‖.
    """
    return MLP([in_dim, *dims], norm="bn", last_norm=True, last_bias=False)


@torch.no_grad()
def normalized_output_std(z: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the per-dimension std (over the batch) of z/‖z‖ (SimSiam's collapse metric)."""
    zn = F.normalize(z.detach().float(), dim=1)
    return zn.std(dim=0).mean()


class SimSiam(Method):
    config_class = SimSiamConfig
    paper = "arXiv:2011.10566"

    def __init__(self, cfg: SimSiamConfig, ctx: BuildContext) -> None:
        super().__init__(cfg, ctx)
        self.cfg: SimSiamConfig = cfg
        self.backbone = ctx.build_backbone()
        self.projector = projector_mlp(self.backbone.feature_dim, cfg.projector)
        self.predictor = MLP([cfg.projector[-1], *cfg.predictor], norm="bn")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))

    def param_groups(self) -> list[ParamGroup]:
        encoder = [p for m in (self.backbone, self.projector) for p in m.parameters() if p.requires_grad]
        predictor = [p for p in self.predictor.parameters() if p.requires_grad]
        return [
            ParamGroup("encoder", encoder),
            ParamGroup("predictor", predictor, fixed_lr=self.cfg.fixed_predictor_lr),
        ]

    def forward_views(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """z₁, z₂, p₁, p₂, both views in one pass or each in its own (``view_passes``)."""
        z1, z2 = pass_views(lambda x: self.projector(self.backbone(x)), views, self.cfg.view_passes)
        p1, p2 = pass_views(self.predictor, [z1, z2], self.cfg.view_passes)
        return z1, z2, p1, p2

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        if len(batch.views) != 2:
            raise ValueError(f"SimSiam uses exactly two views per image, the recipe makes {len(batch.views)}")
        z1, z2, p1, p2 = self.forward_views(batch.views)
        if self.cfg.stop_gradient:
            t1, t2 = z1.detach(), z2.detach()
        else:
            t1, t2 = z1, z2
        loss = simsiam_loss(p1, p2, t1, t2)
        std = normalized_output_std(z1)
        metrics = {"z_std": std, "z_std_sqrt_d": std * math.sqrt(z1.shape[1])}
        return StepOutput(loss, metrics, health={"embedding": z1.detach()})

    def schedule_summary(self) -> dict[str, str]:
        c = self.cfg
        return {
            "predictor lr": "held at the peak (not decayed)" if c.fixed_predictor_lr else "follows the schedule",
            "stop-gradient": "on" if c.stop_gradient else "OFF (collapse ablation)",
            "view passes": describe_view_passes(c.view_passes),
            "projector": str([self.backbone.feature_dim, *c.projector]),
            "predictor": str([c.projector[-1], *c.predictor]),
        }
