"""Views: augmentation declared as data (a list of view groups) and built on torchvision.transforms.v2."""

from clcli.views.pipelines import (
    ViewMaker,
    augment_pipeline,
    center_pipeline,
    declared_view_names,
    normalize_batch,
)

__all__ = ["ViewMaker", "augment_pipeline", "center_pipeline", "declared_view_names", "normalize_batch"]
