"""The method interface: what the trainer, evaluation and export know about any method.

A method is an ``nn.Module`` that owns its networks and its state (memory bank, queue, momentum
encoder, prototypes, centre) as parameters and buffers, so ``state_dict()`` is its whole state
and checkpoints restore it exactly.  It turns one batch of views into a loss, says which
parameters go in which optimiser group, and does its own per-step bookkeeping (EMA updates,
re-normalisation) in :meth:`Method.after_step`.  Nothing about a particular method lives here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from clcli.errors import CheckpointError, ClcliError
from clcli.methods.health import collapse_measures
from clcli.recipe import MethodConfig, Recipe, validate_recipe
from clcli.schedules import steps_for_epochs


@dataclass
class Batch:
    """One training batch, already on the device.

    ``views``: one float tensor [B, ..., C, H, W] per view, normalised, in the recipe's declared
    order (a patch-grid view has extra dimensions before C); ``view_names``: the group name of each
    view; ``index``: each image's sample index in the training set (int64 [B]; -1 for a streaming
    source); ``label``: int64 [B], -1 when unlabelled; ``text``: the images' captions when the
    method asks for them (``needs_text``), else None.
    """

    views: list[torch.Tensor]
    view_names: list[str]
    index: torch.Tensor
    label: torch.Tensor
    text: list[str | None] | None = None

    @property
    def size(self) -> int:
        return int(self.index.shape[0])


@dataclass
class StepOutput:
    """What a training step gives the trainer.

    ``metrics``: numbers or detached scalar tensors, logged as they are; ``health``: detached
    tensors (``embedding``: [B, D], or a method's own) kept until the trainer writes a record,
    when :meth:`Method.health` turns them into numbers; no step computes or waits for them.
    """

    loss: torch.Tensor
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)
    health: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class ParamGroup:
    """Parameters with shared optimiser treatment.

    Biases and normalisation parameters are split off by the engine (no weight decay, no LARS
    adaptation) when the recipe says so; ``fixed_lr`` keeps the group at the peak learning rate
    (SimSiam's predictor); ``lr_scale`` multiplies the scheduled rate.
    """

    name: str
    params: list[nn.Parameter]
    fixed_lr: bool = False
    lr_scale: float = 1.0
    weight_decay: bool = True


@dataclass
class BuildContext:
    """What a method may know about the run when it is built."""

    recipe: Recipe
    build_backbone: Callable[[], nn.Module]
    dataset_size: int | None
    num_classes: int | None
    steps_per_epoch: int
    total_steps: int
    epochs_to_steps: Callable[[float], int]
    device: torch.device
    train_source: Any = None  # the ImageSource being trained on (None when streaming or rebuilding for eval)
    class_names: list[str] | None = None

    def first_epochs_to_steps(self, epochs: float) -> int:
        """The steps of this run's first ``epochs`` epochs, counted as they are.

        For the papers' early-training safeguards (SwAV's prototype freeze and queue start, DINO's
        last-layer freeze and teacher-temperature warm-up): they protect the network's first steps, so unlike
        :attr:`epochs_to_steps` they are not shrunk when the run is shorter than the recipe's
        ``trainer.reference_epochs``.  Not capped at the run's length.  The rounding is the run
        plan's (:func:`clcli.schedules.steps_for_epochs`, without a reference length).
        """
        return steps_for_epochs(epochs, self.steps_per_epoch)


class Method(nn.Module):
    """Base class of every method; subclasses set ``config_class`` and implement :meth:`training_step`.

    Optional capabilities that shared code relies on are declared here with their defaults; a
    method that has one sets its flag and overrides the matching methods:

    * ``needs_index``: per-image state addressed by sample index (memory banks, pseudo-labels);
      such a method refuses a streaming source, and its checkpoint records the dataset size.
    * ``needs_text``: the batch carries the images' captions (CLIP).
    * ``has_bank_features``: :meth:`bank_features` returns one row per training image, the
      reference set of ``eval.features: bank`` (kNN only; InstDisc, arXiv:1805.01978).
    * ``has_text_tower``: :meth:`encode_image`, :meth:`encode_text` and :meth:`logit_scale_value`
      serve zero-shot classification (CLIP, arXiv:2103.00020); :meth:`zeroshot_templates` names
      the prompt templates it uses by default.
    * :meth:`rebuild_encoder`: rebuilds an exported composite encoder (``extra_metadata()`` with
      ``composite: True``) from its file alone.
    """

    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    needs_index: ClassVar[bool] = False  # per-image state addressed by sample index (memory banks)
    needs_text: ClassVar[bool] = False  # the batch carries captions (CLIP)
    has_bank_features: ClassVar[bool] = False  # bank_features() gives the kNN reference set
    has_text_tower: ClassVar[bool] = False  # encode_image / encode_text / logit_scale_value (zero-shot)
    # under torchrun: a step may leave trainable parameters without gradient (DDP must look for them)
    ddp_find_unused_parameters: ClassVar[bool] = False
    paper: ClassVar[str] = ""

    backbone: nn.Module

    def __init__(self, cfg: MethodConfig, ctx: BuildContext) -> None:
        super().__init__()
        self.cfg = cfg

    # -- training -------------------------------------------------------------------------
    def training_step(self, batch: Batch, step: int) -> StepOutput:
        raise NotImplementedError

    def before_step(self, step: int) -> None:
        """Called after the backward pass and before the optimiser step (e.g. cancel a frozen layer's gradient)."""

    def after_step(self, step: int) -> None:
        """Called after every optimiser step with the step just taken (EMA updates and the like)."""

    def epoch_order(self, epoch: int, generator: torch.Generator) -> torch.Tensor | None:
        """The sample indices of one epoch, in order, or None for a uniform random permutation.

        Called at every epoch start and again on resume mid-epoch, so it must depend only on
        checkpointed state and ``generator`` (seeded from the recipe seed and the epoch).  Indices
        may repeat (DeepCluster samples uniformly over clusters).
        """
        return None

    def on_epoch_start(self, epoch: int, step: int) -> dict[str, float]:
        """Called before each epoch; returns metrics to log."""
        return {}

    def param_groups(self) -> list[ParamGroup]:
        return [ParamGroup("all", [p for p in self.parameters() if p.requires_grad])]

    def schedule_summary(self) -> dict[str, str]:
        """The method's resolved schedules, printed at the start of a run."""
        return {}

    def health(self, saved: dict[str, torch.Tensor]) -> dict[str, float | torch.Tensor]:
        """Health measures of the last step, from the tensors it kept in :attr:`StepOutput.health`.

        Called only when the trainer writes a record (every ``trainer.log_every`` steps).  The
        default gives the collapse measures of ``saved["embedding"]`` (its standard deviation and
        effective rank, :mod:`clcli.methods.health`); a method adds its own by extending it.
        """
        return collapse_measures(saved["embedding"]) if "embedding" in saved else {}

    # -- evaluation and export ------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Representation for evaluation (kNN, linear probe): the backbone's pooled output."""
        return self.backbone(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The projected embedding (``--features embedding``); defaults to the features."""
        return self.features(x)

    def export_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors ``clcli export`` writes: the backbone's state dict."""
        return {k: v.detach() for k, v in self.backbone.state_dict().items()}

    @staticmethod
    def frozen(modules: Iterable[nn.Module]) -> None:
        for m in modules:
            for p in m.parameters():
                p.requires_grad_(False)

    def extra_metadata(self) -> dict[str, Any]:
        return {}

    # -- optional capabilities (see the class docstring) ------------------------------------
    def _lacks(self, what: str) -> ClcliError:
        return ClcliError(f"the {self.cfg.name} method has no {what}")

    def bank_features(self) -> torch.Tensor:
        """The memory bank ``[n, D]`` (fp32, CPU), row = sample index; only with ``has_bank_features``."""
        raise self._lacks("memory bank")

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings ``[B, D]`` for zero-shot; only with ``has_text_tower``."""
        raise self._lacks("text tower (zero-shot classification needs one)")

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings ``[N, D]`` for zero-shot; only with ``has_text_tower``."""
        raise self._lacks("text tower (zero-shot classification needs one)")

    def logit_scale_value(self) -> float:
        """The scale of zero-shot logits (image-text cosine similarity times this); only with ``has_text_tower``."""
        raise self._lacks("text tower (zero-shot classification needs one)")

    def zeroshot_templates(self) -> str | None:
        """The prompt-template set zero-shot uses by default (a set name, file or template); None: the tool's."""
        return None

    @classmethod
    def check_external(cls, cfg: Any) -> None:
        """Refuse, before any data is read, what the method would load from outside the recipe and is not
        allowed or not there (e.g. code a ``python:`` hook names); the default has nothing to check."""

    @classmethod
    def rebuild_encoder(cls, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> nn.Module:
        """The exported composite encoder rebuilt from its tensors and metadata (methods that export one)."""
        raise CheckpointError(f"the {meta.get('method', cls.__name__)} method does not export a composite encoder")


def rebuild_from_recipe(
    tensors: dict[str, torch.Tensor], meta: dict[str, str], build: Callable[[Recipe], nn.Module], what: str
) -> nn.Module:
    """A composite encoder for ``rebuild_encoder``: ``build`` it from the exported recipe, load the tensors strictly."""
    import json

    model = build(validate_recipe(json.loads(meta["recipe"])))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"the exported tensors do not fit {what}: {exc}") from None
    return model
