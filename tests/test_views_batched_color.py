"""Photometric and special view ops made in batches (clcli/views/batched_color.py, batched_special.py).

Two kinds of test: with explicit per-sample parameters each batched op agrees with torchvision's
functional op (or, for CPC's patch grid, with the per-sample pipeline) to float rounding; with
parameters drawn from a SampleRandom the batched path follows the same distributions as the
per-sample transforms of clcli/views/pipelines.py on the same images (fixed seeds; the tolerances,
stated where they are used, are about 4.5 standard errors, or a two-sample Kolmogorov-Smirnov
distance at the 0.1 % level).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from clcli.recipe import ViewGroup
from clcli.views import batched_color as bc
from clcli.views.batched_special import PatchParams, apply_special, patch_views, sample_patches
from clcli.views.color import normalize_lab, rgb_to_lab
from clcli.views.patches import CPCPatches, _factors, grid_size, patch_grid
from clcli.views.pipelines import augment_pipeline
from clcli.views.sample_random import SampleRandom

PERMUTATIONS = torch.tensor(list(itertools.permutations(range(4))))


@pytest.fixture(autouse=True)
def one_thread():
    """Image-by-image transforms on tiny images spend most of a second thread's time waiting: use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    """uint8 [n, 3, size, size]: a random colour per image plus noise, with gray, black, white and tied pixels."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (n, 3, 1, 1), generator=g).float()
    noise = torch.randn(n, 3, size, size, generator=g) * 40
    x = (base + noise).clamp(0, 255).round().to(torch.uint8)
    x[:, :, 0, 0] = 128  # a gray pixel
    x[:, :, 0, 1] = 0
    x[:, :, 0, 2] = 255
    x[:, 1, 1, :] = x[:, 0, 1, :]  # r == g along a row
    return x


def floats(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    return images(n, size, seed).float() / 255.0


def after_crop_and_flip(group: ViewGroup) -> v2.Compose:
    """The per-sample pipeline's transforms that follow its crop and flip."""
    ops = augment_pipeline(group).transforms
    return v2.Compose(ops[1 + (group.hflip_p > 0) :])


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


def ks_bound(n: int, m: int) -> float:
    """The KS distance two samples of sizes n and m exceed with probability 0.1 % under the same law."""
    return 1.95 * math.sqrt((n + m) / (n * m))


def rates_agree(a: float, b: float, n: int, m: int) -> bool:
    """Two observed rates within 4.5 standard errors of their difference."""
    p = (a * n + b * m) / (n + m)
    return abs(a - b) <= 4.5 * math.sqrt(max(p * (1 - p), 1e-12) * (1 / n + 1 / m)) + 1e-9


# ----------------------------------------------------------------- explicit parameters: exact
@pytest.mark.parametrize(
    ("op", "reference", "low", "high", "tol"),
    [
        (bc.adjust_brightness, TF.adjust_brightness, 0.0, 2.0, 1e-6),
        (bc.adjust_contrast, TF.adjust_contrast, 0.0, 2.0, 1e-6),
        (bc.adjust_saturation, TF.adjust_saturation, 0.0, 2.0, 1e-6),
        (bc.adjust_hue, TF.adjust_hue, -0.5, 0.5, 1e-5),
    ],
)
def test_each_jitter_op_agrees_with_torchvision(op, reference, low, high, tol) -> None:
    x = floats(64)
    f = torch.linspace(low, high, 64)
    expected = torch.stack([reference(x[i], f[i].item()) for i in range(64)])
    assert (op(x, f) - expected).abs().max().item() <= tol


def test_grayscale_blur_and_solarize_agree_with_torchvision() -> None:
    x = floats(32, size=16)
    u8 = images(32, size=16)
    assert torch.allclose(bc.rgb_to_grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)
    yes = torch.ones(32, dtype=torch.bool)
    assert torch.allclose(bc.random_grayscale(x, yes), TF.rgb_to_grayscale(x, 3), atol=1e-6, rtol=0)
    sigma = torch.linspace(0.1, 2.0, 32)
    for k in (3, 7, 15):
        expected = torch.stack([TF.gaussian_blur(x[i], [k, k], [sigma[i].item()] * 2) for i in range(32)])
        assert (bc.gaussian_blur(x, k, sigma) - expected).abs().max().item() <= 2e-6
    # solarise at 128/255 on float images is the pipeline's threshold of 128 on their uint8 originals
    assert torch.allclose(bc.solarize(x), TF.solarize(u8, 128).float() / 255, atol=1e-7, rtol=0)
    assert torch.equal(bc.solarize(x), TF.solarize(x, bc.SOLARIZE_THRESHOLD))


def test_color_jitter_applies_the_four_ops_in_each_samples_order() -> None:
    n = 48  # every one of the 24 orders twice
    x = floats(n)
    order = PERMUTATIONS[torch.arange(n) % 24]
    g = torch.Generator().manual_seed(1)
    factors = torch.cat([torch.rand(n, 3, generator=g) * 1.6 + 0.2, torch.rand(n, 1, generator=g) - 0.5], dim=1)
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    expected = []
    for i in range(n):
        y = x[i]
        for op in order[i].tolist():
            y = fns[op](y, factors[i, op].item())
        expected.append(y)
    assert (bc.color_jitter(x, factors, order) - torch.stack(expected)).abs().max().item() <= 1e-5
    # hue=False skips the hue op (ColorJitter with hue 0): the others still in each sample's order
    expected = []
    for i in range(n):
        y = x[i]
        for op in order[i].tolist():
            y = y if op == 3 else fns[op](y, factors[i, op].item())
        expected.append(y)
    assert (bc.color_jitter(x, factors, order, hue=False) - torch.stack(expected)).abs().max().item() <= 1e-5


def test_photometric_with_explicit_parameters_is_the_pipeline_op_by_op() -> None:
    """Jitter, grayscale, blur, solarise in the pipeline's order, each only where its sample draws it."""
    group = ViewGroup(size=16, blur_p=0.5, solarize_p=0.5)
    n = 32
    x = floats(n, size=16)
    g = torch.Generator().manual_seed(2)
    params = bc.PhotometricParams(
        jitter_apply=torch.rand(n, generator=g) < 0.7,
        factors=torch.cat([torch.rand(n, 3, generator=g) * 1.6 + 0.2, torch.rand(n, 1, generator=g) * 0.4 - 0.2], 1),
        order=PERMUTATIONS[torch.randint(0, 24, (n,), generator=g)],
        grayscale=torch.rand(n, generator=g) < 0.3,
        blur=torch.rand(n, generator=g) < 0.5,
        sigma=torch.rand(n, generator=g) * 1.9 + 0.1,
        solarize=torch.rand(n, generator=g) < 0.5,
    )
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    kernel = bc.blur_kernel_size(group)
    assert kernel == 3  # 10 % of 16 px, odd, at least 3
    expected = []
    for i in range(n):
        y = x[i]
        if params.jitter_apply[i]:
            for op in params.order[i].tolist():
                y = fns[op](y, params.factors[i, op].item())
        if params.grayscale[i]:
            y = TF.rgb_to_grayscale(y, 3)
        if params.blur[i]:
            y = TF.gaussian_blur(y, [kernel, kernel], [params.sigma[i].item()] * 2)
        if params.solarize[i]:
            y = TF.solarize(y, bc.SOLARIZE_THRESHOLD)
        expected.append(y)
    out = bc.photometric(x, group, params)
    # a float ulp in a pixel near the solarising threshold may flip it: compare all but such pixels
    diff = (out - torch.stack(expected)).abs()
    assert (diff > 1e-5).float().mean().item() < 1e-3
    untouched = ~(params.jitter_apply | params.grayscale | params.blur | params.solarize)
    assert untouched.any() and torch.equal(out[untouched], x[untouched])  # skipped ops leave a sample exact


def test_float_ops_stay_close_to_the_uint8_pipeline() -> None:
    """The per-sample pipeline truncates to uint8 after every op; the batched ops keep floats."""
    n = 48
    u8 = images(n)
    order = PERMUTATIONS[torch.arange(n) % 24]
    scale = torch.linspace(0.2, 1.8, n).view(n, 1).expand(n, 3)
    factors = torch.cat([scale, torch.linspace(-0.1, 0.1, n).view(n, 1)], 1)
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    expected = []
    for i in range(n):
        y = u8[i]
        for op in order[i].tolist():
            y = fns[op](y, factors[i, op].item())
        expected.append(y)
    diff = (bc.color_jitter(u8.float() / 255, factors, order) * 255 - torch.stack(expected).float()).abs()
    assert diff.mean().item() < 1.5 and diff.max().item() <= 8  # in uint8 levels


# ------------------------------------------------------------------- drawn parameters: laws
def drawn(group: ViewGroup, n: int, seed0: int = 0) -> bc.PhotometricParams:
    return bc.sample_photometric(group, SampleRandom(np.arange(seed0, seed0 + n), stream=5))


@pytest.mark.parametrize(
    "group",
    [
        ViewGroup(),  # SimCLR: 0.8 x (0.8, 0.8, 0.8, 0.2)
        ViewGroup(jitter=(0.4, 0.4, 0.2, 0.1)),  # BYOL
        ViewGroup(jitter_strength=1.5),  # lower bound clipped at 0, hue capped at 0.5
        ViewGroup(jitter=(0.0, 0.4, 0.0, 0.0)),  # only contrast
    ],
)
def test_jitter_factors_follow_color_jitter(group: ViewGroup) -> None:
    """Ranges and laws of the factors, batched against torchvision's ColorJitter.make_params (10,000 each)."""
    n = 10_000
    params = drawn(group, n)
    b, c, s, h = (v * group.jitter_strength for v in group.jitter)
    cj = v2.ColorJitter(brightness=b, contrast=c, saturation=s, hue=min(h, 0.5))
    torch.manual_seed(0)
    ref = [cj.make_params([]) for _ in range(n)]
    keys = ["brightness_factor", "contrast_factor", "saturation_factor", "hue_factor"]
    for i, key in enumerate(keys):
        ours = params.factors[:, i].double().numpy()
        if ref[0][key] is None:  # ColorJitter skips the op: identity factor
            assert np.all(ours == bc.IDENTITY[i])
            continue
        theirs = np.array([r[key] for r in ref])
        lo, hi = getattr(cj, ["brightness", "contrast", "saturation", "hue"][i])
        assert lo <= ours.min() < lo + 0.002 * (hi - lo) and hi - 0.002 * (hi - lo) < ours.max() <= hi
        assert ks_distance(ours, theirs) < ks_bound(n, n)
        hist, _ = np.histogram(ours, bins=10, range=(lo, hi))  # uniform: 1,000 per bin, sd 30
        assert np.abs(hist - n / 10).max() < 4.5 * math.sqrt(n / 10)


def test_every_jitter_order_is_equally_likely() -> None:
    n = 24_000
    orders = drawn(ViewGroup(), n).order
    counts = torch.zeros(24)
    index = {tuple(p): k for k, p in enumerate(PERMUTATIONS.tolist())}
    for row in orders.tolist():
        counts[index[tuple(row)]] += 1
    sd = math.sqrt(n / 24 * (23 / 24))
    assert (counts - n / 24).abs().max().item() < 4.5 * sd  # all 24 orders, each about 1,000 times
    # ColorJitter's own orders (torch.randperm(4)) pass the same check, on 4,800 draws
    m = 4800
    torch.manual_seed(0)
    theirs = torch.zeros(24)
    cj = v2.ColorJitter(0.8, 0.8, 0.8, 0.2)
    for _ in range(m):
        theirs[index[tuple(cj.make_params([])["fn_idx"].tolist())]] += 1
    assert (theirs - m / 24).abs().max().item() < 4.5 * math.sqrt(m / 24 * (23 / 24))


def test_blur_sigma_and_the_rates_follow_the_group() -> None:
    n = 20_000
    group = ViewGroup(jitter_p=0.8, grayscale_p=0.2, blur_p=0.5, blur_sigma=(0.1, 2.0), solarize_p=0.2)
    params = drawn(group, n)
    for mask, p in [
        (params.jitter_apply, 0.8),
        (params.grayscale, 0.2),
        (params.blur, 0.5),
        (params.solarize, 0.2),
    ]:
        assert abs(mask.float().mean().item() - p) < 4.5 * math.sqrt(p * (1 - p) / n)
    sigma = params.sigma.double().numpy()
    blur = v2.GaussianBlur(3, sigma=(0.1, 2.0))
    torch.manual_seed(0)
    theirs = np.array([blur.make_params([])["sigma"][0] for _ in range(n)])
    assert 0.1 <= sigma.min() < 0.11 and 1.99 < sigma.max() <= 2.0
    assert ks_distance(sigma, theirs) < ks_bound(n, n)
    # the ops' draws are independent of each other
    u = torch.stack([params.jitter_apply, params.grayscale, params.blur, params.solarize], 1).double()
    corr = np.corrcoef(torch.cat([u, params.sigma.double().view(-1, 1), params.factors.double()], 1).T.numpy())
    assert np.abs(corr - np.eye(corr.shape[0])).max() < 0.035


@pytest.mark.parametrize(
    ("changes", "effect"),
    [
        (dict(jitter_p=0.8, grayscale_p=0.0), "changed"),
        (dict(jitter_p=0.0, grayscale_p=0.2), "gray"),
        (dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.5), "changed"),
        (dict(jitter_p=0.0, grayscale_p=0.0, solarize_p=0.2), "changed"),
    ],
)
def test_rates_on_the_same_images_as_the_per_sample_transforms(changes: dict, effect: str) -> None:
    """The fraction of images an op changes, per-sample transforms against the batched path (1,200 images each;
    a blur with a small sigma may leave an image as it was, in both paths)."""
    n = 1200
    group = ViewGroup(size=8, **changes)
    u8 = images(n)
    torch.manual_seed(0)
    per_sample = torch.stack([after_crop_and_flip(group)(img) for img in u8]).float() / 255
    batched = bc.apply_photometric(u8.float() / 255, group, SampleRandom(np.arange(n), stream=1))
    x = u8.float() / 255

    def rate(out: torch.Tensor) -> float:
        if effect == "gray":
            hit = (out[:, 0] == out[:, 1]).all(dim=(1, 2)) & (out[:, 1] == out[:, 2]).all(dim=(1, 2))
        else:
            hit = (out - x).abs().amax(dim=(1, 2, 3)) > 0.5 / 255
        return hit.float().mean().item()

    expected = next(v for k, v in changes.items() if v not in (0.0,))
    a, b = rate(per_sample), rate(batched)
    assert rates_agree(a, b, n, n) and abs(b - expected) < 0.1, (a, b)


def test_output_statistics_match_the_per_sample_pipeline() -> None:
    """Per-image brightness, contrast, colourfulness and red-green balance after the whole photometric part
    (SimCLR's group: jitter 0.8, grayscale 0.2), per-sample transforms against the batched path on the
    same 2,000 images: their laws agree (two-sample KS at the 0.1 % level)."""
    n = 2000
    group = ViewGroup(size=8)
    u8 = images(n, seed=3)
    torch.manual_seed(1)
    per_sample = torch.stack([after_crop_and_flip(group)(img) for img in u8]).float() / 255
    batched = bc.apply_photometric(u8.float() / 255, group, SampleRandom(np.arange(n) + 10**6, stream=2))

    def stats(x: torch.Tensor) -> list[np.ndarray]:
        chroma = x.amax(dim=1) - x.amin(dim=1)
        return [
            x.mean(dim=(1, 2, 3)).numpy(),
            x.std(dim=(1, 2, 3)).numpy(),
            chroma.mean(dim=(1, 2)).numpy(),
            (x[:, 0] - x[:, 1]).mean(dim=(1, 2)).numpy(),
        ]

    for a, b in zip(stats(per_sample), stats(batched), strict=True):
        assert ks_distance(a, b) < ks_bound(n, n)


# ------------------------------------------------------------------------------ entry points
def test_apply_photometric_repeats_and_depends_only_on_each_samples_seed() -> None:
    group = ViewGroup(size=8, blur_p=0.5, solarize_p=0.2)
    x = floats(6)
    seeds = [11, 22, 33, 44, 55, 66]
    out = bc.apply_photometric(x, group, SampleRandom(seeds, stream=4))
    assert torch.equal(out, bc.apply_photometric(x, group, SampleRandom(seeds, stream=4)))
    alone = bc.apply_photometric(x[2:3], group, SampleRandom([33], stream=4))
    assert torch.allclose(out[2:3], alone, atol=1e-6, rtol=0)
    assert not torch.equal(out, bc.apply_photometric(x, group, SampleRandom(seeds, stream=5)))
    assert out.shape == x.shape and out.dtype == x.dtype and out.min() >= 0 and out.max() <= 1


def test_groups_without_photometric_ops_and_unknown_pipelines() -> None:
    x = floats(4)
    rng = SampleRandom([1, 2, 3, 4])
    for group in (ViewGroup(pipeline="center"), ViewGroup(pipeline="cpc")):
        assert bc.apply_photometric(x, group, rng) is x
    plain = ViewGroup(jitter_p=0.0, grayscale_p=0.0)
    assert bc.apply_photometric(x, plain, rng) is x and rng.counter == 0  # nothing drawn, nothing done
    assert apply_special(x, ViewGroup(), rng) is x
    assert not bc.supports_batched(ViewGroup(pipeline="my_plugin"))
    with pytest.raises(ValueError, match="my_plugin"):
        bc.apply_photometric(x, ViewGroup(pipeline="my_plugin"), rng)
    with pytest.raises(ValueError, match="seeds"):
        bc.apply_photometric(x, ViewGroup(), SampleRandom([1, 2]))


def test_parameters_move_to_a_device_unchanged() -> None:
    params = drawn(ViewGroup(blur_p=0.5, solarize_p=0.5), 50)
    moved = params.to("cpu")
    for name in ("jitter_apply", "factors", "order", "grayscale", "blur", "sigma", "solarize"):
        a, b = getattr(params, name), getattr(moved, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name


# --------------------------------------------------------------------------------- CMC: Lab
def test_lab_conversion_of_a_batch_is_the_per_image_conversion() -> None:
    """CMC converts its views to Lab on the device, in batches: the same numbers as image by image."""
    x = floats(16, size=12)
    batched = normalize_lab(rgb_to_lab(x))
    single = torch.stack([normalize_lab(rgb_to_lab(x[i])) for i in range(16)])
    assert torch.allclose(batched, single, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------- CPC: patches
CPC = ViewGroup(
    name="grid",
    pipeline="cpc",
    size=32,
    count=1,
    hflip_p=0.0,
    patch_size=8,
    patch_stride=4,
    patch_jitter=1,
    jitter_p=0.8,
    jitter_strength=0.5,
    grayscale_p=0.25,
    patch_color_drop_p=0.3,
)


def per_sample_draws(group: ViewGroup, seed: int, n: int) -> dict[str, torch.Tensor]:
    """CPCPatches' draws for one image after its crop, repeated from the same torch seed."""
    torch.manual_seed(seed)
    j, p = group.patch_jitter, group.patch_size
    dt = torch.randint(-j, j + 1, (n,))
    dl = torch.randint(-j, j + 1, (n,))
    apply = torch.rand(n) < group.jitter_p
    b, c, s, h = (v * group.jitter_strength for v in group.jitter)
    factors = torch.stack([_factors(n, b, 1.0), _factors(n, c, 1.0), _factors(n, s, 1.0)], 1)
    factors = torch.cat([factors, torch.empty(n).uniform_(-min(h, 0.5), min(h, 0.5)).view(n, 1)], 1)
    gray = torch.rand(n) < group.grayscale_p
    drop = torch.rand(n) < group.patch_color_drop_p
    kept = torch.randint(0, 3, (n,))
    noise = torch.randn(n, 3, p, p)
    return dict(dt=dt, dl=dl, apply=apply, factors=factors, gray=gray, drop=drop, kept=kept, noise=noise)


def test_patch_views_with_explicit_parameters_are_the_per_sample_cpc_pipeline() -> None:
    u8 = images(3, size=32, seed=4)
    cpc = CPCPatches(CPC)
    cpc.crop = lambda img: img  # the views helper crops and flips; compare what follows
    n = grid_size(32, 8, 4) ** 2
    expected, draws = [], []
    for i in range(3):
        torch.manual_seed(100 + i)
        expected.append(cpc(u8[i]))
        draws.append(per_sample_draws(CPC, 100 + i, n))
    base_t, base_l = cpc.tops, cpc.lefts
    params = PatchParams(
        tops=torch.stack([(base_t + d["dt"]).clamp(0, 24) for d in draws]),
        lefts=torch.stack([(base_l + d["dl"]).clamp(0, 24) for d in draws]),
        jitter_apply=torch.stack([d["apply"] for d in draws]),
        factors=torch.stack([d["factors"] for d in draws]),
        grayscale=torch.stack([d["gray"] for d in draws]),
        drop=torch.stack([d["drop"] for d in draws]),
        kept=torch.stack([d["kept"] for d in draws]),
        noise=torch.stack([d["noise"] for d in draws]),
    )
    out = patch_views(u8.float() / 255, CPC, params)
    assert out.shape == (3, n, 3, 8, 8)
    assert torch.equal((out * 255).round().clamp(0, 255).to(torch.uint8), torch.stack(expected))


def test_patch_parameters_follow_the_per_sample_laws() -> None:
    b = 400
    params = sample_patches(CPC, SampleRandom(np.arange(b), stream=7))
    n = grid_size(32, 8, 4) ** 2
    base = torch.tensor([(r * 4, c * 4) for r in range(7) for c in range(7)])
    inner = (base > 0) & (base < 24)  # corners not clamped at the image border, [P, 2]
    moved = torch.cat([(params.tops - base[:, 0])[:, inner[:, 0]], (params.lefts - base[:, 1])[:, inner[:, 1]]])
    moved = moved.flatten()
    counts = torch.bincount(moved + 1, minlength=3).float()  # -1, 0, 1 equally likely
    total = moved.numel()
    assert set(moved.tolist()) == {-1, 0, 1}
    assert (counts / total - 1 / 3).abs().max() < 4.5 * math.sqrt(2 / 9 / total)
    assert params.tops.min() >= 0 and params.tops.max() <= 24
    m = b * n
    for mask, p in [(params.jitter_apply, 0.8), (params.grayscale, 0.25), (params.drop, 0.3)]:
        assert abs(mask.float().mean().item() - p) < 4.5 * math.sqrt(p * (1 - p) / m)
    kept = torch.bincount(params.kept.flatten(), minlength=3).float() / m
    assert (kept - 1 / 3).abs().max() < 4.5 * math.sqrt(2 / 9 / m)
    noise = params.noise.flatten()
    assert abs(noise.mean().item()) < 0.01 and abs(noise.std().item() - 1) < 0.01
    torch.manual_seed(0)
    theirs = [_factors(m, 0.4, 1.0), _factors(m, 0.4, 1.0), _factors(m, 0.4, 1.0), torch.empty(m).uniform_(-0.1, 0.1)]
    for i in range(4):
        ours = params.factors[..., i].flatten().double().numpy()
        assert ks_distance(ours, theirs[i].double().numpy()) < ks_bound(m, m)


def test_apply_special_cuts_the_augmented_grid() -> None:
    x = floats(4, size=32)
    seeds = [5, 6, 7, 8]
    out = apply_special(x, CPC, SampleRandom(seeds, stream=0))
    assert out.shape == (4, 49, 3, 8, 8) and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, apply_special(x, CPC, SampleRandom(seeds, stream=0)))
    plain = CPC.model_copy(update={"patch_jitter": 0, "jitter_p": 0.0, "grayscale_p": 0.0, "patch_color_drop_p": 0.0})
    assert torch.equal(apply_special(x, plain, SampleRandom(seeds)), patch_grid(x, 8, 4))


def test_the_ops_run_on_the_images_device() -> None:
    """On the meta device (shapes only), any parameter left on the CPU would raise: everything moves with x."""
    x = torch.rand(4, 3, 32, 32, device="meta")
    group = ViewGroup(blur_p=0.5, solarize_p=0.2)
    assert bc.apply_photometric(x, group, SampleRandom(np.arange(4))).device.type == "meta"
    out = apply_special(x, CPC, SampleRandom(np.arange(4)))
    assert out.device.type == "meta" and out.shape == (4, 49, 3, 8, 8)


def test_a_batch_made_in_chunks_on_the_cpu_is_the_whole_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    group = ViewGroup(size=8, blur_p=0.5, solarize_p=0.3)
    x = floats(10)
    params = drawn(group, 10)
    whole = bc.photometric(x, group, params)
    monkeypatch.setattr(bc, "CPU_CHUNK_PIXELS", 3 * 8 * 8)  # chunks of 3 images: 3, 3, 3, 1
    assert torch.allclose(bc.photometric(x, group, params), whole, atol=1e-6, rtol=0)
