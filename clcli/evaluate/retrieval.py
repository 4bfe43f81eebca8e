"""Image retrieval with frozen features: recall@K and mean average precision, labels as relevance.

Each image of the query split (the test split) ranks every image of the gallery (the train split)
by cosine similarity of L2-normalised features, highest first (ties in gallery order); a gallery
image is relevant when it has the query's label.

- **recall@K** (as in deep metric learning, e.g. Oh Song et al., arXiv:1511.06452): the fraction of
  queries with at least one relevant image among their K nearest gallery images;
- **mAP**: the mean over queries of the average precision of the whole ranking,
  ``AP = (1/R) * sum over relevant ranks r of precision@r`` with R the query's relevant images.

Queries whose label no gallery image has cannot be answered; they are left out of both figures and
counted (``queries_without_match``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import Tensor

from clcli.errors import ClcliError
from clcli.evaluate.loader import check_layer, load_for_result
from clcli.evaluate.protocols import _split_features, check_limits, skipped_counts
from clcli.evaluate.results import timestamp, write_result
from clcli.views.plain import split_progress

__all__ = ["RECALL_KS", "retrieval_eval", "retrieval_scores"]

RECALL_KS = (1, 5, 10)


@torch.no_grad()
def retrieval_scores(
    query_features: Tensor,
    query_labels: Tensor,
    gallery_features: Tensor,
    gallery_labels: Tensor,
    *,
    ks: Sequence[int] = RECALL_KS,
    chunk_size: int = 256,
    device: torch.device | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Recall@K for each K in ``ks`` and mAP of ranking ``gallery`` rows for each ``query`` row.

    Features ``[M, D]`` and ``[N, D]`` (any float dtype; compared in float32 after L2
    normalisation), labels int ``[M]`` and ``[N]``.  A K above N counts the whole gallery.  Queries
    are ranked ``chunk_size`` at a time (memory about ``chunk_size x N`` similarities) on ``device``
    (default: the gallery's); ranking sorts every gallery row per query, the bulk of the time on a CPU.
    ``on_chunk(n)`` is called after each chunk with the number of queries it ranked (a progress bar).  Returns
    ``{"recall_at_K": fraction, ..., "map": fraction, "queries": answered, "queries_without_match": n}``;
    the figures are None when no query has a match.
    """
    if query_features.ndim != 2 or gallery_features.ndim != 2:
        raise ValueError("features must be 2-d [samples, dim]")
    if query_features.shape[1] != gallery_features.shape[1]:
        raise ValueError(
            f"feature dimensions differ: queries {query_features.shape[1]}, gallery {gallery_features.shape[1]}"
        )
    if query_labels.shape != (query_features.shape[0],) or gallery_labels.shape != (gallery_features.shape[0],):
        raise ValueError("one label per query row and per gallery row")
    if gallery_features.shape[0] == 0:
        raise ValueError("retrieval needs at least one gallery image")
    if any(k < 1 for k in ks):
        raise ValueError(f"every K must be at least 1, got {list(ks)}")
    gallery = F.normalize(gallery_features.to(device or gallery_features.device).float(), dim=1)
    g_labels = gallery_labels.to(device=gallery.device, dtype=torch.long)
    n = gallery.shape[0]
    ranks = torch.arange(1, n + 1, device=gallery.device, dtype=torch.float64)
    hits = {k: 0 for k in ks}
    ap_sum, answered = 0.0, 0
    for start in range(0, query_features.shape[0], chunk_size):
        q = F.normalize(query_features[start : start + chunk_size].to(gallery.device).float(), dim=1)
        q_labels = query_labels[start : start + chunk_size].to(device=gallery.device, dtype=torch.long)
        order = (q @ gallery.T).sort(dim=1, descending=True, stable=True).indices  # [c, N]
        relevant = g_labels[order] == q_labels[:, None]  # [c, N], in rank order
        count = relevant.sum(dim=1)
        keep = count > 0
        relevant, count = relevant[keep], count[keep]
        answered += int(keep.sum())
        for k in ks:
            hits[k] += int(relevant[:, : min(k, n)].any(dim=1).sum())
        precision = relevant.cumsum(dim=1, dtype=torch.float64) / ranks  # precision@r at every rank r
        ap_sum += float(((precision * relevant).sum(dim=1) / count).sum())
        if on_chunk is not None:
            on_chunk(int(q.shape[0]))
    return {
        **{f"recall_at_{k}": hits[k] / answered if answered else None for k in ks},
        "map": ap_sum / answered if answered else None,
        "queries": answered,
        "queries_without_match": int(query_features.shape[0]) - answered,
    }


def retrieval_eval(
    run_dir: Path | None,
    *,
    checkpoint: Path | None = None,
    trust_torchscript: bool = False,
    activation: str = "quick_gelu",
    data: str | None = None,
    train_split: str | None = None,
    test_split: str | None = None,
    features: str | None = None,
    train_limit: int | None = None,
    test_limit: int | None = None,
    output: Path | None = None,
    console: Console | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Retrieval of the train split (gallery) by the test split (queries): recall@1/5/10 and mAP.

    ``run_dir`` is a run folder; or ``None`` with ``checkpoint`` a pretrained CLIP file and ``data``
    the labelled images.  The result is written to ``output`` (default ``RUN/eval/retrieval.json``)
    like the other evaluations.
    """
    if features is not None:
        _check_features(features)
    check_limits(train_limit, test_limit)
    src, out = load_for_result(
        "retrieval",
        run_dir,
        checkpoint,
        output,
        data=data,
        needs_data=True,
        trust_torchscript=trust_torchscript,
        activation=activation,
    )
    layer = _check_features(features or src.recipe.eval.features)
    gallery, queries, _, what = _split_features(
        src, data, train_split, test_split, layer, train_limit, test_limit, console, show_progress, allow_bank=False
    )
    assert gallery.labels is not None and queries.labels is not None
    progress = split_progress("ranking the gallery", show=show_progress, console=console)
    with progress:
        task = progress.add_task("ranking", total=int(queries.features.shape[0]))
        scores = retrieval_scores(
            queries.features,
            queries.labels,
            gallery.features,
            gallery.labels,
            device=src.device,
            on_chunk=lambda n: progress.advance(task, n),
        )
    result = {
        "protocol": "retrieval",
        **scores,
        "relevance": "same label",
        **what,
        "feature_dim": int(gallery.features.shape[1]),
        "train_images": int(gallery.features.shape[0]),
        "test_images": int(queries.features.shape[0]),
        **skipped_counts(gallery, queries),
        **src.describe(),
        "evaluated": timestamp(),
    }
    return write_result(result, out)


def _check_features(layer: str) -> str:
    if check_layer(layer) == "bank":
        raise ClcliError("retrieval compares features of images: use --features backbone or embedding")
    return layer
