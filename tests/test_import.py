"""clcli import: published checkpoints in each official layout (the key names of the official code, built here
with random weights, no downloads) mapped onto clcli's backbones, checked end to end."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from clcli.cli import app
from clcli.export import load_backbone
from clcli.models.ckpt_import import LAYOUTS, map_checkpoint

runner = CliRunner()


class Marker:
    """A Python object a pickle may carry, which weights_only=True refuses to build."""


def _optimizer() -> dict:
    return {"state": {0: {"momentum_buffer": torch.zeros(3)}}, "param_groups": [{"lr": 0.03, "params": [0, 1]}]}


def _mlp(prefix: str, dims: tuple[int, ...] = (512, 64, 16), bn: bool = True) -> dict[str, torch.Tensor]:
    """A projector's tensors under ``prefix`` (Linear, [BatchNorm], ReLU, Linear, ... as nn.Sequential indices)."""
    out, i = {}, 0
    for a, b in zip(dims[:-1], dims[1:], strict=True):
        out[f"{prefix}{i}.weight"] = torch.randn(b, a)
        i += 1
        if bn and b != dims[-1]:
            out |= {f"{prefix}{i}.{n}": torch.ones(b) for n in ("weight", "bias", "running_mean", "running_var")}
            i += 1
        i += 1  # the ReLU
    return out


def _under(prefix: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


def _resnet_layouts(sd: dict[str, torch.Tensor]) -> dict[str, tuple[dict, dict]]:
    """For a torchvision ResNet state dict ``sd`` (with ``fc``): each layout's file contents and import options,
    as the official code (or the common PyTorch port) saves it."""
    body = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    width = sd["fc.weight"].shape[1]
    seq = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
    sequential = {seq[k.split(".")[0]] + k[k.index(".") :]: v for k, v in body.items()}
    return {
        # facebookresearch/moco main_moco.py: DDP-wrapped MoCo with encoder_q / encoder_k, queue; v2's MLP in fc
        "moco": (
            {
                "epoch": 200,
                "arch": "resnet50",
                "state_dict": _under("module.encoder_q.", body)
                | _mlp("module.encoder_q.fc.", (width, 32, 16), bn=False)
                | _under("module.encoder_k.", body)
                | {"module.queue": torch.randn(16, 64), "module.queue_ptr": torch.zeros(1, dtype=torch.long)},
                "optimizer": _optimizer(),
            },
            {},
        ),
        # facebookresearch/moco-v3 main_moco.py: base_encoder / momentum_encoder with the projector in fc, predictor
        "mocov3": (
            {
                "epoch": 100,
                "arch": "resnet50",
                "state_dict": _under("module.base_encoder.", body)
                | _mlp("module.base_encoder.fc.", (width, 32, 16))
                | _under("module.momentum_encoder.", body)
                | _mlp("module.predictor.", (16, 32, 16)),
                "optimizer": _optimizer(),
                "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0},
            },
            {},
        ),
        # facebookresearch/swav main_swav.py: DDP-wrapped resnet50 with projection_head and prototypes, no fc
        "swav": (
            {
                "epoch": 800,
                "state_dict": _under("module.", body)
                | _mlp("module.projection_head.", (width, 32, 16))
                | {"module.prototypes.weight": torch.randn(30, 16)},
                "optimizer": _optimizer(),
            },
            {},
        ),
        # facebookresearch/dino main_dino.py: student (DDP) and teacher with backbone + DINOHead, and args
        "dino": (
            {
                "student": _under("module.backbone.", body) | _mlp("module.head.mlp.", (width, 32, 16), bn=False),
                "teacher": _under("module.backbone.", body)
                | _mlp("module.head.mlp.", (width, 32, 16), bn=False)
                | {
                    "module.head.last_layer.weight_g": torch.ones(64, 1),
                    "module.head.last_layer.weight_v": torch.ones(64, 16),
                },
                "optimizer": _optimizer(),
                "epoch": 100,
                "args": argparse.Namespace(arch="resnet50", out_dim=65536, teacher_temp=0.04),
                "dino_loss": {"center": torch.zeros(1, 64)},
            },
            {},
        ),
        # sthalles/PyTorch-BYOL: encoder = Sequential(*resnet.children()[:-1]), MLPHead "projetion"
        "byol": (
            {
                "online_network_state_dict": _under("encoder.", sequential) | _mlp("projetion.net.", (width, 32, 16)),
                "target_network_state_dict": _under("encoder.", sequential) | _mlp("projetion.net.", (width, 32, 16)),
                "optimizer_state_dict": _optimizer(),
            },
            {},
        ),
        # sthalles/SimCLR: ResNetSimCLR.backbone = torchvision resnet with the MLP in fc
        "simclr": (
            {
                "epoch": 100,
                "arch": "resnet18",
                "state_dict": _under("backbone.", body) | _mlp("backbone.fc.", (width, width, 16), bn=False),
                "optimizer": _optimizer(),
            },
            {},
        ),
        # facebookresearch/simsiam main_simsiam.py: encoder with the projector in fc, predictor
        "simsiam": (
            {
                "epoch": 100,
                "arch": "resnet50",
                "state_dict": _under("module.encoder.", body)
                | _mlp("module.encoder.fc.", (width, 32, 16))
                | _mlp("module.predictor.", (16, 8, 16)),
                "optimizer": _optimizer(),
            },
            {},
        ),
        "torchvision": (dict(sd), {}),
    }


def _body(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


# second ports of BYOL and SimCLR, and the other branch of MoCo v3
EXTRA_RESNET_CASES = {
    # lucidrains/byol-pytorch: the BYOL learner's state dict (NetWrapper.net is the user's torchvision ResNet)
    "byol-learner": (
        "byol",
        lambda sd: (
            _under("online_encoder.net.", sd)
            | _mlp("online_encoder.projector.net.", (512, 32, 16))
            | _mlp("online_predictor.net.", (16, 32, 16))
            | _under("target_encoder.net.", {k: v + 1 for k, v in sd.items()})
        ),
        [],
    ),
    # Spijkervet/SimCLR: SimCLR(encoder, projector) with the encoder's fc = Identity
    "simclr-spijkervet": ("simclr", lambda sd: _under("encoder.", _body(sd)) | _mlp("projector.", (512, 512, 16)), []),
    # MoCo v3's momentum encoder (its base encoder differs)
    "mocov3-momentum": (
        "mocov3",
        lambda sd: {
            "state_dict": _under("module.base_encoder.", {k: v + 1 for k, v in _body(sd).items()})
            | _under("module.momentum_encoder.", _body(sd))
        },
        ["--branch", "momentum"],
    ),
}


def _resnet(depth: int, *, cifar: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = getattr(torchvision.models, f"resnet{depth}")()
    if cifar:
        model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    for m in model.modules():  # batch-norm statistics that matter
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def resnet18():
    return _resnet(18, cifar=True)


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    fc, model.fc = model.fc, nn.Identity()
    try:
        with torch.no_grad():
            return model(x)
    finally:
        model.fc = fc


def _import(src, layout, out, *extra):
    return runner.invoke(app, ["import", str(src), "--from", layout, "--out", str(out), "--json", *extra])


# ----------------------------------------------------------------------------------- tests
def test_every_official_resnet50_key_maps_in_every_layout():
    """Full-size ResNet-50 names (torchvision's, on the meta device: no weights): each layout finds every key."""
    with torch.device("meta"):
        sd = torchvision.models.resnet50().state_dict()
    want = {k for k in sd if not k.startswith("fc.")}
    assert len(want) == 318
    for layout, (contents, _) in _resnet_layouts(sd).items():
        imp = map_checkpoint(contents, layout)
        assert set(imp.state_dict) == want, layout
        assert all(tuple(imp.state_dict[k].shape) == tuple(sd[k].shape) for k in want), layout
        assert imp.config.name == "resnet50" and not imp.config.cifar_stem and imp.input_size == 224
        assert all(not k.startswith(("fc.", "module.")) for k in imp.state_dict)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_import_of_each_layout_gives_the_original_features(layout, resnet18, tmp_path):
    contents, options = _resnet_layouts(resnet18.state_dict())[layout]
    src = tmp_path / "ckpt.pth.tar"
    torch.save(contents, src)
    out = tmp_path / "backbone.safetensors"
    res = _import(src, layout, out, *options)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["backbone"] == "resnet18" and summary["feature_dim"] == 512 and summary["input_size"] == 32
    assert summary["tensors"] == len([k for k in resnet18.state_dict() if not k.startswith("fc.")])
    encoder = load_backbone(out)
    assert encoder.metadata["method"] == layout and encoder.mean == (0.485, 0.456, 0.406)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(encoder(x), _features(resnet18, x), atol=1e-5)
    if layout != "torchvision":
        return
    # the weights load strictly into the torchvision model the recipe of the README describes
    tv = _resnet(18, cifar=True, seed=1)
    tv.fc = nn.Identity()
    from safetensors.torch import load_file

    tv.load_state_dict(load_file(str(out)), strict=True)


@pytest.mark.parametrize("case", sorted(EXTRA_RESNET_CASES))
def test_second_ports_and_branches(case, resnet18, tmp_path):
    layout, build, options = EXTRA_RESNET_CASES[case]
    contents = build(resnet18.state_dict())
    src = tmp_path / "ckpt.pt"
    torch.save(contents, src)
    out = tmp_path / "b.safetensors"
    res = _import(src, layout, out, *options)
    assert res.exit_code == 0, res.output
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(load_backbone(out)(x), _features(resnet18, x), atol=1e-5)


def _timm_vit(dim: int = 128, heads: int = 2):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=dim, depth=2, num_heads=heads, num_classes=0, qkv_bias=True
    )
    with torch.no_grad():
        for p in model.parameters():  # away from the zero / one initial values, so a mis-mapping shows
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


@pytest.mark.parametrize("layout", ["dino", "mocov3"])
def test_vit_layouts_give_timms_features(layout, tmp_path):
    """DINO's and MoCo v3's ViTs are timm-named: the imported clcli ViT computes what timm's computes."""
    vit = _timm_vit()
    sd = vit.state_dict()
    if layout == "dino":  # the full training checkpoint; teacher not DDP-wrapped (a ViT has no batch norm)
        contents = {
            "teacher": _under("backbone.", sd) | _mlp("head.mlp.", (128, 32, 16), bn=False),
            "student": _under("module.backbone.", {k: v + 1 for k, v in sd.items()}),
            "args": argparse.Namespace(arch="vit_small", patch_size=8),
            "epoch": 100,
        }
    else:  # MoCo v3: the projector replaces timm's head
        contents = {
            "state_dict": _under("module.base_encoder.", sd)
            | _mlp("module.base_encoder.head.", (128, 32, 16))
            | _under("module.momentum_encoder.", sd),
            "epoch": 300,
            "arch": "vit_small",
        }
    src = tmp_path / "ckpt.pth"
    torch.save(contents, src)
    out = tmp_path / "vit.safetensors"
    res = _import(src, layout, out, "--heads", "2")
    assert res.exit_code == 0, res.output
    encoder = load_backbone(out)
    assert encoder.metadata["backbone"] and json.loads(encoder.metadata["backbone"])["image_size"] == 32
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(encoder(x), vit(x), atol=1e-5)


def test_backbone_only_safetensors_is_read_directly_and_heads_default_to_the_release(tmp_path):
    """DINO's published backbone-only weights, as safetensors (no pickle): a plain timm-named ViT."""
    vit = _timm_vit(dim=128, heads=2)
    src = tmp_path / "dino_vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(src))
    res = _import(src, "dino", tmp_path / "b.safetensors")
    assert res.exit_code == 0, res.output
    assert json.loads(load_backbone(tmp_path / "b.safetensors").metadata["backbone"])["heads"] == 2  # 128 / 64
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(load_backbone(tmp_path / "b.safetensors")(x), vit(x), atol=1e-5)
    res = _import(src, "dino", tmp_path / "s.safetensors", "--branch", "student")
    assert res.exit_code == 2 and "no 'student' entry" in res.output


def test_errors_name_the_layout_and_the_keys(resnet18, tmp_path):
    contents, _ = _resnet_layouts(resnet18.state_dict())["moco"]
    src = tmp_path / "moco.pth.tar"
    torch.save(contents, src)
    out = tmp_path / "b.safetensors"
    res = _import(src, "mocov2", out)
    assert res.exit_code == 2 and "unknown checkpoint layout 'mocov2'" in res.output and "simsiam" in res.output
    res = _import(src, "simsiam", out)  # the wrong layout: says where the keys are
    assert res.exit_code == 2 and "module.encoder." in res.output and "module." in res.output
    broken = {k: v for k, v in contents["state_dict"].items() if k != "module.encoder_q.layer2.0.conv1.weight"}
    broken["module.encoder_q.layer3.1.bn2.weight"] = torch.ones(7)
    torch.save({"state_dict": broken}, src)
    res = _import(src, "moco", out)
    assert res.exit_code == 2
    assert "1 missing: layer2.0.conv1.weight" in res.output
    assert "layer3.1.bn2.weight (file (7,), resnet18 (256,))" in res.output
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["moco.pth.tar"]


def test_pickles_with_objects_need_trust(resnet18, tmp_path):
    contents, _ = _resnet_layouts(resnet18.state_dict())["simsiam"]
    src = tmp_path / "simsiam.pth.tar"
    torch.save({**contents, "extra": Marker()}, src)
    out = tmp_path / "b.safetensors"
    res = _import(src, "simsiam", out)
    assert res.exit_code == 2 and "--trust-pickle" in res.output and "weights_only=True" in res.output
    assert not out.exists()
    res = _import(src, "simsiam", out, "--trust-pickle")
    assert res.exit_code == 0, res.output and out.is_file()


def test_eval_reads_a_published_checkpoint_and_an_imported_file(resnet18, tmp_path):
    contents, _ = _resnet_layouts(resnet18.state_dict())["swav"]
    src = tmp_path / "swav.pth.tar"
    torch.save(contents, src)
    common = ["--data", "embedded:digits", "--train-limit", "32", "--test-limit", "16", "--json"]
    res = runner.invoke(app, ["eval", "knn", "--checkpoint", str(src), "--from", "swav", "--k", "5", *common])
    assert res.exit_code == 0, res.output
    direct = json.loads(res.output)
    assert direct["layout"] == "swav" and direct["feature_dim"] == 512 and direct["test_images"] == 16
    assert _import(src, "swav", tmp_path / "b.safetensors").exit_code == 0
    res = runner.invoke(app, ["eval", "knn", "--checkpoint", str(tmp_path / "b.safetensors"), "--k", "5", *common])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["top1"] == direct["top1"]  # the same encoder either way
    res = runner.invoke(
        app, ["eval", "knn", "--checkpoint", str(src), "--from", "swav", "--features", "embedding", *common]
    )
    assert res.exit_code == 2 and "backbone only" in res.output


def test_import_help_names_every_layout():
    res = runner.invoke(app, ["import", "--help"])
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    for layout in LAYOUTS:
        assert layout in text
    assert "--trust-pickle" in text and "--branch" in text
