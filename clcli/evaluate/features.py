"""One feature-extraction path for kNN, the linear probe and online evaluation (zero-shot shares its core,
:func:`clcli.views.plain.encode_split`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rich.console import Console

from clcli.data import ImageSource
from clcli.errors import ClcliError
from clcli.recipe import Recipe
from clcli.views.plain import encode_split


@dataclass
class FeatureSet:
    features: torch.Tensor  # float32 [N, D] on the CPU
    labels: torch.Tensor | None  # int64 [N]
    skipped: int = 0
    index: torch.Tensor | None = None  # int64 [N]: the position in the source of each row (unreadable ones left out)


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    source: ImageSource,
    recipe: Recipe,
    *,
    device: torch.device,
    layer: str = "backbone",
    batch_size: int | None = None,
    num_workers: int | None = None,
    show_progress: bool = False,
    console: Console | None = None,
    description: str = "features",
    interpolation: str = "bilinear",
) -> FeatureSet:
    """Features of every image of ``source`` (resized and centre-cropped, no augmentation).

    ``layer``: ``backbone`` (the method's ``features``) or ``embedding`` (its ``embed``); any other
    value is a :class:`ClcliError`.
    """
    if layer not in ("backbone", "embedding"):
        raise ClcliError(f"features are extracted from the 'backbone' or the 'embedding', not {layer!r}")
    fn = model.embed if layer == "embedding" else model.features  # type: ignore[union-attr]
    features, index = encode_split(
        model,
        fn,
        source,
        recipe,
        device=device,
        batch_size=batch_size,
        num_workers=num_workers,
        interpolation=interpolation,
        show_progress=show_progress,
        console=console,
        description=description,
    )
    labels = source.labels()
    return FeatureSet(features, None if labels is None else labels[index], len(source) - len(index), index)
