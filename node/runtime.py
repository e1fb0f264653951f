"""Wall-clock time and worker threads for node code: real in a node process, virtual
in a simnet run.

A node process calls blocking work (SQLite, fdatasync, hashing) through
`run_sync`, a trio worker thread, and stamps audit entries, holder checks and
certificates with `now_ns`, the wall clock. simnet runs many nodes' services (the
very same classes) in one trio.run under MockClock(autojump_threshold=0), where a
worker thread would let the virtual clock jump while it works (a 10 s request
timeout fires during a 5 ms SQLite write) and the wall clock would not move with
simulated days. `simulated(clock, epoch_ns)` switches both for the tasks started
inside it (a context variable, which trio copies into every task a task starts):
`run_sync` runs the work inline (it takes no virtual time, as CPU work in a
simulation should) and `now_ns` is epoch_ns plus the virtual time.
"""
from __future__ import annotations

import contextlib
import contextvars
import time

import trio

_SIM: contextvars.ContextVar = contextvars.ContextVar("hypersdk_simulated", default=None)


async def run_sync(fn, *args):
    """fn(*args) in a worker thread (inline, at a checkpoint, in a simulation)."""
    if _SIM.get() is None:
        return await trio.to_thread.run_sync(fn, *args)
    await trio.lowlevel.checkpoint()
    return fn(*args)


def now_ns() -> int:
    """The wall clock in ns since the epoch (the simulated one in a simulation)."""
    sim = _SIM.get()
    if sim is None:
        return time.time_ns()
    clock, epoch_ns = sim
    return epoch_ns + int(clock.current_time() * 1e9)


def now() -> float:
    """now_ns() in seconds."""
    return now_ns() / 1e9


def simulated_run() -> bool:
    return _SIM.get() is not None


@contextlib.contextmanager
def simulated(clock, epoch_ns: int):
    """Inside: virtual wall clock (epoch_ns + clock.current_time()) and inline work,
    for this task and every task it starts."""
    token = _SIM.set((clock, epoch_ns))
    try:
        yield
    finally:
        _SIM.reset(token)
