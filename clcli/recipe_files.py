"""The built-in recipes' folder, and reading a recipe file (by built-in name or path) into a raw mapping."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from clcli.errors import RecipeError


def _recipes_dir() -> Path:
    """Built-in recipes: packaged as ``clcli/recipes`` when installed, ``recipes/`` in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "recipes", here.parent / "recipes"):
        if candidate.is_dir():
            return candidate
    return here.parent / "recipes"


RECIPES_DIR = _recipes_dir()


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
        raw = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except OSError as exc:
        raise RecipeError(f"cannot read the recipe file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise RecipeError(f"recipe {path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path} must be a mapping of sections")
    raw.setdefault("name", path.stem)
    return raw
