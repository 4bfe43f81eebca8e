"""Everything about a run folder: its resolved recipe, its provenance, loading it, resume checks.

A run folder (``clcli pretrain --out RUN``) holds ``recipe.yaml`` (the resolved recipe),
``provenance.json`` (versions, git commit, command, and one entry per resumption), ``metrics.jsonl``
and checkpoint folders (see :mod:`clcli.engine.checkpoint`).  Evaluation and export rebuild the
run's method from the first and the latest (or a chosen) checkpoint with :func:`load_run`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import platform
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from clcli import __version__, dist
from clcli.engine import checkpoint as ckpt
from clcli.engine.determinism import determinism_state
from clcli.engine.device import pick_device
from clcli.engine.finite import refuse_non_finite_weights
from clcli.engine.metrics_log import read_records
from clcli.errors import CheckpointError, ClcliError, RecipeError
from clcli.methods.base import BuildContext, Method
from clcli.models.backbones import build_backbone
from clcli.recipe import Recipe, validate_recipe
from clcli.registry import METHODS

# Settings that may differ between a run and its resumption (they do not change the maths of a step).
RESUMABLE_CHANGES = {
    ("trainer", "epochs"),
    ("trainer", "steps"),
    ("trainer", "log_every"),
    ("trainer", "checkpoint_every"),
    ("trainer", "keep_checkpoints"),
    ("trainer", "device"),
    ("trainer", "threads"),
    ("trainer", "channels_last"),
    ("trainer", "compile"),
    ("trainer", "deterministic"),
    ("trainer", "online_knn_every"),
    ("trainer", "loggers"),
    ("trainer", "wandb_project"),
    ("trainer", "wandb_mode"),
    ("data", "num_workers"),
    ("data", "cache"),
    ("data", "cache_dir"),
    ("data", "cache_budget"),
    ("views", "backend"),  # where the views are made, not their distribution (and runs from before the field)
}


# ------------------------------------------------------------------------------ provenance
def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def provenance(recipe: Recipe) -> dict[str, Any]:
    """Versions, platform, git commit, recipe hash, determinism settings and the command of this process."""
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
        **({"processes": dist.world_size()} if dist.is_distributed() else {}),
    }


# ------------------------------------------------------------------------- run folder I/O
def claim_run_folder(out: Path, *, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint of ``out`` to resume from, or None to start afresh.

    A folder that already holds a run is refused unless ``resume`` (continue it) or ``overwrite``
    (delete it first) is given.  Under torchrun every process decides the same: the main process
    alone deletes, and the checkpoint it finds is the one every process resumes from.
    """
    out = Path(out)
    holds_run = out.exists() and (out / "recipe.yaml").exists()
    if holds_run and not resume and not overwrite:
        raise ClcliError(
            f"{out} already holds a run; use --resume to continue it, --overwrite to replace it, or another --out"
        )
    dist.barrier()  # every process has looked before the main one deletes
    if holds_run and not resume and dist.is_main():
        shutil.rmtree(out)
    found = ckpt.latest_checkpoint(out) if dist.is_main() and out.exists() else None
    return _same_on_every_process(found)


def _same_on_every_process(found: Path | None) -> Path | None:
    """The main process's checkpoint choice, on every process (which must be able to read it)."""
    if not dist.is_distributed():
        return found
    name = dist.broadcast_object(str(found) if found is not None else None)
    if name is None:
        return None
    path = Path(name)
    if not ckpt.is_complete(path):
        raise CheckpointError(
            f"process {dist.rank()} cannot read the checkpoint {path} that process 0 resumes from; the nodes "
            "of a multi-node run need the run folder on a file system they share"
        )
    return path


def record_run(out: Path, recipe: Recipe, *, resumed_at: int | None = None) -> None:
    """Write ``recipe.yaml`` and ``provenance.json``; a resumption (``resumed_at``: its step) is appended."""
    out = Path(out)
    ckpt.atomic_write_text(out / "recipe.yaml", recipe.to_yaml())  # a kill mid-write leaves the old one
    prov_path = out / "provenance.json"
    prov = provenance(recipe)
    if resumed_at is not None and prov_path.exists():
        old = _read_provenance(prov_path)
        old.setdefault("resumed", []).append({"step": resumed_at, **prov})
        prov = old
    ckpt.atomic_write_text(prov_path, json.dumps(prov, indent=2))


def _read_provenance(path: Path) -> dict[str, Any]:
    """A run's ``provenance.json``; a damaged one is a :class:`CheckpointError` naming it."""
    try:
        old = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{path} is damaged ({exc}); repair it, or move it away to start a new provenance record, and resume again"
        ) from None
    if not isinstance(old, dict):
        raise CheckpointError(f"{path} is damaged (not a JSON object); move it away and resume again")
    return old


def check_run_files(out: Path) -> None:
    """Before a resume starts: the run's ``provenance.json``, which the resume appends to, must read."""
    prov_path = Path(out) / "provenance.json"
    if prov_path.is_file():
        _read_provenance(prov_path)


def damaged_checkpoint_notes(out: Path, existing: Path | None, *, resume: bool) -> list[str]:
    """What a resume says about damaged checkpoints newer than ``existing`` (the one it continues from).

    With none intact at all, resuming would start from step 0 over a run: that is refused.
    """
    if not resume or not Path(out).is_dir():
        return []
    intact, damaged = ckpt.newest_intact_checkpoint(Path(out))
    if intact is None and damaged:
        reasons = "; ".join(why for _, why in damaged[:3])
        raise CheckpointError(
            f"no intact checkpoint in {out} to resume from ({reasons}); use --overwrite to start the run again"
        )
    return [f"{why}; resuming from the newest intact checkpoint, {existing.name}" for _, why in damaged if existing]


METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of a run's ``metrics.jsonl``, in order (the trainer writes one per logged step).

    Non-finite numbers, written as the strings ``"nan"``, ``"inf"`` and ``"-inf"``, read back as floats
    (see :mod:`clcli.engine.metrics_log`).
    """
    return read_records(Path(run_dir) / METRICS_FILE)


def read_run_recipe(run_dir: Path) -> Recipe:
    """The validated recipe saved in a run folder."""
    path = Path(run_dir) / "recipe.yaml"
    if Path(run_dir).exists() and not Path(run_dir).is_dir():
        raise CheckpointError(f"{run_dir} is a file, not a run folder")
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"run folder {run_dir} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a clcli run folder (it has no recipe.yaml)")
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{path} is damaged (not valid YAML: {' '.join(str(exc).split())})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} is damaged (not a mapping of recipe sections)")
    try:
        return validate_recipe(raw)
    except RecipeError as exc:
        raise CheckpointError(f"the recipe saved in {run_dir} is not valid: {exc}") from None


# --------------------------------------------------------------------------- resume policy
def _diff(a: Any, b: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[tuple[str, ...]] = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), path + (k,))
        return out
    return [] if a == b else [path]


def check_resumable(saved: dict[str, Any], current: Recipe) -> None:
    """Refuse to resume a run with a recipe that changes the maths of a step.

    The saved recipe is first resolved under today's schema, so a field added since the run was saved
    counts at its default instead of as a difference.
    """
    with contextlib.suppress(ClcliError):  # a recipe today's schema refuses is compared as it was saved
        saved = validate_recipe(copy.deepcopy(saved)).to_dict()
    changed = [p for p in _diff(saved, current.to_dict()) if p[:2] not in RESUMABLE_CHANGES]
    if changed:
        names = ", ".join(".".join(p) for p in changed[:8])
        raise CheckpointError(
            f"this run folder was trained with another recipe (different: {names}); "
            "resume with the same recipe and overrides, or choose another --out"
        )


# ---------------------------------------------------------------------------------- load
def load_run(
    run_dir: Path, checkpoint: Path | None = None, device: torch.device | None = None
) -> tuple[Recipe, Method, Path]:
    """Rebuild a run's method with the weights of its latest (or the given) checkpoint, in eval mode.

    ``device`` defaults to the training rule (:func:`~clcli.engine.device.pick_device` of the
    recipe's ``trainer.device``).
    """
    recipe = read_run_recipe(Path(run_dir))
    path = ckpt.resolve_checkpoint(Path(checkpoint)) if checkpoint else _newest_checkpoint(Path(run_dir))
    state = ckpt.read_state(path, require=("step",))
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
        dataset_size=state.get("dataset_size") if cls.needs_index else None,
        num_classes=None,
        steps_per_epoch=steps,
        total_steps=steps,
        epochs_to_steps=lambda e: int(e * steps),
        device=device,
    )
    method = cls(recipe.method, ctx)
    weights = ckpt.load_model_state(path)
    refuse_non_finite_weights(weights, path, Path(run_dir))  # nan weights would score as chance, silently
    try:
        method.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not fit the {recipe.method.name} recipe: {exc}") from None
    method.to(device).eval()
    return recipe, method, path


def _newest_checkpoint(run_dir: Path) -> Path:
    """The run's newest checkpoint, which must be intact: a damaged one is named, with the intact one to use."""
    intact, damaged = ckpt.newest_intact_checkpoint(run_dir)
    if damaged:
        hint = (
            f"; the newest intact checkpoint is {intact}: pass --checkpoint {intact} to use it"
            if intact is not None
            else "; the run has no intact checkpoint"
        )
        raise CheckpointError(damaged[0][1] + hint)
    if intact is None:
        raise CheckpointError(f"run folder {run_dir} has no checkpoint yet")
    return intact
