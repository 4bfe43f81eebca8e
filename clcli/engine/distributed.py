"""The process group: the one place that reads torchrun's environment and decides how a run is spread.

``torchrun`` starts one process per device and tells each, through the environment, who it is:
``RANK`` (0 .. WORLD_SIZE-1 over all nodes), ``LOCAL_RANK`` (its index on this node, which picks
its GPU), ``WORLD_SIZE``, and the rendezvous address ``MASTER_ADDR``/``MASTER_PORT``.  Without
those variables nothing is initialised and a run is the plain single-process one.

The backend follows the device: NCCL when the run trains on CUDA (each process on
``cuda:LOCAL_RANK``), gloo on the CPU.  The collectives themselves live in :mod:`clcli.dist`;
this module only starts and ends the group and answers questions about it.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist

from clcli import dist
from clcli.errors import DistributedError

#: The variables torchrun sets for every process and that this module needs.
REQUIRED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: Any of these marks a multi-process launch; then all of REQUIRED_ENV must be there.
LAUNCH_MARKERS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")

T = TypeVar("T")

_owned = False  # whether init_distributed started the current process group (and so may end it)


@dataclass(frozen=True)
class LaunchEnv:
    """What torchrun told this process about itself."""

    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int


@dataclass(frozen=True)
class DistInfo:
    """Who this process is in the run, and the device it trains on."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def _int_var(env: Mapping[str, str], name: str) -> int:
    raw = env[name]
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"the environment variable {name}={raw!r} is not a whole number") from None


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv | None:
    """torchrun's variables from ``environ`` (default: ``os.environ``), or None when this is no launch.

    A launch is marked by ``RANK``, ``WORLD_SIZE`` or ``LOCAL_RANK``.  A partial set (say ``RANK``
    without ``WORLD_SIZE``) is an error rather than a silent single-process run, since the other
    processes would wait for this one forever.
    """
    env = os.environ if environ is None else environ
    present = [name for name in REQUIRED_ENV if env.get(name, "") != ""]
    if not any(name in present for name in LAUNCH_MARKERS):
        return None  # MASTER_ADDR/PORT alone (set cluster-wide on some systems) do not make a launch
    missing = [name for name in REQUIRED_ENV if name not in present]
    if missing:
        raise DistributedError(
            f"a multi-process launch needs {', '.join(REQUIRED_ENV)} in the environment; {', '.join(present)} "
            f"{'is' if len(present) == 1 else 'are'} set but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not. Start the run with torchrun, or unset them"
        )
    rank, local_rank, world = (_int_var(env, n) for n in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    port = _int_var(env, "MASTER_PORT")
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} and WORLD_SIZE={world} do not fit (need 0 <= RANK < WORLD_SIZE)")
    if not 0 <= local_rank <= rank:
        raise DistributedError(f"LOCAL_RANK={local_rank} does not fit RANK={rank} (need 0 <= LOCAL_RANK <= RANK)")
    return LaunchEnv(rank, local_rank, world, env["MASTER_ADDR"], port)


def current() -> DistInfo:
    """This process's place in an already initialised group (or the single-process answer)."""
    if not dist.is_distributed():
        return DistInfo()
    backend = str(torch_dist.get_backend())
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return DistInfo(dist.rank(), local_rank, dist.world_size(), backend, device)


def init_distributed(device: torch.device, timeout: datetime.timedelta = datetime.timedelta(minutes=30)) -> DistInfo:
    """Start the process group when torchrun launched this process; give this rank's device.

    ``device`` is the run's device as the single-process rule chose it (CPU or CUDA).  With no
    torchrun environment nothing happens and ``device`` comes back as it is.  Under torchrun a CUDA
    run uses NCCL on ``cuda:LOCAL_RANK``, a CPU run gloo.  In a process whose group is already up
    it returns that group's answer.  The rendezvous is torchrun's (``env://``), so multi-node
    launches work with torchrun's own flags.
    """
    global _owned
    launch = launch_env()
    if launch is None:
        return DistInfo(device=device)
    if dist.is_distributed():
        return current()
    if not torch_dist.is_available():
        raise DistributedError("this build of PyTorch has no torch.distributed; a multi-process run is impossible")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if launch.local_rank >= count:
            raise DistributedError(
                f"process {launch.rank} has LOCAL_RANK={launch.local_rank} but this node has {count} CUDA "
                f"device(s); start at most {count} processes per node (torchrun --nproc-per-node {count})"
            )
        device = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise DistributedError(f"multi-process training supports CUDA and CPU devices, not {device.type}")
    try:
        torch_dist.init_process_group(
            backend, init_method="env://", rank=launch.rank, world_size=launch.world_size, timeout=timeout
        )
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(
            f"cannot join the process group at {launch.master_addr}:{launch.master_port} as rank {launch.rank} "
            f"of {launch.world_size} ({backend}): {exc}"
        ) from None
    _owned = True
    atexit.register(teardown)  # leave the group when the process ends (no barrier: see teardown)
    return DistInfo(launch.rank, launch.local_rank, launch.world_size, backend, device)


def teardown() -> None:
    """End the process group if :func:`init_distributed` started it.

    No barrier: a process that failed must be free to exit (torchrun then stops the others) rather
    than wait for peers that may be blocked elsewhere.
    """
    global _owned
    if _owned and dist.is_distributed():
        torch_dist.destroy_process_group()
    _owned = False


@contextlib.contextmanager
def distributed_session(device: torch.device) -> Iterator[DistInfo]:
    """``init_distributed`` for the length of a ``with`` block, torn down at its end (also on error)."""
    info = init_distributed(device)
    try:
        yield info
    finally:
        teardown()


def refuse_multi_process(what: str) -> None:
    """Stop a command that runs in one process when torchrun started several: nothing is done twice.

    The main process raises the message (a :class:`DistributedError`); the others exit quietly
    with the same status, so the user reads it once.
    """
    launch = launch_env()
    if launch is None or launch.world_size == 1:
        return
    if launch.rank != 0:
        raise SystemExit(2)
    raise DistributedError(
        f"{what} runs in one process, and torchrun started {launch.world_size}; run it without torchrun "
        "(clcli ... or python -m clcli ...). Only `clcli pretrain` trains data-parallel"
    )


def per_rank_batch(global_batch: int, world_size: int | None = None) -> int:
    """The batch each process trains on when ``global_batch`` (trainer.batch_size) is split over the processes."""
    world = dist.world_size() if world_size is None else world_size
    if global_batch % world != 0:
        lower, upper = (global_batch // world) * world, (global_batch // world + 1) * world
        hint = f"{lower} or {upper}" if lower > 0 else f"{upper}"
        raise DistributedError(
            f"trainer.batch_size={global_batch} is the global batch and must split evenly over the {world} "
            f"processes; use a multiple of {world}, e.g. {hint}"
        )
    return global_batch // world


def on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """Call ``fn`` on the main process (rank 0) only; the others get None.  For printing and writing."""
    return fn(*args, **kwargs) if dist.is_main() else None


def main_only(fn: Callable[..., T]) -> Callable[..., T | None]:
    """Decorator form of :func:`on_main`."""

    def wrapper(*args: Any, **kwargs: Any) -> T | None:
        return on_main(fn, *args, **kwargs)

    wrapper.__name__ = getattr(fn, "__name__", "main_only")
    wrapper.__doc__ = fn.__doc__
    return wrapper
