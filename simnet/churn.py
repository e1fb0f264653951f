"""Churn: nodes leave and join a SimNetwork at a given rate, in virtual time.

Churn events form a Poisson process: the gaps between them are drawn with
rng.expovariate, so over a long run there are about rate_per_hour events per
hour. Each event retires one live node, picked uniformly with the injected
rng, and spawns a fresh one, so the population stays constant. The caller
builds and stops node objects (they own nurseries, stores, keys); churn only
decides when and who:

    retire(addr)  stop the node at addr (sync or async). Churn then makes
                  sure the address is gone from the network (remove_node,
                  which resets the node's open streams): a departure is
                  abrupt, like a crash or a pulled cable.
    spawn()       build a new node and add it to the network (sync or async).

The next gap is drawn when an event's callbacks return, so callbacks that
take virtual time (a bootstrap) slow the rate down: keep them quick or start
the slow part in a nursery of their own.

Returns the events it caused, in order: (time, "leave" | "join", addr).
Deterministic for a given rng and a given population (live nodes are
picked from the sorted address list).
"""
from __future__ import annotations

import inspect
import random
from typing import Callable, NamedTuple

import trio

from hypersdk.simnet.transport import SimNetwork


class ChurnEvent(NamedTuple):
    time: float
    kind: str           # "leave" | "join"
    addr: str


async def _call(fn, *args):
    result = fn(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


async def churn(net: SimNetwork, *, rate_per_hour: float, rng: random.Random,
                spawn: Callable[[], object], retire: Callable[[str], object],
                duration: float) -> list[ChurnEvent]:
    """Replace random nodes at rate_per_hour for `duration` virtual seconds."""
    if rate_per_hour <= 0:
        raise ValueError("rate_per_hour must be positive")
    events: list[ChurnEvent] = []
    end = trio.current_time() + duration
    rate = rate_per_hour / 3600.0
    while True:
        at = trio.current_time() + rng.expovariate(rate)
        if at >= end:
            await trio.sleep_until(end)
            return events
        await trio.sleep_until(at)
        live = sorted(net.nodes)
        if live:
            addr = rng.choice(live)
            await _call(retire, addr)
            net.remove_node(addr)
            events.append(ChurnEvent(trio.current_time(), "leave", addr))
        before = set(net.nodes)
        await _call(spawn)
        for addr in net.nodes:                  # dict order: insertion order
            if addr not in before:
                events.append(ChurnEvent(trio.current_time(), "join", addr))
