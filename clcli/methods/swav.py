"""SwAV: swapping assignments between views (Caron et al. 2020, arXiv:2006.09882).

Every crop of an image goes through the backbone (once per resolution group, see
:mod:`clcli.methods.multicrop`) and a projection MLP; the L2-normalised embedding z is scored
against K trainable, L2-normalised prototypes C.  The codes q of the code crops (the large
``global`` crops by default) are computed from those scores without gradient by Sinkhorn-Knopp
(3 iterations, ε = 0.05), which spreads the batch equally over the prototypes; every other crop
then predicts each code crop's code (the swapped prediction, τ = 0.1).

Paper details kept here:

* prototypes are re-normalised at the start and after every optimiser step, and frozen (their
  gradient dropped) during the first epoch (313 iterations at batch 4096).  The freeze is counted
  in this run's epochs, never shrunk with a short run's schedule: moving prototypes let the
  network reach a trivial solution early on (the prototypes lose a direction, every embedding
  moves onto it, codes and predictions become uniform and the loss sits at log K);
* Sinkhorn's sums run over the global batch across processes (:func:`clcli.dist.all_reduce_sum`);
* for small batches a FIFO queue of each code crop's past embeddings is scored with the current
  prototypes and added to the Sinkhorn problem (only the batch's rows of the result are used); it
  starts filling at ``queue_start_epoch`` and is used once full, as in the official scripts.  Like
  the freeze, that point is counted in this run's epochs, not shrunk: the queue is only sound once
  the network moves slowly.  A queue filled early holds stale embeddings from a network still near
  its peak learning rate, and the batch's hard assignments narrow towards a few prototypes, so a
  run shorter than ``queue_start_epoch`` has no queue.

The code crops are forwarded apart from the other crops (one pass per resolution group in each
part), so their codes cannot depend on the local crops even through BatchNorm's batch statistics,
and only their passes update the BatchNorm running statistics used at evaluation (unless
``all_crops_update_bn_stats``): evaluation images are full-size, like the code crops.

Logged: ``code_entropy`` (mean entropy of a sample's code, nats), ``assignment_entropy`` (entropy
of the batch's hard assignments over the prototypes, nats; near 0 means collapse, log(min(B, K))
the most even) and ``queue_used``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from clcli import dist
from clcli.errors import RecipeError
from clcli.losses import sinkhorn, swav_loss
from clcli.methods.base import Batch, BuildContext, Method, StepOutput
from clcli.methods.memory import FeatureQueue
from clcli.methods.multicrop import declared_view_names, multicrop_forward, views_of
from clcli.models.heads import MLP
from clcli.recipe import MethodConfig, Recipe
from clcli.recipe_checks import (
    MAX_ITERATIONS,
    MAX_VIEW_GROUPS,
    Epochs,
    ExpTemperature,
    HeadDims,
    MemoryItems,
    SizeContext,
    Temperature,
    group_names_problem,
    mlp_params,
    views_problem,
)


class SwAVConfig(MethodConfig):
    """SwAV's settings (paper values): projector dims after the backbone, prototypes, Sinkhorn, queue."""

    name: str = "swav"
    sync_batchnorm: bool = True  # the paper normalises over the global batch
    projector: HeadDims = Field(
        default_factory=lambda: [2048, 128], description="MLP dims after the backbone: hidden..., out"
    )
    projector_norm: str = Field("bn", pattern="^(bn|ln|none)$")
    num_prototypes: int = Field(3000, ge=2)
    temperature: Temperature = Field(0.1, description="τ of the swapped prediction's softmax")
    epsilon: ExpTemperature = Field(
        0.05, description="Sinkhorn-Knopp entropy weight ε (at least 0.02: the codes start from exp(score / ε))"
    )
    sinkhorn_iterations: int = Field(3, ge=1, le=MAX_ITERATIONS, description="each one pass over the batch's scores")
    code_views: list[str] = Field(
        default_factory=lambda: ["global"],
        min_length=1,
        max_length=MAX_VIEW_GROUPS,
        description="view groups whose crops give codes",
    )
    freeze_prototypes_epochs: Epochs = Field(
        1.0,
        description="prototypes get no update during the run's first epochs (the paper: the first epoch, 313 "
        "iterations at batch 4096); counted as they are, not shrunk with a short run's schedule",
    )
    queue_length: int = Field(0, ge=0, description="feature queue per code crop, over all processes (0: none)")
    queue_start_epoch: Epochs = Field(
        15.0,
        description="the queue starts filling at this epoch of the run (counted as it is, not shrunk with a short "
        "run's schedule) and is used once full",
    )
    all_crops_update_bn_stats: bool = Field(
        False,
        description="let every crop's pass update BatchNorm running statistics (the official code); by default "
        "only the code crops' do, so evaluation on full images normalises with full-size-crop statistics",
    )

    def recipe_problems(self, recipe: Recipe) -> list[tuple[str, str]]:
        out = views_problem(recipe, "swav", at_least=2)
        return out + group_names_problem(recipe, self.code_views, "method.code_views", not_all=True)

    def memory_items(self, recipe: Recipe, sizes: SizeContext) -> MemoryItems:
        dim, k, b = self.projector[-1], self.num_prototypes, sizes.batch_size
        code_crops = sum(g.count for g in recipe.views.groups if g.name in self.code_views)
        return {
            "projector (method.projector)": (mlp_params([sizes.feature_dim, *self.projector]), "param"),
            "prototypes (method.num_prototypes x method.projector[-1])": (k * dim, "param"),
            "queues (code crops x method.queue_length x method.projector[-1])": (
                code_crops * self.queue_length * dim,
                "state",
            ),
            "scores (views x trainer.batch_size x method.num_prototypes)": (
                sizes.views * b * k + (b + self.queue_length) * k,
                "work",
            ),
        }


class SwAV(Method):
    config_class = SwAVConfig
    paper = "arXiv:2006.09882"

    def __init__(self, cfg: SwAVConfig, ctx: BuildContext) -> None:
        super().__init__(cfg, ctx)
        self.cfg: SwAVConfig = cfg
        self.backbone = ctx.build_backbone()
        self.projector = MLP([self.backbone.feature_dim, *cfg.projector], norm=cfg.projector_norm)
        dim = cfg.projector[-1]
        self.prototypes = nn.Linear(dim, cfg.num_prototypes, bias=False)
        self.normalize_prototypes()
        names = declared_view_names(ctx.recipe.views.groups)
        if len(names) < 2:
            raise RecipeError("swav needs at least two views per image (views.groups counts)")
        self.code_positions = views_of(names, cfg.code_views, "method.code_views")
        if len(self.code_positions) == len(names):
            raise RecipeError("method.code_views: every view gives a code; at least one other view must predict them")
        # Both points guard the network's early, fast-moving steps, so both count epochs of this
        # run as they are, never shrunk with a short run's schedule: the freeze keeps a trivial
        # solution away, and the queue waits until the network moves slowly enough that a queued
        # embedding is still close to what it would compute now (see the module notes).
        self.freeze_steps = min(ctx.total_steps, ctx.first_epochs_to_steps(cfg.freeze_prototypes_epochs))
        self.queue_start_step = ctx.first_epochs_to_steps(cfg.queue_start_epoch)
        # every process keeps the whole queue (the gathered embeddings, identical on every rank, so a
        # checkpoint holds all of it) and hands Sinkhorn its own share: the shares together are the
        # queue of a one-process run, as the paper's per-GPU queues are
        if cfg.queue_length % dist.world_size() != 0:
            raise RecipeError(
                f"method.queue_length ({cfg.queue_length}) must split evenly over the {dist.world_size()} processes"
            )
        self.queues = nn.ModuleList(
            FeatureQueue(cfg.queue_length, dim, init="zeros") for _ in self.code_positions if cfg.queue_length > 0
        )

    # -- helpers --------------------------------------------------------------------------
    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        w = self.prototypes.weight
        w.copy_(F.normalize(w.float(), dim=1).to(w.dtype))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(self.backbone(x)).float(), dim=1)

    def _scores(self, z: torch.Tensor) -> torch.Tensor:
        """Prototype scores zᵀc_k in fp32 (ε = 0.05 turns bf16 rounding of the scores into large code errors)."""
        with torch.autocast(z.device.type, enabled=False):
            return z.float() @ self.prototypes.weight.float().t()

    # -- training -------------------------------------------------------------------------
    def training_step(self, batch: Batch, step: int) -> StepOutput:
        cfg = self.cfg
        n_views = len(batch.views)
        if n_views != len(batch.view_names) or n_views < 2:
            raise ValueError(f"swav needs at least two views per image, got {n_views}")
        b = batch.size
        code_positions = views_of(batch.view_names, cfg.code_views, "method.code_views")
        # backbone and projector once per resolution group; the code crops apart from the others, so
        # that their codes depend on no other crop (not even through BatchNorm statistics)
        quiet = [] if cfg.all_crops_update_bn_stats else [i for i in range(n_views) if i not in code_positions]
        projected = multicrop_forward(
            lambda x: self.projector(self.backbone(x)),
            batch.views,
            apart=code_positions,
            frozen_stats=quiet,
            modules=(self.backbone, self.projector),
        )
        h = torch.cat(projected, dim=0)
        with torch.autocast(h.device.type, enabled=False):
            z = F.normalize(h.float(), dim=1)  # [V*B, D]
            scores = self._scores(z).view(n_views, b, -1)  # [V, B, K]

        use_queue = len(self.queues) > 0 and step >= self.queue_start_step
        codes = []
        queue_used = False
        with torch.no_grad():
            zv = z.detach().view(n_views, b, -1)
            for c, s in enumerate(code_positions):
                out = scores[s].detach()
                if use_queue and self.queues[c].full:
                    out = torch.cat([self._scores(dist.local_share(self.queues[c].contents())), out], dim=0)
                    queue_used = True
                reduce = dist.all_reduce_sum if dist.is_distributed() else None  # one process: nothing to sum
                q = sinkhorn(out, cfg.epsilon, cfg.sinkhorn_iterations, all_reduce=reduce)[-b:]
                codes.append(q)
                if use_queue:
                    self.queues[c].enqueue(dist.gather_no_grad(zv[s]))
            q_all = torch.stack(codes)  # [C, B, K]
            code_entropy = -(q_all * q_all.clamp_min(1e-12).log()).sum(-1).mean()
            # prototype counts of the hard assignments (compared, not bincount, which reads the maximum off the device)
            labels = q_all.argmax(-1).flatten()
            hard = (labels.unsqueeze(1) == torch.arange(cfg.num_prototypes, device=labels.device)).sum(0).float()
            p = hard / hard.sum()
            assignment_entropy = -(p * p.clamp_min(1e-12).log()).sum()

        loss = swav_loss(scores, q_all, code_positions, cfg.temperature)
        metrics = {
            "code_entropy": code_entropy,
            "assignment_entropy": assignment_entropy,
            "queue_used": float(queue_used),
        }
        return StepOutput(loss, metrics, health={"embedding": z[:b].detach()})

    def before_step(self, step: int) -> None:
        if step < self.freeze_steps:
            self.prototypes.weight.grad = None  # frozen: no update, no weight decay, no momentum

    def after_step(self, step: int) -> None:
        self.normalize_prototypes()

    def schedule_summary(self) -> dict[str, str]:
        cfg = self.cfg
        queue = (
            f"{cfg.queue_length} per code crop, filling from step {self.queue_start_step}, used once full"
            if self.queues
            else "off"
        )
        return {
            "prototypes": f"{cfg.num_prototypes}, frozen for the first {self.freeze_steps} steps",
            "sinkhorn": f"{cfg.sinkhorn_iterations} iterations, epsilon {cfg.epsilon:g}; tau {cfg.temperature:g}",
            "code views": f"{', '.join(cfg.code_views)} (positions {self.code_positions})",
            "feature queue": queue,
        }
