"""Linear probe: multinomial logistic regression on frozen features.

The standard linear evaluation of self-supervised representations (e.g. SimCLR,
arXiv:2002.05709, and the L-BFGS logistic-regression protocol of CLIP, arXiv:2103.00020): the
encoder is frozen, features are standardised, and an L2-regularised softmax classifier is fitted
by full-batch L-BFGS.  The regularisation strength is chosen on a held-out part of the training
split, and the classifier is then refitted on the whole training split and scored on the test
split.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from clcli.evaluate.knn import scores_accuracy

__all__ = ["fit_logistic_regression", "linear_probe", "stratified_split"]

# Problems at most this large (samples x features) are solved in float64.
_FLOAT64_LIMIT = 2_000_000


def stratified_split(labels: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices ``(fit, val)`` holding out about ``val_fraction`` of every class, seeded.

    Each class with at least two samples gives ``round(val_fraction x count)`` samples (at least
    one, and never all of them) to the validation part; single-sample classes stay in the fit part.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    g = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    fit: list[Tensor] = []
    val: list[Tensor] = []
    for cls in torch.unique(labels):
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_val = 0 if idx.numel() < 2 else min(max(1, round(val_fraction * idx.numel())), idx.numel() - 1)
        val.append(idx[:n_val])
        fit.append(idx[n_val:])
    return torch.cat(fit).sort().values, torch.cat(val).sort().values


def fit_logistic_regression(
    x: Tensor,
    y: Tensor,
    *,
    num_classes: int,
    l2: float,
    max_iter: int = 200,
    init: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Weights ``[C, D]`` and bias ``[C]`` minimising ``mean CE + l2/2 * ||W||^2`` by full-batch L-BFGS.

    The bias is not regularised.  In scikit-learn's terms (``C * sum CE + ||W||^2 / 2``) this is
    ``C = 1 / (l2 * n)``.  The solution is unique for ``l2 > 0``; the optimisation starts from
    zero, or from ``init = (weight, bias)`` (a warm start), and is deterministic.  Works in the
    dtype and on the device of ``x``.  (The ``[C, D]`` layout of :func:`torch.nn.functional.linear`
    makes the weight gradient ``g^T x``, several times faster on CPU than ``x^T g``.)
    """
    if init is None:
        weight = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, device=x.device)
        bias = torch.zeros(num_classes, dtype=x.dtype, device=x.device)
    else:
        weight, bias = (t.detach().to(device=x.device, dtype=x.dtype).clone() for t in init)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    tol = 1e-9 if x.dtype == torch.float64 else 1e-6
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=tol,
        tolerance_change=tol * 1e-3,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(F.linear(x, weight, bias), y) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def _predict(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return F.linear(x, weight, bias)


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    num_classes: int,
    l2_grid: list[float],
    val_fraction: float = 0.1,
    max_iter: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """Linear-probe accuracy of frozen features with an L2 strength chosen on held-out data.

    1. Features are standardised with the mean and standard deviation of the training split.
    2. If ``l2_grid`` has more than one value, a seeded, class-stratified ``val_fraction`` of the
       training split is held out; a classifier is fitted on the rest for each L2 strength (see
       :func:`fit_logistic_regression`; strongest first, each fit warm-started from the previous
       one) and the strength of best validation top-1 is chosen (ties: the strongest).
    3. The classifier is refitted on the whole training split with that strength (warm-started
       from its held-out fit) and scored on the test split.

    Problems of at most 2,000,000 feature values are solved in float64, larger ones in float32,
    on the device of ``train_x``.  Returns ``top1``/``top5`` (fractions), ``l2`` (chosen),
    ``val_top1`` (list of ``[l2, accuracy]`` pairs in grid order; empty without selection),
    ``train_top1``, the sizes used and a ``protocol`` description.
    """
    if not l2_grid:
        raise ValueError("l2_grid must hold at least one value")
    if any(v <= 0 for v in l2_grid):
        raise ValueError(f"l2 strengths must be positive, got {l2_grid}")
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError("train_x and test_x must be 2-d with the same number of features")
    n, d = train_x.shape
    device = train_x.device
    dtype = torch.float64 if n * d <= _FLOAT64_LIMIT else torch.float32
    xtr = train_x.to(dtype)
    mean = xtr.mean(dim=0)
    std = xtr.std(dim=0).clamp_min(1e-6) if n > 1 else torch.ones_like(mean)
    xtr = (xtr - mean) / std
    xte = (test_x.to(device=device, dtype=dtype) - mean) / std
    ytr = train_y.to(device=device, dtype=torch.long)
    yte = test_y.to(device=device, dtype=torch.long)

    val_results: list[list[float]] = []
    if len(l2_grid) > 1:
        fit_idx, val_idx = stratified_split(ytr, val_fraction, seed)
        if val_idx.numel() == 0:
            raise ValueError("too few training samples to hold out a validation part")
        fit_idx, val_idx = fit_idx.to(device), val_idx.to(device)
        x_fit, y_fit, x_val, y_val = xtr[fit_idx], ytr[fit_idx], xtr[val_idx], ytr[val_idx]
        accuracy: dict[float, float] = {}
        solutions: dict[float, tuple[Tensor, Tensor]] = {}
        previous: tuple[Tensor, Tensor] | None = None
        # Regularisation path from strong to weak, each fit warm-started from the previous one.
        for l2 in sorted({float(v) for v in l2_grid}, reverse=True):
            previous = fit_logistic_regression(
                x_fit, y_fit, num_classes=num_classes, l2=l2, max_iter=max_iter, init=previous
            )
            solutions[l2] = previous
            accuracy[l2] = (_predict(x_val, *previous).argmax(1) == y_val).double().mean().item()
        val_results = [[float(l2), accuracy[float(l2)]] for l2 in l2_grid]
        best = max(accuracy.values())
        chosen = max(l2 for l2, acc in accuracy.items() if acc == best)
        start: tuple[Tensor, Tensor] | None = solutions[chosen]
        n_val = int(val_idx.numel())
    else:
        chosen = float(l2_grid[0])
        start = None
        n_val = 0

    w, b = fit_logistic_regression(xtr, ytr, num_classes=num_classes, l2=chosen, max_iter=max_iter, init=start)
    test_acc = scores_accuracy(_predict(xte, w, b), yte)
    train_top1 = (_predict(xtr, w, b).argmax(1) == ytr).double().mean().item()
    selection = (
        f"L2 strength chosen from {list(map(float, l2_grid))} by top-1 on a class-stratified {val_fraction:g} "
        f"held-out part of the train split ({n_val} samples, seed {seed}), then refitted on all {n} train samples"
        if len(l2_grid) > 1
        else f"fixed L2 strength {chosen:g}, fitted on all {n} train samples"
    )
    protocol = (
        f"multinomial logistic regression on frozen, standardised (train mean/std) features; "
        f"loss mean cross-entropy + l2/2 ||W||^2 (bias unregularised); full-batch L-BFGS (strong Wolfe, "
        f"max_iter {max_iter}, {str(dtype).removeprefix('torch.')}); {selection}; scored on {xte.shape[0]} test samples"
    )
    return {
        **test_acc,
        "l2": chosen,
        "val_top1": val_results,
        "train_top1": train_top1,
        "n_train": n,
        "n_val": n_val,
        "n_test": int(xte.shape[0]),
        "protocol": protocol,
    }
