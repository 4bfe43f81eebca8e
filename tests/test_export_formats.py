"""clcli export --format torchscript|onnx|hf: the features load_backbone gives, composite encoders included."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from typer.testing import CliRunner

from clcli.cli import app
from clcli.export import export_run, load_backbone
from clcli.train import pretrain

from .helpers import tiny_recipe

runner = CliRunner()

# one run per kind of exported encoder: torchvision ResNet, ViT (DINO's teacher), CMC's two Lab-view
# encoders, CPC's patch grid, CLIP's image tower (a plain backbone)
RUNS = {
    "resnet": ("simclr", "model.backbone.name=resnet18"),
    "vit": ("dino-vit",),
    "cmc": ("cmc",),
    "cpc": ("cpc",),
    "clip": ("clip",),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A one-step run of each kind, and its safetensors export read back with load_backbone."""
    root = tmp_path_factory.mktemp("export-formats")
    out = {}
    for kind, (name, *extra) in RUNS.items():
        run = root / kind
        pretrain(tiny_recipe(name, "trainer.steps=1", *extra), run)
        export_run(run, root / f"{kind}.safetensors")
        out[kind] = (run, load_backbone(root / f"{kind}.safetensors"))
    return out


def _batch(encoder, n: int = 5) -> torch.Tensor:
    """Five images (the exports were traced with two): the batch axis must be free."""
    size = encoder.input_size
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", ["resnet", "vit", "cmc", "cpc"])
def test_onnx_export_matches_pytorch_with_a_dynamic_batch(runs, kind, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    run, encoder = runs[kind]
    out = tmp_path / "encoder.onnx"
    info = export_run(run, out, fmt="onnx")
    assert info["format"] == "onnx" and info["feature_dim"] == encoder.feature_dim
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, outp.name) == ("images", "features")
    assert not isinstance(inp.shape[0], int) and inp.shape[1:] == [3, encoder.input_size, encoder.input_size]
    for n in (1, 5):
        x = _batch(encoder, n)
        with torch.no_grad():
            want = encoder(x)
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        assert got.shape == want.shape == (n, encoder.feature_dim)
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    props = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert json.loads(props["clcli.mean"]) == list(encoder.mean) and props["clcli.kind"] == encoder.metadata["kind"]
    assert [p.name for p in tmp_path.iterdir()] == ["encoder.onnx"]  # no temporary, no external data file


@pytest.mark.parametrize("kind", sorted(RUNS))
def test_torchscript_export_matches_pytorch_with_a_dynamic_batch(runs, kind, tmp_path):
    run, encoder = runs[kind]
    out = tmp_path / "encoder.pt"
    assert export_run(run, out, fmt="torchscript")["format"] == "torchscript"
    extra = {"clcli.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
        scripted = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["clcli.json"])["feature_dim"] == str(encoder.feature_dim)
    x = _batch(encoder)
    with torch.no_grad():
        assert torch.allclose(scripted(x), encoder(x), atol=1e-4, rtol=1e-4)


def test_hf_folder_round_trips_and_carries_a_model_card(runs, tmp_path):
    run, encoder = runs["resnet"]
    (run / "eval").mkdir(exist_ok=True)
    (run / "eval" / "knn.json").write_text(
        json.dumps({"protocol": "knn", "top1": 0.8125, "top5": 0.97, "k": 20, "data": "embedded:digits"})
    )
    out = tmp_path / "model"
    res = runner.invoke(app, ["export", "--run", str(run), "--format", "hf", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left beside it
    config = json.loads((out / "config.json").read_text())
    assert config["feature_dim"] == 512 and config["backbone"]["name"] == "resnet18" and config["method"] == "simclr"
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: clcli\n")
    assert "| knn | 0.8125 | 0.9700 | embedded:digits |" in card  # the run's evaluation results
    assert "clcli.load_backbone(" in card and "name: simclr" in card  # how to load, and the resolved recipe
    assert "embedded:digits" in card.split("## Training")[1]  # the training data
    back = load_backbone(out)
    x = _batch(encoder)
    with torch.no_grad():
        assert torch.equal(back(x), encoder(x))
    # exporting again replaces the earlier folder; a folder holding other files is refused
    assert runner.invoke(app, ["export", "--run", str(run), "--format", "hf", "--out", str(out)]).exit_code == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    res = runner.invoke(app, ["export", "--run", str(run), "--format", "hf", "--out", str(other)])
    assert res.exit_code == 2 and "already holds other files" in res.output
    assert os.listdir(other) == ["notes.txt"]


def test_composite_hf_folder_round_trips(runs, tmp_path):
    run, encoder = runs["cmc"]
    export_run(run, tmp_path / "cmc", fmt="hf")
    back = load_backbone(tmp_path / "cmc")
    x = _batch(encoder)
    with torch.no_grad():
        assert torch.equal(back(x), encoder(x))
    assert "composite" in (tmp_path / "cmc" / "README.md").read_text()


def test_unknown_format_and_bad_outputs_are_one_message(runs, tmp_path):
    run, _ = runs["clip"]
    res = runner.invoke(app, ["export", "--run", str(run), "--format", "tflite", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "available: safetensors, torchscript, onnx, hf" in res.output
    a_file = tmp_path / "file"
    a_file.write_text("x")
    res = runner.invoke(app, ["export", "--run", str(run), "--format", "hf", "--out", str(a_file)])
    assert res.exit_code == 2 and "is a file, not a folder" in res.output
    res = runner.invoke(app, ["export", "--run", str(run), "--format", "onnx", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "is a folder" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_failed_onnx_export_leaves_no_file(runs, tmp_path, monkeypatch):
    run, _ = runs["clip"]

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator aten::magic\nmore detail")

    monkeypatch.setattr(torch.onnx, "export", broken)
    res = runner.invoke(app, ["export", "--run", str(run), "--format", "onnx", "--out", str(tmp_path / "e.onnx")])
    assert res.exit_code == 2 and "cannot export the encoder to ONNX: RuntimeError: unsupported operator" in res.output
    assert list(tmp_path.iterdir()) == []
