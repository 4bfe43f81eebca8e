"""Decode once (clcli.data.cache): a training source's images are decoded a single time into a memory-mapped
array, reused across runs, rebuilt when the data changes or the file is damaged, and the cached images are
bitwise those the source decodes, so views, runs and resumes are unchanged."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import clcli.data.images as images_module
from clcli.data.base import ImageSource
from clcli.data.cache import CachedSource, FittedSource, available_memory, decoded_once
from clcli.data.cache_admin import cache_entries, clean_cache
from clcli.data.cache_store import EntryWriter, entry_key, open_entry
from clcli.data.sources import limit_source, open_source
from clcli.engine.loader import Skipped, ViewsDataset, sample_seed
from clcli.errors import BadImageError, DataError
from clcli.recipe import DataConfig, load_recipe
from clcli.train import pretrain
from clcli.views import ViewMaker
from tests.conftest import write_image
from tests.helpers import CIFAR, assert_exact_resume, losses, run_losses, tiny_recipe

needs_cifar = pytest.mark.skipif(not (CIFAR / "train.parquet").is_file(), reason="CIFAR-10 parquet not present")


def config(cache_dir: Path, **fields: object) -> DataConfig:
    """A data section that caches into ``cache_dir`` (``disk`` unless ``cache`` is given)."""
    return DataConfig(**{"cache": "disk", "cache_dir": str(cache_dir), **fields})


def recorder() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=400), out


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the images decoded (every folder and table image goes through ``decode_image_bytes``)."""
    count = [0]
    real = images_module.decode_image_bytes

    def counting(data: bytes, where: str) -> torch.Tensor:
        count[0] += 1
        return real(data, where)

    monkeypatch.setattr(images_module, "decode_image_bytes", counting)
    return count


def png_folder(root: Path, n: int = 12, size: tuple[int, int] = (10, 8), ext: str = "png") -> Path:
    for k in range(n):
        write_image(root / f"img{k:02d}.{ext}", seed=k, size=size)
    return root


def entries_in(cache_dir: Path) -> list[Path]:
    folder = cache_dir / "images"
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) if folder.is_dir() else []


def assert_same_images(cached: ImageSource, source: ImageSource) -> None:
    assert len(cached) == len(source)
    for i in range(len(source)):
        a, b = cached.load_image(i), source.load_image(i)
        assert a.dtype == b.dtype == torch.uint8 and a.shape == b.shape and torch.equal(a, b), i


# ------------------------------------------------------------------------------ same pixels, same views
@needs_cifar
def test_cifar_slice_cached_images_and_views_are_bitwise_the_decoded_ones(tmp_path: Path) -> None:
    source = limit_source(open_source(str(CIFAR / "train.parquet")), 512)
    cached = decoded_once(source, config(tmp_path))
    assert isinstance(cached, CachedSource) and cached.shape == (512, 3, 32, 32) and cached.extents is None
    assert_same_images(cached, source)
    assert torch.equal(cached.labels(), source.labels()) and cached.describe(7) == source.describe(7)
    views = ViewMaker(load_recipe("simclr").views)
    plain, fast = ViewsDataset(source, views), ViewsDataset(cached, views)
    for i in range(0, 512, 37):
        item = (i, sample_seed(0, 3, i))
        a, b = plain[item], fast[item]
        assert a.label == b.label and all(torch.equal(x, y) for x, y in zip(a.views, b.views, strict=True))
    whole = cached.as_tensor()
    assert whole.shape == (512, 3, 32, 32) and torch.equal(whole[100], source.load_image(100))


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_folder_images_cached_bitwise(tmp_path: Path, ext: str) -> None:
    source = open_source(str(png_folder(tmp_path / "data", ext=ext)))
    cached = decoded_once(source, config(tmp_path / "cache"))
    assert isinstance(cached, CachedSource) and cached.shape == (12, 3, 8, 10)
    assert_same_images(cached, source)
    again = pickle.loads(pickle.dumps(cached))  # as a spawned DataLoader worker receives it
    assert_same_images(again, source)


def test_images_of_different_sizes_are_stored_fitted_with_their_shape(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_image(root / "wide.png", seed=1, size=(20, 10))  # width, height
    write_image(root / "tall.jpg", seed=2, size=(9, 30))
    write_image(root / "small.png", seed=3, size=(6, 5))
    source = open_source(str(root))
    cached = decoded_once(source, config(tmp_path / "cache", cache_size=16))
    assert isinstance(cached, CachedSource) and cached.shape == (3, 3, 16, 16)
    fitted = FittedSource(source, 16)
    assert_same_images(cached, fitted)
    shapes = {source.describe(i).rsplit("/", 1)[1]: tuple(cached.load_image(i).shape[1:]) for i in range(3)}
    assert shapes == {"wide.png": (8, 16), "tall.jpg": (16, 5), "small.png": (5, 6)}  # aspect kept, longer side 16
    small = [i for i in range(3) if source.describe(i).endswith("small.png")][0]
    assert torch.equal(cached.load_image(small), source.load_image(small))  # an image that fits is not resampled
    assert cached.extents.tolist()[small] == [5, 6]
    off = decoded_once(source, config(tmp_path / "cache", cache="off", cache_size=16))
    assert isinstance(off, FittedSource)  # the size applies uncached too, so the choice never changes pixels


def test_bad_image_raises_the_same_error_from_the_cache(tmp_path: Path) -> None:
    root = png_folder(tmp_path / "data", n=3)
    (root / "img01.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    source = open_source(str(root))
    cached = decoded_once(source, config(tmp_path / "cache"))
    assert isinstance(cached, CachedSource) and cached.bad_indices == [1]
    with pytest.raises(BadImageError) as plain:
        source.load_image(1)
    with pytest.raises(BadImageError) as fast:
        cached.load_image(1)
    assert str(fast.value) == str(plain.value)
    assert ViewsDataset(cached, ViewMaker(load_recipe("simclr").views), skip_bad_images=True)[(1, 5)] == Skipped(1)
    assert torch.equal(cached.load_image(2), source.load_image(2))


# ------------------------------------------------------------------------------ decode once, reuse, invalidate
def test_decoding_draws_no_random_numbers_of_the_run(tmp_path: Path) -> None:
    source = open_source(str(png_folder(tmp_path / "data")))
    torch.manual_seed(5)
    assert isinstance(decoded_once(source, config(tmp_path / "cache")), CachedSource)  # built
    built = torch.rand(3)
    torch.manual_seed(5)
    assert isinstance(decoded_once(source, config(tmp_path / "cache")), CachedSource)  # read
    assert torch.equal(torch.rand(3), built)  # a run's initial weights do not depend on whether it decoded


def test_second_open_decodes_nothing(tmp_path: Path, decodes: list[int]) -> None:
    root = png_folder(tmp_path / "data")
    first = decoded_once(open_source(str(root)), config(tmp_path / "cache"))
    assert decodes[0] == 12  # each image once (the first, decoded to learn the size, is not decoded again)
    second = decoded_once(open_source(str(root)), config(tmp_path / "cache"))
    for i in range(12):
        second.load_image(i)
    assert decodes[0] == 12 and second.path == first.path and len(entries_in(tmp_path / "cache")) == 1


def test_changed_file_makes_a_new_entry_and_the_old_one_stale(tmp_path: Path, decodes: list[int]) -> None:
    root, cache = png_folder(tmp_path / "data", n=6), tmp_path / "cache"
    first = decoded_once(open_source(str(root)), config(cache))
    write_image(root / "img03.png", seed=99, size=(10, 8))  # new content (new size and time)
    source = open_source(str(root))
    second = decoded_once(source, config(cache))
    assert second.path != first.path and decodes[0] == 12
    assert_same_images(second, source)  # decodes the source's 6 images to compare
    stamp = os.stat(root / "img04.png")
    os.utime(root / "img04.png", ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000))  # time only
    third = decoded_once(open_source(str(root)), config(cache))
    assert third.path not in (first.path, second.path) and decodes[0] == 24
    rows = {Path(r["path"]).name: r for r in cache_entries(str(cache))}
    assert rows[first.path.name]["stale"] and rows[second.path.name]["stale"] and rows[third.path.name]["stale"] is None
    removed = clean_cache(str(cache))
    assert {Path(r["path"]).name for r in removed} == {first.path.name, second.path.name}
    assert entries_in(cache) == [third.path]


def test_table_fingerprint_follows_its_files(tmp_path: Path, hub_folder: Path, hf_offline: Path) -> None:
    source = open_source(str(hub_folder), "train")
    print_ = source.fingerprint()
    assert print_ is not None and print_["kind"] == "table" and len(print_["files"]) == 2
    cached = decoded_once(source, config(tmp_path / "cache"))
    assert isinstance(cached, CachedSource)
    assert_same_images(cached, source)
    assert [cached.text(i) for i in range(3)] == [source.text(i) for i in range(3)]
    part = hub_folder / "data/train-00001-of-00002.parquet"
    os.utime(part, ns=(part.stat().st_atime_ns, part.stat().st_mtime_ns + 1_000_000))
    assert entry_key(open_source(str(hub_folder), "train").fingerprint()) != cached.path.name


def test_sources_that_cannot_be_fingerprinted_are_not_cached(tmp_path: Path, hf_offline: Path) -> None:
    import datasets

    images = [str(write_image(tmp_path / f"p{k}.png", seed=k)) for k in range(2)]
    table = tmp_path / "paths.parquet"
    datasets.Dataset.from_dict({"image": images, "label": [0, 1]}).to_parquet(str(table))
    by_path = open_source(str(table))
    assert by_path.fingerprint() is None  # a changed image file would not change the table

    class Plugin(ImageSource):
        spec, split, classes = "plugin:x", "train", None

        def __len__(self) -> int:
            return 2

        def load_image(self, i: int) -> torch.Tensor:
            return torch.zeros(3, 4, 4, dtype=torch.uint8)

    console, out = recorder()
    for source in (by_path, Plugin()):
        assert decoded_once(source, config(tmp_path / "cache", cache="auto"), console=console) is source
        with pytest.raises(DataError, match="no fingerprint"):
            decoded_once(source, config(tmp_path / "cache"))
    assert out.getvalue().count("no fingerprint") == 2 and entries_in(tmp_path / "cache") == []


def test_images_of_different_sizes_stream_without_a_cache_size(tmp_path: Path, decodes: list[int]) -> None:
    root = png_folder(tmp_path / "data", n=4)
    write_image(root / "odd.png", seed=7, size=(7, 7))
    console, out = recorder()
    source = open_source(str(root))
    assert decoded_once(source, config(tmp_path / "cache", cache="auto"), console=console) is source
    assert "differ in size" in out.getvalue() and "data.cache_size" in out.getvalue()
    seen = decodes[0]
    assert decoded_once(open_source(str(root)), config(tmp_path / "cache", cache="auto")) is not None
    assert decodes[0] == seen  # the marker remembers: no second look
    with pytest.raises(DataError, match="differ in size"):
        decoded_once(source, config(tmp_path / "cache"))


# ------------------------------------------------------------------------------ damage, races, budget, folder
@pytest.mark.parametrize("damage", ["truncate", "flip", "meta"])
def test_damaged_entry_is_detected_and_rebuilt(tmp_path: Path, decodes: list[int], damage: str) -> None:
    root, cache = png_folder(tmp_path / "data"), tmp_path / "cache"
    first = decoded_once(open_source(str(root)), config(cache))
    data = first.path / "images.u8"
    if damage == "truncate":
        os.truncate(data, data.stat().st_size // 2)
    elif damage == "flip":
        with open(data, "r+b") as fh:
            fh.seek(777)
            byte = fh.read(1)[0]
            fh.seek(777)
            fh.write(bytes([byte ^ 0x5A]))
    else:
        (first.path / "meta.json").write_text("{not json", encoding="utf-8")
    console, out = recorder()
    source = open_source(str(root))
    again = decoded_once(source, config(cache), console=console)
    assert "damaged" in out.getvalue() and decodes[0] == 24  # decoded again, not trusted
    assert_same_images(again, source)
    assert entries_in(cache) == [again.path] and open_entry(again.path).meta["crc32"] is not None


class SlowSource(ImageSource):
    """Images made from their index, each taking a while; counts its loads in this process."""

    spec, split, classes = "slow:test", "train", None
    loads = 0

    def __len__(self) -> int:
        return 16

    def load_image(self, i: int) -> torch.Tensor:
        SlowSource.loads += 1
        time.sleep(0.02)
        return torch.full((3, 5, 4), i * 7 % 256, dtype=torch.uint8)

    def describe(self, i: int) -> str:
        return f"slow {i}"

    def fingerprint(self) -> dict:
        return {"kind": "slow-test", "n": 16}


def _race(cache_dir: str, barrier: multiprocessing.synchronize.Barrier, results: multiprocessing.Queue) -> None:
    barrier.wait()
    cached = decoded_once(SlowSource(), DataConfig(cache="disk", cache_dir=cache_dir))
    results.put((str(cached.path), SlowSource.loads, cached.as_tensor().sum().item()))


def test_two_processes_starting_at_once_leave_one_valid_entry(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path), barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    expected = sum(i * 7 % 256 for i in range(16)) * 3 * 5 * 4
    assert got[0][0] == got[1][0] and got[0][2] == got[1][2] == expected
    assert sorted(loads for _, loads, _ in got) == [0, 16]  # one decoded, the other waited and read it
    leftovers = [p.name for p in (tmp_path / "images").iterdir() if p.name.startswith(".")]
    assert leftovers == [] and len(entries_in(tmp_path)) == 1


def test_a_second_writer_finishing_late_keeps_the_first_entry(tmp_path: Path) -> None:
    shape = (2, 3, 2, 2)
    writers = [EntryWriter(tmp_path, "k" * 32, shape) for _ in range(2)]
    for value, writer in zip((1, 2), writers, strict=True):
        writer.write(0, [np.full((3, 2, 2), value, dtype=np.uint8)] * 2)
    with writers[0], writers[1]:
        assert writers[0].publish({}, {}) == writers[1].publish({}, {}) == tmp_path / ("k" * 32)
    entry = open_entry(tmp_path / ("k" * 32))
    assert (np.asarray(entry.images) == 1).all() and [p.name for p in tmp_path.iterdir()] == ["k" * 32]


def test_memory_budget_refusal_falls_back_to_streaming_with_a_note(tmp_path: Path) -> None:
    assert (available_memory() or 0) > 0
    source = open_source(str(png_folder(tmp_path / "data")))
    console, out = recorder()
    tight = config(tmp_path / "cache", cache="auto", cache_budget=1e-12)
    assert decoded_once(source, tight, console=console) is source
    assert "data.cache_budget" in out.getvalue() and entries_in(tmp_path / "cache") == []
    assert isinstance(decoded_once(source, config(tmp_path / "cache", cache="auto")), CachedSource)
    assert decoded_once(source, tight) is source  # an entry that exceeds the budget is not used either
    assert isinstance(decoded_once(source, config(tmp_path / "cache", cache_budget=1e-12)), CachedSource)  # disk


def test_cache_folder_from_the_environment_unless_the_recipe_names_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = open_source(str(png_folder(tmp_path / "data", n=2)))
    monkeypatch.setenv("CLCLI_CACHE_DIR", str(tmp_path / "env"))
    from_env = decoded_once(source, DataConfig(cache="disk"))
    assert from_env.path.parent == tmp_path / "env" / "images"
    from_field = decoded_once(source, config(tmp_path / "field"))
    assert from_field.path.parent == tmp_path / "field" / "images"
    assert decoded_once(source, config(tmp_path / "off", cache="off")) is source
    assert not (tmp_path / "off").exists()


def test_an_unwritable_cache_folder_is_a_note_or_an_error(tmp_path: Path) -> None:
    source = open_source(str(png_folder(tmp_path / "data", n=2)))
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder", encoding="utf-8")
    console, out = recorder()
    assert decoded_once(source, config(blocked, cache="auto"), console=console) is source
    assert "cannot make the cache folder" in out.getvalue()
    with pytest.raises(DataError, match="cannot make the cache folder"):
        decoded_once(source, config(blocked))


def test_cli_lists_and_cleans_the_cache(tmp_path: Path) -> None:
    from clcli.cli import app

    root, cache = png_folder(tmp_path / "data", n=3), tmp_path / "cache"
    old = decoded_once(open_source(str(root)), config(cache))
    write_image(root / "img00.png", seed=50, size=(10, 8))
    new = decoded_once(open_source(str(root)), config(cache))
    runner = CliRunner()
    listed = runner.invoke(app, ["cache", "list", "--dir", str(cache), "--json"])
    assert listed.exit_code == 0, listed.output
    rows = {Path(r["path"]).name: r for r in json.loads(listed.output)}
    assert rows[old.path.name]["stale"] and rows[new.path.name]["stale"] is None and rows[new.path.name]["images"] == 3
    cleaned = runner.invoke(app, ["cache", "clean", "--dir", str(cache), "--json"])
    assert cleaned.exit_code == 0 and [Path(r["path"]).name for r in json.loads(cleaned.output)] == [old.path.name]
    assert entries_in(cache) == [new.path]


# ------------------------------------------------------------------------------ training
@needs_cifar
def test_training_from_the_cache_repeats_and_resumes_exactly(tmp_path: Path) -> None:
    from clcli.assemble import prepare_training

    data = [f"data.source={CIFAR / 'train.parquet'}", f"data.cache_dir={tmp_path / 'cache'}"]
    cached = tiny_recipe("simclr", *data, "data.cache=disk")
    assert_exact_resume(cached, tmp_path, stop_after=3)
    (entry,) = cache_entries(str(tmp_path / "cache"))  # the first 256 rows, found fresh when the data is reopened
    assert entry["images"] == 256 and entry["stale"] is None
    assert run_losses(tiny_recipe("simclr", *data, "data.cache=off"), tmp_path / "off") == losses(tmp_path / "full")
    prepare_training(cached, tmp_path / "mixed").trainer.fit(stop_after=3)  # cut with the cache, resumed without
    pretrain(tiny_recipe("simclr", *data, "data.cache=off"), tmp_path / "mixed", resume=True)
    assert losses(tmp_path / "mixed") == losses(tmp_path / "full")


def test_recipe_fields_and_resume_rules() -> None:
    from clcli.runs import RESUMABLE_CHANGES

    assert load_recipe("simclr").data.cache == "auto"
    assert load_recipe("simclr", ["data.cache=off"]).data.cache == "off"  # YAML reads a bare off as false
    assert {("data", "cache"), ("data", "cache_dir"), ("data", "cache_budget")} <= RESUMABLE_CHANGES
    assert ("data", "cache_size") not in RESUMABLE_CHANGES  # it changes the pixels of large images


def test_bench_rows_keep_matching_their_preset() -> None:
    """The cache settings do not change what a run computes, so a benchmark row's recipe hash leaves them out
    (rows measured before they existed keep matching); a stored size does change the pixels, and counts."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import _common

    base = _common.recipe_hash(load_recipe("simclr"))
    moved = ["data.cache=off", "data.cache_dir=/elsewhere", "data.cache_budget=0.9"]
    assert _common.recipe_hash(load_recipe("simclr", moved)) == base
    assert _common.recipe_hash(load_recipe("simclr", ["data.cache_size=64"])) != base
