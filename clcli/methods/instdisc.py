"""InstDisc: non-parametric instance discrimination (Wu et al. 2018, arXiv:1805.01978).

Every training image is its own class.  The backbone and a linear layer map an image to a 128-d
L2-normalised embedding f; a memory bank (:class:`~clcli.methods.memory.MemoryBank`) holds one
embedding v_i per training image, addressed by the sample index the data stage hands out.  The
positive of an image is its own bank entry; the loss is NCE against K = 4,096 bank entries drawn
uniformly for each image, with P(i|f) = exp(v_iᵀf/τ)/Z and a normaliser Z estimated from the first
mini-batch (Monte Carlo, eq. 8) and then held fixed (:func:`~clcli.losses.instdisc_nce`).  After
the loss is computed the batch's rows of the bank move towards the new embeddings,
v_i ← normalise(m·v_i + (1 − m)·f_i) with m = 0.5 (the paper's proximal term is what this momentum
implements; the official code has no separate term).  ``loss: softmax`` uses the full
non-parametric softmax over the whole bank instead (eq. 2; the official code's ``nce_k = 0``).

``bank_init: encoded`` (not in the paper) fills the bank before the first step with the initial
network's embedding of every training image (evaluation crop), as CMC's option of the same name
(:func:`~clcli.methods.memory.fill_banks_from_encoder`): with the paper's random bank every
positive of the first epoch is a random vector, so a one-epoch run learns nothing.

One augmented view per image per step.  The bank and Z are buffers, so checkpoints save and
resume them exactly; the noise indices come from the global RNG, which checkpoints also restore.
Evaluation as in the paper: weighted kNN on the 128-d embedding (``--features embedding``) or with
the memory bank itself as the reference set (``--features bank``, :meth:`InstDisc.bank_features`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from clcli import dist
from clcli.errors import DataError, RecipeError
from clcli.losses import instdisc_nce, instdisc_nce_normaliser, instdisc_softmax
from clcli.methods.base import Batch, BuildContext, Method, StepOutput
from clcli.methods.memory import MemoryBank, fill_banks_from_encoder
from clcli.models.heads import MLP
from clcli.recipe import MethodConfig, Recipe
from clcli.recipe_checks import ExpTemperature, MemoryItems, SizeContext, mlp_params, views_problem


class InstDiscConfig(MethodConfig):
    """InstDisc's settings: embedding size, τ (0.07 ImageNet, 0.1 CIFAR), bank momentum, NCE noise count."""

    name: str = "instdisc"
    embedding_dim: int = Field(128, ge=1, description="size of the L2-normalised embedding (a linear layer)")
    temperature: ExpTemperature = Field(0.07, description="τ (at least 0.02: NCE estimates Z from exp(score / τ))")
    bank_momentum: float = Field(0.5, ge=0, lt=1, description="m in v_i <- normalise(m v_i + (1 - m) f_i)")
    loss: Literal["nce", "softmax"] = Field("nce", description="NCE with noise samples, or the full softmax")
    nce_k: int = Field(4096, ge=1, description="noise samples per image, drawn uniformly from the bank")
    nce_z: float | None = Field(
        None, gt=0, description="a fixed normaliser Z; default: estimated from the first mini-batch"
    )
    bank_init: Literal["random", "encoded"] = Field(
        "random", description="random vectors (paper), or the initial network's embeddings of every image"
    )

    def recipe_problems(self, recipe: Recipe) -> list[tuple[str, str]]:
        return views_problem(recipe, "instdisc", exactly=1)

    def memory_items(self, recipe: Recipe, sizes: SizeContext) -> MemoryItems:
        n, b, d = sizes.dataset_size or 0, sizes.batch_size, self.embedding_dim
        scores = b * min(self.nce_k * d, n) if self.loss == "nce" else b * n
        return {
            "head (method.embedding_dim)": (mlp_params([sizes.feature_dim, d]), "param"),
            "memory bank (training images x method.embedding_dim)": (n * d, "state"),
            "scores of one batch (trainer.batch_size x method.nce_k, or x training images)": (
                scores,
                "work",
            ),
        }


class InstDisc(Method):
    config_class = InstDiscConfig
    paper = "arXiv:1805.01978"
    needs_index = True
    has_bank_features = True

    def __init__(self, cfg: InstDiscConfig, ctx: BuildContext) -> None:
        super().__init__(cfg, ctx)
        self.cfg: InstDiscConfig = cfg
        views = sum(g.count for g in ctx.recipe.views.groups)
        if views != 1:
            raise RecipeError(
                f"instdisc uses one augmented view per image per step (its positive is the image's memory-bank "
                f"entry), but the recipe makes {views}; set views.groups to one group with count: 1"
            )
        if ctx.dataset_size is None:
            raise DataError(
                "instdisc keeps one memory-bank entry per training image and needs a dataset of known size "
                "with sample indices; a streaming source has neither (set data.streaming=false)"
            )
        self.backbone = ctx.build_backbone()
        self.head = MLP([self.backbone.feature_dim, cfg.embedding_dim])
        generator = torch.Generator().manual_seed(ctx.recipe.seed)
        self.bank = MemoryBank(ctx.dataset_size, cfg.embedding_dim, cfg.bank_momentum, generator=generator)
        self.register_buffer("nce_z", torch.tensor(float(cfg.nce_z or 0.0)))
        self.register_buffer("z_estimated", torch.tensor(cfg.nce_z is not None))
        self.register_buffer("bank_filled", torch.tensor(False))
        self._source = ctx.train_source  # for bank_init: encoded (None when rebuilt for evaluation)
        self._views = ctx.recipe.views
        self._bf16 = ctx.recipe.trainer.precision == "bf16"

    # -- training -------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalised 128-d embedding f (in fp32)."""
        return F.normalize(self.head(self.backbone(x)).float(), dim=1)

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        if len(batch.views) != 1:
            raise RecipeError(f"instdisc uses one view per image, the batch has {len(batch.views)}")
        index = batch.index
        n = self.bank.size
        if int(index.min()) < 0 or int(index.max()) >= n:
            raise DataError(
                f"instdisc needs each image's sample index in [0, {n}) to address its memory-bank entry; "
                "a streaming source has none (set data.streaming=false)"
            )
        f = self.embed(batch.views[0])
        positive = self.bank.get(index)
        metrics: dict[str, float | torch.Tensor] = {}
        if self.cfg.loss == "nce":
            # drawn for the global batch, this process keeping its rows: the noise of one process's run
            noise_index = dist.local_share(self.bank.sample((index.shape[0] * dist.world_size(), self.cfg.nce_k)))
            scores = torch.cat([(f * positive).sum(dim=1, keepdim=True), self._noise_scores(f, noise_index)], dim=1)
            # Z: the first mini-batch's Monte-Carlo estimate, then fixed (branch-free: no host sync)
            estimate = dist.all_reduce_mean(instdisc_nce_normaliser(scores.detach(), self.cfg.temperature, n))
            self.nce_z.copy_(torch.where(self.z_estimated, self.nce_z, estimate))
            self.z_estimated.fill_(True)
            loss = instdisc_nce(scores, self.cfg.temperature, self.nce_z, n)
            metrics["nce_z"] = self.nce_z
        else:
            # a copy of the bank: it is updated in place below, and the backward pass still needs it
            with torch.autocast(f.device.type, enabled=False):
                scores = f @ self.bank.vectors.clone().t()
            loss = instdisc_softmax(scores, index, self.cfg.temperature)
        metrics["positive_similarity"] = (f.detach() * positive).sum(dim=1).mean()
        # the loss above used the bank as it was before this step; now move the batch's rows
        self.bank.update(dist.gather_no_grad(index), dist.gather_no_grad(f.detach()))
        return StepOutput(loss, metrics, health={"embedding": f.detach()})

    def on_epoch_start(self, epoch: int, step: int) -> dict[str, float]:
        if self.cfg.bank_init != "encoded" or bool(self.bank_filled):
            return {}
        if self._source is None:
            raise DataError("bank_init: encoded needs the training images to fill the memory bank")
        filled = fill_banks_from_encoder(
            [self.bank], self._source, lambda x: [self.embed(x)], self, self._views, bf16=self._bf16
        )
        self.bank_filled.fill_(True)
        return {"bank_filled_rows": float(filled)}

    def _noise_scores(self, f: torch.Tensor, noise_index: torch.Tensor) -> torch.Tensor:
        """[B, K] inner products of each embedding with its noise entries (no gradient into the bank).

        Two equal ways: gather the B x K x D noise vectors and multiply (memory traffic ~ B·K·D), or
        multiply by the whole bank and pick the K columns (B·n·D multiply-adds, but one dense
        matrix product).  The dense one is several times faster while the bank is at most 16 x K
        entries (CIFAR: 50,000 vs 4,096); ImageNet-sized banks gather.
        """
        f = f.float()
        with torch.autocast(f.device.type, enabled=False):  # fp32 products: τ = 0.07 amplifies bf16 rounding
            if self.bank.size <= 16 * noise_index.shape[1]:
                return (f @ self.bank.vectors.clone().t()).gather(1, noise_index)
            noise = self.bank.vectors[noise_index]  # [B, K, D], a gathered copy
            return torch.bmm(noise, f.unsqueeze(2)).squeeze(2)

    def schedule_summary(self) -> dict[str, str]:
        cfg = self.cfg
        if cfg.loss == "nce":
            z = f"Z fixed at {cfg.nce_z:g}" if cfg.nce_z is not None else "Z estimated from the first mini-batch"
            loss = f"NCE, {cfg.nce_k} uniform noise samples per image, {z}, tau {cfg.temperature:g}"
        else:
            loss = f"full softmax over the bank, tau {cfg.temperature:g}"
        return {
            "memory bank": f"{self.bank.size} x {cfg.embedding_dim}, momentum {cfg.bank_momentum:g}, "
            f"init {cfg.bank_init}",
            "loss": loss,
        }

    # -- evaluation -----------------------------------------------------------------------
    def bank_features(self) -> torch.Tensor:
        """The memory bank [n, D] (fp32, CPU): one embedding per training image, row = sample index."""
        return self.bank.vectors.detach().float().cpu().clone()

    def extra_metadata(self) -> dict[str, Any]:
        return {"nce_z": float(self.nce_z)} if bool(self.z_estimated) else {}
