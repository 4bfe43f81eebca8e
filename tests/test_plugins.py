"""A separate package adds a method and a backbone through entry points; a recipe names them like built-ins."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from clcli.registry import BACKBONES, METHODS

from .helpers import metric_rows

PLUGIN = Path(__file__).resolve().parent / "plugin_pkg"


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("src") / "plugin_pkg"
    shutil.copytree(PLUGIN, source)  # build outside the checkout
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    return target


def test_plugin_method_trains_from_the_cli(installed_plugin, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        "model: {backbone: {name: tinynet, width: 8}}\n"
        "method: {name: tinyplug, dim: 8}\n"
        "views: {groups: [{size: 16, count: 2}], eval_size: 16}\n"
        "trainer: {steps: 3, batch_size: 32, log_every: 1, precision: fp32}\n"
        "data: {limit: 128}\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed_plugin), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "clcli.cli",
            "pretrain",
            "--recipe",
            str(recipe),
            "--out",
            str(tmp_path / "run"),
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["steps"] == 3
    rows = metric_rows(tmp_path / "run")
    assert {"align", "uniform"} <= set(rows[-1])
    listed = subprocess.run(
        [
            sys.executable,
            "-c",
            "from clcli.registry import METHODS, BACKBONES;print(METHODS.names(), BACKBONES.names())",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert "tinyplug" in listed.stdout and "tinynet" in listed.stdout


def test_without_the_plugin_the_name_is_unknown():
    assert "tinyplug" not in METHODS.names()
    assert "tinynet" not in BACKBONES.names()
