"""bf16 on a CPU without bf16 arithmetic falls back to fp32, says so, and resumes; elsewhere it stays bf16."""

from __future__ import annotations

import io

import pytest
import torch
from pydantic import ValidationError
from rich.console import Console

from clcli import precision
from clcli.assemble import prepare_training
from clcli.recipe import apply_overrides, load_recipe, validate_recipe
from clcli.train import pretrain

from .helpers import assert_exact_resume, losses, tiny_recipe

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def cpu_bf16(monkeypatch: pytest.MonkeyPatch, fast: bool) -> None:
    monkeypatch.setattr(precision, "cpu_bf16_is_fast", lambda: fast)


def test_resolution_by_device_and_cpu(monkeypatch):
    cpu_bf16(monkeypatch, fast=False)
    used, why = precision.resolve_precision("bf16", CPU)
    assert used == "fp32" and why is not None and "fp32" in why and "bf16" in why
    assert precision.resolve_precision("fp32", CPU) == ("fp32", None)
    assert precision.resolve_precision("bf16", CUDA) == ("bf16", None)  # a GPU keeps bf16
    assert not precision.use_bf16("bf16", CPU) and precision.use_bf16("bf16", CUDA)
    cpu_bf16(monkeypatch, fast=True)
    assert precision.resolve_precision("bf16", CPU) == ("bf16", None)
    assert precision.use_bf16("bf16", CPU) and not precision.use_bf16("fp32", CPU)


def test_the_probe_is_measured_once_per_process():
    precision.cpu_bf16_is_fast.cache_clear()
    first = precision.cpu_bf16_is_fast()
    assert isinstance(first, bool)
    assert precision.cpu_bf16_is_fast() is first
    assert precision.cpu_bf16_is_fast.cache_info().hits >= 1


def test_a_bf16_recipe_on_a_slow_cpu_trains_exactly_as_fp32_records_it_and_says_so(tmp_path, monkeypatch):
    cpu_bf16(monkeypatch, fast=False)
    out = io.StringIO()
    pretrain(
        tiny_recipe("simclr", "trainer.steps=3", "trainer.precision=bf16"), tmp_path / "bf16", console=Console(file=out)
    )
    pretrain(tiny_recipe("simclr", "trainer.steps=3", "trainer.precision=fp32"), tmp_path / "fp32")
    assert losses(tmp_path / "bf16") == losses(tmp_path / "fp32")  # bitwise: no autocast anywhere
    saved = load_recipe(tmp_path / "bf16" / "recipe.yaml")
    assert saved.trainer.precision == "fp32"  # the run folder records what ran
    text = " ".join(out.getvalue().split())
    assert "no native bf16" in text and "falls back to fp32" in text


def test_a_fallback_run_resumes_with_its_bf16_recipe(tmp_path, monkeypatch):
    cpu_bf16(monkeypatch, fast=False)
    recipe = tiny_recipe("simclr", "trainer.steps=4", "trainer.precision=bf16", "trainer.checkpoint_every=2")
    # same recipe as given: no "another recipe" refusal
    assert_exact_resume(recipe, tmp_path, stop_after=2)


def test_where_bf16_is_fast_the_recipe_keeps_it(tmp_path, monkeypatch):
    cpu_bf16(monkeypatch, fast=True)
    stages = prepare_training(tiny_recipe("simclr", "trainer.steps=1", "trainer.precision=bf16"), tmp_path / "run")
    assert stages.recipe.trainer.precision == "bf16"
    assert load_recipe(tmp_path / "run" / "recipe.yaml").trainer.precision == "bf16"


def test_with_precision_returns_a_validated_copy_and_leaves_the_recipe_alone():
    recipe = tiny_recipe("simclr", "trainer.precision=bf16")
    changed = precision.with_precision(recipe, "fp32")
    assert changed.trainer.precision == "fp32" and recipe.trainer.precision == "bf16"
    assert changed.trainer is not recipe.trainer and changed.method is not recipe.method
    assert type(changed.method) is type(recipe.method)  # the method's own config class survives
    # the same recipe as an override of the dumped recipe would give, digest included
    overridden = validate_recipe(apply_overrides(recipe.to_dict(), ["trainer.precision=fp32"]))
    assert changed.to_dict() == overridden.to_dict() and changed.digest() == overridden.digest()
    with pytest.raises(ValidationError):
        precision.with_precision(recipe, "fp8")  # type: ignore[arg-type]
