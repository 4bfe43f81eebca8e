"""Shared helpers for tests: tiny, fast recipes on real images (scikit-learn's digits), the context a
method is built with, multi-crop batches of noise, and short runs (learning, exact resume, export)
with readers of their metrics."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch

from clcli.assemble import prepare_training
from clcli.methods.base import Batch, BuildContext, Method
from clcli.models.backbones import build_backbone as backbone_from_recipe
from clcli.recipe import Recipe, load_recipe
from clcli.runs import load_run, read_metrics
from clcli.schedules import steps_for_epochs
from clcli.train import pretrain

CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"

# ------------------------------------------------------------------------------ tiny recipes
_CONVNET = ["model.backbone.name=convnet", "model.backbone.width=8"]
_SMALL_VIT = [
    "model.backbone.image_size=16",
    "model.backbone.patch_size=4",
    "model.backbone.dim=32",
    "model.backbone.depth=2",
    "model.backbone.heads=2",
]


def _views(*sizes: int) -> list[str]:
    """View group ``i`` at ``sizes[i]`` pixels; evaluation at the first group's size."""
    return [*(f"views.groups.{i}.size={s}" for i, s in enumerate(sizes)), f"views.eval_size={sizes[0]}"]


def _run(batch_size: int = 32, steps: int = 6, limit: int = 256, logged: bool = True) -> list[str]:
    """A few fp32 steps on one thread over the first ``limit`` images; ``logged``: a metrics row every
    step, no checkpoint before the last, no warm-up."""
    out = [
        f"trainer.batch_size={batch_size}",
        f"trainer.steps={steps}",
        "trainer.precision=fp32",
        "trainer.threads=1",
        f"data.limit={limit}",
    ]
    if logged:
        out += ["trainer.log_every=1", "trainer.checkpoint_every=100", "optim.warmup_epochs=0"]
    return out


_SIMCLR = [*_CONVNET, *_views(16), "method.projector=[32, 16]", *_run()]
_MOCO_V3 = [*_SIMCLR, "method.projector=[32, 16]", "method.predictor=[32, 16]", "views.groups.1.size=16"]
_DINO = [
    *_views(16, 8),
    "views.groups.1.count=2",
    "method.out_dim=64",
    "method.head_hidden=32",
    "method.head_bottleneck=16",
    "trainer.reference_epochs=null",
    *_run(),
]

# Per recipe: networks, views and data shrunk so that a run takes seconds on one CPU core.
_TINY: dict[str, list[str]] = {
    "simclr": _SIMCLR,
    "byol": [*_CONVNET, *_views(8, 8), "method.projector=[32, 16]", "method.predictor=[32, 16]", *_run(limit=128)],
    "simsiam": [*_CONVNET, *_views(8), "method.projector=[32, 32]", "method.predictor=[8, 32]", *_run(limit=128)],
    "swav": [
        *_CONVNET,
        *_views(16, 8),
        "views.groups.1.count=2",
        "method.projector=[32, 16]",
        "method.num_prototypes=24",
        "trainer.reference_epochs=null",
        *_run(),
    ],
    "dino": [*_CONVNET, *_DINO],
    "dino-vit": [*_SMALL_VIT, *_DINO],
    "moco-v1": [*_SIMCLR, "method.queue_size=100", "method.bn_groups=4"],
    "moco-v2": [*_SIMCLR, "method.queue_size=100", "method.bn_groups=4"],
    "moco-v3": _MOCO_V3,
    "moco-v3-vit": [*_MOCO_V3, "model.backbone.name=vit", *_SMALL_VIT],
    "instdisc": [
        *_CONVNET,
        *_views(16),
        "method.embedding_dim=16",
        "method.nce_k=32",
        "method.loss=nce",  # the CIFAR preset's full softmax and filled bank are tested where named
        "method.bank_init=random",
        *_run(limit=128),
    ],
    "invaspread": [*_CONVNET, *_views(16), *_run(steps=4, limit=64, logged=False)],  # its tests never fit
    "cmc": [*_CONVNET, *_views(16), "method.nce_k=32", "method.embedding_dim=16", *_run(batch_size=16, limit=64)],
    "cpc": [  # CPC's patch encoder is its own: no backbone to shrink
        *_views(16),
        "views.groups.0.patch_size=4",
        "views.groups.0.patch_stride=2",
        "views.groups.0.crop_scale=[0.8, 1.0]",
        "method.encoder_width=4",
        "method.encoder_stages=2",
        "method.context_blocks=1",
        "method.steps=2",
        "method.min_step=1",
        *_run(batch_size=16, limit=64),
    ],
    "deepcluster": [
        *_CONVNET,
        *_views(8),
        "method.num_clusters=8",
        "method.pca_dim=16",
        "method.kmeans_iters=5",
        *_run(steps=7, limit=96),  # 3 steps per epoch
    ],
    "clip": [
        *_CONVNET,
        *_views(16),
        "method.embed_dim=32",
        "method.text_width=32",
        "method.text_layers=1",
        "method.text_heads=2",
        "method.vocab_size=300",
        *_run(),
    ],
    "clip-lit": [*_CONVNET, *_views(16), *_run(steps=3, limit=128)],
}


# A short CLIP run on 1,536 CIFAR-10 training images: 48 steps of 128, logged every 8.
CIFAR_CLIP_RUN = [
    "data.limit=1536",
    "trainer.batch_size=128",
    "trainer.steps=48",
    "trainer.log_every=8",
    "optim.lr=2e-3",
    "optim.lr_scaling=none",
    "optim.warmup_epochs=0.2",
]


def tiny_overrides(name: str, *extra: str) -> list[str]:
    """The ``--set`` overrides that shrink the built-in recipe ``name`` to a run of seconds, then ``extra``
    (later overrides win)."""
    if name not in _TINY:
        raise KeyError(f"no tiny overrides for recipe {name!r}; known: {', '.join(sorted(_TINY))}")
    return [*_TINY[name], *extra]


def tiny_recipe_names() -> list[str]:
    """The built-in recipes that :func:`tiny_overrides` knows how to shrink (every method has one)."""
    return sorted(_TINY)


def tiny_recipe(name: str, *extra: str) -> Recipe:
    """The built-in recipe ``name`` shrunk by :func:`tiny_overrides`, with ``extra`` overrides applied last."""
    return load_recipe(name, tiny_overrides(name, *extra))


def fixed_batch(images: int, steps: int, lr: float) -> list[str]:
    """Overrides for a learning check: ``steps`` steps at the constant rate ``lr`` on one batch made of
    the first ``images`` images (fresh views each step)."""
    return [
        f"data.limit={images}",
        f"trainer.batch_size={images}",
        f"trainer.steps={steps}",
        f"optim.lr={lr}",
        "optim.schedule=constant",
    ]


def set_args(*overrides: str) -> list[str]:
    """``overrides`` as command-line arguments: ``--set a=1 --set b=2``."""
    return [arg for item in overrides for arg in ("--set", item)]


# ------------------------------------------------------------------------------ building methods
def build_context(
    recipe: Recipe,
    build_backbone: Callable[[], torch.nn.Module] | None = None,
    *,
    dataset_size: int | None = 256,
    num_classes: int | None = 10,
    steps_per_epoch: int = 8,
    total_steps: int = 16,
    epochs_to_steps: Callable[[float], int] | None = None,
) -> BuildContext:
    """The context a run gives a method when it builds it, on the CPU, without a data source.

    ``build_backbone`` defaults to the recipe's backbone; ``epochs_to_steps`` to whole epochs of
    ``steps_per_epoch`` steps, rounded to the nearest step (no shrinking to a reference length).
    """
    return BuildContext(
        recipe=recipe,
        build_backbone=build_backbone or (lambda: backbone_from_recipe(recipe.model.backbone)),
        dataset_size=dataset_size,
        num_classes=num_classes,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        epochs_to_steps=epochs_to_steps or (lambda e: steps_for_epochs(e, steps_per_epoch)),
        device=torch.device("cpu"),
    )


def random_views(b: int = 8, seed: int = 0, n_local: int = 6) -> tuple[list[torch.Tensor], list[str]]:
    """A multi-crop batch of noise: two 16 px ``global`` views and ``n_local`` 8 px ``local`` ones of ``b`` images."""
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(b, 3, 16, 16, generator=g) for _ in range(2)]
    views += [torch.randn(b, 3, 8, 8, generator=g) for _ in range(n_local)]
    return views, ["global"] * 2 + ["local"] * n_local


def batch_of(views: list[torch.Tensor], names: list[str]) -> Batch:
    """``views`` as a training batch: sample indices 0..b-1, every label 0."""
    b = views[0].shape[0]
    return Batch(views, names, torch.arange(b), torch.zeros(b, dtype=torch.long))


def local_crops_move_running_stats(method: Method, skip: str | None = None) -> bool:
    """Whether a multi-crop method's batch-norm running statistics depend on its local crops.

    Steps ``method`` and a copy of it on the same :func:`random_views` batch, the copy's local crops
    changed, and compares every running statistic (those under ``skip``, e.g. a teacher, left out).
    """
    twin = copy.deepcopy(method)
    views, names = random_views()
    method.training_step(batch_of(views, names), 0)
    twin.training_step(batch_of(views[:2] + [v * 3 + 1 for v in views[2:]], names), 0)
    stats = [k for k in method.state_dict() if "running_" in k and not (skip and k.startswith(skip))]
    assert stats
    return not all(torch.equal(method.state_dict()[k], twin.state_dict()[k]) for k in stats)


# ------------------------------------------------------------------------------ run folders
metric_rows = read_metrics


def losses(run_dir: Path) -> list[float]:
    """The logged loss values of a run, in order."""
    return [r["loss"] for r in metric_rows(run_dir) if "loss" in r]


def run_losses(recipe: Recipe, run_dir: Path) -> list[float]:
    """Train ``recipe`` into ``run_dir``; the losses it logged, in order."""
    pretrain(recipe, run_dir)
    return losses(run_dir)


def trained_and_exported(recipe: Recipe, folder: Path) -> tuple[dict, Method, torch.nn.Module]:
    """Train ``recipe`` into ``folder/"run"`` and export its encoder to ``folder/"encoder.safetensors"``:
    the export's summary, the run's method as :func:`clcli.assemble.load_run` gives it (on the CPU) and
    the encoder as :func:`clcli.export.load_backbone` reads the file back."""
    from clcli.export import export_run, load_backbone

    pretrain(recipe, folder / "run")
    info = export_run(folder / "run", folder / "encoder.safetensors")
    _, method, _ = load_run(folder / "run", device=torch.device("cpu"))
    return info, method, load_backbone(folder / "encoder.safetensors")


def assert_exact_resume(recipe: Recipe, folder: Path, stop_after: int) -> None:
    """Train ``recipe`` without a break into ``folder/"full"``, and into ``folder/"cut"`` stopped after
    ``stop_after`` steps (with a checkpoint, as Ctrl-C stops it) then resumed to the end; the two runs
    must log the same losses, bitwise (JSON floats round-trip exactly), at the same increasing steps."""
    pretrain(recipe, folder / "full")
    summary = prepare_training(recipe, folder / "cut").trainer.fit(stop_after=stop_after)
    assert summary["interrupted"] and summary["steps"] == stop_after
    pretrain(recipe, folder / "cut", resume=True)
    assert losses(folder / "cut") == losses(folder / "full")
    steps = [r["step"] for r in metric_rows(folder / "cut") if "loss" in r]
    assert steps == sorted(set(steps)) == [r["step"] for r in metric_rows(folder / "full") if "loss" in r]
