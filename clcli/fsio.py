"""File-system checks and writes that end in one user error, never a traceback.

Commands check where they will write before the long work starts (:func:`check_output_folder` for
a run folder, :func:`check_output_file` for an exported file or a result), and write files through
:func:`atomic_output`: a temporary beside the target that replaces it only when complete and is
removed on any failure.  :func:`os_error` turns an ``OSError`` (missing path, a file where a folder
is expected or the reverse, no permission, a read-only file system, a full disk) into a
:class:`~clcli.errors.FileSystemError` that names the path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

from clcli.errors import ClcliError, FileSystemError

__all__ = [
    "FILE_SYSTEM_ERRNOS",
    "atomic_output",
    "check_output_file",
    "check_output_folder",
    "is_io_failure",
    "os_error",
    "os_reason",
]

# errno values that describe the user's file system rather than a bug
FILE_SYSTEM_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ENOENT", "EACCES", "EPERM", "EROFS", "ENOSPC", "EDQUOT", "EEXIST", "EISDIR", "ENOTDIR", "ENOTEMPTY",
        "ENAMETOOLONG", "EIO", "EFBIG", "ELOOP", "EBUSY", "ETXTBSY", "EXDEV", "EMFILE", "ENFILE", "ENODEV", "ENXIO",
        "ESTALE",
    )
    if hasattr(errno, name)
)  # fmt: skip

_PLAIN = {
    errno.ENOSPC: "no space left on the device (the disk is full)",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder, not a file",
    errno.EEXIST: "it already exists",
}


def os_reason(exc: BaseException) -> str:
    """What went wrong, in words: "no space left on the device (the disk is full)", "permission denied", ..."""
    if not isinstance(exc, OSError):
        return str(exc) or type(exc).__name__
    if exc.errno is not None and exc.errno == getattr(errno, "EDQUOT", None):
        return "the disk quota is exceeded"
    return _PLAIN.get(exc.errno or -1) or exc.strerror or str(exc) or type(exc).__name__


def os_error(exc: OSError, action: str, path: str | os.PathLike[str] | None = None) -> FileSystemError:
    """A :class:`FileSystemError` saying ``cannot <action> <path>: <reason>`` for ``exc``."""
    where = path if path is not None else exc.filename
    target = f" {os.fspath(where)}" if where is not None else ""
    return FileSystemError(f"cannot {action}{target}: {os_reason(exc)}")


def _first_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (the current folder for a relative path that does not)."""
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(".")


def _probe_writable(folder: Path, what: str, target: Path) -> None:
    """Create and remove a temporary file in ``folder``; a failure is the user's, naming ``target``."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".clcli-write-check-")
    except OSError as exc:
        inside = "" if Path(folder) == target else f" (creating a file in {folder} failed)"
        raise FileSystemError(f"cannot write {what} {target}: {os_reason(exc)}{inside}") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(name)


def check_output_folder(path: str | os.PathLike[str], what: str = "the run folder") -> None:
    """Refuse, before any work, a folder that is a file, lies under a file, or cannot be written.

    Nothing is created: the folder itself when it exists, else its nearest existing ancestor, gets a
    temporary file created and removed.
    """
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        raise FileSystemError(f"{what} {path} is a file, not a folder")
    base = _first_existing(path)
    if not base.is_dir():
        raise FileSystemError(f"cannot create {what} {path}: {base} is a file, not a folder")
    _probe_writable(base, what, path)


def check_output_file(path: str | os.PathLike[str], what: str = "the output", example: str = "out.json") -> None:
    """Refuse, before any work, an output file that is a folder, lies under a file, or cannot be written.

    An existing file is allowed (it is replaced when the new one is complete).  Nothing is created;
    ``example`` is the file name the message suggests inside a folder given by mistake.
    """
    path = Path(path)
    if path.is_dir():
        raise FileSystemError(f"{what} {path} is a folder; give a file name (for example {path / example})")
    if not path.name or path.name in (".", ".."):
        raise FileSystemError(f"{what} {path!s} names no file")
    base = _first_existing(path.parent)
    if not base.is_dir():
        raise FileSystemError(f"cannot create {what} {path}: {base} is a file, not a folder")
    _probe_writable(base, what, path)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], what: str = "the output", example: str = "out.json") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; it replaces ``path`` when the block ends.

    Missing parent folders are created.  On any failure (an exception, Ctrl-C) the temporary is
    removed; an ``OSError`` (and a writer's I/O failure, such as safetensors' on a full disk)
    becomes a :class:`FileSystemError` naming ``path``.
    """
    path = Path(path)
    check_output_file(path, what, example)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(exc, f"create the folder of {what}", path.parent) from None
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")  # unique to this writer
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, ClcliError):
            raise
        if isinstance(exc, OSError):
            raise os_error(exc, f"write {what}", path) from None
        if isinstance(exc, Exception) and is_io_failure(exc):
            raise FileSystemError(f"cannot write {what} {path}: {exc}") from None
        raise


def is_io_failure(exc: BaseException) -> bool:
    """Whether ``exc`` reports an I/O failure: an ``OSError``, or a writer's own error type that wraps one
    (safetensors says ``I/O error: ... (os error 28)``)."""
    if isinstance(exc, OSError):
        return True
    text = str(exc)
    return any(s in text for s in ("I/O error", "IoError", "(os error", "No space left", "Permission denied"))
