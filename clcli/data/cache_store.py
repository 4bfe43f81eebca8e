"""Cache entries on disk: decoded images as one ``uint8`` array ``[N, 3, H, W]`` in a file.

An entry is a folder ``<cache root>/images/<key>/`` holding

``images.u8``
    the raw array, C order, read through a copy-on-write memory map (a process never writes to it);
``extents.npy``
    only when images do not fill their slot: ``int32`` ``[N, 2]``, the height and width each image
    occupies at the top left of its slot (the rest is zeros);
``meta.json``
    the format, the key, the shape, the fingerprint the key was made from, the images that could not
    be decoded (their description and reason), the CRC-32 of ``images.u8``, the versions of the
    decoders, where the data came from (to tell later whether the entry is stale), and when it was made.

The key is a hash of the source's fingerprint (see :meth:`clcli.data.base.ImageSource.fingerprint`),
:data:`FORMAT` and the versions of torchvision, Pillow and numpy (a new decoder may decode a JPEG to
other pixels, and the cache must give the pixels decoding gives today).  Bump :data:`FORMAT` when
the decoding rules of :mod:`clcli.data.images` change.

Entries are written atomically: into ``.tmp-<key>-<pid>-<random token>/`` beside the final folder,
flushed to disk, then renamed to ``<key>/``; a rename onto an existing entry fails, so when two
processes finish the same entry the first one wins and the other discards its copy.  While an entry
is made, an exclusive ``flock`` on ``<key>.lock`` makes other processes (DDP ranks, a second run)
wait instead of decoding the same data again (where the file system has no ``flock``, both decode and
the rename decides).  Opening an entry checks its metadata, its file size and its checksum; a damaged
entry raises :class:`DamagedEntry` and is never read.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FORMAT",
    "DamagedEntry",
    "Entry",
    "EntryWriter",
    "cache_root",
    "discard",
    "entry_key",
    "entry_lock",
    "open_entry",
]

FORMAT = 1
IMAGES_FILE = "images.u8"
EXTENTS_FILE = "extents.npy"
META_FILE = "meta.json"
_CHUNK = 64 << 20  # bytes read at a time when checking a checksum


class DamagedEntry(Exception):
    """A cache entry that cannot be trusted (missing or unreadable metadata, wrong size, bad checksum)."""


def cache_root(configured: str | None) -> Path:
    """The cache folder: ``configured`` (``data.cache_dir``), else ``$CLCLI_CACHE_DIR``, else ``~/.cache/clcli``."""
    chosen = configured or os.environ.get("CLCLI_CACHE_DIR") or os.path.join("~", ".cache", "clcli")
    return Path(chosen).expanduser()


def _versions() -> dict[str, str]:
    import PIL
    import torchvision

    return {"torchvision": torchvision.__version__, "pillow": PIL.__version__, "numpy": np.__version__}


def entry_key(fingerprint: dict[str, Any]) -> str:
    """The entry name for a fingerprint: 32 hex digits of a sha256 over it, :data:`FORMAT` and the decoders'."""
    import hashlib

    text = json.dumps({"format": FORMAT, "fingerprint": fingerprint, **_versions()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass
class Entry:
    """An opened, checked entry: its folder, metadata, images (memory-mapped) and extents (or ``None``)."""

    path: Path
    meta: dict[str, Any]
    images: np.ndarray
    extents: np.ndarray | None

    @property
    def bad(self) -> dict[int, tuple[str, str]]:
        """Record index -> (description, reason) of the images that could not be decoded."""
        return {int(i): (where, reason) for i, (where, reason) in self.meta["bad"].items()}


def map_images(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """The images of an entry folder as a copy-on-write memory map (writes stay in this process)."""
    return np.memmap(path / IMAGES_FILE, dtype=np.uint8, mode="c", shape=shape)


def _file_crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            crc = zlib.crc32(block, crc)
    return crc


def open_entry(path: Path) -> Entry:
    """Open the entry folder ``path`` after checking it; :class:`DamagedEntry` says what is wrong."""
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        shape = tuple(int(d) for d in meta["shape"])
        expected_crc, bad, has_extents = int(meta["crc32"]), meta["bad"], bool(meta["extents"])
    except FileNotFoundError:
        raise DamagedEntry(f"{META_FILE} is missing") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DamagedEntry(f"{META_FILE} is unreadable ({type(exc).__name__})") from None
    if meta.get("format") != FORMAT or meta.get("key") != path.name or len(shape) != 4 or not isinstance(bad, dict):
        raise DamagedEntry(f"{META_FILE} does not describe this entry")
    images_path = path / IMAGES_FILE
    try:
        size = images_path.stat().st_size
    except OSError:
        raise DamagedEntry(f"{IMAGES_FILE} is missing") from None
    if size != int(np.prod(shape)):
        raise DamagedEntry(f"{IMAGES_FILE} holds {size} bytes, not the {int(np.prod(shape))} of {list(shape)}")
    if _file_crc(images_path) != expected_crc:
        raise DamagedEntry(f"the checksum of {IMAGES_FILE} does not match")
    extents = None
    if has_extents:
        try:
            extents = np.load(path / EXTENTS_FILE, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DamagedEntry(f"{EXTENTS_FILE} is unreadable ({type(exc).__name__})") from None
        limits = np.array(shape[2:])
        if extents.shape != (shape[0], 2) or (extents < 0).any() or (extents > limits).any():
            raise DamagedEntry(f"{EXTENTS_FILE} does not fit the images")
    return Entry(path, meta, map_images(path, shape), extents)


class EntryWriter:
    """Writes one entry into a temporary folder; :meth:`publish` renames it into place.

    ``write(start, images, extents)`` fills consecutive slots from ``start``, in order; slots of images
    that could not be decoded stay zero.  Use it as a context manager: the temporary folder is removed
    unless the entry was published.
    """

    def __init__(self, images_dir: Path, key: str, shape: tuple[int, int, int, int]) -> None:
        self.key, self.shape, self.images_dir = key, shape, images_dir
        self.tmp = images_dir / f".tmp-{key}-{os.getpid()}-{secrets.token_hex(4)}"
        self.tmp.mkdir(parents=True)
        self._file: Any = open(self.tmp / IMAGES_FILE, "wb")  # noqa: SIM115 - closed by publish or __exit__
        self._extents = np.zeros((shape[0], 2), dtype=np.int32)
        self._crc = 0
        self._next = 0
        self._published = False

    def __enter__(self) -> EntryWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._file.close()
        if not self._published:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def write(self, start: int, images: list[np.ndarray | None]) -> None:
        """Store ``images`` (``uint8`` ``[3, h, w]`` within the slot, or ``None`` for a bad one) from slot ``start``."""
        if start != self._next:
            raise ValueError(f"slots are written in order: expected {self._next}, got {start}")
        block = np.zeros((len(images), *self.shape[1:]), dtype=np.uint8)
        for k, image in enumerate(images):
            if image is not None:
                h, w = image.shape[1:]
                block[k, :, :h, :w] = image
                self._extents[start + k] = (h, w)
        data = memoryview(block).cast("B")
        self._file.write(data)  # written in order, so a full disk is an OSError here, not a crash in a memory map
        self._crc = zlib.crc32(data, self._crc)
        self._next = start + len(images)

    def publish(self, meta: dict[str, Any], bad: dict[int, tuple[str, str]]) -> Path:
        """Flush, write the metadata and rename into ``<key>/``; the final folder (another writer's if it won)."""
        if self._next != self.shape[0]:
            raise ValueError(f"{self._next} of {self.shape[0]} slots written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        good = np.ones(self.shape[0], dtype=bool)
        good[list(bad)] = False
        partial = not (self._extents[good] == np.array(self.shape[2:], dtype=np.int32)).all()
        if partial:
            np.save(self.tmp / EXTENTS_FILE, self._extents, allow_pickle=False)
        meta = {
            **meta,
            "format": FORMAT,
            "key": self.key,
            "shape": list(self.shape),
            "extents": partial,
            "bad": {str(i): list(v) for i, v in sorted(bad.items())},
            "crc32": self._crc,
            "versions": _versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        with open(self.tmp / META_FILE, "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        final = self.images_dir / self.key
        try:
            os.rename(self.tmp, final)
        except OSError:  # another writer published first: keep theirs
            if not final.is_dir():
                raise
            shutil.rmtree(self.tmp, ignore_errors=True)
        self._published = True
        return final


def discard(path: Path) -> None:
    """Remove an entry folder: renamed aside first (atomic), so no process opens it half-removed."""
    aside = path.with_name(f".old-{path.name}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def entry_lock(images_dir: Path, key: str, on_wait: Any = None) -> Iterator[None]:
    """Hold an exclusive lock on ``<key>.lock`` while an entry is made; ``on_wait()`` is called before waiting.

    Where ``fcntl`` or ``flock`` is not available the block runs unlocked (atomic publishing still holds).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(images_dir / f"{key}.lock", "a+b") as fh:
        try:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        except OSError:  # a file system without flock
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def leftover(path: Path, max_age_s: float = 86_400.0) -> bool:
    """Whether a temporary or set-aside folder was left by a process that is gone (or is older than ``max_age_s``)."""
    parts = path.name.split("-")
    try:
        pid, age = int(parts[-2]), time.time() - path.stat().st_mtime
    except (ValueError, IndexError, OSError):
        return False
    if age > max_age_s:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False
