"""The recipe's settings of the trained evaluation protocols: ``eval.linear_sgd`` and ``eval.finetune``.

Both train a classifier with SGD on augmented images (random resized crop and horizontal flip,
drawn afresh every epoch) under a cosine learning-rate schedule, then score it on the un-augmented
test split.  The linear protocol trains a linear layer on the frozen encoder's features (the
linear evaluation of the papers' tables: e.g. MoCo, arXiv:1911.05722, 100 epochs; SimCLR,
arXiv:2002.05709, 90 epochs); fine-tuning trains the whole encoder with a linear head, optionally
on a class-balanced fraction of the labels (SimCLR's semi-supervised protocol, appendix B.5:
Nesterov momentum 0.9, lr 0.05 x batch/256, no weight decay, 60 epochs on 1 % and 30 on 10 % of
the labels).  The learning rate is given at batch 256 and scaled linearly with the batch size.
The defaults are the CIFAR presets'; the ImageNet presets set a batch of 1024.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from clcli.recipe_checks import MAX_BATCH, MAX_EPOCHS, Probability, UnitScale, ordered


class _SupervisedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    batch_size: int = Field(256, ge=1, le=MAX_BATCH, description="images per SGD step")
    lr: float = Field(0.1, gt=0, le=1000, description="learning rate at batch 256 (scaled by batch_size / 256)")
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0, le=100)
    crop_scale: tuple[UnitScale, UnitScale] = Field(
        (0.08, 1.0), description="random resized crop: the area range of the training crops (min, max)"
    )
    hflip_p: Probability = Field(0.5, description="probability of a horizontal flip of a training image")

    @field_validator("crop_scale")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        ordered(v)
        return v


class LinearSgdConfig(_SupervisedConfig):
    """``clcli eval linear --protocol sgd``: a linear layer on frozen features, trained with SGD."""

    epochs: int = Field(100, ge=1, le=MAX_EPOCHS, description="passes over the (augmented) training split")


class FinetuneConfig(_SupervisedConfig):
    """``clcli eval finetune``: the whole encoder with a linear head, trained with SGD (SimCLR's settings)."""

    epochs: int | None = Field(
        None,
        ge=1,
        le=MAX_EPOCHS,
        description="passes over the labelled training images; default SimCLR's: 60 with at most 1 % of the "
        "labels, 30 otherwise",
    )
    lr: float = Field(0.05, gt=0, le=1000, description="learning rate at batch 256 (scaled by batch_size / 256)")
    nesterov: bool = True

    def epochs_for(self, label_fraction: float | None) -> int:
        """The epochs to train with ``label_fraction`` of the labels (None: all of them)."""
        if self.epochs is not None:
            return self.epochs
        return 60 if label_fraction is not None and label_fraction <= 0.01 else 30
