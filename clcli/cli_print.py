"""How the ``clcli`` commands print their results: once, readably, or as one JSON object with ``--json``.

Each printer takes the result dictionary its library call returned.  Without ``--json`` it writes
a few lines on stdout (notes such as skipped images on stderr); with ``--json`` the whole of
stdout is the result as JSON, nothing else.
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from clcli.cli_report import report_skipped

err_console = Console(stderr=True)


def _out() -> Console:
    """stdout for a result: no highlighting, long lines left whole (commands stay copyable)."""
    return Console(highlight=False, soft_wrap=True)


def _json(result: dict[str, Any]) -> None:
    typer.echo(json.dumps(result, indent=2, default=str))


def _written(console: Console, result: dict[str, Any]) -> None:
    if result.get("output"):
        console.print(f"written to {escape(result['output'])}", highlight=False)


def _sizes(result: dict[str, Any], train: str = "reference", test: str = "test") -> str:
    return f"{result['train_images']} {train} / {result['test_images']} {test} images"


def print_knn(result: dict[str, Any], as_json: bool) -> None:
    """A kNN result: top-1 and top-5 with k, T, the features and the numbers of images."""
    if as_json:
        _json(result)
        return
    console = _out()
    report_skipped(result, err_console)
    if result["k"] < result["k_requested"]:
        err_console.print(
            f"[yellow]only {result['train_images']} reference images: kNN votes with k={result['k']} "
            f"(asked {result['k_requested']})[/]"
        )
    console.print(
        f"kNN (k={result['k']}, T={result['temperature']:g}, {escape(result['features'])} features, "
        f"{_sizes(result)}): top-1 [bold]{result['top1']:.4f}[/]  top-5 {result['top5']:.4f}"
    )
    _written(console, result)


def print_linear(result: dict[str, Any], as_json: bool) -> None:
    """A linear-probe result: top-1 and top-5, the chosen L2 strength and the validation search."""
    if as_json:
        _json(result)
        return
    console = _out()
    report_skipped(result, err_console)
    console.print(
        f"linear probe ({escape(result['features'])} features, {result['n_train']} train / {result['n_test']} test "
        f"images, L2 {result['l2']:g}): top-1 [bold]{result['top1']:.4f}[/]  top-5 {result['top5']:.4f}  "
        f"(train top-1 {result['train_top1']:.4f})"
    )
    if result.get("val_top1"):
        search = ", ".join(f"{l2:g}: {acc:.4f}" for l2, acc in result["val_top1"])
        console.print(f"L2 chosen on {result['n_val']} held-out train images; validation top-1 by L2: {search}")
    _written(console, result)


def print_trained(result: dict[str, Any], as_json: bool) -> None:
    """A trained protocol's result (linear SGD, fine-tuning): top-1 and top-5 with its settings."""
    if as_json:
        _json(result)
        return
    console = _out()
    s = result["settings"]
    what = "linear (SGD)" if result["protocol"] == "linear" else "fine-tuning"
    if result.get("label_fraction") is not None:
        what += f" on {result['label_fraction']:g} of the labels"
    console.print(
        f"{what} ({result['n_train']} train / {result['n_test']} test images, {s['epochs']} epochs, batch "
        f"{s['batch_size']}, lr {s['lr']:g}): top-1 [bold]{result['top1']:.4f}[/]  top-5 {result['top5']:.4f}  "
        f"(last epoch's train top-1 {result['train_top1']:.4f})"
    )
    subset = result.get("label_subset")
    if subset and subset.get("file"):
        console.print(f"label subset {subset['subset']} {escape(subset['file'])} ({subset['images']} images)")
    _written(console, result)


def print_retrieval(result: dict[str, Any], as_json: bool) -> None:
    """A retrieval result: recall@K and mAP, with the numbers of queries and gallery images."""
    if as_json:
        _json(result)
        return
    console = _out()
    report_skipped(result, err_console)
    missing = result.get("queries_without_match") or 0
    if missing:
        err_console.print(
            f"[yellow]{missing} quer{'ies' if missing != 1 else 'y'} of a label no gallery image has: left out[/]"
        )
    if result.get("map") is None:
        console.print("retrieval: no query has a relevant gallery image (no label in common)")
    else:
        recalls = "  ".join(
            f"recall@{k.removeprefix('recall_at_')} {v:.4f}" for k, v in result.items() if k.startswith("recall_at_")
        )
        console.print(
            f"retrieval ({escape(result['features'])} features, {result['test_images']} {escape(result['test_split'])} "
            f"queries against {result['train_images']} {escape(result['train_split'])} images): "
            f"{recalls}  mAP [bold]{result['map']:.4f}[/]"
        )
    _written(console, result)


def print_embed(result: dict[str, Any], as_json: bool) -> None:
    """What ``clcli embed`` wrote: how many vectors of which kind, and where."""
    if as_json:
        _json(result)
        return
    console = _out()
    if result.get("skipped_images"):
        n = result["skipped_images"]
        err_console.print(f"[yellow]skipped {n} unreadable image file{'s' if n != 1 else ''}[/]")
    where = result["output"] + (f" (+ {result['sidecar']})" if result.get("sidecar") else "")
    console.print(
        f"embedded {result['images']} images of {escape(result['data'])} split {escape(result['split'])}: "
        f"{result['feature_dim']}-d {escape(result['features'])} features"
        f"{', with labels' if result['labelled'] else ''} -> {escape(where)}"
    )


def next_commands(run_dir: Path) -> list[str]:
    """The commands to run after a finished pre-training, filled in with ``run_dir``."""
    run = shlex.quote(str(run_dir))
    return [
        f"clcli eval knn --run {run}",
        f"clcli report --run {run}",
        f"clcli export --run {run} --out {shlex.quote(str(Path(run_dir) / 'backbone.safetensors'))}",
    ]


def print_pretrain(summary: dict[str, Any], as_json: bool, run_dir: Path) -> None:
    """A finished or interrupted run: where it ended, then the commands to run next (or to continue it)."""
    if as_json:
        _json(summary)
        return
    console = _out()
    loss = summary.get("final_loss")
    ended = "stopped" if summary.get("interrupted") else "finished"
    line = (
        f"{escape(str(summary.get('recipe', 'run')))} {ended} at step {summary['steps']} (epoch {summary['epochs']}, "
        f"{summary['images']} images) after {summary['seconds']:.1f} s"
    )
    if loss is not None and math.isfinite(loss):
        line += f", final loss {loss:.4f}"
    console.print(line)
    console.print(f"checkpoint: {escape(str(summary['checkpoint']))}")
    if summary.get("interrupted"):
        console.print(f"continue with: clcli pretrain --resume --out {escape(shlex.quote(str(run_dir)))}")
        return
    console.print("next:")
    for command in next_commands(run_dir):
        console.print(f"  {escape(command)}")
