"""What the ``clcli`` commands share around their one library call: user errors, input checks, printing.

:func:`user_errors` turns every error a user can cause into one message on stderr and exit code 2
(Ctrl-C: 130); the printers write tables, or one JSON object with ``--json``.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def command_console(as_json: bool) -> Console:
    """Where a command's progress and notes go: stderr, silent with ``--json``."""
    return Console(stderr=True, quiet=as_json)


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` on stderr; the exit (code 2) for the caller to raise."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True, soft_wrap=True)
    return typer.Exit(2)


def user_errors(fn: F) -> F:
    """Turn :class:`~clcli.errors.ClcliError` into one message and exit code 2.

    A file-system ``OSError`` that no check caught first (a full disk, a permission, a path that
    vanished) is the user's too: one message naming the path, exit code 2.  Ctrl-C exits with 130.
    Under a multi-process torchrun launch every command but ``pretrain`` refuses to run (it would
    read and write once per process).
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from clcli.errors import ClcliError
        from clcli.fsio import FILE_SYSTEM_ERRNOS, os_error

        try:
            if fn.__name__ != "pretrain" and os.environ.get("WORLD_SIZE", "1") != "1":
                from clcli.engine.distributed import refuse_multi_process

                refuse_multi_process(f"clcli {fn.__name__.replace('_', ' ')}")
            return fn(*args, **kwargs)
        except ClcliError as exc:
            raise fail(str(exc)) from None
        except OSError as exc:
            if exc.errno not in FILE_SYSTEM_ERRNOS:
                raise
            raise fail(str(os_error(exc, "use"))) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def check_data_spec(data: str | None) -> None:
    """Refuse an empty ``--data`` with a message that says so."""
    from clcli.errors import DataError

    if data is not None and not data.strip():
        raise DataError(
            "the data spec (--data) is empty: give a folder of images, a parquet/arrow file or folder, "
            "hf:NAME or embedded:digits"
        )


def emit(result: dict[str, Any], as_json: bool, table_title: str | None = None) -> None:
    """``result`` as one JSON object on stdout, or as a two-column table."""
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
        return
    table = Table(title=table_title, show_header=False)
    for k, v in result.items():
        table.add_row(str(k), f"{v:.4f}" if isinstance(v, float) else str(v))
    Console().print(table)


def report_skipped(result: dict[str, Any], console: Console) -> None:
    """Say how many unreadable image files an evaluation left out (``data.skip_bad_images``), when any."""
    n = result.get("skipped_images") or 0
    if not n:
        return
    parts = [
        f"{split} {result[key]}"
        for split, key in (("reference", "skipped_train_images"), ("test", "skipped_test_images"))
        if result.get(key)
    ]
    where = f" ({', '.join(parts)})" if parts else ""
    console.print(f"[yellow]skipped {n} unreadable image file{'s' if n != 1 else ''}{where}[/]")


def print_zeroshot(result: dict[str, Any], as_json: bool) -> None:
    """A zero-shot result: accuracy per class and overall for labelled data, predictions per image."""
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
        return
    console = Console()
    report_skipped(result, err_console)
    if "per_class" in result:
        table = Table("class", "label", "images", "top-1", "top-5", title="zero-shot accuracy per class")
        for row in result["per_class"]:
            if row["images"]:
                top1, top5 = f"{row['top1']:.4f}", f"{row['top5']:.4f}"
                table.add_row(row["class"], row["label"], str(row["images"]), top1, top5)
        console.print(table)
        console.print(
            f"zero-shot ({len(result['labels'])} labels, {result['num_templates']} templates"
            f"{', z-score calibrated' if result['calibrate'] != 'none' else ''}, classes matched "
            f"{result['matched']}): top-1 [bold]{result['top1']:.4f}[/]  top-5 {result['top5']:.4f} "
            f"on {result['images']} images"
        )
    if "predictions" in result:
        table = Table("image", "predictions", title="zero-shot predictions")
        for p in result["predictions"]:
            table.add_row(p["image"], ", ".join(f"{t['label']} {t['probability']:.3f}" for t in p["top"]))
        console.print(table)
    if result.get("output"):
        console.print(f"written to {result['output']}")
