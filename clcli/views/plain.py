"""Images without augmentation, for everything that reads a whole split in order.

Feature extraction for evaluation, zero-shot classification, DeepCluster's clustering pass and the
fill of an encoded memory bank all load each image once, apply a deterministic transform (resize,
centre crop) and keep its index; an unreadable image either stops the pass (naming the file) or,
with ``skip_bad``, is left out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader, Dataset

from clcli.errors import BadImageError
from clcli.precision import use_bf16, use_channels_last
from clcli.recipe import Recipe
from clcli.views.pipelines import eval_pipeline, normalize_batch


class PlainImages(Dataset):
    """``(uint8 image after transform, index)``; ``(None, index)`` for an unreadable image with ``skip_bad``."""

    def __init__(self, source: Any, transform: Callable[[torch.Tensor], torch.Tensor], skip_bad: bool) -> None:
        self.source, self.transform, self.skip_bad = source, transform, skip_bad

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int]:
        try:
            return self.transform(self.source.load_image(i)), i
        except BadImageError:
            if self.skip_bad:
                return None, i
            raise


def collate_readable(items: list[tuple[torch.Tensor | None, int]]) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Stack the readable images of a batch; ``(None, empty)`` when none was readable."""
    good = [(x, i) for x, i in items if x is not None]
    if not good:
        return None, torch.empty(0, dtype=torch.long)
    return torch.stack([x for x, _ in good]), torch.tensor([i for _, i in good], dtype=torch.long)


def plain_loader(
    source: Any,
    transform: Callable[[torch.Tensor], torch.Tensor],
    *,
    batch_size: int,
    num_workers: int = 0,
    skip_bad: bool = False,
) -> DataLoader:
    """Batches ``(images or None, indices)`` of ``source`` in order."""
    return DataLoader(
        PlainImages(source, transform, skip_bad),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_readable,
    )


def split_progress(description: str, *, show: bool, console: Console | None = None) -> Progress:
    """The progress bar of a pass over a whole split: counts images, gone once the pass ends."""
    return Progress(
        TextColumn(description),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
        disable=not show,
        transient=True,
    )


@torch.no_grad()
def encode_split(
    model: torch.nn.Module,
    fn: Callable[[torch.Tensor], torch.Tensor],
    source: Any,
    recipe: Recipe,
    *,
    device: torch.device,
    out_device: torch.device | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    interpolation: str = "bilinear",
    show_progress: bool = False,
    console: Console | None = None,
    description: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn``'s output for every readable image of ``source``, in order, with ``model`` in eval mode.

    Images get the recipe's evaluation transform, normalisation, memory layout and precision.
    Returns ``(outputs, indices)``: float32 ``[N_readable, D]`` on ``out_device`` (the CPU unless
    given) and the int64 indices of the images they belong to.  ``model``'s train/eval mode is
    restored afterwards.  With no readable image at all, raises :class:`BadImageError`.
    """
    v = recipe.views
    loader = plain_loader(
        source,
        eval_pipeline(v.eval_size, v.eval_resize, interpolation),
        batch_size=batch_size or recipe.eval.batch_size,
        num_workers=recipe.data.num_workers if num_workers is None else num_workers,
        skip_bad=recipe.data.skip_bad_images,
    )
    out_device = out_device or torch.device("cpu")
    autocast = use_bf16(recipe.trainer.precision, device)
    channels_last = use_channels_last(recipe.trainer.channels_last, device)
    chunks: list[torch.Tensor] = []
    kept: list[torch.Tensor] = []
    progress = split_progress(description, show=show_progress, console=console)
    was_training = model.training
    model.eval()
    try:
        with progress:
            task = progress.add_task(description, total=len(source))
            for images, idx in loader:
                if images is not None:
                    x = normalize_batch(images.to(device), v.mean, v.std, channels_last=channels_last)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                        out = fn(x)
                    chunks.append(out.float().to(out_device))
                    kept.append(idx)
                progress.advance(task, len(idx) if images is not None else loader.batch_size or 0)
    finally:
        model.train(was_training)
    if not chunks:
        raise BadImageError(str(getattr(source, "spec", "the split")), "no readable image in this split")
    return torch.cat(chunks), torch.cat(kept)
