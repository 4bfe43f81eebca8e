"""The papers' evaluation protocols: the SGD linear probe on frozen features and fine-tuning with a label fraction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from clcli.cli import app
from clcli.errors import ClcliError
from clcli.evaluate.finetune import finetune, label_subset
from clcli.evaluate.linear_sgd import train_linear_sgd
from clcli.evaluate.loader import load_model, open_split
from clcli.evaluate.supervised import balanced_subset, resolve_settings, score_split
from clcli.recipe import RecipeError, load_recipe

from .helpers import set_args, tiny_overrides
from .test_reliability_io import assert_user_error

runner = CliRunner()


def invoke(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "1000"})


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A three-step tiny SimCLR run on 256 digits (ConvNet of width 8, 16 px)."""
    folder = tmp_path_factory.mktemp("protocols") / "run"
    res = invoke(
        "pretrain", "--recipe", "simclr", "--out", folder, *set_args(*tiny_overrides("simclr", "trainer.steps=3"))
    )
    assert res.exit_code == 0, res.output
    return folder


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _pieces(run: Path, limit: int = 256):
    loaded = load_model(run)
    recipe = loaded.recipe
    train = open_split(recipe, recipe.data.source, "train", limit)
    return loaded, recipe, train, train.labels()


def test_sgd_probe_learns_and_leaves_the_encoder_untouched(run):
    loaded, recipe, train, labels = _pieces(run)
    before = _state(loaded.model)
    settings = resolve_settings(recipe.eval.linear_sgd, recipe.seed, epochs=8, batch_size=64, lr=0.4)
    head, stats = train_linear_sgd(loaded.model, recipe, train, labels, 10, settings, device=loaded.device)
    after = loaded.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "the frozen encoder changed"
    assert all(p.grad is None for p in loaded.model.parameters())
    assert stats["train_top1"] > 0.2  # on crops of 8 % to all of a 16 px digit; ten classes: chance is 0.1
    test = open_split(recipe, recipe.data.source, "test", None)
    probe = torch.nn.Sequential(loaded.model, head)  # one module: scoring puts both in eval mode
    scores, n, _ = score_split(probe, lambda x: head(loaded.model.features(x)), test, recipe, device=loaded.device)
    assert n == 360 and scores["top1"] > 0.5  # 0.67 when written
    # the same settings and seed give the same head, bit for bit
    again, _ = train_linear_sgd(loaded.model, recipe, train, labels, 10, settings, device=loaded.device)
    assert torch.equal(head.fc.weight, again.fc.weight)


def test_eval_linear_sgd_from_the_command_line(run):
    res = invoke(
        "eval",
        "linear",
        "--run",
        run,
        "--protocol",
        "sgd",
        "--epochs",
        "6",
        "--batch-size",
        "64",
        "--lr",
        "0.4",
        "--json",
    )
    assert res.exit_code == 0, res.output
    result = json.loads(res.output)
    assert result["protocol"] == "linear" and result["linear_protocol"] == "sgd"
    assert result["top1"] > 0.3 and result["top5"] >= result["top1"]  # chance is 0.1
    s = result["settings"]
    assert (s["epochs"], s["batch_size"], s["base_lr"], s["momentum"]) == (6, 64, 0.4, 0.9)
    assert s["lr"] == pytest.approx(0.4 * 64 / 256) and s["crop_scale"] == [0.08, 1.0] and s["weight_decay"] == 0.0
    assert (result["n_train"], result["feature_dim"]) == (256, 64)
    assert json.loads((run / "eval" / "linear-sgd.json").read_text())["top1"] == result["top1"]
    # the L-BFGS probe stays the default and takes no SGD setting
    assert_user_error(invoke("eval", "linear", "--run", run, "--epochs", "3"), "--protocol sgd")
    assert_user_error(invoke("eval", "linear", "--run", run, "--protocol", "adam"), "'lbfgs' or 'sgd'")
    assert_user_error(invoke("eval", "linear", "--run", run, "--protocol", "sgd", "--lr", "0"), "--lr")


def test_finetune_trains_the_encoder(run):
    loaded, recipe, train, labels = _pieces(run, limit=128)
    backbone = loaded.model.backbone
    before = _state(backbone)
    settings = resolve_settings(recipe.eval.finetune, recipe.seed, epochs=2, batch_size=32)
    net, stats = finetune(
        loaded.model, recipe, train, labels, torch.arange(len(train)), 10, settings, device=loaded.device
    )
    weights = [k for k, _ in backbone.named_parameters()]
    assert weights and all(not torch.equal(before[k], backbone.state_dict()[k]) for k in weights)
    assert stats["train_loss"] < 2.5 and not net.training  # finite (a uniform guess scores ln 10 = 2.3)


def test_label_subset_is_class_balanced_and_reproducible(tmp_path):
    labels = torch.arange(10).repeat_interleave(torch.tensor([50, 60, 70, 80, 90, 100, 110, 120, 130, 140]))
    subset = balanced_subset(labels, 0.1, seed=3)
    counts = torch.bincount(labels[subset], minlength=10)
    assert counts.tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    assert torch.equal(subset, balanced_subset(labels, 0.1, seed=3))
    assert not torch.equal(subset, balanced_subset(labels, 0.1, seed=4))
    assert torch.bincount(labels[balanced_subset(labels, 0.01, seed=0)]).tolist() == [1] * 10  # every class kept
    # saved once, then read back as it is, whatever the seed
    file = tmp_path / "labels.json"
    what = {"data": "embedded:digits", "split": "train"}
    drawn, info = label_subset(labels, 0.1, 3, file, what)
    read, again = label_subset(labels, 0.1, 99, file, what)
    assert torch.equal(drawn, read) and (info["subset"], again["subset"]) == ("drawn", "read")
    assert info["indices_sha256"] == again["indices_sha256"]
    with pytest.raises(ClcliError, match="fraction"):
        label_subset(labels, 0.01, 3, file, what)
    with pytest.raises(ClcliError, match="split_size"):
        label_subset(labels[:-1], 0.1, 3, file, what)


def test_eval_finetune_with_a_label_fraction(run):
    args = ["eval", "finetune", "--run", run, "--labels", "0.1", "--epochs", "2", "--batch-size", "16", "--json"]
    res = invoke(*args)
    assert res.exit_code == 0, res.output
    result = json.loads(res.output)
    subset = result["label_subset"]
    assert result["protocol"] == "finetune" and result["label_fraction"] == 0.1
    assert subset["file"] == str(run / "eval" / "labels-10pct.json") and subset["subset"] == "drawn"
    assert result["n_train"] == subset["images"] == sum(subset["class_counts"].values())
    assert 20 <= result["n_train"] <= 30  # about 10 % of 256 digits, at least one per class
    s = result["settings"]
    assert (s["epochs"], s["batch_size"], s["nesterov"], s["base_lr"]) == (2, 16, True, 0.05)
    assert (run / "eval" / "finetune-10pct.json").is_file()
    second = json.loads(invoke(*args).output)["label_subset"]
    assert second["subset"] == "read" and second["indices_sha256"] == subset["indices_sha256"]
    assert_user_error(invoke("eval", "finetune", "--run", run, "--labels", "1.5"), "--labels")
    assert_user_error(invoke("eval", "finetune", "--run", run, "--labels-file", "x.json"), "--labels")


def test_protocol_settings_are_recipe_fields():
    assert load_recipe("simclr").eval.linear_sgd.epochs == 100
    assert load_recipe("simclr-imagenet").eval.linear_sgd.batch_size == 1024
    finetune_cfg = load_recipe("simclr").eval.finetune
    assert (finetune_cfg.epochs_for(0.01), finetune_cfg.epochs_for(0.1), finetune_cfg.epochs_for(None)) == (60, 30, 30)
    with pytest.raises(RecipeError, match="eval.linear_sgd.crop_scale"):
        load_recipe("simclr", ["eval.linear_sgd.crop_scale=[0.9, 0.1]"])
    with pytest.raises(RecipeError, match="eval.finetune.unknown"):
        load_recipe("simclr", ["eval.finetune.unknown=1"])


def test_finetune_of_an_exported_file_keeps_its_subset_beside_the_result(run, tmp_path):
    encoder = tmp_path / "encoder.safetensors"
    assert invoke("export", "--run", run, "--out", encoder).exit_code == 0
    out = tmp_path / "ft.json"
    args = ["eval", "finetune", "--checkpoint", encoder, "--data", "embedded:digits", "--labels", "0.05"]
    res = invoke(*args, "--epochs", "1", "--train-limit", "200", "--test-limit", "50", "--output", out, "--json")
    assert res.exit_code == 0, res.output
    result = json.loads(res.output)
    saved = json.loads((tmp_path / "ft.labels.json").read_text())
    assert result["label_subset"]["file"] == str(tmp_path / "ft.labels.json") and result["n_test"] == 50
    assert (saved["fraction"], saved["split_size"], len(saved["indices"])) == (0.05, 200, result["n_train"])
    # another split size cannot reuse it
    res = invoke(*args, "--epochs", "1", "--train-limit", "100", "--output", out)
    assert_user_error(res, "split_size 200", alone=False)
