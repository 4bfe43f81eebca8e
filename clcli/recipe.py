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
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from clcli.errors import RecipeError
from clcli.overrides import apply_overrides, parse_override  # noqa: F401  (the public names of recipe overrides)
from clcli.recipe_checks import (
    MAX_BATCH,
    MAX_BLOCKS,
    MAX_EPOCHS,
    MAX_IMAGE_SIZE,
    MAX_LIST,
    MAX_SEED,
    MAX_STEPS,
    MAX_THREADS,
    MAX_VIEW_GROUPS,
    MAX_VIEWS_PER_GROUP,
    MAX_WORKERS,
    Epochs,
    ExpTemperature,
    ImageSize,
    MemoryItems,
    Positive,
    Probability,
    SizeContext,
    UnitScale,
    cross_section_problems,
    format_validation_error,
    increasing,
    ordered,
)
from clcli.recipe_eval import FinetuneConfig, LinearSgdConfig
from clcli.recipe_files import RECIPES_DIR, read_recipe_file, recipe_names  # noqa: F401  (public names)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class StrictModel(BaseModel):
    """Base of every recipe section: unknown keys are errors, assignments are validated, floats are finite."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# --------------------------------------------------------------------------------------- data
class DataConfig(StrictModel):
    """Where the images come from.

    ``source`` is one of: ``embedded:digits`` (scikit-learn's handwritten digits, shipped with the
    package, fixed train/test split); a folder of images (class sub-folders become labels, a flat
    folder is unlabelled; ``train/`` and ``test/`` sub-folders are splits); a parquet or arrow file,
    a folder of them, or a ``save_to_disk`` folder; ``hf:NAME`` for a Hugging Face hub dataset.
    """

    source: str = Field("embedded:digits", min_length=1)
    train_split: str = Field("train", min_length=1)
    test_split: str = Field("test", min_length=1)
    image_column: str | None = None
    label_column: str | None = None
    text_column: str | None = None
    streaming: bool = Field(False, description="stream a hub dataset instead of loading it; has no sample index")
    skip_bad_images: bool = Field(False, description="count and report unreadable images instead of stopping")
    limit: int | None = Field(None, ge=1, description="use only the first N training records")
    num_workers: int = Field(
        0, ge=0, le=MAX_WORKERS, description="DataLoader worker processes (0: load in the main process)"
    )
    cache: Literal["auto", "disk", "off"] = Field(
        "auto",
        description="decode the training images once into a memory-mapped file reused across runs: auto (when they "
        "fit data.cache_budget of the available memory), disk (always), off (decode on every read)",
    )
    cache_dir: str | None = Field(
        None, description="where decoded images are kept (default $CLCLI_CACHE_DIR, else ~/.cache/clcli)"
    )
    cache_size: int | None = Field(
        None,
        ge=1,
        description="downscale training images whose longer side exceeds this (aspect kept), so that images of "
        "different sizes can be cached; applies cached or not",
    )
    cache_budget: float = Field(
        0.5, gt=0, le=1, description="auto: the largest fraction of the available memory the decoded images may take"
    )
    on_device: bool | Literal["auto"] = Field(
        "auto",
        description="hold the cached images in the training device's memory and gather batches there (batched views "
        "only); auto: on a GPU when they fit data.cache_budget of its free memory",
    )

    @field_validator("cache", mode="before")
    @classmethod
    def _cache_word(cls, value: Any) -> Any:
        """YAML reads ``off`` (and ``on``) as booleans: false is ``off``, true ``auto``."""
        return {False: "off", True: "auto"}.get(value, value) if isinstance(value, bool) else value


# -------------------------------------------------------------------------------------- views
_Jitter = Annotated[float, Field(ge=0, le=10)]


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

    name: str = Field("global", min_length=1)
    pipeline: str = "simclr"
    size: ImageSize = 32
    count: int = Field(2, ge=1, le=MAX_VIEWS_PER_GROUP)
    crop_scale: tuple[UnitScale, UnitScale] = Field((0.08, 1.0), description="area fraction of the crop: low, high")
    crop_ratio: tuple[Positive, Positive] = Field((3 / 4, 4 / 3), description="aspect ratio of the crop: low, high")
    hflip_p: Probability = 0.5
    jitter_p: Probability = 0.8
    jitter_strength: float = Field(1.0, ge=0, le=10)
    jitter: tuple[_Jitter, _Jitter, _Jitter, Annotated[float, Field(ge=0, le=0.5)]] = Field(
        (0.8, 0.8, 0.8, 0.2), description="brightness, contrast, saturation (each at most 10), hue (at most 0.5)"
    )
    grayscale_p: Probability = 0.2
    blur_p: Probability = 0.0
    blur_sigma: tuple[Positive, Positive] = Field((0.1, 2.0), description="Gaussian blur sigma: low, high")
    blur_kernel_fraction: UnitScale = 0.1
    solarize_p: Probability = 0.0
    patch_size: int = Field(8, ge=1, le=MAX_IMAGE_SIZE, description="cpc: side of each grid patch")
    patch_stride: int = Field(4, ge=1, le=MAX_IMAGE_SIZE, description="cpc: pixels between neighbouring patches")
    patch_jitter: int = Field(0, ge=0, le=MAX_IMAGE_SIZE, description="cpc: each patch moves by up to this many pixels")
    patch_color_drop_p: Probability = Field(0.0, description="cpc: keep one colour channel of a patch")

    @field_validator("crop_scale", "crop_ratio", "blur_sigma")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        ordered(v)
        return v

    @model_validator(mode="after")
    def _patches_fit(self) -> ViewGroup:
        if self.pipeline == "cpc" and self.patch_size > self.size:
            raise ValueError(
                f"patch_size ({self.patch_size}) must not exceed size ({self.size}): a patch is cut from the crop"
            )
        return self


_Std = Annotated[float, Field(ge=1e-3)]


class ViewsConfig(StrictModel):
    """Augmentation as data: a list of view groups, plus the input normalisation."""

    groups: list[ViewGroup] = Field(default_factory=lambda: [ViewGroup()], min_length=1, max_length=MAX_VIEW_GROUPS)
    mean: tuple[Probability, Probability, Probability] = Field(IMAGENET_MEAN, description="per RGB channel, in [0, 1]")
    std: tuple[_Std, _Std, _Std] = Field(IMAGENET_STD, description="per RGB channel, at least 0.001")
    eval_size: ImageSize = Field(32, description="evaluation images are resized and centre-cropped to this")
    eval_resize: ImageSize | None = Field(
        None, description="shorter side before the centre crop, at least eval_size (default: eval_size)"
    )
    backend: Literal["auto", "per_sample", "batched"] = Field(
        "auto",
        description="per_sample: views made image by image in the data loader; batched: made from the whole "
        "batch on the training device (images of one size); auto: batched where it applies and is faster",
    )

    @model_validator(mode="after")
    def _resize_covers_crop(self) -> ViewsConfig:
        if self.eval_resize is not None and self.eval_resize < self.eval_size:
            raise ValueError(
                f"eval_resize ({self.eval_resize}) must be at least eval_size ({self.eval_size}): the centre crop "
                "is cut from the resized image"
            )
        return self


# -------------------------------------------------------------------------------------- model
class BackboneConfig(StrictModel):
    """The encoder.  ``name``: resnet18, resnet34, resnet50, vit, convnet, a plug-in's, or timm:NAME."""

    name: str = "resnet18"
    cifar_stem: bool = Field(True, description="ResNet: 3x3 stride-1 first conv and no max-pool (for 32 px)")
    init: Literal["torchvision", "pytorch"] = Field(
        "torchvision",
        description="ResNet convolutions (CMC's and CPC's encoders too): torchvision (Kaiming-normal, fan-out, "
        "as the papers' code) or pytorch (each layer's own default, as lightly's and many CIFAR ResNets)",
    )
    in_channels: int = Field(3, ge=1, le=64, description="channels the backbone sees (checked against the data)")
    width: int = Field(64, ge=1, description="convnet: channels of the first block")
    image_size: ImageSize = Field(32, description="vit: size the position embeddings are built for")
    patch_size: ImageSize = 4
    dim: int = Field(192, ge=1)
    depth: int = Field(12, ge=1, le=MAX_BLOCKS)
    heads: int = Field(3, ge=1)
    mlp_ratio: float = Field(4.0, gt=0, le=1024)
    frozen_patch_embed: bool = Field(False, description="vit: keep the random patch projection fixed (MoCo v3)")
    pretrained_file: str | None = Field(
        None, description="weights a run starts from (safetensors or weights-only torch)"
    )

    @model_validator(mode="after")
    def _vit_shape(self) -> BackboneConfig:
        if self.name != "vit":
            return self
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size ({self.patch_size}) must divide image_size ({self.image_size})")
        if self.dim % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide dim ({self.dim})")
        if int(self.dim * self.mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio ({self.mlp_ratio:g}) leaves the MLP no hidden unit at dim {self.dim}")
        return self


class ModelConfig(StrictModel):
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)


# ------------------------------------------------------------------------------------- method
class MethodConfig(StrictModel):
    """Base of every method's configuration; each method subclasses it with its own fields.

    A method's configuration also says what its fields mean for the rest of the recipe:
    :meth:`recipe_problems` (rules across sections, checked when the recipe is validated),
    :meth:`backbone_channels` and :meth:`memory_items` (checked when the data is opened).
    """

    name: str = "simclr"
    sync_batchnorm: bool = Field(
        False,
        description="with several processes, batch norm over the global batch (each method's default is its paper's)",
    )
    # True when the method builds its encoders from model.backbone itself (CPC, CMC): the backbone
    # registry does not apply, the method's recipe_problems check the name.
    own_backbone: ClassVar[bool] = False

    def recipe_problems(self, recipe: Recipe) -> list[tuple[str, str]]:
        """(dotted path, message) for each rule this method sets on other sections that ``recipe`` breaks."""
        return []

    def backbone_channels(self, data_channels: int) -> int | None:
        """The channels the backbone sees when the images have ``data_channels`` (None: the method checks)."""
        return data_channels

    def memory_items(self, recipe: Recipe, sizes: SizeContext) -> MemoryItems:
        """The method's large tensors beyond the backbone, for :func:`clcli.recipe_checks.estimate_memory`."""
        return {}


# -------------------------------------------------------------------------------------- optim
_Beta = Annotated[float, Field(ge=0, lt=1)]


class OptimConfig(StrictModel):
    """Optimiser and learning-rate schedule.

    The learning rate used is ``lr`` x ``batch / reference_batch`` (``lr_scaling: linear``), its
    square root (``sqrt``), or ``lr`` as it is (``none``).  Biases and normalisation parameters are
    excluded from weight decay and from LARS adaptation when ``exclude_bias_norm`` is set.
    """

    name: Literal["sgd", "adamw", "lars"] = "sgd"
    lr: float = Field(0.03, gt=0, le=1000, description="peak learning rate before batch scaling")
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    reference_batch: int = Field(256, ge=1, le=MAX_BATCH)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    betas: tuple[_Beta, _Beta] = Field((0.9, 0.999), description="AdamW: each in [0, 1)")
    eps: float = Field(1e-8, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0, le=100)
    weight_decay_end: float | None = Field(None, ge=0, le=100, description="cosine weight-decay schedule end value")
    lars_eta: float = Field(0.001, gt=0, le=1, description="LARS trust coefficient")
    exclude_bias_norm: bool = True
    schedule: Literal["cosine", "constant", "step"] = "cosine"
    warmup_epochs: Epochs = 0.0
    warmup_start_ratio: Probability = 0.0
    final_lr_ratio: Probability = Field(0.0, description="cosine: the last step's lr as a fraction of the peak")
    milestones: list[Epochs] = Field(
        default_factory=list, max_length=MAX_LIST, description="step schedule: epochs at which lr drops, increasing"
    )
    gamma: float = Field(0.1, gt=0, le=1, description="step schedule: lr factor at each milestone")
    grad_clip: float | None = Field(None, gt=0, le=1e30, description="clip the gradient norm to this")

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, v: list[float]) -> list[float]:
        increasing(v)
        return v


# ------------------------------------------------------------------------------------ trainer
Precision = Literal["fp32", "bf16", "fp16"]


class TrainerConfig(StrictModel):
    """The training loop.

    ``reference_epochs`` is the length of the run the schedules were written for (the paper's); a
    shorter run keeps every epoch-given point (warm-up, switches) at the same fraction of the run,
    so a one-epoch run still warms up and switches on in proportion.  The papers' early-training
    safeguards are the exception: methods count them in the run's own epochs
    (:meth:`clcli.methods.base.BuildContext.first_epochs_to_steps`).
    """

    epochs: float = Field(100, gt=0, le=MAX_EPOCHS)
    steps: int | None = Field(
        None, ge=1, le=MAX_STEPS, description="stop after this many optimiser steps (overrides epochs)"
    )
    reference_epochs: float | None = Field(None, gt=0, le=MAX_EPOCHS)
    batch_size: int = Field(256, ge=2, le=MAX_BATCH)
    accumulate: int = Field(
        1, ge=1, le=MAX_BATCH, description="gradient accumulation; adds no negatives to in-batch losses"
    )
    precision: Precision = "fp32"
    channels_last: bool | Literal["auto"] = Field(
        "auto",
        description="channels-last memory format for the networks and their inputs; auto: the device's faster "
        "format (clcli.precision.use_channels_last)",
    )
    compile: bool = Field(False, description="torch.compile the method's networks (the first steps compile them)")
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints (one is always written at the end)")
    keep_checkpoints: int = Field(2, ge=1)
    online_knn_every: float | None = Field(
        None, gt=0, le=MAX_EPOCHS, description="epochs between online kNN evaluations"
    )
    threads: int | None = Field(None, ge=1, le=MAX_THREADS, description="torch CPU threads (default: torch's choice)")
    deterministic: bool = Field(
        False,
        description="deterministic CUDA kernels, so GPU runs and resumes repeat bitwise (slower); CPU runs always do",
    )
    loggers: list[Literal["jsonl", "tensorboard", "wandb"]] = Field(
        default_factory=lambda: ["jsonl", "tensorboard"],
        max_length=3,
        description="live metrics: metrics.jsonl (always written), tensorboard (RUN/tensorboard, when the package "
        "is installed), wandb (Weights & Biases, in RUN/wandb; wandb_mode online also uploads)",
    )
    wandb_project: str = Field("clcli", min_length=1, max_length=128)
    wandb_mode: Literal["offline", "online"] = "offline"


# --------------------------------------------------------------------------------------- eval
class EvalConfig(StrictModel):
    knn_k: int = Field(200, ge=1)
    knn_temperature: ExpTemperature = Field(0.1, description="weights exp(similarity / t) of the kNN vote")
    features: Literal["backbone", "embedding", "bank"] = Field(
        "backbone",
        description="bank: kNN only, the method's memory bank as the reference set; only for a method that "
        "declares bank features (InstDisc)",
    )
    batch_size: int = Field(256, ge=1, le=MAX_BATCH)
    linear_l2: list[Positive] = Field(
        default_factory=lambda: [10.0**e for e in range(-6, 1)],
        min_length=1,
        max_length=MAX_LIST,
        description="L2 penalties the linear probe chooses from on the held-out split",
    )
    linear_val_fraction: float = Field(0.1, gt=0, lt=1)
    linear_max_iter: int = Field(200, ge=1, le=100_000)
    linear_sgd: LinearSgdConfig = Field(default_factory=LinearSgdConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)


class Recipe(StrictModel):
    """A whole run: every stage's settings, resolved and validated."""

    name: str = Field("custom", min_length=1)
    description: str = ""
    seed: int = Field(0, ge=0, le=MAX_SEED)
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
    if recipe is not None and method_cfg is not None:
        problems += [f"  {path}: {msg}" for path, msg in cross_section_problems(recipe, method_cfg, method_cls)]
    if problems:
        raise RecipeError("invalid recipe:\n" + "\n".join(problems))
    assert recipe is not None and method_cfg is not None
    recipe.method = method_cfg
    return recipe


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe."""
    raw = read_recipe_file(name_or_path)
    return validate_recipe(apply_overrides(raw, overrides or []))
