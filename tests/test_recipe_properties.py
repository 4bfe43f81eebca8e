"""Property-based test of the recipe schema (issue 24, part 7).

Random values for every field of every built-in recipe (shrunk to its tiny form, so that one step
takes a fraction of a second): the fields are found by walking the pydantic models of the resolved
recipe, and each value is drawn from a strategy for the field's type that includes the extremes a
hostile user would try (nan, inf, negatives, zero, huge integers, empty lists, wrong lengths, wrong
types).  Each mutated recipe must either be refused with a :class:`RecipeError` that names the field,
or validate and then train one step without a traceback (a later :class:`ClcliError` that names the
field counts as a clean refusal; a step that does not end within the per-example timeout is a hang).
Anything else fails the test.

The number of examples comes from ``CLCLI_PROPERTY_EXAMPLES`` ("validated,trained"; default
"300,30", about two minutes on two CPU cores); set it higher for a longer local run, e.g.
``CLCLI_PROPERTY_EXAMPLES=2000,200``.  Hypothesis runs derandomized, so the examples repeat.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import string
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from clcli.errors import ClcliError, RecipeError
from clcli.recipe import Recipe, apply_overrides, validate_recipe
from clcli.recipe_checks import _split
from clcli.train import pretrain
from tests.helpers import tiny_recipe, tiny_recipe_names

_VALIDATED, _TRAINED = (int(x) for x in os.environ.get("CLCLI_PROPERTY_EXAMPLES", "300,30").split(","))
TINY_NAMES = tiny_recipe_names()
STEP_TIMEOUT_S = 60.0
# Valid values whose first step takes minutes by design (torch.compile builds kernels): validated here, not
# trained; tests/test_lean_step.py trains a compiled run.
SLOW_TO_TRAIN = {"trainer.compile"}


# ------------------------------------------------------------------------------ the fields
def _leaves(model: BaseModel, value: Any = None, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """(path, annotation) of every field below ``model``; list fields also give one path per item."""
    out: list[tuple[tuple[str, ...], Any]] = []
    for name, info in type(model).model_fields.items():
        path = (*prefix, name)
        current = getattr(model, name)
        if isinstance(current, BaseModel):
            out += _leaves(current, None, path)
            continue
        out.append((path, info))
        base, _ = _split(info.annotation)
        if isinstance(current, list | tuple) and get_origin(base) in (list, tuple):
            for i, item in enumerate(current):
                if isinstance(item, BaseModel):
                    out += _leaves(item, None, (*path, str(i)))
                else:
                    args = [a for a in get_args(base) if a is not Ellipsis]
                    out.append(((*path, str(i)), args[min(i, len(args) - 1)] if args else Any))
    return out


FIELDS: dict[str, list[tuple[tuple[str, ...], Any]]] = {}


def fields_of(name: str) -> list[tuple[tuple[str, ...], Any]]:
    if name not in FIELDS:
        FIELDS[name] = _leaves(tiny_recipe(name))
    return FIELDS[name]


# ------------------------------------------------------------------------------ the values
_FLOAT_EXTREMES = [math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, 5e-324, 1e-300, 1e300, 1.7e308, 0.5, 1.0, 2.0]
_INT_EXTREMES = [-(2**63), -1, 0, 1, 2, 3, 2**31, 2**63 - 1, 2**63, 2**80, 10**12]
_WRONG_TYPES = ["abc", [1, 2], {"a": 1}, None, True]


def _bounds_of(metadata: list[Any]) -> tuple[float | None, float | None]:
    lo = hi = None
    for m in metadata:
        lo = getattr(m, "ge", None) if getattr(m, "ge", None) is not None else lo
        lo = getattr(m, "gt", None) if getattr(m, "gt", None) is not None else lo
        hi = getattr(m, "le", None) if getattr(m, "le", None) is not None else hi
        hi = getattr(m, "lt", None) if getattr(m, "lt", None) is not None else hi
    return lo, hi


def values_for(annotation: Any, depth: int = 0) -> st.SearchStrategy[Any]:
    """Values for a field of this annotation (a FieldInfo or a type): extremes, wrong types and in-range ones."""
    metadata = list(getattr(annotation, "metadata", []) or [])
    base, more = _split(getattr(annotation, "annotation", annotation))
    lo, hi = _bounds_of([*metadata, *more])
    origin = get_origin(base)
    options: list[st.SearchStrategy[Any]] = [st.sampled_from(_WRONG_TYPES)]
    if base is float:
        low = 0.0 if lo is None else float(lo)
        high = low + 10.0 if hi is None else min(float(hi), low + 1e6)
        options += [st.sampled_from(_FLOAT_EXTREMES), st.floats(low, high), st.floats(low, high)]
    elif base is int:
        low = 0 if lo is None else int(lo)
        options += [st.sampled_from(_INT_EXTREMES), st.integers(low, low + 7), st.integers(low, low + 7)]
    elif base is bool:
        options += [st.booleans(), st.booleans()]
    elif base is str:
        options += [st.sampled_from(["", " ", "nope", "global"]), st.text(string.ascii_letters, max_size=8)]
    elif origin is Literal:
        options += [st.sampled_from([*get_args(base), "nope"])] * 2
    elif origin in (list, tuple) and depth == 0:
        args = [a for a in get_args(base) if a is not Ellipsis] or [Any]
        item = st.one_of(*(values_for(a, 1) for a in dict.fromkeys(args)))
        n = len(args) if origin is tuple else 2
        options += [st.just([]), st.lists(item, min_size=max(0, n - 1), max_size=n + 1)]
        options += [st.lists(_in_range(args[0]), min_size=n, max_size=n)]
    elif isinstance(base, type) and issubclass(base, BaseModel):
        options += [st.just({}), st.just({"nope": 1})]
    return st.one_of(*options)


def _in_range(annotation: Any) -> st.SearchStrategy[Any]:
    base, meta = _split(annotation)
    lo, hi = _bounds_of(meta)
    if base is int:
        low = 1 if lo is None else int(lo)
        return st.integers(low, low + 7)
    if base is float:
        low = 0.0 if lo is None else float(lo)
        return st.floats(low, low + 1.0 if hi is None else float(hi))
    return values_for(annotation, 1)


@st.composite
def mutations(draw: st.DrawFn) -> tuple[str, str, Any]:
    """(tiny recipe name, dotted path, value)."""
    name = draw(st.sampled_from(TINY_NAMES))
    path, annotation = draw(st.sampled_from(fields_of(name)))
    return name, ".".join(path), draw(values_for(annotation))


def mutated(name: str, path: str, value: Any) -> dict[str, Any]:
    """The resolved tiny recipe ``name`` as a mapping, with ``value`` at ``path``."""
    raw = copy.deepcopy(tiny_recipe(name).to_dict())
    keys = path.split(".")
    cur: Any = raw
    for key in keys[:-1]:
        cur = cur[int(key)] if isinstance(cur, list) else cur[key]
    if isinstance(cur, list):
        cur[int(keys[-1])] = value
    else:
        cur[keys[-1]] = value
    return raw


# ------------------------------------------------------------------------------ the outcome
class Hang(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise Hang


def names_the_field(message: str, path: str, value: Any) -> bool:
    """Whether a refusal names the mutated field: its dotted path, its name, or (for a rule across
    fields that reports at the other field) the value given."""
    parts = path.split(".")
    keys = [k for k in parts if not k.isdigit()]
    candidates = {path, keys[-1]}
    if parts[-1].isdigit():  # an item: its list's path (a rule on the whole list, e.g. an ordered pair)
        candidates.add(".".join(parts[:-1]))
    if isinstance(value, str | int | float) and not isinstance(value, bool) and str(value) not in ("", "0", "1"):
        candidates.add(str(value))
    return any(c and c in message for c in candidates)


def outcome(name: str, path: str, value: Any, train: bool) -> str:
    """``refused``, ``refused-late``, ``trained``, ``accepted`` (not trained); raises on anything else."""
    try:
        recipe = validate_recipe(mutated(name, path, value))
    except RecipeError as exc:
        assert names_the_field(str(exc), path, value), f"{name} {path}={value!r}: refused without naming it: {exc}"
        return "refused"
    if not train or path in SLOW_TO_TRAIN:
        return "accepted"
    recipe = validate_recipe(apply_overrides(recipe.to_dict(), ["trainer.steps=1"]))
    # a drawn trainer.deterministic=true switches the process to deterministic kernels: switched back after
    kernels = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, STEP_TIMEOUT_S)
    try:
        with tempfile.TemporaryDirectory() as folder, contextlib.chdir(folder):
            # a drawn relative path (data.cache_dir) lands in the temporary folder, not in the checkout
            pretrain(recipe, Path(folder) / "run", show_progress=False)
        return "trained"
    except ClcliError as exc:
        assert names_the_field(str(exc), path, value), f"{name} {path}={value!r}: refused late, unnamed: {exc}"
        return "refused-late"
    except Hang:
        raise AssertionError(f"{name} {path}={value!r}: one step did not end within {STEP_TIMEOUT_S:g} s") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        torch.use_deterministic_algorithms(kernels[0], warn_only=kernels[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


COUNTS: Counter[str] = Counter()


@settings(
    max_examples=_VALIDATED,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(mutations())
def test_random_values_are_valid_or_refused_naming_the_field(case: tuple[str, str, Any]) -> None:
    COUNTS[outcome(*case, train=False)] += 1


@settings(
    max_examples=_TRAINED,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(mutations())
def test_accepted_random_values_train_one_step_without_a_traceback(case: tuple[str, str, Any]) -> None:
    COUNTS[outcome(*case, train=True)] += 1


def test_every_builtin_recipe_is_walked() -> None:
    """Every method has a tiny recipe, and every section's fields are among the paths drawn from."""
    from clcli.recipe import load_recipe, recipe_names

    assert {load_recipe(n).method.name for n in recipe_names()} <= {tiny_recipe(n).method.name for n in TINY_NAMES}
    paths = {".".join(p) for p, _ in fields_of("swav")}
    for section in Recipe.model_fields:
        assert any(p == section or p.startswith(section + ".") for p in paths), section
    assert {"views.groups.0.crop_scale.0", "method.sinkhorn_iterations", "optim.betas.1", "seed"} <= paths


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    if COUNTS:
        print(f"\nrecipe property test outcomes: {dict(COUNTS)}")
