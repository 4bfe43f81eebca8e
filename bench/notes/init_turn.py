"""How far a few training steps turn the backbone's convolutions, by initialisation and learning rate.

Every convolution of the ResNet is followed by batch norm, so only the direction of its weights
matters to the function, and a step of a given learning rate turns small weights further than large
ones. ``model.backbone.init`` sets that size: torchvision's Kaiming-normal (the presets) or PyTorch's
layer default (``pytorch``, as lightly's CIFAR ResNet). This runs the same few steps of one recipe from
each (initialisation, learning rate) and reports the mean angle, in degrees, between each
convolution's weights before and after, so one-epoch figures of code with either initialisation can
be compared at the learning rates that move the network alike.

    PYTHONPATH=bench python bench/notes/init_turn.py                   # simsiam, lightly's settings, 10 steps of 64
    PYTHONPATH=bench python bench/notes/init_turn.py --runs torchvision:0.06 pytorch:0.06 torchvision:0.18

Results are merged into bench/notes/results/init_turn.{json,md}.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch
from _common import CIFAR, LIGHTLY_SIMSIAM, ROOT, environment, markdown_table, merge_results
from rich.console import Console

from clcli.assemble import prepare_training
from clcli.recipe import load_recipe

RESULTS = ROOT / "bench" / "notes" / "results"
LIGHTLY = [o for o in LIGHTLY_SIMSIAM if not o.startswith("optim.lr=")]  # the lr is each run's own


def conv_angles(before: dict[str, torch.Tensor], model: torch.nn.Module) -> list[float]:
    """Degrees between each 4-d weight in ``before`` and its value in ``model`` now."""
    out = []
    for name, p in model.named_parameters():
        if name in before:
            cos = torch.nn.functional.cosine_similarity(before[name].flatten(), p.detach().flatten(), dim=0)
            out.append(math.degrees(math.acos(max(-1.0, min(1.0, cos.item())))))
    return out


def measure(recipe_name: str, init: str, lr: float, args: argparse.Namespace, workdir: Path) -> dict:
    overrides = [
        f"data.source={args.data}",
        f"data.limit={args.batch * args.steps}",
        f"trainer.batch_size={args.batch}",
        f"trainer.steps={args.steps}",
        "trainer.precision=fp32",
        "trainer.checkpoint_every=1000000",
        "data.num_workers=0",
        f"seed={args.seed}",
        f"model.backbone.init={init}",
        f"optim.lr={lr}",
        *(LIGHTLY if args.lightly else []),
    ]
    recipe = load_recipe(recipe_name, overrides)
    stages = prepare_training(recipe, workdir / f"{recipe_name}-{init}-{lr}", console=Console(quiet=True))
    backbone = stages.trainer.method.backbone
    before = {n: p.detach().clone() for n, p in backbone.named_parameters() if p.dim() == 4}
    stages.trainer.fit()
    angles = conv_angles(before, backbone)
    return {
        "recipe": recipe_name,
        "init": init,
        "lr": lr,
        "lightly_settings": args.lightly,
        "steps": args.steps,
        "batch": args.batch,
        "seed": args.seed,
        "convolutions": len(angles),
        "mean_angle_deg": sum(angles) / len(angles),
        "max_angle_deg": max(angles),
        **environment(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="simsiam")
    p.add_argument("--runs", nargs="+", default=["torchvision:0.06", "pytorch:0.06", "torchvision:0.36"])
    p.add_argument("--data", default=str(CIFAR / "train.parquet"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-lightly", dest="lightly", action="store_false", help="keep the recipe's optimiser settings")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in args.runs:
            init, lr = run.split(":")
            row = measure(args.recipe, init, float(lr), args, Path(tmp))
            print(f"{init:12s} lr {float(lr):<6g} mean angle {row['mean_angle_deg']:.3f} deg", flush=True)
            rows.append(row)
    key = ("recipe", "init", "lr", "lightly_settings", "steps", "batch", "seed")
    merged = merge_results(RESULTS / "init_turn.json", rows, key)
    cols = ["recipe", "init", "lr", "lightly_settings", "steps", "batch", "seed", "mean_angle_deg", "max_angle_deg"]
    (RESULTS / "init_turn.md").write_text(markdown_table(merged, cols))


if __name__ == "__main__":
    main()
