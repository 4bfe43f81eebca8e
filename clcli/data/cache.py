"""Decode once: a training source's images decoded a single time into a memory-mapped ``uint8`` array.

:func:`decoded_once` is what a training run calls on its source (``data.cache``):

``auto`` (the default)
    cache when the decoded array, ``N x 3 x H x W`` bytes, takes at most ``data.cache_budget`` of the
    memory available now (``MemAvailable`` of ``/proc/meminfo``, else ``os.sysconf``); otherwise, and
    whenever the source cannot be cached, print a note and read the images as before.
``disk``
    always cache (the array is read from the disk through the page cache when it exceeds the memory);
    a source that cannot be cached is an error.
``off``
    decode every image every time it is read, as before.

The array is kept in ``data.cache_dir`` (default ``$CLCLI_CACHE_DIR``, else ``~/.cache/clcli``) under
``images/<key>``, the key made from the source's fingerprint (:meth:`ImageSource.fingerprint
<clcli.data.base.ImageSource.fingerprint>`: for tables each file's path, size and modification time
with the split and image column; for folders the sorted files with their sizes and modification
times; for the embedded set its name, split and scikit-learn's version), the stored image size and
the decoders' versions.  A changed file makes a new key, so an entry is never used for other data;
the old entries stay until ``clcli cache clean`` (:mod:`clcli.data.cache_admin`) removes the stale ones.
How entries are written (atomically, one writer at a time) and checked is in :mod:`clcli.data.cache_store`.

The stored size.  When every image has the same size (CIFAR-10: 32x32) the array holds them as they
are.  When sizes differ, the images are stored only with ``data.cache_size = S``: an image whose longer
side exceeds ``S`` is downscaled (bilinear with antialiasing) so that its longer side is ``S``, its
aspect ratio kept, and every image is placed at the top left of an ``S x S`` slot whose used extent
is recorded; :meth:`CachedSource.load_image` returns exactly that extent.  So a random resized crop
sees the whole picture with its own shape, as it does uncached: crop areas, aspect ratios and the
fallback crop keep their meaning, only the resolution of large images is lowered (images that fit
are stored untouched).  A centre crop to a square would cut off the sides of every non-square
image, and a squash to ``S x S`` would bend every crop's aspect ratio, so neither was chosen.
``data.cache_size`` applies whether or not the cache is used, so ``auto`` choosing either way never
changes the pixels.  Without it, data whose images differ in size is not cached (a marker remembers
that, so later runs do not look again).

A cached source gives bitwise the images the source gives (the same decoder made them), so views,
runs and resumes are what they are uncached.  Labels, captions and descriptions are served by the
original source.  :meth:`CachedSource.as_tensor` hands the whole array to a caller that makes views
in batches on the device.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from clcli.data.base import ImageSource, StreamSource, check_index
from clcli.data.cache_store import (
    DamagedEntry,
    Entry,
    EntryWriter,
    cache_root,
    discard,
    entry_key,
    entry_lock,
    map_images,
    open_entry,
)
from clcli.errors import BadImageError, DataError

if TYPE_CHECKING:
    from clcli.recipe import DataConfig

__all__ = ["CachedSource", "FittedSource", "available_memory", "decoded_once", "fit_image"]

_PROBE = 64  # images tried to find the size of the first decodable one
_BATCH = 64  # images per decoding batch (and per write)
_DISK_MARGIN = 256 << 20  # bytes left free on the cache's disk


def _hw(hw: Any) -> str:
    return f"{int(hw[0])}x{int(hw[1])}"


def _mib(n: float) -> str:
    if n < 2**20:
        return f"{n / 2**10:.1f} KiB"
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _say(console: Console, text: str, *, note: bool = False) -> None:
    """Print ``text`` as it is (paths and specs may hold brackets), as a note when ``note``."""
    console.print(("[yellow]note:[/] " if note else "") + escape(text))


def fit_image(image: torch.Tensor, size: int) -> torch.Tensor:
    """``image`` downscaled so that its longer side is ``size`` (aspect kept), or itself when it already fits."""
    h, w = image.shape[-2:]
    if max(h, w) <= size:
        return image
    from torchvision.transforms.v2 import functional as F

    scale = size / max(h, w)
    shape = [size, max(1, round(w * scale))] if h >= w else [max(1, round(h * scale)), size]
    return F.resize(image, shape, interpolation=F.InterpolationMode.BILINEAR, antialias=True)


class FittedSource(ImageSource):
    """A source whose images larger than ``size`` are downscaled by :func:`fit_image` (``data.cache_size``)."""

    def __init__(self, inner: ImageSource, size: int) -> None:
        self.inner, self.size = inner, size
        self.spec, self.split, self.classes = inner.spec, inner.split, inner.classes

    def __len__(self) -> int:
        return len(self.inner)

    def load_image(self, i: int) -> torch.Tensor:
        return fit_image(self.inner.load_image(i), self.size)

    def label(self, i: int) -> int:
        return self.inner.label(i)

    def labels(self) -> torch.Tensor | None:
        return self.inner.labels()

    def text(self, i: int) -> str | None:
        return self.inner.text(i)

    def describe(self, i: int) -> str:
        return self.inner.describe(i)

    def fingerprint(self) -> dict[str, Any] | None:
        inner = self.inner.fingerprint()
        return None if inner is None else {"kind": "fit", "size": self.size, "inner": inner}


class CachedSource(ImageSource):
    """A source whose images are read from a cache entry; everything else comes from ``source``.

    Attributes: ``path`` (the entry folder) and ``shape`` (``N, 3, H, W``).  Pickles as the entry's
    path: a DataLoader worker maps the file again.
    """

    def __init__(self, source: ImageSource, entry: Entry) -> None:
        self.source = source
        self.spec, self.split, self.classes = source.spec, source.split, source.classes
        self.path = entry.path
        self.shape = tuple(int(d) for d in entry.meta["shape"])
        if self.shape[0] != len(source):
            raise DataError(f"the cache entry {entry.path} holds {self.shape[0]} images, the source {len(source)}")
        self._images: np.ndarray | None = entry.images
        self._extents = entry.extents
        self._bad = entry.bad

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_images": None}

    def _array(self) -> np.ndarray:
        if self._images is None:
            self._images = map_images(self.path, self.shape)
        return self._images

    def __len__(self) -> int:
        return self.shape[0]

    def load_image(self, i: int) -> torch.Tensor:
        i = check_index(i, self.shape[0], str(self.path))
        if i in self._bad:
            raise BadImageError(*self._bad[i])
        slot = self._array()[i]
        if self._extents is not None:
            h, w = self._extents[i]
            slot = slot[:, :h, :w]
        return torch.from_numpy(np.array(slot))  # a contiguous copy, as a decoded image is

    def label(self, i: int) -> int:
        return self.source.label(i)

    def labels(self) -> torch.Tensor | None:
        return self.source.labels()

    def text(self, i: int) -> str | None:
        return self.source.text(i)

    def describe(self, i: int) -> str:
        return self.source.describe(i)

    def fingerprint(self) -> dict[str, Any] | None:
        return self.source.fingerprint()

    @property
    def extents(self) -> torch.Tensor | None:
        """``int64`` ``[N, 2]``: the height and width each image takes at the top left of its slot;
        ``None`` when every image fills its slot (then slot ``i`` is image ``i``)."""
        return None if self._extents is None else torch.from_numpy(self._extents.astype(np.int64))

    @property
    def bad_indices(self) -> list[int]:
        """The records that could not be decoded (their slots are zeros; :meth:`load_image` raises for them)."""
        return sorted(self._bad)

    def as_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """All images as one ``uint8`` ``[N, 3, H, W]`` tensor: on the CPU a tensor over the memory map
        (copy-on-write, nothing is read before it is used), on another device a copy there."""
        images = torch.from_numpy(self._array())
        if device is None or torch.device(device).type == "cpu":
            return images
        return images.to(device)


class _NotCached(Exception):
    """Why a source is read uncached (a note under ``auto``, an error under ``disk``)."""


class _DecodeItems(torch.utils.data.Dataset):
    """Records ``start..N-1`` as ``(index, image or None, (description, reason) or None)``."""

    def __init__(self, source: ImageSource, start: int) -> None:
        self.source, self.start = source, start

    def __len__(self) -> int:
        return len(self.source) - self.start

    def __getitem__(self, k: int) -> tuple[int, torch.Tensor | None, tuple[str, str] | None]:
        i = self.start + k
        try:
            return i, self.source.load_image(i), None
        except BadImageError as exc:
            return i, None, (exc.where, exc.reason)


def _as_list(items: list[Any]) -> list[Any]:
    return items


def available_memory() -> int | None:
    """Bytes of memory available now: ``MemAvailable`` from ``/proc/meminfo``, else free pages; ``None`` if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _check_budget(nbytes: int, data: DataConfig) -> None:
    if data.cache != "auto":
        return
    free = available_memory()
    if free is None:
        raise _NotCached("the memory available cannot be measured here, so data.cache=auto does not cache")
    if nbytes > data.cache_budget * free:
        raise _NotCached(
            f"the decoded images would take {_mib(nbytes)}, more than data.cache_budget={data.cache_budget:g} of "
            f"the {_mib(free)} of memory available (data.cache=disk caches them anyway)"
        )


def _probe(source: ImageSource) -> tuple[tuple[int, int], list[Any]]:
    """The size of the first decodable image, and the records decoded to find it."""
    items, probed = _DecodeItems(source, 0), []
    for k in range(min(_PROBE, len(source))):
        probed.append(items[k])
        if probed[-1][1] is not None:
            return tuple(probed[-1][1].shape[1:]), probed
    raise _NotCached(f"none of the first {len(probed)} images of {source.spec} could be decoded")


def _decoded(source: ImageSource, start: int, workers: int) -> Iterator[list[Any]]:
    loader = torch.utils.data.DataLoader(
        _DecodeItems(source, start),
        batch_size=_BATCH,
        num_workers=workers,
        collate_fn=_as_list,
        generator=torch.Generator().manual_seed(0),  # its workers' seeds are not drawn from the global generator
    )
    yield from loader


def _progress(console: Console, enabled: bool) -> Any:
    from rich import progress as rp

    return rp.Progress(
        rp.TextColumn("[bold]{task.description}"),
        rp.BarColumn(),
        rp.MofNCompleteColumn(),
        rp.TimeElapsedColumn(),
        rp.TextColumn("eta"),
        rp.TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=True,
    )


def _build(
    source: ImageSource, root: Path, key: str, data: DataConfig, console: Console, progress: bool, meta: dict
) -> Entry:
    """Decode every image of ``source`` into a new entry ``root/key`` (see the module docstring)."""
    n, marker = len(source), root / f"{key}.mixed"
    if marker.is_file():
        try:
            raise _NotCached(json.loads(marker.read_text(encoding="utf-8"))["reason"])
        except (ValueError, KeyError, TypeError):  # a damaged marker: look again
            marker.unlink(missing_ok=True)
    fitted = isinstance(source, FittedSource)
    slot, probed = ((source.size, source.size), []) if fitted else _probe(source)
    shape = (n, 3, *slot)
    nbytes = int(np.prod(shape))
    _check_budget(nbytes, data)
    free = shutil.disk_usage(root).free
    if nbytes + _DISK_MARGIN > free:
        raise _NotCached(f"the decoded images would take {_mib(nbytes)}; the disk of {root} has {_mib(free)} free")
    bad: dict[int, tuple[str, str]] = {}
    with EntryWriter(root, key, shape) as writer, _progress(console, progress) as bar:
        task = bar.add_task(f"decoding {source.spec} once", total=n)
        batches = _decoded(source, len(probed), data.num_workers) if len(probed) < n else iter(())
        for items in itertools.chain([probed] if probed else [], batches):
            images = []
            for i, image, why in items:
                if why is not None:
                    bad[i] = why
                elif not fitted and tuple(image.shape[1:]) != slot:
                    reason = (
                        f"the images of {source.spec} differ in size ({_hw(slot)} and {_hw(image.shape[1:])} "
                        f"at {source.describe(i)}); set data.cache_size to store "
                        "them at one size"
                    )
                    marker.write_text(json.dumps({"reason": reason, **meta}), encoding="utf-8")
                    raise _NotCached(reason)
                images.append(None if image is None else image.numpy())
            writer.write(items[0][0], images)
            bar.update(task, advance=len(items))
        path = writer.publish(meta, bad)
    _say(console, f"decoded {n} images of {source.spec} once into {path} ({_mib(nbytes)})")
    return open_entry(path)


def _lookup(path: Path) -> tuple[Entry | None, str | None]:
    """The entry at ``path`` (``None`` when absent or damaged) and what is damaged (``None`` when nothing)."""
    if not path.is_dir():
        return None, None
    try:
        return open_entry(path), None
    except DamagedEntry as exc:
        return None, str(exc)


def _cached(source: ImageSource, data: DataConfig, console: Console, progress: bool) -> CachedSource:
    fingerprint = source.fingerprint()
    if fingerprint is None:
        raise _NotCached(f"{source.spec} cannot tell when its images change (it has no fingerprint): not cached")
    root = cache_root(data.cache_dir) / "images"
    key = entry_key(fingerprint)
    entry, _ = _lookup(root / key)
    if entry is None:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _NotCached(f"cannot make the cache folder {root}: {exc.strerror or exc}") from None
        wait = f"waiting for another process that is decoding the same images into {root / key}"
        columns = {"image_column": data.image_column, "label_column": data.label_column}
        meta = {
            "fingerprint": fingerprint,
            "source": {"spec": source.spec, "split": source.split, "images": len(source)},
            "reopen": {**columns, "text_column": data.text_column},
        }
        try:
            with entry_lock(root, key, on_wait=lambda: _say(console, wait)):
                entry, damage = _lookup(root / key)
                if damage is not None:
                    _say(console, f"the cached images {root / key} are damaged ({damage}): decoding again", note=True)
                    discard(root / key)
                if entry is None:
                    entry = _build(source, root, key, data, console, progress, meta)
        except OSError as exc:
            raise _NotCached(f"cannot write the cache in {root}: {exc.strerror or exc}") from None
    else:
        _check_budget(int(np.prod(entry.meta["shape"])), data)
        _say(console, f"images of {source.spec} read from the cache {entry.path}")
    return CachedSource(source, entry)


def decoded_once(
    source: ImageSource | StreamSource, data: DataConfig, *, console: Console | None = None, progress: bool = True
) -> ImageSource | StreamSource:
    """``source`` as training reads it under ``data.cache`` and ``data.cache_size`` (see the module docstring).

    A :class:`CachedSource` when the images are cached, else the source itself (with images larger
    than ``data.cache_size`` downscaled when it is set).  A streaming source is returned as it is.
    ``progress`` shows a progress bar while decoding.  Raises :class:`DataError` under
    ``data.cache=disk`` when the source cannot be cached.
    """
    console = console or Console(quiet=True)
    if not isinstance(source, ImageSource):
        return source
    if data.cache_size is not None:
        source = FittedSource(source, data.cache_size)
    if data.cache == "off":
        return source
    try:
        with torch.random.fork_rng(devices=[]):  # decoding draws nothing from the run's random numbers
            return _cached(source, data, console, progress)
    except _NotCached as why:
        if data.cache == "disk":
            raise DataError(f"data.cache=disk: {why}") from None
        _say(console, f"{why}; the images are decoded as they are read", note=True)
        return source
