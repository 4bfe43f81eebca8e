"""Multi-crop: run a network once per resolution group of views (SwAV arXiv:2006.09882 §3.2; DINO arXiv:2104.14294).

Multi-crop augments each image into a few large (global) crops and several small (local) ones.
The recipe declares them as view groups (``views.groups``), and the views stage hands them out
in declared order, group by group.  Running the backbone once per crop wastes the batch
parallelism; running it once over every crop is impossible when sizes differ.  The papers'
code therefore concatenates consecutive crops of one resolution and makes one forward pass per
such run: two passes for ``2 x 32 px + 6 x 16 px``.  BatchNorm statistics are then computed
over each resolution group, as in the official implementations.

:func:`multicrop_forward` does exactly that and returns one output per view, in declared order;
:func:`views_of` turns the group names a method's config gives (``code_views: [global]``) into
view positions, with a clear error for a name the recipe does not declare.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from clcli.errors import RecipeError
from clcli.views.pipelines import declared_view_names

__all__ = [
    "ViewPassMode",
    "ViewPasses",
    "declared_view_names",
    "describe_view_passes",
    "multicrop_forward",
    "pass_views",
    "resolution_runs",
    "running_stats_frozen",
    "views_of",
]

ViewPassMode = Literal["joint", "separate"]
ViewPasses = Annotated[
    ViewPassMode,
    Field(
        description="joint: same-size views in one pass (batch norm over them together); separate: one pass per "
        "view (batch norm per view)"
    ),
]


def resolution_runs(views: Sequence[Tensor]) -> list[tuple[int, int]]:
    """Half-open ``(start, end)`` ranges of consecutive views that share one shape (apart from the batch)."""
    runs: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(views) + 1):
        if i == len(views) or views[i].shape[1:] != views[start].shape[1:]:
            runs.append((start, i))
            start = i
    return runs


@contextmanager
def running_stats_frozen(modules: Iterable[nn.Module]) -> Iterator[None]:
    """BatchNorm layers of ``modules`` normalise with batch statistics as usual (in training mode) but
    leave their running statistics untouched: momentum 0 for the duration, then restored."""
    layers = [m for module in modules for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in layers]
    try:
        for m in layers:
            m.momentum = 0.0
        yield
    finally:
        for m, momentum in zip(layers, saved, strict=True):
            m.momentum = momentum


def multicrop_forward(
    network: Callable[[Tensor], Tensor],
    views: Sequence[Tensor],
    *,
    apart: Sequence[int] = (),
    frozen_stats: Sequence[int] = (),
    modules: Sequence[nn.Module] = (),
) -> list[Tensor]:
    """``network`` applied to every view, one call per run of consecutive same-size views.

    ``views``: tensors ``[B_v, C, H_v, W_v]`` in declared order.  Each run of consecutive views of
    one shape is concatenated along the batch dimension and passed through ``network`` once; the
    output ``[sum B_v, ...]`` is split back per view.  Returns one tensor per view, in the order of
    ``views``.

    ``apart``: positions of views that are forwarded separately from the others (runs are formed
    within each part), so that their outputs cannot depend on any other view, not even through
    BatchNorm's batch statistics: SwAV's code crops, whose codes must not change with the local
    crops.  ``frozen_stats``: positions of views whose passes leave the BatchNorm running statistics
    of ``modules`` untouched (they are also forwarded apart), so that the statistics used at
    evaluation come from full-size crops only, not from the small local crops.  Neither changes
    the training computation, and in the usual layout (large crops first, then small ones) neither
    adds a call.
    """
    if len(views) == 0:
        raise ValueError("multicrop_forward needs at least one view")
    if any(not 0 <= i < len(views) for i in [*apart, *frozen_stats]):
        raise ValueError(
            f"multicrop_forward: positions {list(apart)} / {list(frozen_stats)} out of range for {len(views)} views"
        )
    if frozen_stats and not modules:
        raise ValueError("multicrop_forward: frozen_stats needs the modules whose BatchNorm statistics to freeze")
    keys = [(i in set(apart), i in set(frozen_stats)) for i in range(len(views))]
    parts: dict[tuple[bool, bool], list[int]] = {}
    for i, key in enumerate(keys):
        parts.setdefault(key, []).append(i)
    outputs: list[Tensor | None] = [None] * len(views)
    for (_, frozen), part in parts.items():
        sub = [views[i] for i in part]
        with running_stats_frozen(modules) if frozen else nullcontext():
            for start, end in resolution_runs(sub):
                chunk = sub[start:end]
                out = network(chunk[0] if len(chunk) == 1 else torch.cat(list(chunk), dim=0))
                for j, piece in enumerate(out.split([v.shape[0] for v in chunk], dim=0)):
                    outputs[part[start + j]] = piece
    return [o for o in outputs if o is not None]  # every position is filled


def pass_views(network: Callable[[Tensor], Tensor], views: Sequence[Tensor], passes: ViewPassMode) -> list[Tensor]:
    """``network`` on every view: ``joint`` is :func:`multicrop_forward` (one call per run of same-size
    views); ``separate`` is one call per view, so batch norm takes each view's own statistics."""
    if passes == "separate":
        return [network(v) for v in views]
    return multicrop_forward(network, views)


def describe_view_passes(passes: ViewPassMode) -> str:
    """The line a method's resolved schedule prints for its ``view_passes``."""
    return "one per view (batch norm per view)" if passes == "separate" else "one for both views"


def views_of(view_names: Sequence[str], groups: Sequence[str], what: str = "views") -> list[int]:
    """The positions of the views whose group name is in ``groups``, in declared order.

    ``view_names``: the group name of each view (``Batch.view_names``, or
    :func:`~clcli.views.pipelines.declared_view_names` of the recipe's groups).  A group name that
    no view has is a :class:`RecipeError` naming ``what`` (the config field) and the groups the
    recipe declares.
    """
    declared = list(dict.fromkeys(view_names))
    missing = [g for g in groups if g not in declared]
    if missing:
        raise RecipeError(
            f"{what}: no view group named {', '.join(repr(m) for m in missing)}; the recipe declares "
            f"{', '.join(repr(d) for d in declared) or 'none'} (views.groups[].name)"
        )
    wanted = set(groups)
    return [i for i, name in enumerate(view_names) if name in wanted]
