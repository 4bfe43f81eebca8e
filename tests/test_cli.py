"""The command-line tool through Typer's runner: each command, --json, and the error exits."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torchvision
from torch import nn
from typer.testing import CliRunner

from clcli.cli import app

from .helpers import losses, set_args, tiny_overrides

runner = CliRunner()


def tiny_sets(*extra: str) -> list[str]:
    """The tiny SimCLR recipe's overrides, then ``extra``, as ``--set`` arguments."""
    return set_args(*tiny_overrides("simclr", *extra))


def invoke(*args: str):
    return runner.invoke(app, list(args))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A three-step tiny SimCLR run from the command line: its folder and the ``--json`` output."""
    run = tmp_path_factory.mktemp("cli") / "run"
    res = invoke("pretrain", "--recipe", "simclr", "--out", str(run), "--json", *tiny_sets("trainer.steps=3"))
    assert res.exit_code == 0, res.output
    return run, res.output


@pytest.fixture(scope="module")
def trained_run(pretrained):
    return pretrained[0]


def test_help_explains_every_command():
    for args in (
        ["--help"],
        ["pretrain", "--help"],
        ["eval", "knn", "--help"],
        ["eval", "linear", "--help"],
        ["export", "--help"],
        ["recipes", "show", "--help"],
    ):
        res = invoke(*args)
        assert res.exit_code == 0
    text = invoke("pretrain", "--help").output
    for option in ("--recipe", "--data", "--out", "--set", "--resume", "--json"):
        assert option in text


def test_recipes_list_and_show():
    res = invoke("recipes", "list", "--json")
    assert res.exit_code == 0 and "simclr" in {r["name"] for r in json.loads(res.output)}
    res = invoke("recipes", "show", "simclr", "--json")
    shown = json.loads(res.output)
    assert shown["method"]["temperature"] == 0.5 and shown["optim"]["lars_eta"] == 0.001  # defaults filled in
    assert "trainer:" in invoke("recipes", "show", "simclr").output


def test_pretrain_json_summary(pretrained):
    run, output = pretrained
    summary = json.loads(output)  # the whole of stdout is one JSON object
    assert set(summary) == {
        "run", "steps", "epochs", "images", "final_loss", "seconds", "skipped_bad_images", "skipped_bad_reads",
        "interrupted", "checkpoint", "recipe", "method", "views_backend",
    }  # fmt: skip
    assert summary["run"] == str(run) and summary["recipe"] == "simclr" and summary["method"] == "simclr"
    # 3 steps of 32 images; 256 images make 8 steps an epoch, so no epoch is complete
    assert (summary["steps"], summary["images"], summary["epochs"]) == (3, 96, 0)
    assert summary["interrupted"] is False and summary["skipped_bad_images"] == 0
    assert summary["checkpoint"] == str(run / "checkpoints" / "step-00000003")
    state = json.loads((run / "checkpoints" / "step-00000003" / "trainer.json").read_text())
    assert state["step"] == 3
    # logged every step: the final loss is the last logged one, a finite NT-Xent of 2 x 32 views at
    # temperature 0.5, which lies between 0 and 2/0.5 + ln(63) (cosines within [-1, 1])
    assert summary["final_loss"] == losses(run)[-1] and len(losses(run)) == 3
    assert 0.0 < summary["final_loss"] < 2 / 0.5 + math.log(63)
    assert summary["seconds"] > 0


def test_eval_knn_and_linear(trained_run, tmp_path):
    res = invoke("eval", "knn", "--run", str(trained_run), "--json", "--k", "20", "--test-limit", "100")
    assert res.exit_code == 0, res.output
    result = json.loads(res.output)
    assert result["k"] == 20 and result["temperature"] == 0.1
    # the run's 256 training digits (data.limit) against the first 100 test digits, 8 x 8 = 64-d backbone features
    assert (result["train_images"], result["test_images"], result["feature_dim"]) == (256, 100, 64)
    assert result["top1"] * 100 == pytest.approx(round(result["top1"] * 100), abs=1e-9)  # a count of 100 digits
    assert 0.5 < result["top1"] <= result["top5"]  # digits are easy even for a barely trained encoder (chance 0.1)
    assert result["features"] == "backbone" and result["train_split"] == "train" and result["test_split"] == "test"
    assert json.loads((trained_run / "eval" / "knn.json").read_text())["top1"] == result["top1"]
    res = invoke("eval", "knn", "--run", str(trained_run), "--json", "--features", "embedding", "--test-limit", "50")
    assert json.loads(res.output)["feature_dim"] == 16
    res = invoke("eval", "linear", "--run", str(trained_run), "--json", "--output", str(tmp_path / "lin.json"))
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["top1"] > 0.3  # digits are easy even for a barely trained encoder


def test_export_loads_into_clcli_and_torchvision(tmp_path):
    run = tmp_path / "run"
    res = invoke(
        "pretrain",
        "--recipe",
        "simclr",
        "--out",
        str(run),
        "--json",
        *tiny_sets("trainer.steps=1", "model.backbone.name=resnet18", "data.limit=64"),
    )
    assert res.exit_code == 0, res.output
    out = tmp_path / "backbone.safetensors"
    res = invoke("export", "--run", str(run), "--out", str(out), "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["feature_dim"] == 512

    import clcli
    from clcli.runs import load_run

    encoder = clcli.load_backbone(out)
    assert encoder.feature_dim == 512 and encoder.input_size == 16
    _, method, _ = load_run(run)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(encoder(x), method.features(x), atol=1e-5)

    # the README's recipe for torchvision: CIFAR stem, no max-pool, no classifier
    from safetensors.torch import load_file

    tv = torchvision.models.resnet18()
    tv.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    tv.maxpool = nn.Identity()
    tv.fc = nn.Identity()
    tv.load_state_dict(load_file(out), strict=True)
    tv.eval()
    with torch.no_grad():
        assert torch.allclose(tv(x), encoder(x), atol=1e-5)


def test_errors_are_one_message_and_exit_2(tmp_path, trained_run):
    cases = [
        (["pretrain", "--recipe", "nosuch"], "unknown recipe"),
        (["pretrain", "--recipe", "simclr", *set_args("optim.lr=-1")], "optim.lr"),
        (["pretrain", "--recipe", "simclr", "--data", str(tmp_path / "missing")], "does not exist"),
        (["eval", "knn", "--run", str(tmp_path)], "not a clcli run folder"),
        (["eval", "knn", "--run", str(tmp_path / "nope")], "does not exist"),
        (["eval", "knn", "--run", str(trained_run), "--features", "pixels"], "--features"),
        (["export", "--run", str(tmp_path), "--out", str(tmp_path / "x.safetensors")], "not a clcli run folder"),
        (["pretrain", "--recipe", "simclr", "--out", str(trained_run), *tiny_sets()], "already holds a run"),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    cases.append((["pretrain", "--recipe", "simclr", "--data", str(empty), "--out", str(tmp_path / "r2")], "no images"))
    for args, needle in cases:
        res = invoke(*args)
        assert res.exit_code == 2, (args, res.output)
        assert needle in res.output, (args, res.output)
        assert "Traceback" not in res.output


def test_checkpoint_from_another_recipe_is_refused(tmp_path, trained_run):
    other = tmp_path / "other"
    res = invoke(
        "pretrain",
        "--recipe",
        "simclr",
        "--out",
        str(other),
        "--json",
        *tiny_sets("trainer.steps=1", "model.backbone.width=4"),
    )
    assert res.exit_code == 0, res.output
    ckpt = sorted((other / "checkpoints").glob("step-*"))[-1]
    res = invoke("eval", "knn", "--run", str(trained_run), "--checkpoint", str(ckpt))
    assert res.exit_code == 2 and "another recipe" in res.output
    # nothing already written was lost
    assert (trained_run / "recipe.yaml").exists() and any((trained_run / "checkpoints").glob("step-*"))


def test_resume_without_recipe_uses_the_run_folder(tmp_path):
    run = tmp_path / "run"
    res = invoke("pretrain", "--recipe", "simclr", "--out", str(run), "--json", *tiny_sets("trainer.steps=2"))
    assert res.exit_code == 0
    res = invoke("pretrain", "--resume", "--out", str(run), "--json", "--set", "trainer.steps=3")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["steps"] == 3
