"""Shared pieces of the benchmarks: the quality budget, the recipe hash, result files, the environment record."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from clcli.recipe import Recipe, load_recipe, validate_recipe
from clcli.runs import read_metrics

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"
# lightly's CIFAR-10 benchmark settings for SimSiam as clcli overrides (bench/notes/gpu_jobs/simsiam-lightly.txt);
# its initialisation is model.backbone.init=pytorch on top
LIGHTLY_SIMSIAM = (
    "optim.lr=0.06",
    "optim.lr_scaling=none",
    "optim.weight_decay=5e-4",
    "optim.exclude_bias_norm=false",
    "optim.warmup_epochs=0",
    "optim.schedule=constant",
    "method.view_passes=separate",
    "views.groups.0.crop_scale=[0.08,1.0]",
)

# The quality budget (the foundation issue's): one epoch at batch 128 in bf16, then weighted kNN
# with k = 200 and T = 0.1 on backbone features, from the train split to the test split.
QUALITY_BUDGET = {"epochs": 1.0, "batch": 128, "precision": "bf16", "k": 200, "temperature": 0.1}
# a run asked for bf16 on a CPU without bf16 arithmetic runs, and records, fp32
PRECISIONS_OF = {"bf16": ("bf16", "fp32"), "fp32": ("fp32",)}


def quality_overrides(
    data: Path,
    *,
    epochs: float,
    batch: int,
    precision: str,
    seed: int,
    k: int,
    temperature: float,
    workers: int = 1,
) -> list[str]:
    """The overrides that put a recipe on the quality budget (``bench/quality.py``, ``bench/bars.py``)."""
    return [
        f"data.source={Path(data) / 'train.parquet'}",
        f"trainer.epochs={epochs}",
        f"trainer.batch_size={batch}",
        f"trainer.precision={precision}",
        f"seed={seed}",
        f"data.num_workers={workers}",
        "trainer.checkpoint_every=100000",
        "trainer.log_every=20",
        f"eval.knn_k={k}",
        f"eval.knn_temperature={temperature}",
    ]


# What a row's recipe_hash leaves out: the seed (a row's own column: the seeds of one recipe are
# samples of it), the description (prose about the recipe) and the settings that say where and how
# a run is computed and logged, not what it computes. They are set to these values before hashing.
HASH_NEUTRAL: dict[tuple[str, ...], Any] = {
    ("seed",): 0,
    ("description",): "",
    ("data", "num_workers"): 0,
    ("trainer", "device"): "auto",
    ("trainer", "threads"): None,
    ("trainer", "log_every"): 10,
    ("trainer", "checkpoint_every"): 500,
    ("trainer", "keep_checkpoints"): 2,
    ("trainer", "channels_last"): False,  # a memory layout; False was every row's value before ``auto``
}

# Fields added to the schema after rows were recorded that do not change what a one-process run
# computes (or only how: trainer.compile): left out of the hash, so the rows measured before they
# existed keep matching their preset.
# The decoded-image cache (data.cache, cache_dir, cache_budget) gives the pixels decoding gives; data.cache_size
# changes them, so it is left out only at its default (no resizing), as the rows before it ran.
HASH_DROPPED: tuple[tuple[str, ...], ...] = (
    ("method", "sync_batchnorm"),
    ("data", "cache"),
    ("data", "cache_dir"),
    ("data", "cache_budget"),
    ("data", "on_device"),
    ("trainer", "compile"),
    # where the views are made (the batched views follow the per-sample distributions, tested)
    ("views", "backend"),
    # where metrics go, and the settings of evaluation protocols other than a row's kNN
    ("trainer", "loggers"),
    ("trainer", "wandb_project"),
    ("trainer", "wandb_mode"),
    ("eval", "linear_sgd"),
    ("eval", "finetune"),
)
HASH_DROPPED_AT_DEFAULT: dict[tuple[str, ...], Any] = {
    ("data", "cache_size"): None,
    ("model", "backbone", "pretrained_file"): None,
}


def data_name(source: str) -> str:
    """A data source as the hash sees it: a local path by its last two parts (``cifar10/train.parquet``),
    so the same files on two machines hash alike; ``embedded:``/``hf:`` specs as they are."""
    if source.startswith(("embedded:", "hf:")):
        return source
    parts = Path(source).parts
    return "/".join(parts[-2:])


def recipe_hash(recipe: Recipe) -> str:
    """The fingerprint of what a benchmark row measured: :meth:`clcli.recipe.Recipe.digest` of the
    resolved recipe the run used (preset, overrides, budget, and the precision it really ran in),
    with the seed and the fields of :data:`HASH_NEUTRAL` neutralised and the data source by name.

    It fingerprints the recipe, not the code: a change of behaviour that leaves every field as it
    was is not seen (a new field or a changed default is a field change, and is, except the fields
    of :data:`HASH_DROPPED`)."""
    raw = recipe.to_dict()
    for path, value in HASH_NEUTRAL.items():
        section = raw
        for part in path[:-1]:
            section = section[part]
        section[path[-1]] = value
    raw["data"]["source"] = data_name(raw["data"]["source"])
    resolved = validate_recipe(raw).to_dict()
    for path in (*HASH_DROPPED, *HASH_DROPPED_AT_DEFAULT):
        section = resolved
        for part in path[:-1]:
            section = section.get(part, {})
        if path in HASH_DROPPED or section.get(path[-1]) == HASH_DROPPED_AT_DEFAULT[path]:
            section.pop(path[-1], None)
    text = json.dumps(resolved, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def preset_hashes(name: str, overrides: tuple[str, ...] = (), epochs: float = QUALITY_BUDGET["epochs"]) -> set[str]:
    """The recipe hashes of a preset (with ``overrides``) at the quality budget as it resolves today,
    one per precision the budget may run in (bf16, or fp32 where bf16 falls back)."""
    b = QUALITY_BUDGET
    out = set()
    for precision in PRECISIONS_OF[str(b["precision"])]:
        budget = quality_overrides(
            CIFAR,
            epochs=epochs,
            batch=int(b["batch"]),
            precision=precision,
            seed=0,
            k=int(b["k"]),
            temperature=float(b["temperature"]),
        )
        out.add(recipe_hash(load_recipe(name, budget + list(overrides))))
    return out


def environment() -> dict[str, Any]:
    import torchvision

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "machine": platform.machine(),
        "git_commit": commit,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
    }


metric_rows = read_metrics


def merge_results(path: Path, rows: list[dict[str, Any]], key: tuple[str, ...]) -> list[dict[str, Any]]:
    """Add rows to a JSON results file, replacing earlier rows with the same key."""

    def ident(r: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(tuple(v) if isinstance(v, list) else v for v in (r.get(k) for k in key))

    existing: list[dict[str, Any]] = json.loads(path.read_text()) if path.exists() else []
    new_keys = {ident(r) for r in rows}
    kept = [r for r in existing if ident(r) not in new_keys]
    merged = kept + rows
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2) + "\n")
    return merged


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, list):
            return " ".join(str(x) for x in v)
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
