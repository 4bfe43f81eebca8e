"""What the trained evaluation protocols share: augmented labelled batches, the SGD loop with its cosine
schedule, scoring on the test split, and class-balanced label subsets.

The linear protocol (:mod:`clcli.evaluate.linear_sgd`) and fine-tuning (:mod:`clcli.evaluate.finetune`)
train a classifier on training images cropped and flipped afresh every epoch (random resized crop
and horizontal flip, the augmentation of the papers' linear and semi-supervised evaluations, e.g.
SimCLR, arXiv:2002.05709, appendix B.5), with SGD whose learning rate follows a half-cosine from
its peak to zero over the whole run, and score it on the test split prepared as every evaluation
prepares it (resize, centre crop).  Everything random (initialisation, order, crops) is drawn from
the recipe seed, so a protocol repeats exactly on the CPU.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from clcli.errors import BadImageError, ClcliError
from clcli.evaluate.knn import scores_accuracy
from clcli.evaluate.loader import Loaded, load_for_result, open_split
from clcli.precision import use_bf16, use_channels_last
from clcli.recipe import Recipe
from clcli.schedules import cosine
from clcli.views.pipelines import normalize_batch
from clcli.views.plain import encode_split

REFERENCE_BATCH = 256  # the batch the protocols' learning rates are given at


@dataclass
class SgdSettings:
    """One protocol's training settings, resolved (the learning rate already scaled to the batch)."""

    epochs: int
    batch_size: int
    base_lr: float  # at batch 256
    lr: float  # base_lr x batch_size / 256: the peak of the cosine schedule
    momentum: float
    nesterov: bool
    weight_decay: float
    crop_scale: tuple[float, float]
    hflip_p: float
    seed: int

    def summary(self) -> str:
        """The settings in one sentence, for a result's ``protocol_details``."""
        return (
            f"SGD momentum {self.momentum:g}{' Nesterov' if self.nesterov else ''}, lr {self.lr:g} "
            f"(= {self.base_lr:g} x {self.batch_size}/{REFERENCE_BATCH}) cosine to 0, weight decay "
            f"{self.weight_decay:g}, batch {self.batch_size}, {self.epochs} epochs; scored on the centre-cropped "
            "test split"
        )

    def describe(self) -> dict[str, Any]:
        """The settings as results record them, with the schedule and augmentation spelled out."""
        return {
            **asdict(self),
            "crop_scale": list(self.crop_scale),
            "optimizer": "sgd",
            "schedule": "cosine (per step, from lr to 0, no warm-up)",
            "augmentation": f"random resized crop (scale {list(self.crop_scale)}) + horizontal flip "
            f"(p {self.hflip_p:g})",
            "lr_scaling": f"lr = base_lr x batch_size / {REFERENCE_BATCH}",
        }


def resolve_settings(
    cfg: Any,
    seed: int,
    *,
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    weight_decay: float | None = None,
    default_epochs: int | None = None,
) -> SgdSettings:
    """The settings of ``cfg`` (``eval.linear_sgd`` or ``eval.finetune``) with the command's overrides.

    ``lr`` is the rate at batch 256, like the recipe field; a value out of range is a :class:`ClcliError`.
    """
    for flag, value in (("--epochs", epochs), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise ClcliError(f"{flag} must be at least 1, got {value}")
    if lr is not None and not lr > 0:
        raise ClcliError(f"--lr must be positive, got {lr}")
    if weight_decay is not None and not weight_decay >= 0:
        raise ClcliError(f"--weight-decay must be at least 0, got {weight_decay}")
    n_epochs = epochs or default_epochs or cfg.epochs
    batch = batch_size or cfg.batch_size
    base = lr if lr is not None else cfg.lr
    return SgdSettings(
        epochs=int(n_epochs),
        batch_size=int(batch),
        base_lr=float(base),
        lr=float(base) * batch / REFERENCE_BATCH,
        momentum=float(cfg.momentum),
        nesterov=bool(cfg.nesterov),
        weight_decay=float(cfg.weight_decay if weight_decay is None else weight_decay),
        crop_scale=(float(cfg.crop_scale[0]), float(cfg.crop_scale[1])),
        hflip_p=float(cfg.hflip_p),
        seed=int(seed),
    )


# ----------------------------------------------------------------------------- augmented batches
class LabelledImages(Dataset):
    """``(augmented uint8 image or None, label)`` for the images ``indices`` of ``source``."""

    def __init__(self, source: Any, indices: Tensor, labels: Tensor, transform: Callable, skip_bad: bool) -> None:
        self.source, self.indices, self.labels = source, indices.tolist(), labels
        self.transform, self.skip_bad = transform, skip_bad

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor | None, int]:
        j = self.indices[i]
        try:
            return self.transform(self.source.load_image(j)), int(self.labels[j])
        except BadImageError:
            if self.skip_bad:
                return None, -1
            raise


def _collate(items: list[tuple[Tensor | None, int]]) -> tuple[Tensor | None, Tensor]:
    good = [(x, y) for x, y in items if x is not None]
    if not good:
        return None, torch.empty(0, dtype=torch.long)
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good], dtype=torch.long)


def train_transform(size: int, settings: SgdSettings) -> Callable[[Tensor], Tensor]:
    """Random resized crop to ``size`` and a horizontal flip, on uint8 ``[C, H, W]`` images."""
    ops: list[nn.Module] = [v2.RandomResizedCrop(size, scale=settings.crop_scale, antialias=True)]
    if settings.hflip_p > 0:
        ops.append(v2.RandomHorizontalFlip(p=settings.hflip_p))
    return v2.Compose(ops)


def augmented_loader(source: Any, indices: Tensor, labels: Tensor, recipe: Recipe, settings: SgdSettings) -> DataLoader:
    """Shuffled batches ``(uint8 images, labels)`` of the images ``indices``, augmented afresh each pass.

    The order comes from a generator seeded with the protocol's seed; the crops from the torch
    random state (seeded by :func:`train_classifier`) or, with workers, from per-worker seeds the
    loader derives from its generator.
    """
    dataset = LabelledImages(
        source, indices, labels, train_transform(recipe.views.eval_size, settings), recipe.data.skip_bad_images
    )
    return DataLoader(
        dataset,
        batch_size=settings.batch_size,
        shuffle=True,
        drop_last=len(dataset) > settings.batch_size,  # full batches only, unless one batch is all there is
        num_workers=recipe.data.num_workers,
        collate_fn=_collate,
        generator=torch.Generator().manual_seed(settings.seed),
    )


# --------------------------------------------------------------------------------- the SGD loop
def _progress(console: Console | None, show: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console or Console(stderr=True),
        disable=not show,
        transient=True,
    )


def train_classifier(
    forward: Callable[[Tensor], Tensor],
    params: list[nn.Parameter],
    loader: DataLoader,
    recipe: Recipe,
    settings: SgdSettings,
    *,
    device: torch.device,
    train_modules: Callable[[], None] = lambda: None,
    console: Console | None = None,
    show_progress: bool = False,
    description: str = "training",
) -> dict[str, float]:
    """Minimise the cross-entropy of ``forward(images)`` over ``params`` with SGD for ``settings.epochs``.

    The learning rate follows a half-cosine from ``settings.lr`` at the first step to 0 after the
    last; weight decay applies to every parameter in ``params``.  ``train_modules`` is called
    before each epoch (it puts the trained modules in training mode).  The forward pass runs in
    the recipe's precision (bf16 autocast where it applies); the loss in fp32.  Returns the mean
    loss and the top-1 accuracy on the augmented images of the last epoch.
    """
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ClcliError("no training images to train the classifier on")
    total = settings.epochs * steps_per_epoch
    optimizer = torch.optim.SGD(
        params,
        lr=settings.lr,
        momentum=settings.momentum,
        nesterov=settings.nesterov and settings.momentum > 0,
        weight_decay=settings.weight_decay,
    )
    autocast = use_bf16(recipe.trainer.precision, device)
    channels_last = use_channels_last(recipe.trainer.channels_last, device)
    v = recipe.views
    step = 0
    last: dict[str, float] = {}
    with torch.random.fork_rng(devices=[]), _progress(console, show_progress) as progress:
        torch.manual_seed(settings.seed)
        task = progress.add_task(description, total=total, status="")
        for epoch in range(settings.epochs):
            train_modules()
            loss_sum, correct, seen = 0.0, 0, 0
            for images, labels in loader:
                lr = cosine(step, total, settings.lr, 0.0)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                if images is not None:
                    x = normalize_batch(images.to(device), v.mean, v.std, channels_last=channels_last)
                    y = labels.to(device)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                        logits = forward(x)
                    loss = F.cross_entropy(logits.float(), y)
                    if not torch.isfinite(loss):
                        raise ClcliError(
                            f"the {description} loss is not finite at epoch {epoch + 1} (learning rate {lr:.4g}); "
                            "lower the learning rate (--lr)"
                        )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    loss_sum += loss.item() * y.numel()
                    correct += int((logits.argmax(1) == y).sum())
                    seen += y.numel()
                step += 1
                progress.update(task, advance=1, status=f"epoch {epoch + 1}/{settings.epochs}")
            last = {"train_loss": loss_sum / max(seen, 1), "train_top1": correct / max(seen, 1)}
    return last


@torch.no_grad()
def score_split(
    model: nn.Module,
    forward: Callable[[Tensor], Tensor],
    source: Any,
    recipe: Recipe,
    *,
    device: torch.device,
    interpolation: str = "bilinear",
    console: Console | None = None,
    show_progress: bool = False,
    description: str = "test",
) -> tuple[dict[str, float], int, int]:
    """Top-1 and top-5 of ``forward``'s class scores on every readable image of the labelled ``source``
    (evaluation transform, ``model`` in eval mode); also the images scored and those left out."""
    scores, index = encode_split(
        model,
        forward,
        source,
        recipe,
        device=device,
        interpolation=interpolation,
        show_progress=show_progress,
        console=console,
        description=description,
    )
    labels = source.labels()
    assert labels is not None
    return scores_accuracy(scores, labels[index]), int(index.numel()), len(source) - int(index.numel())


# ------------------------------------------------------------------------------- label subsets
def balanced_subset(labels: Tensor, fraction: float, seed: int) -> Tensor:
    """Sorted indices of about ``fraction`` of the images of every class, drawn with ``seed``.

    Each class gives ``round(fraction x its count)`` images, at least one: the class proportions of
    the split are kept, and every class is represented (SimCLR's 1 % and 10 % ImageNet subsets are
    class-balanced in the same way).  The same labels, fraction and seed always give the same subset.
    """
    if not 0.0 < fraction <= 1.0:
        raise ClcliError(f"--labels must be a fraction in (0, 1] (e.g. 0.01 or 0.1), got {fraction:g}")
    g = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    chosen: list[Tensor] = []
    for cls in torch.unique(labels):
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        chosen.append(idx[: max(1, round(fraction * idx.numel()))])
    return torch.cat(chosen).sort().values


def indices_digest(indices: Tensor) -> str:
    """sha256 of the indices (as decimal text): identifies a label subset in results."""
    return hashlib.sha256(",".join(map(str, indices.tolist())).encode()).hexdigest()


def class_counts(labels: Tensor) -> dict[str, int]:
    """Images per class label, as results record them."""
    values, counts = torch.unique(labels.cpu(), return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(values, counts, strict=True)}


# ------------------------------------------------------------------------------ model and splits
@dataclass
class Prepared:
    """A loaded model with the labelled train and test splits a trained protocol uses."""

    loaded: Loaded
    train: Any  # ImageSource
    test: Any  # ImageSource
    train_labels: Tensor
    num_classes: int
    output: Path | None
    what: dict[str, Any]


def prepare(
    run_dir: Path | None,
    protocol: str,
    *,
    checkpoint: Path | None,
    trust_torchscript: bool,
    activation: str,
    layout: str | None,
    trust_pickle: bool,
    data: str | None,
    train_split: str | None,
    test_split: str | None,
    train_limit: int | None,
    test_limit: int | None,
    output: Path | None,
) -> Prepared:
    """Load the model (a run or a file, as every evaluation does) and open its labelled splits.

    Without ``--data``, the training split is limited like the run's (``data.limit``).  The result
    path defaults to ``RUN/eval/<protocol>.json`` (none for a file).
    """
    from clcli.evaluate.protocols import check_limits

    check_limits(train_limit, test_limit)
    loaded, out = load_for_result(
        protocol,
        run_dir,
        checkpoint,
        output,
        data=data,
        needs_data=True,
        trust_torchscript=trust_torchscript,
        activation=activation,
        layout=layout,
        trust_pickle=trust_pickle,
    )
    recipe = loaded.recipe
    spec = data or recipe.data.source
    splits = (train_split or recipe.data.train_split, test_split or recipe.data.test_split)
    if train_limit is None and data is None:
        train_limit = recipe.data.limit
    train = open_split(recipe, spec, splits[0], train_limit)
    test = open_split(recipe, spec, splits[1], test_limit)
    train_labels, test_labels = train.labels(), test.labels()
    classes = train.classes or test.classes
    num_classes = len(classes) if classes else int(max(train_labels.max(), test_labels.max())) + 1
    what = {"data": spec, "train_split": splits[0], "test_split": splits[1]}
    return Prepared(loaded, train, test, train_labels, num_classes, out, what)


def feature_dim(fn: Callable[[Tensor], Tensor], recipe: Recipe, device: torch.device, channels: int) -> int:
    """The width of ``fn``'s output for one evaluation-size image (``fn`` may be in training mode: two images)."""
    size = recipe.views.eval_size
    with torch.no_grad():
        return int(fn(torch.zeros(2, channels, size, size, device=device)).shape[1])
