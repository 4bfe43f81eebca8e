"""Shared test fixtures: tiny local data sets and an offline, throw-away Hugging Face cache."""

from __future__ import annotations

import atexit
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

# The suite runs on the CPU, also on a machine with a GPU: its tests build inputs on the CPU, compare
# losses bitwise across runs and resumes (CUDA kernels are not bitwise reproducible), and tune their
# thresholds on CPU arithmetic. On an H200 with CUDA visible, 30 of them failed for those reasons alone.
# Set CLCLI_TEST_CUDA=1 to leave the GPU visible anyway.
if os.environ.get("CLCLI_TEST_CUDA") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

# Training decodes its images once into a cache (clcli.data.cache, data.cache=auto by default): in the
# tests it lives in a folder of this session, removed at exit, never in ~/.cache.
_CACHE_DIR = tempfile.mkdtemp(prefix="clcli-test-cache-")
os.environ["CLCLI_CACHE_DIR"] = _CACHE_DIR
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)

SHARED_CIFAR10 = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10"


def make_image(mode: str = "RGB", size: tuple[int, int] = (6, 5), seed: int = 0) -> Image.Image:
    """A small deterministic Pillow image (``size`` is width, height) in ``mode``."""
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    return rgb if mode == "RGB" else rgb.convert(mode)


def image_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    """``img`` encoded as ``fmt``."""
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def write_image(path: Path, mode: str = "RGB", seed: int = 0, size: tuple[int, int] = (6, 5)) -> Path:
    """Write a small image at ``path`` (format from the extension) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    make_image(mode, size, seed).save(path)
    return path


@pytest.fixture
def hf_offline(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the Hugging Face caches at a fresh temporary folder and switch the hub off."""
    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets.config

    # datasets reads the environment when imported; patch its copies too.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", home / "datasets")
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        if hasattr(datasets.config, name):
            monkeypatch.setattr(datasets.config, name, True)
    return home


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    """``train/{cat,dog}`` and ``test/{cat}`` folders of PNG/JPEG images, with one caption file.

    ``train/cat/b_gray.png`` is grayscale, ``train/dog/rgba.png`` is RGBA, ``train/cat/a.png`` has
    the caption ``"a cat"``; the test split lacks the ``dog`` class.
    """
    root = tmp_path / "tree"
    write_image(root / "train/cat/a.png", seed=1)
    (root / "train/cat/a.txt").write_text("a cat\n", encoding="utf-8")
    write_image(root / "train/cat/b_gray.png", mode="L", seed=2)
    write_image(root / "train/cat/c.JPG", seed=3)
    write_image(root / "train/dog/rgba.png", mode="RGBA", seed=4)
    write_image(root / "train/dog/sub/deep.jpeg", seed=5)
    (root / "train/dog/notes.md").write_text("not an image", encoding="utf-8")
    write_image(root / "test/cat/t.png", seed=6)
    return root


@pytest.fixture
def image_table() -> Any:
    """A 6-row in-memory ``datasets.Dataset``: ``image`` (Image), ``label`` (ClassLabel a/b/c), ``caption``."""
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=["a", "b", "c"]),
            "caption": datasets.Value("string"),
        }
    )
    rows = {
        "image": [{"bytes": image_bytes(make_image(seed=k), "PNG"), "path": None} for k in range(6)],
        "label": [0, 1, 2, 0, 1, 2],
        "caption": [f"picture {k}" for k in range(6)],
    }
    return datasets.Dataset.from_dict(rows, features=features)


@pytest.fixture
def hub_folder(tmp_path: Path, image_table: Any) -> Path:
    """A local folder in the hub layout: ``data/train-0000{0,1}-of-00002.parquet`` and ``data/test-...``."""
    root = tmp_path / "mydata"
    (root / "data").mkdir(parents=True)
    image_table.select(range(0, 3)).to_parquet(str(root / "data/train-00000-of-00002.parquet"))
    image_table.select(range(3, 5)).to_parquet(str(root / "data/train-00001-of-00002.parquet"))
    image_table.select(range(5, 6)).to_parquet(str(root / "data/test-00000-of-00001.parquet"))
    return root
