"""MoCo v1 and v2: momentum contrast (He et al. 2019, arXiv:1911.05722; Chen et al. 2020, arXiv:2003.04297).

A query encoder (backbone + head) and a key encoder that is its exponential moving average,
ξ ← m·ξ + (1 − m)·θ with m = 0.999 (eq. 2).  Each image gives two views: the query view goes
through the query encoder, the key view through the key encoder without gradient.  The loss is
InfoNCE over the positive key and a FIFO queue of the K most recent keys (eq. 1, τ = 0.07); the
batch's keys are written into the queue after the loss, replacing the oldest ones.

Shuffling BN (§3.3): batch statistics would let the query and its key "communicate" when both are
normalised over the same images.  The official code computes keys on a batch shuffled across
devices.  Here both encoders compute BN statistics per group of the batch (``bn_groups``, as if
each group were a device; across real devices each device is one or more groups), and the key
batch is permuted before it is split into groups and un-permuted after, such that no key lands
in its own query's group.  The permutation is a random one under that constraint: for every
group the keys of its images are spread over the other groups.

v2 is v1 with an MLP head (hidden width = the backbone's), τ = 0.2, blur in the augmentation and
a cosine learning-rate schedule: all recipe settings of this one method (``moco-v1``,
``moco-v2``).  ``symmetric`` switches on the symmetrised loss of MoCo's official CIFAR-10 demo
(each view is the query once); the papers use one direction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from clcli import dist
from clcli.errors import RecipeError
from clcli.losses import moco_infonce
from clcli.methods.base import Batch, BuildContext, Method, StepOutput
from clcli.methods.memory import FeatureQueue
from clcli.methods.momentum import ema_update, momentum_copy, momentum_schedule
from clcli.models.heads import MLP
from clcli.recipe import MethodConfig, Recipe
from clcli.recipe_checks import HeadDims, MemoryItems, SizeContext, Temperature, mlp_params, views_problem

__all__ = ["MoCo", "MoCoConfig", "SplitBatchNorm", "convert_split_batchnorm", "grouped_shuffle"]


class MoCoConfig(MethodConfig):
    """MoCo's settings; the defaults are v1's ImageNet values (arXiv:1911.05722 §4)."""

    name: str = "moco"
    projector: HeadDims = Field(
        default_factory=lambda: [128],
        description="head dims after the backbone: [128] is v1's linear head, [2048, 128] v2's MLP",
    )
    projector_norm: str = Field("none", pattern="^(bn|ln|none)$", description="v2's MLP head has no normalisation")
    temperature: Temperature = 0.07
    queue_size: int = Field(
        65536, ge=1, description="K, the number of keys in the queue (any size: the queue wraps around)"
    )
    momentum: float = Field(0.999, ge=0, le=1, description="key encoder EMA momentum m")
    momentum_end: float | None = Field(
        None, ge=0, le=1, description="if set, m moves from `momentum` to this on a cosine over the run"
    )
    bn_groups: int = Field(
        8, ge=1, description="shuffling BN: groups of the global batch with their own BN statistics (1 = off)"
    )
    symmetric: bool = Field(False, description="symmetrised loss (MoCo's CIFAR demo); the papers use one direction")

    def recipe_problems(self, recipe: Recipe) -> list[tuple[str, str]]:
        out = views_problem(recipe, "moco", exactly=2)
        if self.bn_groups > recipe.trainer.batch_size:
            out.append(
                ("method.bn_groups", f"{self.bn_groups} groups exceed trainer.batch_size ({recipe.trainer.batch_size})")
            )
        return out

    def memory_items(self, recipe: Recipe, sizes: SizeContext) -> MemoryItems:
        head = mlp_params([sizes.feature_dim, *self.projector])
        b, k = sizes.batch_size, self.queue_size
        return {
            "projector (method.projector)": (head, "param"),
            "key encoder (a copy of backbone and projector)": (sizes.backbone_params + head, "state"),
            "queue (method.queue_size x method.projector[-1])": (k * self.projector[-1], "state"),
            "logits (trainer.batch_size x method.queue_size)": (b * (1 + k) * (2 if self.symmetric else 1), "work"),
        }


# ------------------------------------------------------------------------- shuffling BN
class SplitBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch normalisation whose training statistics are computed per group of the batch.

    With ``groups`` G > 1, row p of the batch belongs to group p mod G (so a batch reshaped to
    [B/G, G·C, ...] puts each group in its own block of channels, and one ``batch_norm`` call
    computes every group's statistics).  The running statistics move by the average of the groups'
    statistics.  In evaluation, or with G = 1, this is an ordinary BatchNorm; its parameters and
    buffers have BatchNorm's names, so state dicts load into the plain module and back.
    """

    groups: int = 1

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions, got {input.dim()}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        g = self.groups
        if g == 1 or not self.training:
            return super().forward(input)
        n, c = input.shape[0], input.shape[1]
        if n % g != 0:
            raise ValueError(f"shuffling BN: a batch of {n} cannot be split into {g} equal groups")
        if self.momentum is None:  # cumulative moving average, as nn.BatchNorm
            factor = 1.0 / float(int(self.num_batches_tracked) + 1)
        else:
            factor = self.momentum
        grouped = input.reshape(n // g, g * c, *input.shape[2:])
        running_mean = running_var = None
        if self.track_running_stats:
            running_mean = self.running_mean.repeat(g)
            running_var = self.running_var.repeat(g)
        out = F.batch_norm(
            grouped,
            running_mean,
            running_var,
            self.weight.repeat(g) if self.weight is not None else None,
            self.bias.repeat(g) if self.bias is not None else None,
            True,
            factor,
            self.eps,
        )
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.copy_(running_mean.view(g, c).mean(0))
                self.running_var.copy_(running_var.view(g, c).mean(0))
                self.num_batches_tracked.add_(1)
        return out.reshape(input.shape)


def convert_split_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm (1d/2d/3d) in ``module`` by a :class:`SplitBatchNorm` with the same state."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, SplitBatchNorm | nn.SyncBatchNorm
    ):
        new = SplitBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_split_batchnorm(child))
    return module


def set_bn_groups(module: nn.Module, groups: int) -> None:
    for m in module.modules():
        if isinstance(m, SplitBatchNorm):
            m.groups = groups


def _random_derangements(rows: int, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """``rows`` independent uniform random permutations of range(n) without fixed points ([rows, n]; n ≥ 2)."""
    out = torch.rand(rows, n, generator=generator).argsort(dim=1)
    ar = torch.arange(n)
    bad = (out == ar).any(dim=1)
    while bool(bad.any()):
        out[bad] = torch.rand(int(bad.sum()), n, generator=generator).argsort(dim=1)
        bad = (out == ar).any(dim=1)
    return out


def grouped_shuffle(group_of: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random permutation ``perm`` of the positions of a batch such that no row changes group.

    ``group_of`` [P]: the group (0..T−1) of each position; all T groups have the same size m.
    Position p of the shuffled batch holds row ``perm[p]`` of the original, and
    ``group_of[p] != group_of[perm[p]]`` for every p.  Built as: the rows of each group in random
    order form an [m, T] table, and row r of the table sends the image of group t to a random slot
    of group d_r(t) for an independent random derangement d_r, so every group of the shuffled
    batch draws one image from m different places.  With one group it is the identity.
    """
    group_of = group_of.cpu()
    p = group_of.numel()
    t = int(group_of.max()) + 1 if p else 0
    if t <= 1:
        return torch.arange(p)
    counts = torch.bincount(group_of, minlength=t)
    if bool((counts != counts[0]).any()):
        raise ValueError("grouped_shuffle needs groups of equal size")
    m = int(counts[0])
    members = group_of.argsort(stable=True).view(t, m)  # positions of each group
    src = members.gather(1, torch.rand(t, m, generator=generator).argsort(dim=1))  # rows in random order
    dst = members.gather(1, torch.rand(t, m, generator=generator).argsort(dim=1))  # slots in random order
    derange = _random_derangements(m, t, generator)  # [m, t]: table row r sends group t to derange[r, t]
    slots = dst.gather(0, derange.t())  # [t, m]: the slot of src[t, r] is dst[derange[r, t], r]
    perm = torch.empty(p, dtype=torch.long)
    perm[slots.reshape(-1)] = src.reshape(-1)
    return perm


# ----------------------------------------------------------------------------- method
class MoCo(Method):
    """MoCo v1/v2: query encoder, momentum key encoder, FIFO queue, InfoNCE, shuffling BN."""

    config_class = MoCoConfig
    paper = "arXiv:1911.05722 (v1), arXiv:2003.04297 (v2)"

    def __init__(self, cfg: MoCoConfig, ctx: BuildContext) -> None:
        super().__init__(cfg, ctx)
        self.cfg: MoCoConfig = cfg
        self.dataset_size = ctx.dataset_size
        if cfg.sync_batchnorm:
            raise RecipeError(
                "MoCo v1/v2 shuffle batch norm across groups (method.bn_groups) so that it cannot leak the "
                "positive; method.sync_batchnorm=true would undo that: leave it false"
            )
        self.batch_size = ctx.recipe.trainer.batch_size // dist.world_size()  # this process's share
        groups = max(1, cfg.bn_groups // dist.world_size())
        if self.batch_size % groups != 0:
            raise RecipeError(
                f"shuffling BN splits each process's batch of {self.batch_size} into {groups} groups: "
                f"trainer.batch_size ({ctx.recipe.trainer.batch_size}) must be a multiple of method.bn_groups "
                f"({cfg.bn_groups})"
            )
        backbone = ctx.build_backbone()
        self.backbone = convert_split_batchnorm(backbone)
        self.projector = convert_split_batchnorm(
            MLP([self.backbone.feature_dim, *cfg.projector], norm=cfg.projector_norm)  # type: ignore[arg-type]
        )
        self.key_backbone = momentum_copy(self.backbone)
        self.key_projector = momentum_copy(self.projector)
        gen = torch.Generator().manual_seed(ctx.recipe.seed)
        self.queue = FeatureQueue(cfg.queue_size, cfg.projector[-1], generator=gen)
        end = cfg.momentum if cfg.momentum_end is None else cfg.momentum_end
        self.momentum = momentum_schedule(cfg.momentum, end, ctx.total_steps)

    # -- networks ---------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))

    def _local_groups(self) -> int:
        """BN groups on this device: the recipe's groups spread over the devices (at least one each)."""
        return max(1, self.cfg.bn_groups // dist.world_size())

    def _set_groups(self, groups: int) -> None:
        for module in (self.backbone, self.projector, self.key_backbone, self.key_projector):
            set_bn_groups(module, groups)

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised keys [B, D] of ``x`` from the key encoder, computed under shuffling BN."""
        return self.shuffled_keys(x)[0]

    @torch.no_grad()
    def shuffled_keys(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(keys in the original order, the global shuffle ``perm`` or None when there is one group).

        Position p of the shuffled global batch (all devices' batches concatenated) holds image
        ``perm[p]``; device r computes the keys of positions rB .. (r+1)B − 1, each group of its
        rows (row mod groups) with its own BN statistics.
        """
        b = x.shape[0]
        g = self._local_groups()
        world, rank = dist.world_size(), dist.rank()
        if world * g == 1:
            k = self.key_projector(self.key_backbone(x))
            return F.normalize(k.float(), dim=1), None
        x_all = dist.gather_no_grad(x)
        pos = torch.arange(world * b)
        group_of = (pos // b) * g + (pos % b) % g  # device, then row mod g within the device
        perm = grouped_shuffle(group_of).to(x.device, non_blocking=True)  # global RNG: checkpointed, resume is exact
        perm = dist.broadcast(perm, 0)
        mine = perm[rank * b : (rank + 1) * b]
        k = self.key_projector(self.key_backbone(x_all.index_select(0, mine)))
        k_all = dist.gather_no_grad(F.normalize(k.float(), dim=1))  # shuffled order
        unshuffled = torch.empty_like(k_all)
        unshuffled[perm] = k_all
        return unshuffled[rank * b : (rank + 1) * b], perm

    # -- training ---------------------------------------------------------------------------
    def training_step(self, batch: Batch, step: int) -> StepOutput:
        if len(batch.views) != 2:
            raise ValueError(f"MoCo uses exactly two views per image (query, key), the recipe makes {len(batch.views)}")
        b = batch.size
        g = self._local_groups()
        if b % g != 0:
            raise ValueError(
                f"shuffling BN splits the batch into {g} groups: trainer.batch_size ({b}) must be a multiple "
                "of method.bn_groups"
            )
        self._set_groups(g)
        x1, x2 = batch.views
        # the queue as it was before this step: the keys written below must not be read back by this loss
        negatives = self.queue.data.clone()
        q1 = self.projector(self.backbone(x1))
        k2 = self.keys(x2)
        if self.cfg.symmetric:
            q2 = self.projector(self.backbone(x2))
            k1 = self.keys(x1)
            loss = 0.5 * (
                moco_infonce(q1, k2, negatives, self.cfg.temperature)
                + moco_infonce(q2, k1, negatives, self.cfg.temperature)
            )
            new_keys = torch.cat([k2, k1])
        else:
            loss = moco_infonce(q1, k2, negatives, self.cfg.temperature)
            new_keys = k2
        self.queue.enqueue(dist.gather_no_grad(new_keys))
        with torch.no_grad():
            pos_sim = (F.normalize(q1.detach().float(), dim=1) * k2).sum(1).mean()
        metrics = {"pos_sim": pos_sim, "ema_momentum": self.momentum(step)}
        return StepOutput(loss, metrics, health={"embedding": q1.detach()})

    def after_step(self, step: int) -> None:
        m = self.momentum(step)
        ema_update(self.key_backbone, self.backbone, m)
        ema_update(self.key_projector, self.projector, m)

    def _queue_warning(self) -> str:
        n = self.dataset_size
        if n is None or self.queue.length <= n:
            return ""
        return (
            f" [warning: more than the {n} training images, so keys of a query's own image are among its "
            "negatives; MoCo wants method.queue_size <= the training set]"
        )

    def schedule_summary(self) -> dict[str, str]:
        s = self.momentum
        ema = f"{s.start:g}" if s.start == s.end else f"{s.start:g} -> {s.end:g} (cosine over {s.total_steps} steps)"
        g = self._local_groups()
        return {
            "key encoder momentum": ema,
            "queue": f"{self.queue.length} keys of {self.queue.data.shape[1]}-d" + self._queue_warning(),
            "shuffling BN": (
                f"{g} groups of {self.batch_size // g} per device, {dist.world_size()} device(s)"
                if g > 1 or dist.world_size() > 1
                else "off (1 group)"
            ),
            "loss": f"InfoNCE, tau {self.cfg.temperature:g}" + (", symmetric" if self.cfg.symmetric else ""),
        }
