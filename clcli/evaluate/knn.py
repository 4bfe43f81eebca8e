"""Weighted k-nearest-neighbour classification of frozen features.

The protocol of instance discrimination (Wu et al., arXiv:1805.01978), also used by MoCo and
DINO (arXiv:2104.14294): features are L2-normalised, each test sample finds its ``k`` most
cosine-similar training samples, and each neighbour votes for its label with weight
``exp(similarity / temperature)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["knn_accuracy", "knn_scores"]


def _check(train_features: Tensor, train_labels: Tensor, test_features: Tensor, k: int, temperature: float) -> None:
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError("features must be 2-d [samples, dim]")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"feature dimensions differ: train {train_features.shape[1]}, test {test_features.shape[1]}")
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(f"train_labels must have shape [{train_features.shape[0]}], got {tuple(train_labels.shape)}")
    if train_features.shape[0] == 0:
        raise ValueError("kNN needs at least one training sample")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


@torch.no_grad()
def knn_scores(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    *,
    k: int,
    temperature: float,
    num_classes: int,
    chunk_size: int = 1024,
) -> Tensor:
    """Class scores ``[M, num_classes]`` of a temperature-weighted kNN vote (arXiv:1805.01978).

    Both feature sets are L2-normalised; for each test row the ``min(k, N)`` training rows of
    highest cosine similarity ``s`` each add ``exp(s / temperature)`` to the score of their label.
    Test rows are processed ``chunk_size`` at a time, so the memory used is about
    ``chunk_size x N`` similarities on top of the (normalised copies of the) inputs.  The
    computation runs on the device of ``train_features``, in its floating dtype (float32 for
    integer or half inputs).
    """
    _check(train_features, train_labels, test_features, k, temperature)
    device = train_features.device
    dtype = train_features.dtype if train_features.dtype in (torch.float32, torch.float64) else torch.float32
    train = F.normalize(train_features.to(dtype), dim=1)
    labels = train_labels.to(device=device, dtype=torch.long)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"train labels must lie in [0, {num_classes})")
    k = min(k, train.shape[0])
    test_all = test_features.to(device=device, dtype=dtype)
    scores = torch.zeros(test_all.shape[0], num_classes, dtype=dtype, device=device)
    for start in range(0, test_all.shape[0], chunk_size):
        test = F.normalize(test_all[start : start + chunk_size], dim=1)
        sims = test @ train.T  # [c, N]
        top_sims, top_idx = sims.topk(k, dim=1)  # [c, k]
        weights = (top_sims / temperature).exp_()
        scores[start : start + test.shape[0]].scatter_add_(1, labels[top_idx], weights)
    return scores


def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    k: int,
    temperature: float,
    num_classes: int,
    chunk_size: int = 1024,
) -> dict[str, Any]:
    """Top-1 and top-5 accuracy (fractions in [0, 1]) of the weighted kNN vote of :func:`knn_scores`.

    Top-5 counts a test sample as correct when its label is among the 5 highest scores (among all
    classes when there are fewer than 5).  Returns ``{"top1", "top5", "k", "temperature"}``,
    where ``k`` is the number of neighbours actually used (``min(k, N)``).
    """
    scores = knn_scores(
        train_features,
        train_labels,
        test_features,
        k=k,
        temperature=temperature,
        num_classes=num_classes,
        chunk_size=chunk_size,
    )
    return {
        **scores_accuracy(scores, test_labels),
        "k": min(k, train_features.shape[0]),
        "temperature": float(temperature),
    }


def scores_accuracy(scores: Tensor, labels: Tensor) -> dict[str, float]:
    """Top-1 and top-5 accuracy (fractions) of class ``scores`` ``[M, C]`` against ``labels`` ``[M]``."""
    labels = labels.to(device=scores.device, dtype=torch.long)
    if scores.shape[0] != labels.shape[0]:
        raise ValueError(f"{scores.shape[0]} score rows but {labels.shape[0]} labels")
    if scores.shape[0] == 0:
        return {"top1": float("nan"), "top5": float("nan")}
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return {"top1": hits[:, 0].double().mean().item(), "top5": hits.any(dim=1).double().mean().item()}
