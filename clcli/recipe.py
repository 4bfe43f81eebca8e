"""The recipe: one validated description of a run.

A recipe is a YAML file with one section per pipeline stage (``data``, ``views``, ``model``,
``method``, ``optim``, ``trainer``, ``eval``).  Every default lives in the pydantic models below;
unknown keys and wrong types are errors that name the field's dotted path and, where there is a
closed set, the allowed values.  ``--set section.key=value`` overrides are applied to the raw
mapping and validated the same way.

The ``method`` section is validated by the configuration class of the method it names (found
through :mod:`clcli.registry`), so a plug-in method brings its own fields.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, model_validator

from clcli.errors import RecipeError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _recipes_dir() -> Path:
    """Built-in recipes: packaged as ``clcli/recipes`` when installed, ``recipes/`` in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "recipes", here.parent / "recipes"):
        if candidate.is_dir():
            return candidate
    return here.parent / "recipes"


RECIPES_DIR = _recipes_dir()


class StrictModel(BaseModel):
    """Base of every recipe section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------- data
class DataConfig(StrictModel):
    """Where the images come from.

    ``source`` is one of: ``embedded:digits`` (scikit-learn's handwritten digits, shipped with the
    package, fixed train/test split); a folder of images (class sub-folders become labels, a flat
    folder is unlabelled; ``train/`` and ``test/`` sub-folders are splits); a parquet or arrow file,
    a folder of them, or a ``save_to_disk`` folder; ``hf:NAME`` for a Hugging Face hub dataset.
    """

    source: str = "embedded:digits"
    train_split: str = "train"
    test_split: str = "test"
    image_column: str | None = None
    label_column: str | None = None
    text_column: str | None = None
    streaming: bool = Field(False, description="stream a hub dataset instead of loading it; has no sample index")
    skip_bad_images: bool = Field(False, description="count and report unreadable images instead of stopping")
    limit: int | None = Field(None, ge=1, description="use only the first N training records")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes (0: load in the main process)")


# -------------------------------------------------------------------------------------- views
class ViewGroup(StrictModel):
    """One group of augmented views: ``count`` crops of ``size`` pixels from one pipeline.

    The ``simclr`` pipeline is: random resized crop (``crop_scale``, ``crop_ratio``), horizontal
    flip, colour jitter with probability ``jitter_p`` and strengths ``jitter`` x
    ``jitter_strength`` (brightness, contrast, saturation, hue), grayscale, Gaussian blur
    (kernel ``blur_kernel_fraction`` of the size), solarisation.

    The ``cpc`` pipeline (CPC, arXiv:1807.03748 / 1905.09272) crops and flips the image to
    ``size`` as above, then cuts it into an overlapping grid of ``patch_size`` patches every
    ``patch_stride`` pixels; per patch it applies spatial jitter (``patch_jitter`` pixels), colour
    jitter (``jitter_p``, ``jitter`` x ``jitter_strength``), grayscale (``grayscale_p``) and colour
    dropping (``patch_color_drop_p``).
    """

    name: str = "global"
    pipeline: str = "simclr"
    size: int = Field(32, ge=1)
    count: int = Field(2, ge=1)
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_p: float = Field(0.5, ge=0, le=1)
    jitter_p: float = Field(0.8, ge=0, le=1)
    jitter_strength: float = Field(1.0, ge=0)
    jitter: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2)
    grayscale_p: float = Field(0.2, ge=0, le=1)
    blur_p: float = Field(0.0, ge=0, le=1)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_fraction: float = Field(0.1, gt=0, le=1)
    solarize_p: float = Field(0.0, ge=0, le=1)
    patch_size: int = Field(8, ge=1, description="cpc: side of each grid patch")
    patch_stride: int = Field(4, ge=1, description="cpc: pixels between neighbouring patches")
    patch_jitter: int = Field(0, ge=0, description="cpc: each patch moves by up to this many pixels")
    patch_color_drop_p: float = Field(0.0, ge=0, le=1, description="cpc: keep one colour channel of a patch")


class ViewsConfig(StrictModel):
    """Augmentation as data: a list of view groups, plus the input normalisation."""

    groups: list[ViewGroup] = Field(default_factory=lambda: [ViewGroup()])
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    eval_size: int = Field(32, ge=1, description="evaluation images are resized and centre-cropped to this")
    eval_resize: int | None = Field(None, description="shorter side before the centre crop (default: eval_size)")

    @model_validator(mode="after")
    def _non_empty(self) -> ViewsConfig:
        if not self.groups:
            raise ValueError("views.groups needs at least one view group")
        return self


# -------------------------------------------------------------------------------------- model
class BackboneConfig(StrictModel):
    """The encoder.  ``name`` is a registered backbone: resnet18, resnet34, resnet50, vit, convnet."""

    name: str = "resnet18"
    cifar_stem: bool = Field(True, description="ResNet: 3x3 stride-1 first conv and no max-pool (for 32 px)")
    init: Literal["torchvision", "pytorch"] = Field(
        "torchvision",
        description="ResNet convolutions (CMC's and CPC's encoders too): torchvision (Kaiming-normal, fan-out, "
        "as the papers' code) or pytorch (each layer's own default, as lightly's and many CIFAR ResNets)",
    )
    in_channels: int = Field(3, ge=1)
    width: int = Field(64, ge=1, description="convnet: channels of the first block")
    image_size: int = Field(32, ge=1, description="vit: size the position embeddings are built for")
    patch_size: int = Field(4, ge=1)
    dim: int = Field(192, ge=1)
    depth: int = Field(12, ge=1)
    heads: int = Field(3, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    frozen_patch_embed: bool = Field(False, description="vit: keep the random patch projection fixed (MoCo v3)")


class ModelConfig(StrictModel):
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)


# ------------------------------------------------------------------------------------- method
class MethodConfig(StrictModel):
    """Base of every method's configuration; each method subclasses it with its own fields."""

    name: str = "simclr"
    sync_batchnorm: bool = Field(
        False,
        description="with several processes, batch norm over the global batch (each method's default is its paper's)",
    )


# -------------------------------------------------------------------------------------- optim
class OptimConfig(StrictModel):
    """Optimiser and learning-rate schedule.

    The learning rate used is ``lr`` x ``batch / reference_batch`` (``lr_scaling: linear``), its
    square root (``sqrt``), or ``lr`` as it is (``none``).  Biases and normalisation parameters are
    excluded from weight decay and from LARS adaptation when ``exclude_bias_norm`` is set.
    """

    name: Literal["sgd", "adamw", "lars"] = "sgd"
    lr: float = Field(0.03, gt=0)
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    reference_batch: int = Field(256, ge=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    weight_decay_end: float | None = Field(None, ge=0, description="cosine weight-decay schedule end value")
    lars_eta: float = Field(0.001, gt=0, description="LARS trust coefficient")
    exclude_bias_norm: bool = True
    schedule: Literal["cosine", "constant", "step"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    warmup_start_ratio: float = Field(0.0, ge=0, le=1)
    final_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine: the last step's lr as a fraction of the peak")
    milestones: list[float] = Field(default_factory=list, description="step schedule: epochs at which lr drops")
    gamma: float = Field(0.1, gt=0)
    grad_clip: float | None = Field(None, gt=0, description="clip the gradient norm to this")


# ------------------------------------------------------------------------------------ trainer
Precision = Literal["fp32", "bf16"]


class TrainerConfig(StrictModel):
    """The training loop.

    ``reference_epochs`` is the length of the run the schedules were written for (the paper's); a
    shorter run keeps every epoch-given point (warm-up, switches) at the same fraction of the run,
    so a one-epoch run still warms up and switches on in proportion.  The papers' early-training
    safeguards are the exception: methods count them in the run's own epochs
    (:meth:`clcli.methods.base.BuildContext.first_epochs_to_steps`).
    """

    epochs: float = Field(100, gt=0)
    steps: int | None = Field(None, ge=1, description="stop after this many optimiser steps (overrides epochs)")
    reference_epochs: float | None = Field(None, gt=0)
    batch_size: int = Field(256, ge=2)
    accumulate: int = Field(1, ge=1, description="gradient accumulation; adds no negatives to in-batch losses")
    precision: Precision = "fp32"
    channels_last: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints (one is always written at the end)")
    keep_checkpoints: int = Field(2, ge=1)
    online_knn_every: float | None = Field(None, gt=0, description="epochs between online kNN evaluations")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")
    deterministic: bool = Field(
        False,
        description="deterministic CUDA kernels, so GPU runs and resumes repeat bitwise (slower); CPU runs always do",
    )


# --------------------------------------------------------------------------------------- eval
class EvalConfig(StrictModel):
    knn_k: int = Field(200, ge=1)
    knn_temperature: float = Field(0.1, gt=0)
    features: Literal["backbone", "embedding", "bank"] = Field(
        "backbone",
        description="bank: kNN only, the method's memory bank as the reference set; only for a method that "
        "declares bank features (InstDisc)",
    )
    batch_size: int = Field(256, ge=1)
    linear_l2: list[float] = Field(default_factory=lambda: [10.0**e for e in range(-6, 1)])
    linear_val_fraction: float = Field(0.1, gt=0, lt=1)
    linear_max_iter: int = Field(200, ge=1)


class Recipe(StrictModel):
    """A whole run: every stage's settings, resolved and validated."""

    name: str = "custom"
    description: str = ""
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    views: ViewsConfig = Field(default_factory=ViewsConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: SerializeAsAny[MethodConfig] = Field(default_factory=MethodConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def digest(self) -> str:
        """sha256 of the canonical JSON of the resolved recipe (a run's identity)."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------------- validation
def _allowed_keys(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> list[str] | None:
    """The field names allowed at ``loc`` (for 'unknown key' errors)."""
    from typing import get_args, get_origin

    cur: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)):
            return None
        field = cur.model_fields.get(part)
        if field is None:
            return sorted(cur.model_fields)
        ann = field.annotation
        while get_origin(ann) is not None and not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            args = [a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
            ann = args[0] if args else None
        cur = ann
    return None


def format_validation_error(err: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join(str(p) for p in ((prefix,) if prefix else ()) + loc)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc[:-1] + (loc[-1],))
            msg = "unknown key"
            if allowed:
                msg += f" (allowed: {', '.join(allowed)})"
        elif "input" in e and e["type"] not in ("missing",):
            inp = e["input"]
            if not isinstance(inp, dict | list):
                msg += f" (got {inp!r})"
        lines.append(f"  {path or '<recipe>'}: {msg}")
    return "\n".join(lines)


def _method_class(name: str) -> Any:
    """The method class registered as ``name`` (its ``config_class`` validates the method section)."""
    from clcli.registry import METHODS

    return METHODS.get(name)


def validate_recipe(raw: dict[str, Any]) -> Recipe:
    """Validate a raw mapping into a :class:`Recipe`, or raise :class:`RecipeError`."""
    if not isinstance(raw, dict):
        raise RecipeError("a recipe must be a mapping of sections (data, views, model, method, optim, trainer, eval)")
    raw = copy.deepcopy(raw)
    method_raw = raw.pop("method", {}) or {}
    problems: list[str] = []
    method_cfg: MethodConfig | None = None
    method_cls: Any = None
    if not isinstance(method_raw, dict):
        problems.append("  method: should be a mapping with at least 'name'")
    else:
        name = method_raw.get("name", MethodConfig().name)
        try:
            method_cls = _method_class(str(name))
        except RecipeError as exc:
            problems.append(f"  method.name: {exc}")
        else:
            cls = method_cls.config_class
            try:
                method_cfg = cls.model_validate(method_raw)
            except ValidationError as exc:
                problems.append(format_validation_error(exc, cls, "method"))
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        problems.append(format_validation_error(exc, Recipe))
        recipe = None
    bank = recipe is not None and recipe.eval.features == "bank"
    if bank and method_cls is not None and not method_cls.has_bank_features:
        problems.append(
            f"  eval.features: bank needs a method with a memory bank (instdisc); {name} has none "
            "(use backbone or embedding)"
        )
    if problems:
        raise RecipeError("invalid recipe:\n" + "\n".join(problems))
    assert recipe is not None and method_cfg is not None
    recipe.method = method_cfg
    return recipe


def parse_override(item: str) -> tuple[list[str], Any]:
    """``'optim.lr=0.1'`` -> (['optim', 'lr'], 0.1); the value is read as YAML."""
    if "=" not in item:
        raise RecipeError(f"override {item!r} should look like section.key=value")
    key, _, value = item.partition("=")
    if not key.strip():
        raise RecipeError(f"override {item!r} has no key")
    path = [p.strip() for p in key.strip().split(".")]
    if not all(path):
        raise RecipeError(
            f"override {item!r}: the key {key.strip()!r} has an empty part (two dots, or a dot at an end)"
        )
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        raise RecipeError(f"override {item!r}: cannot read the value: {' '.join(str(exc).split())}") from None
    return path, parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for item in overrides:
        path, value = parse_override(item)
        cur: Any = raw
        for i, part in enumerate(path[:-1]):
            if isinstance(cur, list):
                if not part.isdigit() or int(part) >= len(cur):
                    raise RecipeError(f"override {item!r}: {'.'.join(path[: i + 1])} is not an index of the list")
                cur = cur[int(part)]
                continue
            if not isinstance(cur, dict):
                raise RecipeError(f"override {item!r}: {'.'.join(path[:i])} is not a section")
            if part not in cur or cur[part] is None:
                cur[part] = {}
            cur = cur[part]
        last = path[-1]
        if isinstance(cur, list):
            if not last.isdigit() or int(last) >= len(cur):
                raise RecipeError(f"override {item!r}: {last} is not an index of the list")
            cur[int(last)] = value
        elif isinstance(cur, dict):
            cur[last] = value
        else:
            raise RecipeError(f"override {item!r}: {'.'.join(path[:-1])} is not a section")
    return raw


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def read_recipe_file(name_or_path: str | Path) -> dict[str, Any]:
    """The raw mapping of a built-in recipe (by name) or of a YAML file (by path)."""
    text_path = Path(name_or_path)
    if text_path.suffix in (".yaml", ".yml") or text_path.exists():
        path = text_path
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist")
    else:
        path = RECIPES_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise RecipeError(f"unknown recipe {str(name_or_path)!r}; built-in recipes: {', '.join(recipe_names())}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path} must be a mapping of sections")
    raw.setdefault("name", path.stem)
    return raw


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe."""
    raw = read_recipe_file(name_or_path)
    return validate_recipe(apply_overrides(raw, overrides or []))
