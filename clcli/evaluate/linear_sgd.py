"""The papers' linear evaluation: a linear classifier trained with SGD on the frozen encoder's features of
augmented images.

This is the protocol of the linear-evaluation tables (MoCo, arXiv:1911.05722; SimCLR,
arXiv:2002.05709; BYOL, arXiv:2006.07733; DINO, arXiv:2104.14294): the encoder is frozen (eval
mode, no gradient, its weights and batch-norm statistics untouched), every epoch sees the training
images randomly resized-cropped and flipped, and a linear layer is trained with momentum SGD under a
cosine schedule (settings: the recipe's ``eval.linear_sgd``).  The features pass a batch norm
without affine parameters before the linear layer, as in MAE's linear probing (arXiv:2111.06377):
it makes one learning rate fit encoders whose features differ in scale, and is itself linear at
test time.  The fast L-BFGS probe on pre-extracted features (:mod:`clcli.evaluate.linear`) stays the
default of ``clcli eval linear``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import Tensor, nn

from clcli.errors import ClcliError
from clcli.evaluate.loader import check_layer
from clcli.evaluate.results import timestamp, write_result
from clcli.evaluate.supervised import (
    SgdSettings,
    augmented_loader,
    feature_dim,
    prepare,
    resolve_settings,
    score_split,
    train_classifier,
)
from clcli.recipe import Recipe

__all__ = ["LinearHead", "linear_sgd_eval", "train_linear_sgd"]


class LinearHead(nn.Module):
    """Batch norm without affine parameters, then a linear layer: ``[B, D]`` features to ``[B, C]`` scores."""

    def __init__(self, dim: int, num_classes: int, generator: torch.Generator) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.fc = nn.Linear(dim, num_classes)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(num_classes, dim, generator=generator) * 0.01)
            self.fc.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.norm(x))


class _Probe(nn.Module):
    """The frozen model and the head as one module, so that scoring puts both in eval mode."""

    def __init__(self, model: nn.Module, head: LinearHead) -> None:
        super().__init__()
        self.model, self.head = model, head


def train_linear_sgd(
    model: nn.Module,
    recipe: Recipe,
    train: Any,
    train_labels: Tensor,
    num_classes: int,
    settings: SgdSettings,
    *,
    device: torch.device,
    layer: str = "backbone",
    console: Console | None = None,
    show_progress: bool = False,
) -> tuple[LinearHead, dict[str, float]]:
    """Train a :class:`LinearHead` on ``model``'s frozen ``layer`` features of augmented ``train`` images.

    ``model`` stays in eval mode and no gradient reaches it: its parameters and buffers end as they
    began.  Returns the head (on ``device``) and the last epoch's loss and training top-1.
    """
    fn = model.embed if layer == "embedding" else model.features  # type: ignore[union-attr]
    was_training = model.training
    model.eval()
    dim = feature_dim(fn, recipe, device, 3)
    head = LinearHead(dim, num_classes, torch.Generator().manual_seed(settings.seed)).to(device)

    def forward(x: Tensor) -> Tensor:
        with torch.no_grad():
            f = fn(x)
        return head(f.float())

    def modes() -> None:
        model.eval()
        head.train()

    loader = augmented_loader(train, torch.arange(len(train)), train_labels, recipe, settings)
    try:
        stats = train_classifier(
            forward,
            list(head.parameters()),
            loader,
            recipe,
            settings,
            device=device,
            train_modules=modes,
            console=console,
            show_progress=show_progress,
            description="linear (SGD)",
        )
    finally:
        model.train(was_training)
    return head, stats


def linear_sgd_eval(
    run_dir: Path | None,
    *,
    checkpoint: Path | None = None,
    trust_torchscript: bool = False,
    activation: str = "quick_gelu",
    layout: str | None = None,
    trust_pickle: bool = False,
    data: str | None = None,
    train_split: str | None = None,
    test_split: str | None = None,
    features: str | None = None,
    train_limit: int | None = None,
    test_limit: int | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    weight_decay: float | None = None,
    output: Path | None = None,
    console: Console | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """``clcli eval linear --protocol sgd``: train a linear classifier on frozen features, score the test split.

    ``run_dir``/``checkpoint`` as for :func:`clcli.evaluate.protocols.linear_eval`; ``epochs``,
    ``lr`` (at batch 256), ``batch_size`` and ``weight_decay`` override the recipe's
    ``eval.linear_sgd``.  The result (default ``RUN/eval/linear-sgd.json``) records every setting.
    """
    layer = check_layer(features) if features is not None else None
    if layer == "bank":
        raise ClcliError("--features bank applies to kNN only; the linear protocols use backbone or embedding features")
    prep = prepare(
        run_dir,
        "linear-sgd",
        checkpoint=checkpoint,
        trust_torchscript=trust_torchscript,
        activation=activation,
        layout=layout,
        trust_pickle=trust_pickle,
        data=data,
        train_split=train_split,
        test_split=test_split,
        train_limit=train_limit,
        test_limit=test_limit,
        output=output,
    )
    src, recipe = prep.loaded, prep.loaded.recipe
    layer = layer or check_layer(recipe.eval.features)
    if layer == "bank":
        layer = "backbone"  # the recipe's kNN reference set; the classifier reads the backbone
    settings = resolve_settings(
        recipe.eval.linear_sgd, recipe.seed, epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay
    )
    head, stats = train_linear_sgd(
        src.model,
        recipe,
        prep.train,
        prep.train_labels,
        prep.num_classes,
        settings,
        device=src.device,
        layer=layer,
        console=console,
        show_progress=show_progress,
    )
    fn = src.model.embed if layer == "embedding" else src.model.features  # type: ignore[union-attr]
    scores, n_test, skipped = score_split(
        _Probe(src.model, head),
        lambda x: head(fn(x).float()),
        prep.test,
        recipe,
        device=src.device,
        interpolation=src.interpolation,
        console=console,
        show_progress=show_progress,
        description=f"{prep.what['test_split']} scores",
    )
    result = {
        "protocol": "linear",
        "linear_protocol": "sgd",
        "top1": scores["top1"],
        "top5": scores["top5"],
        **stats,
        "features": layer,
        **prep.what,
        "feature_dim": int(head.fc.in_features),
        "num_classes": prep.num_classes,
        "n_train": len(prep.train),
        "n_test": n_test,
        "skipped_test_images": skipped,
        "settings": settings.describe(),
        "protocol_details": (
            "linear layer (after a batch norm without affine parameters) on frozen features of augmented training "
            f"images; {settings.summary()}"
        ),
        **src.describe(),
        "evaluated": timestamp(),
    }
    return write_result(result, prep.output)
