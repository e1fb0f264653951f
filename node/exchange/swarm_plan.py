"""The swarm downloader's scheduling core: which chunk to ask which peer for, when.

Pure (sans-I/O): no trio, no sockets, no clock. Time is the `now` argument
(seconds, any origin), randomness is the injected `rng`. The I/O glue (node/)
owns the streams; it tells the plan what happened and sends what the plan says.

API (times are the caller's `now`, in seconds):

    plan = SwarmPlan(needed, sizes_or_estimate, rng, Tunables())
    plan.add_peer(peer, have)               have: a set of ids, or a predicate id -> bool
    plan.update_have(peer, ids)
    plan.remove_peer(peer) -> ids           what was in flight there (re-pended)
    plan.next_requests(now) -> [(peer, ids)]    send each as one exchange.Get
    plan.on_data(peer, id, nbytes, now) -> new? after exchange.open_data() accepted it
    plan.on_bad(peer, id, now)              open_data() raised (hash mismatch, bad zstd)
    plan.on_missing(peer, id)               the peer answered Missing
    plan.expire(now) -> [(peer, id)]        requests given up (call at next_deadline)
    plan.take_cancelled() -> [(peer, id)]   redundant copies the caller may cancel
    plan.next_deadline(now), finished, endgame, stuck(now), unavailable(), progress()

The glue loop: after every batch of events (arrivals, a peer joining, a
deadline passing) call expire(now), then next_requests(now), send, and sleep
until the next arrival or next_deadline(now); stop when finished, or report
unavailable() when stuck(now).

Theory of operation
-------------------
Every needed chunk is in exactly one of three states:

    PENDING  --next_requests-->  IN FLIGHT  --on_data-->  DONE
       ^                            |
       +--- on_bad / on_missing / expire / remove_peer / ban (last copy lost)

A chunk IN FLIGHT may be requested from up to 1 + max_extra_copies peers at once
(duplicates: endgame and slow peers, below); it goes back to PENDING only when its
last copy is lost, and becomes DONE at the first verified arrival (the other
copies are then reported by take_cancelled(), and a late arrival of one is
on_data -> False). DONE is final: a chunk is completed exactly once.

A peer holds a chunk when its have set (or have callable, or update_have) says so,
minus what it answered Missing for and what it sent corrupt. A peer is *usable*
for a chunk when it holds it and is not banned. Only usable peers are asked.

Rules, in the order next_requests(now) applies them:

1. Rarest first. Each peer draws from its own heap of the PENDING chunks it can
   serve, keyed (number of usable holders, random tiebreak drawn once per chunk
   from rng). Counts are kept exact lazily: an entry whose count went up is
   re-queued at the right place when popped; when a count goes down (a holder
   left, was banned, or lacks/corrupted the chunk), fresh entries are pushed to
   the remaining holders and the old ones are skipped. Peers are served fastest
   first (measured rate; unmeasured peers rank as the median, ties random).
2. Windows. A peer has at most floor(window) requests outstanding (chunks, not
   bytes: chunks are all about chunk_size). The window starts at
   initial_window (4) and adapts per verified arrival, a delay-based rule
   (TCP Vegas in spirit): if the request's latency (send -> arrival, which
   includes the time it queued behind the peer's other requests) was at most
   target_latency, window += 1 (slow start: it doubles per round trip); if it
   was longer, window = max(1, rate * target_latency / chunk_size), the number
   of chunks the peer delivers within the target latency at its measured rate.
   So a window settles at what keeps the peer busy without queueing more than
   target_latency of work on it, clamped to [1, max_window]. A corrupt chunk
   halves the window; a timeout sets it to 1.
3. Rate. Per peer, bytes over busy time: an arrival's busy time is the time
   since the later of the previous arrival and its own send, so pipelined
   requests are not double counted. Both sums decay by exp(-busy / rate_horizon),
   an average over the last ~0.25 s of busy time, not over the last few
   arrivals: arrivals come in bursts (one receive carries several chunks; the
   downloader reads while it is not verifying), and an average over arrivals
   swung 0.2-2.6x around a peer's true rate with the burst phase.
   An arrival's time is when its bytes arrived (on_data's `now`; the swarm passes
   the session reader's timestamp), not when a busy downloader got to verify it:
   a peer is measured by what it delivers, not by how busy the downloader is.
4. Deadlines. A request sent as the k-th outstanding one of a peer with rate r
   expires at now + max(min_timeout, timeout_slack * k * size / r)
   (r unknown: the median rate of the peers measured so far, so a peer that
   accepts requests and stalls is noticed within about min_timeout once any peer
   delivers; initial_timeout while no peer is measured). expire(now) handles them: responses
   on one stream come in order, so when one request of a peer expires, all of
   that peer's outstanding requests are returned to the pool (they queue behind
   it), its window drops to 1 and it is paused (not asked) for
   pause_base * 2**(consecutive timeouts - 1) seconds, capped at pause_max.
   A verified arrival resets the count; max_timeouts (4) in a row ban the peer
   for this download (it is unresponsive), so a hung peer cannot hold a chunk
   hostage forever and every download ends: finished, or stuck().
5. Slow peers. A peer with at least min_samples arrivals whose rate is below
   slow_factor (1/4) of the median rate of the other measured, unbanned peers
   is slow: its window drops at once to what it delivers within target_latency
   (rule 2 would get there only at its next arrival), and every chunk in flight
   only at slow peers may be copied to a non-slow holder that would deliver it
   first (the test of rule 6, bounded as there). It stops being slow when its
   rate is back above recover_factor (1/2) of that median. Its window is not
   held at 1: with one request in flight a peer's rate measures the round trip,
   not its capacity, and a peer that was only briefly behind (a stall, a burst
   of arrivals read late) could never measure fast enough to recover.
6. Endgame. When no PENDING chunk has a usable holder (everything left is in
   flight, or unavailable), peers with spare window also take chunks in flight
   elsewhere that they hold, fewest copies first, at most max_extra_copies (2)
   extra copies of a chunk at a time, and only copies that would arrive first:
   a copy is expected when the peer's queue (its in-flight bytes at its rate)
   and the chunk are through; a chunk in flight is expected when the answers
   ahead of it on its peer's stream (answered in order) and it are through at
   that peer's rate; if that is d in the past, d - overdue_grace (0.1 s) from
   now, at least now (a stalled peer's chunks are copied soon, not only once
   they expire; a chunk a little late is most likely on its way, arrivals come
   in bursts). So a chunk queued deep at a slow, busy or stalled peer is
   copied to an idle one, and one about to arrive is not (BENCHMARKS.md, swarm
   section, has the duplicates this saves). While the copying peer's rate is
   unknown (no arrival yet), the earlier rule holds: any chunk in flight elsewhere.
7. Bad data. on_bad(peer, chunk) excludes that peer for that chunk, halves its
   window, and after max_bad (3) bad chunks bans it: it is never asked again
   (add_peer with its id is ignored), and its in-flight chunks go back to the pool.

"Not available" is a value: progress().unavailable counts PENDING chunks with
no usable holder, unavailable() lists them, stuck() says nothing can progress
until new peers or have-information arrive.
"""
from __future__ import annotations

import heapq
import random
import statistics
from dataclasses import dataclass, field
from math import exp, inf
from typing import Callable, Hashable, Iterable, Mapping

from hypersdk.protocol.exchange import MAX_GET_IDS

Peer = Hashable
ChunkId = bytes


@dataclass(frozen=True)
class Tunables:
    initial_window: float = 4
    max_window: float = 32
    max_batch: int = MAX_GET_IDS          # ids per Get request
    refill_fraction: float = 0.25         # a busy peer gets more once this much of its
                                          # window is free (a Get per few chunks)
    target_latency: float = 0.5           # seconds of work queued on a peer
    initial_timeout: float = 30.0         # deadline while a peer's rate is unknown
    min_timeout: float = 2.0
    timeout_slack: float = 4.0
    rate_horizon: float = 0.25            # seconds of busy time a rate is averaged over
    max_bad: int = 3
    max_timeouts: int = 4                 # consecutive expiries before a peer is dropped
    slow_factor: float = 0.25
    recover_factor: float = 0.5
    min_samples: int = 4
    max_extra_copies: int = 2
    overdue_grace: float = 0.1            # endgame: lateness (s) still taken as "due now"
    pause_base: float = 1.0
    pause_max: float = 60.0


@dataclass(frozen=True)
class Progress:
    needed: int
    done: int
    in_flight: int            # distinct chunks with at least one outstanding request
    pending: int              # waiting to be requested (including unavailable ones)
    unavailable: int          # pending with no usable holder
    bytes_by_peer: dict       # peer -> verified new bytes it served (removed peers too)
    duplicate_bytes: int      # bytes of chunks that arrived after another copy


@dataclass
class _Req:
    sent: float
    deadline: float


@dataclass(eq=False)
class _PeerState:
    id: Peer
    have: frozenset | set | None
    have_fn: Callable[[bytes], bool] | None
    order: float                          # random tiebreak among equal rates
    window: float
    extra: set = field(default_factory=set)      # update_have
    lacks: set = field(default_factory=set)      # answered Missing
    corrupt: set = field(default_factory=set)    # sent bad data for these
    heap: list = field(default_factory=list)
    inflight: dict = field(default_factory=dict)  # chunk id -> _Req
    bytes_acc: float = 0.0
    time_acc: float = 0.0
    samples: int = 0
    last_arrival: float = float("-inf")
    bad: int = 0
    timeouts: int = 0
    paused_until: float = float("-inf")
    banned: bool = False
    slow: bool = False
    served_bytes: int = 0
    served_chunks: int = 0
    first_sent: float | None = None       # when it was first asked for anything
    dup_bytes: int = 0

    @property
    def rate(self) -> float | None:
        return self.bytes_acc / self.time_acc if self.samples and self.time_acc > 0 else None

    def holds(self, cid: bytes) -> bool:
        if cid in self.lacks or cid in self.corrupt:
            return False
        if cid in self.extra:
            return True
        if self.have is not None:
            return cid in self.have
        return bool(self.have_fn(cid)) if self.have_fn is not None else False


class SwarmPlan:
    """Schedules the download of `needed` chunks from a changing set of peers.

    needed: chunk ids in the caller's preferred order, already without the
    chunks held locally (duplicates are dropped). sizes: a mapping chunk id ->
    byte length, or one estimated size for every chunk.
    """

    def __init__(self, needed: Iterable[bytes], sizes: Mapping[bytes, int] | int,
                 rng: random.Random, tunables: Tunables = Tunables()):
        self.t = tunables
        self._rng = rng
        self._med: float | None | bool = False   # cached median rate (_median_rate)
        self._order = list(dict.fromkeys(needed))
        if isinstance(sizes, int):
            self._est = sizes
            self._sizes: Mapping = {}
        else:
            self._sizes = sizes
            self._est = int(statistics.median(sizes.values())) if sizes else 1 << 20
        self._tb = {c: rng.random() for c in self._order}
        self._pending: set = set(self._order)
        self._copies: dict = {}                   # chunk id -> set of peers asked
        self._done: set = set()
        self._holders: dict = {c: set() for c in self._order}   # usable holders, not done
        self._peers: dict = {}
        self._banned: set = set()
        self._cancelled: list = []
        self._dup_bytes = 0
        self._served: dict = {}                   # peer -> new verified bytes (kept
                                                  # after remove_peer, for the report)

    # -- peers ---------------------------------------------------------------------------

    def add_peer(self, peer: Peer, have: Iterable[bytes] | Callable[[bytes], bool]) -> None:
        """A peer that can serve the chunks `have` says (a set or a predicate)."""
        if peer in self._banned:
            return
        if peer in self._peers:
            raise ValueError(f"peer {peer!r} is already known")
        fn = have if callable(have) and not isinstance(have, (set, frozenset)) else None
        hs = None if fn is not None else (have if isinstance(have, (set, frozenset))
                                          else frozenset(have))
        p = _PeerState(peer, hs, fn, self._rng.random(), float(self.t.initial_window))
        self._peers[peer] = p
        if hs is not None and len(hs) < len(self._holders):
            candidates = [c for c in hs if c in self._holders]
        else:
            candidates = list(self._holders)
        for c in candidates:
            if p.holds(c):
                self._add_holder(p, c)

    def update_have(self, peer: Peer, ids: Iterable[bytes]) -> None:
        """The peer now also holds `ids` (clears an earlier Missing for them)."""
        p = self._peers.get(peer)
        if p is None or p.banned:
            return
        for c in ids:
            p.lacks.discard(c)
            p.extra.add(c)
            if c in self._holders and p.holds(c) and p.id not in self._holders[c]:
                self._add_holder(p, c)

    def remove_peer(self, peer: Peer) -> tuple[bytes, ...]:
        """Forget a peer (disconnected). Returns the chunks that were in flight at it;
        those without another copy in flight are pending again. Nothing else is lost."""
        p = self._peers.pop(peer, None)
        if p is None:
            return ()
        lost = tuple(p.inflight)
        self._drop_holder_everywhere(p)
        return lost

    # -- scheduling ----------------------------------------------------------------------

    def next_requests(self, now: float) -> list[tuple[Peer, tuple[bytes, ...]]]:
        """Batches to send now: [(peer, chunk ids)], each at most max_batch ids."""
        self._med = False                     # _median_rate(): not computed yet
        self._update_slow()
        out: dict = {}
        order = self._peer_order(now)
        for p in order:
            free = self._free(p)
            batch = out.setdefault(p.id, [])
            if p.inflight and free < max(1, int(p.window * self.t.refill_fraction)):
                continue                      # top up in batches, not one Get per chunk
            while free > 0 and len(batch) < self.t.max_batch:
                c = self._pop_candidate(p)
                if c is None:
                    break
                self._send(p, c, now)
                batch.append(c)
                free -= 1
        endgame = self.endgame
        if endgame or any(q.slow for q in self._peers.values()):
            self._duplicates(order, out, now, endgame)
        return [(peer, tuple(ids)) for peer, ids in out.items() if ids]

    def _duplicates(self, order, out, now, endgame) -> None:
        cap = 1 + self.t.max_extra_copies
        if endgame:
            pool = list(self._copies)
        else:                                 # only what sits at slow peers
            pool = list(dict.fromkeys(c for q in self._peers.values() if q.slow
                                      for c in q.inflight))
        etas = None
        for p in order:
            if p.slow:
                continue
            free = self._free(p)
            batch = out[p.id]
            if free <= 0 or len(batch) >= self.t.max_batch:
                continue
            cands = [c for c in pool if (cp := self._copies.get(c)) is not None
                     and len(cp) < cap and p.id not in cp and p.id in self._holders[c]
                     and (endgame or all(self._peers[q].slow for q in cp))]
            room = min(free, self.t.max_batch - len(batch))
            t = self._copy_eta(p, now)
            if t is None:
                cands.sort(key=lambda c: (len(self._copies[c]), self._tb[c]))
                take = cands[:room]
            else:                             # only copies that would arrive first
                if etas is None:
                    etas = self._etas(now)
                cands.sort(key=lambda c: (len(self._copies[c]), -etas.get(c, inf), self._tb[c]))
                take = []
                for c in cands:
                    if len(take) >= room:
                        break
                    at = t + self._size(c) / p.rate
                    e = etas.get(c, inf)
                    if e <= at:
                        continue
                    take.append(c)
                    t = etas[c] = at
            for c in take:
                self._send(p, c, now)
                batch.append(c)

    def _copy_eta(self, p: _PeerState, now: float) -> float | None:
        """When p would start on one more request sent now (None: its rate is unknown)."""
        if p.rate is None:
            return None
        queued = sum(self._size(c) for c in p.inflight)
        return max(now, p.last_arrival) + queued / p.rate

    def _etas(self, now: float) -> dict:
        """In-flight chunk -> when its earliest copy is expected: answers come in
        request order per peer, at the peer's measured rate, from its last arrival
        (or its oldest request, if later). A copy at a peer with no rate yet is not
        counted (the chunk is then missing here: expected never, a candidate)."""
        out: dict = {}
        for q in self._peers.values():
            if not q.inflight or q.rate is None:
                continue
            t = max(q.last_arrival, min(r.sent for r in q.inflight.values()))
            for c in q.inflight:
                t += self._size(c) / q.rate
                # overdue by d: expected d - overdue_grace from now (the later, the
                # less trusted), so a stalled peer's chunks soon go to a peer that
                # would deliver sooner; a chunk just past its estimate is most likely
                # on its way (arrivals come in bursts: one receive carries several)
                at = t if t >= now else now + max(0.0, now - t - self.t.overdue_grace)
                if at < out.get(c, inf):
                    out[c] = at
        return out

    def _peer_order(self, now: float) -> list:
        rates = [p.rate for p in self._peers.values() if p.rate is not None]
        med = statistics.median(rates) if rates else 0.0
        live = [p for p in self._peers.values() if not p.banned and p.paused_until <= now]
        live.sort(key=lambda p: (-(p.rate if p.rate is not None else med), p.order))
        return live

    def _free(self, p: _PeerState) -> int:
        return int(p.window) - len(p.inflight)

    def _pop_candidate(self, p: _PeerState) -> bytes | None:
        heap = p.heap
        while heap:
            count, tb, c = heap[0]
            holders = self._holders.get(c)
            if c not in self._pending or holders is None or p.id not in holders:
                heapq.heappop(heap)
                continue
            if count != len(holders):
                heapq.heappop(heap)
                if count < len(holders):      # more holders now: requeue where it belongs
                    heapq.heappush(heap, (len(holders), tb, c))
                continue                      # fewer: a fresh entry was pushed already
            heapq.heappop(heap)
            return c
        return None

    def _send(self, p: _PeerState, c: bytes, now: float) -> None:
        k = len(p.inflight) + 1
        r = p.rate
        if r is None:                         # judged by what its peers deliver meanwhile
            r = self._median_rate()
        if r is None:
            deadline = now + self.t.initial_timeout
        else:
            deadline = now + max(self.t.min_timeout,
                                 self.t.timeout_slack * k * self._size(c) / r)
        p.inflight[c] = _Req(now, deadline)
        if p.first_sent is None:
            p.first_sent = now
        self._pending.discard(c)
        self._copies.setdefault(c, set()).add(p.id)

    # -- outcomes ------------------------------------------------------------------------

    def on_data(self, peer: Peer, cid: bytes, nbytes: int, now: float) -> bool:
        """A verified chunk arrived. True if it was new; False for a duplicate
        (an endgame copy, a late answer to an expired request, or not needed)."""
        p = self._peers.get(peer)
        req = p.inflight.pop(cid, None) if p is not None else None
        if req is not None:
            cp = self._copies.get(cid)
            if cp is not None:
                cp.discard(peer)
            self._measure(p, req, nbytes, now)
        if cid in self._done or cid not in self._holders:
            self._dup_bytes += nbytes
            if p is not None:
                p.dup_bytes += nbytes
            return False
        self._done.add(cid)
        self._pending.discard(cid)
        del self._holders[cid]
        for q in self._copies.pop(cid, ()):
            qs = self._peers.get(q)
            if qs is not None and qs.inflight.pop(cid, None) is not None:
                self._cancelled.append((q, cid))
        if p is not None:
            p.served_bytes += nbytes
            p.served_chunks += 1
        self._served[peer] = self._served.get(peer, 0) + nbytes
        return True

    def on_bad(self, peer: Peer, cid: bytes, now: float) -> None:
        """The chunk `peer` sent for `cid` failed verification."""
        p = self._peers.get(peer)
        if p is None:
            return
        p.corrupt.add(cid)
        self._drop_holder(p, cid)
        self._lose(p, cid)
        p.bad += 1
        p.window = max(1.0, p.window / 2)
        if p.bad >= self.t.max_bad:
            self._ban(p)

    def on_missing(self, peer: Peer, cid: bytes) -> None:
        """The peer answered Missing: it does not hold `cid` (no penalty: provider
        records and have-sets go stale)."""
        p = self._peers.get(peer)
        if p is None:
            return
        p.lacks.add(cid)
        self._drop_holder(p, cid)
        self._lose(p, cid)

    def expire(self, now: float) -> list[tuple[Peer, bytes]]:
        """Return every request of a peer with an expired deadline to the pool
        (see rule 4). Returns the (peer, chunk id) requests given up."""
        self._tighten()
        out = []
        for p in list(self._peers.values()):
            if not any(r.deadline <= now for r in p.inflight.values()):
                continue
            for c in list(p.inflight):
                self._lose(p, c)
                out.append((p.id, c))
            p.timeouts += 1
            p.window = 1.0
            p.paused_until = now + min(self.t.pause_max,
                                       self.t.pause_base * 2 ** (p.timeouts - 1))
            if p.timeouts >= self.t.max_timeouts:
                self._ban(p)
        return out

    def take_cancelled(self) -> list[tuple[Peer, bytes]]:
        """Requests made redundant since the last call (another copy arrived first):
        the caller may cancel them; their answers will be on_data -> False."""
        out, self._cancelled = self._cancelled, []
        return out

    # -- state ---------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return len(self._done) == len(self._order)

    def next_deadline(self, now: float) -> float | None:
        """When to call expire() or next_requests() again even if nothing arrives:
        the earliest request deadline or end of a peer's pause (None: nothing waits)."""
        self._tighten()
        times = [r.deadline for p in self._peers.values() for r in p.inflight.values()]
        times += [p.paused_until for p in self._peers.values()
                  if p.paused_until > now and not p.banned]
        return min(times) if times else None

    @property
    def endgame(self) -> bool:
        """No pending chunk has a usable holder (rule 6): only in-flight work remains."""
        return not any(self._holders[c] for c in self._pending)

    def stuck(self, now: float) -> bool:
        """Nothing is in flight and no pending chunk can be asked of anyone, now or
        after a pause: only new peers or have-information can help."""
        return (not self.finished and not self._copies
                and not any(self._holders[c] for c in self._pending))

    def unavailable(self) -> tuple[bytes, ...]:
        """Pending chunks no usable peer holds, in the caller's order."""
        return tuple(c for c in self._order
                     if c in self._pending and not self._holders.get(c))

    def in_flight(self, peer: Peer) -> tuple[bytes, ...]:
        p = self._peers.get(peer)
        return tuple(p.inflight) if p is not None else ()

    def window(self, peer: Peer) -> float:
        return self._peers[peer].window

    def rate(self, peer: Peer) -> float | None:
        return self._peers[peer].rate

    def peers(self) -> list[Peer]:
        """The peers the plan knows (added, not removed; banned ones included)."""
        return list(self._peers)

    def is_slow(self, peer: Peer) -> bool:
        return self._peers[peer].slow

    def is_banned(self, peer: Peer) -> bool:
        return peer in self._banned

    def first_request(self, peer: Peer) -> float | None:
        """When `peer` was first asked for a chunk in this plan (None: never)."""
        p = self._peers.get(peer)
        return None if p is None else p.first_sent

    def _tighten(self) -> None:
        """Rule 4 for requests sent to a peer before any peer was measured (their
        deadline is initial_timeout): once the median rate is known, each gets the
        deadline it would have had, so a staller asked first is noticed in seconds."""
        med = None
        for p in self._peers.values():
            if p.rate is not None or not p.inflight:
                continue
            if med is None:
                rates = [q.rate for q in self._peers.values()
                         if not q.banned and q.rate is not None]
                if not rates:
                    return
                med = statistics.median(rates)
            for k, (c, r) in enumerate(p.inflight.items(), 1):
                tight = r.sent + max(self.t.min_timeout,
                                     self.t.timeout_slack * k * self._size(c) / med)
                if tight < r.deadline:
                    r.deadline = tight

    def ban(self, peer: Peer) -> None:
        """Ban a peer from outside (the node's reputation banned it): as rule 7."""
        p = self._peers.get(peer)
        if p is not None and not p.banned:
            self._ban(p)

    def progress(self) -> Progress:
        return Progress(
            needed=len(self._order), done=len(self._done), in_flight=len(self._copies),
            pending=len(self._pending),
            unavailable=sum(1 for c in self._pending if not self._holders[c]),
            bytes_by_peer=dict(self._served),
            duplicate_bytes=self._dup_bytes)

    # -- internals -----------------------------------------------------------------------

    def _size(self, c: bytes) -> int:
        return self._sizes.get(c, self._est)

    def _measure(self, p: _PeerState, req: _Req, nbytes: int, now: float) -> None:
        t = self.t
        busy = max(now - max(p.last_arrival, req.sent), 1e-9)
        keep = exp(-busy / t.rate_horizon)
        p.bytes_acc = p.bytes_acc * keep + nbytes
        p.time_acc = p.time_acc * keep + busy
        p.samples += 1
        p.last_arrival = now
        p.timeouts = 0
        if now - req.sent <= t.target_latency:
            p.window = min(t.max_window, p.window + 1)
        else:
            self._window_to_rate(p, nbytes)

    def _window_to_rate(self, p: _PeerState, size: int) -> None:
        """Shrink p's window to the chunks of `size` it delivers within target_latency
        at its measured rate (rule 2), at least 1."""
        p.window = min(self.t.max_window, max(1.0, min(
            p.window, p.rate * self.t.target_latency / max(1, size))))

    def _median_rate(self) -> float | None:
        """The median measured rate of the unbanned peers (None: none measured),
        computed once per next_requests."""
        if self._med is False:
            rates = [q.rate for q in self._peers.values() if not q.banned and q.rate is not None]
            self._med = statistics.median(rates) if rates else None
        return self._med

    def _update_slow(self) -> None:
        measured = [p for p in self._peers.values()
                    if not p.banned and p.samples >= self.t.min_samples]
        if len(measured) < 2:
            return
        for p in measured:
            med = statistics.median(q.rate for q in measured if q is not p)
            if not p.slow and p.rate < self.t.slow_factor * med:
                p.slow = True
                self._window_to_rate(p, self._est)
            elif p.slow and p.rate >= self.t.recover_factor * med:
                p.slow = False

    def _lose(self, p: _PeerState, c: bytes) -> None:
        """p's request for c is gone; c is pending again if that was its last copy."""
        if p.inflight.pop(c, None) is None:
            return
        cp = self._copies.get(c)
        if cp is not None:
            cp.discard(p.id)
            if not cp:
                del self._copies[c]
                self._repend(c)

    def _repend(self, c: bytes) -> None:
        if c in self._done or c not in self._holders:
            return
        self._pending.add(c)
        self._push_all(c)

    def _push_all(self, c: bytes) -> None:
        holders = self._holders[c]
        entry = (len(holders), self._tb[c], c)
        for q in holders:
            heapq.heappush(self._peers[q].heap, entry)

    def _add_holder(self, p: _PeerState, c: bytes) -> None:
        holders = self._holders[c]
        holders.add(p.id)
        if c in self._pending:
            heapq.heappush(p.heap, (len(holders), self._tb[c], c))

    def _drop_holder(self, p: _PeerState, c: bytes) -> None:
        holders = self._holders.get(c)
        if holders is not None and p.id in holders:
            holders.discard(p.id)
            if c in self._pending:
                self._push_all(c)             # it is rarer now: requeue at the new count

    def _ban(self, p: _PeerState) -> None:
        p.banned = True
        self._banned.add(p.id)
        self._drop_holder_everywhere(p)

    def _drop_holder_everywhere(self, p: _PeerState) -> None:
        for c, holders in self._holders.items():
            if p.id in holders:
                self._drop_holder(p, c)
        for c in list(p.inflight):            # after: a re-pended chunk is not queued at p
            self._lose(p, c)
        p.heap.clear()
