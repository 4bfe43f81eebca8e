"""Zero-shot classification from label text (Radford et al. 2021, arXiv:2103.00020, section 3.1).

For each label, every prompt template is filled with it ("a photo of a {}."), the prompts are
embedded by the text tower, each embedding is L2-normalised, the label's embeddings are averaged
and the mean re-normalised (prompt ensembling, section 3.1.4): these vectors are the weights of a
linear classifier over L2-normalised image embeddings, scaled by the model's logit scale; a
softmax gives probabilities.  Labels are embedded in batches, so thousands of labels with 80
templates each fit in memory.

The model is a trained CLIP run (``--run``) or a pretrained checkpoint in the OpenAI / open_clip
layout with CLIP's BPE vocabulary (``--checkpoint FILE --vocab FILE``, see
:mod:`clcli.models.clip_import`).  Images come from a folder or file (``--images``: each image
gets its top predictions) or from a data spec (``--data``: when it is labelled, top-1 / top-5
accuracy and a per-class table; the data's class names are matched to the labels by name, or by
position when the names are not among the labels but the counts agree).

Calibration (``--calibrate zscore``, off by default) is for classifying a whole collection of
images from a mix of classes: a model trained on some of the labels scores those labels high on
every image, so images of labels it never trained on are pulled to the trained ones (the bias of
generalised zero-shot learning, Chao et al. 2016, arXiv:1605.04253).  Standardising each label's
scores over the collection (subtract the label's mean, divide by its standard deviation, then
restore the overall mean and spread so probabilities keep their scale) removes that per-label
offset without knowing which labels were trained.  It assumes the collection holds many images
and no label dominates; on a handful of images, or images of one class, leave it off.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console

from clcli.data import ImageSource
from clcli.data.folders import ImageFiles
from clcli.errors import BadImageError, CheckpointError, ClcliError, DataError
from clcli.precision import use_bf16
from clcli.text.templates import fill, load_templates
from clcli.views.pipelines import eval_pipeline
from clcli.views.plain import plain_loader, split_progress

__all__ = [
    "ImageFiles",
    "Preprocess",
    "read_labels",
    "zeroshot",
    "zeroshot_classifier",
    "zeroshot_scores",
]


# ---------------------------------------------------------------------------------- inputs
def read_labels(labels: str | list[str] | None = None, labels_file: str | Path | None = None) -> list[str]:
    """Labels from a comma-separated string (or list) and / or a file with one label per line.

    Blank lines and lines starting with ``#`` in the file are skipped; surrounding spaces are
    stripped.  An empty result and duplicate labels are errors.
    """
    out: list[str] = []
    if labels is not None:
        items = labels.split(",") if isinstance(labels, str) else list(labels)
        out += [s.strip() for s in items if s.strip()]
        if not out and labels_file is None:
            raise ClcliError("--labels is empty: give class names separated by commas, e.g. --labels cat,dog,ship")
    if labels_file is not None:
        path = Path(labels_file).expanduser()
        if not path.is_file():
            raise ClcliError(f"label file {path} does not exist")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ClcliError(f"cannot read the label file {path}: {exc}") from None
        found = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
        if not found:
            raise ClcliError(f"the label file {path} holds no labels (one label per line)")
        out += found
    seen: set[str] = set()
    for label in out:
        if label.lower() in seen:
            raise ClcliError(f"label {label!r} is given twice")
        seen.add(label.lower())
    return out


@dataclass
class Preprocess:
    """How images become model input: resize the shorter side, centre crop, normalise."""

    size: int
    resize: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    bf16: bool = False

    def transform(self) -> Any:
        return eval_pipeline(self.size, self.resize, self.interpolation)


# ---------------------------------------------------------------------------------- maths
@torch.no_grad()
def zeroshot_classifier(model: Any, labels: list[str], templates: list[str], *, batch_size: int = 256) -> torch.Tensor:
    """Classifier weights ``[len(labels), D]``: per label, the re-normalised mean of its normalised prompt embeddings.

    ``model.encode_text(list[str])`` must return L2-normalised embeddings; prompts are embedded
    ``batch_size`` at a time.
    """
    if not labels:
        raise ClcliError("zero-shot classification needs at least one label")
    if not templates:
        raise ClcliError("zero-shot classification needs at least one template")
    prompts = [fill(t, label) for label in labels for t in templates]
    chunks = []
    for start in range(0, len(prompts), batch_size):
        emb = model.encode_text(prompts[start : start + batch_size]).float()
        chunks.append(F.normalize(emb, dim=-1).cpu())
    emb = torch.cat(chunks).reshape(len(labels), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)


@torch.no_grad()
def zeroshot_scores(
    model: Any,
    source: ImageSource,
    classifier: torch.Tensor,
    preprocess: Preprocess,
    *,
    device: torch.device,
    batch_size: int = 256,
    num_workers: int = 0,
    skip_bad_images: bool = False,
    show_progress: bool = False,
    console: Console | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[N, C]`` (logit scale x cosine similarity) of every readable image, and their indices."""
    loader = plain_loader(
        source, preprocess.transform(), batch_size=batch_size, num_workers=num_workers, skip_bad=skip_bad_images
    )
    mean = torch.tensor(preprocess.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(preprocess.std, device=device).view(1, -1, 1, 1)
    weights = classifier.to(device)
    scale = float(model.logit_scale_value())
    logits, kept = [], []
    progress = split_progress("zero-shot", show=show_progress, console=console)
    bf16 = preprocess.bf16 and use_bf16("bf16", device)
    with progress:
        task = progress.add_task("zero-shot", total=len(source))
        for images, idx in loader:
            if images is not None:
                x = (images.to(device).float() / 255.0 - mean) / std
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    emb = model.encode_image(x)
                logits.append((scale * F.normalize(emb.float(), dim=-1) @ weights.t()).cpu())
                kept.append(idx)
            progress.advance(task, batch_size)
    if not logits:
        raise BadImageError(source.spec, "no readable image")
    return torch.cat(logits), torch.cat(kept)


CALIBRATIONS = ("none", "zscore")


def calibrate_scores(logits: torch.Tensor, how: str = "zscore") -> torch.Tensor:
    """Per-label standardisation of ``[N, C]`` logits over the N images (see the module docstring).

    Each column becomes ``(s - mean_c) / std_c * std + mean`` where ``mean_c`` and ``std_c`` are the
    column's statistics and ``mean`` and ``std`` their averages over the columns; ``none`` returns
    the logits unchanged.
    """
    if how == "none":
        return logits
    if how != "zscore":
        raise ClcliError(f"--calibrate must be one of {', '.join(CALIBRATIONS)}, got {how!r}")
    if logits.shape[0] < 2:
        raise ClcliError("--calibrate zscore standardises each label over the images: it needs at least 2 images")
    x = logits.double()
    mean, std = x.mean(dim=0), x.std(dim=0).clamp_min(1e-12)
    return ((x - mean) / std * std.mean() + mean.mean()).to(logits.dtype)


def _match_classes(data_classes: list[str], present: list[int], labels: list[str]) -> tuple[dict[int, int], str]:
    """For each data class present in the images, the index of its label; and how they were matched."""

    def key(s: str) -> str:
        return " ".join(s.replace("_", " ").lower().split())

    index = {key(label): i for i, label in enumerate(labels)}
    if all(key(data_classes[c]) in index for c in present):
        return {c: index[key(data_classes[c])] for c in present}, "by name"
    if len(data_classes) == len(labels):
        return {c: c for c in present}, "by position (the data's class names are not among the labels)"
    absent = [data_classes[c] for c in present if key(data_classes[c]) not in index]
    raise ClcliError(
        f"the data's classes cannot be matched to the labels: {', '.join(absent[:8])} "
        f"{'is' if len(absent) == 1 else 'are'} not among the {len(labels)} labels, and the data has "
        f"{len(data_classes)} classes; give every class name as a label (or exactly one label per class, in order)"
    )


# ---------------------------------------------------------------------------------- model
def _load_model(
    run_dir: Path | None,
    checkpoint: Path | None,
    vocab: Path | None,
    trust_torchscript: bool,
    activation: str,
) -> tuple[Any, Any, Preprocess, dict[str, Any]]:
    """(model, recipe or None, preprocess, description) for a run or an imported checkpoint file."""
    if run_dir is not None:
        from clcli.assemble import load_run

        recipe, method, ckpt_path = load_run(Path(run_dir), checkpoint)
        if not (hasattr(method, "encode_text") and hasattr(method, "encode_image")):
            raise ClcliError(
                f"{run_dir} was trained with {recipe.method.name}, which has no text tower; zero-shot "
                "classification needs a CLIP run (or --checkpoint FILE --vocab FILE for a pretrained CLIP)"
            )
        v = recipe.views
        pre = Preprocess(
            v.eval_size, v.eval_resize, tuple(v.mean), tuple(v.std), "bilinear", recipe.trainer.precision == "bf16"
        )
        return method, recipe, pre, {"run": str(run_dir), "checkpoint": str(ckpt_path), "method": recipe.method.name}
    if checkpoint is None:
        raise ClcliError("give --run RUN (a trained CLIP run) or --checkpoint FILE (a pretrained CLIP checkpoint)")
    from clcli.models.clip_import import load_clip

    if activation not in ("gelu", "quick_gelu"):
        raise ClcliError(f"--activation must be 'quick_gelu' or 'gelu', got {activation!r}")
    model = load_clip(checkpoint, vocab=vocab, trust_torchscript=trust_torchscript, activation=activation)  # type: ignore[arg-type]
    if model.tokenizer is None:
        raise CheckpointError(
            "an imported CLIP needs its BPE vocabulary: give --vocab bpe_simple_vocab_16e6.txt.gz "
            "(it ships with the open_clip package)"
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    p = model.preprocess
    pre = Preprocess(p["size"], p["resize"], tuple(p["mean"]), tuple(p["std"]), p["interpolation"], False)
    info = {"checkpoint": str(checkpoint), "vocab": str(model.tokenizer.path), "activation": activation}
    return model, None, pre, info


# ---------------------------------------------------------------------------------- entry
def zeroshot(
    run_dir: Path | None = None,
    *,
    checkpoint: Path | None = None,
    vocab: Path | None = None,
    trust_torchscript: bool = False,
    activation: str = "quick_gelu",
    labels: str | list[str] | None = None,
    labels_file: Path | None = None,
    templates: str | list[str] | None = None,
    images: Path | None = None,
    data: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    top_k: int = 5,
    predictions: bool | None = None,
    calibrate: str = "none",
    batch_size: int | None = None,
    output: Path | None = None,
    console: Console | None = None,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Zero-shot classification of ``images`` (a file or folder) or ``data`` (a spec) from label text.

    Returns a dict with the labels, templates used and, for labelled data, ``top1``, ``top5`` and
    ``per_class``; ``predictions`` (each image's ``top_k`` labels with probabilities) for unlabelled
    images, or for labelled data when ``predictions`` is true.  The result is also written as JSON
    to ``output`` (default ``RUN/eval/zeroshot.json`` for a run).
    """
    if (images is None) == (data is None):
        raise ClcliError("give exactly one of --images PATH (a file or folder of images) and --data SPEC")
    if top_k < 1:
        raise ClcliError(f"--top-k must be at least 1, got {top_k}")
    if calibrate not in CALIBRATIONS:
        raise ClcliError(f"--calibrate must be one of {', '.join(CALIBRATIONS)}, got {calibrate!r}")
    label_list = read_labels(labels, labels_file) if (labels is not None or labels_file is not None) else None
    model, recipe, pre, info = _load_model(run_dir, checkpoint, vocab, trust_torchscript, activation)
    device = next(model.parameters()).device

    source: ImageSource
    if images is not None:
        source = ImageFiles(images)
        spec = str(images)
    else:
        from clcli.data.sources import limit_source, open_data
        from clcli.recipe import DataConfig

        data_cfg = recipe.data if recipe is not None else DataConfig()
        split = split or (recipe.data.test_split if recipe is not None else "test")
        opened = open_data(data, split, data_cfg, streaming=False)
        if not isinstance(opened, ImageSource):
            raise DataError(f"{data} split {split!r} cannot be classified as a stream")
        source = limit_source(opened, limit)
        spec = data
    if label_list is None:
        if not source.classes:
            raise ClcliError("give the labels to choose from: --labels cat,dog,ship or --labels-file FILE")
        label_list = list(source.classes)
    template_spec = templates
    if template_spec is None:
        template_spec = getattr(getattr(recipe, "method", None), "zeroshot_templates", None) or "imagenet"
    template_list = load_templates(template_spec)

    bs = batch_size or (recipe.eval.batch_size if recipe is not None else 128)
    classifier = zeroshot_classifier(model, label_list, template_list, batch_size=bs)
    logits, kept = zeroshot_scores(
        model,
        source,
        classifier,
        pre,
        device=device,
        batch_size=bs,
        num_workers=recipe.data.num_workers if recipe is not None else 0,
        skip_bad_images=recipe.data.skip_bad_images if recipe is not None else False,
        show_progress=show_progress,
        console=console,
    )
    logits = calibrate_scores(logits, calibrate)
    probs = logits.softmax(dim=1)
    k = min(top_k, len(label_list))
    result: dict[str, Any] = {
        "protocol": "zeroshot",
        **info,
        "data": spec,
        "split": split if data is not None else None,
        "images": int(kept.numel()),
        "skipped_images": int(len(source) - kept.numel()),
        "labels": label_list,
        "templates": template_list if len(template_list) <= 3 else f"{template_spec} ({len(template_list)} templates)",
        "num_templates": len(template_list),
        "logit_scale": float(model.logit_scale_value()),
        "calibrate": calibrate,
    }
    data_labels = source.labels()
    labelled = data_labels is not None and source.classes is not None
    if labelled:
        assert data_labels is not None and source.classes is not None
        valid = (data_labels[kept] >= 0) & (data_labels[kept] < len(source.classes))
        data_truth = data_labels[kept][valid]
        present = sorted(set(data_truth.tolist()))
        mapping, how = _match_classes(list(source.classes), present, label_list)
        lookup = torch.full((len(source.classes),), -1, dtype=torch.long)
        for c, j in mapping.items():
            lookup[c] = j
        truth, lg = lookup[data_truth], logits[valid]
        top = lg.topk(min(5, len(label_list)), dim=1).indices
        hits = top == truth[:, None]
        rank = (lg > lg.gather(1, truth[:, None])).sum(dim=1) + 1
        result["matched"] = how
        result["top1"] = hits[:, 0].double().mean().item() if len(truth) else float("nan")
        result["top5"] = hits.any(dim=1).double().mean().item() if len(truth) else float("nan")
        result["mean_rank"] = rank.double().mean().item() if len(truth) else float("nan")
        per_class = []
        for c in present:
            sel = data_truth == c
            per_class.append(
                {
                    "class": source.classes[c],
                    "label": label_list[mapping[c]],
                    "images": int(sel.sum()),
                    "top1": hits[sel, 0].double().mean().item(),
                    "top5": hits[sel].any(dim=1).double().mean().item(),
                    "mean_rank": rank[sel].double().mean().item(),
                }
            )
        result["per_class"] = per_class
    if not labelled or predictions:
        p, idx = probs.topk(k, dim=1)
        result["predictions"] = [
            {
                "image": source.describe(int(i)),
                "top": [{"label": label_list[int(j)], "probability": float(q)} for q, j in zip(pp, ii, strict=True)],
            }
            for i, pp, ii in zip(kept.tolist(), p, idx, strict=True)
        ]
    result["evaluated"] = datetime.now(UTC).isoformat(timespec="seconds")
    out = Path(output) if output else (Path(run_dir) / "eval" / "zeroshot.json" if run_dir is not None else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        result["output"] = str(out)
    return result
