"""``clcli cache list`` and ``clcli cache clean``: the decoded-image cache that training keeps (``data.cache``)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from clcli.cli_options import JsonOpt, command_group

cache_app = command_group(
    "The decoded training images kept between runs (data.cache): list the entries, remove stale ones."
)
DirOpt = Annotated[
    str | None,
    typer.Option("--dir", help="The cache folder [default: $CLCLI_CACHE_DIR, else ~/.cache/clcli]."),
]


def _size(n: int) -> str:
    if n < 2**20:
        return f"{n / 2**10:.1f} KiB"
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _show(rows: list[dict[str, Any]], as_json: bool, title: str) -> None:
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("kind", "data", "split", "images", "size", "created", "stale", "path", title=title)
    for r in rows:
        cells = [r["kind"], r["spec"] or "", r["split"] or "", str(r["images"] or ""), _size(r["bytes"])]
        cells += [r["created"] or "", r["stale"] or "", r["path"]]
        table.add_row(*(escape(c) for c in cells))
    Console().print(table)


def _failed(exc: OSError) -> typer.Exit:
    Console(stderr=True).print(f"[bold red]error:[/] cannot read the cache: {escape(str(exc))}", soft_wrap=True)
    return typer.Exit(2)


@cache_app.command("list")
def cache_list(cache_dir: DirOpt = None, as_json: JsonOpt = False) -> None:
    """Every entry with its data and size, and why it is stale when its data changed or is gone."""
    from clcli.data.cache_admin import cache_entries

    try:
        rows = cache_entries(cache_dir)
    except OSError as exc:
        raise _failed(exc) from None
    _show(rows, as_json, "decoded-image cache")


@cache_app.command("clean")
def cache_clean(
    cache_dir: DirOpt = None,
    everything: Annotated[bool, typer.Option("--all", help="Remove every entry, not only the stale ones.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove the stale entries (data changed or gone) and what interrupted writers left; --all: every entry."""
    from clcli.data.cache_admin import clean_cache

    try:
        rows = clean_cache(cache_dir, everything=everything)
    except OSError as exc:
        raise _failed(exc) from None
    _show(rows, as_json, f"removed {len(rows)}")
