"""One-off: give the quality rows written before rows carried a ``recipe_hash`` the hash they would carry.

A row records its recipe's name, its overrides, the budget (epochs, batch, precision it ran in,
seed, k, T), the data folder (``--data`` in its command, else CIFAR-10) and the commit it ran at.
Its recipe is taken as ``git show <commit>:recipes/<name>.yaml`` with those overrides and the
budget, resolved under the schema of today's checkout, and hashed as ``bench/quality.py`` hashes a
new row (``_common.recipe_hash``).  Assumptions, so a backfilled hash says no more than this:

* the recipe file at the row's commit is the one it ran with (a row measured with uncommitted
  recipe edits would be hashed wrongly; rows name overrides that their commit's schema lacked,
  e.g. ``method.view_passes`` at aeec760, so the code was sometimes ahead of its commit);
* a field the old file leaves to a default had the value today's schema gives it: true unless a
  default or the code behind a field changed in between.  Where such a change is known
  (``CODE_CHANGES``), rows of that recipe at commits before it are hashed with the override that
  asks today for what the code did then, or get no hash where no field says it.

A row whose recipe cannot be resolved so (no such commit, no such file, a field renamed since) gets
``recipe_hash: null`` and a ``recipe_hash_note`` saying why.  Backfilled rows carry
``recipe_hash_note: "backfilled ..."``; rows written by ``bench/quality.py`` since carry only the hash.

    PYTHONPATH=bench python bench/notes/backfill_recipe_hash.py          # rewrites bench/results/quality.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
from pathlib import Path
from typing import Any

import yaml
from _common import CIFAR, ROOT, quality_overrides, recipe_hash

from clcli.errors import RecipeError
from clcli.recipe import apply_overrides, validate_recipe

# Code changes that alter a recipe's run without changing its file: (recipe, commit, override, what).
# Rows of that recipe measured at a commit before it (an ancestor) ran what ``override`` asks today,
# and are hashed with it; with no override there is no such field today and they get no hash.
# Found by reading the log of clcli/methods since the first row; the first match applies.
CODE_CHANGES: tuple[tuple[str, str, str | None, str], ...] = (
    ("byol", "aeec760", "method.view_passes=joint", "both views went through each network in one pass"),
    ("simsiam", "aeec760", "method.view_passes=joint", "both views went through each network in one pass"),
    ("swav", "38a9500", None, "the prototype freeze was shrunk with the run's schedule until 38a9500"),
    ("swav", "2d2151b", None, "the queue start was shrunk with the run's schedule until 2d2151b"),
    ("dino", "38a9500", None, "the last-layer freeze and teacher warm-up were shrunk with the run's schedule"),
)
# speed.json and resume.json rows record too little of their budget (warm-up steps, data limit) to
# be resolved again with confidence; they are marked, not hashed
UNHASHED = "written before rows carried a recipe hash; not backfilled (the row does not record its whole budget)"


def git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)


def is_ancestor(commit: str, of: str) -> bool:
    return git("merge-base", "--is-ancestor", commit, of).returncode == 0


def data_folder(command: str) -> Path:
    words = shlex.split(command)
    return Path(words[words.index("--data") + 1]) if "--data" in words else CIFAR


def backfill(row: dict[str, Any], head: str) -> dict[str, Any]:
    commit, name = row.get("git_commit") or "", row.get("recipe") or ""
    if not commit or not name:
        return {"recipe_hash": None, "recipe_hash_note": "no commit or recipe name recorded"}
    implied: list[str] = []
    for recipe, changed_at, override, what in CODE_CHANGES:
        if name == recipe and commit != changed_at and is_ancestor(commit, changed_at):
            if override is None:
                return {"recipe_hash": None, "recipe_hash_note": f"cannot be fingerprinted: {what}"}
            implied = [override, changed_at]
            break
    shown = git("show", f"{commit}:recipes/{name}.yaml")
    if shown.returncode != 0:
        return {"recipe_hash": None, "recipe_hash_note": f"recipes/{name}.yaml not found at {commit}"}
    raw = yaml.safe_load(shown.stdout) or {}
    raw.setdefault("name", name)
    budget = quality_overrides(
        data_folder(row.get("command", "")),
        epochs=float(row["epochs"]),
        batch=int(row["batch"]),
        precision=row["precision"],
        seed=int(row["seed"]),
        k=int(row.get("k", 200)),
        temperature=float(row.get("temperature", 0.1)),
    )
    try:
        recipe = validate_recipe(apply_overrides(raw, budget + implied[:1] + list(row.get("overrides") or [])))
    except RecipeError as exc:
        first = str(exc).splitlines()[-1].strip()
        note = f"recipes/{name}.yaml at {commit} fails today's schema: {first}"
        return {"recipe_hash": None, "recipe_hash_note": note}
    note = f"backfilled: recipes/{name}.yaml at {commit} with the row's overrides, resolved under the schema at {head}"
    if implied:
        note += f", plus {implied[0]} (what the code did before {implied[1]})"
    return {"recipe_hash": recipe_hash(recipe), "recipe_hash_note": note}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    results = ROOT / "bench" / "results"
    p.add_argument("--results", type=Path, default=results / "quality.json")
    p.add_argument("--mark", type=Path, nargs="*", default=[results / "speed.json", results / "resume.json"])
    args = p.parse_args()
    head = git("rev-parse", "--short", "HEAD").stdout.strip()
    rows = json.loads(args.results.read_text())
    for row in rows:
        if "recipe_hash" not in row:
            row.update(backfill(row, head))
        h = row["recipe_hash"] or "-"
        print(f"{row['method']:22} s{row['seed']} {row['git_commit']}  {h[:12]:12} {row['recipe_hash_note']}")
    args.results.write_text(json.dumps(rows, indent=2) + "\n")
    for path in args.mark:
        marked = json.loads(path.read_text())
        for row in marked:
            if "recipe_hash" not in row:
                row.update({"recipe_hash": None, "recipe_hash_note": UNHASHED})
        path.write_text(json.dumps(marked, indent=2) + "\n")


if __name__ == "__main__":
    main()
