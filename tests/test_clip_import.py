"""Importing OpenAI / open_clip CLIP checkpoints: same embeddings as open_clip, clear errors otherwise.

open_clip is a test-only dependency; its models are created offline with random weights.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from clcli.cli import app
from clcli.errors import CheckpointError
from clcli.models.clip_import import build_clip, load_clip, read_state_dict

from .conftest import write_image

open_clip = pytest.importorskip("open_clip", reason="open_clip (a test-only dependency) is not installed")
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg  # noqa: E402

TEXTS = ["a photo of a cat.", "A BLURRY photo of the ship!!", "ünïcode, punctuation; and a long text " * 12]
runner = CliRunner()


def small_open_clip(kind: str, quick_gelu: bool, seed: int = 0) -> torch.nn.Module:
    """A small randomly initialised open_clip model in the standard layout (ViT or modified ResNet)."""
    torch.manual_seed(seed)
    if kind == "vit":
        vision = CLIPVisionCfg(layers=2, width=128, head_width=64, patch_size=8, image_size=32)
    else:
        vision = CLIPVisionCfg(layers=(1, 2, 1, 1), width=16, head_width=64, image_size=64)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=128, heads=2, layers=2)
    model = CLIP(embed_dim=48, vision_cfg=vision, text_cfg=text, quick_gelu=quick_gelu).eval()
    with torch.no_grad():  # move norms and zero-initialised layers off their defaults, so the mapping is exercised
        for name, p in model.named_parameters():
            if "ln" in name or "bn" in name:
                p.add_(0.1 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                b.normal_(0, 0.1)
    return model


def reference_embeddings(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = open_clip.tokenize(TEXTS)
    with torch.no_grad():
        return model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)


@pytest.mark.parametrize(("kind", "quick_gelu"), [("vit", False), ("vit", True), ("resnet", True)])
def test_imported_small_models_give_open_clips_embeddings(tmp_path, kind, quick_gelu):
    model = small_open_clip(kind, quick_gelu)
    size = 32 if kind == "vit" else 64
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    ref_image, ref_text = reference_embeddings(model, images)
    path = tmp_path / "clip.pt"
    torch.save(model.state_dict(), path)
    ours = load_clip(path, activation="quick_gelu" if quick_gelu else "gelu")
    assert ours.image_size == size
    with torch.no_grad():
        assert torch.allclose(ours.encode_image(images), ref_image, atol=1e-5)
        assert torch.allclose(ours.encode_text(TEXTS), ref_text, atol=1e-5)
    assert ours.logit_scale_value() == pytest.approx(model.logit_scale.exp().item(), rel=1e-6)


def test_training_checkpoint_with_module_prefix_and_safetensors(tmp_path):
    model = small_open_clip("vit", False)
    sd = model.state_dict()
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "e.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "m.safetensors"))
    a = read_state_dict(tmp_path / "e.pt")
    b = read_state_dict(tmp_path / "m.safetensors")
    assert set(a) == set(b) == set(sd)
    assert all(torch.equal(a[k], sd[k]) and torch.equal(b[k], sd[k]) for k in sd)


def test_wrong_files_name_their_missing_and_unexpected_keys(tmp_path):
    model = small_open_clip("vit", False)
    sd = model.state_dict()
    # a plain image encoder is not a CLIP checkpoint
    save_file(
        {"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.weight": torch.zeros(2, 4)}, str(tmp_path / "r.safetensors")
    )
    with pytest.raises(
        CheckpointError, match=r"not an OpenAI / open_clip CLIP checkpoint: missing keys: .*token_embedding"
    ):
        load_clip(tmp_path / "r.safetensors")
    # a CLIP with one block's tensors missing and one stray tensor
    broken = {k: v for k, v in sd.items() if not k.startswith("transformer.resblocks.1.mlp.c_fc")}
    broken["transformer.resblocks.1.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        build_clip(broken, where="broken.pt")
    msg = str(err.value)
    assert "missing keys: transformer.resblocks.1.mlp.c_fc.bias, transformer.resblocks.1.mlp.c_fc.weight" in msg
    assert "unexpected keys: transformer.resblocks.1.extra.weight" in msg
    # a pickle that needs code to load is refused by weights_only
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        read_state_dict(tmp_path / "pickled.pt")
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        read_state_dict(tmp_path / "junk.bin")


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_needs_the_trust_flag(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.script(torch.nn.Linear(3, 2)).save(str(path))
    with pytest.raises(CheckpointError, match="TorchScript archive.*--trust-torchscript"):
        read_state_dict(path)
    assert set(read_state_dict(path, trust_torchscript=True)) == {"weight", "bias"}
    with pytest.raises(CheckpointError, match="not an OpenAI / open_clip CLIP checkpoint"):
        load_clip(path, trust_torchscript=True)


def test_cli_classifies_a_folder_with_an_imported_checkpoint(tmp_path):
    model = small_open_clip("vit", True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    from clcli.text import default_clip_vocab

    for k in range(3):
        write_image(tmp_path / "photos" / f"p{k}.jpg", seed=k, size=(40, 30))
    args = ["zeroshot", "--checkpoint", str(tmp_path / "clip.safetensors"), "--vocab", str(default_clip_vocab())]
    args += ["--labels", "cat,dog,ship", "--templates", "cifar10", "--images", str(tmp_path / "photos"), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["num_templates"] == 18 and len(out["predictions"]) == 3
    assert all(abs(sum(t["probability"] for t in p["top"]) - 1) < 1e-5 for p in out["predictions"])
    # the same classifier by hand, with open_clip
    from clcli.text import CIFAR10_TEMPLATES

    with torch.no_grad():
        w = model.encode_text(
            open_clip.tokenize([t.format(c) for c in ("cat", "dog", "ship") for t in CIFAR10_TEMPLATES])
        )
        w = torch.nn.functional.normalize(w, dim=-1).reshape(3, 18, -1).mean(1)
        w = torch.nn.functional.normalize(w, dim=-1)
    ours = load_clip(tmp_path / "clip.safetensors")
    from clcli.evaluate.zeroshot import zeroshot_classifier

    assert torch.allclose(zeroshot_classifier(ours, ["cat", "dog", "ship"], list(CIFAR10_TEMPLATES)), w, atol=1e-5)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_cli_checkpoint_errors_exit_2(tmp_path):
    write_image(tmp_path / "img.png")
    save_file({"fc.weight": torch.zeros(2, 4)}, str(tmp_path / "r.safetensors"))
    torch.jit.script(torch.nn.Linear(3, 2)).save(str(tmp_path / "s.pt"))
    cases = [
        (["--checkpoint", tmp_path / "r.safetensors"], "missing keys"),
        (["--checkpoint", tmp_path / "s.pt"], "--trust-torchscript"),
        (["--checkpoint", tmp_path / "nope.pt"], "does not exist"),
        (["--checkpoint", tmp_path / "r.safetensors", "--vocab", tmp_path / "img.png"], "not a CLIP BPE vocabulary"),
        (["--checkpoint", tmp_path / "r.safetensors", "--activation", "relu"], "--activation"),
    ]
    for args, message in cases:
        result = runner.invoke(
            app, ["zeroshot", *map(str, args), "--labels", "a,b", "--images", str(tmp_path / "img.png")]
        )
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)


def test_open_clip_vit_b_32_exported_and_imported_gives_the_same_embeddings(tmp_path):
    """The full-size layout (151M parameters, about 15 s of CPU): random weights, created offline."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()  # open_clip's ViT-B-32 uses GELU
    path = tmp_path / "vit-b-32.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    ref_image, ref_text = reference_embeddings(model, images)
    ours = load_clip(path, activation="gelu")
    with torch.no_grad():
        assert torch.allclose(ours.encode_image(images), ref_image, atol=1e-5)
        assert torch.allclose(ours.encode_text(TEXTS), ref_text, atol=1e-5)


def _labelled_folder(root, per_class: int, seed: int) -> None:
    for c, name in enumerate(("cat", "ship")):
        for k in range(per_class):
            write_image(root / name / f"{k}.png", seed=seed + 10 * c + k, size=(40, 30))


def test_eval_knn_and_linear_take_an_imported_checkpoint_file(tmp_path):
    """`clcli eval knn|linear --checkpoint FILE --data DIR`: the image tower of a pretrained CLIP, no run."""
    from torchvision.transforms import v2

    model = small_open_clip("vit", True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    _labelled_folder(tmp_path / "data" / "train", 4, 0)
    _labelled_folder(tmp_path / "data" / "test", 3, 100)
    base = ["--checkpoint", str(tmp_path / "clip.safetensors"), "--data", str(tmp_path / "data"), "--json"]
    result = runner.invoke(app, ["eval", "knn", *base, "--k", "3", "--temperature", "0.1"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["run"] is None and out["method"] == "clip (imported)" and out["activation"] == "quick_gelu"
    assert (out["train_images"], out["test_images"], out["feature_dim"]) == (8, 6, 48)

    # the same vote by hand: open_clip's image embeddings of bicubic-resized, centre-cropped images
    from PIL import Image

    prep = v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(32, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(32),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ]
    )

    def embed(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        files = sorted((tmp_path / "data" / split).rglob("*.png"))
        x = torch.stack([prep(Image.open(f).convert("RGB")) for f in files])
        with torch.no_grad():
            return model.encode_image(x, normalize=True), torch.tensor([f.parent.name == "ship" for f in files]).long()

    (ftr, ytr), (fte, yte) = embed("train"), embed("test")
    sims, idx = (fte @ ftr.t()).topk(3, dim=1)
    votes = torch.zeros(len(fte), 2).scatter_add_(1, ytr[idx], (sims / 0.1).exp())
    assert out["top1"] == pytest.approx((votes.argmax(1) == yte).float().mean().item())

    result = runner.invoke(app, ["eval", "linear", *base, "--output", str(tmp_path / "lin.json")])
    assert result.exit_code == 0, result.output
    linear = json.loads(result.output)
    assert linear["top1"] * 6 == pytest.approx(round(linear["top1"] * 6), abs=1e-9)  # a count of the 6 test images
    assert json.loads((tmp_path / "lin.json").read_text())["checkpoint"] == str(tmp_path / "clip.safetensors")


def test_eval_without_a_run_or_data_says_what_to_give(tmp_path):
    save_file({"fc.weight": torch.zeros(2, 4)}, str(tmp_path / "r.safetensors"))
    cases = [
        ([], "give --run RUN"),
        (["--checkpoint", str(tmp_path / "r.safetensors")], "give --data SPEC"),
        (["--checkpoint", str(tmp_path)], "goes with --run"),
        (["--checkpoint", str(tmp_path / "r.safetensors"), "--data", str(tmp_path)], "missing keys"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["eval", "knn", *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit:FutureWarning")
def test_a_torchscript_clip_loads_with_the_trust_flag_and_gives_open_clips_embeddings(tmp_path):
    """OpenAI publishes TorchScript archives of whole models; with the flag their weights map as usual."""
    model = small_open_clip("vit", True)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    tokens = open_clip.tokenize(TEXTS)
    traced = torch.jit.trace(model, (images, tokens), strict=False, check_trace=False)
    traced.save(str(tmp_path / "clip.pt"))
    with pytest.raises(CheckpointError, match="--trust-torchscript"):
        load_clip(tmp_path / "clip.pt")
    ours = load_clip(tmp_path / "clip.pt", trust_torchscript=True)
    ref_image, ref_text = reference_embeddings(model, images)
    with torch.no_grad():
        assert torch.allclose(ours.encode_image(images), ref_image, atol=1e-5)
        assert torch.allclose(ours.encode_text(TEXTS), ref_text, atol=1e-5)
