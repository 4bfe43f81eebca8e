"""Tables: parquet and arrow files, folders of them, and ``datasets`` ``save_to_disk`` folders.

Spec forms handled here:

a ``.parquet`` or ``.arrow`` file
    a file named after a split (:data:`clcli.data.base.SPLIT_NAMES`: ``train.parquet``,
    ``test-00000-of-00001.parquet``) serves that split, and its siblings named after other splits
    serve those; a file with any other name is the ``train`` split only.
a folder of ``.parquet`` / ``.arrow`` files
    ``<split>.parquet``, ``<split>-*.parquet``, ``data/<split>-*.parquet`` (the hub layout),
    ``<split>/*.parquet`` and ``data/<split>/*.parquet`` belong to ``<split>``; a folder holding a
    single such file serves any split.
a ``datasets`` ``save_to_disk`` folder
    a ``Dataset`` serves any split, a ``DatasetDict`` has its own splits.

Tables (these and hub data, see :mod:`clcli.data.hub`) are read with :mod:`datasets`, imported
only when such a source is opened.  Their columns are found by type, then by name: the image column
is the first ``datasets.Image`` feature, else ``image``/``img``/``picture``/``pixel_values``; the
label column the first ``ClassLabel`` feature, else an integer ``label``/``labels``/
``fine_label``/``target``/``class`` column; the text column ``caption``/``text``/``sentence``/
``captions``.  Images are decoded by :mod:`clcli.data.images` straight from the memory-mapped
arrow data (no per-row ``datasets`` formatting).  A table source pickles as the paths of its
memory-mapped files, so it can be handed to ``DataLoader`` worker processes.
"""

from __future__ import annotations

import bisect
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from clcli.data.base import SPLIT_NAMES, ImageSource, check_index, file_stamp
from clcli.data.folders import subfolders
from clcli.data.images import image_from_value
from clcli.errors import BadImageError, DataError

if TYPE_CHECKING:
    import datasets

__all__ = [
    "TABLE_EXTENSIONS",
    "TableSource",
    "as_label",
    "as_text",
    "import_datasets",
    "is_saved_dataset",
    "open_saved",
    "open_table_file",
    "open_table_files",
    "open_table_folder",
    "pick_columns",
    "saved_dict_splits",
    "table_files",
    "table_groups",
]

TABLE_EXTENSIONS = (".parquet", ".arrow")
IMAGE_COLUMN_NAMES = ("image", "img", "picture", "pixel_values")
LABEL_COLUMN_NAMES = ("label", "labels", "fine_label", "target", "class")
TEXT_COLUMN_NAMES = ("caption", "text", "sentence", "captions")
SAVE_TO_DISK_MARKERS = ("dataset_dict.json", "state.json")


def import_datasets() -> Any:
    """Import :mod:`datasets` (slow, so only when a table source is opened)."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise DataError(f"reading tables needs the 'datasets' package: {exc}") from None
    # clcli draws its own progress; the library's per-split bars would interleave with ours
    datasets.utils.logging.disable_progress_bar()
    return datasets


def _feature_is_integer(feature: Any) -> bool:
    """Whether a ``datasets`` feature holds integer labels (``ClassLabel`` or an integer ``Value``)."""
    ds = import_datasets()
    if isinstance(feature, ds.ClassLabel):
        return True
    return isinstance(feature, ds.Value) and re.fullmatch(r"u?int(8|16|32|64)", feature.dtype) is not None


def _feature_is_text(feature: Any) -> bool:
    """Whether a ``datasets`` feature holds strings (or a list of strings)."""
    ds = import_datasets()
    if isinstance(feature, ds.Value):
        return feature.dtype in ("string", "large_string")
    inner = getattr(feature, "feature", None)
    if inner is not None and not isinstance(feature, dict):
        return _feature_is_text(inner)
    if isinstance(feature, list) and len(feature) == 1:
        return _feature_is_text(feature[0])
    return False


def pick_columns(
    where: str,
    features: Any,
    column_names: Sequence[str],
    image_column: str | None,
    label_column: str | None,
    text_column: str | None,
) -> tuple[str, str | None, str | None]:
    """Choose the image, label and text columns (see the module docstring); ``features`` may be ``None``."""
    ds = import_datasets()
    columns = list(column_names)
    listing = ", ".join(columns) or "none"

    def explicit(name: str, role: str) -> str:
        if name not in columns:
            raise DataError(f"{where} has no column {name!r} (the {role} column); columns: {listing}")
        return name

    feats: dict[str, Any] = dict(features) if features is not None else {}

    if image_column is not None:
        image = explicit(image_column, "image")
    else:
        by_type = [c for c in columns if isinstance(feats.get(c), ds.Image)]
        by_name = [c for c in IMAGE_COLUMN_NAMES if c in columns]
        if not by_type and not by_name:
            raise DataError(f"{where} has no image column; columns: {listing} (choose one with image_column)")
        image = (by_type or by_name)[0]

    if label_column is not None:
        label: str | None = explicit(label_column, "label")
        if label in feats and not _feature_is_integer(feats[label]):
            raise DataError(f"label column {label!r} of {where} holds {feats[label]}, not integers or a ClassLabel")
    else:
        by_type = [c for c in columns if isinstance(feats.get(c), ds.ClassLabel)]
        by_name = [c for c in LABEL_COLUMN_NAMES if c in columns and (not feats or _feature_is_integer(feats.get(c)))]
        label = (by_type or by_name or [None])[0]

    if text_column is not None:
        text: str | None = explicit(text_column, "text")
    else:
        by_name = [c for c in TEXT_COLUMN_NAMES if c in columns and (not feats or _feature_is_text(feats.get(c)))]
        text = by_name[0] if by_name else None
    return image, label, text


def as_text(value: Any) -> str | None:
    """A caption value as a string: a list of captions gives its first one."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return as_text(value[0]) if value else None
    return str(value)


def as_label(value: Any, where: str) -> int:
    """A label value as an int (-1 for a missing one)."""
    if value is None:
        return -1
    if isinstance(value, (bool, float)) or not isinstance(value, (int, np.integer)):
        raise DataError(f"label of {where} is {value!r}, not an integer class index")
    return int(value)


def _count_rows(path: str) -> int:
    """The number of rows in a parquet or arrow file, read from its metadata / batches."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.endswith(".parquet"):
        return int(pq.read_metadata(path).num_rows)
    with pa.memory_map(path) as source:
        try:
            return sum(batch.num_rows for batch in pa.ipc.open_stream(source))
        except pa.ArrowInvalid:
            source.seek(0)
            return int(pa.ipc.open_file(source).read_all().num_rows)


class TableSource(ImageSource):
    """A ``datasets.Dataset`` (from parquet, arrow, ``save_to_disk`` or the hub), read row by row.

    Rows are read straight from the dataset's memory-mapped arrow table: images are decoded by
    :func:`clcli.data.images.image_from_value` (an image given as a relative path is looked up
    under each of ``base_dirs``), labels come from the label column alone.  ``where`` names the
    table in messages; ``data_files`` (the files the rows came from, in order) lets
    :meth:`describe` say ``"<file> row N"``.
    """

    def __init__(
        self,
        spec: str,
        split: str,
        dataset: datasets.Dataset,
        *,
        where: str,
        image_column: str | None = None,
        label_column: str | None = None,
        text_column: str | None = None,
        data_files: Sequence[str] = (),
        base_dirs: Sequence[str] = (),
    ) -> None:
        if dataset._indices is not None:  # a selection or shuffle: materialise it once
            dataset = dataset.flatten_indices()
        image, label, text = pick_columns(
            where, dataset.features, dataset.column_names, image_column, label_column, text_column
        )
        if len(dataset) == 0:
            raise DataError(f"{where} has no images (the table has no rows)")
        self.spec = spec
        self.split = split
        self.image_column = image
        self.label_column = label
        self.text_column = text
        self._dataset = dataset
        self._n = len(dataset)
        self._where = where
        self._data_files = [str(f) for f in data_files]
        self._base_dirs = tuple(dict.fromkeys(str(d) for d in base_dirs))
        self._chunks: dict[str, tuple[list[int], list[Any]]] = {}
        self._labels: np.ndarray | None = None
        self._file_starts: list[tuple[int, str]] | None = None
        self.classes = self._find_classes()

    # ---- pickling: the dataset pickles as the paths of its memory-mapped files; caches are rebuilt
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_chunks"] = {}
        state["_labels"] = None
        return state

    # ---- arrow access
    def _column(self, name: str) -> tuple[list[int], list[Any]]:
        """Chunk start offsets and chunks of one column of the arrow table (cached)."""
        cached = self._chunks.get(name)
        if cached is None:
            column = self._dataset.data.table.column(name)
            starts: list[int] = []
            total = 0
            for chunk in column.chunks:
                starts.append(total)
                total += len(chunk)
            cached = (starts, list(column.chunks))
            self._chunks[name] = cached
        return cached

    def _value(self, name: str, i: int) -> Any:
        """The Python value of column ``name`` in row ``i`` (already a checked index)."""
        starts, chunks = self._column(name)
        k = bisect.bisect_right(starts, i) - 1
        return chunks[k][i - starts[k]].as_py()

    def _label_array(self) -> np.ndarray:
        """All labels as an int64 numpy array (missing labels are -1), cached."""
        if self._labels is None:
            import pyarrow as pa
            import pyarrow.compute as pc

            assert self.label_column is not None
            column = self._dataset.data.table.column(self.label_column)
            if not pa.types.is_integer(column.type):
                raise DataError(
                    f"label column {self.label_column!r} of {self._where} holds {column.type}, not integers"
                )
            self._labels = np.asarray(pc.fill_null(column, -1).to_numpy(), dtype=np.int64)
        return self._labels

    def _find_classes(self) -> list[str] | None:
        """Class names: the ``ClassLabel`` names, else ``"0".."K-1"`` for an integer label column."""
        if self.label_column is None:
            return None
        ds = import_datasets()
        feature = self._dataset.features.get(self.label_column)
        if isinstance(feature, ds.ClassLabel):
            return list(feature.names)
        labels = self._label_array()
        top = int(labels.max()) if labels.size else -1
        return [str(k) for k in range(top + 1)] if top >= 0 else None

    # ---- ImageSource
    def __len__(self) -> int:
        return self._n

    def load_image(self, i: int) -> torch.Tensor:
        i = check_index(i, self._n, self._where)
        try:
            return image_from_value(self._value(self.image_column, i), "", self._base_dirs)
        except BadImageError as exc:
            raise BadImageError(self.describe(i), exc.reason) from None

    def label(self, i: int) -> int:
        i = check_index(i, self._n, self._where)
        return -1 if self.label_column is None else int(self._label_array()[i])

    def labels(self) -> torch.Tensor | None:
        if self.label_column is None:
            return None
        return torch.from_numpy(self._label_array().copy())

    def text(self, i: int) -> str | None:
        i = check_index(i, self._n, self._where)
        return None if self.text_column is None else as_text(self._value(self.text_column, i))

    def fingerprint(self) -> dict[str, Any] | None:
        """The files (path, size, modification time), split, image column and row count; ``None`` for a
        table only in memory or one that names image files by path (their changes would go unseen)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        files = self._data_files or [str(c["filename"]) for c in self._dataset.cache_files]
        column = self._dataset.data.table.column(self.image_column)
        by_path = pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
        if pa.types.is_struct(column.type) and column.type.get_field_index("bytes") >= 0:
            by_path = any(pc.sum(pc.and_(pc.is_valid(c), pc.is_null(c.field("bytes")))).as_py() for c in column.chunks)
        if not files or by_path:
            return None
        stamps, column = [file_stamp(f) for f in files], self.image_column
        return {"kind": "table", "split": self.split, "image_column": column, "rows": self._n, "files": stamps}

    def describe(self, i: int) -> str:
        i = check_index(i, self._n, self._where)
        if self._data_files and self._file_starts is None:
            starts: list[tuple[int, str]] = []
            total = 0
            try:
                for f in self._data_files:
                    starts.append((total, f))
                    total += _count_rows(f)
            except Exception:  # noqa: BLE001 - only for a nicer name; fall back to the table's name
                total = -1
            self._file_starts = starts if total == self._n else []
        if self._file_starts:
            k = bisect.bisect_right([s for s, _ in self._file_starts], i) - 1
            start, path = self._file_starts[k]
            return f"{path} row {i - start}"
        return f"{self._where} row {i}"


def table_files(root: Path) -> list[str]:
    """The ``.parquet`` / ``.arrow`` files of a folder: at its top, in its sub-folders and in ``data/*/``."""
    found: list[str] = []

    def add(folder: Path) -> None:
        with os.scandir(folder) as entries:
            found.extend(
                e.path
                for e in entries
                if not e.name.startswith(".") and e.name.lower().endswith(TABLE_EXTENSIONS) and e.is_file()
            )

    add(root)
    for sub in subfolders(root):
        add(sub)
        if sub.name == "data":
            for split_folder in subfolders(sub):
                add(split_folder)
    return sorted(found, key=lambda f: Path(f).relative_to(root).as_posix())


def _table_split_of(root: Path, file: str) -> str | None:
    """The split a table file belongs to, from its place in the folder (see the module docstring)."""
    parts = Path(file).relative_to(root).parts
    stem = parts[-1].rsplit(".", 1)[0]
    if len(parts) == 1 or (len(parts) == 2 and parts[0] == "data"):
        return stem.split("-", 1)[0]
    if len(parts) == 2:
        return parts[0]
    if len(parts) == 3 and parts[0] == "data":
        return parts[1]
    return None


def table_groups(root: Path, files: list[str]) -> dict[str, list[str]]:
    """Split name -> its table files, for a folder of tables."""
    groups: dict[str, list[str]] = {}
    for f in files:
        split = _table_split_of(root, f)
        if split:
            groups.setdefault(split, []).append(f)
    return groups


def is_saved_dataset(folder: Path) -> bool:
    """Whether ``folder`` was written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return any((folder / marker).is_file() for marker in SAVE_TO_DISK_MARKERS)


def saved_dict_splits(folder: Path) -> list[str] | None:
    """The splits of a ``DatasetDict.save_to_disk`` folder, ``None`` for a single saved ``Dataset``."""
    marker = folder / "dataset_dict.json"
    if not marker.is_file():
        return None
    try:
        return [str(s) for s in json.loads(marker.read_text(encoding="utf-8"))["splits"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"cannot read {marker}: {exc}") from None


def open_table_files(spec: str, split: str, files: list[str], where: str, root: Path, **columns: Any) -> TableSource:
    """Load parquet or arrow files with ``datasets.load_dataset`` as one table."""
    suffixes = {Path(f).suffix.lower() for f in files}
    if len(suffixes) > 1:
        raise DataError(f"{where} mixes .parquet and .arrow files; keep one format per split")
    builder = "parquet" if suffixes == {".parquet"} else "arrow"
    ds_mod = import_datasets()
    try:
        dataset = ds_mod.load_dataset(builder, data_files={"train": files}, split="train")
    except ValueError as exc:
        if "corresponds to no data" in str(exc):  # every file is empty
            raise DataError(f"{where} has no images (the table has no rows)") from None
        raise DataError(f"cannot read {where}: {type(exc).__name__}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - unreadable or malformed files are data problems
        raise DataError(f"cannot read {where}: {type(exc).__name__}: {exc}") from None
    base_dirs = [str(Path(f).parent) for f in files] + [str(root)]
    return TableSource(spec, split, dataset, where=where, data_files=files, base_dirs=base_dirs, **columns)


def open_saved(spec: str, split: str, folder: Path, **columns: Any) -> TableSource:
    """Open a ``save_to_disk`` folder (a ``Dataset`` serves any split)."""
    ds_mod = import_datasets()
    splits = saved_dict_splits(folder)
    target = folder
    if splits is not None:
        if split not in splits:
            raise DataError(f"{folder} has no split {split!r}; available splits: {', '.join(splits)}")
        target = folder / split
    try:
        dataset = ds_mod.load_from_disk(str(target))
    except Exception as exc:  # noqa: BLE001 - a damaged save is a data problem
        raise DataError(f"cannot read {target}: {type(exc).__name__}: {exc}") from None
    if isinstance(dataset, ds_mod.DatasetDict):  # a dict saved without the marker we looked for
        if split not in dataset:
            raise DataError(f"{folder} has no split {split!r}; available splits: {', '.join(dataset)}")
        dataset = dataset[split]
    files = [c["filename"] for c in dataset.cache_files]
    return TableSource(
        spec, split, dataset, where=str(target), data_files=files, base_dirs=[str(target), str(folder)], **columns
    )


def _file_split(path: Path) -> str | None:
    """The split a table file's name declares (``train.parquet``, ``test-00000-of-00001.parquet``)."""
    stem = path.name[: -len(path.suffix)].lower()
    head = stem.split("-", 1)[0]
    return head if head in SPLIT_NAMES else None


def _split_file(spec: str, path: Path, split: str) -> Path:
    """The file that holds ``split`` when the user named one table file.

    A file named after a split (``train.parquet``) serves that split, and its siblings named after
    other splits (``test.parquet``) serve those, so ``--data train.parquet`` evaluates on
    ``test.parquet`` beside it.  A file with any other name is the ``train`` split only: evaluating
    on the data a model trained on must be asked for explicitly (``--test-split train``).
    """
    own = _file_split(path)
    if own is None:
        if split == "train":
            return path
        raise DataError(
            f"{spec} is a single file, which is the 'train' split; it has no split {split!r} "
            "(name the split 'train' to use this file, or give a file or folder that has it)"
        )
    if own == split:
        return path
    siblings = sorted(
        p
        for p in path.parent.iterdir()
        if p.is_file() and p.suffix.lower() == path.suffix.lower() and _file_split(p) == split
    )
    if len(siblings) == 1:
        return siblings[0]
    found = sorted(
        {s for p in path.parent.iterdir() if p.suffix.lower() == path.suffix.lower() for s in [_file_split(p)] if s}
    )
    raise DataError(
        f"{spec} is the {own!r} split; no file for split {split!r} lies beside it "
        f"(splits found there: {', '.join(found) or 'none'})"
    )


def open_table_file(spec: str, path: Path, split: str, **columns: Any) -> TableSource:
    """Open the split ``split`` of one named ``.parquet`` / ``.arrow`` file (or of its sibling)."""
    return open_table_files(spec, split, [str(_split_file(spec, path, split))], str(path), path.parent, **columns)


def open_table_folder(spec: str, root: Path, split: str, files: list[str], **columns: Any) -> TableSource:
    """Open the split ``split`` of a folder whose table files are ``files`` (from :func:`table_files`)."""
    if len(files) == 1:
        return open_table_files(spec, split, files, files[0], root, **columns)
    groups = table_groups(root, files)
    if split not in groups:
        available = ", ".join(sorted(groups)) or "none"
        raise DataError(f"{root} has no split {split!r}; available splits: {available}")
    return open_table_files(spec, split, groups[split], f"{root} [{split}]", root, **columns)
