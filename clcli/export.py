"""Export a run's encoder (safetensors, TorchScript, ONNX or a Hugging Face model folder), and load it back.

The safetensors file holds the backbone's state dict under the same keys as the torchvision model it
was built from, plus string metadata: the resolved recipe, the backbone's configuration, the input
normalisation, the evaluation input size and the feature dimension.  A torchvision ResNet loads
the tensors with ``load_state_dict(strict=True)`` into the same torchvision model (with the CIFAR
stem applied where the recipe used it); :func:`load_backbone` rebuilds any exported encoder from
the file alone, composite ones (several encoders whose features are concatenated) included.

The other formats (:mod:`clcli.export_formats`) carry the module :func:`load_backbone` would give:
a traced TorchScript archive and an ONNX graph, both with a dynamic batch axis, and a Hugging Face
style folder (``config.json``, ``model.safetensors``, a model card ``README.md``) that
:func:`load_backbone` reads back as it reads the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from clcli.errors import CheckpointError, ClcliError
from clcli.fsio import atomic_output, check_output_file
from clcli.methods.base import Method
from clcli.models.backbones import build_backbone
from clcli.models.timm_backbone import timm_metadata
from clcli.recipe import BackboneConfig, Recipe
from clcli.registry import METHODS
from clcli.runs import load_run

FORMAT = "clcli-encoder-v1"
FORMATS = ("safetensors", "torchscript", "onnx", "hf")
_EXAMPLE = {"safetensors": "encoder.safetensors", "torchscript": "encoder.pt", "onnx": "encoder.onnx"}


def encoder_payload(recipe: Recipe, method: Method, ckpt_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and string metadata of the run's exported encoder (what the safetensors file holds)."""
    tensors = {k: v.contiguous().cpu() for k, v in method.export_tensors().items()}
    probe = torch.zeros(2, recipe.model.backbone.in_channels, recipe.views.eval_size, recipe.views.eval_size)
    with torch.no_grad():
        feature_dim = int(method.features(probe).shape[1])
    meta = {
        "format": FORMAT,
        "kind": "composite" if method.extra_metadata().get("composite") else "backbone",
        "method": recipe.method.name,
        "backbone": json.dumps(recipe.model.backbone.model_dump(mode="json")),
        "recipe": json.dumps(recipe.to_dict()),
        "mean": json.dumps(list(recipe.views.mean)),
        "std": json.dumps(list(recipe.views.std)),
        "input_size": str(recipe.views.eval_size),
        "feature_dim": str(feature_dim),
        "checkpoint": str(ckpt_path),
        "extra": json.dumps(method.extra_metadata()),
        **timm_metadata(recipe.model.backbone),
    }
    return tensors, meta


def export_run(run_dir: Path, out: Path, *, checkpoint: Path | None = None, fmt: str = "safetensors") -> dict[str, Any]:
    """Write the run's encoder to ``out`` in ``fmt`` (one of :data:`FORMATS`); returns what was written.

    ``out`` is a file (a folder for ``hf``).  It is checked before the run is loaded (a folder
    where a file is wanted, a path under a file or an unwritable place is a user error); an
    existing file is replaced once the new one is complete, and a failed write leaves no temporary
    behind.
    """
    if fmt not in FORMATS:
        raise ClcliError(f"unknown export format {fmt!r}; available: {', '.join(FORMATS)}")
    out = Path(out)
    if fmt == "hf":
        from clcli.export_formats import check_model_folder

        check_model_folder(out)  # before the run is loaded
    else:
        check_output_file(out, "the export file (--out)", _EXAMPLE[fmt])
    recipe, method, ckpt_path = load_run(Path(run_dir), checkpoint, device=torch.device("cpu"))
    tensors, meta = encoder_payload(recipe, method, ckpt_path)
    summary: dict[str, Any] = {
        "out": str(out),
        "format": fmt,
        "tensors": len(tensors),
        "feature_dim": int(meta["feature_dim"]),
        "kind": meta["kind"],
        "checkpoint": str(ckpt_path),
        "method": recipe.method.name,
    }
    if fmt == "safetensors":
        with atomic_output(out, "the export file (--out)", _EXAMPLE[fmt]) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return summary
    from clcli.export_formats import write_hf, write_onnx, write_torchscript

    if fmt == "hf":
        summary.update(write_hf(out, tensors, meta, Path(run_dir)))
        return summary
    encoder = rebuild_encoder(tensors, meta, str(ckpt_path))
    writer = write_onnx if fmt == "onnx" else write_torchscript
    summary.update(writer(encoder, meta, out))
    return summary


def read_export(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of an exported file, or of the ``model.safetensors`` of an ``hf`` folder."""
    path = Path(path)
    if path.is_dir():
        inner = path / "model.safetensors"
        if not inner.is_file():
            raise CheckpointError(
                f"{path} is a folder without model.safetensors: give an exported file or a folder written by "
                "`clcli export --format hf`"
            )
        path = inner
    if not path.is_file():
        raise CheckpointError(f"exported file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a safetensors file: {exc}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} was not written by `clcli export` (no {FORMAT} metadata)")
    return tensors, meta


def rebuild_encoder(tensors: dict[str, torch.Tensor], meta: dict[str, str], where: str = "the file") -> nn.Module:
    """The encoder described by exported ``tensors`` and ``meta``, its weights loaded strictly, in eval mode."""
    if meta.get("kind") == "composite":
        cls = METHODS.get(meta["method"])
        model = cls.rebuild_encoder(tensors, meta)
    else:
        model = build_backbone(BackboneConfig.model_validate(json.loads(meta["backbone"])))
        try:
            model.load_state_dict(tensors, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{where} does not match the backbone it describes: {exc}") from None
    return model.eval()


def load_backbone(path: str | Path) -> nn.Module:
    """Rebuild an exported encoder from its file (or ``hf`` folder) alone.

    Returns an ``nn.Module`` in eval mode whose forward maps normalised images [B, C, H, W] to
    features [B, D]; its attributes ``mean``, ``std``, ``input_size``, ``feature_dim`` and
    ``metadata`` say how to feed it.  Files written by ``clcli import`` load the same way.
    """
    tensors, meta = read_export(Path(path))
    extra = json.loads(meta.get("extra", "{}"))
    model = rebuild_encoder(tensors, meta, str(path))
    model.mean = tuple(json.loads(meta["mean"]))  # type: ignore[assignment]
    model.std = tuple(json.loads(meta["std"]))  # type: ignore[assignment]
    model.input_size = int(meta["input_size"])  # type: ignore[assignment]
    model.feature_dim = int(meta["feature_dim"])  # type: ignore[assignment]
    model.metadata = {**meta, "extra": extra}  # type: ignore[assignment]
    return model
