"""InstDisc (arXiv:1805.01978): NCE against the paper's equations, the memory bank's update rule and
timing, the fixed normaliser Z, exact resume with the bank, learning on real images, kNN over the
bank from the command line, and the refusals (streaming data, several views, no bank)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from clcli.assemble import build_method, prepare_training
from clcli.cli import app
from clcli.data import StreamSource
from clcli.engine import checkpoint as ckpt
from clcli.errors import DataError, RecipeError
from clcli.evaluate.knn import knn_accuracy
from clcli.losses import instdisc_nce, instdisc_nce_normaliser, instdisc_softmax
from clcli.methods.base import Batch
from clcli.registry import SOURCES
from clcli.runs import load_run
from clcli.schedules import make_plan
from clcli.train import pretrain

from .helpers import losses, metric_rows, set_args, tiny_overrides, tiny_recipe


def tiny(*extra: str):
    return tiny_recipe("instdisc", *extra)


def metric(run_dir, key: str) -> list[float]:
    return [r[key] for r in metric_rows(run_dir) if key in r]


# ------------------------------------------------------------------------------ the losses
def reference_nce(scores: np.ndarray, tau: float, z: float, n: int) -> float:
    """Loop over images and samples: P = exp(s/τ)/Z, h = P / (P + K/n), eqs. 5-7 of the paper."""
    b, k1 = scores.shape
    k = k1 - 1
    total = 0.0
    for i in range(b):
        for j in range(k1):
            p = math.exp(scores[i, j] / tau) / z
            h = p / (p + k / n)
            total += math.log(h) if j == 0 else math.log(1.0 - h)
    return -total / b


@pytest.mark.parametrize(("tau", "z", "n"), [(0.07, 5e4, 1000), (0.1, 300.0, 64), (0.5, 12.0, 10)])
def test_nce_with_a_fixed_z_matches_the_papers_equations(tau, z, n):
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(5, 9, generator=g, dtype=torch.float64) * 2 - 1  # cosine similarities
    got = instdisc_nce(scores, tau, z, n).item()
    assert got == pytest.approx(reference_nce(scores.numpy(), tau, z, n), rel=1e-5)
    # z as a tensor (the method's buffer) gives the same value
    assert instdisc_nce(scores, tau, torch.tensor(z), n).item() == pytest.approx(got, rel=1e-6)


def test_nce_normaliser_is_n_times_the_mean_over_all_scores():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(4, 6, generator=g) * 2 - 1
    expected = 1000 * sum(math.exp(float(s) / 0.1) for s in scores.flatten()) / scores.numel()
    assert instdisc_nce_normaliser(scores, 0.1, 1000).item() == pytest.approx(expected, rel=1e-5)


def test_softmax_form_matches_a_loop():
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(3, 7, generator=g, dtype=torch.float64) * 2 - 1
    index = torch.tensor([0, 4, 6])
    ref = 0.0
    for b in range(3):
        den = sum(math.exp(float(scores[b, j]) / 0.1) for j in range(7))
        ref -= math.log(math.exp(float(scores[b, index[b]]) / 0.1) / den)
    assert instdisc_softmax(scores, index, 0.1).item() == pytest.approx(ref / 3, rel=1e-5)


def test_nce_rejects_bad_input():
    with pytest.raises(ValueError, match="1 \\+ K"):
        instdisc_nce(torch.zeros(4), 0.1, 1.0, 10)
    with pytest.raises(ValueError, match="positive"):
        instdisc_nce(torch.zeros(4, 3), 0.1, 0.0, 10)


# ------------------------------------------------------------------------- the method's step
def build(recipe):
    plan = make_plan(recipe, recipe.data.limit)
    from clcli.data.sources import limit_source, open_data

    source = limit_source(open_data(recipe.data.source, recipe.data.train_split, recipe.data), recipe.data.limit)
    return build_method(recipe, plan, source, torch.device("cpu")), source


def record_noise(method):
    """Wrap the bank's sampler so the test sees the noise indices the step drew."""
    drawn = []
    original = method.bank.sample

    def sample(shape, generator=None):
        idx = original(shape, generator)
        drawn.append(idx.clone())
        return idx

    method.bank.sample = sample
    return drawn


@pytest.mark.parametrize("bank_size", [4, 40])  # 40 > 16·K: the gathering path; 4: the dense product
def test_planted_bank_vectors_give_the_hand_computed_loss(bank_size):
    recipe = tiny(
        "method.embedding_dim=2", "method.nce_k=2", "method.temperature=0.5", "trainer.batch_size=2",
        f"data.limit={bank_size}",
    )  # fmt: skip
    method, _ = build(recipe)
    planted = torch.zeros(bank_size, 2)
    planted[:4] = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    planted[4:] = torch.tensor([0.6, 0.8])
    method.bank.vectors.copy_(planted)
    f = torch.tensor([[1.0, 0.0]], requires_grad=True)
    method.embed = lambda x: f  # type: ignore[method-assign]
    method.bank.sample = lambda shape, generator=None: torch.tensor([[1, 2]])  # type: ignore[method-assign]
    batch = Batch([torch.zeros(1, 3, 16, 16)], ["global"], torch.tensor([0]), torch.tensor([0]))
    out = method.training_step(batch, 0)
    # by hand: scores 1 (own entry), 0 and -1 (noise); τ = 0.5; Z from this first batch; K·P_n = 2/n
    z = bank_size * (math.exp(2) + math.exp(0) + math.exp(-2)) / 3
    kpn = 2 / bank_size
    p = [math.exp(2) / z, math.exp(0) / z, math.exp(-2) / z]
    h = [x / (x + kpn) for x in p]
    expected = -(math.log(h[0]) + math.log(1 - h[1]) + math.log(1 - h[2]))
    assert float(method.nce_z) == pytest.approx(z, rel=1e-6)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    # the gradient reaches the embedding (and only through it: the bank is a buffer)
    out.loss.backward()
    assert f.grad is not None and torch.isfinite(f.grad).all()
    assert not any(b.requires_grad for b in method.buffers())
    # the bank row of image 0 moved: normalise(0.5 (1, 0) + 0.5 (1, 0)) = (1, 0); others untouched
    assert torch.equal(method.bank.vectors, planted)


def test_a_step_changes_only_the_batch_rows_by_the_momentum_formula_after_the_loss():
    recipe = tiny("data.limit=64")
    method, source = build(recipe)
    drawn = record_noise(method)
    index = torch.tensor([3, 17, 40, 5, 63, 0, 22, 9])
    from clcli.views import ViewMaker, normalize_batch

    views = ViewMaker(recipe.views)
    torch.manual_seed(0)
    x = torch.stack([views(source.load_image(int(i)))[0] for i in index])
    x = normalize_batch(x, recipe.views.mean, recipe.views.std)
    before = method.bank.vectors.clone()
    f = method.embed(x).detach()  # train-mode BN: the same output the step will compute
    out = method.training_step(Batch([x], ["global"], index, torch.zeros(8, dtype=torch.long)), 0)
    # the loss used the bank as it was BEFORE this step's update
    noise_idx = drawn[0]
    scores = torch.cat([(f * before[index]).sum(1, keepdim=True), torch.einsum("bd,bkd->bk", f, before[noise_idx])], 1)
    z = 64 * torch.exp(scores / 0.1).mean().item()
    assert float(method.nce_z) == pytest.approx(z, rel=1e-5)
    assert out.loss.item() == pytest.approx(reference_nce(scores.double().numpy(), 0.1, z, 64), rel=1e-4)
    after = method.bank.vectors
    expected_rows = F.normalize(0.5 * before[index] + 0.5 * f, dim=1)
    torch.testing.assert_close(after[index], expected_rows, rtol=1e-5, atol=1e-6)
    others = torch.ones(64, dtype=torch.bool)
    others[index] = False
    assert torch.equal(after[others], before[others])
    assert torch.allclose(after.norm(dim=1), torch.ones(64), atol=1e-5)


def test_z_is_estimated_once_then_fixed():
    recipe = tiny("trainer.steps=5")
    method, source = build(recipe)
    assert not bool(method.z_estimated)
    from clcli.views import ViewMaker, normalize_batch

    views = ViewMaker(recipe.views)
    zs = []
    for step in range(3):
        index = torch.arange(step * 32, step * 32 + 32)
        x = normalize_batch(
            torch.stack([views(source.load_image(int(i)))[0] for i in index]), recipe.views.mean, recipe.views.std
        )
        method.training_step(Batch([x], ["global"], index, torch.zeros(32, dtype=torch.long)), step)
        zs.append(float(method.nce_z))
    assert bool(method.z_estimated) and zs[0] > 0 and zs == [zs[0]] * 3
    # a Z given in the recipe is used from the start and never estimated
    fixed, _ = build(tiny("method.nce_z=1234.5"))
    assert bool(fixed.z_estimated) and float(fixed.nce_z) == 1234.5


def test_encoded_bank_init_fills_every_row_with_the_initial_embeddings_once():
    from clcli.views.pipelines import eval_pipeline, normalize_batch

    method, _ = build(tiny("method.bank_init=encoded"))
    running = {k: v.clone() for k, v in method.state_dict().items() if "running" in k}
    assert method.on_epoch_start(0, 0) == {"bank_filled_rows": 128.0}
    # each row: the embedding of that image's evaluation crop, normalised as training views are
    images = torch.stack([eval_pipeline(16)(method._source.load_image(i)) for i in range(128)])
    state = method.state_dict()
    assert all(torch.equal(state[k], r) for k, r in running.items())  # BN running statistics untouched
    v = method._views
    with torch.no_grad():
        want = method.embed(normalize_batch(images, v.mean, v.std))
    assert torch.allclose(method.bank.vectors, want, atol=1e-5)
    method.bank.vectors.zero_()
    assert method.on_epoch_start(1, 4) == {} and method.bank.vectors.abs().sum() == 0  # once per run


@pytest.mark.parametrize("init", ["random", "encoded"])
def test_resume_with_the_bank_reproduces_the_loss_sequence_bitwise(tmp_path, init):
    # 4 steps per epoch: crosses an epoch
    recipe = tiny("trainer.steps=7", "trainer.checkpoint_every=2", f"method.bank_init={init}")
    pretrain(recipe, tmp_path / "full")
    stages = prepare_training(recipe, tmp_path / "cut")
    summary = stages.trainer.fit(stop_after=3)
    assert summary["interrupted"] and summary["steps"] == 3
    saved = ckpt.load_model_state(ckpt.latest_checkpoint(tmp_path / "cut"))
    assert saved["z_estimated"].item() and saved["nce_z"].item() > 0 and saved["bank.vectors"].shape == (128, 16)
    pretrain(recipe, tmp_path / "cut", resume=True)
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    assert len(set(metric(tmp_path / "full", "nce_z"))) == 1  # Z fixed across the run and the resume
    assert metric(tmp_path / "cut", "nce_z") == metric(tmp_path / "full", "nce_z")
    full = ckpt.load_model_state(ckpt.latest_checkpoint(tmp_path / "full"))
    cut = ckpt.load_model_state(ckpt.latest_checkpoint(tmp_path / "cut"))
    assert torch.equal(full["bank.vectors"], cut["bank.vectors"])
    # a run rebuilt for evaluation has the trained bank and Z
    _, method, _ = load_run(tmp_path / "full")
    assert torch.equal(method.bank_features(), full["bank.vectors"])
    assert float(method.nce_z) == full["nce_z"].item()


def augmented_views(recipe, source, n: int, copies: int) -> list[torch.Tensor]:
    """``copies`` augmented, normalised views of the first ``n`` images (made once, to keep tests fast)."""
    from clcli.views import ViewMaker, normalize_batch

    views = ViewMaker(recipe.views)
    torch.manual_seed(0)
    return [
        normalize_batch(torch.stack([views(source.load_image(i))[0] for i in range(n)]), recipe.views.mean,
                        recipe.views.std)
        for _ in range(copies)
    ]  # fmt: skip


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tiny recipes' trainer.threads: no oversubscription on a shared machine
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("loss", ["nce", "softmax"])
def test_steps_lower_the_loss_on_real_images(loss, one_thread):
    # One batch of 64 real digits, so every bank row is refreshed at each step.  The NCE loss first
    # climbs while the bank fills with embeddings of an untrained network (all alike, so every noise
    # sample looks like data); from there training spreads the instances and the loss falls clearly.
    recipe = tiny(
        f"method.loss={loss}", "method.embedding_dim=128", "method.nce_k=64", "data.limit=64",
        "trainer.batch_size=64", "views.groups.0.crop_scale=[0.5, 1.0]",
    )  # fmt: skip
    torch.manual_seed(0)
    method, source = build(recipe)
    views = augmented_views(recipe, source, 64, 4)
    opt = torch.optim.SGD(method.parameters(), lr=0.003 if loss == "nce" else 0.03, momentum=0.9, weight_decay=5e-4)
    index, label = torch.arange(64), torch.zeros(64, dtype=torch.long)
    seq = []
    for step in range(30 if loss == "nce" else 20):
        out = method.training_step(Batch([views[step % 4]], ["global"], index, label), step)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        seq.append(out.loss.item())
    if loss == "nce":
        assert sum(seq[-4:]) / 4 < 0.85 * max(seq[:16]), seq
    else:
        assert sum(seq[-4:]) / 4 < sum(seq[1:5]) / 4 - 0.3, seq


# ---------------------------------------------------------------------------- refusals
class _Stream(StreamSource):
    spec, split, classes = "stream:x", "train", None


def test_a_streaming_source_is_refused_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setitem(SOURCES._entries, "teststream", lambda *a, **k: _Stream())
    recipe = tiny("data.source=teststream:x", "data.streaming=true")
    with pytest.raises(DataError, match="sample index.*streaming"):
        pretrain(recipe, tmp_path / "run")
    # and from the command line: one message, exit code 2
    result = CliRunner().invoke(
        app, ["pretrain", "-r", "instdisc", *set_args(*tiny_overrides("instdisc")), "--set",
              "data.source=teststream:x", "--out", str(tmp_path / "cli"), "--no-progress"]
    )  # fmt: skip
    assert result.exit_code == 2 and "streaming" in result.output and "Traceback" not in result.output


def test_more_than_one_view_is_refused():
    with pytest.raises(RecipeError, match="one augmented view"):
        build(tiny("views.groups.0.count=2"))


# -------------------------------------------------------------------------- kNN over the bank
def _cli(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result


def test_knn_over_the_bank_and_the_embedding_from_the_command_line(tmp_path):
    run = tmp_path / "run"
    sets = set_args(*tiny_overrides("instdisc", "trainer.steps=4"))
    result = _cli("pretrain", "-r", "instdisc", *sets, "--out", str(run), "--json")
    assert result.exit_code == 0, result.output

    result = _cli("eval", "knn", "--run", str(run), "--features", "bank", "--k", "20", "--json")
    assert result.exit_code == 0, result.output
    bank = json.loads(result.stdout)
    assert bank["features"] == "bank" and bank["feature_dim"] == 16 and bank["k"] == 20
    assert bank["train_images"] == 128 and "memory bank" in bank["train_split"]

    # the same vote computed here: the bank rows labelled by the training split, test images embedded
    _, method, _ = load_run(run)
    recipe = tiny()
    from clcli.data.sources import limit_source, open_data
    from clcli.evaluate.features import extract_features

    train = limit_source(open_data(recipe.data.source, "train", recipe.data), 128)
    test = open_data(recipe.data.source, "test", recipe.data)
    emb = extract_features(method, test, recipe, device=torch.device("cpu"), layer="embedding")
    ref = knn_accuracy(
        method.bank_features(), train.labels(), emb.features, emb.labels, k=20, temperature=0.1, num_classes=10
    )
    assert bank["top1"] == pytest.approx(ref["top1"]) and bank["test_images"] == len(test)

    result = _cli("eval", "knn", "--run", str(run), "--features", "embedding", "--k", "20", "--json")
    assert result.exit_code == 0, result.output
    emb_result = json.loads(result.stdout)
    assert emb_result["features"] == "embedding" and emb_result["feature_dim"] == 16
    assert emb_result["train_images"] == 128

    # refusals: another training split, the linear probe, an unknown layer
    for args, message in [
        (["eval", "knn", "--run", str(run), "--features", "bank", "--train-split", "test"], "trained on"),
        (["eval", "knn", "--run", str(run), "--features", "bank", "--train-limit", "10"], "every bank row"),
        (["eval", "linear", "--run", str(run), "--features", "bank"], "kNN only"),
        (["eval", "knn", "--run", str(run), "--features", "memory"], "'bank'"),
    ]:
        result = _cli(*args)
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, args


def test_knn_over_the_bank_is_refused_for_a_method_without_one(tmp_path):
    run = tmp_path / "run"
    sets = [
        "model.backbone.name=convnet",
        "model.backbone.width=8",
        "views.groups.0.size=16",
        "views.eval_size=16",
        "trainer.batch_size=32",
        "trainer.steps=1",
        "trainer.precision=fp32",
        "data.limit=64",
    ]
    result = _cli("pretrain", "-r", "invaspread", *sum((["--set", s] for s in sets), []), "--out", str(run), "--json")
    assert result.exit_code == 0, result.output
    result = _cli("eval", "knn", "--run", str(run), "--features", "bank")
    assert result.exit_code == 2 and "memory bank" in result.output and "invaspread" in result.output
