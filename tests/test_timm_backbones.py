"""timm backbones (``model.backbone.name: timm:NAME``): building, the CIFAR stem, multi-crop ViTs, local
pretrained weights, and the export round trip."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from clcli.assemble import prepare_training
from clcli.errors import CheckpointError, RecipeError
from clcli.models.backbones import build_backbone
from clcli.recipe import BackboneConfig, load_recipe

from .helpers import tiny_recipe, trained_and_exported

timm = pytest.importorskip("timm")


def _cfg(name: str, **kw) -> BackboneConfig:
    return BackboneConfig(name=f"timm:{name}", **kw)


def test_resnet_gets_the_cifar_stem_and_its_feature_dim_from_the_model():
    model = build_backbone(_cfg("test_resnet", image_size=32))
    conv = model.conv1
    assert isinstance(conv, torch.nn.Conv2d) and (conv.kernel_size, conv.stride) == ((3, 3), (1, 1))
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert model.feature_dim == 96 and model(torch.randn(2, 3, 32, 32)).shape == (2, 96)
    plain = build_backbone(_cfg("test_resnet", cifar_stem=False))
    assert isinstance(plain.conv1, torch.nn.Sequential) and not isinstance(plain.maxpool, torch.nn.Identity)
    assert plain.timm_kwargs == {"num_classes": 0, "in_chans": 3}  # no img_size: a ResNet takes none


def test_vit_embeds_crops_of_other_sizes():
    model = build_backbone(_cfg("test_vit", image_size=32)).eval()  # patch 16: a 2 x 2 grid at 32 px
    assert model.timm_kwargs["dynamic_img_size"] and model.timm_kwargs["img_size"] == 32
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        full, local = model(torch.randn(2, 3, 32, 32, generator=g)), model(torch.randn(2, 3, 16, 16, generator=g))
    assert full.shape == local.shape == (2, model.feature_dim) == (2, 64)
    assert torch.isfinite(local).all()
    with pytest.raises(RecipeError, match="16x16 patches.*24x24 px.*multiple of 16"):
        model(torch.randn(1, 3, 24, 24))


def test_cifar_stem_refused_where_it_does_not_apply_and_unknown_names():
    with pytest.raises(RecipeError, match="cifar_stem=false"):
        build_backbone(_cfg("test_convnext", image_size=32))
    assert build_backbone(_cfg("test_convnext", image_size=32, cifar_stem=False)).feature_dim > 0
    with pytest.raises(RecipeError, match="model.backbone.name.*no architecture 'no_such_net'"):
        load_recipe("simclr", ["model.backbone.name=timm:no_such_net"])
    assert load_recipe("simclr", ["model.backbone.name=timm:test_resnet"]).model.backbone.name == "timm:test_resnet"


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_pretrained_file_loads_local_weights(tmp_path, suffix):
    cfg = _cfg("test_resnet")
    source = build_backbone(cfg)
    weights = {k: v.clone() for k, v in source.state_dict().items()}
    file = tmp_path / f"w{suffix}"
    with_head = {**weights, "fc.weight": torch.zeros(10, 96), "fc.bias": torch.zeros(10)}  # a classifier is left out
    if suffix == ".pt":
        torch.save({"state_dict": with_head}, file)
    else:
        save_file(with_head, str(file))
    loaded = build_backbone(cfg.model_copy(update={"pretrained_file": str(file)}), pretrained=True)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in weights.items())
    # without pretrained (a checkpoint or an export brings the weights) the file is not read
    fresh = build_backbone(cfg.model_copy(update={"pretrained_file": str(tmp_path / "gone.pt")}))
    assert not torch.equal(fresh.conv1.weight, weights["conv1.weight"])
    with pytest.raises(CheckpointError, match="does not exist"):
        build_backbone(cfg.model_copy(update={"pretrained_file": str(tmp_path / "gone.pt")}), pretrained=True)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"conv1.weight": torch.zeros(1)}, str(wrong))
    with pytest.raises(CheckpointError, match="missing: .*other shape"):
        build_backbone(cfg.model_copy(update={"pretrained_file": str(wrong)}), pretrained=True)


def test_a_run_starts_from_the_pretrained_file(tmp_path):
    recipe = tiny_recipe("simclr", "model.backbone.name=timm:test_resnet", "model.backbone.image_size=16")
    weights = build_backbone(recipe.model.backbone).state_dict()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_path / "w.safetensors"))
    recipe = recipe.model_copy(deep=True)
    recipe.model.backbone.pretrained_file = str(tmp_path / "w.safetensors")
    stages = prepare_training(recipe, tmp_path / "run", show_progress=False)
    assert all(torch.equal(stages.method.backbone.state_dict()[k], v) for k, v in weights.items())


def test_training_and_export_round_trip(tmp_path):
    recipe = tiny_recipe(
        "simclr", "model.backbone.name=timm:test_resnet", "model.backbone.image_size=16", "trainer.steps=2"
    )
    info, method, encoder = trained_and_exported(recipe, tmp_path)
    assert info["feature_dim"] == 96
    meta = json.loads(encoder.metadata["timm"])
    assert meta == {"name": "test_resnet", "kwargs": {"num_classes": 0, "in_chans": 3}, "cifar_stem": True}
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(encoder(x), method.features(x), atol=1e-6)


def test_dino_multi_crop_with_a_timm_vit(tmp_path):
    from clcli.train import pretrain

    from .helpers import losses

    recipe = tiny_recipe(
        "dino",
        "model.backbone.name=timm:test_vit",
        "model.backbone.image_size=32",
        "views.groups.0.size=32",
        "views.groups.1.size=16",  # local crops: a 1 x 1 patch grid, position embeddings interpolated
        "views.eval_size=32",
        "trainer.steps=2",
    )
    pretrain(recipe, tmp_path / "run")
    assert len(losses(tmp_path / "run")) == 2 and all(torch.isfinite(torch.tensor(losses(tmp_path / "run"))))
