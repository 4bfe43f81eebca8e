"""View groups produce the declared shapes; augmentation is a pure function of the sample seed."""

import torch

from clcli.engine.loader import EpochBatchSampler, ViewsDataset, _augment, collate, sample_seed
from clcli.recipe import ViewGroup, ViewsConfig, load_recipe
from clcli.views import ViewMaker, normalize_batch
from clcli.views.pipelines import augment_pipeline, eval_pipeline


def image(h=40, w=30, seed=0):
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_view_groups_make_declared_shapes_in_order():
    cfg = ViewsConfig(groups=[ViewGroup(name="global", size=24, count=2), ViewGroup(name="local", size=12, count=3)])
    maker = ViewMaker(cfg)
    views = maker(image())
    assert [tuple(v.shape) for v in views] == [(3, 24, 24)] * 2 + [(3, 12, 12)] * 3
    assert all(v.dtype == torch.uint8 for v in views)
    assert maker.names == ["global", "global", "local", "local", "local"]


def test_simclr_preset_has_the_papers_values():
    g = load_recipe("simclr").views.groups[0]
    assert g.crop_scale == (0.08, 1.0) and g.jitter_p == 0.8 and g.grayscale_p == 0.2
    assert g.jitter_strength == 0.5 and g.blur_p == 0.0  # CIFAR: s = 0.5, no blur
    names = [type(t).__name__ for t in augment_pipeline(g).transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "RandomApply", "RandomGrayscale"]
    imagenet = load_recipe("simclr-imagenet").views.groups[0]
    assert "RandomApply" in [type(t).__name__ for t in augment_pipeline(imagenet).transforms][-1:]


def test_augmentation_depends_only_on_the_sample_seed():
    maker = ViewMaker(ViewsConfig())
    img = image()
    a = _augment(maker, img, 123)
    torch.rand(10)  # the global RNG state must not matter...
    b = _augment(maker, img, 123)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    c = _augment(maker, img, 124)
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    state = torch.get_rng_state()
    _augment(maker, img, 5)
    assert torch.equal(state, torch.get_rng_state())  # ...and is left untouched


def test_sampler_resumes_mid_epoch_and_seeds_differ_per_epoch():
    full = list(EpochBatchSampler(100, 10, seed=0, epoch=3))
    assert len(full) == 10
    assert list(EpochBatchSampler(100, 10, seed=0, epoch=3, start=4)) == full[4:]
    other = list(EpochBatchSampler(100, 10, seed=0, epoch=4))
    assert full != other
    assert sorted(i for b in full for i, _ in b) == list(range(100))
    assert sample_seed(0, 1, 2) != sample_seed(0, 2, 1)


def test_eval_pipeline_and_normalisation():
    out = eval_pipeline(16, 20)(image(40, 30))
    assert out.shape == (3, 16, 16)
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    y = normalize_batch(x, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert torch.allclose(y, torch.full_like(y, 2.0))
    patches = torch.zeros((2, 5, 3, 4, 4), dtype=torch.uint8)
    assert normalize_batch(patches, (0.0,) * 3, (1.0,) * 3).shape == (2, 5, 3, 4, 4)


class _Source:
    spec, split, classes = "mem", "train", None

    def __len__(self):
        return 4

    def load_image(self, i):
        return image(seed=i)

    def label(self, i):
        return -1

    def text(self, i):
        return f"caption {i}"


def test_dataset_collates_views_indices_and_text():
    ds = ViewsDataset(_Source(), ViewMaker(ViewsConfig(groups=[ViewGroup(size=8, count=2)])), with_text=True)
    batch = collate([ds[(i, sample_seed(0, 0, i))] for i in range(4)])
    assert [tuple(v.shape) for v in batch.views] == [(4, 3, 8, 8)] * 2
    assert batch.index.tolist() == [0, 1, 2, 3] and batch.text == [f"caption {i}" for i in range(4)]
