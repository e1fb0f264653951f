"""What the chunk exchange may hold for its peers: streams and bytes, per peer and in all.

Why (issue 17, attack 1). Each exchange stream reads the chunks a Get asks for
ahead of sending them; a peer that asks and never reads keeps them in memory.
1,000 such streams (4 identities x 250) took a node from 136 MB to 4.9 GB RSS and
made an honest download 5.5x slower. The server now asks this budget before it
reads a chunk for a peer and gives the bytes back once they are sent (or the
stream ends):

    budget = ServeBudget(total=256 << 20, per_peer=16 << 20, streams=256,
                         streams_per_peer=8)
    if not budget.open_stream(peer): refuse the stream     # over the stream caps
    acct = StreamAccount(budget, peer)                     # the stream's share
    await acct.take(estimate)                              # waits: back-pressure
    ... read the chunk; take or give the difference to its real size; send it ...
    acct.give(size)                                        # once sent
    acct.close(); budget.close_stream(peer)                # the stream ends

Rules:
- bytes: at most `total` held for all peers and `per_peer` for one; a request
  that does not fit waits (its stream stops reading requests, so back-pressure
  reaches the peer) instead of buffering. One chunk larger than a limit still
  goes through when nothing else is held by that peer (progress, never deadlock).
- streams: at most `streams_per_peer` open exchange streams per peer and
  `streams` in all; more are refused at once (the peer's downloader uses one
  stream per peer, each holding at most 3 chunks at a time: 8 and 16 MiB are
  generous).
- fairness: a peer's waiting chunks are admitted in order, and a peer at its
  own limit never blocks another peer's admission (each waiter checks only the
  limits it would exceed).
- bounded bookkeeping: a peer's entry exists only while it has a stream open
  or bytes held, so the map is bounded by the stream cap.

Why not py-libp2p's resource manager (libp2p/rcmgr). py-libp2p 0.8.1 gives every
host a default ResourceManager already (ours included): 1,000 connections, 10,000
streams and 512 MB of "memory" node-wide. Its stream limit is one node-wide count
(no per-peer or per-protocol stream limit is wired into the swarm), so lowering it
would let a flood take every honest peer's streams too; and its memory is only what
code reserves with acquire_memory, which neither yamux's buffers nor our handlers
do. Measured: with it active and without this budget, the flood test took the victim
to 1,408 MiB RSS (tests/node/exchange/test_flood_never_reading.py). What bounds the
attack is application-level (the chunks a Get makes us read) and per peer, so it
lives here; rcmgr stays as py-libp2p configures it.

Pure trio (no I/O); the daemon sizes it from `node run --serve-memory` (default
256 MiB: DEFAULT_TOTAL; 1/16 of it per peer).
"""
from __future__ import annotations

from collections import Counter

import trio

DEFAULT_TOTAL = 256 << 20
DEFAULT_PER_PEER = 16 << 20
DEFAULT_STREAMS = 256
DEFAULT_STREAMS_PER_PEER = 8


class ServeBudget:
    def __init__(self, total: int = DEFAULT_TOTAL, per_peer: int = DEFAULT_PER_PEER,
                 streams: int = DEFAULT_STREAMS,
                 streams_per_peer: int = DEFAULT_STREAMS_PER_PEER):
        if min(total, per_peer, streams, streams_per_peer) < 1:
            raise ValueError("every limit must be positive")
        self.total, self.per_peer = total, min(per_peer, total)
        self.max_streams, self.max_streams_per_peer = streams, streams_per_peer
        self.used = 0
        self.high_water = 0
        self.taken = 0                              # bytes ever held (monotonic)
        self._by_peer: Counter = Counter()          # bytes held per peer
        self._streams: Counter = Counter()          # open streams per peer
        self._changed = trio.Event()
        self.counters: Counter = Counter()

    # -- streams ----------------------------------------------------------------------
    @property
    def streams(self) -> int:
        return sum(self._streams.values())

    def open_stream(self, peer: bytes) -> bool:
        """Count a new stream of `peer`; False (and nothing counted) over a cap."""
        if self._streams[peer] >= self.max_streams_per_peer:
            self.counters["streams refused: per peer"] += 1
            self._forget(peer)
            return False
        if self.streams >= self.max_streams:
            self.counters["streams refused: node"] += 1
            self._forget(peer)
            return False
        self._streams[peer] += 1
        return True

    def close_stream(self, peer: bytes) -> None:
        if self._streams[peer] > 0:
            self._streams[peer] -= 1
        self._forget(peer)

    def _forget(self, peer: bytes) -> None:
        if not self._streams[peer]:
            del self._streams[peer]
        if not self._by_peer[peer]:
            del self._by_peer[peer]

    # -- bytes ------------------------------------------------------------------------
    def _fits(self, peer: bytes, n: int) -> bool:
        mine = self._by_peer[peer]
        if mine and mine + n > self.per_peer:
            return False
        return not (self.used and self.used + n > self.total)

    async def acquire(self, peer: bytes, n: int) -> None:
        """Wait until `n` more bytes fit for `peer`, then count them."""
        waited = False
        while not self._fits(peer, n):
            if not waited:
                self.counters["waits"] += 1
                waited = True
            changed = self._changed
            await changed.wait()
        self._take(peer, n)

    def _take(self, peer: bytes, n: int) -> None:
        self.used += n
        self.taken += n
        self._by_peer[peer] += n
        self.high_water = max(self.high_water, self.used)

    def release(self, peer: bytes, n: int) -> None:
        if n <= 0:
            return
        n = min(n, self._by_peer[peer])
        self.used -= n
        self._by_peer[peer] -= n
        self._forget(peer)
        self._changed.set()
        self._changed = trio.Event()

    def status(self) -> dict:
        return {"bytes_held": self.used, "high_water": self.high_water,
                "limit": self.total, "per_peer": self.per_peer, "streams": self.streams,
                "stream_limit": self.max_streams,
                "streams_per_peer": self.max_streams_per_peer,
                "peers": len(self._streams), **dict(self.counters)}


class StreamAccount:
    """The bytes one stream holds of a ServeBudget (take / give; close() gives back
    whatever is still held: a stream that ends mid-Get leaks nothing)."""

    def __init__(self, budget: "ServeBudget | None", peer: bytes):
        self.budget, self.peer, self.held = budget, peer, 0

    async def take(self, n: int) -> None:
        if self.budget is not None and n > 0:
            await self.budget.acquire(self.peer, n)
            self.held += n
        else:
            await trio.lowlevel.checkpoint()

    def give(self, n: int) -> None:
        n = min(n, self.held)
        if n > 0:
            self.budget.release(self.peer, n)
            self.held -= n

    def close(self) -> None:
        self.give(self.held)


__all__ = ["ServeBudget", "StreamAccount", "DEFAULT_TOTAL", "DEFAULT_PER_PEER", "DEFAULT_STREAMS",
           "DEFAULT_STREAMS_PER_PEER"]
