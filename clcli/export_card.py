"""The model card (``README.md``) of a ``clcli export --format hf`` folder.

The card says what the encoder is (method, paper, backbone, feature size), how it was trained (the
recipe's data, schedule and the full resolved recipe), how it scored (every result file in the
run's ``eval/`` folder: kNN, linear probe, zero-shot, ...), and how to load and feed it.  Front
matter in YAML gives the Hub its library name and tags.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from clcli.registry import METHODS

__all__ = ["evaluation_results", "model_card"]


def evaluation_results(run_dir: Path) -> list[dict[str, Any]]:
    """The JSON results in ``run_dir/eval`` (sorted by file name); unreadable files are left out."""
    folder = Path(run_dir) / "eval"
    results = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            results.append({"file": path.name, **data})
    return results


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def _settings(result: dict[str, Any]) -> str:
    keys = ("k", "temperature", "l2", "epochs", "lr", "templates", "labels_fraction")
    return ", ".join(f"{k}={_fmt(result[k])}" for k in keys if k in result and result[k] is not None)


def _evaluation_section(results: list[dict[str, Any]]) -> list[str]:
    lines = ["## Evaluation", ""]
    if not results:
        return [*lines, "No evaluation was recorded in the run's `eval/` folder when this model was exported.", ""]
    lines += [
        "Results recorded in the run's `eval/` folder:",
        "",
        "| protocol | top-1 | top-5 | data | split | features | settings |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        protocol = r.get("protocol") or r["file"].removesuffix(".json")
        lines.append(
            f"| {protocol} | {_fmt(r.get('top1'))} | {_fmt(r.get('top5'))} | {_fmt(r.get('data'))} | "
            f"{_fmt(r.get('test_split') or r.get('split'))} | {_fmt(r.get('features'))} | {_settings(r)} |"
        )
    return [*lines, ""]


def _encoder_name(meta: dict[str, str], backbone: dict[str, Any]) -> str:
    if meta.get("kind") != "composite":
        return str(backbone.get("name", "?"))
    described = json.loads(meta.get("extra") or "{}").get("encoder")
    return f"composite ({described})" if described else "composite"


def model_card(meta: dict[str, str], run_dir: Path) -> str:
    """The Markdown model card for an exported encoder with metadata ``meta`` from the run ``run_dir``."""
    recipe = json.loads(meta.get("recipe") or "{}")
    backbone = json.loads(meta["backbone"])
    method = meta["method"]
    paper = getattr(METHODS.get(method), "paper", "") if method in METHODS else ""
    data = recipe.get("data", {})
    source = str(data.get("source", "?"))
    trainer = recipe.get("trainer", {})
    tags = ["clcli", "self-supervised-learning", "image-feature-extraction", method]
    front: dict[str, Any] = {"library_name": "clcli", "pipeline_tag": "image-feature-extraction", "tags": tags}
    if source.startswith("hf:"):
        front["datasets"] = [source.removeprefix("hf:").split("@")[0]]
    mean, std, size = json.loads(meta["mean"]), json.loads(meta["std"]), int(meta["input_size"])
    steps = trainer.get("steps")
    schedule = f"{steps} step{'s' if steps != 1 else ''}" if steps else f"{_fmt(trainer.get('epochs'))} epochs"
    schedule += f" of batch {trainer.get('batch_size', '?')}"
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# A {method} image encoder ({_encoder_name(meta, backbone)})",
        "",
        f"A self-supervised image encoder trained with clcli's `{method}` method"
        + (f" ({paper})" if paper else "")
        + ". It maps an image to one feature vector; it has no classifier.",
        "",
        f"- encoder: {_encoder_name(meta, backbone)}",
        f"- feature dimension: {meta['feature_dim']}",
        f"- input: {size} x {size} pixels, normalised with mean {mean} and std {std}",
        "",
        "## Training",
        "",
        f"- recipe: `{recipe.get('name', '?')}`" + (f" ({recipe['description']})" if recipe.get("description") else ""),
        f"- data: `{source}` (split `{data.get('train_split', '?')}`"
        + (f", first {data['limit']} images" if data.get("limit") else "")
        + ")",
        f"- schedule: {schedule}, seed {recipe.get('seed', '?')}",
        f"- checkpoint: `{Path(meta.get('checkpoint', '?')).name}`",
        "",
        "<details><summary>The resolved recipe</summary>",
        "",
        "```yaml",
        yaml.safe_dump(recipe, sort_keys=False, width=1000).rstrip(),
        "```",
        "",
        "</details>",
        "",
        *_evaluation_section(evaluation_results(run_dir)),
        "## How to load",
        "",
        "```python",
        "import clcli, torch",
        'encoder = clcli.load_backbone("path/to/this/folder")  # eval mode; .mean, .std, .input_size',
        f"x = torch.randn(1, {backbone.get('in_channels', 3)}, {size}, {size})  # a normalised image batch",
        "features = encoder(x)  # [1, " + meta["feature_dim"] + "]",
        "```",
        "",
        "`model.safetensors` holds the weights with this metadata; `config.json` the same settings as JSON.",
    ]
    if meta.get("kind") != "composite" and str(backbone.get("name", "")).startswith("resnet"):
        depth = str(backbone["name"]).removeprefix("resnet")
        stem = (
            " after replacing `conv1` by `nn.Conv2d(3, 64, 3, 1, 1, bias=False)` and `maxpool` by `nn.Identity()`"
            if backbone.get("cifar_stem")
            else ""
        )
        lines += [
            "",
            f"The tensors load with `load_state_dict(strict=True)` into torchvision's `resnet{depth}()` whose `fc` "
            f"is `nn.Identity()`{stem}.",
        ]
    return "\n".join(lines) + "\n"
