"""CMC: contrastive multiview coding (Tian et al. 2019, arXiv:1906.05849).

The views of an image are channel splits of its CIE L*a*b* colour space (the luminance L and the
chrominance ab by default; :mod:`clcli.views.color` converts sRGB exactly, D65 white).  The data
stage hands the method the augmented image as RGB in [0, 1] (the recipe sets ``views.mean`` to
0 and ``views.std`` to 1); the method converts it to Lab, maps each channel's range to [−1, 1] as
CMC's released code does, and splits the channels into the views.  Each view has its own encoder
(a ResNet at ``width_factor`` of the recipe backbone's width, half by default, as the paper's
per-view encoders) followed by a linear layer to a 128-d L2-normalised embedding.

Every view has a memory bank (:class:`~clcli.methods.memory.MemoryBank`, InstDisc's) with one
embedding per training image.  For an ordered pair of views (i, j) the anchor is view i's
embedding v^i of an image and the candidates come from view j's bank: the positive is that bank's
entry for the same image, the K = 4,096 negatives are entries drawn uniformly from it (one draw per
image, shared by all banks, as the released code does), τ = 0.07.  The two-view loss is symmetric,
L(V1, V2) = L^{V1→V2} + L^{V2→V1}; with more views it is the full graph, the sum over all ordered
pairs (eq. 6).  Each term is either NCE with a normaliser Z estimated once from the first batch
and then held fixed (InstDisc's estimator and loss, which CMC adopts: :func:`~clcli.losses.instdisc_nce`)
or the softmax cross-entropy over the 1 + K candidates (:func:`~clcli.losses.cmc_softmax`).
After the loss, each bank's rows of the batch move towards the new embeddings with momentum 0.5.

``bank_init: encoded`` (not in the paper) fills the banks, before the first step, with the
initial encoders' embeddings of every training image (the evaluation crop, no augmentation)
instead of random vectors.  With the paper's random initialisation every positive of the first
epoch is a random vector (an image's entry is written only after its first visit), so a one-epoch
budget learns nothing; filled banks give the first epoch real, equally old positives and
negatives.  (Writing an entry from the current batch just before its first use instead makes the
positives fresher than the negatives, a gap the encoders learn to exploit by drifting.)

Representation for evaluation: the views' encoder outputs (before the linear layer),
concatenated; :class:`LabViewsEncoder` (the method's ``backbone``) takes RGB in [0, 1], so
``clcli eval`` and ``clcli export`` use it like any backbone.
"""

from __future__ import annotations

import itertools
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from clcli import dist
from clcli.errors import DataError, RecipeError
from clcli.losses import cmc_softmax, instdisc_nce, instdisc_nce_normaliser
from clcli.methods.base import Batch, BuildContext, Method, StepOutput, rebuild_from_recipe
from clcli.methods.memory import MemoryBank, fill_banks_from_encoder
from clcli.models.backbones import ConvNet
from clcli.models.heads import MLP
from clcli.models.resnet_variants import DEPTHS, resnet_encoder
from clcli.recipe import BackboneConfig, MethodConfig, Recipe
from clcli.recipe_checks import ExpTemperature, MemoryItems, SizeContext, views_problem
from clcli.views.color import normalize_lab, rgb_to_lab

_CHANNELS = {"L": 0, "a": 1, "b": 2}


class CMCConfig(MethodConfig):
    """CMC's settings: the Lab channel split, per-view encoder width, embedding, bank and loss."""

    name: str = "cmc"
    own_backbone: ClassVar[bool] = True
    views: list[str] = Field(
        default_factory=lambda: ["L", "ab"],
        min_length=2,
        max_length=3,
        description="Lab channels of each view, e.g. [L, ab] or [L, a, b] (full graph over all pairs)",
    )
    width_factor: float = Field(0.5, gt=0, le=64, description="each view's encoder width relative to model.backbone")
    embedding_dim: int = Field(128, ge=1, description="L2-normalised embedding (a linear layer per view)")
    temperature: ExpTemperature = Field(0.07, description="τ (at least 0.02: NCE estimates Z from exp(score / τ))")
    bank_momentum: float = Field(0.5, ge=0, lt=1, description="m in v_i <- normalise(m v_i + (1 - m) f_i)")
    nce_k: int = Field(4096, ge=1, description="negatives per anchor, drawn uniformly from the other view's bank")
    loss: Literal["nce", "softmax"] = Field("nce", description="NCE with a fixed Z, or softmax cross-entropy")
    nce_z: float | None = Field(None, gt=0, description="a fixed NCE normaliser Z; default: from the first batch")
    bank_init: Literal["random", "encoded"] = Field(
        "random", description="random vectors (paper), or the initial encoders' embeddings of every image"
    )

    @field_validator("views")
    @classmethod
    def _channel_split(cls, v: list[str]) -> list[str]:
        used: list[str] = []
        for view in v:
            if not view or any(ch not in _CHANNELS for ch in view):
                raise ValueError(f"each view is a non-empty string of the Lab channels L, a, b; got {view!r}")
            used += list(view)
        if len(set(used)) != len(used):
            raise ValueError(f"views must not share channels, got {v}")
        return v

    def recipe_problems(self, recipe: Recipe) -> list[tuple[str, str]]:
        out = views_problem(
            recipe, "cmc", exactly=1, why="cmc splits one augmented image into its Lab views: make one view per image"
        )
        v, backbone = recipe.views, recipe.model.backbone
        if tuple(v.mean) != (0.0, 0.0, 0.0) or tuple(v.std) != (1.0, 1.0, 1.0):
            out.append(
                ("views.mean", "cmc normalises Lab itself: set views.mean to [0, 0, 0] and views.std to [1, 1, 1]")
            )
        if backbone.in_channels != 3:
            out.append(("model.backbone.in_channels", f"cmc reads RGB images: must be 3, got {backbone.in_channels}"))
        depth = backbone.name.removeprefix("resnet")
        resnet = backbone.name.startswith("resnet") and depth.isdigit() and int(depth) in DEPTHS
        if backbone.name != "convnet" and not resnet:
            out.append(
                (
                    "model.backbone.name",
                    f"cmc builds its view encoders from a ResNet or the convnet, not {backbone.name!r}",
                )
            )
        return out

    def backbone_channels(self, data_channels: int) -> int | None:
        return None  # each view's encoder takes its Lab channels; in_channels is checked above

    def memory_items(self, recipe: Recipe, sizes: SizeContext) -> MemoryItems:
        n, b, d, v = sizes.dataset_size or 0, sizes.batch_size, self.embedding_dim, len(self.views)
        return {
            "memory banks (views x training images x method.embedding_dim)": (v * n * d, "state"),
            "negatives of one batch (views x trainer.batch_size x method.nce_k x embedding_dim)": (
                v * b * self.nce_k * d,
                "work",
            ),
        }


# ------------------------------------------------------------------------------ encoders
def view_encoder(backbone: BackboneConfig, in_channels: int, width_factor: float) -> nn.Module:
    """One view's encoder: the recipe's ResNet (any depth) or ConvNet at ``width_factor`` of its width."""
    name = backbone.name
    depth = name.removeprefix("resnet")
    if name.startswith("resnet") and depth.isdigit() and int(depth) in DEPTHS:
        return resnet_encoder(
            int(depth),
            width=max(1, round(64 * width_factor)),
            in_channels=in_channels,
            cifar_stem=backbone.cifar_stem,
            init=backbone.init,
        )
    if name == "convnet":
        return ConvNet(width=max(1, round(backbone.width * width_factor)), in_channels=in_channels)
    raise RecipeError(
        f"cmc builds one encoder per view from a ResNet or the convnet; model.backbone.name {name!r} is not one"
    )


class LabViewsEncoder(nn.Module):
    """RGB in [0, 1] [B, 3, H, W] -> Lab -> channel views -> each view's encoder -> concatenated features."""

    def __init__(self, encoders: list[nn.Module], views: list[str]) -> None:
        super().__init__()
        self.views = list(views)
        self.channels = [[_CHANNELS[c] for c in view] for view in views]
        self.encoders = nn.ModuleList(encoders)
        self.dims = [int(e.feature_dim) for e in encoders]  # type: ignore[arg-type]
        self.feature_dim = sum(self.dims)

    def split(self, rgb: torch.Tensor) -> list[torch.Tensor]:
        """The normalised Lab channels of each view (float32, computed outside autocast)."""
        lab = normalize_lab(rgb_to_lab(rgb))
        return [lab[:, ch] for ch in self.channels]

    def view_features(self, rgb: torch.Tensor) -> list[torch.Tensor]:
        return [enc(x) for enc, x in zip(self.encoders, self.split(rgb), strict=True)]

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.view_features(rgb), dim=1)


def build_views_encoder(recipe: Recipe) -> LabViewsEncoder:
    cfg = recipe.method
    assert isinstance(cfg, CMCConfig)
    encoders = [view_encoder(recipe.model.backbone, len(v), cfg.width_factor) for v in cfg.views]
    return LabViewsEncoder(encoders, cfg.views)


# ------------------------------------------------------------------------------------ method
class CMC(Method):
    config_class = CMCConfig
    paper = "arXiv:1906.05849"
    needs_index = True

    def __init__(self, cfg: CMCConfig, ctx: BuildContext) -> None:
        super().__init__(cfg, ctx)
        self.cfg: CMCConfig = cfg
        v = ctx.recipe.views
        if sum(g.count for g in v.groups) != 1:
            raise RecipeError(
                "cmc splits one augmented image into its Lab channel views: views.groups must make one view per image"
            )
        if tuple(v.mean) != (0.0, 0.0, 0.0) or tuple(v.std) != (1.0, 1.0, 1.0):
            raise RecipeError(
                "cmc converts RGB to Lab and normalises it itself: "
                "set views.mean to [0, 0, 0] and views.std to [1, 1, 1]"
            )
        if ctx.recipe.model.backbone.in_channels != 3:
            raise RecipeError("cmc reads RGB images: model.backbone.in_channels must be 3")
        if ctx.dataset_size is None:
            raise DataError(
                "cmc keeps one memory-bank entry per training image and needs a dataset of known size with "
                "sample indices; a streaming source has neither (set data.streaming=false)"
            )
        self.backbone = build_views_encoder(ctx.recipe)
        self._views = v
        self._bf16 = ctx.recipe.trainer.precision == "bf16"
        self.heads = nn.ModuleList(MLP([d, cfg.embedding_dim]) for d in self.backbone.dims)
        n_views = len(cfg.views)
        self.banks = nn.ModuleList(
            MemoryBank(
                ctx.dataset_size,
                cfg.embedding_dim,
                cfg.bank_momentum,
                generator=torch.Generator().manual_seed((ctx.recipe.seed * 1009 + v) % 2**63),  # any recipe seed
            )
            for v in range(n_views)
        )
        self.pairs = [(i, j) for i, j in itertools.permutations(range(n_views), 2)]
        # Z per ordered pair (anchor view i, bank of view j), estimated once from the first batch
        self.register_buffer("nce_z", torch.full((n_views, n_views), float(cfg.nce_z or 0.0)))
        self.register_buffer("z_estimated", torch.tensor(cfg.nce_z is not None))
        self.register_buffer("banks_filled", torch.tensor(False))
        self._source = ctx.train_source  # for bank_init: encoded (None when rebuilt for evaluation)

    # -- training -------------------------------------------------------------------------
    def view_embeddings(self, rgb: torch.Tensor) -> list[torch.Tensor]:
        """Each view's L2-normalised embedding [B, embedding_dim] (fp32)."""
        feats = self.backbone.view_features(rgb)
        return [F.normalize(h(f).float(), dim=1) for h, f in zip(self.heads, feats, strict=True)]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.view_embeddings(x), dim=1)

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        if len(batch.views) != 1 or batch.views[0].dim() != 4 or batch.views[0].shape[1] != 3:
            shapes = [tuple(v.shape) for v in batch.views]
            raise RecipeError(f"cmc expects one RGB view [B, 3, H, W] per image, got {shapes}")
        index = batch.index
        n = self.banks[0].size
        if int(index.min()) < 0 or int(index.max()) >= n:
            raise DataError(
                f"cmc needs each image's sample index in [0, {n}) to address its memory-bank entries; "
                "a streaming source has none (set data.streaming=false)"
            )
        cfg = self.cfg
        emb = self.view_embeddings(batch.views[0])
        all_index = dist.gather_no_grad(index)
        all_emb = [dist.gather_no_grad(e.detach()) for e in emb]
        # one draw for the global batch (this process keeps its rows), used for every bank
        noise_index = dist.local_share(self.banks[0].sample((index.shape[0] * dist.world_size(), cfg.nce_k)))
        positives = [bank.get(index) for bank in self.banks]
        negatives = [bank.vectors[noise_index] for bank in self.banks]  # [B, K, D] gathered copies
        loss = torch.zeros((), device=index.device)
        metrics: dict[str, float | torch.Tensor] = {}
        for i, j in self.pairs:
            anchor = emb[i]
            pos = (anchor * positives[j]).sum(dim=1, keepdim=True)
            neg = torch.bmm(negatives[j], anchor.unsqueeze(2)).squeeze(2)
            scores = torch.cat([pos, neg], dim=1)  # [B, 1 + K]
            if cfg.loss == "nce":
                estimate = dist.all_reduce_mean(instdisc_nce_normaliser(scores.detach(), cfg.temperature, n))
                self.nce_z[i, j] = torch.where(self.z_estimated, self.nce_z[i, j], estimate)
                loss = loss + instdisc_nce(scores, cfg.temperature, self.nce_z[i, j].clone(), n)
            else:
                loss = loss + cmc_softmax(scores, cfg.temperature)
            metrics[f"pos_sim_{cfg.views[i]}_{cfg.views[j]}"] = pos.detach().mean()
        if cfg.loss == "nce":
            self.z_estimated.fill_(True)
        # the loss used the banks as they were; now move the batch's rows towards the new embeddings
        for bank, e in zip(self.banks, all_emb, strict=True):
            bank.update(all_index, e)
        return StepOutput(loss, metrics, health={"embedding": emb[0].detach()})

    def on_epoch_start(self, epoch: int, step: int) -> dict[str, float]:
        if self.cfg.bank_init != "encoded" or bool(self.banks_filled):
            return {}
        if self._source is None:
            raise DataError("bank_init: encoded needs the training images to fill the memory banks")
        filled = self.fill_banks(self._source)
        self.banks_filled.fill_(True)
        return {"banks_filled_rows": float(filled)}

    def fill_banks(self, source: Any, batch_size: int = 256) -> int:
        """Every bank row := the current encoders' embedding of that image (:func:`fill_banks_from_encoder`)."""
        return fill_banks_from_encoder(
            list(self.banks),  # type: ignore[arg-type]
            source,
            self.view_embeddings,
            self,
            self._views,  # mean 0, std 1: RGB in [0, 1], as the method converts to Lab itself
            bf16=self._bf16,
            batch_size=batch_size,
        )

    def schedule_summary(self) -> dict[str, str]:
        cfg = self.cfg
        if cfg.loss == "nce":
            z = f"Z fixed at {cfg.nce_z:g}" if cfg.nce_z is not None else "Z per pair estimated from the first batch"
            loss = f"NCE, {z}"
        else:
            loss = "softmax cross-entropy"
        return {
            "views": f"Lab channels {' | '.join(cfg.views)}; encoder features {self.backbone.dims} "
            f"(width x{cfg.width_factor:g})",
            "contrast": f"{len(self.pairs)} ordered view pairs, anchor vs the other view's bank, {cfg.nce_k} "
            f"negatives, tau {cfg.temperature:g}, {loss}",
            "memory banks": f"{len(self.banks)} x {self.banks[0].size} x {cfg.embedding_dim}, momentum "
            f"{cfg.bank_momentum:g}, init {cfg.bank_init}",
        }

    # -- export -----------------------------------------------------------------------------
    def extra_metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "composite": True,
            "encoder": "cmc: sRGB [0, 1] -> Lab -> one encoder per channel view -> concatenated features",
            "views": list(self.cfg.views),
            "view_dims": list(self.backbone.dims),
        }
        if bool(self.z_estimated):
            meta["nce_z"] = self.nce_z.tolist()
        return meta

    @classmethod
    def rebuild_encoder(cls, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> nn.Module:
        """The exported :class:`LabViewsEncoder` from its tensors and the recipe in the metadata."""
        return rebuild_from_recipe(tensors, meta, build_views_encoder, "the CMC view encoders")
