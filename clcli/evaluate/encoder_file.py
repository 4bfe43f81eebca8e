"""Evaluation of an encoder file: one written by ``clcli export`` or ``clcli import``, or a published
checkpoint mapped on the fly (``--checkpoint FILE --from LAYOUT``, :mod:`clcli.models.ckpt_import`).

The encoder gives backbone features only (it has no projection head).  Its images are prepared as
the file says: at ``input_size`` with the file's mean and std; a file exported from a run brings the
run's recipe (its views, default data and evaluation settings), an imported one the ImageNet
protocol of the releases (resize the shorter side to 256/224 of the input size, centre crop).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clcli.engine.device import pick_device
from clcli.errors import ClcliError
from clcli.export import FORMAT, read_export, rebuild_encoder
from clcli.recipe import DataConfig, Recipe, TrainerConfig, ViewsConfig, validate_recipe

__all__ = ["EncoderModel", "is_encoder_file", "load_encoder_file"]


class EncoderModel(nn.Module):
    """An encoder file's backbone with the evaluation interface (``features``; no ``embed``)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise ClcliError("an encoder file holds the backbone only: evaluate it with --features backbone")


def is_encoder_file(path: Path) -> bool:
    """Whether ``path`` is a ``clcli export`` / ``clcli import`` file or ``hf`` folder (its metadata says so)."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # noqa: BLE001 - not safetensors: another kind of checkpoint
        return False


def _recipe(meta: dict[str, str], data: str | None, device: torch.device) -> Recipe:
    precision = "bf16" if device.type == "cuda" else "fp32"
    if meta.get("recipe"):
        base = json.loads(meta["recipe"])
        base.setdefault("trainer", {})["precision"] = precision
        if data is not None:
            base.setdefault("data", {})["source"] = data
        return validate_recipe(base)
    size = int(meta["input_size"])
    resize = size if size < 64 else round(size * 256 / 224)
    views = ViewsConfig(eval_size=size, eval_resize=resize, mean=json.loads(meta["mean"]), std=json.loads(meta["std"]))
    return Recipe(
        data=DataConfig(source=data) if data is not None else DataConfig(),
        views=views,
        trainer=TrainerConfig(precision=precision),
    )


def load_encoder_file(
    path: Path,
    layout: str | None = None,
    *,
    data: str | None = None,
    needs_data: bool = False,
    trust_pickle: bool = False,
) -> tuple[nn.Module, Recipe, torch.device, str, dict[str, Any]]:
    """The evaluation model of an encoder file (or of ``layout``'s checkpoint ``path``), its recipe,
    device, method name and what to record about it."""
    if layout is not None:
        from clcli.importers import imported_encoder

        tensors, meta, _ = imported_encoder(Path(path), layout, trust_pickle=trust_pickle)
    else:
        tensors, meta = read_export(Path(path))
    if needs_data and data is None and not meta.get("recipe"):
        raise ClcliError(f"{path} has no training data of its own: give --data SPEC")
    encoder = rebuild_encoder(tensors, meta, str(path))
    device = pick_device(TrainerConfig().device)
    model = EncoderModel(encoder).to(device).eval()
    extra: dict[str, Any] = {"encoder_file": meta.get("method", "?")}
    if layout is not None:
        extra["layout"] = layout
    method = meta.get("method", "?") + (" (imported)" if meta.get("imported") or layout else " (exported)")
    return model, _recipe(meta, data, device), device, method, extra
