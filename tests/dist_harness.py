"""The one multi-process harness of the test suite: a small world of CPU processes joined by gloo.

:class:`World` starts ``size`` fresh Python processes (spawned, so nothing leaks from the test
process), lets each join a gloo process group through :func:`clcli.engine.distributed.init_distributed`
with torchrun's environment variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``), and then runs functions on every rank at once::

    with World(2) as world:
        outs = world.run(check_something, arg)   # [rank 0's return value, rank 1's]

The processes stay up between calls, so a test module pays the start-up (importing torch) once;
use the module-scoped ``world`` fixture of the tests that need it.  A function must be importable
(defined at the top of a module) and take and return picklable values.  An exception on any rank
fails the call with that rank's traceback; a call that outlives ``timeout`` seconds fails too.  In
both cases the processes are killed (a rank waiting in a collective for a dead peer would wait for
gloo's half-hour timeout) and the next call starts a fresh world.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import socket
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

START_TIMEOUT = 180.0  # spawning and importing torch on a busy 2-core machine
CALL_TIMEOUT = 120.0


class RankFailed(AssertionError):
    """A function failed (or hung) on at least one rank; the message has each rank's story."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(rank: int, size: int, port: int, conn: Connection, extra_env: dict[str, str]) -> None:
    """A rank's life: join the group, then run what the parent sends until it sends None."""
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(size),
            "LOCAL_WORLD_SIZE": str(size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "CUDA_VISIBLE_DEVICES": "",
            "OMP_NUM_THREADS": "1",
            **extra_env,
        }
    )
    try:
        import torch

        torch.set_num_threads(1)
        from clcli.engine import distributed

        info = distributed.init_distributed(torch.device("cpu"))
        conn.send(("ok", (info.rank, info.world_size, info.backend)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        message = conn.recv()
        if message is None:
            break
        fn, args, kwargs = message
        try:
            conn.send(("ok", fn(*args, **kwargs)))
        except BaseException:
            conn.send(("error", traceback.format_exc()))
    distributed.teardown()


class World:
    """``size`` processes in one gloo group, running functions together (see the module docstring)."""

    def __init__(self, size: int = 2, timeout: float = CALL_TIMEOUT, env: dict[str, str] | None = None) -> None:
        self.size, self.timeout, self.env = size, timeout, dict(env or {})
        self._procs: list[Any] = []
        self._conns: list[Connection] = []

    # ------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        for attempt in range(3):
            ctx = mp.get_context("spawn")
            port = free_port()  # another program may take it before rank 0 binds it: then retry
            for rank in range(self.size):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_serve, args=(rank, self.size, port, child, self.env), daemon=True)
                proc.start()
                child.close()
                self._procs.append(proc)
                self._conns.append(parent)
            try:
                self._collect("start-up", START_TIMEOUT)
                return
            except RankFailed as exc:
                if attempt == 2 or "address already in use" not in str(exc).lower():
                    raise

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        deadline = time.monotonic() + 20
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        self._kill()

    def _kill(self) -> None:
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []

    def __enter__(self) -> World:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------------------------- calls
    def run(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None, **kwargs: Any) -> list[Any]:
        """``fn(*args, **kwargs)`` on every rank at once; the return values in rank order."""
        if not self._procs:
            self.start()
        for conn in self._conns:
            conn.send((fn, args, kwargs))
        return self._collect(getattr(fn, "__name__", repr(fn)), timeout or self.timeout)

    def _collect(self, what: str, timeout: float) -> list[Any]:
        deadline = time.monotonic() + timeout
        results: list[Any] = [None] * self.size
        pending = set(range(self.size))
        failures: dict[int, str] = {}
        while pending:
            for rank in sorted(pending):
                conn, proc = self._conns[rank], self._procs[rank]
                if conn.poll(0.02):
                    try:
                        status, value = conn.recv()
                    except (EOFError, OSError):
                        status, value = "error", f"the process ended (exit code {proc.exitcode}) without answering"
                    pending.discard(rank)
                    if status == "ok":
                        results[rank] = value
                    else:
                        failures[rank] = value
                elif not proc.is_alive():
                    pending.discard(rank)
                    failures[rank] = f"the process died (exit code {proc.exitcode}) without answering"
            if failures and pending:
                # the others are probably blocked in a collective with the failed rank; give them a moment
                grace = time.monotonic() + 3
                while pending and time.monotonic() < grace:
                    for rank in sorted(pending):
                        if self._conns[rank].poll(0.05):
                            status, value = self._conns[rank].recv()
                            pending.discard(rank)
                            if status != "ok":
                                failures[rank] = value
                for rank in pending:
                    failures.setdefault(rank, "still running (waiting for a failed peer?) when the call was abandoned")
                pending.clear()
            if pending and time.monotonic() > deadline:
                for rank in pending:
                    failures[rank] = f"did not answer within {timeout:.0f} s"
                pending.clear()
        if failures:
            self._kill()
            story = "\n".join(f"--- rank {rank} ---\n{text}" for rank, text in sorted(failures.items()))
            raise RankFailed(f"{what} failed on rank(s) {sorted(failures)} of {self.size}:\n{story}")
        return results


def run_ranks(
    fn: Callable[..., Any], *args: Any, size: int = 2, timeout: float = CALL_TIMEOUT, **kwargs: Any
) -> list[Any]:
    """One call of ``fn`` on a fresh world of ``size`` processes, closed afterwards."""
    with World(size, timeout) as world:
        return world.run(fn, *args, **kwargs)
