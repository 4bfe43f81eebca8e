"""Checks on recipe values beyond one field's type: shared bounds, the range an error states, the
memory a recipe needs and the channels its data has.

The schema (:mod:`clcli.recipe`) and every method's configuration build their fields from the
bounded types below, so that a recipe is either valid (every value in a range where the method
makes sense) or refused, before any data is read, with the dotted path, the value and the allowed
range.  Floats are finite everywhere (``allow_inf_nan=False`` on every recipe section).

Two checks need more than the recipe and run when the data is opened
(:func:`clcli.assemble.prepare_training` calls them): :func:`check_input_channels` (the backbone's
``in_channels`` against the first training image) and :func:`check_memory` (the bytes of the
backbone, heads, banks, queues, prototypes and one batch's views and similarity matrices, against
the device's total memory).  The estimate counts only tensors the run certainly allocates, so it
is a lower bound: a refusal is never a false alarm, and a run that passes may still need more.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, Field

from clcli.errors import RecipeError

# ------------------------------------------------------------------------------------ bounds
MAX_SEED = 2**63 - 1  # torch.manual_seed takes 64-bit seeds; the per-sample seeds are 63-bit
MAX_EPOCHS = 1_000_000  # epochs, and every epoch-given point (warm-up, milestones, freezes)
MAX_STEPS = 10**12
MAX_IMAGE_SIZE = 8192  # pixels on a side of a view or an evaluation image
MAX_VIEW_GROUPS = 64
MAX_VIEWS_PER_GROUP = 64
MAX_HEAD_LAYERS = 64  # layers of a head declared as a list of dimensions
MAX_BLOCKS = 1000  # transformer depth, context blocks, head layers
MAX_ITERATIONS = 1000  # Sinkhorn and k-means iterations (each is a pass over the batch or the data)
MAX_LIST = 1000  # milestones, L2 grid
MAX_WORKERS = 256
MAX_THREADS = 1024
MAX_BATCH = 2**24
MIN_TEMPERATURE = 1e-3  # logits of cosine similarities stay within +-1000
MAX_TEMPERATURE = 100.0  # above this a softmax over cosines is flat: the loss no longer moves

Probability = Annotated[float, Field(ge=0, le=1)]
Epochs = Annotated[float, Field(ge=0, le=MAX_EPOCHS)]
Dim = Annotated[int, Field(ge=1)]
HeadDims = Annotated[list[Dim], Field(min_length=1, max_length=MAX_HEAD_LAYERS)]
Temperature = Annotated[float, Field(ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE)]
# A temperature (or Sinkhorn's epsilon) used as exp(cosine / t) without a max subtracted: exp(1 / t)
# stays finite in float32 (below exp(88.7)) with room for a sum over many terms.
ExpTemperature = Annotated[float, Field(ge=0.02, le=MAX_TEMPERATURE)]
ImageSize = Annotated[int, Field(ge=1, le=MAX_IMAGE_SIZE)]
UnitScale = Annotated[float, Field(gt=0, le=1)]
Positive = Annotated[float, Field(gt=0)]


def ordered(pair: Sequence[float]) -> Sequence[float]:
    """``pair`` (low, high) when low does not exceed high; a ValueError saying so otherwise."""
    if pair[0] > pair[1]:
        raise ValueError(f"low ({pair[0]:g}) must not exceed high ({pair[1]:g}); got {list(pair)}")
    return pair


def increasing(values: Sequence[float]) -> Sequence[float]:
    """``values`` when strictly increasing; a ValueError naming the first step down otherwise."""
    for i in range(1, len(values)):
        if values[i] <= values[i - 1]:
            raise ValueError(f"must be strictly increasing; item {i} ({values[i]:g}) follows {values[i - 1]:g}")
    return values


# --------------------------------------------------------------------------- error messages
def _bounds(metadata: Iterable[Any]) -> str:
    """``'0 < x <= 1'`` (or ``'1 to 64 items'``) from a field's annotated-types metadata; ``''`` when none."""
    lower = upper = ""
    lo = hi = None
    for m in metadata:
        if getattr(m, "gt", None) is not None:
            lower = f"{_number(m.gt)} < "
        if getattr(m, "ge", None) is not None:
            lower = f"{_number(m.ge)} <= "
        if getattr(m, "lt", None) is not None:
            upper = f" < {_number(m.lt)}"
        if getattr(m, "le", None) is not None:
            upper = f" <= {_number(m.le)}"
        lo = getattr(m, "min_length", None) if getattr(m, "min_length", None) is not None else lo
        hi = getattr(m, "max_length", None) if getattr(m, "max_length", None) is not None else hi
    if lower or upper:
        return f"{lower}x{upper}"
    if lo is None and hi is None:
        return ""
    return f"{lo or 0} to {hi} items" if hi is not None else f"at least {lo} items"


def _split(annotation: Any) -> tuple[Any, list[Any]]:
    """(the type, its constraints) of an annotation; ``X | None`` is taken as ``X``."""
    from types import NoneType, UnionType
    from typing import Union, get_args, get_origin

    meta: list[Any] = []
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            args = get_args(annotation)
            annotation = args[0]
            meta += [x for m in args[1:] for x in (getattr(m, "metadata", None) or [m])]
        elif origin in (Union, UnionType):
            rest = [a for a in get_args(annotation) if a is not NoneType]
            if len(rest) != 1:
                return annotation, meta
            annotation = rest[0]
        else:
            return annotation, meta


def allowed_range(model: type[BaseModel] | None, loc: Sequence[Any]) -> str:
    """The bounds of the field at ``loc`` below ``model`` (an item's bounds when ``loc`` ends with an index)."""
    from typing import get_args, get_origin

    cur: Any = model
    meta: list[Any] = []
    for part in loc:
        if isinstance(part, int) or (isinstance(part, str) and part.isdigit()):
            args = [a for a in get_args(cur) if a is not Ellipsis]
            if get_origin(cur) not in (list, tuple) or not args:
                return ""
            item = args[min(int(part), len(args) - 1)] if get_origin(cur) is tuple else args[0]
            cur, meta = _split(item)
            continue
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)) or part not in cur.model_fields:
            return ""
        info = cur.model_fields[part]
        cur, meta = _split(info.annotation)
        meta = [*meta, *info.metadata]
    return _bounds(meta)


def _model_at(model: type[BaseModel] | None, loc: Sequence[Any]) -> type[BaseModel] | None:
    """The section (model class) at ``loc`` below ``model``, through list items and optional values."""
    cur: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)) or part not in cur.model_fields:
            return None
        ann, _ = _split(cur.model_fields[part].annotation)
        from typing import get_args

        while not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            args = [a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
            if not args:
                return None
            ann = args[0]
        cur = ann
    return cur if isinstance(cur, type) and issubclass(cur, BaseModel) else None


def _number(x: Any) -> str:
    return repr(x) if isinstance(x, int) else f"{x:g}"


_RANGE_ERRORS = {"finite_number", "int_from_float", "float_parsing", "int_parsing", "too_short", "too_long"}


def format_validation_error(err: Any, model: type[BaseModel], prefix: str = "") -> str:
    """One line per problem of a pydantic ``ValidationError``: ``  dotted.path: message (got value)``.

    Unknown keys list the allowed ones; a value out of range gives the allowed range; a rule across
    fields of one section (a message that starts with a field name) is reported at that field.
    """
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            section = _model_at(model, loc[:-1])
            msg = "unknown key"
            if section is not None:
                msg += f" (allowed: {', '.join(sorted(section.model_fields))})"
        else:
            first = msg.split(" ", 1)[0].removesuffix("'s")
            section = _model_at(model, loc)
            if e["type"] == "value_error" and section is not None and first in section.model_fields:
                loc = (*loc, first)
            if "input" in e and e["type"] != "missing" and not isinstance(e["input"], dict | list):
                msg += f" (got {e['input']!r})"
            bounds = allowed_range(model, loc)
            if bounds and e["type"] in _RANGE_ERRORS:
                msg += f"; allowed: {bounds}"
        path = ".".join(str(p) for p in ((prefix,) if prefix else ()) + loc)
        lines.append(f"  {path or '<recipe>'}: {msg}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- across sections
def cross_section_problems(recipe: Any, method_cfg: Any, method_cls: Any) -> list[tuple[str, str]]:
    """(dotted path, message) for each rule across sections that ``recipe`` breaks: registered names,
    the ViT's patch against the image sizes, bank features, and the method's own rules
    (:meth:`clcli.recipe.MethodConfig.recipe_problems`)."""
    from clcli.registry import BACKBONES, VIEWS

    out: list[tuple[str, str]] = []
    backbone = recipe.model.backbone
    if not method_cfg.own_backbone and backbone.name.startswith("timm:"):
        out += timm_name_problems(backbone.name)
    elif not method_cfg.own_backbone and backbone.name not in BACKBONES:
        out.append(
            ("model.backbone.name", f"unknown backbone {backbone.name!r}; available: {', '.join(BACKBONES.names())}")
        )
    patch = f"smaller than the ViT's patch (model.backbone.patch_size {backbone.patch_size})"
    for i, g in enumerate(recipe.views.groups):
        if g.pipeline not in VIEWS:
            out.append(
                (
                    f"views.groups.{i}.pipeline",
                    f"unknown view pipeline {g.pipeline!r}; available: {', '.join(VIEWS.names())}",
                )
            )
        if backbone.name == "vit" and g.size < backbone.patch_size:
            out.append((f"views.groups.{i}.size", f"{g.size} is {patch}"))
    if backbone.name == "vit" and recipe.views.eval_size < backbone.patch_size:
        out.append(("views.eval_size", f"{recipe.views.eval_size} is {patch}"))
    if recipe.eval.features == "bank" and not method_cls.has_bank_features:
        why = f"bank needs a method with a memory bank (instdisc); {method_cfg.name} has none"
        out.append(("eval.features", f"{why} (use backbone or embedding)"))
    return out + method_cfg.recipe_problems(recipe.model_copy(update={"method": method_cfg}))


def timm_name_problems(name: str) -> list[tuple[str, str]]:
    """A problem at ``model.backbone.name`` when ``timm:NAME`` names no timm architecture (or timm is missing)."""
    try:
        import timm
    except ImportError:
        return [("model.backbone.name", f"{name} needs timm, which is not installed: pip install 'clcli[timm]'")]
    arch = name.removeprefix("timm:")
    if not timm.is_model(arch):
        return [("model.backbone.name", f"timm has no architecture {arch!r} (see timm.list_models())")]
    return []


_WORDS = {1: "one", 2: "two"}


def views_problem(
    recipe: Any, method: str, exactly: int | None = None, at_least: int | None = None, why: str = ""
) -> list[tuple[str, str]]:
    """A problem at ``views.groups`` when the recipe makes the wrong number of views per image for ``method``."""
    n = sum(g.count for g in recipe.views.groups)
    want = exactly if exactly is not None else at_least
    if (exactly is not None and n != exactly) or (at_least is not None and n < at_least):
        word, plural = _WORDS.get(want, want), "view" if want == 1 else "views"
        rule = f"uses exactly {word} augmented {plural}" if exactly is not None else f"needs at least {word} {plural}"
        return [("views.groups", why or f"{method} {rule} per image; the groups' counts make {n}")]
    return []


def group_names_problem(
    recipe: Any, names: Sequence[str], field: str, *, not_all: bool = False
) -> list[tuple[str, str]]:
    """A problem at ``field`` when it names a view group the recipe does not declare (or, with
    ``not_all``, when it names every view, leaving none to predict)."""
    declared = [g.name for g in recipe.views.groups]
    missing = [n for n in names if n not in declared]
    if missing:
        have = ", ".join(map(repr, dict.fromkeys(declared)))
        return [(field, f"no view group named {', '.join(map(repr, missing))}; the recipe declares {have}")]
    if not_all and set(declared) <= set(names):
        return [(field, "every view is named here; at least one other view group must predict them")]
    return []


# ------------------------------------------------------------------------------ input channels
def check_input_channels(recipe: Any, data_channels: int) -> None:
    """Refuse a backbone whose ``in_channels`` does not match what the data feeds it.

    ``data_channels``: the channels of the first training image (3: decoded images are RGB).  The
    method's configuration says what its backbone then sees
    (:meth:`clcli.recipe.MethodConfig.backbone_channels`; None when the method checks it itself).
    """
    expected = recipe.method.backbone_channels(data_channels)
    have = recipe.model.backbone.in_channels
    if expected is not None and have != expected:
        raise RecipeError(
            f"model.backbone.in_channels is {have}, but the training images have {data_channels} channels and "
            f"{recipe.method.name} feeds the backbone {expected}; set model.backbone.in_channels={expected}"
        )


# -------------------------------------------------------------------------------------- memory
# Parameters and feature size of the built-in ResNets (torchvision's, without the classifier).
_RESNETS = {"resnet18": (11_168_832, 512), "resnet34": (21_276_992, 512), "resnet50": (23_500_352, 2048)}


def backbone_size(cfg: Any) -> tuple[int, int | None]:
    """(parameters, feature dimension) of a built-in backbone from its configuration; (0, None) for a plug-in."""
    if cfg.name in _RESNETS:
        return _RESNETS[cfg.name]
    if cfg.name == "convnet":
        c = [cfg.in_channels, cfg.width, 2 * cfg.width, 4 * cfg.width, 8 * cfg.width]
        return sum(9 * a * b + 2 * b for a, b in zip(c, c[1:], strict=False)), 8 * cfg.width
    if cfg.name == "vit":
        d, hidden = cfg.dim, int(cfg.dim * cfg.mlp_ratio)
        tokens = 1 + (cfg.image_size // cfg.patch_size) ** 2
        block = 4 * d * d + 2 * d * hidden + 4 * d + hidden + d
        return cfg.depth * block + tokens * d + cfg.in_channels * cfg.patch_size**2 * d, d
    return 0, None


def mlp_params(dims: Sequence[int | None]) -> int:
    """Weights of the linear layers between consecutive ``dims`` (a layer with an unknown size counts 0)."""
    return sum(a * b for a, b in zip(dims, dims[1:], strict=False) if a is not None and b is not None)


@dataclass(frozen=True)
class SizeContext:
    """What a method's memory estimate may know: the backbone, the data and one batch."""

    feature_dim: int | None  # the backbone's output size (None: a plug-in backbone)
    backbone_params: int
    dataset_size: int | None  # None: a stream
    batch_size: int
    views: int  # views per image


# label -> (float32 elements, kind); kind: "param" (trained: + gradient + optimiser state),
# "state" (buffers, momentum copies, banks, queues) or "work" (one step's tensors).
MemoryItems = dict[str, tuple[int, str]]


def estimate_memory(recipe: Any, dataset_size: int | None, batch_size: int | None = None) -> tuple[int, MemoryItems]:
    """A lower bound of the bytes a training step of ``recipe`` holds in one process, and the items it counts.

    ``batch_size``: the process's share of ``trainer.batch_size`` (default: all of it, one process).
    """
    params, feature_dim = backbone_size(recipe.model.backbone)
    views = sum(g.count for g in recipe.views.groups)
    b = recipe.trainer.batch_size if batch_size is None else batch_size
    ctx = SizeContext(feature_dim, params, dataset_size, b, views)
    items: MemoryItems = {
        f"backbone ({recipe.model.backbone.name})": (params, "param"),
        "one batch of views (trainer.batch_size x views x 3 x size^2)": (
            b * sum(g.count * 3 * g.size * g.size for g in recipe.views.groups),
            "work",
        ),
    }
    items.update(recipe.method.memory_items(recipe, ctx))
    o = recipe.optim
    states = 2 if o.name == "adamw" else (1 if o.name == "lars" or o.momentum > 0 else 0)
    per_kind = {"param": 4 * (2 + states), "state": 4, "work": 4}
    total = sum(n * per_kind[kind] for n, kind in items.values())
    return total, items


def device_memory(device: Any) -> int | None:
    """Total memory of ``device`` in bytes: the machine's RAM for the CPU, the GPU's for CUDA (None: unknown)."""
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: float) -> str:
    return f"{n / 2**30:,.3g} GiB" if n < 1000 * 2**30 else f"{n / 2**30:,.0f} GiB"


def check_memory(
    recipe: Any, dataset_size: int | None, device: Any, capacity: int | None = None, batch_size: int | None = None
) -> int:
    """Refuse ``recipe`` when :func:`estimate_memory` exceeds the device's memory; returns the estimate.

    ``capacity`` overrides the device's total memory (tests); ``batch_size`` is the process's share
    of the global batch.  The message gives the estimate, the device's memory and the largest items
    with the recipe fields that size them.
    """
    total, items = estimate_memory(recipe, dataset_size, batch_size)
    capacity = device_memory(device) if capacity is None else capacity
    if capacity is None or total <= capacity:
        return total
    largest = sorted(items.items(), key=lambda kv: -kv[1][0])[:3]
    parts = "; ".join(f"{label}: {n:,} values" for label, (n, _) in largest)
    raise RecipeError(
        f"the recipe needs at least {_gib(total)} to train, more than the {_gib(capacity)} of "
        f"{getattr(device, 'type', device)} memory; largest: {parts}"
    )
