"""Evaluation protocols on frozen features of a run or an imported CLIP file: weighted kNN and the linear probe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from clcli.errors import ClcliError
from clcli.evaluate.features import FeatureSet, extract_features
from clcli.evaluate.knn import knn_accuracy
from clcli.evaluate.linear import linear_probe
from clcli.evaluate.loader import Loaded, check_layer, load_for_result, open_split
from clcli.evaluate.results import timestamp, write_result
from clcli.methods.base import Method
from clcli.recipe import Recipe


def check_limits(train_limit: int | None, test_limit: int | None) -> None:
    """Refuse a ``--train-limit`` or ``--test-limit`` below 1."""
    for flag, value in (("--train-limit", train_limit), ("--test-limit", test_limit)):
        if value is not None and value < 1:
            raise ClcliError(f"{flag} must be at least 1 (the number of images to use), got {value}")


def skipped_counts(train: FeatureSet, test: FeatureSet) -> dict[str, int]:
    """How many unreadable image files each split left out (``data.skip_bad_images``), as results record it."""
    return {
        "skipped_images": train.skipped + test.skipped,
        "skipped_train_images": train.skipped,
        "skipped_test_images": test.skipped,
    }


def _split_features(
    loaded: Loaded,
    data: str | None,
    train_split: str | None,
    test_split: str | None,
    features: str | None,
    train_limit: int | None,
    test_limit: int | None,
    console: Console | None,
    show_progress: bool,
    *,
    allow_bank: bool,
) -> tuple[FeatureSet, FeatureSet, int, dict[str, Any]]:
    """Reference and test features, the number of classes, and what they are (data, splits, layer)."""
    recipe, model, device = loaded.recipe, loaded.model, loaded.device
    spec = data or recipe.data.source
    splits = (train_split or recipe.data.train_split, test_split or recipe.data.test_split)
    layer = check_layer(features or recipe.eval.features)
    if layer == "bank":
        if not allow_bank:
            raise ClcliError(
                "--features bank applies to kNN only; the linear probe uses backbone or embedding features"
            )
        if not isinstance(model, Method):
            raise ClcliError("--features bank needs a run with a memory bank, not a checkpoint file")
        train, test, num_classes = _bank_features(
            model, recipe, data, train_split, train_limit, test_limit, device, console, show_progress
        )
        splits = (f"{recipe.data.train_split} (memory bank)", splits[1])
    else:
        if train_limit is None and data is None:
            train_limit = recipe.data.limit
        train, test, num_classes = _features(
            model,
            recipe,
            spec,
            splits,
            (train_limit, test_limit),
            layer,
            device,
            console,
            show_progress,
            loaded.interpolation,
        )
    assert train.labels is not None and test.labels is not None
    what = {"features": layer, "data": spec, "train_split": splits[0], "test_split": splits[1]}
    return train, test, num_classes, what


def _features(
    method: torch.nn.Module,
    recipe: Recipe,
    spec: str,
    splits: tuple[str, str],
    limits: tuple[int | None, int | None],
    layer: str,
    device: torch.device,
    console: Console | None,
    show_progress: bool,
    interpolation: str = "bilinear",
) -> tuple[FeatureSet, FeatureSet, int]:
    sets = []
    classes = None
    for split, limit in zip(splits, limits, strict=True):
        source = open_split(recipe, spec, split, limit)
        classes = classes or source.classes
        sets.append(
            extract_features(
                method,
                source,
                recipe,
                device=device,
                layer=layer,
                show_progress=show_progress,
                console=console,
                description=f"{split} features",
                interpolation=interpolation,
            )
        )
    train, test = sets
    assert train.labels is not None and test.labels is not None
    num_classes = len(classes) if classes else int(max(train.labels.max(), test.labels.max())) + 1
    return train, test, num_classes


def _bank_features(
    method: Method,
    recipe: Recipe,
    data: str | None,
    train_split: str | None,
    train_limit: int | None,
    test_limit: int | None,
    device: torch.device,
    console: Console | None,
    show_progress: bool,
) -> tuple[FeatureSet, FeatureSet, int]:
    """kNN over a memory bank (InstDisc, arXiv:1805.01978): the bank's rows, labelled by the run's own
    training split, are the reference set; the test images are embedded with the method's ``embed``."""
    if not method.has_bank_features:
        raise ClcliError(
            f"--features bank needs a method with a memory bank; {recipe.method.name} has none "
            "(use --features backbone or embedding)"
        )
    d = recipe.data
    if (data is not None and data != d.source) or (train_split is not None and train_split != d.train_split):
        raise ClcliError(
            f"--features bank votes with the memory bank of the images the run trained on ({d.source}, split "
            f"{d.train_split!r}); leave out --data and --train-split (or give exactly those)"
        )
    if train_limit is not None and train_limit != d.limit:
        raise ClcliError("--features bank uses every bank row; leave out --train-limit")
    source = open_split(recipe, d.source, d.train_split, d.limit)
    vectors = method.bank_features()
    if vectors.shape[0] != len(source):
        raise ClcliError(
            f"the memory bank has {vectors.shape[0]} rows but the training split {d.train_split!r} of {d.source} "
            f"now has {len(source)} images; the bank can only be labelled by the data it was trained on"
        )
    labels = source.labels()
    assert labels is not None
    test_source = open_split(recipe, d.source, d.test_split, test_limit)
    test = extract_features(
        method,
        test_source,
        recipe,
        device=device,
        layer="embedding",
        show_progress=show_progress,
        console=console,
        description=f"{d.test_split} embeddings",
    )
    assert test.labels is not None
    classes = source.classes or test_source.classes
    num_classes = len(classes) if classes else int(max(labels.max(), test.labels.max())) + 1
    return FeatureSet(vectors, labels), test, num_classes


def knn_eval(
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
    k: int | None = None,
    temperature: float | None = None,
    features: str | None = None,
    train_limit: int | None = None,
    test_limit: int | None = None,
    output: Path | None = None,
    console: Console | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Weighted kNN (votes exp(s/T) over the top k by cosine similarity) from one split to another.

    ``run_dir`` is a run folder; or ``None`` with ``checkpoint`` a pretrained CLIP file (OpenAI /
    open_clip layout) and ``data`` the labelled images: its image tower is evaluated.
    """
    if features is not None:
        check_layer(features)
    check_limits(train_limit, test_limit)
    if k is not None and k < 1:
        raise ClcliError(f"--k must be at least 1, got {k}")
    src, out = load_for_result(
        "knn",
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
    k = k or src.recipe.eval.knn_k
    t = temperature or src.recipe.eval.knn_temperature
    train, test, num_classes, what = _split_features(
        src, data, train_split, test_split, features, train_limit, test_limit, console, show_progress, allow_bank=True
    )
    assert train.labels is not None and test.labels is not None
    scores = knn_accuracy(
        train.features, train.labels, test.features, test.labels, k=k, temperature=t, num_classes=num_classes
    )
    result = {
        "protocol": "knn",
        "top1": scores["top1"],
        "top5": scores["top5"],
        "k": scores["k"],  # the neighbours that voted: min(k asked, reference images)
        "k_requested": k,
        "temperature": t,
        **what,
        "feature_dim": int(train.features.shape[1]),
        "train_images": int(train.features.shape[0]),
        "test_images": int(test.features.shape[0]),
        **skipped_counts(train, test),
        **src.describe(),
        "evaluated": timestamp(),
    }
    return write_result(result, out)


def linear_eval(
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
    output: Path | None = None,
    console: Console | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Logistic regression on frozen, pre-extracted features; L2 strength chosen on held-out train data.

    ``run_dir`` and ``checkpoint`` as for :func:`knn_eval`.
    """
    if features is not None:
        check_layer(features)
    check_limits(train_limit, test_limit)
    src, out = load_for_result(
        "linear",
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
    recipe = src.recipe
    train, test, num_classes, what = _split_features(
        src, data, train_split, test_split, features, train_limit, test_limit, console, show_progress, allow_bank=False
    )
    assert train.labels is not None and test.labels is not None
    res = linear_probe(
        train.features,
        train.labels,
        test.features,
        test.labels,
        num_classes=num_classes,
        l2_grid=list(recipe.eval.linear_l2),
        val_fraction=recipe.eval.linear_val_fraction,
        max_iter=recipe.eval.linear_max_iter,
        seed=recipe.seed,
    )
    result = {
        **res,
        **what,
        **skipped_counts(train, test),
        **src.describe(),
    }
    result["protocol"] = "linear"
    result["protocol_details"] = res.get("protocol")
    return write_result(result, out)
