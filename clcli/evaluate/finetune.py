"""Fine-tuning evaluation: the whole encoder and a linear head trained on labelled images, optionally on a
fixed, class-balanced fraction of the labels.

This is the semi-supervised protocol of SimCLR (arXiv:2002.05709, section 6 and appendix B.5) and
BYOL (arXiv:2006.07733): start from the self-supervised encoder, add a linear layer, and train both
with Nesterov-momentum SGD on 1 % or 10 % of the labelled training images (or all of them),
augmented by random resized crops and flips only, without weight decay, for 60 (1 %) or 30 (10 %)
epochs; the settings are the recipe's ``eval.finetune``.  The labelled subset is drawn once per
fraction and seed, balanced over the classes, and saved as a JSON file that later runs read back,
so that every encoder compared is fine-tuned on the same images.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import Tensor, nn

from clcli.errors import ClcliError
from clcli.evaluate.results import timestamp, write_result
from clcli.evaluate.supervised import (
    SgdSettings,
    augmented_loader,
    balanced_subset,
    class_counts,
    feature_dim,
    indices_digest,
    prepare,
    resolve_settings,
    score_split,
    train_classifier,
)
from clcli.fsio import atomic_output
from clcli.recipe import Recipe

__all__ = ["FineTuned", "finetune", "finetune_eval", "label_subset"]

SUBSET_FORMAT = "clcli-label-subset-1"


class FineTuned(nn.Module):
    """The encoder (``model.features``) followed by a linear layer: images to class scores."""

    def __init__(self, model: nn.Module, dim: int, num_classes: int, generator: torch.Generator) -> None:
        super().__init__()
        self.model = model
        self.fc = nn.Linear(dim, num_classes)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(num_classes, dim, generator=generator) * 0.01)
            self.fc.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.model.features(x).float())  # type: ignore[operator]


def _subset_name(fraction: float | None) -> str:
    return "finetune" if fraction is None else f"finetune-{fraction * 100:g}pct"


def label_subset(
    labels: Tensor,
    fraction: float,
    seed: int,
    file: Path | None,
    describe: dict[str, Any],
) -> tuple[Tensor, dict[str, Any]]:
    """The indices of the labelled images to fine-tune on, and what results record about them.

    With ``file`` an existing subset file, its indices are read back (refused when it was drawn from
    another split, size or fraction); otherwise a class-balanced subset is drawn
    (:func:`~clcli.evaluate.supervised.balanced_subset`) and, with ``file`` given, saved there.
    ``describe`` (the data and split) is stored in the file and checked on reading.
    """
    want = {"format": SUBSET_FORMAT, **describe, "split_size": int(labels.numel()), "fraction": fraction}
    if file is not None and Path(file).is_file():
        try:
            saved = json.loads(Path(file).read_text())
            indices = torch.tensor([int(i) for i in saved["indices"]], dtype=torch.long)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ClcliError(f"{file} is not a label subset written by clcli eval finetune: {exc}") from None
        for key, value in want.items():
            if saved.get(key) != value:
                raise ClcliError(
                    f"the label subset {file} was drawn with {key} {saved.get(key)!r}, not {value!r}; "
                    "give another --labels-file (or remove this one to draw a new subset)"
                )
        if indices.numel() == 0 or int(indices.min()) < 0 or int(indices.max()) >= labels.numel():
            raise ClcliError(f"the label subset {file} holds indices outside the split's {labels.numel()} images")
        source = "read"
    else:
        indices = balanced_subset(labels, fraction, seed)
        source = "drawn"
        if file is not None:
            body = {**want, "seed": seed, "class_counts": class_counts(labels[indices]), "indices": indices.tolist()}
            with atomic_output(Path(file), "the label subset file") as tmp:
                tmp.write_text(json.dumps(body) + "\n")
    info = {
        "fraction": fraction,
        "images": int(indices.numel()),
        "seed": seed,
        "file": None if file is None else str(file),
        "subset": source,
        "indices_sha256": indices_digest(indices),
        "class_counts": class_counts(labels[indices]),
    }
    return indices, info


def finetune(
    model: nn.Module,
    recipe: Recipe,
    train: Any,
    train_labels: Tensor,
    indices: Tensor,
    num_classes: int,
    settings: SgdSettings,
    *,
    device: torch.device,
    console: Console | None = None,
    show_progress: bool = False,
) -> tuple[FineTuned, dict[str, float]]:
    """Train ``model`` (through its ``features``) with a new linear head on the images ``indices`` of ``train``.

    Every parameter of ``model`` is trained (frozen ones are unfrozen); the ones its features do not
    use get no gradient and stay as they are.  Batch norms train in training mode.  Returns the
    network (on ``device``) and the last epoch's loss and training top-1.
    """
    model.eval()
    dim = feature_dim(model.features, recipe, device, 3)  # type: ignore[arg-type]
    net = FineTuned(model, dim, num_classes, torch.Generator().manual_seed(settings.seed)).to(device)
    for p in net.parameters():
        p.requires_grad_(True)
    loader = augmented_loader(train, indices, train_labels, recipe, settings)
    stats = train_classifier(
        net,
        list(net.parameters()),
        loader,
        recipe,
        settings,
        device=device,
        train_modules=lambda: net.train(),
        console=console,
        show_progress=show_progress,
        description="fine-tuning",
    )
    net.eval()
    return net, stats


def finetune_eval(
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
    labels: float | None = None,
    labels_file: Path | None = None,
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
    """``clcli eval finetune``: fine-tune the encoder with a linear head and score the test split.

    ``labels``: the fraction of the training split's labels used (None: all).  Its subset is saved
    to ``labels_file`` (default ``RUN/eval/labels-<pct>pct.json`` for a run, beside ``output`` for a
    file) and read back from there on the next evaluation.  The result (default
    ``RUN/eval/finetune[-<pct>pct].json``) records the settings and the subset.  The run's own
    checkpoint is never changed: the fine-tuned network lives in memory only.
    """
    if labels is not None and not 0.0 < labels <= 1.0:
        raise ClcliError(f"--labels must be a fraction in (0, 1] (e.g. 0.01 or 0.1), got {labels:g}")
    if labels_file is not None and labels is None:
        raise ClcliError("--labels-file holds the subset of a label fraction: give --labels FRACTION too")
    prep = prepare(
        run_dir,
        _subset_name(labels),
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
    settings = resolve_settings(
        recipe.eval.finetune,
        recipe.seed,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        weight_decay=weight_decay,
        default_epochs=recipe.eval.finetune.epochs_for(labels),
    )
    subset: dict[str, Any] | None = None
    if labels is None:
        indices = torch.arange(len(prep.train))
    else:
        if labels_file is None:
            if src.run_dir is not None:
                labels_file = src.run_dir / "eval" / f"labels-{labels * 100:g}pct.json"
            elif prep.output is not None:
                labels_file = prep.output.with_name(f"{prep.output.stem}.labels.json")
        described = {"data": prep.what["data"], "split": prep.what["train_split"]}
        indices, subset = label_subset(prep.train_labels, labels, recipe.seed, labels_file, described)
    net, stats = finetune(
        src.model,
        recipe,
        prep.train,
        prep.train_labels,
        indices,
        prep.num_classes,
        settings,
        device=src.device,
        console=console,
        show_progress=show_progress,
    )
    scores, n_test, skipped = score_split(
        net,
        net,
        prep.test,
        recipe,
        device=src.device,
        interpolation=src.interpolation,
        console=console,
        show_progress=show_progress,
        description=f"{prep.what['test_split']} scores",
    )
    result = {
        "protocol": "finetune",
        "top1": scores["top1"],
        "top5": scores["top5"],
        **stats,
        "label_fraction": labels,
        "label_subset": subset,
        **prep.what,
        "feature_dim": int(net.fc.in_features),
        "num_classes": prep.num_classes,
        "n_train": int(indices.numel()),
        "train_split_images": len(prep.train),
        "n_test": n_test,
        "skipped_test_images": skipped,
        "settings": settings.describe(),
        "protocol_details": (
            f"whole encoder + linear head fine-tuned on {int(indices.numel())} labelled training images"
            + ("" if labels is None else f" (a class-balanced {labels:g} of the split)")
            + f"; {settings.summary()}"
        ),
        **src.describe(),
        "evaluated": timestamp(),
    }
    return write_result(result, prep.output)
