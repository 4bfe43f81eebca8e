"""Online evaluation during training: weighted kNN of the current backbone on the recipe's own splits."""

from __future__ import annotations

from collections.abc import Callable

import torch

from clcli.errors import DataError
from clcli.evaluate.features import FeatureSet, extract_features
from clcli.evaluate.knn import knn_accuracy
from clcli.evaluate.loader import open_split
from clcli.methods.base import Method
from clcli.recipe import Recipe


def make_online_knn(recipe: Recipe, device: torch.device) -> Callable[[Method], dict[str, float]] | None:
    """An evaluator that scores the current backbone by kNN (``eval.knn_k``, ``eval.knn_temperature``).

    The reference set is the training split (``data.limit`` applies), the test set the test split;
    None when the data has no labelled test split to score on.
    """
    data = recipe.data
    try:
        train = open_split(recipe, data.source, data.train_split, data.limit)
        test = open_split(recipe, data.source, data.test_split, None)
    except DataError:
        return None

    def evaluate(method: Method) -> dict[str, float]:
        feats: list[FeatureSet] = [
            extract_features(method, src, recipe, device=device, layer="backbone", show_progress=False)
            for src in (train, test)
        ]
        assert feats[0].labels is not None and feats[1].labels is not None
        num_classes = int(max(feats[0].labels.max(), feats[1].labels.max())) + 1
        res = knn_accuracy(
            feats[0].features,
            feats[0].labels,
            feats[1].features,
            feats[1].labels,
            k=recipe.eval.knn_k,
            temperature=recipe.eval.knn_temperature,
            num_classes=num_classes,
        )
        skipped = feats[0].skipped + feats[1].skipped
        return {"knn_top1": res["top1"], **({"knn_skipped_images": skipped} if skipped else {})}

    return evaluate
