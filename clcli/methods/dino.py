"""DINO: self-distillation with no labels (Caron et al. 2021, arXiv:2104.14294).

A student network (backbone + DINO head) is trained to match, through a cross-entropy, the
output distribution of a teacher of the same architecture whose weights are an exponential
moving average of the student's (momentum 0.996 → 1 on a cosine).  The teacher sees only the
global crops; the student sees every crop (global and local, several resolutions, one backbone
pass per resolution group); the loss sums H(P_t, P_s) over the pairs (teacher crop t, student
crop s ≠ t).  Collapse is avoided by centring the teacher's outputs (a running mean with
momentum 0.9, all-reduced across processes) and sharpening them (a low teacher temperature,
warmed up from 0.04 to 0.07 over the first 30 epochs in the recommended runs; student 0.1).

The DINO head is a 3-layer MLP (2048 hidden, GELU, 256-d bottleneck), L2 normalisation and a
weight-normalised linear layer to K outputs whose norm g is fixed to 1 (``norm_last_layer``, the
official code's default).  That last layer gets no update during the first epoch.

The last layer's freeze and the teacher temperature's warm-up guard the first steps of training
(the paper: a teacher temperature above 0.06 "needs a warm-up to avoid instabilities early in
training"), so they count this run's epochs as they are and are not shrunk with a short run's
schedule (:meth:`BuildContext.first_epochs_to_steps`); the teacher momentum's cosine and the
learning-rate and weight-decay schedules do follow the run's length: a warm-up shrunk with a short
run reaches the final teacher temperature while the network still moves fast, and the teacher's
output turns uniform.  Without normalisation in the head, the head can map every image to nearly
the same output early in training, so centring leaves little to sharpen; ``head_norm: bn`` (the
official ``use_bn_in_head``, the CIFAR preset's choice) removes the batch's shared component, so
the teacher's target starts sharp.

Gradient clipping (``optim.grad_clip``) and the cosine weight-decay schedule (``optim.weight_decay_end``)
are trainer settings in the recipe.  Evaluation and export use the teacher's backbone, as the
paper does (``eval_network``).  The student's BatchNorm running statistics (used only when the
student is evaluated) are taken from its global-crop passes unless ``all_crops_update_bn_stats``.

Logged: ``teacher_temperature``, ``teacher_entropy`` (mean entropy of P_t, nats) and ``kl`` (the
loss minus that entropy: the mean KL(P_t ‖ P_s) the student controls).  The paper's collapse
diagnostics (§5.3): an entropy near 0 means one dimension dominates, near log K a uniform output.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from clcli import dist
from clcli.errors import RecipeError
from clcli.losses import dino_loss
from clcli.methods.base import Batch, BuildContext, Method, StepOutput
from clcli.methods.momentum import ema_update, momentum_copy, momentum_schedule
from clcli.methods.multicrop import declared_view_names, multicrop_forward, views_of
from clcli.models.heads import MLP
from clcli.recipe import MethodConfig, Recipe
from clcli.recipe_checks import (
    MAX_BLOCKS,
    MAX_VIEW_GROUPS,
    Epochs,
    MemoryItems,
    SizeContext,
    Temperature,
    group_names_problem,
    mlp_params,
    views_problem,
)
from clcli.schedules import WarmupConstant


class DINOConfig(MethodConfig):
    """DINO's settings (paper values): head, temperatures, centring, teacher momentum, freezes."""

    name: str = "dino"
    sync_batchnorm: bool = True  # the paper normalises over the global batch
    out_dim: int = Field(65536, ge=2, description="K, the head's output dimension")
    head_hidden: int = Field(2048, ge=1)
    head_bottleneck: int = Field(256, ge=1)
    head_layers: int = Field(3, ge=1, le=MAX_BLOCKS, description="MLP layers before the L2-normalised bottleneck")
    head_norm: Literal["none", "bn"] = Field("none", description="normalisation in the head's MLP (bn: use_bn_in_head)")
    norm_last_layer: bool = Field(True, description="fix the weight-normalised last layer's norm g to 1")
    freeze_last_layer_epochs: Epochs = Field(
        1.0, description="the last layer gets no update during the run's first epochs (not shrunk in short runs)"
    )
    teacher_views: list[str] = Field(
        default_factory=lambda: ["global"],
        min_length=1,
        max_length=MAX_VIEW_GROUPS,
        description="view groups the teacher sees",
    )
    student_temperature: Temperature = 0.1
    teacher_temperature: Temperature = Field(0.07, description="τ_t after the warm-up")
    warmup_teacher_temperature: Temperature = Field(0.04, description="τ_t at the start of the warm-up")
    warmup_teacher_temperature_epochs: Epochs = Field(
        30.0, description="τ_t's warm-up over the run's first epochs (not shrunk in short runs)"
    )
    center_momentum: float = Field(0.9, ge=0, lt=1)
    momentum_start: float = Field(0.996, ge=0, le=1, description="teacher EMA momentum at step 0")
    momentum_end: float = Field(1.0, ge=0, le=1, description="teacher EMA momentum at the last step (cosine)")
    eval_network: Literal["teacher", "student"] = Field("teacher", description="backbone used by eval and export")
    all_crops_update_bn_stats: bool = Field(
        False,
        description="let the student's local-crop passes update BatchNorm running statistics (the official "
        "code); by default only its global-crop passes do, so an evaluated student normalises with those",
    )

    def recipe_problems(self, recipe: Recipe) -> list[tuple[str, str]]:
        out = views_problem(recipe, "dino", at_least=2)
        return out + group_names_problem(recipe, self.teacher_views, "method.teacher_views")

    def memory_items(self, recipe: Recipe, sizes: SizeContext) -> MemoryItems:
        dims = [sizes.feature_dim, *([self.head_hidden] * (self.head_layers - 1)), self.head_bottleneck]
        head = mlp_params(dims) + self.head_bottleneck * self.out_dim
        return {
            "head (method.head_hidden, head_bottleneck, out_dim)": (head, "param"),
            "teacher (a copy of backbone and head)": (sizes.backbone_params + head, "state"),
            "outputs (views x trainer.batch_size x method.out_dim, student and teacher)": (
                2 * sizes.views * sizes.batch_size * self.out_dim,
                "work",
            ),
        }


class WeightNormLinear(nn.Module):
    """A bias-free linear layer with weight normalisation, w_k = g_k · v_k / ‖v_k‖ (Salimans & Kingma 2016).

    With ``fixed_norm`` the gain g is 1 and not a parameter (DINO's ``norm_last_layer``), so every
    output is the cosine-like score of the unit-norm input against a unit-norm row.
    """

    def __init__(self, in_dim: int, out_dim: int, fixed_norm: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach().clone())  # v
        self.gain = None if fixed_norm else nn.Parameter(torch.ones(out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.normalize(self.weight, dim=1)
        if self.gain is not None:
            w = w * self.gain.unsqueeze(1)
        return F.linear(x, w)


class DINOHead(nn.Module):
    """DINO's projection head (arXiv:2104.14294 §3.1): MLP -> L2 norm -> weight-normalised linear to K.

    The MLP is ``layers`` Linear layers, ``in_dim`` -> ``hidden`` ... -> ``bottleneck``, GELU
    between them (optionally BatchNorm); its weights start from a normal of std 0.02 truncated at
    two standard deviations, its biases at zero, as in the official code.
    """

    def __init__(
        self, in_dim: int, out_dim: int, hidden: int, bottleneck: int, layers: int, norm: str, fixed_norm: bool
    ) -> None:
        super().__init__()
        dims = [in_dim, *([hidden] * (layers - 1)), bottleneck]
        self.mlp = MLP(dims, norm=norm, activation="gelu")  # type: ignore[arg-type]
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck, out_dim, fixed_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Head outputs [N, K] in fp32: the last layer runs outside autocast, since τ_t = 0.04 magnifies
        bf16 rounding of the logits tenfold."""
        x = self.mlp(x)
        with torch.autocast(x.device.type, enabled=False):
            return self.last_layer(F.normalize(x.float(), dim=-1))


class DINO(Method):
    config_class = DINOConfig
    paper = "arXiv:2104.14294"

    def __init__(self, cfg: DINOConfig, ctx: BuildContext) -> None:
        super().__init__(cfg, ctx)
        self.cfg: DINOConfig = cfg
        self.backbone = ctx.build_backbone()
        self.head = DINOHead(
            self.backbone.feature_dim,
            cfg.out_dim,
            cfg.head_hidden,
            cfg.head_bottleneck,
            cfg.head_layers,
            cfg.head_norm,
            cfg.norm_last_layer,
        )
        self.teacher_backbone = momentum_copy(self.backbone)
        self.teacher_head = momentum_copy(self.head)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        names = declared_view_names(ctx.recipe.views.groups)
        if len(names) < 2:
            raise RecipeError("dino needs at least two views per image (views.groups counts)")
        self.teacher_positions = views_of(names, cfg.teacher_views, "method.teacher_views")
        self.momentum = momentum_schedule(cfg.momentum_start, cfg.momentum_end, ctx.total_steps)
        self.teacher_temperature = WarmupConstant(
            cfg.warmup_teacher_temperature,
            cfg.teacher_temperature,
            ctx.first_epochs_to_steps(cfg.warmup_teacher_temperature_epochs),
        )
        self.freeze_steps = min(ctx.total_steps, ctx.first_epochs_to_steps(cfg.freeze_last_layer_epochs))

    # -- evaluation -----------------------------------------------------------------------
    def _eval_networks(self) -> tuple[nn.Module, nn.Module]:
        if self.cfg.eval_network == "teacher":
            return self.teacher_backbone, self.teacher_head
        return self.backbone, self.head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self._eval_networks()[0](x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        backbone, head = self._eval_networks()
        return head.mlp(backbone(x))  # type: ignore[operator]

    def export_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self._eval_networks()[0].state_dict().items()}

    def extra_metadata(self) -> dict[str, str]:
        return {"dino_network": self.cfg.eval_network}

    # -- training -------------------------------------------------------------------------
    def training_step(self, batch: Batch, step: int) -> StepOutput:
        cfg = self.cfg
        n_views, b = len(batch.views), batch.size
        if n_views != len(batch.view_names) or n_views < 2:
            raise ValueError(f"dino needs at least two views per image, got {n_views}")
        teacher_positions = views_of(batch.view_names, cfg.teacher_views, "method.teacher_views")
        with torch.no_grad():
            t_views = [batch.views[i] for i in teacher_positions]
            teacher = torch.cat(multicrop_forward(lambda x: self.teacher_head(self.teacher_backbone(x)), t_views))
            teacher = teacher.view(len(teacher_positions), b, -1)
        quiet = [] if cfg.all_crops_update_bn_stats else [i for i in range(n_views) if i not in teacher_positions]
        student = multicrop_forward(
            lambda x: self.head(self.backbone(x)), batch.views, frozen_stats=quiet, modules=(self.backbone, self.head)
        )
        student = torch.cat(student, dim=0)
        student = student.view(n_views, b, -1)
        tau_t = self.teacher_temperature(step)
        loss = dino_loss(student, teacher, self.center, teacher_positions, cfg.student_temperature, tau_t)
        with torch.no_grad():
            p_t = F.softmax((teacher - self.center) / tau_t, dim=-1)
            teacher_entropy = -(p_t * p_t.clamp_min(1e-12).log()).sum(-1).mean()
            self._update_center(teacher)
        # every teacher crop has V − 1 partners, so loss = mean H(P_t) + mean KL(P_t ‖ P_s): the KL is the
        # part the student controls; entropy near 0 or near log K is the signature of a collapse (paper §5.3)
        metrics = {
            "teacher_temperature": tau_t,
            "teacher_entropy": teacher_entropy,
            "kl": loss.detach() - teacher_entropy,
            "ema_momentum": self.momentum(step),
        }
        return StepOutput(loss, metrics, health={"embedding": student[0].detach()})

    def health(self, saved: dict[str, torch.Tensor]) -> dict[str, float | torch.Tensor]:
        """The collapse measures of the student output, and the norm of the teacher's centre c.

        A centre that grows without bound, or a teacher entropy at 0 or log K, is how DINO's
        collapse shows (Caron et al. 2021, arXiv:2104.14294, §5.3).
        """
        return {**super().health(saved), "center_norm": self.center.float().norm()}

    @torch.no_grad()
    def _update_center(self, teacher: torch.Tensor) -> None:
        """c ← m·c + (1 − m)·mean of the teacher outputs over the global batch (all teacher crops)."""
        flat = teacher.reshape(-1, teacher.shape[-1])
        total = dist.all_reduce_sum(flat.sum(dim=0, keepdim=True))
        mean = total / (flat.shape[0] * dist.world_size())
        self.center.mul_(self.cfg.center_momentum).add_(mean, alpha=1.0 - self.cfg.center_momentum)

    def before_step(self, step: int) -> None:
        if step < self.freeze_steps:
            for p in self.head.last_layer.parameters():
                p.grad = None  # frozen during the first epoch: no update, no weight decay

    def after_step(self, step: int) -> None:
        m = self.momentum(step)
        ema_update(self.teacher_backbone, self.backbone, m)
        ema_update(self.teacher_head, self.head, m)

    def schedule_summary(self) -> dict[str, str]:
        cfg, total = self.cfg, self.momentum.total_steps
        return {
            "teacher momentum": f"{cfg.momentum_start:g} -> {cfg.momentum_end:g} (cosine over {total} steps)",
            "teacher temperature": (
                f"{cfg.warmup_teacher_temperature:g} -> {cfg.teacher_temperature:g} over "
                f"{self.teacher_temperature.warmup_steps} steps; student {cfg.student_temperature:g}"
            ),
            "last layer": f"frozen for the first {self.freeze_steps} steps; K = {cfg.out_dim}",
            "teacher views": f"{', '.join(cfg.teacher_views)} (positions {self.teacher_positions})",
            "centre momentum": f"{cfg.center_momentum:g}",
        }
