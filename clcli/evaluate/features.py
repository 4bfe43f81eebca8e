"""One feature-extraction path for kNN, the linear probe and online evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from clcli.data import ImageSource
from clcli.errors import BadImageError
from clcli.recipe import Recipe
from clcli.views import normalize_batch
from clcli.views.pipelines import eval_pipeline
from clcli.views.plain import plain_loader


@dataclass
class FeatureSet:
    features: torch.Tensor  # float32 [N, D] on the CPU
    labels: torch.Tensor | None  # int64 [N]
    skipped: int = 0


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

    ``layer``: ``backbone`` (the method's ``features``) or ``embedding`` (its ``embed``).
    """
    fn = model.embed if layer == "embedding" else model.features  # type: ignore[union-attr]
    v = recipe.views
    loader = plain_loader(
        source,
        eval_pipeline(v.eval_size, v.eval_resize, interpolation),
        batch_size=batch_size or recipe.eval.batch_size,
        num_workers=recipe.data.num_workers if num_workers is None else num_workers,
        skip_bad=recipe.data.skip_bad_images,
    )
    autocast = recipe.trainer.precision == "bf16"
    chunks: list[torch.Tensor] = []
    kept: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    progress = Progress(
        TextColumn(description),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
        disable=not show_progress,
        transient=True,
    )
    try:
        with progress:
            task = progress.add_task(description, total=len(source))
            for images, idx in loader:
                if images is not None:
                    x = normalize_batch(images.to(device), v.mean, v.std, channels_last=recipe.trainer.channels_last)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                        out = fn(x)
                    chunks.append(out.float().cpu())
                    kept.append(idx)
                progress.advance(task, len(idx) if images is not None else loader.batch_size or 0)
    finally:
        model.train(was_training)
    if not chunks:
        raise BadImageError(source.spec, "no readable image in this split")
    index = torch.cat(kept)
    labels = source.labels()
    return FeatureSet(torch.cat(chunks), None if labels is None else labels[index], len(source) - len(index))
