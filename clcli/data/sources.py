"""Data sources: where the images come from, behind one small interface.

:func:`open_source` turns a spec string into an :class:`ImageSource` (random access, map-style) or
a :class:`StreamSource` (an iterable, for streamed hub data sets).  Spec forms:

``embedded:digits``
    scikit-learn's 8x8 digits (see :mod:`clcli.data.embedded`); fixed ``train``/``test`` split.
a folder of images
    ``.jpg .jpeg .png .bmp .gif .webp .tif .tiff`` (any case).  When it has sub-folders named like
    splits (``train/``, ``test/``, ``val/``, ...) every sub-folder is a split; otherwise the folder
    is the ``train`` split and the only split.  Inside a split, class sub-folders give labels (the
    sorted folder names are the classes; for split folders, the union over all splits so labels
    agree between splits) and loose images beside class folders are ignored; a folder with no
    class sub-folders is unlabelled.  A ``.txt`` file with the same stem as an image is its caption.
a ``.parquet`` or ``.arrow`` file
    the data set for whatever split is asked.
a folder of ``.parquet`` / ``.arrow`` files
    ``<split>.parquet``, ``<split>-*.parquet``, ``data/<split>-*.parquet`` (the hub layout),
    ``<split>/*.parquet`` and ``data/<split>/*.parquet`` belong to ``<split>``; a folder holding a
    single such file serves any split.
a ``datasets`` ``save_to_disk`` folder
    a ``Dataset`` serves any split, a ``DatasetDict`` has its own splits.
``hf:NAME`` or ``hf:NAME:CONFIG``
    ``datasets.load_dataset(NAME, CONFIG, split=..., streaming=...)``; NAME may be a local folder.

Tables (parquet, arrow, ``save_to_disk`` and hub data) are read with :mod:`datasets`, imported
only when such a source is opened.  Their columns are found by type, then by name: the image column
is the first ``datasets.Image`` feature, else ``image``/``img``/``picture``/``pixel_values``; the
label column the first ``ClassLabel`` feature, else an integer ``label``/``labels``/
``fine_label``/``target``/``class`` column; the text column ``caption``/``text``/``sentence``/
``captions``.  Images are decoded by :mod:`clcli.data.images` straight from the memory-mapped
arrow data (no per-row ``datasets`` formatting).

Every source pickles cheaply (``datasets`` tables pickle as the paths of their memory-mapped files),
so it can be handed to ``DataLoader`` worker processes.
"""

from __future__ import annotations

import bisect
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from clcli.data.images import image_from_value, read_image_file
from clcli.errors import BadImageError, DataError

if TYPE_CHECKING:
    import datasets

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageSource",
    "StreamSource",
    "FolderSource",
    "TableSource",
    "list_splits",
    "open_source",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
TABLE_EXTENSIONS = (".parquet", ".arrow")
SPLIT_FOLDER_NAMES = frozenset(
    {"train", "training", "test", "testing", "val", "valid", "validation", "dev", "eval", "evaluation"}
)
IMAGE_COLUMN_NAMES = ("image", "img", "picture", "pixel_values")
LABEL_COLUMN_NAMES = ("label", "labels", "fine_label", "target", "class")
TEXT_COLUMN_NAMES = ("caption", "text", "sentence", "captions")
SAVE_TO_DISK_MARKERS = ("dataset_dict.json", "state.json")
_STREAM_BATCH = 64


# =========================================================================== interfaces
class ImageSource:
    """A random-access (map-style) collection of images with optional labels and captions.

    Attributes: ``spec`` (the spec string it was opened from), ``split``, and ``classes`` (class
    names when labelled, else ``None``).  Subclasses implement the methods below.
    """

    spec: str
    split: str
    classes: list[str] | None

    def __len__(self) -> int:
        raise NotImplementedError

    def load_image(self, i: int) -> torch.Tensor:
        """Record ``i`` as a ``uint8`` ``[3, H, W]`` RGB tensor; :class:`BadImageError` if unreadable."""
        raise NotImplementedError

    def label(self, i: int) -> int:
        """The class index of record ``i``; -1 when unlabelled."""
        raise NotImplementedError

    def labels(self) -> torch.Tensor | None:
        """All labels as ``int64`` ``[N]`` without decoding any image; ``None`` when unlabelled."""
        raise NotImplementedError

    def text(self, i: int) -> str | None:
        """The caption of record ``i``, ``None`` when it has none."""
        raise NotImplementedError

    def describe(self, i: int) -> str:
        """A human name for record ``i``: its file path, or ``"<file> row N"``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, split={self.split!r}, n={len(self)})"


class StreamSource:
    """An iterable of records with no index and no length (streamed hub data).

    Iterating yields ``(image, label, text, description)``: a ``uint8`` ``[3, H, W]`` RGB image, the
    label or -1, the caption or ``None``, and a human name for the record.  A record whose image
    cannot be decoded raises :class:`BadImageError`, unless ``skip_bad_images`` is set: then it is
    skipped and its description appended to ``bad_images`` (in the iterating process).

    Inside ``DataLoader`` workers the records are shared out, so that the workers together go
    through the stream once: by shard (file) when the stream has at least as many shards as there
    are workers, else every worker reads the stream and keeps every ``num_workers``-th record.
    """

    spec: str
    split: str
    classes: list[str] | None
    skip_bad_images: bool = False

    def __init__(self) -> None:
        self.bad_images: list[str] = []

    def _records(self, num_workers: int, worker_id: int) -> Iterator[tuple[str, Any]]:
        """``(record name, raw record)`` pairs for one of ``num_workers`` workers; decoded by :meth:`_decode`."""
        raise NotImplementedError

    def _decode(self, name: str, record: Any) -> tuple[torch.Tensor, int, str | None, str]:
        """Turn a raw record (named ``name`` within the stream) into the yielded tuple."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, str | None, str]]:
        worker = torch.utils.data.get_worker_info()
        num_workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        for name, record in self._records(num_workers, worker_id):
            try:
                yield self._decode(name, record)
            except BadImageError as exc:
                if not self.skip_bad_images:
                    raise
                self.bad_images.append(exc.where)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, split={self.split!r})"


def _check_index(i: int, n: int, where: str) -> int:
    """``i`` as a non-negative record index below ``n`` (negative counts from the end), else IndexError."""
    i = int(i)
    if not -n <= i < n:
        raise IndexError(f"record {i} out of range for {where} ({n} records)")
    return i % n


# =========================================================================== image folders
def _is_image_name(name: str) -> bool:
    """Whether a file name has an image extension (and is not hidden)."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _subfolders(folder: Path) -> list[Path]:
    """The visible sub-folders of ``folder``, sorted by name."""
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        raise DataError(f"cannot read data folder {folder}: {exc.strerror or exc}") from None
    return sorted((Path(e.path) for e in entries if e.is_dir() and not e.name.startswith(".")), key=lambda p: p.name)


def _walk_images(folder: Path) -> list[tuple[str, str | None]]:
    """All images under ``folder`` (recursively) as sorted ``(path, caption path or None)`` pairs."""
    found: list[tuple[str, str | None]] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        names = set(filenames)
        for name in filenames:
            if _is_image_name(name):
                caption = os.path.splitext(name)[0] + ".txt"
                found.append(
                    (os.path.join(dirpath, name), os.path.join(dirpath, caption) if caption in names else None)
                )
    found.sort(key=lambda item: Path(item[0]).relative_to(folder).as_posix())
    return found


def _has_images(folder: Path) -> bool:
    """Whether any image file lies under ``folder``."""
    for _dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(_is_image_name(n) for n in filenames):
            return True
    return False


def _loose_images(folder: Path) -> list[tuple[str, str | None]]:
    """The images directly inside ``folder`` (not in sub-folders), sorted, with their captions."""
    names = sorted(e.name for e in os.scandir(folder) if e.is_file())
    present = set(names)
    out: list[tuple[str, str | None]] = []
    for name in names:
        if _is_image_name(name):
            caption = os.path.splitext(name)[0] + ".txt"
            out.append((str(folder / name), str(folder / caption) if caption in present else None))
    return out


def _folder_splits(root: Path) -> dict[str, Path] | None:
    """Split name -> folder when ``root`` is organised by split folders, else ``None``."""
    subs = _subfolders(root)
    if not any(p.name.lower() in SPLIT_FOLDER_NAMES for p in subs):
        return None
    return {p.name: p for p in subs if _has_images(p)}


def _class_folders(folder: Path) -> list[Path]:
    """The class sub-folders of ``folder``: those that hold at least one image."""
    return [p for p in _subfolders(folder) if _has_images(p)]


class FolderSource(ImageSource):
    """Images in a folder tree (see the module docstring for the layout rules)."""

    def __init__(self, spec: str, root: Path, split: str) -> None:
        splits = _folder_splits(root)
        if splits is None:
            if split != "train":
                raise DataError(
                    f"{root} has no split folders (train/, test/, ...), so it is only the 'train' split; "
                    f"there is no split {split!r}; available splits: train"
                )
            folder = root
            class_names = [p.name for p in _class_folders(root)]
        else:
            if split not in splits:
                if (root / split).is_dir():
                    raise DataError(f"{root / split} has no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
                available = ", ".join(sorted(splits)) or "none"
                raise DataError(f"{root} has no split {split!r}; available splits: {available}")
            folder = splits[split]
            class_names = sorted({p.name for s in splits.values() for p in _class_folders(s)})
        own_classes = _class_folders(folder)
        items: list[tuple[str, str | None]] = []
        targets: list[int] = []
        if own_classes:
            index = {name: k for k, name in enumerate(class_names)}
            for class_dir in own_classes:
                found = _walk_images(class_dir)
                items.extend(found)
                targets.extend([index[class_dir.name]] * len(found))
            self.classes: list[str] | None = class_names
        else:
            items = _loose_images(folder)
            self.classes = None
        if not items:
            raise DataError(f"{folder} has no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
        self.spec = spec
        self.split = split
        self.root = str(root)
        self._paths = [path for path, _ in items]
        self._captions = {k: caption for k, (_, caption) in enumerate(items) if caption is not None}
        self._targets = torch.tensor(targets, dtype=torch.int64) if self.classes is not None else None

    def __len__(self) -> int:
        return len(self._paths)

    def load_image(self, i: int) -> torch.Tensor:
        return read_image_file(self._paths[i])

    def label(self, i: int) -> int:
        i = _check_index(i, len(self._paths), self.root)
        return -1 if self._targets is None else int(self._targets[i])

    def labels(self) -> torch.Tensor | None:
        return None if self._targets is None else self._targets.clone()

    def text(self, i: int) -> str | None:
        caption = self._captions.get(_check_index(i, len(self._paths), self.root))
        if caption is None:
            return None
        try:
            with open(caption, encoding="utf-8", errors="replace") as fh:
                return fh.read().strip()
        except OSError:
            return None

    def describe(self, i: int) -> str:
        return self._paths[i]


# =========================================================================== tables
def _import_datasets() -> Any:
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
    ds = _import_datasets()
    if isinstance(feature, ds.ClassLabel):
        return True
    return isinstance(feature, ds.Value) and re.fullmatch(r"u?int(8|16|32|64)", feature.dtype) is not None


def _feature_is_text(feature: Any) -> bool:
    """Whether a ``datasets`` feature holds strings (or a list of strings)."""
    ds = _import_datasets()
    if isinstance(feature, ds.Value):
        return feature.dtype in ("string", "large_string")
    inner = getattr(feature, "feature", None)
    if inner is not None and not isinstance(feature, dict):
        return _feature_is_text(inner)
    if isinstance(feature, list) and len(feature) == 1:
        return _feature_is_text(feature[0])
    return False


def _pick_columns(
    where: str,
    features: Any,
    column_names: Sequence[str],
    image_column: str | None,
    label_column: str | None,
    text_column: str | None,
) -> tuple[str, str | None, str | None]:
    """Choose the image, label and text columns (see the module docstring); ``features`` may be ``None``."""
    ds = _import_datasets()
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


def _as_text(value: Any) -> str | None:
    """A caption value as a string: a list of captions gives its first one."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return _as_text(value[0]) if value else None
    return str(value)


def _as_label(value: Any, where: str) -> int:
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
        image, label, text = _pick_columns(
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
        ds = _import_datasets()
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
        i = _check_index(i, self._n, self._where)
        try:
            return image_from_value(self._value(self.image_column, i), "", self._base_dirs)
        except BadImageError as exc:
            raise BadImageError(self.describe(i), exc.reason) from None

    def label(self, i: int) -> int:
        i = _check_index(i, self._n, self._where)
        return -1 if self.label_column is None else int(self._label_array()[i])

    def labels(self) -> torch.Tensor | None:
        if self.label_column is None:
            return None
        return torch.from_numpy(self._label_array().copy())

    def text(self, i: int) -> str | None:
        i = _check_index(i, self._n, self._where)
        return None if self.text_column is None else _as_text(self._value(self.text_column, i))

    def describe(self, i: int) -> str:
        i = _check_index(i, self._n, self._where)
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


# =========================================================================== streams
class MapStream(StreamSource):
    """A map-style source read in order as a stream (``streaming=True`` on a local source)."""

    def __init__(self, source: ImageSource) -> None:
        super().__init__()
        self.source = source
        self.spec = source.spec
        self.split = source.split
        self.classes = source.classes

    def _records(self, num_workers: int, worker_id: int) -> Iterator[tuple[str, Any]]:
        return (("", i) for i in range(worker_id, len(self.source), num_workers))

    def _decode(self, name: str, record: Any) -> tuple[torch.Tensor, int, str | None, str]:
        src = self.source
        return src.load_image(record), src.label(record), src.text(record), src.describe(record)


class HubStream(StreamSource):
    """A streamed ``datasets.IterableDataset`` (``hf:NAME`` with ``streaming=True``).

    The iterable dataset is reopened after unpickling; images are read undecoded
    (``Image(decode=False)``) and decoded by :mod:`clcli.data.images`.
    """

    def __init__(
        self,
        spec: str,
        split: str,
        name: str,
        config: str | None,
        *,
        image_column: str | None = None,
        label_column: str | None = None,
        text_column: str | None = None,
        base_dirs: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.spec = spec
        self.split = split
        self._name = name
        self._config = config
        self._base_dirs = tuple(str(d) for d in base_dirs)
        self._where = f"{spec} [{split}]"
        ds_mod = _import_datasets()
        stream = _hub_load(spec, name, config, split, streaming=True)
        features = stream.features
        if features is not None:
            column_names = list(features)
        else:  # unknown schema: look at the first record
            try:
                first = next(iter(stream))
            except StopIteration:
                raise DataError(f"{self._where} has no images (the stream is empty)") from None
            except Exception as exc:  # noqa: BLE001 - any loader failure is a data problem here
                raise DataError(f"cannot read {self._where}: {type(exc).__name__}: {exc}") from None
            column_names = list(first)
        image, label, text = _pick_columns(self._where, features, column_names, image_column, label_column, text_column)
        self.image_column = image
        self.label_column = label
        self.text_column = text
        label_feature = features.get(label) if features is not None and label is not None else None
        self.classes = list(label_feature.names) if isinstance(label_feature, ds_mod.ClassLabel) else None
        self._stream: Any = stream

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_stream"] = None
        return state

    def _records(self, num_workers: int, worker_id: int) -> Iterator[tuple[str, Any]]:
        ds_mod = _import_datasets()
        stream = self._stream
        if stream is None:
            stream = self._stream = _hub_load(self.spec, self._name, self._config, self.split, streaming=True)
        features = stream.features
        if features is not None and isinstance(features.get(self.image_column), ds_mod.Image):
            stream = stream.cast_column(self.image_column, ds_mod.Image(decode=False))
        if num_workers == 1:
            for n, record in enumerate(stream):
                yield f"row {n}", record
        elif stream.num_shards >= num_workers:
            # datasets hands each DataLoader worker its own shards (files)
            for n, record in enumerate(stream):
                yield f"worker {worker_id} record {n}", record
        else:
            # too few shards to share out: every worker reads the stream (``iter`` does not shard by
            # worker) and keeps every num_workers-th record
            n = 0
            for batch in stream.iter(batch_size=_STREAM_BATCH):
                names = list(batch)
                for values in zip(*(batch[c] for c in names), strict=True):
                    if n % num_workers == worker_id:
                        yield f"row {n}", dict(zip(names, values, strict=True))
                    n += 1

    def _decode(self, name: str, record: Any) -> tuple[torch.Tensor, int, str | None, str]:
        where = f"{self._where} {name}"
        try:
            image = image_from_value(record[self.image_column], where, self._base_dirs)
        except BadImageError as exc:
            raise BadImageError(where, exc.reason) from None
        label = -1 if self.label_column is None else _as_label(record.get(self.label_column), where)
        text = None if self.text_column is None else _as_text(record.get(self.text_column))
        return image, label, text, where


# =========================================================================== opening
def _hub_load(spec: str, name: str, config: str | None, split: str, *, streaming: bool) -> Any:
    """``datasets.load_dataset`` for a hub spec, with its failures turned into :class:`DataError`."""
    ds_mod = _import_datasets()
    try:
        return ds_mod.load_dataset(name, config, split=split, streaming=streaming)
    except ValueError as exc:
        if re.search(r"(Unknown|Bad) split", str(exc)):
            available = ", ".join(_hub_splits(name, config)) or "unknown"
            raise DataError(f"{spec} has no split {split!r}; available splits: {available}") from None
        raise DataError(f"cannot load {spec}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - hub, network and format failures are all data problems
        hint = ""
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") or os.environ.get(
            "HF_DATASETS_OFFLINE", ""
        ).lower() in ("1", "true", "yes", "on"):
            hint = " (offline mode is on: only cached or local data sets can be loaded)"
        raise DataError(f"cannot load {spec}: {type(exc).__name__}: {exc}{hint}") from None


def _hub_splits(name: str, config: str | None) -> list[str]:
    """The split names of a hub (or local hub-layout) data set, or ``[]`` when they cannot be found."""
    ds_mod = _import_datasets()
    try:
        return list(ds_mod.get_dataset_split_names(name, config))
    except Exception:  # noqa: BLE001 - best effort, only for messages
        return []


def _parse_hub_spec(spec: str) -> tuple[str, str | None]:
    """``hf:NAME`` / ``hf:NAME:CONFIG`` -> ``(NAME, CONFIG or None)``."""
    rest = spec[3:].strip()
    name, _, config = rest.partition(":")
    if not name:
        raise DataError(f"{spec!r} names no data set; write hf:NAME or hf:NAME:CONFIG")
    return name, (config or None)


def _table_files(root: Path) -> list[str]:
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
    for sub in _subfolders(root):
        add(sub)
        if sub.name == "data":
            for split_folder in _subfolders(sub):
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


def _table_groups(root: Path, files: list[str]) -> dict[str, list[str]]:
    """Split name -> its table files, for a folder of tables."""
    groups: dict[str, list[str]] = {}
    for f in files:
        split = _table_split_of(root, f)
        if split:
            groups.setdefault(split, []).append(f)
    return groups


def _is_saved_dataset(folder: Path) -> bool:
    """Whether ``folder`` was written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return any((folder / marker).is_file() for marker in SAVE_TO_DISK_MARKERS)


def _saved_dict_splits(folder: Path) -> list[str] | None:
    """The splits of a ``DatasetDict.save_to_disk`` folder, ``None`` for a single saved ``Dataset``."""
    marker = folder / "dataset_dict.json"
    if not marker.is_file():
        return None
    try:
        return [str(s) for s in json.loads(marker.read_text(encoding="utf-8"))["splits"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"cannot read {marker}: {exc}") from None


def _open_table_files(spec: str, split: str, files: list[str], where: str, root: Path, **columns: Any) -> TableSource:
    """Load parquet or arrow files with ``datasets.load_dataset`` as one table."""
    suffixes = {Path(f).suffix.lower() for f in files}
    if len(suffixes) > 1:
        raise DataError(f"{where} mixes .parquet and .arrow files; keep one format per split")
    builder = "parquet" if suffixes == {".parquet"} else "arrow"
    ds_mod = _import_datasets()
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


def _open_saved(spec: str, split: str, folder: Path, **columns: Any) -> TableSource:
    """Open a ``save_to_disk`` folder (a ``Dataset`` serves any split)."""
    ds_mod = _import_datasets()
    splits = _saved_dict_splits(folder)
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


SPLIT_NAMES = ("train", "test", "validation", "val", "valid", "dev")


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


def _open_local(spec: str, path: Path, split: str, **columns: Any) -> ImageSource:
    """Open a local file or folder."""
    if path.is_file():
        if path.suffix.lower() not in TABLE_EXTENSIONS:
            raise DataError(f"{spec} is not a folder of images, a .parquet or .arrow file, or a dataset folder")
        return _open_table_files(spec, split, [str(_split_file(spec, path, split))], str(path), path.parent, **columns)
    if not path.is_dir():
        raise DataError(f"data path {spec} is neither a file nor a folder")
    if _is_saved_dataset(path):
        return _open_saved(spec, split, path, **columns)
    files = _table_files(path)
    if files:
        if len(files) == 1:
            return _open_table_files(spec, split, files, files[0], path, **columns)
        groups = _table_groups(path, files)
        if split not in groups:
            available = ", ".join(sorted(groups)) or "none"
            raise DataError(f"{path} has no split {split!r}; available splits: {available}")
        return _open_table_files(spec, split, groups[split], f"{path} [{split}]", path, **columns)
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
    source: ImageSource
    if spec.startswith("embedded:"):
        if any(value is not None for value in columns.values()):
            raise DataError(f"{spec} has fixed columns; image_column/label_column/text_column do not apply")
        from clcli.data.embedded import open_embedded

        source = open_embedded(spec, split)
    elif spec.startswith("hf:"):
        name, config = _parse_hub_spec(spec)
        local = Path(name).expanduser()
        base_dirs = [str(local)] if local.is_dir() else []
        if streaming:
            return HubStream(spec, split, name, config, base_dirs=base_dirs, **columns)
        dataset = _hub_load(spec, name, config, split, streaming=False)
        source = TableSource(spec, split, dataset, where=f"{spec} [{split}]", base_dirs=base_dirs, **columns)
    else:
        path = Path(spec).expanduser()
        if not spec or not path.exists():
            raise DataError(f"data path {spec} does not exist")
        source = _open_local(spec, path, split, **columns)
    return MapStream(source) if streaming else source


def list_splits(spec: str) -> list[str]:
    """The split names of ``spec``, best effort (for messages); ``[]`` when they cannot be found.

    A single table file or a single saved ``Dataset`` serves any split and is listed as ``["train"]``.
    """
    spec = str(spec).strip()
    try:
        if spec.startswith("embedded:"):
            from clcli.data.embedded import embedded_splits

            return embedded_splits(spec)
        if spec.startswith("hf:"):
            return _hub_splits(*_parse_hub_spec(spec))
        path = Path(spec).expanduser()
        if path.is_file():
            return ["train"] if path.suffix.lower() in TABLE_EXTENSIONS else []
        if not path.is_dir():
            return []
        if _is_saved_dataset(path):
            return _saved_dict_splits(path) or ["train"]
        files = _table_files(path)
        if files:
            return ["train"] if len(files) == 1 else sorted(_table_groups(path, files))
        splits = _folder_splits(path)
        return sorted(splits) if splits is not None else ["train"]
    except (DataError, OSError):
        return []
