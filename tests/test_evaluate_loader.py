"""Evaluation's one loader and the library's own checks: the device rule, defaults from EvalConfig, features."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import clcli.evaluate.loader as loader_module
import clcli.evaluate.zeroshot as zeroshot_module
from clcli.errors import ClcliError, RecipeError
from clcli.evaluate.features import extract_features
from clcli.evaluate.loader import FEATURE_LAYERS, load_model
from clcli.evaluate.protocols import knn_eval, linear_eval
from clcli.evaluate.zeroshot import zeroshot, zeroshot_classifier
from clcli.recipe import EvalConfig, TrainerConfig, load_recipe
from clcli.train import pretrain

from .conftest import write_image
from .helpers import tiny_recipe


@pytest.fixture(scope="module")
def simclr_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("loader") / "run"
    pretrain(tiny_recipe("simclr", "trainer.steps=1"), run)
    return run


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    """A small randomly initialised CLIP in open_clip's layout, saved as safetensors."""
    open_clip = pytest.importorskip("open_clip", reason="open_clip (a test-only dependency) is not installed")
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=1, width=64, head_width=32, patch_size=8, image_size=16)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=2, layers=1)
    model = CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text, quick_gelu=True).eval()
    assert open_clip is not None
    path = tmp_path_factory.mktemp("clipfile") / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


# ------------------------------------------------------------------------------ features
@pytest.mark.parametrize("evaluate", [knn_eval, linear_eval])
def test_an_unknown_features_value_is_refused_by_the_library_before_anything_is_loaded(tmp_path, evaluate):
    with pytest.raises(ClcliError, match=r"--features must be 'backbone', 'embedding' or 'bank', got 'pixels'"):
        evaluate(tmp_path / "no-such-run", features="pixels")
    assert FEATURE_LAYERS == ("backbone", "embedding", "bank")


def test_extract_features_refuses_a_layer_it_cannot_read(simclr_run):
    loaded = load_model(simclr_run)
    from clcli.data import open_source

    source = open_source("embedded:digits", "test")
    for layer in ("bank", "pixels"):
        with pytest.raises(ClcliError, match="'backbone' or the 'embedding'"):
            extract_features(loaded.model, source, loaded.recipe, device=loaded.device, layer=layer)


def test_eval_features_bank_is_validated_by_the_method():
    assert load_recipe("instdisc", ["eval.features=bank"]).eval.features == "bank"
    with pytest.raises(RecipeError, match=r"eval.features: bank needs a method with a memory bank.*simclr"):
        load_recipe("simclr", ["eval.features=bank"])


# ------------------------------------------------------------------------------ the loader
def test_the_loader_places_a_run_and_a_file_by_the_training_device_rule(simclr_run, clip_file, monkeypatch):
    asked: list[str] = []

    def rule(choice: str) -> torch.device:
        asked.append(choice)
        return torch.device("meta")  # a device no CUDA check would choose: only the rule puts the model there

    monkeypatch.setattr(loader_module, "pick_device", rule)
    loaded = load_model(None, clip_file, data="embedded:digits", needs_data=True)
    assert asked == [TrainerConfig().device]
    assert loaded.device == torch.device("meta") and next(loaded.model.parameters()).is_meta
    assert loaded.recipe.trainer.precision == "fp32" and loaded.interpolation == "bicubic"
    assert loaded.recipe.data.source == "embedded:digits" and loaded.run_dir is None
    assert loaded.describe()["method"] == "clip (imported)" and loaded.default_output("knn", None) is None

    import clcli.runs as runs_module

    monkeypatch.setattr(runs_module, "pick_device", rule)
    run = load_model(simclr_run)
    assert asked[-1] == run.recipe.trainer.device and run.device == torch.device("meta")
    assert run.default_output("knn", None) == simclr_run / "eval" / "knn.json"


def test_the_loader_checks_a_file_once_for_all_protocols(clip_file, tmp_path):
    with pytest.raises(ClcliError, match="--activation must be"):
        load_model(None, clip_file, activation="relu")
    with pytest.raises(ClcliError, match="give --data SPEC"):
        load_model(None, clip_file, needs_data=True)
    with pytest.raises(ClcliError, match="goes with --run"):
        load_model(None, tmp_path)
    with pytest.raises(ClcliError, match="give --run RUN"):
        load_model(None, None)


def test_a_run_without_a_text_tower_is_refused_for_zero_shot(simclr_run):
    with pytest.raises(ClcliError, match="no text tower"):
        load_model(simclr_run, text=True)


# ------------------------------------------------------------------------ defaults from EvalConfig
class _CountingText:
    def __init__(self) -> None:
        self.chunks: list[int] = []

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        self.chunks.append(len(texts))
        return torch.randn(len(texts), 4)


def test_zeroshot_classifier_batches_prompts_by_eval_batch_size_by_default():
    model = _CountingText()
    labels = [f"label {i}" for i in range(EvalConfig().batch_size + 10)]
    zeroshot_classifier(model, labels, ["a photo of a {}."])
    assert model.chunks == [EvalConfig().batch_size, 10]


def test_zeroshot_of_a_file_takes_its_batch_size_from_eval_config(clip_file, tmp_path, monkeypatch):
    seen: dict[str, int | None] = {}
    original = zeroshot_module.zeroshot_scores

    def spy(*args, **kwargs):
        seen["batch_size"] = kwargs["batch_size"]
        return original(*args, **kwargs)

    monkeypatch.setattr(zeroshot_module, "zeroshot_scores", spy)
    write_image(tmp_path / "one.png", seed=1, size=(20, 20))
    res = zeroshot(checkpoint=clip_file, labels="cat,dog", templates="simple", images=tmp_path / "one.png")
    assert seen["batch_size"] == EvalConfig().batch_size == 256  # it was 128 before the defaults moved
    assert len(res["predictions"]) == 1 and res["method"] == "clip (imported)" and "vocab" in res
