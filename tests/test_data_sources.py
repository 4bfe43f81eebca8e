"""Tests of the data-source layer (clcli.data): every spec form on tiny local data."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from clcli.data import ImageSource, StreamSource, list_splits, open_source
from clcli.data.images import decode_image_bytes, image_from_value, read_image_file
from clcli.errors import BadImageError, DataError

from .conftest import SHARED_CIFAR10, image_bytes, make_image, write_image

pytestmark = pytest.mark.usefixtures("hf_offline")


def expected_rgb(img: Image.Image) -> torch.Tensor:
    """What the decoder should give for ``img``: Pillow's RGB conversion, as ``[3, H, W]``."""
    return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)


def check_image(x: torch.Tensor) -> None:
    """An image as the interface promises: uint8 ``[3, H, W]``."""
    assert isinstance(x, torch.Tensor)
    assert x.dtype == torch.uint8
    assert x.ndim == 3 and x.shape[0] == 3


def check_labels(src: ImageSource) -> None:
    """``labels()`` agrees with ``label(i)`` for every record."""
    labels = src.labels()
    per_item = [src.label(i) for i in range(len(src))]
    if labels is None:
        assert src.classes is None
        assert per_item == [-1] * len(src)
    else:
        assert labels.dtype == torch.int64 and labels.shape == (len(src),)
        assert labels.tolist() == per_item


def roundtrip(obj: Any) -> Any:
    """``obj`` through pickle, as DataLoader workers receive it."""
    return pickle.loads(pickle.dumps(obj))


# ------------------------------------------------------------------------------------ decoding
@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("RGB", "PNG"), ("L", "PNG"), ("RGBA", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("1", "PNG"), ("RGB", "BMP"),
     ("RGB", "TIFF"), ("RGB", "GIF"), ("L", "TIFF"), ("RGBA", "TIFF")],
)  # fmt: skip
def test_decode_lossless_modes_to_rgb(mode: str, fmt: str) -> None:
    img = make_image(mode, seed=3)
    if fmt == "GIF":
        img = img.convert("P")
    x = decode_image_bytes(image_bytes(img, fmt), "mem")
    check_image(x)
    assert x.shape == (3, 5, 6)
    assert torch.equal(x, expected_rgb(img))  # alpha dropped, gray repeated, palette expanded


def smooth_image(size: int = 32) -> Image.Image:
    """A smooth colour gradient (compresses well, so lossy formats stay close)."""
    ramp = np.linspace(0, 255, size, dtype=np.float64)
    rgb = np.stack([ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1), np.full((size, size), 90.0)], -1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def test_decode_jpeg_and_webp() -> None:
    img = smooth_image()
    for fmt in ("JPEG", "WEBP"):
        x = decode_image_bytes(image_bytes(img, fmt), "mem")
        check_image(x)
        assert x.shape == (3, 32, 32)
        assert (x.float() - expected_rgb(img).float()).abs().mean() < 8  # lossy, but the same picture
    gray = decode_image_bytes(image_bytes(make_image("L", seed=2), "JPEG"), "mem")
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_decode_rgba_drops_alpha() -> None:
    img = Image.new("RGBA", (2, 2), (200, 10, 20, 0))  # fully transparent red
    assert decode_image_bytes(image_bytes(img, "PNG"), "mem")[:, 0, 0].tolist() == [200, 10, 20]


def test_decode_16bit_keeps_high_byte() -> None:
    values = np.array([[0, 256, 65535], [1000, 30000, 50000]], dtype=np.uint16)
    x = decode_image_bytes(image_bytes(Image.fromarray(values), "PNG"), "mem")
    check_image(x)
    assert x[0].tolist() == (values >> 8).tolist()
    assert torch.equal(x[0], x[2])


def test_decode_errors_name_the_image(tmp_path: Path) -> None:
    with pytest.raises(BadImageError, match="row 3") as info:
        decode_image_bytes(b"definitely not an image", "table.parquet row 3")
    assert info.value.where == "table.parquet row 3"
    good = image_bytes(smooth_image(), "JPEG")
    with pytest.raises(BadImageError):
        decode_image_bytes(good[: len(good) // 3], "cut")
    with pytest.raises(BadImageError, match="empty"):
        decode_image_bytes(b"", "nothing")
    with pytest.raises(BadImageError, match="missing.png"):
        read_image_file(tmp_path / "missing.png")


def test_image_from_value_forms(tmp_path: Path) -> None:
    img = make_image(seed=9)
    png = image_bytes(img)
    write_image(tmp_path / "pics/x.png", seed=9)
    want = expected_rgb(img)
    assert torch.equal(image_from_value({"bytes": png, "path": None}, "w"), want)
    assert torch.equal(image_from_value({"bytes": None, "path": "pics/x.png"}, "w", (str(tmp_path),)), want)
    assert torch.equal(image_from_value(png, "w"), want)
    assert torch.equal(image_from_value(img, "w"), want)
    assert torch.equal(image_from_value(np.array(img), "w"), want)  # HWC array
    assert torch.equal(
        image_from_value(np.array(img.convert("L")), "w")[1], torch.from_numpy(np.array(img.convert("L")))
    )
    with pytest.raises(BadImageError, match="no image"):
        image_from_value({"bytes": None, "path": None}, "w")


# ------------------------------------------------------------------------------- image folders
def test_folder_with_splits_and_classes(image_tree: Path) -> None:
    src = open_source(str(image_tree), "train")
    assert isinstance(src, ImageSource)
    assert src.spec == str(image_tree) and src.split == "train"
    assert src.classes == ["cat", "dog"]
    names = [Path(src.describe(i)).relative_to(image_tree).as_posix() for i in range(len(src))]
    assert names == ["train/cat/a.png", "train/cat/b_gray.png", "train/cat/c.JPG", "train/dog/rgba.png",
                     "train/dog/sub/deep.jpeg"]  # fmt: skip
    assert [src.label(i) for i in range(len(src))] == [0, 0, 0, 1, 1]
    check_labels(src)
    for i in range(len(src)):
        x = src.load_image(i)
        check_image(x)
        assert x.shape == (3, 5, 6)
    gray = src.load_image(1)
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[0], gray[2])
    assert torch.equal(src.load_image(3), expected_rgb(make_image("RGBA", seed=4)))
    assert src.text(0) == "a cat"
    assert src.text(1) is None
    assert list_splits(str(image_tree)) == ["test", "train"]


def test_folder_test_split_shares_class_index(image_tree: Path) -> None:
    test = open_source(str(image_tree), "test")
    assert test.classes == ["cat", "dog"]  # union over splits, though test has no dog folder
    assert len(test) == 1 and test.label(0) == 0
    with pytest.raises(DataError, match=r"no split 'val'.*test, train"):
        open_source(str(image_tree), "val")
    (image_tree / "validation/cat").mkdir(parents=True)
    with pytest.raises(DataError, match="validation has no images"):
        open_source(str(image_tree), "validation")


def test_class_folder_without_splits(image_tree: Path) -> None:
    src = open_source(str(image_tree / "train"))
    assert src.classes == ["cat", "dog"] and len(src) == 5
    check_labels(src)
    with pytest.raises(DataError, match=r"no split 'test'.*available splits: train"):
        open_source(str(image_tree / "train"), "test")
    assert list_splits(str(image_tree / "train")) == ["train"]


def test_flat_folder_is_unlabelled(tmp_path: Path) -> None:
    for k, name in enumerate(["b.png", "a.jpg", "c.webp", "d.bmp", "e.tif", "f.gif"]):
        write_image(tmp_path / "flat" / name, seed=k)
    (tmp_path / "flat/a.txt").write_text("first one", encoding="utf-8")
    (tmp_path / "flat/readme.txt").write_text("no image", encoding="utf-8")
    src = open_source(str(tmp_path / "flat"))
    assert len(src) == 6
    assert [Path(src.describe(i)).name for i in range(6)] == ["a.jpg", "b.png", "c.webp", "d.bmp", "e.tif", "f.gif"]
    assert src.classes is None and src.labels() is None
    check_labels(src)
    assert src.text(0) == "first one" and src.text(1) is None
    assert all(src.load_image(i).shape == (3, 5, 6) for i in range(6))


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        open_source(str(tmp_path / "nowhere"))
    (tmp_path / "empty/sub").mkdir(parents=True)
    (tmp_path / "empty/notes.txt").write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match="has no images"):
        open_source(str(tmp_path / "empty"))
    write_image(tmp_path / "pics/ok.png")
    with pytest.raises(DataError, match="label_column"):
        open_source(str(tmp_path / "pics"), label_column="label")
    (tmp_path / "pics/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    src = open_source(str(tmp_path / "pics"))
    with pytest.raises(BadImageError, match="broken.png") as info:
        src.load_image(0)
    assert info.value.where == str(tmp_path / "pics/broken.png")
    assert src.load_image(1).shape == (3, 5, 6)


# ------------------------------------------------------------------------------------- tables
def test_parquet_single_file(tmp_path: Path, image_table: Any) -> None:
    path = tmp_path / "one.parquet"
    image_table.to_parquet(str(path))
    src = open_source(str(path), "train")
    assert isinstance(src, ImageSource) and len(src) == 6 and src.split == "train"
    # a file not named after a split is the train split only: no silent evaluation on training data
    with pytest.raises(DataError, match="no split 'test'"):
        open_source(str(path), "test")
    assert src.classes == ["a", "b", "c"]
    assert (src.image_column, src.label_column, src.text_column) == ("image", "label", "caption")
    assert src.labels().tolist() == [0, 1, 2, 0, 1, 2]
    check_labels(src)
    assert torch.equal(src.load_image(4), expected_rgb(make_image(seed=4)))
    assert src.text(2) == "picture 2"
    assert src.describe(5) == f"{path} row 5"
    assert list_splits(str(path)) == ["train"]


def test_split_named_file_finds_its_siblings(tmp_path: Path, image_table: Any) -> None:
    image_table.select(range(4)).to_parquet(str(tmp_path / "train.parquet"))
    image_table.select(range(4, 6)).to_parquet(str(tmp_path / "test.parquet"))
    spec = str(tmp_path / "train.parquet")
    assert len(open_source(spec, "train")) == 4
    assert len(open_source(spec, "test")) == 2  # the sibling test.parquet
    with pytest.raises(DataError, match=r"no file for split 'validation'.*test, train"):
        open_source(spec, "validation")


def test_parquet_split_folder_and_hub_layout(tmp_path: Path, image_table: Any, hub_folder: Path) -> None:
    folder = tmp_path / "splits"
    folder.mkdir()
    image_table.select(range(4)).to_parquet(str(folder / "train.parquet"))
    image_table.select(range(4, 6)).to_parquet(str(folder / "test.parquet"))
    assert len(open_source(str(folder), "train")) == 4
    test = open_source(str(folder), "test")
    assert len(test) == 2 and test.labels().tolist() == [1, 2]
    assert torch.equal(test.load_image(0), expected_rgb(make_image(seed=4)))
    with pytest.raises(DataError, match=r"no split 'validation'.*test, train"):
        open_source(str(folder), "validation")
    assert list_splits(str(folder)) == ["test", "train"]

    train = open_source(str(hub_folder), "train")  # data/train-0000{0,1}-of-00002.parquet
    assert len(train) == 5
    assert train.describe(4).endswith("train-00001-of-00002.parquet row 1")
    assert torch.equal(train.load_image(4), expected_rgb(make_image(seed=4)))
    check_labels(train)
    assert list_splits(str(hub_folder)) == ["test", "train"]


def test_arrow_file(tmp_path: Path, image_table: Any) -> None:
    image_table.save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    src = open_source(str(arrow), "train")
    assert len(src) == 6 and src.classes == ["a", "b", "c"]
    assert torch.equal(src.load_image(2), expected_rgb(make_image(seed=2)))
    assert src.describe(3) == f"{arrow} row 3"
    check_labels(src)


def test_save_to_disk_dataset_and_dict(tmp_path: Path, image_table: Any) -> None:
    import datasets

    image_table.save_to_disk(str(tmp_path / "ds"))
    src = open_source(str(tmp_path / "ds"), "test")  # a single Dataset serves any split
    assert len(src) == 6 and src.text(1) == "picture 1"
    check_labels(src)
    datasets.DatasetDict(train=image_table.select(range(5)), test=image_table.select([5])).save_to_disk(
        str(tmp_path / "dd")
    )
    train = open_source(str(tmp_path / "dd"), "train")
    test = open_source(str(tmp_path / "dd"), "test")
    assert (len(train), len(test)) == (5, 1)
    assert torch.equal(test.load_image(0), expected_rgb(make_image(seed=5)))
    assert test.describe(0).endswith("row 0")
    with pytest.raises(DataError, match=r"no split 'val'.*train, test"):
        open_source(str(tmp_path / "dd"), "val")
    assert list_splits(str(tmp_path / "dd")) == ["train", "test"]


def test_selected_rows_are_flattened(tmp_path: Path, image_table: Any) -> None:
    from clcli.data.tables import TableSource

    picked = image_table.select([5, 0, 3])
    src = TableSource("mem", "train", picked, where="mem")
    assert src.labels().tolist() == [2, 0, 0]
    assert torch.equal(src.load_image(0), expected_rgb(make_image(seed=5)))
    assert src.describe(1) == "mem row 1"


def test_table_bad_image_names_the_row(tmp_path: Path, image_table: Any) -> None:
    import datasets

    rows = image_table.to_dict()
    rows["image"][2] = {"bytes": b"garbage bytes", "path": None}
    bad = datasets.Dataset.from_dict(rows, features=image_table.features)
    path = tmp_path / "bad.parquet"
    bad.to_parquet(str(path))
    src = open_source(str(path))
    check_image(src.load_image(1))
    with pytest.raises(BadImageError) as info:
        src.load_image(2)
    assert info.value.where == f"{path} row 2"
    assert "row 2" in str(info.value)


# ----------------------------------------------------------------------------------- columns
def plain_table(tmp_path: Path, columns: dict[str, list[Any]], name: str = "plain.parquet") -> Path:
    """Write a parquet file with plain (non-feature) columns and return its path."""
    import datasets

    path = tmp_path / name
    datasets.Dataset.from_dict(columns).to_parquet(str(path))
    return path


def test_columns_found_by_name(tmp_path: Path) -> None:
    pngs = [image_bytes(make_image(seed=k)) for k in range(4)]
    path = plain_table(
        tmp_path,
        {"id": ["a", "b", "c", "d"], "img": pngs, "label": ["x", "y", "x", "y"], "target": [3, 1, 0, 1],
         "text": ["t0", "t1", "t2", "t3"]},
    )  # fmt: skip
    src = open_source(str(path))
    assert (src.image_column, src.label_column, src.text_column) == ("img", "target", "text")  # "label" is text
    assert src.classes == ["0", "1", "2", "3"]
    assert src.labels().tolist() == [3, 1, 0, 1]
    assert torch.equal(src.load_image(3), expected_rgb(make_image(seed=3)))
    assert src.text(0) == "t0"


def test_explicit_columns_and_missing_ones(tmp_path: Path) -> None:
    pngs = [image_bytes(make_image(seed=k)) for k in range(3)]
    path = plain_table(
        tmp_path, {"photo": pngs, "kind": [2, 0, 1], "note": ["n0", "n1", "n2"], "name": ["a", "b", "c"]}
    )
    with pytest.raises(DataError, match=r"no image column; columns: photo, kind, note, name"):
        open_source(str(path))
    src = open_source(str(path), image_column="photo", label_column="kind", text_column="note")
    assert src.labels().tolist() == [2, 0, 1] and src.text(1) == "n1"
    check_labels(src)
    unlabelled = open_source(str(path), image_column="photo")
    assert unlabelled.classes is None and unlabelled.labels() is None and unlabelled.text(0) is None
    check_labels(unlabelled)
    with pytest.raises(DataError, match=r"no column 'labels'.*columns: photo, kind, note, name"):
        open_source(str(path), image_column="photo", label_column="labels")
    with pytest.raises(DataError, match="not integers"):
        open_source(str(path), image_column="photo", label_column="name")


def test_image_column_with_relative_paths(tmp_path: Path) -> None:
    write_image(tmp_path / "t/imgs/p0.png", seed=10)
    write_image(tmp_path / "t/imgs/p1.png", seed=11)
    path = plain_table(tmp_path / "t", {"image": ["imgs/p0.png", "imgs/p1.png", "imgs/gone.png"]}, "paths.parquet")
    src = open_source(str(path))
    assert torch.equal(src.load_image(1), expected_rgb(make_image(seed=11)))
    with pytest.raises(BadImageError, match=r"paths.parquet row 2.*gone.png"):
        src.load_image(2)


def test_empty_table(tmp_path: Path, image_table: Any) -> None:
    image_table.select([]).to_parquet(str(tmp_path / "empty.parquet"))
    with pytest.raises(DataError, match="has no images"):
        open_source(str(tmp_path / "empty.parquet"))


# ------------------------------------------------------------------------------------- hub
def test_hub_local_folder_map_style(hub_folder: Path) -> None:
    spec = f"hf:{hub_folder}"
    train = open_source(spec, "train")
    test = open_source(spec, "test")
    assert isinstance(train, ImageSource)
    assert (len(train), len(test)) == (5, 1)
    assert train.classes == ["a", "b", "c"]
    assert torch.equal(test.load_image(0), expected_rgb(make_image(seed=5)))
    assert test.text(0) == "picture 5"
    check_labels(train)
    with pytest.raises(DataError, match=r"no split 'validation'.*train, test"):
        open_source(spec, "validation")
    assert list_splits(spec) == ["train", "test"]


def test_hub_streaming(hub_folder: Path) -> None:
    stream = open_source(f"hf:{hub_folder}", "train", streaming=True)
    assert isinstance(stream, StreamSource)
    assert not hasattr(stream, "__len__")
    assert stream.classes == ["a", "b", "c"]
    records = list(stream)
    assert [r[1] for r in records] == [0, 1, 2, 0, 1]
    assert [r[2] for r in records] == [f"picture {k}" for k in range(5)]
    for k, (image, _, _, where) in enumerate(records):
        assert torch.equal(image, expected_rgb(make_image(seed=k)))
        assert where.endswith(f"row {k}")
    again = roundtrip(stream)
    assert [r[1] for r in again] == [0, 1, 2, 0, 1]
    with pytest.raises(DataError, match="validation"):
        open_source(f"hf:{hub_folder}", "validation", streaming=True)


def test_hub_unknown_dataset_is_a_data_error() -> None:
    with pytest.raises(DataError, match="cannot load hf:nobody/no-such-dataset"):
        open_source("hf:nobody/no-such-dataset", "train")
    assert list_splits("hf:nobody/no-such-dataset") == []


def test_streaming_a_local_source_and_skipping_bad_images(tmp_path: Path) -> None:
    write_image(tmp_path / "s/a.png", seed=1)
    (tmp_path / "s/b.png").write_bytes(b"broken")
    write_image(tmp_path / "s/c.png", seed=3)
    stream = open_source(str(tmp_path / "s"), streaming=True)
    assert isinstance(stream, StreamSource)
    with pytest.raises(BadImageError, match="b.png"):
        list(stream)
    stream.skip_bad_images = True
    got = list(stream)
    assert [Path(r[3]).name for r in got] == ["a.png", "c.png"]
    assert [r[1] for r in got] == [-1, -1]
    assert stream.bad_images == [str(tmp_path / "s/b.png")]


# ---------------------------------------------------------------------------------- embedded
def test_embedded_digits() -> None:
    train = open_source("embedded:digits", "train")
    test = open_source("embedded:digits", "test")
    assert (len(train), len(test)) == (1437, 360)
    assert train.classes == [str(k) for k in range(10)]
    x = train.load_image(0)
    check_image(x)
    assert x.shape == (3, 8, 8) and torch.equal(x[0], x[1])
    assert int(max(train.load_image(i).max() for i in range(50))) == 255
    again = open_source("embedded:digits", "train")
    assert torch.equal(again.labels(), train.labels()) and torch.equal(again.load_image(7), train.load_image(7))
    check_labels(test)
    assert sorted(set(train.labels().tolist())) == list(range(10))
    rows = {train.describe(i).rsplit(" ", 1)[1] for i in range(len(train))}
    assert not rows & {test.describe(i).rsplit(" ", 1)[1] for i in range(len(test))}
    assert list_splits("embedded:digits") == ["train", "test"]
    with pytest.raises(DataError, match="embedded:digits"):
        open_source("embedded:mnist")
    with pytest.raises(DataError, match="train, test"):
        open_source("embedded:digits", "val")


# ---------------------------------------------------------------------------------- pickling
def test_sources_survive_pickle(image_tree: Path, tmp_path: Path, image_table: Any, hub_folder: Path) -> None:
    image_table.to_parquet(str(tmp_path / "t.parquet"))
    image_table.save_to_disk(str(tmp_path / "saved"))
    specs = [
        "embedded:digits",
        str(image_tree),
        str(tmp_path / "t.parquet"),
        str(tmp_path / "saved"),
        f"hf:{hub_folder}",
    ]
    for spec in specs:
        src = open_source(spec)
        src.load_image(0)  # fill caches before pickling
        src.labels()
        copy = roundtrip(src)
        assert len(copy) == len(src) and copy.classes == src.classes
        assert torch.equal(copy.load_image(len(src) - 1), src.load_image(len(src) - 1))
        assert copy.describe(0) == src.describe(0) and copy.text(0) == src.text(0)
        assert torch.equal(copy.labels(), src.labels())
    assert len(pickle.dumps(open_source(str(tmp_path / "t.parquet")))) < 20_000  # memory-mapped: pickled by path


class _AsTorchDataset(torch.utils.data.Dataset):
    """A minimal map-style wrapper, as the training engine would use."""

    def __init__(self, src: ImageSource) -> None:
        self.src = src

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.src.load_image(i), self.src.label(i)


class _AsTorchIterable(torch.utils.data.IterableDataset):
    """A minimal iterable wrapper around a stream."""

    def __init__(self, stream: StreamSource) -> None:
        self.stream = stream

    def __iter__(self) -> Any:
        return ((image, label) for image, label, _, _ in self.stream)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_dataloader_workers(hub_folder: Path) -> None:
    src = open_source(str(hub_folder), "train")
    loader = torch.utils.data.DataLoader(
        _AsTorchDataset(src), batch_size=5, num_workers=2, multiprocessing_context="fork", timeout=60
    )
    images, labels = next(iter(loader))
    assert images.shape == (5, 3, 5, 6) and labels.tolist() == [0, 1, 2, 0, 1]
    stream = open_source(f"hf:{hub_folder}", "train", streaming=True)  # 2 shards
    for workers in (2, 3):  # shared out by shard, then by record
        loader = torch.utils.data.DataLoader(
            _AsTorchIterable(stream), batch_size=None, num_workers=workers, multiprocessing_context="fork", timeout=60
        )
        assert sorted(label for _, label in loader) == [0, 0, 1, 1, 2]  # every record once across workers


# ----------------------------------------------------------------------------------- cifar10
@pytest.mark.skipif(not (SHARED_CIFAR10 / "test.parquet").is_file(), reason=f"CIFAR-10 parquet not at {SHARED_CIFAR10}")
def test_cifar10_parquet() -> None:
    test = open_source(str(SHARED_CIFAR10 / "test.parquet"), "test")
    assert len(test) == 10_000
    assert test.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert torch.bincount(test.labels()).tolist() == [1000] * 10
    assert test.labels()[:50].tolist() == [test.label(i) for i in range(50)]
    for i in (0, 1, 9_999):
        x = test.load_image(i)
        check_image(x)
        assert x.shape == (3, 32, 32)
    assert test.describe(17) == f"{SHARED_CIFAR10 / 'test.parquet'} row 17"
    folder = open_source(str(SHARED_CIFAR10), "test")
    assert len(folder) == 10_000 and torch.equal(folder.load_image(5), test.load_image(5))
    assert list_splits(str(SHARED_CIFAR10)) == ["test", "train"]
