"""Shared pieces of the benchmarks: result files and the environment record."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"
# lightly's CIFAR-10 benchmark settings for SimSiam as clcli overrides (bench/gpu_jobs/simsiam-lightly.txt);
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


def metric_rows(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of a run's metrics.jsonl, in order (the trainer writes one per logged step)."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


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
