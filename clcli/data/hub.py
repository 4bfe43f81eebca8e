"""Hugging Face data sets (``hf:NAME`` or ``hf:NAME:CONFIG``), whole or streamed.

``hf:NAME:CONFIG`` is ``datasets.load_dataset(NAME, CONFIG, split=..., streaming=...)``; NAME may be
a local folder in the hub layout.  Without streaming the split is read as a
:class:`clcli.data.tables.TableSource`; with streaming it is a :class:`HubStream`.  Columns are found
as for tables (see :mod:`clcli.data.tables`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from clcli.data.base import ImageSource, StreamSource
from clcli.data.images import image_from_value
from clcli.data.tables import TableSource, as_label, as_text, import_datasets, pick_columns
from clcli.errors import BadImageError, DataError

__all__ = ["HubStream", "hub_splits", "open_hub"]

_STREAM_BATCH = 64


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
        ds_mod = import_datasets()
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
        image, label, text = pick_columns(self._where, features, column_names, image_column, label_column, text_column)
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
        ds_mod = import_datasets()
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
        label = -1 if self.label_column is None else as_label(record.get(self.label_column), where)
        text = None if self.text_column is None else as_text(record.get(self.text_column))
        return image, label, text, where


def _hub_load(spec: str, name: str, config: str | None, split: str, *, streaming: bool) -> Any:
    """``datasets.load_dataset`` for a hub spec, with its failures turned into :class:`DataError`."""
    ds_mod = import_datasets()
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
    ds_mod = import_datasets()
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


def open_hub(
    spec: str,
    split: str = "train",
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    text_column: str | None = None,
    streaming: bool = False,
) -> ImageSource | StreamSource:
    """Open one split of ``hf:NAME[:CONFIG]``: a :class:`TableSource`, or a :class:`HubStream` when streaming.

    This is the built-in ``hf`` entry of :data:`clcli.registry.SOURCES`.
    """
    columns = {"image_column": image_column, "label_column": label_column, "text_column": text_column}
    spec = str(spec).strip()
    name, config = _parse_hub_spec(spec)
    local = Path(name).expanduser()
    base_dirs = [str(local)] if local.is_dir() else []
    if streaming:
        return HubStream(spec, split, name, config, base_dirs=base_dirs, **columns)
    dataset = _hub_load(spec, name, config, split, streaming=False)
    return TableSource(spec, split, dataset, where=f"{spec} [{split}]", base_dirs=base_dirs, **columns)


def hub_splits(spec: str) -> list[str]:
    """The split names of ``hf:NAME[:CONFIG]``, or ``[]`` when they cannot be found."""
    return _hub_splits(*_parse_hub_spec(str(spec).strip()))
