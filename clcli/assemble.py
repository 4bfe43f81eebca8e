"""Recipe -> built stages.  The only place that reads recipe sections to build objects.

The command-line tool calls the functions here (``pretrain``, ``load_run``); they are also the
library's entry points for training from Python.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from clcli import __version__
from clcli.data import ImageSource, StreamSource
from clcli.data.sources import limit_source, open_data
from clcli.engine import checkpoint as ckpt
from clcli.engine.determinism import determinism_state, enable_determinism
from clcli.engine.loader import StreamViewsDataset, ViewsDataset
from clcli.engine.trainer import Trainer, pick_device
from clcli.errors import CheckpointError, ClcliError, DataError, RecipeError
from clcli.methods.base import BuildContext, Method
from clcli.precision import resolve_precision, with_precision
from clcli.recipe import BackboneConfig, Recipe, validate_recipe
from clcli.registry import BACKBONES, METHODS
from clcli.schedules import make_plan
from clcli.views import ViewMaker

# Settings that may differ between a run and its resumption (they do not change the maths of a step).
RESUMABLE_CHANGES = {
    ("trainer", "epochs"),
    ("trainer", "steps"),
    ("trainer", "log_every"),
    ("trainer", "checkpoint_every"),
    ("trainer", "keep_checkpoints"),
    ("trainer", "device"),
    ("trainer", "threads"),
    ("trainer", "deterministic"),
    ("trainer", "online_knn_every"),
    ("data", "num_workers"),
}


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    """A fresh backbone from its recipe section (through the backbone registry)."""
    factory = BACKBONES.get(cfg.name)
    return factory(cfg)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def provenance(recipe: Recipe) -> dict[str, Any]:
    import torchvision

    return {
        "clcli": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": _git_commit(),
        "recipe_hash": recipe.digest(),
        "determinism": determinism_state(),
        "command": sys.argv,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _diff(a: Any, b: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[tuple[str, ...]] = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), path + (k,))
        return out
    return [] if a == b else [path]


def check_resumable(saved: dict[str, Any], current: Recipe) -> None:
    """Refuse to resume a run with a recipe that changes the maths of a step."""
    changed = [p for p in _diff(saved, current.to_dict()) if p[:2] not in RESUMABLE_CHANGES]
    if changed:
        names = ", ".join(".".join(p) for p in changed[:8])
        raise CheckpointError(
            f"this run folder was trained with another recipe (different: {names}); "
            "resume with the same recipe and overrides, or choose another --out"
        )


@dataclass
class Stages:
    recipe: Recipe
    method: Method
    source: ImageSource | StreamSource
    dataset: Any
    trainer: Trainer


def build_method(recipe: Recipe, plan: Any, source: ImageSource | StreamSource, device: torch.device) -> Method:
    cls = METHODS.get(recipe.method.name)
    if isinstance(source, StreamSource) and getattr(cls, "needs_index", False):
        raise DataError(
            f"{recipe.method.name} keeps per-image state addressed by sample index, which a streaming source "
            "does not have; set data.streaming=false (or use a local copy of the dataset)"
        )
    labels = source.labels() if isinstance(source, ImageSource) else None
    num_classes = len(source.classes) if source.classes else (int(labels.max()) + 1 if labels is not None else None)
    ctx = BuildContext(
        recipe=recipe,
        build_backbone=lambda: build_backbone(recipe.model.backbone),
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


def prepare_training(
    recipe: Recipe,
    out: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
    show_progress: bool = True,
) -> Stages:
    """Open the data, build the method and a trainer; restore the latest checkpoint on resume."""
    console = console or Console(quiet=True)
    out = Path(out)
    existing = ckpt.latest_checkpoint(out) if out.exists() else None
    if out.exists() and (out / "recipe.yaml").exists() and not resume:
        if not overwrite:
            raise ClcliError(
                f"{out} already holds a run; use --resume to continue it, --overwrite to replace it, or another --out"
            )
        shutil.rmtree(out)
        existing = None
    device = pick_device(recipe.trainer.device)
    precision, why = resolve_precision(recipe.trainer.precision, device)
    if why is not None:
        console.print(f"[yellow]note:[/] {why}")
        recipe = with_precision(recipe, precision)
    if existing is not None:
        saved = json.loads((existing / ckpt.STATE_FILE).read_text())["recipe"]
        check_resumable(saved, recipe)
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
    views = ViewMaker(recipe.views)
    plan = make_plan(recipe, len(source) if isinstance(source, ImageSource) else None)
    method = build_method(recipe, plan, source, device)
    stream_factory = None
    if isinstance(source, ImageSource):
        dataset: Any = ViewsDataset(source, views, data.skip_bad_images, with_text=getattr(method, "needs_text", False))
    else:
        dataset = None
        stream_source = source

        def stream_factory(skip: int) -> StreamViewsDataset:
            return StreamViewsDataset(stream_source, views, recipe.seed, skip, data.skip_bad_images)

    evaluator = None
    if recipe.trainer.online_knn_every:
        evaluator = make_online_knn(recipe, device)
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
    (out / "recipe.yaml").write_text(recipe.to_yaml())
    prov_path = out / "provenance.json"
    prov = provenance(recipe)
    if existing is not None and prov_path.exists():
        old = json.loads(prov_path.read_text())
        old.setdefault("resumed", []).append({"step": trainer.state.step, **prov})
        prov = old
    ckpt.atomic_write_text(prov_path, json.dumps(prov, indent=2))
    return Stages(recipe, method, source, dataset, trainer)


def make_online_knn(recipe: Recipe, device: torch.device) -> Any:
    """An evaluator that scores the current backbone by kNN on the recipe's own splits."""
    from clcli.evaluate.features import FeatureSet, extract_features
    from clcli.evaluate.knn import knn_accuracy

    data = recipe.data
    try:
        train = open_data(data.source, data.train_split, data, streaming=False)
        test = open_data(data.source, data.test_split, data, streaming=False)
    except DataError:
        return None
    assert isinstance(train, ImageSource) and isinstance(test, ImageSource)
    train = limit_source(train, data.limit)
    if train.labels() is None or test.labels() is None:
        return None

    def evaluate(method: Method) -> dict[str, float]:
        feats: list[FeatureSet] = [
            extract_features(method, src, recipe, device=device, layer="backbone", show_progress=False)
            for src in (train, test)
        ]
        num_classes = int(max(feats[0].labels.max(), feats[1].labels.max())) + 1
        res = knn_accuracy(
            feats[0].features,
            feats[0].labels,
            feats[1].features,
            feats[1].labels,
            k=recipe.eval.knn_k,
            temperature=recipe.eval.knn_temperature,
            num_classes=num_classes,
        )
        return {"knn_top1": res["top1"]}

    return evaluate


def pretrain(
    recipe: Recipe,
    out: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Train a recipe into the run folder ``out``; returns a summary of the run."""
    stages = prepare_training(
        recipe, out, resume=resume, overwrite=overwrite, console=console, show_progress=show_progress
    )
    if console is not None:
        console.print(stages.trainer.schedule_table())
    summary = stages.trainer.fit()
    summary["recipe"] = recipe.name
    summary["method"] = recipe.method.name
    return summary


def read_run_recipe(run_dir: Path) -> Recipe:
    path = Path(run_dir) / "recipe.yaml"
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"run folder {run_dir} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a clcli run folder (it has no recipe.yaml)")
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{path} is not valid YAML: {exc}") from None
    try:
        return validate_recipe(raw)
    except RecipeError as exc:
        raise CheckpointError(f"the recipe saved in {run_dir} is not valid: {exc}") from None


def load_run(
    run_dir: Path, checkpoint: Path | None = None, device: torch.device | None = None
) -> tuple[Recipe, Method, Path]:
    """Rebuild a run's method with the weights of its latest (or the given) checkpoint."""
    recipe = read_run_recipe(Path(run_dir))
    path = ckpt.resolve_checkpoint(Path(checkpoint)) if checkpoint else ckpt.latest_checkpoint(Path(run_dir))
    if path is None:
        raise CheckpointError(f"run folder {run_dir} has no checkpoint yet")
    state = json.loads((path / ckpt.STATE_FILE).read_text())
    if state.get("recipe_hash") != recipe.digest():
        try:
            check_resumable(state.get("recipe", {}), recipe)
        except CheckpointError:
            raise CheckpointError(
                f"checkpoint {path} was trained with another recipe than {run_dir}/recipe.yaml"
            ) from None
    device = device or pick_device(recipe.trainer.device)
    cls = METHODS.get(recipe.method.name)
    steps = max(int(state.get("step", 1)), 1)
    ctx = BuildContext(
        recipe=recipe,
        build_backbone=lambda: build_backbone(recipe.model.backbone),
        dataset_size=_dataset_size_from_state(cls, path),
        num_classes=None,
        steps_per_epoch=steps,
        total_steps=steps,
        epochs_to_steps=lambda e: int(e * steps),
        device=device,
    )
    method = cls(recipe.method, ctx)
    weights = ckpt.load_model_state(path)
    try:
        method.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not fit the {recipe.method.name} recipe: {exc}") from None
    method.to(device).eval()
    return recipe, method, path


def _dataset_size_from_state(cls: type[Method], path: Path) -> int | None:
    """Methods with per-image state (memory banks) need the training-set size to rebuild their buffers."""
    if not getattr(cls, "needs_index", False):
        return None
    state = json.loads((path / ckpt.STATE_FILE).read_text())
    return state.get("dataset_size")
