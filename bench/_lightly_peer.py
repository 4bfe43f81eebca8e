"""lightly's side of ``bench/speed.py --peer``: its SimCLR, MoCo v2, BYOL, SimSiam, SwAV and DINO,
built from lightly's heads, losses, transforms and helpers the way its documentation's examples and
its CIFAR-10 benchmark build them, around clcli's backbone module, so that only the method's code
differs.  lightly is a bench-only dependency (``pip install -e .[bench]``); clcli never imports it.

Each peer mirrors the clcli preset it is compared with (view sizes and counts, crop scales, colour
strengths, head widths, temperatures, queue size, EMA momentum, optimiser SGD with the preset's
momentum and weight decay); what cannot match is listed in :data:`DIFFERENCES`.  A step is what
lightly's examples do per batch: the momentum update first, forward passes and loss, backward, the
optimiser step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from clcli.models.backbones import build_backbone
from clcli.recipe import Recipe

# What differs from the clcli preset beyond the implementation itself, per method.
DIFFERENCES = {
    "simclr": "lightly's projection head ends in a BatchNorm1d (its default); clcli's MLP does not",
    "moco-v2": "shuffling BN: lightly's SplitBatchNorm (8 splits, in the backbone) with its batch_shuffle of the "
    "keys, clcli's grouped shuffle over 8 groups; symmetric loss on both",
    "byol": "",
    "simsiam": "lightly's examples pass each view separately; the clcli preset passes both views at once (joint)",
    "swav": "lightly's example passes each crop separately; clcli one pass per resolution group",
    "dino": "lightly's DINOTransform solarises the second global view only (p 0.1 here); the clcli preset both",
}


def _views(recipe: Recipe) -> list[Any]:
    return list(recipe.views.groups)


def _jitter(group: Any) -> dict[str, float]:
    """lightly's colour-jitter arguments for a clcli view group (lightly multiplies by cj_strength too)."""
    b, c, s, h = group.jitter
    return {
        "cj_prob": group.jitter_p,
        "cj_strength": group.jitter_strength,
        "cj_bright": b,
        "cj_contrast": c,
        "cj_sat": s,
        "cj_hue": h,
        "random_gray_scale": group.grayscale_p,
        "hf_prob": group.hflip_p,
    }


def transform_for(method: str, recipe: Recipe) -> Callable[[Any], list[torch.Tensor]]:
    """lightly's multi-view transform for ``method`` with the preset's view settings (PIL image -> views)."""
    from lightly import transforms as LT
    from lightly.transforms.byol_transform import BYOLView1Transform, BYOLView2Transform

    g = _views(recipe)
    first = g[0]
    common = {"gaussian_blur": first.blur_p, **_jitter(first)}
    if method == "simclr":
        return LT.SimCLRTransform(input_size=first.size, min_scale=first.crop_scale[0], **common)
    if method == "moco-v2":
        return LT.MoCoV2Transform(input_size=first.size, min_scale=first.crop_scale[0], **common)
    if method == "simsiam":
        return LT.SimSiamTransform(input_size=first.size, min_scale=first.crop_scale[0], **common)
    if method == "byol":
        second = g[1]
        return LT.BYOLTransform(
            view_1_transform=BYOLView1Transform(
                input_size=first.size,
                min_scale=first.crop_scale[0],
                solarization_prob=first.solarize_p,
                **common,
            ),
            view_2_transform=BYOLView2Transform(
                input_size=second.size,
                min_scale=second.crop_scale[0],
                solarization_prob=second.solarize_p,
                gaussian_blur=second.blur_p,
                **_jitter(second),
            ),
        )
    local = g[1]
    if method == "swav":
        return LT.SwaVTransform(
            crop_sizes=(first.size, local.size),
            crop_counts=(first.count, local.count),
            crop_min_scales=(first.crop_scale[0], local.crop_scale[0]),
            crop_max_scales=(first.crop_scale[1], local.crop_scale[1]),
            **common,
        )
    if method == "dino":
        jitter = _jitter(first)
        jitter.pop("random_gray_scale")
        return LT.DINOTransform(
            global_crop_size=first.size,
            global_crop_scale=tuple(first.crop_scale),
            local_crop_size=local.size,
            local_crop_scale=tuple(local.crop_scale),
            n_local_views=local.count,
            random_gray_scale=first.grayscale_p,
            gaussian_blur=(first.blur_p, first.blur_p, local.blur_p),
            solarization_prob=first.solarize_p,
            **jitter,
        )
    raise KeyError(f"no lightly peer for {method!r}; peers: {', '.join(sorted(DIFFERENCES))}")


class ImagesFor(Dataset):
    """(views, label) per image of a clcli image source, the image handed to ``transform`` as a PIL
    image, as lightly's datasets hand it."""

    def __init__(self, source: Any, transform: Callable[[Any], list[torch.Tensor]]) -> None:
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[list[torch.Tensor], int]:
        from torchvision.transforms.functional import to_pil_image

        return self.transform(to_pil_image(self.source.load_image(i))), self.source.label(i)


# ------------------------------------------------------------------------------------ peers
class Peer(nn.Module):
    """One method's networks, loss and optimiser; :meth:`train_step` is one step of lightly's examples."""

    def __init__(self, recipe: Recipe, total_steps: int) -> None:
        super().__init__()
        self.recipe, self.total_steps = recipe, total_steps
        self.backbone = build_backbone(recipe.model.backbone)
        self.dim = self.backbone.feature_dim
        self.optimizer: torch.optim.Optimizer | None = None
        self.clip: float | None = recipe.optim.grad_clip

    def make_optimizer(self) -> None:
        o = self.recipe.optim
        trainable = [p for p in self.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(trainable, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)

    def before_forward(self, step: int) -> None:
        """lightly's examples update momentum networks and prototypes before the forward pass."""

    def loss(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        raise NotImplementedError

    def after_backward(self, step: int) -> None:
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.parameters(), self.clip)

    def train_step(self, views: list[torch.Tensor], step: int, autocast: bool) -> torch.Tensor:
        assert self.optimizer is not None
        self.before_forward(step)
        with torch.autocast("cpu" if views[0].device.type == "cpu" else "cuda", torch.bfloat16, enabled=autocast):
            loss = self.loss(views, step)
        loss.backward()
        self.after_backward(step)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.detach()


def _frozen_copy(module: nn.Module) -> nn.Module:
    from lightly.models.utils import deactivate_requires_grad

    twin = copy.deepcopy(module)
    deactivate_requires_grad(twin)
    return twin


class SimCLRPeer(Peer):
    def __init__(self, recipe: Recipe, total_steps: int) -> None:
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        super().__init__(recipe, total_steps)
        hidden, out = recipe.method.projector  # type: ignore[attr-defined]
        self.head = SimCLRProjectionHead(self.dim, hidden, out)
        self.criterion = NTXentLoss(temperature=recipe.method.temperature)  # type: ignore[attr-defined]

    def loss(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        z0, z1 = (self.head(self.backbone(x).flatten(start_dim=1)) for x in views)
        return self.criterion(z0, z1)


def _split_bn(module: nn.Module, splits: int) -> nn.Module:
    """``module`` with every BatchNorm2d replaced by lightly's SplitBatchNorm (its CIFAR MoCo backbone's)."""
    from lightly.models.batchnorm import SplitBatchNorm

    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            new = SplitBatchNorm(child.num_features, splits)
            with torch.no_grad():
                new.weight.copy_(child.weight)
                new.bias.copy_(child.bias)
            setattr(module, name, new)
        else:
            _split_bn(child, splits)
    return module


class MoCoPeer(Peer):
    def __init__(self, recipe: Recipe, total_steps: int) -> None:
        from lightly.loss import NTXentLoss
        from lightly.models.modules import MoCoProjectionHead

        super().__init__(recipe, total_steps)
        cfg = recipe.method
        if cfg.bn_groups > 1:  # type: ignore[attr-defined]
            self.backbone = _split_bn(self.backbone, cfg.bn_groups)  # type: ignore[attr-defined]
        hidden, out = cfg.projector  # type: ignore[attr-defined]
        self.head = MoCoProjectionHead(self.dim, hidden, out)
        self.backbone_momentum = _frozen_copy(self.backbone)
        self.head_momentum = _frozen_copy(self.head)
        self.criterion = NTXentLoss(temperature=cfg.temperature, memory_bank_size=(cfg.queue_size, out))  # type: ignore[attr-defined]
        self.m = cfg.momentum  # type: ignore[attr-defined]

    def before_forward(self, step: int) -> None:
        from lightly.models.utils import update_momentum

        update_momentum(self.backbone, self.backbone_momentum, self.m)
        update_momentum(self.head, self.head_momentum, self.m)

    def _pair(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        from lightly.models.utils import batch_shuffle, batch_unshuffle

        query = self.head(self.backbone(q).flatten(start_dim=1))
        with torch.no_grad():
            k, shuffle = batch_shuffle(k)
            key = self.head_momentum(self.backbone_momentum(k).flatten(start_dim=1))
            key = batch_unshuffle(key, shuffle)
        return self.criterion(query, key)

    def loss(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        x0, x1 = views
        return 0.5 * (self._pair(x0, x1) + self._pair(x1, x0))


class BYOLPeer(Peer):
    def __init__(self, recipe: Recipe, total_steps: int) -> None:
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead

        super().__init__(recipe, total_steps)
        cfg = recipe.method
        hidden, out = cfg.projector  # type: ignore[attr-defined]
        p_hidden, p_out = cfg.predictor  # type: ignore[attr-defined]
        self.projection_head = BYOLProjectionHead(self.dim, hidden, out)
        self.prediction_head = BYOLPredictionHead(out, p_hidden, p_out)
        self.backbone_momentum = _frozen_copy(self.backbone)
        self.projection_head_momentum = _frozen_copy(self.projection_head)
        self.criterion = NegativeCosineSimilarity()
        self.m0 = cfg.momentum  # type: ignore[attr-defined]
        self.m1 = cfg.momentum_end if cfg.momentum_end is not None else cfg.momentum  # type: ignore[attr-defined]

    def before_forward(self, step: int) -> None:
        from lightly.models.utils import update_momentum
        from lightly.utils.scheduler import cosine_schedule

        m = cosine_schedule(step, self.total_steps, self.m0, self.m1)
        update_momentum(self.backbone, self.backbone_momentum, m)
        update_momentum(self.projection_head, self.projection_head_momentum, m)

    def _online(self, x: torch.Tensor) -> torch.Tensor:
        return self.prediction_head(self.projection_head(self.backbone(x).flatten(start_dim=1)))

    def _target(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1))

    def loss(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        x0, x1 = views
        p0, z0, p1, z1 = self._online(x0), self._target(x0), self._online(x1), self._target(x1)
        return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))


class SimSiamPeer(Peer):
    def __init__(self, recipe: Recipe, total_steps: int) -> None:
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import SimSiamPredictionHead
        from lightly.models.modules.heads import ProjectionHead

        super().__init__(recipe, total_steps)
        cfg = recipe.method
        hidden, out = cfg.projector  # type: ignore[attr-defined]
        p_hidden, p_out = cfg.predictor  # type: ignore[attr-defined]
        # lightly's CIFAR-10 benchmark: a two-layer projection head (the paper's CIFAR setting)
        self.projection_head = ProjectionHead(
            [
                (self.dim, hidden, nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)),
                (hidden, out, nn.BatchNorm1d(out), None),
            ]
        )
        self.prediction_head = SimSiamPredictionHead(out, p_hidden, p_out)
        self.criterion = NegativeCosineSimilarity()

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.projection_head(self.backbone(x).flatten(start_dim=1))
        return z.detach(), self.prediction_head(z)

    def loss(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        (z0, p0), (z1, p1) = (self._forward(x) for x in views)
        return 0.5 * (self.criterion(z0, p1) + self.criterion(z1, p0))


class SwAVPeer(Peer):
    def __init__(self, recipe: Recipe, total_steps: int) -> None:
        from lightly.loss import SwaVLoss
        from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes

        super().__init__(recipe, total_steps)
        cfg = recipe.method
        hidden, out = cfg.projector  # type: ignore[attr-defined]
        self.projection_head = SwaVProjectionHead(self.dim, hidden, out)
        # the preset keeps the prototypes fixed through the first epoch, which every step here is in
        self.prototypes = SwaVPrototypes(out, cfg.num_prototypes, n_steps_frozen_prototypes=total_steps + 1)  # type: ignore[attr-defined]
        self.criterion = SwaVLoss(
            temperature=cfg.temperature,  # type: ignore[attr-defined]
            sinkhorn_iterations=cfg.sinkhorn_iterations,  # type: ignore[attr-defined]
            sinkhorn_epsilon=cfg.epsilon,  # type: ignore[attr-defined]
        )
        self.n_high = recipe.views.groups[0].count

    def before_forward(self, step: int) -> None:
        self.prototypes.normalize()

    def _forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        z = F.normalize(self.projection_head(self.backbone(x).flatten(start_dim=1)), dim=1, p=2)
        return self.prototypes(z, step)

    def loss(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        out = [self._forward(x, step) for x in views]
        return self.criterion(out[: self.n_high], out[self.n_high :])


class DINOPeer(Peer):
    def __init__(self, recipe: Recipe, total_steps: int) -> None:
        from lightly.loss import DINOLoss
        from lightly.models.modules import DINOProjectionHead

        super().__init__(recipe, total_steps)
        cfg = recipe.method

        def head() -> nn.Module:
            return DINOProjectionHead(
                self.dim,
                cfg.head_hidden,  # type: ignore[attr-defined]
                cfg.head_bottleneck,  # type: ignore[attr-defined]
                cfg.out_dim,  # type: ignore[attr-defined]
                batch_norm=cfg.head_norm == "bn",  # type: ignore[attr-defined]
                freeze_last_layer=1,
            )

        self.student_head = head()
        self.teacher_backbone = _frozen_copy(self.backbone)
        # a head of its own, as lightly's DINO example builds it (a weight-normed layer cannot be deep-copied)
        self.teacher_head = head()
        for p in self.teacher_head.parameters():
            p.requires_grad_(False)
        self.criterion = DINOLoss(
            output_dim=cfg.out_dim,  # type: ignore[attr-defined]
            warmup_teacher_temp=cfg.warmup_teacher_temperature,  # type: ignore[attr-defined]
            teacher_temp=cfg.teacher_temperature,  # type: ignore[attr-defined]
            warmup_teacher_temp_epochs=int(cfg.warmup_teacher_temperature_epochs),  # type: ignore[attr-defined]
            student_temp=cfg.student_temperature,  # type: ignore[attr-defined]
            center_momentum=cfg.center_momentum,  # type: ignore[attr-defined]
        )
        self.m0, self.m1 = cfg.momentum_start, cfg.momentum_end  # type: ignore[attr-defined]
        self.n_global = recipe.views.groups[0].count

    def before_forward(self, step: int) -> None:
        from lightly.models.utils import update_momentum
        from lightly.utils.scheduler import cosine_schedule

        m = cosine_schedule(step, self.total_steps, self.m0, self.m1)
        update_momentum(self.backbone, self.teacher_backbone, m)
        update_momentum(self.student_head, self.teacher_head, m)

    def loss(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        with torch.no_grad():
            teacher = [self.teacher_head(self.teacher_backbone(x).flatten(start_dim=1)) for x in views[: self.n_global]]
        student = [self.student_head(self.backbone(x).flatten(start_dim=1)) for x in views]
        return self.criterion(teacher, student, epoch=0)

    def after_backward(self, step: int) -> None:
        super().after_backward(step)
        self.student_head.cancel_last_layer_gradients(current_epoch=0)


PEERS: dict[str, type[Peer]] = {
    "simclr": SimCLRPeer,
    "moco-v2": MoCoPeer,
    "byol": BYOLPeer,
    "simsiam": SimSiamPeer,
    "swav": SwAVPeer,
    "dino": DINOPeer,
}


def build_peer(method: str, recipe: Recipe, total_steps: int) -> Peer:
    """lightly's ``method`` mirroring the clcli preset ``recipe``, with its optimiser."""
    if method not in PEERS:
        raise KeyError(f"no lightly peer for {method!r}; peers: {', '.join(PEERS)}")
    peer = PEERS[method](recipe, total_steps)
    peer.make_optimizer()
    return peer
