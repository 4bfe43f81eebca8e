"""Open a data spec: the one place a spec string is resolved to a source.

:func:`open_source` turns a spec string into an :class:`~clcli.data.base.ImageSource` (random
access, map-style) or a :class:`~clcli.data.base.StreamSource` (an iterable, for streamed hub data
sets).  A spec is resolved once, in this order:

an existing local file or folder
    a folder of images (:mod:`clcli.data.folders`), a ``.parquet`` / ``.arrow`` file or a folder
    of them, or a ``datasets`` ``save_to_disk`` folder (:mod:`clcli.data.tables`).
``SCHEME:REST`` with a scheme registered in :data:`clcli.registry.SOURCES`
    the built-ins ``embedded:digits`` (:mod:`clcli.data.embedded`) and ``hf:NAME[:CONFIG]``
    (:mod:`clcli.data.hub`), or a plug-in's scheme.  The registered factory is called as
    ``factory(spec, split, image_column=..., label_column=..., text_column=..., streaming=...)``.

Anything else is a missing path.  :func:`open_data` opens a spec with the columns and streaming
choice of a recipe's ``data`` section, and :func:`limit_source` keeps the first records of a source.
Every source pickles cheaply, so it can be handed to ``DataLoader`` worker processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from clcli.data.base import ImageSource, MapStream, StreamSource
from clcli.data.embedded import embedded_splits
from clcli.data.folders import FolderSource, folder_splits
from clcli.data.hub import hub_splits
from clcli.data.tables import (
    TABLE_EXTENSIONS,
    is_saved_dataset,
    open_saved,
    open_table_file,
    open_table_folder,
    saved_dict_splits,
    table_files,
    table_groups,
)
from clcli.errors import DataError
from clcli.registry import SOURCES

if TYPE_CHECKING:
    from clcli.recipe import DataConfig

__all__ = ["limit_source", "list_splits", "open_data", "open_source"]


def _registered_scheme(spec: str) -> str | None:
    """The registered scheme that ``spec`` names (``hf``, ``embedded``, a plug-in's), else ``None``.

    A one-letter scheme is a Windows drive, and a spec that names an existing path is that path.
    """
    scheme, colon, _ = spec.partition(":")
    if not colon or len(scheme) < 2 or scheme not in SOURCES or Path(spec).expanduser().exists():
        return None
    return scheme


def _open_local(spec: str, path: Path, split: str, **columns: Any) -> ImageSource:
    """Open a local file or folder."""
    if path.is_file():
        if path.suffix.lower() not in TABLE_EXTENSIONS:
            raise DataError(f"{spec} is not a folder of images, a .parquet or .arrow file, or a dataset folder")
        return open_table_file(spec, path, split, **columns)
    if not path.is_dir():
        raise DataError(f"data path {spec} is neither a file nor a folder")
    if is_saved_dataset(path):
        return open_saved(spec, split, path, **columns)
    files = table_files(path)
    if files:
        return open_table_folder(spec, path, split, files, **columns)
    if any(value is not None for value in columns.values()):
        named = ", ".join(f"{k}={v!r}" for k, v in columns.items() if v is not None)
        raise DataError(f"{spec} is a folder of images; {named} applies only to tables and hub data sets")
    return FolderSource(spec, path, split)


def open_source(
    spec: str,
    split: str = "train",
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    text_column: str | None = None,
    streaming: bool = False,
) -> ImageSource | StreamSource:
    """Open the data named by ``spec`` (see the module docstring for the forms) for one split.

    Returns an :class:`ImageSource`; with ``streaming=True`` a :class:`StreamSource` (a real stream
    for ``hf:`` specs, the map-style source read in order otherwise).  Raises :class:`DataError`
    for a missing path, an unknown split (naming the available ones), an empty data set, or a
    missing column (listing the columns).
    """
    columns = {"image_column": image_column, "label_column": label_column, "text_column": text_column}
    spec = str(spec).strip()
    scheme = _registered_scheme(spec)
    if scheme is not None:
        return SOURCES.get(scheme)(spec, split, **columns, streaming=streaming)
    if not spec:
        raise DataError("the data spec is empty: give a folder of images, a table file, hf:NAME or embedded:digits")
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"data path {spec} does not exist")
    source = _open_local(spec, path, split, **columns)
    return MapStream(source) if streaming else source


def open_data(spec: str, split: str, data: DataConfig, *, streaming: bool | None = None) -> ImageSource | StreamSource:
    """:func:`open_source` with the columns and streaming choice of a recipe's ``data`` section.

    ``streaming`` overrides ``data.streaming`` when given.
    """
    return open_source(
        spec,
        split,
        image_column=data.image_column,
        label_column=data.label_column,
        text_column=data.text_column,
        streaming=data.streaming if streaming is None else streaming,
    )


def list_splits(spec: str) -> list[str]:
    """The split names of ``spec``, best effort (for messages); ``[]`` when they cannot be found.

    A single table file or a single saved ``Dataset`` serves any split and is listed as ``["train"]``.
    """
    spec = str(spec).strip()
    try:
        if spec.startswith("embedded:"):
            return embedded_splits(spec)
        if spec.startswith("hf:"):
            return hub_splits(spec)
        path = Path(spec).expanduser()
        if path.is_file():
            return ["train"] if path.suffix.lower() in TABLE_EXTENSIONS else []
        if not path.is_dir():
            return []
        if is_saved_dataset(path):
            return saved_dict_splits(path) or ["train"]
        files = table_files(path)
        if files:
            return ["train"] if len(files) == 1 else sorted(table_groups(path, files))
        splits = folder_splits(path)
        return sorted(splits) if splits is not None else ["train"]
    except (DataError, OSError):
        return []


class _Window(ImageSource):
    """Records ``start .. stop - 1`` of a source, as records ``0 .. stop - start - 1``."""

    def __init__(self, inner: ImageSource, start: int, stop: int) -> None:
        self.inner = inner
        self.start, self.stop = start, max(start, min(stop, len(inner)))
        self.spec, self.split, self.classes = inner.spec, inner.split, inner.classes

    def __len__(self) -> int:
        return self.stop - self.start

    def load_image(self, i: int) -> torch.Tensor:
        return self.inner.load_image(self.start + i)

    def label(self, i: int) -> int:
        return self.inner.label(self.start + i)

    def labels(self) -> torch.Tensor | None:
        labels = self.inner.labels()
        return None if labels is None else labels[self.start : self.stop]

    def text(self, i: int) -> str | None:
        return self.inner.text(self.start + i)

    def describe(self, i: int) -> str:
        return self.inner.describe(self.start + i)


def limit_source(source: ImageSource, limit: int | None) -> ImageSource:
    """The first ``limit`` records of ``source``; ``source`` itself when ``limit`` is ``None`` or >= its length."""
    if limit is None or limit >= len(source):
        return source
    return _Window(source, 0, limit)


def window_source(source: ImageSource, start: int, stop: int) -> ImageSource:
    """Records ``start .. stop - 1`` of ``source`` (one process's share of a pass over it)."""
    return source if start == 0 and stop >= len(source) else _Window(source, start, stop)
