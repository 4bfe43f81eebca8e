"""Batched photometric ops (clcli/views/batched_color.py) against the per-sample transforms and kornia.

For one batch of ``--batch`` images of ``--size`` px (already cropped: only what comes after crop and
flip is timed), three ways to make the photometric part of a view, timed interleaved (A, B, C, A,
B, C, ...) on the CPU, medians over ``--rounds``:

* ``per-sample``: the per-sample pipeline's transforms (torchvision.transforms.v2, as
  ``clcli.views.pipelines.augment_pipeline`` builds them) on each uint8 image in turn, as the
  DataLoader workers run them today;
* ``batched``: ``apply_photometric`` on the float batch, parameters drawn from a SampleRandom
  (uint8 -> float conversion included);
* ``kornia``: kornia.augmentation's batched modules with the same probabilities and ranges (one
  order of the four jitter ops per batch: kornia's ColorJitter cannot shuffle the order per sample).

Then each op alone with explicit per-sample parameters (applied to every sample): our batched op,
kornia's functional op with the same per-sample parameters, and torchvision's functional op image by
image.  Usage, from the repository root::

    PYTHONPATH=. python bench/notes/batched_color.py [--batch 128] [--size 32] [--rounds 15] [--threads 1] [--clock cpu]

Writes ``bench/notes/results/batched_color.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from clcli.recipe import ViewGroup
from clcli.views import batched_color as bc
from clcli.views.batched_special import apply_special
from clcli.views.patches import CPCPatches
from clcli.views.pipelines import augment_pipeline
from clcli.views.sample_random import SampleRandom

try:
    import kornia
    import kornia.augmentation as K
except ImportError:  # kornia is optional here
    kornia = None


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = time.process_time


def interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds of each function, called in turn ``rounds`` times after one warm-up call each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def per_sample_fn(group: ViewGroup, images: torch.Tensor) -> Callable[[], torch.Tensor]:
    pipeline = augment_pipeline(group)
    ops = pipeline.transforms[1 + (group.hflip_p > 0) :]  # everything after crop and flip
    after = v2.Compose(ops)
    return lambda: torch.stack([after(img) for img in images])


def batched_fn(group: ViewGroup, images: torch.Tensor) -> Callable[[], torch.Tensor]:
    seeds = torch.arange(images.shape[0]) * 7919 + 13
    return lambda: bc.apply_photometric(images.float() / 255.0, group, SampleRandom(seeds, stream=3))


def kornia_fn(group: ViewGroup, images: torch.Tensor) -> Callable[[], torch.Tensor]:
    ops: list[torch.nn.Module] = []
    b, c, s, h = (v * group.jitter_strength for v in group.jitter)
    if group.jitter_p > 0:
        ops.append(K.ColorJitter(b, c, s, min(h, 0.5), p=group.jitter_p))
    if group.grayscale_p > 0:
        ops.append(K.RandomGrayscale(p=group.grayscale_p))
    if group.blur_p > 0:
        k = bc.blur_kernel_size(group)
        ops.append(K.RandomGaussianBlur((k, k), group.blur_sigma, p=group.blur_p))
    if group.solarize_p > 0:
        ops.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=group.solarize_p))
    seq = torch.nn.Sequential(*ops)
    return lambda: seq(images.float() / 255.0)


CPC_GROUP = dict(pipeline="cpc", count=1, hflip_p=0.0, patch_jitter=1, jitter_strength=0.5, grayscale_p=0.25)


def cpc_fns(size: int, images: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The cpc preset's patch grid (7 x 7 patches of 8 px at 32 px) after crop: per image and batched."""
    group = ViewGroup(size=size, **CPC_GROUP)
    cpc = CPCPatches(group)
    cpc.crop = lambda img: img  # type: ignore[assignment]  (only what follows the crop is timed)
    seeds = torch.arange(images.shape[0]) * 7919 + 13
    return {
        "per-sample": lambda: torch.stack([cpc(img) for img in images]),
        "batched": lambda: apply_special(images.float() / 255.0, group, SampleRandom(seeds, stream=3)),
    }


def op_cases(x: torch.Tensor, kernel: int) -> dict[str, dict[str, Callable[[], object]]]:
    """Each op alone on every sample with explicit per-sample parameters: ours, kornia's, torchvision's per image."""
    n = x.shape[0]
    g = torch.Generator().manual_seed(0)
    f = torch.empty(n, 4).uniform_(0.2, 1.8, generator=g)
    f[:, 3] = torch.empty(n).uniform_(-0.2, 0.2, generator=g)
    order = torch.argsort(torch.rand(n, 4, generator=g), dim=1)
    sigma = torch.empty(n).uniform_(0.1, 2.0, generator=g)
    yes = torch.ones(n, dtype=torch.bool)
    fl = f.tolist()
    cases: dict[str, dict[str, Callable[[], object]]] = {
        "brightness": {
            "batched": lambda: bc.adjust_brightness(x, f[:, 0]),
            "per-sample": lambda: [TF.adjust_brightness(x[i], fl[i][0]) for i in range(n)],
        },
        "contrast": {
            "batched": lambda: bc.adjust_contrast(x, f[:, 1]),
            "per-sample": lambda: [TF.adjust_contrast(x[i], fl[i][1]) for i in range(n)],
        },
        "saturation": {
            "batched": lambda: bc.adjust_saturation(x, f[:, 2]),
            "per-sample": lambda: [TF.adjust_saturation(x[i], fl[i][2]) for i in range(n)],
        },
        "hue": {
            "batched": lambda: bc.adjust_hue(x, f[:, 3]),
            "per-sample": lambda: [TF.adjust_hue(x[i], fl[i][3]) for i in range(n)],
        },
        "jitter (4 ops, order per sample)": {
            "batched": lambda: bc.color_jitter(x, f, order),
        },
        "grayscale": {
            "batched": lambda: bc.random_grayscale(x, yes),
            "per-sample": lambda: [TF.rgb_to_grayscale(x[i], 3) for i in range(n)],
        },
        f"blur (kernel {kernel})": {
            "batched": lambda: bc.gaussian_blur(x, kernel, sigma),
            "per-sample": lambda: [TF.gaussian_blur(x[i], [kernel, kernel], [sigma[i].item()] * 2) for i in range(n)],
        },
        "solarize": {
            "batched": lambda: bc.solarize(x, yes),
            "per-sample": lambda: [TF.solarize(x[i], bc.SOLARIZE_THRESHOLD) for i in range(n)],
        },
    }
    if kornia is not None:
        ke = kornia.enhance
        cases["brightness"]["kornia"] = lambda: ke.adjust_brightness_accumulative(x, f[:, 0])
        cases["contrast"]["kornia"] = lambda: ke.adjust_contrast_with_mean_subtraction(x, f[:, 1])
        cases["saturation"]["kornia"] = lambda: ke.adjust_saturation_with_gray_subtraction(x, f[:, 2])
        cases["hue"]["kornia"] = lambda: ke.adjust_hue(x, f[:, 3] * 2 * math.pi)

        def kornia_jitter() -> torch.Tensor:  # one fixed order for the batch: the most kornia can do
            y = ke.adjust_brightness_accumulative(x, f[:, 0])
            y = ke.adjust_contrast_with_mean_subtraction(y, f[:, 1])
            y = ke.adjust_saturation_with_gray_subtraction(y, f[:, 2])
            return ke.adjust_hue(y, f[:, 3] * 2 * math.pi)

        cases["jitter (4 ops, order per sample)"]["kornia (one order per batch)"] = kornia_jitter
        gray_all = K.RandomGrayscale(p=1.0)  # kornia's per-sample application: its own subset of the batch
        cases["grayscale"]["kornia"] = lambda: gray_all(x)
        sig2 = sigma.view(-1, 1).expand(n, 2).contiguous()
        cases[f"blur (kernel {kernel})"]["kornia"] = lambda: kornia.filters.gaussian_blur2d(
            x, (kernel, kernel), sig2, border_type="reflect"
        )
        cases["solarize"]["kornia"] = lambda: ke.solarize(x, bc.SOLARIZE_THRESHOLD)
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="cpu", help="cpu: process time (robust when busy)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "batched_color.md")
    args = ap.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    images = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8, generator=None)
    full = dict(blur_p=0.5, solarize_p=0.2)
    groups = {
        "simclr (jitter 0.8, grayscale 0.2)": ViewGroup(size=args.size),
        "all ops (+ blur 0.5, solarize 0.2)": ViewGroup(size=args.size, **full),
    }
    lines = [
        f"# Batched photometric ops: {args.batch} images of {args.size} px, CPU, {args.threads} thread(s)",
        "",
        f"`PYTHONPATH=. python bench/notes/batched_color.py --batch {args.batch} --size {args.size} "
        f"--rounds {args.rounds} --threads {args.threads} --clock {args.clock}`; torch {torch.__version__}"
        + (f", kornia {kornia.__version__}" if kornia is not None else ", kornia not installed")
        + f". Medians of {args.rounds} interleaved rounds, ms of {args.clock} time per batch.",
        "",
        "## Whole photometric part of a view (after crop and flip)",
        "",
        "| group | per-sample ms | batched ms | kornia ms | per-sample / batched | kornia / batched |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, group in groups.items():
        fns = {"per-sample": per_sample_fn(group, images), "batched": batched_fn(group, images)}
        if kornia is not None:
            fns["kornia"] = kornia_fn(group, images)
        t = interleaved(fns, args.rounds)
        kt = t.get("kornia", float("nan"))
        lines.append(
            f"| {name} | {t['per-sample'] * 1e3:.2f} | {t['batched'] * 1e3:.2f} | {kt * 1e3:.2f} "
            f"| {t['per-sample'] / t['batched']:.1f}x | {kt / t['batched']:.2f}x |"
        )
        print(lines[-1], flush=True)
    if args.size == 32:
        t = interleaved(cpc_fns(args.size, images), args.rounds)
        lines.append(
            f"| cpc patch grid (jitter 1 px, colour jitter 0.8 x 0.5, grayscale 0.25) | {t['per-sample'] * 1e3:.2f} "
            f"| {t['batched'] * 1e3:.2f} | n/a | {t['per-sample'] / t['batched']:.1f}x | n/a |"
        )
        print(lines[-1], flush=True)
    lines += [
        "",
        "## Each op alone, explicit per-sample parameters, every sample",
        "",
        "| op | method | ms | / batched |",
        "|---|---|---:|---:|",
    ]
    x = images.float() / 255.0
    for op, fns in op_cases(x, bc.blur_kernel_size(ViewGroup(size=args.size))).items():
        t = interleaved(fns, args.rounds)
        for method, sec in t.items():
            lines.append(f"| {op} | {method} | {sec * 1e3:.3f} | {sec / t['batched']:.2f}x |")
            print(lines[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
