"""The repair bandwidth bound: a holder pulls copies at most `rate` bytes/s.

`node run --replicate-rate RATE` (e.g. 20M): the fetches a holder makes for
replication (placement and repair, node/replicas/service.py) hand their chunks to
the store through PacedSink, which lets through at most `rate` payload bytes per
second; the downloader's pipeline then waits, so the wire carries about the same.
Restores and manual fetches are not paced. `status` shows the bytes pulled for
replication and the rate they came at.
"""
from __future__ import annotations

import trio


class Pace:
    """A token bucket over trio's clock: take(n) returns once n bytes fit in
    `rate` bytes/s with a burst of one second's worth."""

    def __init__(self, rate: float):
        if rate <= 0:
            raise ValueError("a rate must be positive")
        self.rate = float(rate)
        self._free_at = 0.0
        self.bytes = 0

    async def take(self, n: int) -> None:
        now = trio.current_time()
        start = max(now - 1.0, self._free_at)           # at most 1 s of unused credit
        self._free_at = start + n / self.rate
        self.bytes += n
        if self._free_at > now:
            await trio.sleep_until(self._free_at)
        else:
            await trio.lowlevel.checkpoint()


class PacedSink:
    """A StoreSink whose puts wait for `pace`; everything else is the sink's."""

    def __init__(self, sink, pace: Pace):
        self._sink, self._pace = sink, pace

    def __getattr__(self, name):
        return getattr(self._sink, name)

    async def put(self, cid: bytes, plain, wire=None) -> None:
        await self._pace.take(len(plain) if wire is None else len(wire[2]))
        await self._sink.put(cid, plain, wire=wire)

    async def put_many(self, items) -> None:
        items = list(items)
        await self._pace.take(sum(len(p) if w is None else len(w[2]) for _, p, w in items))
        await self._sink.put_many(items)
