"""Views made in batches on the device (``views.backend=batched``): the crop and flip distributions
against torchvision's, exact resizes of given boxes, multi-crop shapes, randomness keyed by the sample
alone, training and exact resume, and the errors a user can cause."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from clcli.assemble import prepare_training
from clcli.cli import app
from clcli.data import ImageSource
from clcli.data.base import MapStream
from clcli.engine.batched_views import (
    CPU_BACKEND,
    BatchedViewsDataset,
    collate_images,
    device_views,
    resolve_backend,
    source_image_shape,
)
from clcli.engine.loader import epoch_loader, sample_seed
from clcli.errors import DataError, RecipeError
from clcli.recipe import ViewGroup, ViewsConfig, load_recipe
from clcli.views.batched import BatchedViews, make_group_view, view_stream
from clcli.views.batched_color import apply_photometric
from clcli.views.batched_crop import crop_draws, resized_crop, sample_boxes
from clcli.views.pipelines import center_pipeline
from clcli.views.sample_random import SampleRandom

from .conftest import write_image
from .helpers import assert_exact_resume, fixed_batch, run_losses, set_args, tiny_recipe

# Two-sample Kolmogorov-Smirnov statistic bound for n = m = 4,000 draws: the 0.1 % critical value is
# 1.95 * sqrt(2 / 4000) = 0.044; fixed seeds make the test deterministic.
DRAWS = 4000
KS_TOLERANCE = 0.044


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


def _images(n: int, h: int = 12, w: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _plain(size: int, count: int = 1, **kw) -> ViewGroup:
    """A group whose pipeline is crop and flip only (no colour operation)."""
    return ViewGroup(size=size, count=count, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0, **kw)


# ---------------------------------------------------------------------------- crop distribution
@pytest.mark.parametrize(
    "height, width, scale, ratio",
    [
        (32, 32, (0.08, 1.0), (3 / 4, 4 / 3)),  # SimCLR's CIFAR crop
        (24, 40, (0.2, 1.0), (3 / 4, 4 / 3)),  # a wide image, CMC's scale
        (16, 48, (0.3, 1.0), (3 / 4, 4 / 3)),  # all ten tries fail for about 40 % of the samples: the centre fallback
    ],
)
def test_crop_area_ratio_and_position_follow_torchvisions_random_resized_crop(height, width, scale, ratio):
    top, left, h, w = (t.numpy() for t in sample_boxes(SampleRandom(range(DRAWS), 7), height, width, scale, ratio))
    torch.manual_seed(0)
    img = torch.zeros(3, height, width)
    ref = np.array([RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(DRAWS)])
    area, ref_area = h * w / (height * width), ref[:, 2] * ref[:, 3] / (height * width)
    assert _ks(area, ref_area) < KS_TOLERANCE
    assert _ks(w / h, ref[:, 3] / ref[:, 2]) < KS_TOLERANCE
    # positions as fractions of the room the box leaves
    assert _ks(top / np.maximum(height - h, 1), ref[:, 0] / np.maximum(height - ref[:, 2], 1)) < KS_TOLERANCE
    assert _ks(left / np.maximum(width - w, 1), ref[:, 1] / np.maximum(width - ref[:, 3], 1)) < KS_TOLERANCE
    assert (top >= 0).all() and (top + h <= height).all() and (left >= 0).all() and (left + w <= width).all()
    assert (h >= 1).all() and (w >= 1).all()


def test_fallback_box_is_torchvisions_centre_crop():
    # a 4 x 64 strip with scale near 1 never fits a box of ratio <= 4/3: every sample falls back
    top, left, h, w = sample_boxes(SampleRandom(range(50), 0), 4, 64, (0.99, 1.0), (3 / 4, 4 / 3))
    ref = RandomResizedCrop.get_params(torch.zeros(3, 4, 64), [0.99, 1.0], [3 / 4, 4 / 3])
    assert {(int(a), int(b), int(c), int(d)) for a, b, c, d in zip(top, left, h, w, strict=True)} == {ref}


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_flip_rate(p):
    n = DRAWS
    img = torch.arange(8, dtype=torch.uint8).repeat(3, 8, 1).unsqueeze(0).expand(n, -1, -1, -1).contiguous() * 30
    group = _plain(8, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip_p=p)  # the whole image, maybe flipped
    out = BatchedViews(ViewsConfig(groups=[group]))(img, list(range(n)))[0]
    flipped = (out == img.flip(-1)).flatten(1).all(1)
    kept = (out == img).flatten(1).all(1)
    assert bool((flipped ^ kept).all())  # every view is the image or its mirror image
    rate = flipped.float().mean().item()
    assert abs(rate - p) < 4 * (p * (1 - p) / n) ** 0.5


# -------------------------------------------------------------------------- exact resizes
def test_given_boxes_resize_as_torchvision_resized_crop():
    n, gen = 48, torch.Generator().manual_seed(3)
    x = _images(n, 20, 28)
    h, w = torch.randint(1, 21, (n,), generator=gen), torch.randint(1, 29, (n,), generator=gen)
    top = (torch.rand(n, generator=gen) * (21 - h)).long()
    left = (torch.rand(n, generator=gen) * (29 - w)).long()
    flip = torch.rand(n, generator=gen) < 0.5
    for size in (8, 16, 24, 40):  # down- and upscaling
        out = resized_crop(x.float(), (top, left, h, w), size, flip)
        for b in range(n):
            args = (int(top[b]), int(left[b]), int(h[b]), int(w[b]), [size, size])
            ref_f = TF.resized_crop(x[b].float(), *args, antialias=True)
            ref_u8 = TF.resized_crop(x[b], *args, antialias=True)
            if flip[b]:
                ref_f, ref_u8 = ref_f.flip(-1), ref_u8.flip(-1)
            # float: the same weights up to float32 rounding (values 0..255)
            torch.testing.assert_close(out[b], ref_f, atol=2e-3, rtol=0)
            # uint8 (the per-sample pipeline): torchvision's fixed-point kernel is within one level
            assert (out[b].round() - ref_u8.float()).abs().max() <= 1


@pytest.mark.parametrize("shape", [(32, 32), (20, 36), (36, 20)])
def test_center_pipeline_matches_the_per_sample_one(shape):
    x = _images(6, *shape)
    for size in (16, 20):
        group = ViewGroup(pipeline="center", size=size, count=1)
        out = BatchedViews(ViewsConfig(groups=[group]))(x, list(range(6)))[0]
        ref = torch.stack([center_pipeline(group)(img) for img in x])
        assert out.shape == ref.shape == (6, 3, size, size) and out.dtype == torch.uint8
        assert (out.int() - ref.int()).abs().max() <= 1


# ------------------------------------------------------------------------------ multi-crop
def test_multi_crop_sizes_counts_and_order():
    cfg = ViewsConfig(groups=[_plain(24, 2, name="global"), _plain(10, 6, name="local", crop_scale=(0.05, 0.4))])
    maker = BatchedViews(cfg)
    views = maker(_images(5, 30, 40), [11, 12, 13, 14, 15])
    assert [tuple(v.shape) for v in views] == [(5, 3, 24, 24)] * 2 + [(5, 3, 10, 10)] * 6
    assert all(v.dtype == torch.uint8 for v in views)
    assert maker.names == ["global"] * 2 + ["local"] * 6 and maker.sizes == [24, 24] + [10] * 6
    # each copy draws its own crop: no two views of a sample are the same
    flat = torch.stack([v.flatten(1) for v in views[2:]])  # [6, B, D]
    assert all(not torch.equal(flat[i], flat[j]) for i in range(6) for j in range(i + 1, 6))


# ------------------------------------------------------------------------------ randomness
def test_a_samples_views_depend_on_its_seed_alone():
    cfg = ViewsConfig(groups=[ViewGroup(size=16, count=2), _plain(8, 3, name="local")])
    maker = BatchedViews(cfg)
    x = _images(12, 20, 20)
    seeds = [sample_seed(5, 2, i) for i in range(12)]
    whole = maker(x, seeds)
    order = [9, 3, 0, 7]  # another batch: a subset in another order
    part = maker(x[order], [seeds[i] for i in order])
    for v_whole, v_part in zip(whole, part, strict=True):
        assert torch.equal(v_whole[order], v_part)
    again = maker(x, seeds)
    assert all(torch.equal(a, b) for a, b in zip(whole, again, strict=True))
    other = maker(x, [sample_seed(5, 3, i) for i in range(12)])  # next epoch: new views
    assert not torch.equal(whole[0], other[0])


def test_crop_and_flip_draw_a_fixed_count_before_the_colour_operations():
    # the colour helper's draws start after ours on the same object, whatever the boxes were
    rng = SampleRandom(range(30), 0)
    make_group_view(_images(30).float() / 255, _plain(8), rng)
    assert rng.counter == crop_draws


class _Source(ImageSource):
    spec, split, classes = "mem", "train", None

    def __init__(self, n: int = 24, shapes: tuple[tuple[int, int], ...] = ((12, 12),)) -> None:
        self.n, self.shapes = n, shapes

    def __len__(self) -> int:
        return self.n

    def load_image(self, i: int) -> torch.Tensor:
        return _images(1, *self.shapes[i % len(self.shapes)], seed=i)[0]

    def label(self, i: int) -> int:
        return i % 3

    def text(self, i: int) -> str | None:
        return None


@pytest.mark.parametrize("workers", [0, 2])
def test_views_do_not_depend_on_dataloader_workers(workers):
    cfg = ViewsConfig(groups=[ViewGroup(size=8, count=2)])
    ds = BatchedViewsDataset(_Source(), BatchedViews(cfg))

    def epoch(num_workers: int) -> list[torch.Tensor]:
        out = []
        for cb in epoch_loader(ds, 8, seed=1, epoch=0, start=0, num_workers=num_workers):
            assert cb.views == [] and cb.images.shape == (8, 3, 12, 12) and cb.seeds.shape == (8,)
            out += device_views(cb, ds, torch.device("cpu"))
        return out

    assert all(torch.equal(a, b) for a, b in zip(epoch(0), epoch(workers), strict=True))


# -------------------------------------------------------------------------------- training
def test_simclr_with_batched_views_lowers_the_loss(tmp_path):
    recipe = tiny_recipe(
        "simclr",
        *fixed_batch(images=64, steps=30, lr=0.5),
        "views.groups.0.crop_scale=[0.5, 1.0]",
        "method.temperature=0.2",
        "views.backend=batched",
    )
    seq = run_losses(recipe, tmp_path / "run")
    assert len(seq) == 30
    assert sum(seq[-5:]) / 5 < sum(seq[:5]) / 5 - 0.3


def test_simclr_with_batched_views_resumes_exactly(tmp_path):
    recipe = tiny_recipe("simclr", "views.backend=batched", "data.limit=96", "trainer.steps=7")  # 3 steps an epoch
    stages = prepare_training(recipe, tmp_path / "probe")
    assert isinstance(stages.dataset, BatchedViewsDataset)
    assert stages.trainer.fit()["views_backend"] == "batched"
    assert_exact_resume(recipe, tmp_path, stop_after=4)  # across an epoch boundary


def test_backend_choice(tmp_path):
    cpu = torch.device("cpu")
    per_sample = load_recipe("simclr", ["views.backend=per_sample"])
    assert resolve_backend(per_sample, _Source(), cpu)[0] == "per_sample"
    assert resolve_backend(load_recipe("simclr", ["views.backend=batched"]), _Source(), cpu)[0] == "batched"
    auto = load_recipe("simclr")
    assert auto.views.backend == "auto"
    assert resolve_backend(auto, MapStream(_Source()), torch.device("cuda"))[0] == "per_sample"
    assert resolve_backend(auto, _Source(shapes=((12, 12), (10, 14))), torch.device("cuda"))[0] == "per_sample"
    assert resolve_backend(auto, _Source(), torch.device("cuda"))[0] == "batched"
    assert resolve_backend(auto, _Source(), cpu)[0] == CPU_BACKEND == "batched"
    assert source_image_shape(_Source(shapes=((12, 12), (10, 14)))) is None


def test_a_run_resumes_under_another_views_backend_and_from_before_the_field():
    from clcli.runs import check_resumable

    saved = load_recipe("simclr", ["views.backend=per_sample"]).to_dict()
    check_resumable(saved, load_recipe("simclr", ["views.backend=batched"]))
    del saved["views"]["backend"]
    check_resumable(saved, load_recipe("simclr"))


# ---------------------------------------------------------------------------------- errors
def test_batched_refuses_what_it_cannot_do():
    cpu = torch.device("cpu")
    batched = load_recipe("simclr", ["views.backend=batched"])
    with pytest.raises(DataError, match="images of one size"):
        resolve_backend(batched, _Source(shapes=((12, 12), (10, 14))), cpu)
    with pytest.raises(RecipeError, match="map-style"):
        resolve_backend(batched, MapStream(_Source()), cpu)
    with pytest.raises(RecipeError, match="views.backend"):
        load_recipe("simclr", ["views.backend=gpu"])
    ds = BatchedViewsDataset(_Source(shapes=((12, 12), (10, 14))), BatchedViews(batched.views))
    with pytest.raises(DataError, match="one size"):  # a size the probe missed, met in a batch
        collate_images([ds[(i, i)] for i in range(4)])
    maker = BatchedViews(batched.views)
    with pytest.raises(DataError, match="uint8"):
        maker(torch.zeros(2, 3, 8, 8), [0, 1])
    with pytest.raises(DataError, match="seeds"):
        maker(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), [0])


def test_cli_batched_on_images_of_several_sizes_ends_with_one_message(tmp_path):
    from typer.testing import CliRunner

    for k, size in enumerate([(8, 8), (12, 8), (8, 8), (9, 11)]):
        write_image(tmp_path / "imgs" / f"{k}.png", seed=k, size=size)
    args = ["pretrain", "--recipe", "simclr", "--data", str(tmp_path / "imgs"), "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(app, args + set_args("views.backend=batched", "trainer.steps=1"))
    assert result.exit_code == 2
    assert "images of one size" in result.output and "Traceback" not in result.output


def test_a_view_is_crop_and_flip_then_the_colour_ops_on_the_same_stream():
    group = ViewGroup(size=12, count=1, blur_p=0.5, solarize_p=0.2)
    x, seeds = _images(16, 20, 20), [sample_seed(3, 0, i) for i in range(16)]
    out = BatchedViews(ViewsConfig(groups=[group]))(x, seeds)[0]
    rng = SampleRandom(seeds, view_stream(0, 0))
    boxes = sample_boxes(rng, 20, 20, group.crop_scale, group.crop_ratio)
    flip = rng.uniform(1)[:, 0] < group.hflip_p
    expected = apply_photometric(resized_crop(x.float() / 255, boxes, 12, flip).clamp(0, 1), group, rng)
    assert torch.equal(out, (expected * 255).round().clamp(0, 255).to(torch.uint8))


def test_cpc_batched_views_are_patch_grids():
    recipe = tiny_recipe("cpc", "views.backend=batched")
    group = recipe.views.groups[0]
    views = BatchedViews(recipe.views)(_images(4, 8, 8), [1, 2, 3, 4])
    rows = (group.size - group.patch_size) // group.patch_stride + 1
    assert [tuple(v.shape) for v in views] == [(4, rows * rows, 3, group.patch_size, group.patch_size)]
    assert views[0].dtype == torch.uint8


@pytest.mark.parametrize("name", ["swav", "cpc"])
def test_multi_crop_and_patch_grid_runs_resume_exactly_with_batched_views(tmp_path, name):
    recipe = tiny_recipe(name, "views.backend=batched", "trainer.steps=4")
    assert_exact_resume(recipe, tmp_path, stop_after=2)
