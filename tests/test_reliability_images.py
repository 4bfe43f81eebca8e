"""Issue 24, images: EXIF orientation is applied, unreadable files are counted once per file (training) and
reported by every evaluation, and kNN results give the k that really voted."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from clcli.cli import app
from clcli.data.images import decode_image_bytes, image_from_value, read_image_file
from clcli.data.sources import open_source
from clcli.evaluate.protocols import knn_eval, linear_eval
from clcli.train import pretrain

from .conftest import write_image
from .helpers import tiny_recipe

runner = CliRunner()
ORIENTATION = 0x0112  # the EXIF tag


def _marked(width: int = 10, height: int = 6) -> Image.Image:
    """An RGB image with a white top-left corner, so a rotation or flip shows where the corner went."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[:, :, 2] = 80
    arr[:2, :3] = 255
    return Image.fromarray(arr)


def _with_orientation(img: Image.Image, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    buf = io.BytesIO()
    img.save(buf, fmt, exif=exif.tobytes(), **({"quality": 100} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied_when_decoding(tmp_path, fmt):
    img = _marked()
    # 6: the camera was turned clockwise; the stored 10x6 pixels are shown as 6 wide, 10 high, and the
    # stored top-left corner (white) appears at the top right
    data = _with_orientation(img, fmt, 6)
    path = tmp_path / f"turned.{fmt.lower()}"
    path.write_bytes(data)
    for decoded in (read_image_file(path), decode_image_bytes(data, "x"), image_from_value(Image.open(path), "x")):
        assert tuple(decoded.shape) == (3, 10, 6)
        assert decoded[:, 0, -1].min() > 200 and decoded[:, -1, 0].max() < 120  # white corner now top right
    expected = torch.from_numpy(np.array(img.transpose(Image.Transpose.ROTATE_270))).permute(2, 0, 1)
    # JPEG's chroma subsampling blurs the corner's edge by a few tens of levels; a wrong turn differs by 255
    assert (read_image_file(path).int() - expected.int()).abs().max() <= (48 if fmt == "JPEG" else 0)
    # through a folder source, as training and evaluation read it
    write = tmp_path / "folder" / "a"
    write.mkdir(parents=True)
    (write / f"turned.{fmt.lower()}").write_bytes(data)
    source = open_source(str(tmp_path / "folder"))
    assert tuple(source.load_image(0).shape) == (3, 10, 6)


def test_every_exif_orientation_matches_pillows_exif_transpose():
    from PIL import ImageOps

    img = _marked()
    for fmt in ("JPEG", "PNG", "WEBP"):
        for orientation in range(1, 9):
            data = _with_orientation(img, fmt, orientation)
            ref = np.array(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
            ours = decode_image_bytes(data, "x").permute(1, 2, 0).numpy()
            assert ours.shape == ref.shape and np.array_equal(ours, ref), (fmt, orientation)


# ------------------------------------------------------------------------------ unreadable images
@pytest.fixture(scope="module")
def split_folder(tmp_path_factory) -> Path:
    """train/ and test/ splits of two classes, each split with one unreadable file."""
    root = tmp_path_factory.mktemp("bad") / "imgs"
    for split, n in (("train", 20), ("test", 10)):
        for i in range(n):
            write_image(root / split / ("a" if i % 2 else "b") / f"{i}.png", seed=i, size=(20, 20))
        (root / split / "a" / "broken.png").write_bytes(b"not a png at all")
    return root


def recipe_overrides(folder: Path, *extra: str) -> list[str]:
    """Training on ``folder`` in batches of 7 (21 training files: 3 batches an epoch, none dropped)."""
    return [
        f"data.source={folder}",
        "trainer.batch_size=7",
        "data.limit=null",
        "data.skip_bad_images=true",
        "trainer.checkpoint_every=3",
        *extra,
    ]


def test_pretraining_counts_a_bad_file_once_over_epochs(tmp_path, split_folder):
    summary = pretrain(tiny_recipe("simclr", *recipe_overrides(split_folder, "trainer.steps=6")), tmp_path / "run")
    assert (summary["steps"], summary["epochs"]) == (6, 2)
    assert summary["skipped_bad_images"] == 1  # one file ...
    assert summary["skipped_bad_reads"] == 2  # ... read (and left out) once in each of the two epochs
    # the files already counted survive a resume: a third epoch reads the same file again
    more = tiny_recipe("simclr", *recipe_overrides(split_folder, "trainer.steps=9"))
    resumed = pretrain(more, tmp_path / "run", resume=True)
    assert (resumed["skipped_bad_images"], resumed["skipped_bad_reads"]) == (1, 3)


def test_evaluations_report_the_files_they_skipped(tmp_path, split_folder):
    run = tmp_path / "run"
    pretrain(tiny_recipe("simclr", *recipe_overrides(split_folder, "trainer.steps=1")), run)
    knn = knn_eval(run, show_progress=False)
    assert (knn["skipped_images"], knn["skipped_train_images"], knn["skipped_test_images"]) == (2, 1, 1)
    assert (knn["train_images"], knn["test_images"]) == (20, 10)
    linear = linear_eval(run, show_progress=False)
    assert (linear["skipped_images"], linear["skipped_train_images"], linear["skipped_test_images"]) == (2, 1, 1)
    saved = json.loads((run / "eval" / "knn.json").read_text())
    assert saved["skipped_images"] == 2
    res = runner.invoke(app, ["eval", "knn", "--run", str(run)], env={"COLUMNS": "1000"})
    assert res.exit_code == 0 and "skipped 2 unreadable image files (reference 1, test 1)" in res.output


def test_knn_reports_the_k_that_voted(tmp_path, split_folder):
    run = tmp_path / "run"
    pretrain(tiny_recipe("simclr", *recipe_overrides(split_folder, "trainer.steps=1")), run)
    result = knn_eval(run, k=200, train_limit=7, show_progress=False)
    assert result["k_requested"] == 200 and result["k"] == result["train_images"] == 7
    result = knn_eval(run, k=3, show_progress=False)
    assert (result["k"], result["k_requested"]) == (3, 3)
    res = runner.invoke(app, ["eval", "knn", "--run", str(run), "--train-limit", "7"], env={"COLUMNS": "1000"})
    assert res.exit_code == 0 and "only 7 reference images: kNN votes with k=7 (asked 200)" in res.output
