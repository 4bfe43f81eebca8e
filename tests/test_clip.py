"""CLIP: the loss, the text tower, the tokenizers, the method, zero-shot classification and its CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from clcli.assemble import prepare_training
from clcli.cli import app
from clcli.errors import ClcliError, DataError
from clcli.evaluate.zeroshot import read_labels, zeroshot, zeroshot_classifier
from clcli.losses import clip_contrastive
from clcli.models.text import TextTransformer
from clcli.recipe import load_recipe
from clcli.runs import load_run
from clcli.text import CIFAR10_TEMPLATES, IMAGENET_TEMPLATES, CaptionTokenizer, load_templates
from clcli.train import pretrain

from .conftest import write_image
from .helpers import CIFAR, CIFAR_CLIP_RUN, assert_exact_resume, fixed_batch, metric_rows, run_losses, tiny_recipe


def clip_recipe(*extra: str):
    return tiny_recipe("clip", *extra)


# ------------------------------------------------------------------------------------ loss
def reference_clip_loss(image: np.ndarray, text: np.ndarray, t: float, max_scale: float = 100.0) -> float:
    """CLIP's figure-3 pseudo-code written with loops: symmetric CE over scaled cosine logits."""
    n = image.shape[0]
    i_e = image / np.linalg.norm(image, axis=1, keepdims=True)
    t_e = text / np.linalg.norm(text, axis=1, keepdims=True)
    scale = min(math.exp(t), max_scale)
    logits = [[scale * float(np.dot(i_e[i], t_e[j])) for j in range(n)] for i in range(n)]
    loss_i = 0.0
    loss_t = 0.0
    for i in range(n):
        row = logits[i]
        loss_i += -(row[i] - math.log(sum(math.exp(v) for v in row)))
        col = [logits[j][i] for j in range(n)]
        loss_t += -(col[i] - math.log(sum(math.exp(v) for v in col)))
    return (loss_i / n + loss_t / n) / 2


@pytest.mark.parametrize("t", [math.log(1 / 0.07), math.log(250.0), 0.3])
def test_clip_loss_matches_an_independent_computation(t):
    g = torch.Generator().manual_seed(1)
    image, text = (
        torch.randn(7, 5, generator=g, dtype=torch.float64),
        torch.randn(7, 5, generator=g, dtype=torch.float64),
    )
    got = clip_contrastive(image, text, torch.tensor(t))
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(reference_clip_loss(image.numpy(), text.numpy(), t), rel=1e-5)


def test_clip_loss_temperature_gradient_stops_at_the_clip_and_runs_in_fp32_under_bf16():
    image, text = torch.randn(6, 4), torch.randn(6, 4)
    below = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    clip_contrastive(image, text, below).backward()
    assert below.grad is not None and below.grad.abs() > 0
    above = torch.tensor(math.log(150.0), requires_grad=True)
    clip_contrastive(image, text, above).backward()
    assert above.grad is not None and above.grad.item() == 0.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = clip_contrastive(image.bfloat16(), text.bfloat16(), torch.tensor(2.0))
    assert out.dtype == torch.float32
    with pytest.raises(ValueError, match="one shape"):
        clip_contrastive(image, text[:3], torch.tensor(1.0))


# ------------------------------------------------------------------------------ text tower
def test_text_tower_is_causal_and_reads_the_end_of_text_token():
    torch.manual_seed(0)
    tower = TextTransformer(vocab_size=50, context_length=12, width=16, layers=2, heads=2, embed_dim=8, eot_id=2)
    ids = torch.tensor([[1, 10, 11, 12, 2, 0, 0, 0], [1, 20, 2, 0, 0, 0, 0, 0]])
    base = tower(ids)
    after = ids.clone()
    after[0, 5:] = torch.tensor([33, 34, 35])  # tokens after the end-of-text token change nothing
    assert torch.allclose(tower(after), base, atol=1e-6)
    assert torch.allclose(tower(ids[:, :5]), base, atol=1e-6)  # nor does cutting the padding
    before = ids.clone()
    before[0, 2] = 40  # a token before it does
    changed = tower(before)
    assert not torch.allclose(changed[0], base[0], atol=1e-4) and torch.allclose(changed[1], base[1], atol=1e-6)
    # the feature is projection(final LayerNorm(x)) at the end-of-text position
    x = tower.token_embedding(ids) + tower.position_embedding[: ids.shape[1]]
    for block in tower.blocks:
        x = block(x)
    manual = tower.projection(tower.norm(x))[torch.arange(2), torch.tensor([4, 2])]
    assert torch.allclose(manual, base, atol=1e-6)


# ------------------------------------------------------------------------------- tokenizer
def test_caption_tokenizer_round_trip_truncation_and_serialisation():
    captions = [f"a photo of a {c}." for c in ("cat", "dog", "ship", "truck")] * 5
    tok = CaptionTokenizer.train(captions, vocab_size=320)
    assert (tok.pad_id, tok.sot_id, tok.eot_id) == (0, 1, 2) and tok.vocab_size <= 320
    assert tok.decode(tok.encode("A  photo of a   DOG.")) == "a photo of a dog."
    assert tok.decode(tok.encode("an unseen wörd")) == "an unseen wörd"  # byte-level: nothing is unknown
    ids = tok(["a photo of a cat.", "cat " * 100], context_length=16)
    assert ids.shape == (2, 16)
    assert ids[0, 0] == 1 and 2 in ids[0].tolist() and ids[0, -1] == 0
    assert ids[1, 0] == 1 and ids[1, -1] == 2 and 0 not in ids[1].tolist()  # truncated, end token kept
    again = CaptionTokenizer.from_json(tok.to_json())
    assert torch.equal(again(["a photo of a ship."]), tok(["a photo of a ship."]))


def open_clip_tokenizer_module():
    """open_clip's tokenizer.py loaded on its own (importing the whole package takes seconds)."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip (a test-only dependency) is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_clip_tokenizer_matches_open_clip_on_varied_text():
    from clcli.text import ClipTokenizer, default_clip_vocab

    reference = open_clip_tokenizer_module()
    vocab = default_clip_vocab()
    assert vocab is not None
    ours = ClipTokenizer(vocab)
    theirs = reference.SimpleTokenizer(str(vocab))
    texts = [
        "a photo of a cat.",
        "Hello,   World!!!  It's me... (really?) -- yes; 100% [sure] {ok} <tag> #hash @at",
        "naïve café — résumé, Straße, ½ ² ⅷ, e\u0301",
        "日本語のテキスト、中文文本，한국어 텍스트",
        "emoji 😀🎉👍🏽 &amp; &lt;b&gt; &#39;quoted&#39;",
        "don't you'll we've I'M they'd it's",
        "C3PO r2-d2 3.14159 1,000,000 2024-01-01",
        "tabs\tand\nnew\r\nlines   and   spaces",
        "",
        "   ",
        "antidisestablishmentarianism " * 40,
        "x" * 1000,
        "ÀÉÎÕÜ ÇÑ Ωμέγα Привет мир",
    ]
    assert torch.equal(ours(texts), theirs(texts))
    long = ours(["word " * 200])
    assert long.shape == (1, 77) and long[0, -1] == ours.eot_id == 49407 and long[0, 0] == ours.sot_id == 49406


def test_clip_vocabulary_file_errors(tmp_path):
    from clcli.text import ClipTokenizer

    with pytest.raises(ClcliError, match="does not exist"):
        ClipTokenizer(tmp_path / "missing.txt.gz")
    bad = tmp_path / "bad.txt.gz"
    bad.write_text("not gzip")
    with pytest.raises(ClcliError, match="not a CLIP BPE vocabulary"):
        ClipTokenizer(bad)


# ------------------------------------------------------------------------------- templates
def test_template_sets_files_and_errors(tmp_path):
    assert len(CIFAR10_TEMPLATES) == 18 and len(IMAGENET_TEMPLATES) == 80
    assert CIFAR10_TEMPLATES[0] == "a photo of a {}." and CIFAR10_TEMPLATES[-1] == "a photo of the big {}."
    assert len(set(IMAGENET_TEMPLATES)) == 80 and "itap of a {}." in IMAGENET_TEMPLATES
    assert load_templates("CIFAR10") == list(CIFAR10_TEMPLATES)
    assert load_templates("a sketch of a {label}") == ["a sketch of a {}"]
    f = tmp_path / "t.txt"
    f.write_text("# my prompts\nan image of a {}.\n\na drawing of the {label}.\n")
    assert load_templates(str(f)) == ["an image of a {}.", "a drawing of the {}."]
    with pytest.raises(ClcliError, match="unknown template set 'cifar100'"):
        load_templates("cifar100")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ClcliError, match="holds no templates"):
        load_templates(str(tmp_path / "empty.txt"))
    (tmp_path / "two.txt").write_text("{} and {}\n")
    with pytest.raises(ClcliError, match="exactly one"):
        load_templates(str(tmp_path / "two.txt"))


def test_read_labels(tmp_path):
    assert read_labels(" cat, dog ,ship,") == ["cat", "dog", "ship"]
    f = tmp_path / "labels.txt"
    f.write_text("# classes\ncat\n\n dog \n")
    assert read_labels(None, f) == ["cat", "dog"]
    assert read_labels("ship", f) == ["ship", "cat", "dog"]
    with pytest.raises(ClcliError, match="--labels is empty"):
        read_labels(" , ")
    with pytest.raises(ClcliError, match="given twice"):
        read_labels("cat,Cat")
    with pytest.raises(ClcliError, match="does not exist"):
        read_labels(None, tmp_path / "nope.txt")


# ---------------------------------------------------------------------------------- method
def test_clip_learns_on_real_images_and_keeps_the_temperature_clipped(tmp_path):
    recipe = clip_recipe(
        *fixed_batch(images=48, steps=20, lr=3e-3),
        "views.groups.0.crop_scale=[0.8, 1.0]",
        "method.max_logit_scale=20",
    )
    seq = run_losses(recipe, tmp_path / "run")
    assert len(seq) == 20
    assert sum(seq[-5:]) / 5 < sum(seq[:5]) / 5 - 0.3
    rows = metric_rows(tmp_path / "run")
    assert all(r["logit_scale"] <= 20 + 1e-4 for r in rows)
    _, method, _ = load_run(tmp_path / "run")
    assert method.logit_scale.item() <= math.log(20) + 1e-6


def test_templated_captions_and_the_tokenizer_survive_a_reload(tmp_path):
    recipe = clip_recipe("trainer.steps=2", "method.caption_templates=cifar10")
    stages = prepare_training(recipe, tmp_path / "run")
    method = stages.method
    assert method.class_names == [str(k) for k in range(10)]
    cb = next(iter(stages.trainer._batches()))
    batch = stages.trainer._to_batch(cb)
    caps = method.batch_captions(batch, 0)
    labels = batch.label.tolist()
    assert all(c.rstrip(".").endswith(str(lbl)) for c, lbl in zip(caps, labels, strict=True))
    assert len({c.replace(str(lbl), "{}") for c, lbl in zip(caps, labels, strict=True)}) > 3  # several templates
    assert caps == method.batch_captions(batch, 0) and caps != method.batch_captions(batch, 1)
    stages.trainer.fit()
    texts = ["a photo of a 3.", "a blurry photo of the 7."]
    before = method.encode_text(texts)
    _, again, _ = load_run(tmp_path / "run", device=torch.device("cpu"))
    assert again.tokenizer.to_json() == method.tokenizer.to_json()
    assert torch.allclose(again.encode_text(texts), before.cpu(), atol=1e-6)


def test_exact_resume_with_templated_captions(tmp_path):
    recipe = clip_recipe("trainer.steps=5", "trainer.checkpoint_every=2", "method.caption_templates=cifar10")
    assert_exact_resume(recipe, tmp_path, stop_after=2)


def test_captions_from_txt_files_and_from_a_text_column(tmp_path, image_tree, hub_folder):
    # a folder: the one image with a .txt caption uses it, the others fall back to templates over class names
    stages = prepare_training(clip_recipe(f"data.source={image_tree}", "trainer.batch_size=4"), tmp_path / "a")
    tok = stages.method.tokenizer
    assert tok.decode(tok.encode("a cat")) == "a cat"
    assert len(tok.encode("a photo of a dog.")) < len("a photo of a dog.")  # merges learnt from the templates
    # a table with a caption column and labels: captions="text" reads the column
    stages = prepare_training(
        clip_recipe(f"data.source={hub_folder}", "trainer.batch_size=2", "method.captions=text"), tmp_path / "b"
    )
    cb = next(iter(stages.trainer._batches()))
    batch = stages.trainer._to_batch(cb)
    assert all(c.startswith("picture ") for c in stages.method.batch_captions(batch, 0))
    assert stages.method.tokenizer.encode("picture")  # trained on the column
    # captions="text" on data without captions is refused
    with pytest.raises(DataError, match="has no captions"):
        prepare_training(clip_recipe("method.captions=text"), tmp_path / "c")


def test_unlabelled_images_without_captions_are_refused(tmp_path):
    for k in range(4):
        write_image(tmp_path / "flat" / f"{k}.png", seed=k, size=(8, 8))
    with pytest.raises(DataError, match="CLIP needs captions"):
        prepare_training(clip_recipe(f"data.source={tmp_path / 'flat'}", "trainer.batch_size=2"), tmp_path / "run")


def test_recipes_validate_and_the_locked_tower_needs_its_folder():
    for name in ("clip", "clip-imagenet", "clip-lit"):
        recipe = load_recipe(name)
        assert recipe.method.name == "clip" and recipe.trainer.precision == "bf16"
        assert recipe.views.groups[0].count == 1
    assert load_recipe("clip-imagenet").method.text_layers == 12
    with pytest.raises(ClcliError, match="text_encoder"):
        load_recipe("clip", ["method.text_tower=hf"])


# -------------------------------------------------------------------------------- zero-shot
@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("clip") / "run"
    pretrain(clip_recipe("trainer.steps=3"), run)
    return run


def test_zeroshot_classifier_is_the_renormalised_mean_of_normalised_prompt_embeddings(digits_run):
    _, method, _ = load_run(digits_run, device=torch.device("cpu"))
    labels, templates = ["3", "7", "zebra"], ["a photo of a {}.", "a drawing of the {}.", "itap of my {}."]
    weights = zeroshot_classifier(method, labels, templates, batch_size=2)  # batching crosses labels
    assert weights.shape == (3, 32)
    for i, label in enumerate(labels):
        emb = torch.stack([method.encode_text([t.format(label)])[0] for t in templates])
        emb = emb / emb.norm(dim=1, keepdim=True)
        mean = emb.mean(dim=0)
        assert torch.allclose(weights[i], mean / mean.norm(), atol=1e-5)


def test_zeroshot_on_labelled_data_and_on_a_folder(digits_run, tmp_path):
    res = zeroshot(digits_run, data="embedded:digits", templates="simple", limit=50)
    assert res["matched"] == "by name" and res["images"] == 50 and 0 <= res["top1"] <= res["top5"] <= 1
    # the overall score is the per-class scores weighted by their images
    assert sum(r["images"] for r in res["per_class"]) == 50
    assert res["top1"] == pytest.approx(sum(r["top1"] * r["images"] for r in res["per_class"]) / 50)
    assert [r["class"] for r in res["per_class"]] == [str(k) for k in range(10)]
    assert (digits_run / "eval" / "zeroshot.json").is_file()
    for k in range(3):
        write_image(tmp_path / "imgs" / "sub" / f"{k}.png", seed=k, size=(20, 12))
    res = zeroshot(digits_run, images=tmp_path / "imgs", labels="cat,dog,ship", top_k=2, output=tmp_path / "o.json")
    assert len(res["predictions"]) == 3 and all(len(p["top"]) == 2 for p in res["predictions"])
    for p in res["predictions"]:
        assert p["top"][0]["probability"] >= p["top"][1]["probability"]
    assert json.loads((tmp_path / "o.json").read_text())["labels"] == ["cat", "dog", "ship"]


runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_cli_zeroshot_json_label_file_and_template_file(digits_run, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(str(k) for k in range(10)) + "\n")
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\na picture of the number {label}\n")
    result = invoke(
        "zeroshot", "--run", digits_run, "--labels-file", labels, "--templates", templates,
        "--data", "embedded:digits", "--limit", "40", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["num_templates"] == 2 and out["images"] == 40 and "top1" in out and len(out["per_class"]) == 10
    write_image(tmp_path / "one.png", seed=3, size=(9, 9))
    result = invoke("zeroshot", "--run", digits_run, "--labels", "cat,dog", "--images", tmp_path / "one.png")
    assert result.exit_code == 0, result.output
    assert "zero-shot predictions" in result.output and "cat" in result.output


def test_cli_zeroshot_bad_inputs_exit_2_with_a_message(digits_run, tmp_path):
    write_image(tmp_path / "img.png")
    cases = [
        (["--run", digits_run, "--labels", " , ", "--images", tmp_path / "img.png"], "--labels is empty"),
        (["--run", digits_run, "--labels", "a,b", "--templates", "cifar100", "--images", tmp_path / "img.png"],
         "unknown template set"),
        (["--run", digits_run, "--labels", "a,b"], "exactly one of --images"),
        (["--run", digits_run, "--labels", "a,b", "--images", tmp_path / "none"], "does not exist"),
        (["--run", tmp_path / "norun", "--labels", "a", "--images", tmp_path / "img.png"], "does not exist"),
        (["--run", digits_run, "--labels", "a,b", "--data", "embedded:digits"], "cannot be matched"),
        (["--labels", "a", "--images", tmp_path / "img.png"], "give --run"),
    ]  # fmt: skip
    for args, message in cases:
        result = invoke("zeroshot", *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)


def test_zeroshot_refuses_a_run_without_a_text_tower(tmp_path):
    pretrain(tiny_recipe("simclr", "trainer.steps=1"), tmp_path / "simclr")
    write_image(tmp_path / "img.png")
    result = invoke("zeroshot", "--run", tmp_path / "simclr", "--labels", "a,b", "--images", tmp_path / "img.png")
    assert result.exit_code == 2 and "no text tower" in result.output


# ---------------------------------------------------------------------- CIFAR-10, one template
@pytest.mark.skipif(not (CIFAR / "train.parquet").is_file(), reason=f"CIFAR-10 parquet not found under {CIFAR}")
def test_small_clip_on_cifar10_zero_shot_with_the_18_template_ensemble_beats_chance(tmp_path):
    recipe = clip_recipe(
        f"data.source={CIFAR}",
        *CIFAR_CLIP_RUN,
        "method.embed_dim=64",
        "method.text_width=64",
        "method.vocab_size=512",
        "views.groups.0.crop_scale=[0.5, 1.0]",
        "method.caption_templates=a photo of a {}.",
    )
    pretrain(recipe, tmp_path / "run")
    res = zeroshot(tmp_path / "run", data=str(CIFAR), split="test", limit=1000, templates="cifar10")
    assert res["num_templates"] == 18 and res["images"] == 1000
    assert res["top1"] > 0.15, res["per_class"]  # chance is 0.10 (binomial sd 0.0095 over 1000 images)
