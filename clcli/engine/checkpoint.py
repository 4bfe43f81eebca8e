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
from safetensors.torch import load_file, save_file

from clcli.errors import CheckpointError

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


def save_checkpoint(
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


def is_complete(path: Path) -> bool:
    return all((path / f).is_file() for f in (MODEL_FILE, OPTIM_FILE, STATE_FILE))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    root = run_dir / CKPT_DIR
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if is_complete(candidate):
            return candidate
    complete = sorted(p for p in root.glob("step-*") if p.is_dir() and is_complete(p))
    return complete[-1] if complete else None


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


def load_model_state(ckpt: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(ckpt / MODEL_FILE))
    except Exception as exc:
        raise CheckpointError(f"cannot read {ckpt / MODEL_FILE}: {exc}") from None


def load_checkpoint(
    ckpt: Path,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(model state, optimizer state, rng tensors, trainer state) of a checkpoint folder."""
    model = load_model_state(ckpt)
    try:
        extra = load_file(str(ckpt / OPTIM_FILE))
        state = json.loads((ckpt / STATE_FILE).read_text())
    except Exception as exc:
        raise CheckpointError(f"checkpoint {ckpt} is unreadable: {exc}") from None
    rng = {k: v for k, v in extra.items() if k.startswith("rng.")}
    opt = join_optimizer_state({k: v for k, v in extra.items() if k.startswith("state.")}, state["optimizer"])
    return model, opt, rng, state
