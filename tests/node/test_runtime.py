"""node/runtime.py: the wall clock and worker threads of node code, real in a node
process, virtual and inline inside runtime.simulated (simnet's whole nodes)."""
from __future__ import annotations

import threading
import time

import trio
import trio.testing

from hypersdk.node import runtime

EPOCH = 1_790_000_000 * 10**9


def test_outside_a_simulation_time_is_the_wall_clock_and_work_runs_in_a_thread():
    async def main():
        before = time.time_ns()
        now = runtime.now_ns()
        after = time.time_ns()
        assert before <= now <= after
        assert not runtime.simulated_run()
        return await runtime.run_sync(threading.get_ident)
    assert trio.run(main) != threading.get_ident()


def test_inside_a_simulation_the_clock_follows_virtual_time_and_work_is_inline():
    clock = trio.testing.MockClock(autojump_threshold=0)
    seen = {}

    async def child():
        seen["child"] = runtime.now_ns()               # a task started inside inherits it

    async def main():
        with runtime.simulated(clock, EPOCH):
            assert runtime.simulated_run()
            t0 = runtime.now_ns()
            assert t0 == EPOCH + int(clock.current_time() * 1e9)
            await trio.sleep(86400 * 3)                 # three simulated days
            assert runtime.now_ns() - t0 == 86400 * 3 * 10**9
            v0 = trio.current_time()
            ident = await runtime.run_sync(threading.get_ident)
            assert ident == threading.get_ident()       # inline, in the trio thread
            assert trio.current_time() == v0            # and it took no virtual time
            async with trio.open_nursery() as n:
                n.start_soon(child)
            assert seen["child"] == runtime.now_ns()
        assert not runtime.simulated_run()              # restored on the way out
    trio.run(main, clock=clock)
