"""Random resized crop + flip of one batch: our separable weights against kornia and the per-sample loop.

Times, interleaved (A, B, C, D, A, B, ...), the crop+resize+flip of a batch of CIFAR-10 images for
two 32 px views (SimCLR) and, with --local, six more 16 px views (multi-crop), on the CPU:

- ``own``: clcli.views.batched_crop (boxes from SampleRandom, two batched matrix products);
- ``kornia_boxes``: the same boxes through kornia.geometry.transform.crop_and_resize (grid_sample,
  no antialiasing), the flip by torch.where;
- ``kornia_aug``: kornia.augmentation.RandomResizedCrop + RandomHorizontalFlip (kornia's own sampling);
- ``per_sample``: torchvision.transforms.v2 RandomResizedCrop + RandomHorizontalFlip image by image
  (what the per-sample pipeline does for the geometry).

It also prints how far ``own`` and ``kornia_boxes`` are from torchvision's ``resized_crop`` (float,
antialiased) for the same boxes: the mean and largest absolute difference in uint8 levels.

    PYTHONPATH=.:bench python bench/notes/batched_crop.py --batch 128 --reps 15 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import CIFAR
from torchvision.transforms import v2

from clcli.views.batched_crop import resized_crop, sample_boxes
from clcli.views.sample_random import SampleRandom

SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def cifar_batch(n: int, data: str) -> torch.Tensor:
    from clcli.data.sources import open_data
    from clcli.recipe import DataConfig

    src = open_data(data, "train", DataConfig())
    return torch.stack([src.load_image(i) for i in range(n)])


def own(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    xf = x.float().div_(255.0)
    out = []
    for v, size in enumerate(sizes):
        rng = SampleRandom(range(len(x)), v)
        boxes = sample_boxes(rng, x.shape[-2], x.shape[-1], SCALE, RATIO)
        flip = rng.uniform(1)[:, 0] < 0.5
        out.append(resized_crop(xf, boxes, size, flip))
    return out


def kornia_boxes(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    from kornia.geometry.transform import crop_and_resize

    xf = x.float().div_(255.0)
    out = []
    for v, size in enumerate(sizes):
        rng = SampleRandom(range(len(x)), v)
        top, left, h, w = (t.float() for t in sample_boxes(rng, x.shape[-2], x.shape[-1], SCALE, RATIO))
        flip = rng.uniform(1)[:, 0] < 0.5
        x0, y0, x1, y1 = left, top, left + w - 1, top + h - 1
        boxes = torch.stack(
            [torch.stack([x0, y0], 1), torch.stack([x1, y0], 1), torch.stack([x1, y1], 1), torch.stack([x0, y1], 1)], 1
        )
        y = crop_and_resize(xf, boxes, (size, size))
        out.append(torch.where(flip.view(-1, 1, 1, 1), y.flip(-1), y))
    return out


def kornia_aug_maker(sizes: list[int]):
    import kornia.augmentation as K

    augs = [
        torch.nn.Sequential(K.RandomResizedCrop((s, s), scale=SCALE, ratio=RATIO), K.RandomHorizontalFlip())
        for s in sizes
    ]

    def run(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
        xf = x.float().div_(255.0)
        return [a(xf) for a in augs]

    return run


def per_sample_maker(sizes: list[int]):
    pipes = [
        v2.Compose([v2.RandomResizedCrop(s, scale=SCALE, ratio=RATIO, antialias=True), v2.RandomHorizontalFlip()])
        for s in sizes
    ]

    def run(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
        return [torch.stack([p(img) for img in x]) for p in pipes]

    return run


def agreement(x: torch.Tensor, size: int, scale: tuple[float, float]) -> str:
    """Mean and largest |difference| (uint8 levels) of own and kornia from torchvision for the same boxes."""
    from kornia.geometry.transform import crop_and_resize
    from torchvision.transforms.v2 import functional as TF

    xf = x.float()
    top, left, h, w = sample_boxes(SampleRandom(range(len(x)), 0), x.shape[-2], x.shape[-1], scale, RATIO)
    ref = torch.stack(
        [TF.resized_crop(xf[b], int(top[b]), int(left[b]), int(h[b]), int(w[b]), [size, size]) for b in range(len(x))]
    )
    x0, y0, x1, y1 = left.float(), top.float(), (left + w - 1).float(), (top + h - 1).float()
    corners = [torch.stack(c, 1) for c in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))]
    theirs = crop_and_resize(xf, torch.stack(corners, 1), (size, size))
    ours = resized_crop(xf, (top, left, h, w), size)
    down = int(((h > size) | (w > size)).sum())
    return (
        f"{size} px, scale {scale} ({down}/{len(x)} boxes downscaled): own mean {(ours - ref).abs().mean():.4f} "
        f"max {(ours - ref).abs().max():.4f}; kornia mean {(theirs - ref).abs().mean():.2f} "
        f"max {(theirs - ref).abs().max():.0f}"
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default=str(CIFAR / "train.parquet"))
    p.add_argument("--local", action="store_true", help="six 16 px views besides the two 32 px ones")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    x = cifar_batch(args.batch, args.data)
    sizes = [32, 32] + ([16] * 6 if args.local else [])
    cases = {
        "own": own,
        "kornia_boxes": kornia_boxes,
        "kornia_aug": kornia_aug_maker(sizes),
        "per_sample": per_sample_maker(sizes),
    }
    wall: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():  # warm-up
        fn(x, sizes)
    for _ in range(args.reps):
        for k, fn in cases.items():
            t, c = time.perf_counter(), time.process_time()
            fn(x, sizes)
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    base_wall, base_cpu = min(wall["own"]), statistics.median(cpu["own"])
    print(
        f"batch {args.batch}, views {sizes}, threads {args.threads}, {args.reps} interleaved reps: "
        "fastest wall time and median CPU time of this process per batch"
    )
    for k in cases:
        w, c = min(wall[k]), statistics.median(cpu[k])
        print(
            f"{k:>13}: wall {w * 1e3:8.2f} ms ({w / base_wall:5.2f}x own)  "
            f"cpu {c * 1e3:8.2f} ms ({c / base_cpu:5.2f}x own, {args.batch / c:7.0f} images/s)"
        )
    print("difference from torchvision's resized_crop for the same boxes, in uint8 levels:")
    for size, scale in ((32, SCALE), (16, (0.05, 0.4)), (16, SCALE)):
        print("  " + agreement(x, size, scale))


if __name__ == "__main__":
    main()
