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

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console

from clcli.data import ImageSource
from clcli.data.folders import ImageFiles
from clcli.errors import ClcliError
from clcli.evaluate.loader import load_for_result, open_split
from clcli.evaluate.results import timestamp, write_result
from clcli.recipe import EvalConfig, Recipe
from clcli.text.templates import fill, load_templates
from clcli.views.plain import encode_split

__all__ = [
    "ImageFiles",
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


# The template set used when neither the call nor the model names one.
DEFAULT_TEMPLATES = "imagenet"


# ---------------------------------------------------------------------------------- maths
@torch.no_grad()
def zeroshot_classifier(
    model: Any, labels: list[str], templates: list[str], *, batch_size: int | None = None
) -> torch.Tensor:
    """Classifier weights ``[len(labels), D]``: per label, the re-normalised mean of its normalised prompt embeddings.

    ``model.encode_text(list[str])`` must return L2-normalised embeddings; prompts are embedded
    ``batch_size`` at a time (default: ``eval.batch_size``'s default).
    """
    batch_size = batch_size or EvalConfig().batch_size
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
    recipe: Recipe,
    *,
    device: torch.device,
    batch_size: int | None = None,
    interpolation: str = "bilinear",
    show_progress: bool = False,
    console: Console | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[N, C]`` (logit scale x cosine similarity) of every readable image, and their indices.

    Images are read and prepared by the evaluation path (:func:`clcli.views.plain.encode_split`:
    the recipe's evaluation transform with ``interpolation``, normalisation, precision and loader
    settings, ``batch_size`` defaulting to ``eval.batch_size``) and embedded by
    ``model.encode_image``.
    """
    emb, kept = encode_split(
        model,
        model.encode_image,
        source,
        recipe,
        device=device,
        out_device=device,
        batch_size=batch_size,
        interpolation=interpolation,
        show_progress=show_progress,
        console=console,
        description="zero-shot",
    )
    scale = float(model.logit_scale_value())
    logits = scale * F.normalize(emb, dim=-1) @ classifier.to(device=device, dtype=emb.dtype).t()
    return logits.cpu(), kept.cpu()


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
    to ``output`` (default ``RUN/eval/zeroshot.json`` for a run).  Images and prompts are embedded
    ``batch_size`` at a time (default: the recipe's ``eval.batch_size``; for a file, its default).
    """
    if (images is None) == (data is None):
        raise ClcliError("give exactly one of --images PATH (a file or folder of images) and --data SPEC")
    if top_k < 1:
        raise ClcliError(f"--top-k must be at least 1, got {top_k}")
    if calibrate not in CALIBRATIONS:
        raise ClcliError(f"--calibrate must be one of {', '.join(CALIBRATIONS)}, got {calibrate!r}")
    label_list = read_labels(labels, labels_file) if (labels is not None or labels_file is not None) else None
    loaded, out = load_for_result(
        "zeroshot",
        run_dir,
        checkpoint,
        output,
        text=True,
        vocab=vocab,
        trust_torchscript=trust_torchscript,
        activation=activation,
    )
    model, recipe = loaded.model, loaded.recipe

    source: ImageSource
    if images is not None:
        source = ImageFiles(images)
        spec = str(images)
    else:
        assert data is not None
        split = split or recipe.data.test_split
        source = open_split(recipe, data, split, limit, labelled=False)
        spec = data
    if label_list is None:
        if not source.classes:
            raise ClcliError("give the labels to choose from: --labels cat,dog,ship or --labels-file FILE")
        label_list = list(source.classes)
    template_spec = templates
    if template_spec is None:
        template_spec = loaded.zeroshot_templates or DEFAULT_TEMPLATES
    template_list = load_templates(template_spec)

    bs = batch_size or recipe.eval.batch_size
    classifier = zeroshot_classifier(model, label_list, template_list, batch_size=bs)
    logits, kept = zeroshot_scores(
        model,
        source,
        classifier,
        recipe,
        device=loaded.device,
        batch_size=bs,
        interpolation=loaded.interpolation,
        show_progress=show_progress,
        console=console,
    )
    logits = calibrate_scores(logits, calibrate)
    probs = logits.softmax(dim=1)
    k = min(top_k, len(label_list))
    result: dict[str, Any] = {
        "protocol": "zeroshot",
        **loaded.describe(),
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
    result["evaluated"] = timestamp()
    return write_result(result, out)
