"""The report's looks at the encoder itself, on a small labelled sample: a 2-D map of its features coloured
by label, query images with their nearest neighbours, and (ViT backbones) the class token's attention."""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clcli.data import ImageSource
from clcli.errors import ClcliError
from clcli.evaluate.features import extract_features
from clcli.evaluate.loader import Loaded
from clcli.models.backbones import VisionTransformer
from clcli.report.curves import Figure
from clcli.views.pipelines import eval_pipeline, normalize_batch

MAP_METHODS = ("auto", "tsne", "umap")


class Sample(ImageSource):
    """Chosen records of a source, in the given order (a seeded random sample of a split)."""

    def __init__(self, source: ImageSource, index: list[int]) -> None:
        self.source, self.index = source, index
        self.spec, self.split, self.classes = source.spec, source.split, source.classes
        labels = source.labels()
        self._labels = None if labels is None else labels[torch.tensor(index, dtype=torch.long)]

    def __len__(self) -> int:
        return len(self.index)

    def load_image(self, i: int) -> torch.Tensor:
        return self.source.load_image(self.index[i])

    def label(self, i: int) -> int:
        return -1 if self._labels is None else int(self._labels[i])

    def labels(self) -> torch.Tensor | None:
        return self._labels

    def text(self, i: int) -> str | None:
        return self.source.text(self.index[i])

    def describe(self, i: int) -> str:
        return self.source.describe(self.index[i])


def draw_sample(source: ImageSource, size: int, seed: int) -> Sample:
    """``size`` records of ``source`` drawn without replacement (all of them when it has fewer), seeded."""
    n = len(source)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(size, n)]
    return Sample(source, sorted(order.tolist()))


def class_name(sample: Sample, label: int) -> str:
    if label < 0:
        return "?"
    return sample.classes[label] if sample.classes and label < len(sample.classes) else str(label)


def project_2d(features: torch.Tensor, how: str, seed: int) -> tuple[np.ndarray, str]:
    """A 2-D map of ``features`` [N, D] (L2-normalised first): t-SNE (scikit-learn) or UMAP; with the method used.

    ``auto`` is UMAP when the ``umap-learn`` package is installed, else t-SNE (van der Maaten &
    Hinton 2008; McInnes et al. 2018, arXiv:1802.03426).
    """
    if how not in MAP_METHODS:
        raise ClcliError(f"--map must be one of {', '.join(MAP_METHODS)}, got {how!r}")
    has_umap = importlib.util.find_spec("umap") is not None
    if how == "umap" and not has_umap:
        raise ClcliError("--map umap needs the umap-learn package: pip install umap-learn (or --map tsne)")
    x = F.normalize(features.float(), dim=1).numpy()
    if how == "umap" or (how == "auto" and has_umap):
        import umap

        return umap.UMAP(n_components=2, random_state=seed).fit_transform(x), "UMAP"
    from sklearn.manifold import TSNE

    perplexity = float(max(2.0, min(30.0, (len(x) - 1) / 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x), "t-SNE"


def map_figure(plt: Any, points: np.ndarray, how: str, sample: Sample, folder: Any) -> Figure:
    labels = sample.labels()
    assert labels is not None
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    present = sorted(set(labels.tolist()))
    cmap = plt.get_cmap("tab10" if len(present) <= 10 else "tab20")
    for k, label in enumerate(present):
        mine = (labels == label).numpy()
        ax.scatter(points[mine, 0], points[mine, 1], s=9, color=cmap(k % cmap.N), label=class_name(sample, label))
    if len(present) <= 20:
        ax.legend(markerscale=2, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{how} of {len(sample)} images of {sample.split}")
    fig.tight_layout()
    fig.savefig(folder / "embedding_map.png", dpi=110)
    plt.close(fig)
    return Figure(
        "embedding_map.png",
        "Embedding map",
        f"{how} of the backbone features (L2-normalised) of a random sample of {len(sample)} images of split "
        f"{sample.split!r} of {sample.spec}, coloured by label.",
    )


def nearest(features: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` nearest other rows of each row of ``features`` by cosine similarity: int64 [N, k]."""
    z = F.normalize(features.float(), dim=1)
    sim = z @ z.t()
    sim.fill_diagonal_(-float("inf"))
    return sim.topk(min(k, len(z) - 1), dim=1).indices


def _show(ax: Any, image: torch.Tensor, title: str, colour: str | None = None) -> None:
    ax.imshow(image.permute(1, 2, 0).numpy())
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=7)
    if colour is not None:
        for spine in ax.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(3)


def neighbours_figure(
    plt: Any, sample: Sample, neighbours: torch.Tensor, queries: int, folder: Any
) -> tuple[Figure, float]:
    """A grid: each row a query image then its nearest neighbours (green frame: same label, red: another).

    Also returns the fraction of all sampled images' neighbours that share their label.
    """
    labels = sample.labels()
    assert labels is not None
    agree = float((labels[neighbours] == labels[:, None]).float().mean())
    rows, k = min(queries, len(sample)), neighbours.shape[1]
    fig, axes = plt.subplots(rows, k + 1, figsize=(1.3 * (k + 1), 1.45 * rows), squeeze=False)
    for r in range(rows):
        q = int(labels[r])
        _show(axes[r][0], sample.load_image(r), f"query: {class_name(sample, q)}", "black")
        for c, j in enumerate(neighbours[r].tolist()):
            same = int(labels[j]) == q
            _show(axes[r][c + 1], sample.load_image(j), class_name(sample, int(labels[j])), "green" if same else "red")
    fig.tight_layout()
    fig.savefig(folder / "neighbours.png", dpi=110)
    plt.close(fig)
    caption = (
        f"Queries from the sample and their {k} nearest neighbours in it (cosine similarity of backbone features); "
        f"{100 * agree:.1f}% of the neighbours of all {len(sample)} sampled images share their query's label."
    )
    return Figure("neighbours.png", "Nearest neighbours", caption), agree


def find_vit(model: torch.nn.Module) -> VisionTransformer | None:
    """The ViT whose attention the report shows: the model's ``backbone``, else the first ViT in it."""
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, VisionTransformer):
        return backbone
    return next((m for m in model.modules() if isinstance(m, VisionTransformer)), None)


def attention_figure(plt: Any, loaded: Loaded, sample: Sample, count: int, folder: Any) -> Figure | None:
    """For a ViT backbone: images, the mean over heads of the class token's last-block attention, and each head."""
    vit = find_vit(loaded.model)
    if vit is None:
        return None
    v = loaded.recipe.views
    transform = eval_pipeline(v.eval_size, v.eval_resize, loaded.interpolation)
    images = torch.stack([transform(sample.load_image(i)) for i in range(min(count, len(sample)))])
    x = normalize_batch(images.to(loaded.device), v.mean, v.std, channels_last=False)
    was_training = vit.training
    vit.eval()
    try:
        maps = vit.cls_attention(x).cpu()  # [B, heads, gh, gw]
    finally:
        vit.train(was_training)
    heads = min(maps.shape[1], 6)
    fig, axes = plt.subplots(len(images), heads + 2, figsize=(1.5 * (heads + 2), 1.6 * len(images)), squeeze=False)
    for r, image in enumerate(images):
        _show(axes[r][0], image, class_name(sample, sample.label(r)))
        mean = maps[r].mean(0)
        up = F.interpolate(mean[None, None], size=image.shape[-2:], mode="nearest")[0, 0]
        _show(axes[r][1], image, "mean of heads")
        axes[r][1].imshow(up.numpy(), cmap="inferno", alpha=0.6)
        for h in range(heads):
            axes[r][h + 2].imshow(maps[r, h].numpy(), cmap="inferno")
            axes[r][h + 2].set_xticks([])
            axes[r][h + 2].set_yticks([])
            axes[r][h + 2].set_title(f"head {h}", fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "attention.png", dpi=110)
    plt.close(fig)
    return Figure(
        "attention.png",
        "Attention of the class token",
        "The last transformer block's attention from the class token to each patch (mean over heads, overlaid; "
        f"then the first {heads} heads), as DINO shows it (arXiv:2104.14294).",
    )


def sample_figures(
    plt: Any, loaded: Loaded, sample: Sample, *, how: str, queries: int, neighbours: int, seed: int, folder: Any
) -> tuple[list[Figure], dict[str, Any]]:
    """The map, the neighbour grid and (ViT) the attention maps of ``sample``; with the numbers the page quotes."""
    feats = extract_features(
        loaded.model, sample, loaded.recipe, device=loaded.device, interpolation=loaded.interpolation
    )
    if feats.labels is None or len(feats.features) < 3:
        raise ClcliError(f"the report's sample of {sample.spec} needs at least 3 readable labelled images")
    if feats.skipped:  # the figures index the sample by its features' rows
        raise ClcliError(f"{feats.skipped} images of the report's sample of {sample.spec} are unreadable")
    points, used = project_2d(feats.features, how, seed)
    figures = [map_figure(plt, points, used, sample, folder)]
    near = nearest(feats.features, neighbours)
    grid, agree = neighbours_figure(plt, sample, near, queries, folder)
    figures.append(grid)
    attention = attention_figure(plt, loaded, sample, min(queries, 6), folder)
    if attention is not None:
        figures.append(attention)
    return figures, {"sample": len(sample), "map": used, "neighbour_label_agreement": agree}
