"""DeepCluster (arXiv:1807.05520) and the clustering pieces: k-means, PCA-whitening, NMI, sampling, resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clcli.assemble import prepare_training
from clcli.errors import RecipeError, TrainingError
from clcli.losses import deepcluster_loss
from clcli.methods.base import Batch
from clcli.methods.clustering import kmeans, normalized_mutual_info, pca_whitening
from clcli.methods.deepcluster import SobelFilter, uniform_cluster_order
from clcli.recipe import load_recipe
from clcli.runs import load_run
from clcli.train import pretrain
from clcli.views import ViewMaker, normalize_batch

from .helpers import losses, metric_rows, tiny_recipe


def tiny(*extra: str):
    return tiny_recipe("deepcluster", *extra)


# ------------------------------------------------------------------------------------ k-means
def _blobs(centres: torch.Tensor, per: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([c + spread * torch.randn(per, centres.shape[1], generator=g) for c in centres])
    truth = torch.arange(len(centres)).repeat_interleave(per)
    return x, truth


def test_kmeans_recovers_well_separated_clusters_in_chunks():
    g = torch.Generator().manual_seed(0)
    centres = 10 * torch.randn(5, 8, generator=g)
    x, _ = _blobs(centres, 40, 0.3, seed=1)
    x = x[torch.randperm(len(x), generator=g)]
    whole = kmeans(x, 5, iters=20, generator=torch.Generator().manual_seed(3), chunk_size=10_000)
    chunked = kmeans(x, 5, iters=20, generator=torch.Generator().manual_seed(3), chunk_size=7)
    assert torch.equal(whole.assignments, chunked.assignments)
    # every true blob maps to exactly one cluster: the centroids are the blob means
    found = sorted(whole.centroids.tolist())
    for c in centres:
        nearest = min(found, key=lambda f: float(((torch.tensor(f) - c) ** 2).sum()))
        assert float(((torch.tensor(nearest) - c) ** 2).sum()) < 0.5
    assert whole.empty == 0 and whole.loss < 8 * 0.3**2 * 1.5


def test_kmeans_partition_matches_the_blobs():
    g = torch.Generator().manual_seed(4)
    centres = 8 * torch.randn(4, 3, generator=g)
    x, truth = _blobs(centres, 30, 0.2, seed=5)
    result = kmeans(x, 4, iters=20, generator=torch.Generator().manual_seed(0))
    assert normalized_mutual_info(result.assignments, truth) == pytest.approx(1.0)


def test_kmeans_reseeds_empty_clusters_from_a_non_empty_one():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x, _ = _blobs(centres, 50, 0.5, seed=2)
    # the fourth initial centroid is far from every point: empty after the first assignment
    init = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [1000.0, 1000.0]])
    result = kmeans(x, 4, iters=10, generator=torch.Generator().manual_seed(0), init=init)
    assert result.reseeded >= 1
    counts = torch.bincount(result.assignments, minlength=4)
    assert bool((counts > 0).all()) and result.empty == 0
    # the re-seeded centroid split one blob: it sits within that blob, not far away
    assert float(result.centroids.norm(dim=1).max()) < 20
    # without re-seeding the far centroid would stay empty (one iteration shows the raw assignment)
    raw = kmeans(x, 4, iters=0, init=init)
    assert raw.empty == 1


def test_kmeans_rejects_bad_input():
    with pytest.raises(ValueError, match="at least as many points"):
        kmeans(torch.randn(3, 2), 5)
    with pytest.raises(ValueError, match=r"\[N, d\]"):
        kmeans(torch.randn(3), 2)


# ----------------------------------------------------------------------------- PCA-whitening
def test_pca_whitening_output_is_decorrelated_with_unit_variance():
    g = torch.Generator().manual_seed(0)
    mixing = torch.randn(12, 12, generator=g)
    x = torch.randn(4000, 12, generator=g) @ mixing + 5.0  # correlated, shifted
    pca = pca_whitening(x, dim=6, chunk_size=777)
    y = pca(x, chunk_size=333).double()
    assert y.shape == (4000, 6) and pca.dim == 6
    assert torch.allclose(y.mean(0), torch.zeros(6, dtype=torch.float64), atol=1e-4)
    cov = torch.cov(y.t())
    assert torch.allclose(cov, torch.eye(6, dtype=torch.float64), atol=1e-3)
    # the kept directions are the leading principal axes (numpy's eigen-decomposition as reference)
    xn = x.double().numpy()
    evals, evecs = np.linalg.eigh(np.cov(xn.T))
    top = evecs[:, ::-1][:, :6]
    overlap = np.abs(top.T @ pca.components.numpy())
    assert np.allclose(np.diag(overlap), 1.0, atol=1e-6)
    assert np.allclose(pca.eigenvalues.numpy(), evals[::-1][:6], rtol=1e-6)
    # more dimensions asked than there are: capped
    assert pca_whitening(x, dim=256).dim == 12


# ------------------------------------------------------------------------------------------ NMI
@pytest.mark.parametrize("average", ["arithmetic", "geometric"])
def test_nmi_matches_scikit_learn(average):
    from sklearn.metrics import normalized_mutual_info_score

    g = torch.Generator().manual_seed(0)
    for ka, kb in ((5, 7), (30, 3), (2, 2)):
        a = torch.randint(ka, (500,), generator=g)
        b = torch.where(torch.rand(500, generator=g) < 0.6, a % kb, torch.randint(kb, (500,), generator=g)) * 3 + 11
        ours = normalized_mutual_info(a, b, average=average)
        theirs = normalized_mutual_info_score(a.numpy(), b.numpy(), average_method=average)
        assert ours == pytest.approx(theirs, abs=1e-10)
    same = torch.randint(9, (200,), generator=g)
    assert normalized_mutual_info(same, 100 - same) == pytest.approx(1.0)
    assert normalized_mutual_info(torch.zeros(10, dtype=torch.long), torch.zeros(10, dtype=torch.long)) == 1.0


# --------------------------------------------------------------------------------- loss, Sobel
def test_deepcluster_loss_matches_the_papers_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g, dtype=torch.float64)
    labels = torch.randint(4, (6,), generator=g)
    ref = 0.0
    for s, y in zip(logits.tolist(), labels.tolist(), strict=True):
        ref += -math.log(math.exp(s[y]) / sum(math.exp(v) for v in s))
    assert deepcluster_loss(logits, labels).item() == pytest.approx(ref / 6, rel=1e-6)
    with pytest.raises(ValueError, match="deepcluster_loss"):
        deepcluster_loss(logits, labels[:3])


def test_sobel_filter_is_fixed_and_gives_gradients():
    sobel = SobelFilter()
    assert not list(sobel.parameters()) and not sobel.state_dict()
    flat = torch.full((1, 3, 6, 6), 0.7)
    assert torch.allclose(sobel(flat)[..., 1:-1, 1:-1], torch.zeros(1, 2, 4, 4), atol=1e-6)
    ramp = torch.arange(6.0).view(1, 1, 1, 6).expand(1, 3, 6, 6)  # brightness grows to the right
    out = sobel(ramp)[..., 1:-1, 1:-1]
    assert torch.allclose(out[:, 0], torch.full((1, 4, 4), -8.0)) and torch.allclose(out[:, 1], torch.zeros(1, 4, 4))


# ----------------------------------------------------------------------------------- sampling
def test_sampling_is_uniform_over_clusters_and_deterministic():
    a = torch.cat([torch.zeros(900), torch.ones(90), torch.full((9,), 2), torch.full((1,), -1)]).long()
    order = uniform_cluster_order(a, torch.Generator().manual_seed(0))
    again = uniform_cluster_order(a, torch.Generator().manual_seed(0))
    assert torch.equal(order, again)
    assert len(order) == len(a) and int(order.max()) < len(a)
    assert not bool((a[order] < 0).any())  # an unclustered image is never drawn
    counts = torch.bincount(a[order], minlength=3)
    assert counts.min() > 300 and counts.max() < 367  # ≈ 1000 / 3 each, however unequal the clusters
    # the big cluster is sampled without replacement
    big = order[a[order] == 0]
    assert len(torch.unique(big)) == len(big)
    assert uniform_cluster_order(torch.full((5,), -1), torch.Generator()) is None


# ------------------------------------------------------------------------------------- method
def test_recipe_needs_a_two_channel_backbone_with_sobel(tmp_path):
    with pytest.raises(RecipeError, match="in_channels"):
        prepare_training(tiny("model.backbone.in_channels=3"), tmp_path / "a")
    with pytest.raises(RecipeError, match="in_channels"):
        prepare_training(tiny("method.sobel=false"), tmp_path / "b")
    with pytest.raises(RecipeError, match="num_clusters"):
        prepare_training(tiny("method.num_clusters=500"), tmp_path / "c")
    m = prepare_training(tiny("method.num_clusters=null", "method.clusters_per_class=3"), tmp_path / "d").method
    assert m.num_clusters == 30  # 3 x the 10 digit classes
    with pytest.raises(TrainingError, match="no pseudo-labels"):
        m.training_step(None, 0)  # type: ignore[arg-type]


def test_classifier_is_reinitialised_every_epoch_with_fresh_optimiser_state(tmp_path):
    stages = prepare_training(tiny("trainer.steps=7"), tmp_path / "run")
    m, opt = stages.method, stages.trainer.optimizer
    events: list[dict] = []
    orig_start, orig_before, orig_after = m.on_epoch_start, m.before_step, m.after_step

    def on_epoch_start(epoch, step):
        before = m.classifier.weight.detach().clone()
        out = orig_start(epoch, step)
        events.append(
            {
                "epoch": epoch,
                "before": before,
                "after": m.classifier.weight.detach().clone(),
                "bias": m.classifier.bias.detach().clone(),
                "step": step,
            }
        )
        return out

    grads: dict[int, torch.Tensor] = {}

    def before_step(step):
        grads[step] = m.classifier.bias.grad.detach().clone()
        orig_before(step)

    buffers: dict[int, torch.Tensor] = {}

    def after_step(step):
        buffers[step] = opt.state[m.classifier.bias]["momentum_buffer"].clone()
        orig_after(step)

    m.on_epoch_start, m.before_step, m.after_step = on_epoch_start, before_step, after_step  # type: ignore[method-assign]
    stages.trainer.fit()
    assert [e["epoch"] for e in events] == [0, 1, 2] and [e["step"] for e in events] == [0, 3, 6]
    for e in events[1:]:
        assert not torch.allclose(e["before"], e["after"])  # trained weights replaced
        assert float(e["after"].std()) == pytest.approx(0.01, rel=0.3) and abs(float(e["after"].mean())) < 0.005
        assert torch.equal(e["bias"], torch.zeros_like(e["bias"]))
    assert not torch.equal(events[1]["after"], events[2]["after"])
    # first step of each epoch: the momentum buffer is that step's gradient alone (a fresh optimiser);
    # inside an epoch it accumulates (0.9 x previous + gradient)
    for first in (0, 3, 6):
        assert torch.equal(buffers[first], grads[first])
    assert torch.allclose(buffers[4], 0.9 * buffers[3] + grads[4])
    # the rest of the network keeps its momentum across the boundary
    w = next(m.backbone.parameters())
    assert opt.state[w]["momentum_buffer"].abs().sum() > 0


def test_epochs_log_nmi_and_resume_reproduces_the_loss_sequence_bitwise(tmp_path):
    recipe = tiny("trainer.steps=7", "trainer.checkpoint_every=2")
    pretrain(recipe, tmp_path / "full")
    full = metric_rows(tmp_path / "full")
    epoch_rows = [r for r in full if "kmeans_loss" in r]
    assert [r["epoch"] for r in epoch_rows] == [0, 1, 2]
    assert "nmi_previous_epoch" not in epoch_rows[0]
    assert all(0 <= r["nmi_previous_epoch"] <= 1 for r in epoch_rows[1:])
    assert all(0 <= r["nmi_labels"] <= 1 for r in epoch_rows)
    for stop in (3, 4):  # exactly at an epoch boundary, then in the middle of epoch 1
        stages = prepare_training(recipe, tmp_path / f"cut{stop}")
        assert stages.trainer.fit(stop_after=stop)["interrupted"]
        pretrain(recipe, tmp_path / f"cut{stop}", resume=True)
        assert losses(tmp_path / f"cut{stop}") == losses(tmp_path / "full")
        cut_epochs = [r for r in metric_rows(tmp_path / f"cut{stop}") if "kmeans_loss" in r]
        assert [r["kmeans_loss"] for r in cut_epochs] == [r["kmeans_loss"] for r in epoch_rows]


def test_a_few_steps_lower_the_loss_on_real_images(tmp_path):
    # the method clusters 64 real images, then trains on one fixed batch of their augmented views
    recipe = tiny("data.limit=64", "trainer.batch_size=64", "method.num_clusters=10", "optim.lr=0.1")
    stages = prepare_training(recipe, tmp_path / "run")
    method, opt = stages.method, stages.trainer.optimizer
    method.on_epoch_start(0, 0)
    maker = ViewMaker(recipe.views)
    torch.manual_seed(0)
    views = torch.stack([maker(stages.source.load_image(i))[0] for i in range(64)])
    x = normalize_batch(views, recipe.views.mean, recipe.views.std)
    batch = Batch([x], ["train"], torch.arange(64), torch.zeros(64, dtype=torch.long))
    seq = []
    for step in range(12):
        out = method.training_step(batch, step)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        seq.append(out.loss.item())
    assert seq[0] == pytest.approx(math.log(10), abs=0.1)  # a fresh classifier: chance level
    assert sum(seq[-3:]) / 3 < sum(seq[:3]) / 3 - 0.5


def test_rebuilt_for_evaluation_without_data_takes_k_from_the_checkpoint(tmp_path):
    # k comes from the class count while training; a rebuilt run knows no classes (default_clusters)
    recipe = tiny(
        "trainer.steps=3", "method.num_clusters=null", "method.clusters_per_class=2", "method.default_clusters=50"
    )
    pretrain(recipe, tmp_path / "run")
    _, method, _ = load_run(tmp_path / "run")
    assert method.num_clusters == 20 and method.assignments.shape == (96,)
    assert int(method.clustered_epoch) == 0
    x = torch.randn(2, 3, 8, 8)
    feats = method.features(x)
    assert torch.allclose(feats, method.backbone(method.sobel(x)))
    assert torch.allclose(method.features(method.sobel(x)), feats)  # 2-channel input: already filtered
    with pytest.raises(TrainingError, match="indexed training source"):
        method.on_epoch_start(1, 3)
    from clcli.export import export_run

    info = export_run(tmp_path / "run", tmp_path / "enc.safetensors")
    assert info["feature_dim"] == method.backbone.feature_dim


def test_presets():
    cifar = load_recipe("deepcluster")
    assert cifar.model.backbone.in_channels == 2 and cifar.method.sobel and cifar.method.pca_dim == 256
    paper = load_recipe("deepcluster-imagenet")
    assert paper.optim.lr == 0.05 and paper.optim.weight_decay == 1e-5 and paper.optim.schedule == "constant"
    assert paper.method.clusters_per_class == 10 and paper.trainer.batch_size == 256
