"""Weighted kNN vote and linear probe, checked against independent reference computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from clcli.evaluate.knn import knn_accuracy, knn_scores
from clcli.evaluate.linear import linear_probe, stratified_split


def _brute_force_knn(train: np.ndarray, labels: np.ndarray, test: np.ndarray, k: int, t: float, c: int) -> np.ndarray:
    """fp64 reference: full similarity matrix, argsort, explicit vote loop."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    sims = test @ train.T
    k = min(k, train.shape[0])
    scores = np.zeros((test.shape[0], c))
    for i in range(test.shape[0]):
        order = np.argsort(-sims[i], kind="stable")[:k]
        for j in order:
            scores[i, labels[j]] += np.exp(sims[i, j] / t)
    return scores


def _random_problem(n: int, m: int, d: int, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g), torch.randn(m, d, generator=g)


@pytest.mark.parametrize(("k", "t", "chunk"), [(1, 0.1, 7), (10, 0.07, 1024), (20, 0.5, 16), (500, 0.1, 13)])
def test_knn_matches_brute_force(k: int, t: float, chunk: int) -> None:
    train, labels, test = _random_problem(200, 50, 16, 5, seed=k)
    ours = knn_scores(train, labels, test, k=k, temperature=t, num_classes=5, chunk_size=chunk)
    ref = _brute_force_knn(train.double().numpy(), labels.numpy(), test.double().numpy(), k, t, 5)
    assert ours.shape == (50, 5)
    np.testing.assert_allclose(ours.double().numpy(), ref, rtol=1e-4)
    assert np.array_equal(ours.argmax(1).numpy(), ref.argmax(1))


def test_knn_k_larger_than_train_set() -> None:
    train, labels, test = _random_problem(12, 9, 8, 3, seed=1)
    scores = knn_scores(train, labels, test, k=100, temperature=0.1, num_classes=3)
    ref = _brute_force_knn(train.double().numpy(), labels.numpy(), test.double().numpy(), 12, 0.1, 3)
    np.testing.assert_allclose(scores.double().numpy(), ref, rtol=1e-4)
    result = knn_accuracy(train, labels, test, torch.zeros(9, dtype=torch.long), k=100, temperature=0.1, num_classes=3)
    assert result["k"] == 12
    assert result["top5"] == 1.0  # fewer than 5 classes: top-5 is over all classes


def test_knn_temperature_effect() -> None:
    # One very close neighbour of class 0 against three farther ones of class 1: a low temperature
    # lets the closest neighbour win, a high one turns the vote into a majority vote.
    train = torch.tensor([[1.0, 0.05], [1.0, 0.6], [1.0, -0.6], [1.0, 0.7]])
    labels = torch.tensor([0, 1, 1, 1])
    test = torch.tensor([[1.0, 0.0]])
    cold = knn_scores(train, labels, test, k=4, temperature=0.01, num_classes=2)
    hot = knn_scores(train, labels, test, k=4, temperature=10.0, num_classes=2)
    assert cold.argmax(1).item() == 0
    assert hot.argmax(1).item() == 1


def test_knn_scale_invariant_and_accuracy() -> None:
    train, labels, test = _random_problem(300, 40, 8, 10, seed=3)
    a = knn_scores(train, labels, test, k=5, temperature=0.1, num_classes=10)
    b = knn_scores(3.0 * train, labels, 0.5 * test, k=5, temperature=0.1, num_classes=10)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
    # Testing on the training set with k=1: every sample is its own nearest neighbour.
    result = knn_accuracy(train, labels, train, labels, k=1, temperature=0.1, num_classes=10)
    assert result["top1"] == 1.0 and result["top5"] == 1.0 and result["temperature"] == 0.1


def _separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[6.0, 0.0, 0.0], [0.0, 6.0, 0.0], [0.0, 0.0, 6.0], [-6.0, -6.0, 0.0]])
    y = torch.randint(0, 4, (n,), generator=g)
    return centers[y] + torch.randn(n, 3, generator=g), y


def test_linear_probe_separable() -> None:
    xtr, ytr = _separable(400, 0)
    xte, yte = _separable(200, 1)
    grid = [1e-4, 1e-2, 1.0]
    result = linear_probe(xtr, ytr, xte, yte, num_classes=4, l2_grid=grid)
    assert result["top1"] >= 0.99
    assert result["top5"] == 1.0
    assert result["l2"] in grid
    assert [v[0] for v in result["val_top1"]] == grid
    assert result["n_val"] == 40 and "L-BFGS" in result["protocol"]


def test_linear_probe_deterministic() -> None:
    xtr, ytr = _separable(300, 2)
    xtr = xtr + 2.0 * torch.randn(xtr.shape, generator=torch.Generator().manual_seed(5))  # overlap classes
    xte, yte = _separable(100, 3)
    kw = {"num_classes": 4, "l2_grid": [1e-3, 1e-1, 1.0], "seed": 7}
    assert linear_probe(xtr, ytr, xte, yte, **kw) == linear_probe(xtr, ytr, xte, yte, **kw)


def test_stratified_split() -> None:
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 1)
    fit, val = stratified_split(y, 0.2, seed=0)
    assert sorted(torch.cat([fit, val]).tolist()) == list(range(81))
    assert torch.bincount(y[val], minlength=3).tolist() == [10, 6, 0]
    assert torch.equal(val, stratified_split(y, 0.2, seed=0)[1])
    assert not torch.equal(val, stratified_split(y, 0.2, seed=1)[1])


def test_linear_probe_agrees_with_sklearn_on_digits() -> None:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1200], perm[1200:]
    l2 = 1e-3
    ours = linear_probe(x[tr], y[tr], x[te], y[te], num_classes=10, l2_grid=[l2], max_iter=500)

    mean, std = x[tr].double().mean(0), x[tr].double().std(0).clamp_min(1e-6)
    xs_tr, xs_te = ((x[tr] - mean) / std).numpy(), ((x[te] - mean) / std).numpy()
    clf = LogisticRegression(C=1.0 / (l2 * len(tr)), max_iter=5000, tol=1e-8)
    clf.fit(xs_tr, y[tr].numpy())
    ref = float((clf.predict(xs_te) == y[te].numpy()).mean())
    assert ours["top1"] > 0.9
    assert abs(ours["top1"] - ref) <= 0.02
