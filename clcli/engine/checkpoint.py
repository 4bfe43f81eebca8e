"""Checkpoints: safetensors for tensors, JSON for the rest, written atomically.

Layout of a run folder::

    recipe.yaml  provenance.json  metrics.jsonl
    checkpoints/step-00000500/{model.safetensors, optimizer.safetensors, trainer.json}
    checkpoints/latest          # name of the newest complete checkpoint

A checkpoint is written into a hidden temporary folder, flushed, and only then renamed into
place; ``latest`` is replaced atomically after that.  A kill at any moment therefore leaves the
previous checkpoint intact and ``latest`` pointing at a complete one.

Every temporary carries its writer's host, pid and a random token, so two writers never share one,
and the clean-up of stale temporaries removes only those whose writer is provably gone.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from clcli.errors import CheckpointError, FileSystemError
from clcli.fsio import is_io_failure, os_reason

CKPT_DIR = "checkpoints"
LATEST = "latest"
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"
STATE_FILE = "trainer.json"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"
# a temporary's name ends in -<host>-<pid>-<token>; checkpoint folders start with .tmp-<step name>
_TEMP_TAIL = re.compile(r"-(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-(?P<token>[0-9a-f]{8})$")
_LEGACY_CKPT_TEMP = re.compile(r"^\.tmp-step-\d+-(?P<pid>\d+)$")


def temp_suffix() -> str:
    """``<host>-<pid>-<random token>``: unique to one writer, and names the process that owns the file."""
    return f"{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (owned by someone else) or unknowable: leave its files alone
    return True


def is_abandoned(temp: Path, keep: Path | None = None, own: bool = False) -> bool:
    """Whether ``temp`` is a temporary whose writer is provably gone.

    Only names this module made are judged: ``...-<host>-<pid>-<token>`` from this host whose pid
    is no longer alive, and, with ``own``, this process's leftovers other than ``keep``.  Another
    host's or another live process's temporaries, and names it cannot read, are never abandoned.
    """
    if keep is not None and temp == keep:
        return False
    match = _TEMP_TAIL.search(temp.name)
    if match is not None:
        if match["host"] != _HOST:
            return False
        pid = int(match["pid"])
    else:
        legacy = _LEGACY_CKPT_TEMP.match(temp.name)  # .tmp-step-XXXXXXXX-<pid> from earlier versions
        if legacy is None:
            return False
        pid = int(legacy["pid"])
    if pid == os.getpid():
        return own
    return not _pid_alive(pid)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary of this writer's own, so concurrent writers never collide."""
    prefix = f".{path.name}.tmp-"
    tmp = path.with_name(prefix + temp_suffix())
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)
    for stale in path.parent.glob(prefix + "*"):
        if is_abandoned(stale):
            _remove(stale)


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch optimizer state_dict -> (tensors for safetensors, JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = value
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for pid, entry in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], base64.b64encode(np.asarray(np_state[1]).tobytes()).decode(), *np_state[2:]],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, *rest = meta["numpy"]
    np.random.set_state((name, np.frombuffer(base64.b64decode(keys), dtype=np.uint32), *rest))


def _write_checkpoint(
    run_dir: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    trainer_state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write one checkpoint atomically and prune old ones; returns its folder."""
    root = run_dir / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final = root / name
    tmp = root / f".tmp-{name}-{temp_suffix()}"
    tmp.mkdir()
    opt_tensors, opt_meta = split_optimizer_state(optimizer_state)
    rng_tensors, rng_meta = rng_state()
    save_file(_contiguous(model_state), str(tmp / MODEL_FILE))
    save_file(_contiguous({**opt_tensors, **rng_tensors}), str(tmp / OPTIM_FILE))
    state = dict(trainer_state, optimizer=opt_meta, rng=rng_meta, format=1)
    with open(tmp / STATE_FILE, "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    for file in (MODEL_FILE, OPTIM_FILE):
        with open(tmp / file, "rb") as f:
            os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write_text(root / LATEST, name + "\n")
    complete = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):
        if is_abandoned(stale, keep=tmp, own=True):
            _remove(stale)
    return final


def save_checkpoint(
    run_dir: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    trainer_state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write one checkpoint atomically and prune old ones; returns its folder.

    When the write fails (a full disk, a permission) or is interrupted, the temporaries it made are
    removed and the earlier checkpoints stay as they were; a file-system failure is a
    :class:`~clcli.errors.FileSystemError` naming the run and its newest complete checkpoint.
    """
    root = Path(run_dir) / CKPT_DIR
    before = set(root.glob(".*tmp*")) if root.is_dir() else set()
    try:
        return _write_checkpoint(run_dir, step, model_state, optimizer_state, trainer_state, keep)
    except BaseException as exc:
        for made in set(root.glob(".*tmp*")) - before:
            if made.is_dir() and not made.is_symlink():
                shutil.rmtree(made, ignore_errors=True)
            else:
                made.unlink(missing_ok=True)
        if not is_io_failure(exc):
            raise
        last = latest_checkpoint(Path(run_dir))
        kept = f"; the newest complete checkpoint is {last}" if last else ""
        raise FileSystemError(f"cannot write the checkpoint of step {step} in {root}: {os_reason(exc)}{kept}") from None


def is_complete(path: Path) -> bool:
    return all((path / f).is_file() for f in (MODEL_FILE, OPTIM_FILE, STATE_FILE))


# what a checkpoint's trainer.json must hold for a resume
_STATE_KEYS = ("step", "epoch", "position", "images", "skipped_bad_images", "elapsed", "optimizer", "rng", "recipe")


def read_state(ckpt: Path, require: tuple[str, ...] = _STATE_KEYS) -> dict[str, Any]:
    """A checkpoint's ``trainer.json``; a :class:`CheckpointError` naming the file when it is unreadable.

    ``require``: the fields it must hold (by default all a resume reads; evaluation needs ``step``).
    """
    path = Path(ckpt) / STATE_FILE
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint file {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint file {path} is damaged (not valid JSON: {exc})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint file {path} is damaged (not a JSON object)")
    missing = [k for k in require if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint file {path} is damaged (it lacks {', '.join(missing)})")
    return state


def _check_tensor_file(path: Path) -> None:
    """Open a safetensors file's header (which must cover the whole file); CheckpointError naming it if not."""
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except Exception as exc:  # safetensors reports a bad header or a short file with its own error type
        raise CheckpointError(f"checkpoint file {path} is damaged ({exc})") from None


def verify_checkpoint(ckpt: Path) -> None:
    """Raise :class:`CheckpointError` naming the first damaged file of a checkpoint folder.

    Checks that ``trainer.json`` is a JSON object with a ``step`` and that each safetensors file
    has a readable header whose tensors cover the file exactly (a truncated or overwritten file
    fails); it does not read the tensors themselves.  (A resume then also needs the trainer's other
    fields: :func:`load_checkpoint` names any that are missing.)
    """
    read_state(ckpt, require=("step",))
    for name in (MODEL_FILE, OPTIM_FILE):
        _check_tensor_file(Path(ckpt) / name)


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why a checkpoint folder is damaged (the message of :func:`verify_checkpoint`), or None if intact."""
    try:
        verify_checkpoint(ckpt)
    except CheckpointError as exc:
        return str(exc)
    return None


def _pointer(root: Path) -> Path | None:
    """The folder ``checkpoints/latest`` names, or None when the pointer is missing or unreadable."""
    try:
        name = (root / LATEST).read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        return None
    return root / name


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders with all three files, oldest first."""
    root = Path(run_dir) / CKPT_DIR
    return sorted(p for p in root.glob("step-*") if p.is_dir() and is_complete(p))


def newest_intact_checkpoint(run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that passes :func:`verify_checkpoint`, and the damaged newer ones with why.

    The folder named by ``checkpoints/latest`` is preferred when it is intact (it is the newest
    complete one a run wrote); otherwise the complete folders are tried from the newest down.
    """
    root = Path(run_dir) / CKPT_DIR
    pointer = _pointer(root)
    if pointer is not None and is_complete(pointer) and checkpoint_problem(pointer) is None:
        newer = [p for p in complete_checkpoints(run_dir) if p.name > pointer.name]
        if not newer:
            return pointer, []
    damaged: list[tuple[Path, str]] = []
    for candidate in reversed(complete_checkpoints(run_dir)):
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate, damaged
        damaged.append((candidate, problem))
    return None, damaged


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest intact checkpoint folder of a run, or None (see :func:`newest_intact_checkpoint`)."""
    return newest_intact_checkpoint(run_dir)[0]


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder from a folder, its model file, or a run folder."""
    if path.is_file() and path.name == MODEL_FILE:
        path = path.parent
    if path.is_dir() and is_complete(path):
        return path
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is not None:
            return found
    raise CheckpointError(
        f"{path} is not a checkpoint (expected a folder with {MODEL_FILE}, {OPTIM_FILE} and {STATE_FILE})"
    )


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except Exception as exc:  # safetensors' own error type for a damaged file
        raise CheckpointError(f"checkpoint file {path} is damaged ({exc})") from None


def load_model_state(ckpt: Path) -> dict[str, torch.Tensor]:
    return _load_tensors(Path(ckpt) / MODEL_FILE)


def load_optimizer_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint's optimizer file: ``state.<id>.<name>`` entries and the ``rng.*`` states."""
    return _load_tensors(Path(ckpt) / OPTIM_FILE)


def load_checkpoint(
    ckpt: Path,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(model state, optimizer state, rng tensors, trainer state) of a checkpoint folder.

    A damaged file (unreadable JSON or safetensors, missing fields) is a :class:`CheckpointError`
    naming it.
    """
    model = load_model_state(ckpt)
    extra = _load_tensors(Path(ckpt) / OPTIM_FILE)
    state = read_state(ckpt)
    rng = {k: v for k, v in extra.items() if k.startswith("rng.")}
    try:
        opt = join_optimizer_state({k: v for k, v in extra.items() if k.startswith("state.")}, state["optimizer"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(
            f"checkpoint {ckpt} is damaged: its optimizer state does not read ({type(exc).__name__}: {exc})"
        ) from None
    if "rng.torch" not in rng:
        raise CheckpointError(f"checkpoint file {Path(ckpt) / OPTIM_FILE} is damaged (it lacks the random state)")
    return model, opt, rng, state
