"""Listing and cleaning the decoded-image cache (``clcli cache list`` / ``clcli cache clean``).

An entry is stale when its data no longer gives the entry's key: the data is reopened as the entry
recorded it (spec, split, columns, then the window of records and stored size its fingerprint names), and its
fingerprint hashed again; data that cannot be opened any more makes it stale too.  The same holds for
the markers of data whose images differ in size.  Folders left by an interrupted writer (whose
process is gone, or older than a day) are leftovers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from clcli.data.base import ImageSource
from clcli.data.cache import FittedSource
from clcli.data.cache_store import cache_root, discard, entry_key, leftover
from clcli.data.sources import open_source, window_source
from clcli.errors import DataError

__all__ = ["cache_entries", "clean_cache"]


def _rewrap(source: ImageSource, fingerprint: dict[str, Any]) -> ImageSource:
    """``source`` wrapped as the fingerprint says it was (fitted, a window of its records)."""
    if fingerprint.get("kind") == "fit":
        return FittedSource(_rewrap(source, fingerprint["inner"]), int(fingerprint["size"]))
    if fingerprint.get("kind") == "window":
        return window_source(_rewrap(source, fingerprint["inner"]), int(fingerprint["start"]), int(fingerprint["stop"]))
    return source


def _staleness(meta: dict[str, Any], key: str) -> str | None:
    """Why an entry (or marker) no longer matches its data, ``None`` when it still does (or cannot tell)."""
    try:
        where, columns = meta["source"], meta["reopen"]
        source = open_source(where["spec"], where["split"], **columns)
    except (KeyError, TypeError):
        return None
    except DataError as exc:
        return f"its data cannot be opened: {exc}"
    if not isinstance(source, ImageSource):
        return None
    fingerprint = _rewrap(source, meta["fingerprint"]).fingerprint()
    if fingerprint is None or entry_key(fingerprint) != key:
        return "its data (or the decoders) changed since"
    return None


def cache_entries(cache_dir: str | None = None, *, check: bool = True) -> list[dict[str, Any]]:
    """The entries under ``cache_dir`` (default as ``data.cache_dir``): ``kind`` (``entry``, ``mixed`` for a
    marker of data whose sizes differ, ``leftover`` for a folder an interrupted writer left), ``path``,
    ``bytes``, ``spec``, ``split``, ``images``, ``created`` and ``stale`` (why it no longer matches its data,
    else ``None``; looked up by reopening the data when ``check``)."""
    root = cache_root(cache_dir) / "images"
    rows: list[dict[str, Any]] = []
    if not root.is_dir():
        return rows
    for path in sorted(root.iterdir()):
        row: dict[str, Any] = {"path": str(path), "bytes": 0, "spec": None, "split": None, "images": None}
        row.update(created=None, stale=None)
        if path.name.startswith((".tmp-", ".old-")):
            row.update(kind="leftover", stale="left by a writer that is gone" if leftover(path) else None)
            rows.append(row)
            continue
        if path.suffix == ".lock" or path.name.startswith("."):
            continue
        kind = "mixed" if path.suffix == ".mixed" else "entry"
        meta_path = path if kind == "mixed" else path / "meta.json"
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            row.update(meta.get("source", {}), created=meta.get("created"))
        except (OSError, ValueError, AttributeError):
            meta = None
        if kind == "entry":
            row["bytes"] = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        row["kind"] = kind
        if meta is None:
            row["stale"] = "its metadata is unreadable"
        elif check:
            row["stale"] = _staleness(meta, path.name.split(".")[0])
        rows.append(row)
    return rows


def clean_cache(cache_dir: str | None = None, *, everything: bool = False) -> list[dict[str, Any]]:
    """Remove the stale entries and markers and the leftovers (everything with ``everything``); the removed rows."""
    removed = []
    for row in cache_entries(cache_dir, check=not everything):
        if not row["stale"] and (not everything or row["kind"] == "leftover"):
            continue  # a live writer's folder is never removed
        path = Path(row["path"])
        if path.is_dir() and row["kind"] == "entry":
            discard(path)
        elif path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(row)
    return removed
