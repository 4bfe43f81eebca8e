"""Optimiser groups and LARS, online kNN, streaming training, and unreadable images during training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clcli.engine.optim import LARS, build_optimizer, optimizer_groups
from clcli.errors import BadImageError, TrainingError
from clcli.evaluate.protocols import knn_eval
from clcli.methods.base import ParamGroup
from clcli.recipe import OptimConfig
from clcli.train import pretrain

from .conftest import write_image
from .helpers import metric_rows, tiny_recipe


def test_bias_and_norm_parameters_get_no_decay_and_no_lars():
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2, bias=False))
    groups = optimizer_groups([ParamGroup("all", list(net.parameters()))], OptimConfig(name="lars", weight_decay=0.1))
    regular, plain = groups
    assert {p.ndim for p in regular["params"]} == {2} and regular["weight_decay"] == 0.1 and regular["lars"]
    assert {p.ndim for p in plain["params"]} == {1} and plain["weight_decay"] == 0.0 and not plain["lars"]
    assert len(plain["params"]) == 3  # the first Linear's bias and BN's weight and bias


def test_lars_step_matches_the_trust_ratio_formula():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5, 3))
    b = nn.Parameter(torch.randn(5))
    w.grad, b.grad = torch.randn(5, 3), torch.randn(5)
    w0, b0, gw, gb = w.detach().clone(), b.detach().clone(), w.grad.clone(), b.grad.clone()
    opt = build_optimizer(
        [ParamGroup("p", [w, b])], OptimConfig(name="lars", weight_decay=0.01, lars_eta=0.02, momentum=0.9), lr=0.5
    )
    assert isinstance(opt, LARS)
    opt.step()
    d = gw + 0.01 * w0
    trust = 0.02 * w0.norm() / d.norm()
    assert torch.allclose(w.detach(), w0 - 0.5 * trust * d, atol=1e-6)
    assert torch.allclose(b.detach(), b0 - 0.5 * gb, atol=1e-6)  # no decay, no adaptation for the bias


def test_fixed_lr_group_keeps_the_peak_rate(tmp_path):
    from clcli.assemble import prepare_training

    stages = prepare_training(tiny_recipe("simclr", "trainer.steps=4", "optim.lr=0.2"), tmp_path / "run")
    stages.trainer.optimizer.param_groups[0]["fixed_lr"] = True
    stages.trainer._set_hyperparameters(3)
    lrs = [g["lr"] for g in stages.trainer.optimizer.param_groups]
    assert lrs[0] == pytest.approx(0.2 * 32 / 128) and lrs[1] < lrs[0]


def test_online_knn_every_epoch(tmp_path):
    recipe = tiny_recipe("simclr", "data.limit=64", "trainer.steps=4", "trainer.online_knn_every=1")  # 2 steps/epoch
    pretrain(recipe, tmp_path / "run")
    online = [r for r in metric_rows(tmp_path / "run") if "online_knn_top1" in r]
    assert [(r["epoch"], r["step"]) for r in online] == [(1, 2), (2, 4)]
    # the last score is of the final weights: the number `clcli eval knn` gives for the run, with the
    # training split cut to data.limit as in training and the whole test split (360 digits)
    offline = knn_eval(tmp_path / "run", train_limit=64, show_progress=False)
    assert (offline["train_images"], offline["test_images"]) == (64, 360)
    assert online[-1]["online_knn_top1"] == offline["top1"]
    for r in online:  # a count of correct test digits, well above chance (0.1)
        assert r["online_knn_top1"] * 360 == pytest.approx(round(r["online_knn_top1"] * 360), abs=1e-6)
        assert r["online_knn_top1"] > 0.25


def test_training_on_a_streaming_hub_dataset(tmp_path, hf_offline, hub_folder):
    recipe = tiny_recipe(
        "simclr",
        f"data.source=hf:{hub_folder}",
        "data.streaming=true",
        "trainer.batch_size=2",
        "trainer.steps=2",
        "data.limit=null",
    )
    summary = pretrain(recipe, tmp_path / "run")
    assert summary["steps"] == 2
    with pytest.raises(TrainingError, match="trainer.steps"):
        pretrain(
            tiny_recipe(
                "simclr", f"data.source=hf:{hub_folder}", "data.streaming=true", "trainer.steps=null", "data.limit=null"
            ),
            tmp_path / "run2",
        )


@pytest.fixture
def folder_with_a_bad_image(tmp_path):
    root = tmp_path / "imgs"
    for i in range(7):
        write_image(root / "a" / f"{i}.png", seed=i, size=(20, 20))
    (root / "a" / "broken.png").write_bytes(b"not a png at all")
    return root


def test_unreadable_image_stops_the_run_naming_the_file(tmp_path, folder_with_a_bad_image):
    recipe = tiny_recipe(
        "simclr", f"data.source={folder_with_a_bad_image}", "trainer.batch_size=8", "trainer.steps=1", "data.limit=null"
    )
    with pytest.raises(BadImageError, match="broken.png"):
        pretrain(recipe, tmp_path / "run")


def test_skip_bad_images_counts_and_reports_them(tmp_path, folder_with_a_bad_image):
    recipe = tiny_recipe(
        "simclr",
        f"data.source={folder_with_a_bad_image}",
        "trainer.batch_size=8",
        "trainer.steps=2",
        "data.limit=null",
        "data.skip_bad_images=true",
    )
    summary = pretrain(recipe, tmp_path / "run")
    assert summary["steps"] == 2 and summary["skipped_bad_images"] == 1  # one file ...
    assert summary["skipped_bad_reads"] == 2  # ... read once per epoch
