"""pyproject.toml declares what the code imports, the [lit] extra installs what recipes/clip-lit.yaml loads,
and the torch / torchvision requirements set no upper bound that the next release would trip."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def _names(requirements: list[str]) -> set[str]:
    return {_name(r) for r in requirements}


def _third_party_imports() -> set[str]:
    found = set()
    for path in (ROOT / "clcli").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if m != "clcli" and m not in sys.stdlib_module_names}


# import name -> distribution, for optional packages that need not be installed here
KNOWN_DISTRIBUTIONS = {"umap": "umap-learn"}


def test_every_imported_package_is_declared():
    declared = _names(PROJECT["dependencies"]) | {
        n for extra in PROJECT["optional-dependencies"].values() for n in _names(extra)
    }
    dists = packages_distributions()
    missing = {}
    for module in sorted(_third_party_imports()):
        names = {d.lower().replace("_", "-") for d in dists.get(module, [KNOWN_DISTRIBUTIONS.get(module, module)])}
        if not names & declared:
            missing[module] = sorted(names)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    assert "pillow" in _names(PROJECT["dependencies"])  # clcli/data/images.py decodes with Pillow


def test_lit_extra_installs_the_text_encoder_the_lit_recipe_names():
    recipe = yaml.safe_load((ROOT / "recipes" / "clip-lit.yaml").read_text())
    module = recipe["method"]["text_encoder"].removeprefix("python:")
    lit = _names(PROJECT["optional-dependencies"]["lit"])
    dists = {d.lower().replace("_", "-") for d in packages_distributions().get(module, [module.replace("_", "-")])}
    assert dists & lit, f"recipes/clip-lit.yaml loads {module}; the [lit] extra must install it"
    assert "transformers" in lit


def test_torch_and_torchvision_have_lower_bounds_and_no_upper_bound():
    deps = {_name(r): r for r in PROJECT["dependencies"]}
    for name, floor in (("torch", "2.11"), ("torchvision", "0.26")):
        spec = deps[name].split("#")[0]
        assert "<" not in spec and "==" not in spec, f"{name}: {spec} caps the next release"
        assert f">={floor}" in spec, f"{name}: the versions the suite runs on start at {floor}"
