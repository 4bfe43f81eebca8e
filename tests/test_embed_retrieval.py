"""``clcli embed`` (features of every image to parquet or npy) and ``clcli eval retrieval`` (recall@K, mAP).

The saved vectors are checked against those the kNN evaluation scores, and the retrieval figures
against a brute-force computation written here from the definitions.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from clcli.cli import app
from clcli.evaluate import protocols
from clcli.evaluate.embed import embed, read_embeddings
from clcli.evaluate.retrieval import retrieval_scores
from clcli.train import pretrain

from .conftest import write_image
from .helpers import tiny_recipe, tiny_recipe_names

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def brute_force_retrieval(queries, q_labels, gallery, g_labels, ks=(1, 5, 10)):
    """Recall@K and mAP from the definitions, one query at a time in plain Python: cosine similarity,
    ranking by (similarity descending, gallery position); queries with no relevant image left out."""
    q = [np.asarray(v, dtype=np.float64) / np.linalg.norm(v) for v in queries]
    g = [np.asarray(v, dtype=np.float64) / np.linalg.norm(v) for v in gallery]
    recall = {k: 0 for k in ks}
    aps = []
    for qv, ql in zip(q, q_labels, strict=True):
        sims = [float(np.float32(qv @ gv)) for gv in g]
        ranking = sorted(range(len(g)), key=lambda j: (-sims[j], j))
        relevant = [g_labels[j] == ql for j in ranking]
        if not any(relevant):
            continue
        for k in ks:
            recall[k] += any(relevant[:k])
        found, precisions = 0, []
        for rank, rel in enumerate(relevant, start=1):
            if rel:
                found += 1
                precisions.append(found / rank)
        aps.append(sum(precisions) / found)
    n = len(aps)
    return {**{f"recall_at_{k}": recall[k] / n for k in ks}, "map": sum(aps) / n, "queries": n}


def test_retrieval_scores_match_a_brute_force_computation():
    gen = torch.Generator().manual_seed(0)
    gallery = torch.randn(37, 6, generator=gen)
    gallery[5] = gallery[3]  # a tie: equal similarity to every query, ranked by gallery position
    gallery[20] = 2.5 * gallery[11]  # a tie after normalisation
    g_labels = torch.randint(0, 4, (37,), generator=gen)
    queries = torch.randn(23, 6, generator=gen)
    queries[0] = gallery[3]
    q_labels = torch.randint(0, 4, (23,), generator=gen)
    q_labels[7] = 9  # a label no gallery image has: left out
    got = retrieval_scores(queries, q_labels, gallery, g_labels, chunk_size=5)
    want = brute_force_retrieval(queries.tolist(), q_labels.tolist(), gallery.tolist(), g_labels.tolist())
    assert got["queries"] == want["queries"] == 22 and got["queries_without_match"] == 1
    for key in ("recall_at_1", "recall_at_5", "recall_at_10", "map"):
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    assert 0 < got["recall_at_1"] <= got["recall_at_5"] <= got["recall_at_10"] <= 1
    # a perfect ranking: every relevant image first
    labels = torch.tensor([0, 0, 1, 1, 2])
    eye = torch.eye(3)[labels] + 0.01 * torch.arange(5.0)[:, None]
    perfect = retrieval_scores(eye, labels, eye, labels)
    assert perfect["map"] == pytest.approx(1.0) and perfect["recall_at_1"] == 1.0
    # a K above the gallery size counts the whole gallery
    assert retrieval_scores(queries, q_labels, gallery[:4], g_labels[:4], ks=(100,))["recall_at_100"] == 1.0


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A three-step tiny SimCLR run on the digits (256 training images)."""
    out = tmp_path_factory.mktemp("embed") / "run"
    pretrain(tiny_recipe("simclr", "trainer.steps=3"), out, show_progress=False)
    return out


def test_saved_features_equal_those_knn_scores(run, tmp_path, monkeypatch):
    """Round trip: the rows `clcli embed` writes are bit for bit the features `clcli eval knn` votes with."""
    seen = {}
    knn = protocols.knn_accuracy

    def spy(train_f, train_y, test_f, test_y, **kw):
        seen.update(train=(train_f, train_y), test=(test_f, test_y))
        return knn(train_f, train_y, test_f, test_y, **kw)

    monkeypatch.setattr(protocols, "knn_accuracy", spy)
    res = invoke("eval", "knn", "--run", run, "--test-limit", 50, "--json")
    assert res.exit_code == 0, res.output

    res = invoke("embed", "--run", run, "--out", tmp_path / "train.parquet", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert (summary["images"], summary["feature_dim"], summary["split"]) == (256, 64, "train")
    saved = read_embeddings(tmp_path / "train.parquet")
    assert np.array_equal(saved["features"], seen["train"][0].numpy())
    assert saved["label"] == seen["train"][1].tolist()
    assert saved["index"] == list(range(256)) and saved["id"][3].startswith("embedded:digits train record 3 ")
    assert saved["meta"]["features"] == "backbone" and saved["meta"]["run"] == str(run)

    res = invoke("embed", "--run", run, "--split", "test", "--limit", 50, "--out", tmp_path / "test.npy")
    assert res.exit_code == 0, res.output
    saved = read_embeddings(tmp_path / "test.npy")
    assert saved["features"].dtype == np.float32 and saved["features"].shape == (50, 64)
    assert np.array_equal(saved["features"], seen["test"][0].numpy())
    assert saved["label"] == seen["test"][1].tolist()
    side = json.loads((tmp_path / "test.json").read_text())
    assert side["rows"] == 50 and side["split"] == "test" and len(side["classes"]) == 10

    # the embedding layer, and a different batch size, through the same path
    out = embed(run, tmp_path / "emb.parquet", features="embedding", batch_size=7, limit=20, show_progress=False)
    assert out["feature_dim"] == 16 and out["images"] == 20
    default = embed(run, tmp_path / "emb2.npy", features="embedding", limit=20, show_progress=False)
    np.testing.assert_allclose(
        read_embeddings(tmp_path / "emb.parquet")["features"],
        read_embeddings(tmp_path / "emb2.npy")["features"],
        atol=1e-5,
    )
    assert default["format"] == "npy"


def test_eval_retrieval_matches_brute_force_on_the_saved_features(run, tmp_path):
    res = invoke("eval", "retrieval", "--run", run, "--test-limit", 40, "--json")
    assert res.exit_code == 0, res.output
    result = json.loads(res.output)
    assert result["protocol"] == "retrieval" and (result["train_images"], result["test_images"]) == (256, 40)
    assert result == {**json.loads((run / "eval" / "retrieval.json").read_text()), "output": result["output"]}
    for split, extra in (("train", []), ("test", ["--limit", 40])):
        res = invoke("embed", "--run", run, "--split", split, *extra, "--out", tmp_path / f"{split}.parquet")
        assert res.exit_code == 0, res.output
    gallery, queries = (read_embeddings(tmp_path / f"{s}.parquet") for s in ("train", "test"))
    want = brute_force_retrieval(queries["features"], queries["label"], gallery["features"], gallery["label"])
    for key in ("recall_at_1", "recall_at_5", "recall_at_10", "map", "queries"):
        assert result[key] == pytest.approx(want[key], abs=1e-9), key
    assert result["recall_at_1"] > 0.5  # digits: the nearest training digit mostly has the query's label

    text = invoke("eval", "retrieval", "--run", run, "--test-limit", 40).output
    assert text.count("mAP") == 1 and f"recall@1 {result['recall_at_1']:.4f}" in text


# every method (clip-lit is the clip method again, with a slow pretrained text tower)
@pytest.mark.parametrize("name", [n for n in tiny_recipe_names() if n != "clip-lit"])
def test_every_method_embeds(name, tmp_path):
    recipe = tiny_recipe(name, "trainer.steps=1", "data.limit=32", "trainer.batch_size=16")
    pretrain(recipe, tmp_path / "run", show_progress=False)
    for layer, fmt in (("backbone", "parquet"), ("embedding", "npy")):
        out = tmp_path / f"{layer}.{fmt}"
        summary = embed(tmp_path / "run", out, features=layer, limit=8, show_progress=False)
        saved = read_embeddings(out)
        assert saved["features"].shape == (8, summary["feature_dim"]) and np.isfinite(saved["features"]).all()
        assert saved["meta"]["method"] == recipe.method.name and saved["meta"]["features"] == layer


def test_embed_an_imported_clip_file_on_an_unlabelled_folder(tmp_path):
    """A pretrained CLIP file embeds a folder of loose images: rows named by their files, no label column,
    the image tower's embeddings as open_clip computes them."""
    pytest.importorskip("open_clip", reason="open_clip (a test-only dependency) is not installed")
    from PIL import Image
    from safetensors.torch import save_file
    from torchvision.transforms import v2

    from .test_clip_import import small_open_clip

    model = small_open_clip("vit", True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    files = [write_image(tmp_path / "photos" / f"{i}.png", seed=i, size=(40, 30)) for i in range(5)]
    res = invoke(
        "embed", "--checkpoint", tmp_path / "clip.safetensors", "--data", tmp_path / "photos",
        "--features", "embedding", "--out", tmp_path / "clip.parquet",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    saved = read_embeddings(tmp_path / "clip.parquet")
    assert saved["label"] is None and saved["id"] == [str(f) for f in sorted(files)]
    assert saved["meta"]["method"] == "clip (imported)" and saved["meta"]["run"] is None
    prep = v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(32, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(32),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ]
    )
    x = torch.stack([prep(Image.open(f).convert("RGB")) for f in sorted(files)])
    with torch.no_grad():
        want = model.encode_image(x, normalize=True).numpy()
    got = saved["features"] / np.linalg.norm(saved["features"], axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert math.isclose(float(np.linalg.norm(got[0])), 1.0, abs_tol=1e-6)
