"""Issue 24, part 3 for ``clcli zeroshot``: an output that cannot be written is one message, exit code 2,
refused before the model loads, and leaves no temporary behind (pretrain, eval and export are in
test_reliability_io.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from clcli.cli import app

from .conftest import write_image
from .helpers import set_args, tiny_overrides
from .test_reliability_io import assert_user_error, leftovers

runner = CliRunner()


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zs") / "clip"
    args = ["pretrain", "--recipe", "clip", "--out", str(out), "--no-progress"]
    res = runner.invoke(app, [*args, *set_args(*tiny_overrides("clip", "trainer.steps=1"))])
    assert res.exit_code == 0, res.output
    return out


def test_zeroshot_output_that_cannot_be_written_is_refused(clip_run, tmp_path):
    images = tmp_path / "images"
    for i in range(2):
        write_image(images / f"{i}.png", seed=i, size=(20, 20))
    a_file = tmp_path / "a-file.txt"
    a_file.write_text("not a folder\n")
    base = ["zeroshot", "--run", str(clip_run), "--labels", "cat,dog", "--images", str(images), "--output"]
    for output, words in (
        ("/proc/x/z.json", "/proc/x/z.json"),
        (str(tmp_path), "is a folder"),
        (str(a_file / "z.json"), "is a file, not a folder"),
    ):
        res = runner.invoke(app, [*base, output], env={"COLUMNS": "1000"})
        assert_user_error(res, words)
    assert leftovers(tmp_path) == [] and leftovers(clip_run) == []
    res = runner.invoke(app, [*base, str(tmp_path / "z.json")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "z.json").is_file() and leftovers(tmp_path) == []
