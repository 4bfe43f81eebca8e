"""DeepCluster: deep clustering for unsupervised learning of visual features (Caron et al. 2018, arXiv:1807.05520).

At the start of every epoch the network's features of the whole training set, from centre-cropped
images without augmentation, are reduced by PCA (256-d), whitened and L2-normalised, and grouped
by k-means; each image's cluster becomes its pseudo-label.  The epoch then trains the network and
a freshly initialised linear classifier on those labels with cross-entropy, on augmented images
(random resized crop and flip), sampling images uniformly over the clusters so that a few big
clusters cannot dominate.  Empty clusters are re-seeded from non-empty ones during k-means
(:mod:`clcli.methods.clustering`).  The input first goes through a fixed Sobel filter (grayscale,
then horizontal and vertical Sobel kernels: 2 channels), which removes colour, an easy cue for
k-means; the backbone is therefore built with ``model.backbone.in_channels: 2``.

State and restarts.  The pseudo-labels (``assignments``, one per training image, -1 for an
unreadable image) are a buffer, so a checkpoint restores them; the epoch's sample order is drawn
from them and the trainer's per-epoch generator (:meth:`DeepCluster.epoch_order`), so resuming in
the middle of an epoch replays the same order.  The clustering's own random choices come from a
generator seeded by the recipe's seed and the epoch, so re-clustering at a resumed epoch start
gives the same labels on the same device.

The classifier and its optimiser state.  The classifier's parameters are re-initialised in place
(weights N(0, 0.01²), bias 0, as in the official code) at every epoch start, so the one optimiser
the trainer built keeps pointing at them.  The official code builds a new optimiser for this
layer every epoch; to match it, the optimiser state of exactly these parameters (SGD momentum,
Adam moments, LARS momentum) is dropped right before the first optimiser step of the epoch, by a
one-shot optimiser step pre-hook (``torch.optim.optimizer.register_optimizer_step_pre_hook``) that
removes itself once it has run.  Without it the previous epoch's momentum — for clusters that no
longer exist — would keep pushing the fresh weights for a few dozen steps.  The rest of the
network keeps its momentum, as in the official code.

Deviations from the paper, both switchable: k-means starts from k-means++ seeding
(``kmeans_init: random`` gives faiss's random points, which the paper used; random starts often
merge two true clusters and split another), and the backbone is whatever the recipe names (the
paper used AlexNet and VGG-16, whose fc6/fc7 layers ``head`` can stand in for).

The number of clusters is ``method.num_clusters`` when set, else ``clusters_per_class`` (10) times
the number of classes when the training data is labelled, else ``default_clusters``.  When a
trained run is rebuilt for evaluation (no training source, class count unknown) the classifier is
re-sized to the checkpoint's when the weights are loaded.
"""

from __future__ import annotations

import sys
import time
import weakref
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from rich.console import Console
from rich.file_proxy import FileProxy
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from clcli import dist
from clcli.data.sources import window_source
from clcli.errors import RecipeError, TrainingError
from clcli.losses import deepcluster_loss
from clcli.methods.base import Batch, BuildContext, Method, StepOutput
from clcli.methods.clustering import kmeans, l2_normalize, normalized_mutual_info, pca_whitening
from clcli.models.heads import MLP
from clcli.recipe import MethodConfig
from clcli.views.plain import encode_split


class DeepClusterConfig(MethodConfig):
    """DeepCluster's settings (the paper's values as defaults)."""

    name: str = "deepcluster"
    num_clusters: int | None = Field(
        None, ge=2, description="k; default: clusters_per_class x classes when labelled, else default_clusters"
    )
    clusters_per_class: int = Field(10, ge=1)
    default_clusters: int = Field(10000, ge=2, description="k for unlabelled data when num_clusters is not set")
    pca_dim: int = Field(256, ge=1, description="PCA dimensions before whitening (capped at the feature size)")
    whiten_eps: float = Field(1e-5, gt=0, description="added to the eigenvalues before whitening")
    kmeans_iters: int = Field(20, ge=1)
    kmeans_init: Literal["kmeans++", "random"] = Field(
        "kmeans++", description="starting centroids: k-means++ seeding, or random points as faiss (the paper's)"
    )
    kmeans_chunk: int = Field(65536, ge=1, description="points per chunk of the k-means distance computation")
    reseed_perturbation: float = Field(
        1.0 / 1024, gt=0, description="relative size of an empty cluster's re-seed offset"
    )
    head: list[int] = Field(
        default_factory=list, description="MLP dims between backbone and classifier (AlexNet's fc6/fc7); [] for none"
    )
    head_norm: str = Field("bn", pattern="^(bn|ln|none)$")
    sobel: bool = Field(True, description="fixed Sobel filter on the input (backbone in_channels must be 2)")
    classifier_init_std: float = Field(0.01, gt=0)
    uniform_sampling: bool = Field(True, description="sample images uniformly over clusters (else a plain shuffle)")
    cluster_batch_size: int | None = Field(None, ge=1, description="feature-extraction batch (default eval.batch_size)")


class SobelFilter(nn.Module):
    """Fixed input filter of DeepCluster's official code: channel mean, then Sobel x and y (3 → 2 channels)."""

    def __init__(self) -> None:
        super().__init__()
        sx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
        self.register_buffer("gray", torch.full((1, 3, 1, 1), 1.0 / 3.0), persistent=False)
        self.register_buffer("kernels", torch.stack([sx, sx.t()]).unsqueeze(1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = F.conv2d(x, self.gray.to(x.dtype))
        return F.conv2d(g, self.kernels.to(x.dtype), padding=1)


def _seed(seed: int, epoch: int, salt: int) -> int:
    """A well-mixed 63-bit seed for one use (``salt``) at one epoch (splitmix64)."""
    z = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + salt * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


def uniform_cluster_order(assignments: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
    """One epoch of sample indices drawn uniformly over the non-empty clusters.

    As DeepCluster's sampler: with N images in c non-empty clusters, each cluster contributes
    ⌊N/c⌋ + 1 images (without replacement when it has that many, else with replacement); the
    concatenation is shuffled and cut to N, so an epoch keeps its length.  Images labelled -1 (not
    readable when clustering) are never drawn.  Depends only on ``assignments`` and ``generator``.
    """
    a = assignments.detach().to("cpu", torch.long)
    valid = (a >= 0).nonzero().flatten()
    if valid.numel() == 0:
        return None
    labels = a[valid]
    order = torch.argsort(labels, stable=True)
    sorted_idx = valid[order]
    clusters, counts = torch.unique_consecutive(labels[order], return_counts=True)
    n = int(a.numel())
    per = n // len(clusters) + 1
    picks: list[torch.Tensor] = []
    start = 0
    for count in counts.tolist():
        members = sorted_idx[start : start + count]
        start += count
        if count >= per:
            picks.append(members[torch.randperm(count, generator=generator)[:per]])
        else:
            picks.append(members[torch.randint(count, (per,), generator=generator)])
    out = torch.cat(picks)
    out = out[torch.randperm(len(out), generator=generator)]
    return out[:n]


class DeepCluster(Method):
    config_class = DeepClusterConfig
    needs_index = True  # the pseudo-labels are addressed by sample index
    paper = "arXiv:1807.05520"

    def __init__(self, cfg: DeepClusterConfig, ctx: BuildContext) -> None:
        super().__init__(cfg, ctx)
        self.cfg: DeepClusterConfig = cfg
        channels = ctx.recipe.model.backbone.in_channels
        if cfg.sobel and channels != 2:
            raise RecipeError(
                "deepcluster: method.sobel is on, so the backbone sees 2 channels (Sobel x and y of the grayscale "
                f"image), but model.backbone.in_channels is {channels}; set model.backbone.in_channels=2 "
                "(or method.sobel=false)"
            )
        if not cfg.sobel and channels != 3:
            raise RecipeError(
                f"deepcluster: method.sobel is off, so the backbone sees RGB images, but model.backbone.in_channels is "
                f"{channels}; set model.backbone.in_channels=3"
            )
        self.backbone = ctx.build_backbone()
        self.sobel = SobelFilter() if cfg.sobel else None
        dim = self.backbone.feature_dim
        self.head: nn.Module = MLP([dim, *cfg.head], norm=cfg.head_norm) if cfg.head else nn.Identity()  # type: ignore[arg-type]
        self.feature_dim = cfg.head[-1] if cfg.head else dim
        if cfg.num_clusters is not None:
            k = cfg.num_clusters
        elif ctx.num_classes:
            k = cfg.clusters_per_class * ctx.num_classes
        else:
            k = cfg.default_clusters
        if ctx.train_source is not None and ctx.dataset_size is not None and k > ctx.dataset_size:
            raise RecipeError(
                f"deepcluster: k-means into {k} clusters needs at least {k} training images, the data has "
                f"{ctx.dataset_size}; set method.num_clusters lower"
            )
        self.classifier = nn.Linear(self.feature_dim, k)
        self.register_buffer("assignments", torch.full((ctx.dataset_size or 0,), -1, dtype=torch.long))
        self.register_buffer("clustered_epoch", torch.tensor(-1, dtype=torch.long))
        self._source = ctx.train_source
        self._recipe = ctx.recipe
        self._hook: Any = None
        self._has_labels = False  # mirrors clustered_epoch >= 0 without a device sync per step
        self.reinit_classifier(torch.Generator().manual_seed(_seed(ctx.recipe.seed, -1, 2)))

    @property
    def num_clusters(self) -> int:
        return int(self.classifier.out_features)

    # ------------------------------------------------------------------------------ networks
    def _filter(self, x: torch.Tensor) -> torch.Tensor:
        if self.sobel is not None and x.shape[1] == 3:
            return self.sobel(x)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features of RGB images (Sobel-filtered first); 2-channel input is taken as already filtered."""
        return self.backbone(self._filter(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The features k-means clusters: the head's output (the backbone's when there is no head)."""
        return self.head(self.features(x))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(self.features(x))
        if self.cfg.head:
            h = F.relu(h)
        return self.classifier(h)

    @torch.no_grad()
    def reinit_classifier(self, generator: torch.Generator) -> None:
        """Fresh classifier weights in place: N(0, std²) weights and zero bias (the official initialisation)."""
        w = torch.randn(self.classifier.weight.shape, generator=generator) * self.cfg.classifier_init_std
        self.classifier.weight.copy_(w)
        self.classifier.bias.zero_()

    def _schedule_optimizer_reset(self) -> None:
        """Drop the classifier's optimiser state right before the next optimiser step (once)."""
        if self._hook is not None:
            self._hook.remove()
        ids = {id(p) for p in self.classifier.parameters()}
        me = weakref.ref(self)
        handle: Any = None

        def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            method = me()
            if method is None:
                handle.remove()
                return
            owned = [p for g in optimizer.param_groups for p in g["params"] if id(p) in ids]
            if not owned:
                return
            for p in owned:
                optimizer.state.pop(p, None)
            handle.remove()
            method._hook = None

        handle = register_optimizer_step_pre_hook(hook)
        self._hook = handle

    # ------------------------------------------------------------------------------ clustering
    @torch.no_grad()
    def _extract(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (on ``device``) of every readable training image and their indices."""
        # Under the trainer's live progress bar, stderr is rich's proxy that prints lines above the
        # bar: a second live bar would fight it for the same line, so print one line there instead.
        under_live = isinstance(sys.stderr, FileProxy)
        if under_live:
            print(f"deepcluster: computing features of {len(self._source)} images for k-means", file=sys.stderr)
        console = Console(stderr=True)
        # under torchrun each process encodes its contiguous share and the shares are gathered in
        # order, so every process clusters the same features a single process would
        n, world, rank = len(self._source), dist.world_size(), dist.rank()
        start, stop, share = rank * n // world, (rank + 1) * n // world, -(-n // world)
        feats, kept = encode_split(
            self,
            self.embed,
            window_source(self._source, start, stop),
            self._recipe,
            device=device,
            out_device=device,
            batch_size=self.cfg.cluster_batch_size,
            show_progress=not under_live and console.is_terminal and dist.is_main(),
            console=console,
            description="clustering features",
        )
        kept = kept.to(device) + start
        if world > 1:
            pad = share - feats.shape[0]  # the last share may be shorter; padded rows carry index -1
            feats = dist.gather_no_grad(F.pad(feats, (0, 0, 0, pad)))
            kept = dist.gather_no_grad(F.pad(kept, (0, pad), value=-1))
            feats, kept = feats[kept >= 0], kept[kept >= 0]
        return feats, kept

    @torch.no_grad()
    def cluster(self, epoch: int) -> dict[str, float]:
        """Features → PCA-whitening → L2 norm → k-means; stores the pseudo-labels.  Returns metrics."""
        if self._source is None:
            raise TrainingError(
                "DeepCluster re-clusters the whole training set at every epoch start and needs an indexed training "
                "source; this method was built without one (a streaming source, or a run rebuilt for evaluation)"
            )
        device = self.assignments.device
        start = time.perf_counter()
        feats, kept = self._extract(device)
        n = len(self._source)
        k = self.num_clusters
        if feats.shape[0] < k:
            raise TrainingError(
                f"deepcluster: only {feats.shape[0]} readable images for k-means into {k} clusters; "
                "set method.num_clusters lower"
            )
        pca = pca_whitening(feats, self.cfg.pca_dim, self.cfg.whiten_eps, self.cfg.kmeans_chunk)
        x = l2_normalize(pca(feats, self.cfg.kmeans_chunk), self.cfg.kmeans_chunk)
        del feats
        gen = torch.Generator().manual_seed(_seed(self._recipe.seed, epoch, 1))
        result = kmeans(
            x,
            k,
            iters=self.cfg.kmeans_iters,
            generator=gen,
            init=self.cfg.kmeans_init,
            chunk_size=self.cfg.kmeans_chunk,
            perturbation=self.cfg.reseed_perturbation,
        )
        new = torch.full((n,), -1, dtype=torch.long, device=device)
        new[kept] = result.assignments
        metrics: dict[str, float] = {
            "kmeans_loss": result.loss,
            "kmeans_reseeded": float(result.reseeded),
            "clusters_empty": float(result.empty),
            "pca_dim": float(pca.dim),
        }
        old = self.assignments
        if int(self.clustered_epoch) >= 0 and old.shape == new.shape:
            both = (old >= 0) & (new >= 0)
            metrics["nmi_previous_epoch"] = normalized_mutual_info(old[both], new[both])
        labels = self._source.labels() if hasattr(self._source, "labels") else None
        if labels is not None and labels.shape[0] == n:
            labels = labels.to(device)
            ok = (new >= 0) & (labels >= 0)
            if bool(ok.any()):
                metrics["nmi_labels"] = normalized_mutual_info(new[ok], labels[ok])
        if self.assignments.shape != new.shape:
            self.assignments = new
        else:
            self.assignments.copy_(new)
        self.clustered_epoch.fill_(epoch)
        self._has_labels = True
        metrics["cluster_seconds"] = time.perf_counter() - start
        if isinstance(sys.stderr, FileProxy):
            shown = {name: v for name, v in metrics.items() if name.startswith(("nmi", "kmeans_loss"))}
            summary = ", ".join(f"{name} {v:.4g}" for name, v in shown.items())
            print(
                f"deepcluster: epoch {epoch}: {k} clusters in {metrics['cluster_seconds']:.1f} s; {summary}",
                file=sys.stderr,
            )
        return metrics

    # ------------------------------------------------------------------------------ hooks
    def on_epoch_start(self, epoch: int, step: int) -> dict[str, float]:
        metrics = self.cluster(epoch)
        self.reinit_classifier(torch.Generator().manual_seed(_seed(self._recipe.seed, epoch, 2)))
        self._schedule_optimizer_reset()
        return metrics

    def epoch_order(self, epoch: int, generator: torch.Generator) -> torch.Tensor | None:
        if int(self.clustered_epoch) < 0:
            return None
        if not self.cfg.uniform_sampling:
            return None  # the trainer's uniform permutation of the images
        return uniform_cluster_order(self.assignments, generator)

    def training_step(self, batch: Batch, step: int) -> StepOutput:
        if not self._has_labels:
            raise TrainingError("DeepCluster has no pseudo-labels yet: on_epoch_start must cluster before training")
        labels = self.assignments[batch.index]
        views = batch.views
        if len(views) > 1 and all(v.shape == views[0].shape for v in views):
            logits = self._logits(torch.cat(views))
            target = labels.repeat(len(views))
        elif len(views) > 1:
            logits = torch.cat([self._logits(v) for v in views])
            target = labels.repeat(len(views))
        else:
            logits = self._logits(views[0])
            target = labels
        loss = deepcluster_loss(logits, target)
        with torch.no_grad():
            acc = (logits.argmax(dim=1) == target).float().mean()
        return StepOutput(loss, {"pseudo_label_acc": acc})

    # ------------------------------------------------------------------------------ state
    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # a run rebuilt without its training data may not know k or N: take them from the checkpoint
        w = state_dict.get(prefix + "classifier.weight")
        resized = w is not None and w.dim() == 2 and tuple(w.shape) != tuple(self.classifier.weight.shape)
        if resized and w.shape[1] == self.feature_dim:
            dev = self.classifier.weight.device
            self.classifier = nn.Linear(self.feature_dim, int(w.shape[0])).to(dev)
        done = state_dict.get(prefix + "clustered_epoch")
        if done is not None:
            self._has_labels = int(done) >= 0
        a = state_dict.get(prefix + "assignments")
        if a is not None and a.shape != self.assignments.shape:
            self.assignments = torch.full(a.shape, -1, dtype=torch.long, device=self.assignments.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def schedule_summary(self) -> dict[str, str]:
        c = self.cfg
        return {
            "clustering": (
                f"every epoch: {self.num_clusters} k-means clusters ({c.kmeans_iters} iterations) of "
                f"PCA-{c.pca_dim} whitened, L2-normalised features"
            ),
            "input filter": "Sobel (grayscale -> x/y gradients, 2 channels)" if c.sobel else "none (RGB)",
            "sampling": "uniform over clusters" if c.uniform_sampling else "uniform over images",
        }

    def extra_metadata(self) -> dict[str, Any]:
        if self.sobel is None:
            return {}
        return {
            "input_filter": "sobel",
            "input_filter_note": "the encoder takes 2 channels: the channel mean of the normalised RGB image "
            "convolved with the Sobel x and y kernels [[1,0,-1],[2,0,-2],[1,0,-1]] and its transpose (padding 1)",
        }
