"""``clcli import``: a published self-supervised checkpoint written as a clcli backbone file.

The encoder is found and checked by :mod:`clcli.models.ckpt_import`; the file written is the
format of ``clcli export`` (safetensors, string metadata), so :func:`clcli.load_backbone` and the
evaluation commands (``--checkpoint FILE``) read it like an exported run.  The metadata records the
source file, layout and branch, and the input the releases were trained with (ImageNet mean and std,
224 px; 32 px for a CIFAR-stem ResNet; a ViT's own image size).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from clcli.export import FORMAT
from clcli.fsio import atomic_output, check_output_file
from clcli.models.backbones import build_backbone
from clcli.models.ckpt_import import Imported, map_checkpoint, read_checkpoint

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "import_checkpoint", "imported_encoder"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imported_encoder(
    src: Path, layout: str, *, branch: str | None = None, heads: int | None = None, trust_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str], Imported]:
    """The backbone tensors and export metadata of the ``layout`` checkpoint ``src`` (nothing written)."""
    imp = map_checkpoint(read_checkpoint(src, trust_pickle=trust_pickle), layout, branch=branch, heads=heads)
    with torch.device("meta"):
        feature_dim = int(build_backbone(imp.config).feature_dim)  # type: ignore[arg-type]
    meta = {
        "format": FORMAT,
        "kind": "backbone",
        "method": imp.layout,
        "imported": "true",
        "backbone": json.dumps(imp.config.model_dump(mode="json")),
        "mean": json.dumps(list(IMAGENET_MEAN)),
        "std": json.dumps(list(IMAGENET_STD)),
        "input_size": str(imp.input_size),
        "feature_dim": str(feature_dim),
        "checkpoint": str(src),
        "extra": json.dumps(
            {
                "layout": imp.layout,
                "branch": imp.branch,
                "container": imp.container,
                "prefix": imp.prefix,
                "dropped": len(imp.dropped),
            }
        ),
    }
    return imp.state_dict, meta, imp


def import_checkpoint(
    src: Path,
    layout: str,
    out: Path,
    *,
    branch: str | None = None,
    heads: int | None = None,
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """Map the ``layout`` checkpoint ``src`` onto a clcli backbone and write it to ``out``; returns a summary.

    ``out`` is checked before the checkpoint is read; it is replaced only once the new file is complete.
    """
    out = Path(out)
    check_output_file(out, "the backbone file (--out)", "backbone.safetensors")
    tensors, meta, imp = imported_encoder(Path(src), layout, branch=branch, heads=heads, trust_pickle=trust_pickle)
    with atomic_output(out, "the backbone file (--out)", "backbone.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return {
        "out": str(out),
        "layout": imp.layout,
        "branch": imp.branch,
        "prefix": imp.prefix,
        "backbone": imp.config.name,
        "feature_dim": int(meta["feature_dim"]),
        "input_size": imp.input_size,
        "tensors": len(tensors),
        "dropped": len(imp.dropped),
        "source": str(src),
    }
