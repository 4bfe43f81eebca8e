"""Images held on the training device (``data.on_device``): the same batches as the DataLoader path, the
same run bit for bit, exact resume, bad images skipped or refused the same way, and clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from clcli.assemble import prepare_training
from clcli.engine.loader import EpochBatchSampler, epoch_loader
from clcli.engine.resident import ResidentImages
from clcli.errors import BadImageError, RecipeError

from .helpers import assert_exact_resume, losses, tiny_recipe

ON = ("views.backend=batched", "data.cache=disk", "data.on_device=true")
OFF = ("views.backend=batched", "data.cache=disk", "data.on_device=false")


def _folder(root: Path, n: int = 24, broken: tuple[int, ...] = ()) -> Path:
    g = torch.Generator().manual_seed(0)
    for k in range(n):
        label = root / f"c{k % 2}"
        label.mkdir(parents=True, exist_ok=True)
        path = label / f"img{k:02d}.png"
        if k in broken:
            path.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
            continue
        pixels = torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(path)
    return root


def test_resident_batches_equal_the_dataloader_batches(tmp_path):
    stages = prepare_training(tiny_recipe("simclr", *ON), tmp_path / "run")
    dataset = stages.trainer.dataset
    assert isinstance(dataset.resident, ResidentImages)
    held = list(epoch_loader(dataset, 16, seed=3, epoch=1, start=1, num_workers=0))
    dataset.resident = None  # the DataLoader path over the same cached source
    loaded = list(epoch_loader(dataset, 16, seed=3, epoch=1, start=1, num_workers=0))
    assert len(held) == len(loaded) == len(EpochBatchSampler(len(dataset), 16, 3, 1, 1))
    for a, b in zip(held, loaded, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.index, b.index)
        assert torch.equal(a.seeds, b.seeds) and torch.equal(a.label, b.label)


def test_a_run_with_the_images_on_the_device_is_the_same_run(tmp_path):
    on, off = tiny_recipe("simclr", "trainer.steps=6", *ON), tiny_recipe("simclr", "trainer.steps=6", *OFF)
    from clcli.train import pretrain

    pretrain(on, tmp_path / "on")
    pretrain(off, tmp_path / "off")
    assert losses(tmp_path / "on") == losses(tmp_path / "off") and len(losses(tmp_path / "on")) > 0


def test_exact_resume_with_the_images_on_the_device(tmp_path):
    recipe = tiny_recipe("simclr", "trainer.steps=6", "trainer.checkpoint_every=2", *ON)
    assert_exact_resume(recipe, tmp_path, stop_after=3)


def test_bad_images_are_skipped_and_counted_as_the_dataloader_path_counts_them(tmp_path):
    data = _folder(tmp_path / "data", broken=(3, 10))
    counts = {}
    for name, flags in (("on", ON), ("off", OFF)):
        recipe = tiny_recipe(
            "simclr", f"data.source={data}", "data.skip_bad_images=true", "trainer.batch_size=8",
            "trainer.epochs=2", "trainer.steps=null", *flags,
        )  # fmt: skip
        summary = prepare_training(recipe, tmp_path / name).trainer.fit()
        counts[name] = (summary["skipped_bad_images"], summary.get("skipped_bad_reads"), losses(tmp_path / name))
    assert counts["on"] == counts["off"] and counts["on"][0] == 2


def test_a_bad_image_stops_the_run_as_without_the_device_copy(tmp_path):
    data = _folder(tmp_path / "data", broken=(5,))
    recipe = tiny_recipe("simclr", f"data.source={data}", "trainer.batch_size=8", "trainer.steps=3", *ON)
    with pytest.raises(BadImageError, match="img05"):
        prepare_training(recipe, tmp_path / "run").trainer.fit()


@pytest.mark.parametrize(
    "extra",
    [("views.backend=per_sample", "data.on_device=true"), ("data.cache=off", "data.on_device=true")],
)
def test_on_device_true_where_it_cannot_apply_is_refused(tmp_path, extra):
    with pytest.raises(RecipeError, match="data.on_device"):
        prepare_training(tiny_recipe("simclr", *extra), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_auto_keeps_the_images_in_host_memory_on_the_cpu(tmp_path):
    stages = prepare_training(tiny_recipe("simclr", "views.backend=batched", "data.cache=disk"), tmp_path / "run")
    assert stages.trainer.dataset.resident is None
