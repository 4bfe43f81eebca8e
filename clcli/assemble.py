"""Recipe -> built stages.  The only place that reads recipe sections to build objects.

:func:`prepare_training` opens the data, builds the method and the trainer for a run folder;
:func:`clcli.train.pretrain` adds the online evaluator and runs it.  What is read from and
written to the run folder lives in :mod:`clcli.runs`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from clcli import dist
from clcli.data import ImageSource, StreamSource
from clcli.data.cache import decoded_once
from clcli.data.sources import limit_source, open_data
from clcli.engine import checkpoint as ckpt
from clcli.engine.batched_views import BatchedViewsDataset, resolve_backend
from clcli.engine.determinism import enable_determinism
from clcli.engine.device import pick_device
from clcli.engine.distributed import init_distributed, per_rank_batch
from clcli.engine.loader import StreamViewsDataset, ViewsDataset
from clcli.engine.metrics_log import cut_back
from clcli.engine.resident import resident_images
from clcli.engine.trainer import Trainer
from clcli.errors import BadImageError, DataError, DistributedError
from clcli.methods.base import BuildContext, Method
from clcli.models.backbones import build_backbone
from clcli.precision import resolve_precision, with_precision
from clcli.recipe import Recipe
from clcli.recipe_checks import check_input_channels, check_memory
from clcli.registry import METHODS
from clcli.runs import check_resumable, claim_run_folder, damaged_checkpoint_notes, record_run
from clcli.schedules import make_plan
from clcli.views import ViewMaker
from clcli.views.batched import BatchedViews

# Builds a run's online evaluator (method -> metrics) from its resolved recipe and device, or None.
OnlineEvalFactory = Callable[[Recipe, torch.device], Callable[[Method], dict[str, float]] | None]


@dataclass
class Stages:
    recipe: Recipe
    method: Method
    source: ImageSource | StreamSource
    dataset: Any
    trainer: Trainer


def build_method(recipe: Recipe, plan: Any, source: ImageSource | StreamSource, device: torch.device) -> Method:
    cls = METHODS.get(recipe.method.name)
    if isinstance(source, StreamSource) and cls.needs_index:
        raise DataError(
            f"{recipe.method.name} keeps per-image state addressed by sample index, which a streaming source "
            "does not have; set data.streaming=false (or use a local copy of the dataset)"
        )
    labels = source.labels() if isinstance(source, ImageSource) else None
    num_classes = len(source.classes) if source.classes else (int(labels.max()) + 1 if labels is not None else None)
    ctx = BuildContext(
        recipe=recipe,
        build_backbone=lambda: build_backbone(recipe.model.backbone, pretrained=True),
        dataset_size=len(source) if isinstance(source, ImageSource) else None,
        num_classes=num_classes,
        steps_per_epoch=plan.steps_per_epoch,
        total_steps=plan.total_steps,
        epochs_to_steps=plan.epochs_to_steps,
        device=device,
        train_source=source if isinstance(source, ImageSource) else None,
        class_names=list(source.classes) if source.classes else None,
    )
    return cls(recipe.method, ctx)


def _image_channels(source: ImageSource | StreamSource) -> int:
    """Channels of the first readable training image (of the first 16); 3, the decoders' RGB, for a stream."""
    if isinstance(source, ImageSource):
        for i in range(min(len(source), 16)):
            try:
                return int(source.load_image(i).shape[0])
            except BadImageError:
                continue
    return 3


def prepare_training(
    recipe: Recipe,
    out: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
    show_progress: bool = True,
    online_eval: OnlineEvalFactory | None = None,
) -> Stages:
    """Open the data, build the method and a trainer; restore the latest checkpoint on resume.

    ``online_eval`` builds the evaluator the trainer calls every ``trainer.online_knn_every``
    epochs (:func:`clcli.evaluate.online.make_online_knn` in :func:`clcli.train.pretrain`);
    without it the run has no online evaluation.
    """
    info = init_distributed(pick_device(recipe.trainer.device))  # under torchrun: this rank's device
    device = info.device
    console = console if console is not None and info.is_main else Console(quiet=True)
    if info.distributed:
        check_distributable(recipe, info.world_size)
    METHODS.get(recipe.method.name).check_external(recipe.method)
    out = Path(out)
    existing = claim_run_folder(out, resume=resume, overwrite=overwrite)
    precision, why = resolve_precision(recipe.trainer.precision, device)
    if why is not None:
        console.print(f"[yellow]note:[/] {why}")
        recipe = with_precision(recipe, precision)
    if existing is not None:
        saved = ckpt.read_state(existing)["recipe"]
        check_resumable(saved, recipe)
    for note in damaged_checkpoint_notes(out, existing, resume=resume):
        console.print(f"[yellow]note:[/] {note}")
    if recipe.trainer.threads:
        torch.set_num_threads(recipe.trainer.threads)
    if recipe.trainer.deterministic:
        enable_determinism()
    torch.manual_seed(recipe.seed)
    data = recipe.data
    source = open_data(data.source, data.train_split, data)
    if isinstance(source, ImageSource):
        source = limit_source(source, data.limit)
        if len(source) == 0:
            raise DataError(f"the training split {data.train_split!r} of {data.source} has no images")
    check_input_channels(recipe, _image_channels(source))
    source = decoded_once(source, data, console=console, progress=show_progress)
    backend, _ = resolve_backend(recipe, source, device)
    resident, why = resident_images(recipe, source, backend, device)  # data.on_device
    if resident is not None:
        console.print(f"[dim]{why}: batches gathered there[/]")
    views = ViewMaker(recipe.views)
    plan = make_plan(recipe, len(source) if isinstance(source, ImageSource) else None)
    check_memory(recipe, plan.dataset_size, device, batch_size=per_rank_batch(recipe.trainer.batch_size))
    method = build_method(recipe, plan, source, device)
    stream_factory = None
    if isinstance(source, ImageSource) and backend == "batched":
        dataset: Any = BatchedViewsDataset(source, BatchedViews(recipe.views), data.skip_bad_images, method.needs_text)
        dataset.resident = resident
    elif isinstance(source, ImageSource):
        dataset = ViewsDataset(source, views, data.skip_bad_images, with_text=method.needs_text)
    else:
        dataset = None
        stream_source = source

        def stream_factory(skip: int) -> StreamViewsDataset:
            return StreamViewsDataset(stream_source, views, recipe.seed, skip, data.skip_bad_images)

    evaluator = None
    if recipe.trainer.online_knn_every and online_eval is not None:
        evaluator = online_eval(recipe, device)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(
        recipe,
        method,
        dataset,
        plan,
        out,
        device,
        console=console,
        show_progress=show_progress,
        evaluator=evaluator,
        stream_dataset_factory=stream_factory,
    )
    if existing is not None:
        trainer.restore(existing)
        console.print(f"resuming {out} from step {trainer.state.step} ({existing.name})")
    elif resume:
        console.print(f"no checkpoint in {out}: starting from step 0")
        if info.is_main:  # what a run killed before its first checkpoint logged is logged again
            cut_back(trainer.metrics_path, 0, 0)
    if info.is_main:
        record_run(out, recipe, resumed_at=trainer.state.step if existing is not None else None)
    dist.barrier()
    return Stages(recipe, method, source, dataset, trainer)


def check_distributable(recipe: Recipe, world_size: int) -> None:
    """Refuse, before anything is built, what several processes cannot train."""
    per_rank_batch(recipe.trainer.batch_size, world_size)
    if recipe.data.streaming:
        raise DistributedError(
            "a streaming source is read by one process; several processes need a local or map-style dataset "
            "(set data.streaming=false, or train in one process)"
        )
    if recipe.data.skip_bad_images:
        raise DistributedError(
            "data.skip_bad_images would leave the processes with batches of different sizes; with several "
            "processes, remove the unreadable images or train in one process"
        )
