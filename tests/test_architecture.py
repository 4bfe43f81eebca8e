"""The shape of the package: imports run downwards only, no import loop, no oversized module.

The layers are those of the README's architecture section (and DESIGN.md): cli -> evaluate/export ->
assemble/runs/engine -> methods -> models, views, data, text, losses, schedules, dist -> recipe,
registry, errors, precision. A module may import its own layer or a lower one, never a higher one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "clcli"

# (prefix, layer): the longest matching prefix decides a module's layer.
LAYERS = [
    ("clcli.errors", 0),
    ("clcli.recipe", 0),
    ("clcli.recipe_checks", 0),
    ("clcli.recipe_eval", 0),
    ("clcli.overrides", 0),
    ("clcli.recipe_files", 0),
    ("clcli.registry", 0),
    ("clcli.precision", 0),
    ("clcli.fsio", 0),
    ("clcli.trust", 0),
    ("clcli.models", 1),
    ("clcli.views", 1),
    ("clcli.data", 1),
    ("clcli.text", 1),
    ("clcli.losses", 1),
    ("clcli.schedules", 1),
    ("clcli.dist", 1),
    ("clcli.methods", 2),
    ("clcli.assemble", 3),
    ("clcli.runs", 3),
    ("clcli.engine", 3),
    ("clcli.evaluate", 4),
    ("clcli.report", 4),
    ("clcli.export", 4),
    ("clcli.export_formats", 4),
    ("clcli.export_card", 4),
    ("clcli.importers", 4),
    ("clcli.train", 4),
    ("clcli.cli", 5),
    ("clcli.cli_options", 5),
    ("clcli.cli_cache", 5),
    ("clcli.cli_report", 5),
    ("clcli.cli_eval", 5),
    ("clcli.cli_print", 5),
    ("clcli.cli_report_cmd", 5),
    ("clcli.cli_io", 5),
    ("clcli.__main__", 5),
]
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _layer(module: str) -> int:
    best = max((p for p, _ in LAYERS if module == p or module.startswith(p + ".")), key=len, default=None)
    if best is None:
        raise AssertionError(f"{module} has no layer in tests/test_architecture.py: add it")
    return dict(LAYERS)[best]


def _resolve(target: str) -> str | None:
    parts = target.split(".")
    for k in range(len(parts), 1, -1):
        candidate = ".".join(parts[:k])
        if candidate in MODULES:
            return candidate
    return None


def _imports(module: str) -> set[str]:
    """Every clcli module that ``module`` imports, at module level or inside a function."""
    tree = ast.parse(MODULES[module].read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("clcli"):
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("clcli")]
        for name in names:
            resolved = _resolve(name)
            if resolved is not None and resolved != module:
                out.add(resolved)
    return out


# The package's __init__ re-exports the public API (from every layer); it is the top, not a layer.
GRAPH = {m: _imports(m) for m in MODULES if m != "clcli"}


def test_every_module_has_a_layer() -> None:
    for module in GRAPH:
        _layer(module)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_run_downwards(module: str) -> None:
    upward = sorted(t for t in GRAPH[module] if t != "clcli" and _layer(t) > _layer(module))
    assert not upward, f"{module} (layer {_layer(module)}) imports a higher layer: {upward}"


def test_evaluation_and_data_stay_apart_from_training_assembly() -> None:
    """evaluate/ loads runs through runs.py, never through assemble; data/ never imports back into itself."""
    for module, targets in GRAPH.items():
        if module.startswith("clcli.evaluate"):
            assert "clcli.assemble" not in targets, f"{module} imports clcli.assemble"
    assert "clcli.data.sources" not in GRAPH["clcli.data.embedded"]


def test_no_import_loop() -> None:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    loops: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, ()):
            if w == "clcli":
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                loops.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not loops, f"import loops: {loops}"


def test_no_module_over_the_size_limit() -> None:
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
