"""The source interfaces and the vocabulary every source shares.

:class:`ImageSource` is a random-access (map-style) collection of images with optional labels and
captions; :class:`StreamSource` an iterable of records with no index and no length (streamed hub
data); :class:`MapStream` reads an :class:`ImageSource` in order as a stream.  ``IMAGE_EXTENSIONS``
is the one list of image file extensions (any case) and ``SPLIT_NAMES`` the one list of split
names, used by folder and table sources alike.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any

import torch

from clcli.errors import BadImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "SPLIT_NAMES",
    "ImageSource",
    "MapStream",
    "StreamSource",
    "check_index",
    "file_stamp",
    "files_digest",
    "is_image_name",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# Names that mark a split: a sub-folder with one of these names (any case) makes a folder one of
# splits, and a table file whose name starts with one (``test.parquet``, ``train-00000-of-00002``)
# declares its split.
SPLIT_NAMES = (
    "train",
    "training",
    "test",
    "testing",
    "val",
    "valid",
    "validation",
    "dev",
    "eval",
    "evaluation",
)


def is_image_name(name: str) -> bool:
    """Whether a file name has an image extension (and is not hidden)."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def file_stamp(path: str) -> list[Any]:
    """``[absolute path, size, modification time in ns]`` of a file; size and time -1 when it cannot be read."""
    path = os.path.abspath(path)
    try:
        st = os.stat(path)
    except OSError:
        return [path, -1, -1]
    return [path, st.st_size, st.st_mtime_ns]


def files_digest(paths: list[str]) -> str:
    """sha256 of the :func:`file_stamp` of every file in order: changes when a file is added, removed,
    renamed, resized or rewritten."""
    h = hashlib.sha256()
    for path in paths:
        h.update(json.dumps(file_stamp(path)).encode())
        h.update(b"\n")
    return h.hexdigest()


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

    def fingerprint(self) -> dict[str, Any] | None:
        """What identifies the decoded images, as JSON-able data that changes whenever they may change
        (for files: each file's path, size and modification time), or ``None`` when the source cannot
        tell: :mod:`clcli.data.cache` caches decoded images under this fingerprint and never caches a
        source without one (the default, so a plug-in source is not cached unless it says how)."""
        return None

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


def check_index(i: int, n: int, where: str) -> int:
    """``i`` as a non-negative record index below ``n`` (negative counts from the end), else IndexError."""
    i = int(i)
    if not -n <= i < n:
        raise IndexError(f"record {i} out of range for {where} ({n} records)")
    return i % n


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
