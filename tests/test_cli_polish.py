"""The command line as a user reads it: every --help shows its defaults and its flags as flags, --version,
what pretrain says when it ends, evaluations printed once, and user errors as one message with exit code 2."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import clcli
from clcli.cli import app

from .helpers import losses, set_args, tiny_overrides
from .test_reliability_io import assert_user_error

runner = CliRunner()


def invoke(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "1000"})


def _commands(group, path=()):
    """Every command of the tool (leaves of the command tree) with the words that invoke it."""
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command
    yield path, group  # the group's own options (the root's --version)


def _option_blocks(help_text: str) -> dict[str, str]:
    """Each option's row of a --help page (its first line and continuation lines, whitespace collapsed), by name."""
    blocks: dict[str, str] = {}
    names: list[str] = []
    for line in help_text.split("Options:", 1)[1].splitlines():
        first = re.match(r"^  ((?:-\w, )?--[\w-]+(?: / --[\w-]+)?)", line)
        if first:
            names = re.findall(r"--?[\w-]+", first.group(1))
            blocks.update(dict.fromkeys(names, line))
        elif line.startswith("      ") and names:
            for name in names:
                blocks[name] += " " + line
        else:
            names = []
    return {k: " ".join(v.split()) for k, v in blocks.items()}


def test_every_help_shows_its_defaults_and_flags_as_flags():
    """Walk every command's --help: each option with a default shows `[default: ...]` (written by the help
    formatter, or stated in the option's help text), a boolean flag takes no value, nothing is swallowed."""
    root = typer.main.get_command(app)
    checked = 0
    for path, command in _commands(root):
        res = invoke(*path, "--help")
        assert res.exit_code == 0, (path, res.output)
        assert "<bool>" not in res.output, path
        blocks = _option_blocks(res.output)
        for param in command.params:
            if param.param_type_name != "option" or getattr(param, "hidden", False):
                continue
            name = param.opts[0] if param.opts[0].startswith("--") else param.opts[-1]
            block = blocks.get(name)
            assert block is not None, (path, name, res.output)
            if param.is_flag:  # shown as a flag: the help text follows the name, no <value>
                after = block.split(name, 1)[1].split()
                assert after and not after[0].startswith("<"), (path, name, block)
            stated = re.findall(r"\[default: [^\]]*\]", param.help or "")
            for text in stated:  # a default written in the help text reaches the page whole
                assert " ".join(text.split()) in block, (path, name, text, block)
            if not stated and param.default is not None and not param.is_flag and not param.required:
                value = ", ".join(map(str, param.default)) if isinstance(param.default, list | tuple) else param.default
                assert re.search(rf"\[default: {re.escape(str(value))}[;\]]", block), (path, name, block)
            checked += 1
    assert checked > 80  # every command was walked


def test_version():
    res = invoke("--version")
    assert res.exit_code == 0 and res.output.strip() == f"clcli {clcli.__version__}"


def _strict_json(text: str):
    """Parse ``text`` as JSON, refusing NaN and infinities (not JSON)."""
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON output"))


def test_pretrain_says_what_to_run_next_and_evaluations_print_once(tmp_path):
    run = tmp_path / "my run"
    sets = set_args(*tiny_overrides("simclr", "trainer.steps=9", "trainer.online_knn_every=1"))
    res = invoke("pretrain", "--recipe", "simclr", "--out", run, "--no-progress", *sets)
    assert res.exit_code == 0, res.output
    quoted = f"'{run}'"  # a path with a space, quoted for the shell
    for command in (f"clcli eval knn --run {quoted}", f"clcli report --run {quoted}", f"clcli export --run {quoted}"):
        assert command in res.output, res.output
    assert "online kNN top-1 0." in res.output and "knn_top1" not in res.output  # epoch 1 of 8 steps
    assert f"final loss {losses(run)[-1]:.4f}" in res.output

    # a finished run resumed: nothing to train, the last logged loss (no NaN), one JSON object
    res = invoke("pretrain", "--resume", "--out", run, "--json")
    assert res.exit_code == 0, res.output
    summary = _strict_json(res.output)
    assert summary["steps"] == 9 and summary["final_loss"] == losses(run)[-1] and "next" not in res.output

    res = invoke("eval", "knn", "--run", run, "--test-limit", 30)
    assert res.exit_code == 0, res.output
    assert res.output.count("top-1") == 1 and "│" not in res.output and "┃" not in res.output
    assert re.search(
        r"kNN \(k=200, T=0.1, backbone features, 256 reference / 30 test images\): top-1 0\.\d{4}", res.output
    )
    res = invoke("eval", "linear", "--run", run, "--test-limit", 30)
    assert res.exit_code == 0, res.output
    assert res.output.count("top-1 0.") == 2 and "[[" not in res.output  # the score and the train score
    assert "validation top-1 by L2: 1e-06: 0." in res.output
    for protocol in ("knn", "linear", "retrieval"):
        res = invoke("eval", protocol, "--run", run, "--test-limit", 30, "--json")
        assert res.exit_code == 0 and _strict_json(res.output)["protocol"] == protocol


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("polish") / "run"
    res = invoke(
        "pretrain",
        "--recipe",
        "simclr",
        "--out",
        run,
        "--json",
        *set_args(*tiny_overrides("simclr", "trainer.steps=1")),
    )
    assert res.exit_code == 0, res.output
    return run


def test_user_errors_of_embed_and_retrieval_are_one_message_and_exit_2(trained, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    unlabelled = tmp_path / "photos"
    from .conftest import write_image

    write_image(unlabelled / "a.png")
    (tmp_path / "s.json").mkdir()
    clip = tmp_path / "clip.safetensors"
    clip.write_bytes(b"not a checkpoint")
    out = ["--out", tmp_path / "e.parquet"]
    emb = ["embed", "--run", trained]
    cases = [
        ([*emb, "--out", tmp_path], "is a folder"),  # the output is a folder
        ([*emb, "--out", a_file / "e.parquet"], "is a file, not a folder"),  # under a file
        ([*emb, "--out", "/proc/clcli/e.parquet"], "/proc/clcli/e.parquet"),  # cannot be written
        ([*emb, "--out", tmp_path / "s.npy"], "s.json is a folder"),  # the sidecar of an npy file
        ([*emb, "--out", tmp_path / "e.csv", "--format", "csv"], "--format must be"),
        ([*emb, *out, "--format", "npy"], "give --out F.npy"),
        ([*emb, *out, "--features", "bank"], "memory bank"),
        ([*emb, *out, "--features", "pixels"], "--features must be"),
        ([*emb, *out, "--limit", "0"], "--limit must be at least 1"),
        ([*emb, *out, "--batch-size", "0"], "--batch-size must be at least 1"),
        ([*emb, *out, "--split", "nosuch"], "nosuch"),
        ([*emb, *out, "--data", tmp_path / "missing"], "does not exist"),
        ([*emb, *out, "--data", ""], "empty"),
        (["embed", "--run", tmp_path / "nope", *out], "does not exist"),
        (["embed", "--run", a_file.parent, *out], "not a clcli run folder"),
        (["embed", *out], "give --run RUN"),
        (["embed", "--checkpoint", clip, *out], "--data"),
        (
            ["embed", "--checkpoint", tmp_path / "none.pt", "--data", unlabelled, *out],
            "none.pt",
        ),
        (["embed", "--checkpoint", clip, "--data", unlabelled, *out], str(clip)),
        (["eval", "retrieval", "--run", trained, "--data", unlabelled], "no labels"),
        (["eval", "retrieval", "--run", trained, "--features", "bank"], "backbone or embedding"),
        (["eval", "retrieval", "--run", trained, "--output", "/proc/clcli/r.json"], "/proc/clcli/r.json"),
        (["eval", "retrieval", "--run", trained, "--output", tmp_path], "is a folder"),
        (["eval", "retrieval", "--run", trained, "--test-limit", "0"], "--test-limit"),
        (["eval", "retrieval", "--run", tmp_path / "nope"], "does not exist"),
        (["eval", "knn", "--run", trained, "--output", a_file / "k.json"], "is a file, not a folder"),
        (["eval", "linear", "--run", trained, "--output", "/proc/clcli/l.json"], "/proc/clcli/l.json"),
    ]
    for args, needle in cases:
        assert_user_error(invoke(*args), needle)
    assert not list(tmp_path.glob("e.*")) and not (trained / "eval").exists()  # nothing written


def test_embed_checks_its_outputs_before_loading_anything(tmp_path):
    """An unwritable --out is reported even when the run does not exist: it is checked first."""
    assert_user_error(invoke("embed", "--run", tmp_path / "nope", "--out", "/proc/clcli/e.parquet"), "/proc/clcli")
