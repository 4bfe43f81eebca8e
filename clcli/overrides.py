"""``--set section.key=value`` overrides: parsed as YAML values and applied to a raw recipe mapping."""

from __future__ import annotations

import copy
from typing import Any

import yaml

from clcli.errors import RecipeError


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
