"""Fault injection on recipe values (issue 24): four recipes mutated one field at a time.

Each of ``simclr``, ``swav``, ``moco-v2`` and ``clip`` (shrunk by ``tests.helpers.tiny_overrides``
so that a step takes a fraction of a second) gets, for every field of its resolved recipe, a few
hostile values (nan, +-inf, negatives, zero, huge integers, empty lists, wrong lengths, wrong types,
unknown names), one mutation per run: ``clcli pretrain --set ... --set trainer.steps=1`` through the
CLI (Typer's runner, in a forked process, killed after ``--timeout`` seconds).  A run that trains
and whose mutation touched ``views`` or ``eval`` is then evaluated (``clcli eval knn`` and
``clcli eval linear`` on 64 test images), and a CLIP run whose templates were mutated goes through
``clcli zeroshot``.  Outcomes:

- clean error: exit code 2 with one ``error:`` message and no traceback;
- traceback: any other failure, in training or in the evaluation after it;
- wrongly accepted: the run trained although the value is one no field takes (a non-finite
  number, a negative number, a wrong length or type, an unknown name), or its metrics hold a
  non-finite value;
- hang: the command did not end within the timeout;
- accepted: the run trained with a value that is in range (zero, a huge count, an empty list where
  the field allows one).

Run from the repository root: ``PYTHONPATH=. python bench/notes/mutate_recipes.py [--jobs 2] [--sample N]``;
it prints the counts and writes every outcome to ``bench/notes/results/mutate_recipes.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import random
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel

from clcli.recipe_checks import _split
from tests.helpers import tiny_overrides, tiny_recipe

RECIPES = ["simclr", "swav", "moco-v2", "clip"]
ORDERED = {"crop_scale", "crop_ratio", "blur_sigma"}  # (low, high) pairs: reversed is an error
NAN, INF = math.nan, math.inf


def fields(model: BaseModel, prefix: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
    """(dotted path, annotation, current value) of every field below ``model``, list items included."""
    out = []
    for name, info in type(model).model_fields.items():
        path, value = (*prefix, name), getattr(model, name)
        if isinstance(value, BaseModel):
            out += fields(value, path)
            continue
        out.append((".".join(path), info.annotation, value))
        if isinstance(value, list | tuple):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    out += fields(item, (*path, str(i)))
    return out


def hostile(annotation: Any, value: Any, field: str = "") -> list[tuple[Any, bool]]:
    """(value, refusal expected) pairs for a field of this annotation whose current value is ``value``."""
    base, _ = _split(annotation)
    origin = get_origin(base)
    if base is float:
        return [(NAN, True), (INF, True), (-INF, True), (-1.0, True), (0.0, False), (1e300, False)]
    if base is int:
        return [(-1, True), (0, False), (2**80, False), (10**12, False)]
    if base is bool:
        return [("maybe", True)]
    if origin is Literal:
        return [("nope", True)]
    if base is str:
        return [("", False), ("nope", False)]
    if origin is tuple:
        n = len(get_args(base))
        items = [NAN, *list(value)[1:]] if value else [NAN]
        out = [([], True), (list(value)[: n - 1], True), (items, True), ([-1.0] * n, True)]
        if field in ORDERED:
            out.append((list(reversed(value)), value[0] != value[1]))
        return out
    if origin is list:
        item, _ = _split(get_args(base)[0]) if get_args(base) else (None, [])
        out = [([], False)]
        if item in (int, float):
            out += [([-5], True), ([NAN], True), ([1, 0, 3], False)]
        elif isinstance(item, type) and issubclass(item, BaseModel):
            out += [([{"nope": 1}], True)]
        else:
            out += [(["nope"], False)]
        return out
    return []


def mutations() -> list[tuple[str, str, Any, bool]]:
    out = []
    for name in RECIPES:
        for path, annotation, value in fields(tiny_recipe(name)):
            for bad, expected in hostile(annotation, value, path.rsplit(".", 1)[-1]):
                out.append((name, path, bad, expected))
    # the issue's own cases not covered above
    out += [
        ("swav", "method.sinkhorn_iterations", 10**12, True),
        ("simclr", "seed", 2**80, True),
        ("simclr", "model.backbone.in_channels", 1, True),
        ("simclr", "method.projector", [512, 0, 128], True),
        ("moco-v2", "optim.betas", [1.5, 0.98], True),
        ("clip", "method.zeroshot_templates", "no-such-set", True),
        ("simclr", "views.std", [0, 0, 0], True),
        ("simclr", "views.groups.0.crop_scale", [0, 0], True),
    ]
    return out


def _yaml(value: Any) -> str:
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("...").strip()


def _cli(args: list[str]) -> dict[str, Any]:
    from typer.testing import CliRunner

    from clcli.cli import app

    result = CliRunner().invoke(app, args)
    exc = result.exception
    traceback = exc is not None and not isinstance(exc, SystemExit)
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    error = next((ln for ln in lines if ln.startswith("error:")), "")
    return {
        "code": result.exit_code,
        "traceback": f"{type(exc).__name__}: {exc}"[:300] if traceback else "",
        "error": " | ".join(lines[lines.index(error) :])[:400] if error else "",
    }


def _write_images(folder: Path) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        Image.new("RGB", (16, 16), (80 * i, 40, 200 - 60 * i)).save(folder / f"{i}.png")


def _one(name: str, path: str, value: Any, queue: Any) -> None:
    """Child process: pretrain one step with the mutation, then evaluate where it matters."""
    if path == "trainer.steps" and isinstance(value, int) and value > 1:
        queue.put({"stage": "pretrain", **_cli(["recipes", "show", name, "--set", f"{path}={_yaml(value)}"])})
        return  # a long run is what was asked for: only its validation is checked
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)  # a relative path a mutation names (data.cache_dir=nope) lands here, not in the checkout
        run = str(Path(folder) / "run")
        sets = [*tiny_overrides(name, "trainer.steps=1"), f"{path}={_yaml(value)}"]
        args = ["pretrain", "--recipe", name, "--out", run, "--no-progress"]
        out = {"stage": "pretrain", **_cli([*args, *(a for s in sets for a in ("--set", s))])}
        if out["code"] == 0 and not out["traceback"]:
            from clcli.runs import read_metrics

            rows = read_metrics(Path(run))
            finite = all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
            out["nonfinite_metrics"] = not finite
            steps: list[list[str]] = []
            if path.startswith(("views.", "eval.")):
                steps += [["eval", "knn", "--run", run, "--test-limit", "64", "--train-limit", "256"]]
                steps += [["eval", "linear", "--run", run, "--test-limit", "64", "--train-limit", "256"]]
            if "templates" in path:
                images = Path(folder) / "images"
                _write_images(images)
                steps += [["zeroshot", "--run", run, "--labels", "zero,one,two", "--images", str(images)]]
            for cmd in steps:
                result = _cli(cmd)
                if result["traceback"] or result["code"] not in (0, 2):
                    out = {"stage": " ".join(cmd[:2]), **result, "nonfinite_metrics": out["nonfinite_metrics"]}
                    break
                if result["code"] == 2:
                    out = {"stage": " ".join(cmd[:2]), **result, "nonfinite_metrics": out["nonfinite_metrics"]}
                    break
    queue.put(out)


def classify(out: dict[str, Any] | None, expected_refusal: bool) -> str:
    if out is None:
        return "hang"
    if out["traceback"] or out["code"] not in (0, 2):
        return "traceback" if out["stage"] == "pretrain" else "wrongly accepted"  # accepted, then failed later
    if out["code"] == 2:
        return "clean error" if out["stage"] == "pretrain" else "wrongly accepted"
    if expected_refusal or out.get("nonfinite_metrics"):
        return "wrongly accepted"
    return "accepted"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--limit", type=int, default=0, help="only the first N mutations")
    parser.add_argument("--sample", type=int, default=0, help="only N mutations drawn at random (seeded), in order")
    parser.add_argument("--seed", type=int, default=0, help="the seed of --sample")
    parser.add_argument("--out", default="bench/notes/results/mutate_recipes.json")
    args = parser.parse_args()
    import clcli.cli  # noqa: F401  (imported once, before forking)
    import clcli.train  # noqa: F401

    todo = mutations()[: args.limit or None]
    if args.sample and args.sample < len(todo):
        keep = set(random.Random(args.seed).sample(range(len(todo)), args.sample))
        todo = [case for i, case in enumerate(todo) if i in keep]
    ctx = mp.get_context("fork")
    running: list[tuple[Any, Any, tuple, float]] = []
    results = []
    start = time.time()
    while todo or running:
        while todo and len(running) < args.jobs:
            case = todo.pop(0)
            queue = ctx.Queue()
            proc = ctx.Process(target=_one, args=(*case[:3], queue))
            proc.start()
            running.append((proc, queue, case, time.time()))
        time.sleep(0.05)
        for item in list(running):
            proc, queue, case, began = item
            out = None
            if not queue.empty():
                out = queue.get()
                proc.join()
            elif proc.exitcode is not None and queue.empty():
                out = {"stage": "pretrain", "code": proc.exitcode, "traceback": "child died", "error": ""}
            elif time.time() - began > args.timeout:
                proc.kill()
                proc.join()
            else:
                continue
            running.remove(item)
            name, path, value, expected = case
            kind = classify(out, expected)
            results.append({"recipe": name, "path": path, "value": _yaml(value), "outcome": kind, **(out or {})})
            detail = (out or {}).get("error") or (out or {}).get("traceback") or ""
            print(f"{kind:16s} {name:8s} {path}={_yaml(value)}  {detail}"[:220], flush=True)
    counts = Counter(r["outcome"] for r in results)
    summary = {
        "tried": len(results),
        **{k: counts.get(k, 0) for k in ("clean error", "traceback", "wrongly accepted", "hang", "accepted")},
    }
    summary["seconds"] = round(time.time() - start)
    print(json.dumps(summary))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": summary, "runs": results}, indent=1, default=str) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
