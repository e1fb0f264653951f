"""Reprovide as a keyspace sweep: announce many keys with few lookups.

Goals: a node that provides 1,000,000 keys re-announces them every
REPUBLISH_INTERVAL without one lookup per key. Each key reaches exactly its k
closest peers (the peers a lookup of that key would find), and when keys are
dense the republish costs at most 2 messages per key (issue 3; measured in
tests/test_reprovide.py on 10,000 simulated nodes with the real Lookup:
0.285 messages/key for 100,000 keys, 2.84 for 10,000, 23.9 for 1,000, 45 for
10, i.e. one lookup + k AddProviders per key when keys are sparse).
Non-goals: I/O, timers, retrying a failed AddProviders (the driver's job);
several lookups in flight (run one Sweep per keyspace prefix, e.g. per top
4 bits of the keys, concurrently: sweeps are independent).

Wire: a Batch is one protocol.dht_messages.AddProviders(keys, provider)
request carrying up to MAX_BATCH_KEYS keys (the same bound there; the driver
is node/kademlia/republish.py, measured on a 300-node simnet in
tests/test_dht_service.py: 0.26 messages/key for 3,000 keys).

Theory of operation
-------------------
A Sweep is a sans-I/O state machine over the sorted keys (h11 style)::

    sweep = Sweep(republisher.keys, own_id=me)
    while (ev := sweep.next_event()) is not FINISHED:
        if isinstance(ev, LookupRequest):      # an ordinary k-closest lookup
            lk = Lookup(ev.target, [*ev.seeds, *table.closest(ev.target)], own_id=me, k=sweep.k)
            ... drive lk to FINISHED (dht/lookup.py) ...
            sweep.on_lookup(ev.target, lk.result(), queries=lk.queries)
        else:                                  # a Batch: one AddProviders message
            send AddProviders(ev.keys) to ev.peer

Each lookup result teaches the sweep two things:

* Peers. Every peer found so far is kept ("known"); a key's k closest are
  computed among them.
* A complete ball. Lookup's contract is that its result is the true k closest
  peers to the target (other than us). With r the distance of the farthest
  of them, *every* peer p with d(target, p) <= r is known: the XOR ball
  B(target, r) holds no peer we have not seen. The union of these balls is
  the complete region C.

Coverage rule (why it is safe). Let D be the distance from key x to its k-th
closest known peer. If B(x, D) lies inside C, the k closest known peers of x
are its true k closest: a peer q we do not know lies outside C, hence outside
B(x, D), so d(x, q) > D and q is farther than all k known ones (distances from
x to distinct ids are distinct: no ties). Such a key is *covered*: it is
announced to those k peers, final. Nothing beyond the lookup's contract is
assumed. The rule reduces to the familiar one for a single lookup: keys in the
largest prefix subtree of the target that lies inside B(target, r) and holds
>= k found peers are covered (every peer inside a subtree is closer to its keys
than any peer outside), but it also covers keys whose k-ball straddles two
neighbouring lookups, which is what lets lookups tile the keyspace.

The walk. Keys are taken in sorted order; the first one not yet announced, x,
decides the next lookup: aimed at x itself when x lies outside C (or when too
few peers are known), else at the point outside C of B(x, D) nearest to x
(the first point past the edge of C: the new ball extends C where the walk is
going). Each lookup completes the neighbourhood of the ~k/2 peers next to the
edge (10,000 nodes: 766 lookups complete the whole keyspace), and every key
falling in it is covered at once; so the cost is set by the network, not by
the number of keys, once there are more keys than nodes.

Termination: if a lookup aimed at the gap next to x leaves x uncovered, the
next one is aimed at x itself, and that always covers it, whatever the result
holds (x's k closest known peers are then within r of x, and the newest ball
is tested exactly). So a sweep runs at most 2 lookups per key (1 when keys are
sparse, far fewer when dense), even when results break the lookup contract
(announcements may then go to the wrong peers; the sweep never loops).

Why lookups are not widened to "find the 200 closest of a region": FIND_NODE
replies carry the ~k peers a node knows closest to the target, so a lookup for
m >> k peers ends without ever hearing of peers in the far part of its ball.
Measured with Lookup(k=m) on 10,000 simulated nodes: m = 40 misses 2.8 of the
true 40 on average, m = 100 misses 14, m = 200 misses 31. A ball built on such
a result would not be complete, so every ball here comes from a k-lookup.

XOR geometry used: B(c, r) = {y : c ^ y <= r} is a union of at most 257
aligned subtrees (one per 1-bit of r, plus the point c ^ r), i.e. of intervals
of the sorted keyspace. C is kept as merged intervals from an inner
approximation of each ball (bits of r below its top PRECISION_BITS dropped:
the pieces lie inside the ball); a key's ball is tested with an outer
approximation (those bits set: the pieces contain the ball); both err on the
safe side, and the newest ball is also tested exactly (`max_xor_upto`). A
rounding miss can only cost a lookup, never a wrong announcement.

Keys sharing their k closest are handled as a group: the k closest known peers
of x stay the same for every x' agreeing with x above bit b, the top bit where
d_k and d_k+1 (the k-th and (k+1)-th distances) differ: flipping lower bits of
x flips the same lower bits of every distance, which cannot reorder two
distances that differ at bit b or above.

Batches. Covered keys are queued per peer and sent as one Batch per peer, at
most MAX_BATCH_KEYS keys each. A peer's batch is held while later keys may add
to it and released once the walk has moved past it: a key x can only go to a
peer p < x if x - p <= x ^ p <= D_x, and D_x is about k peer widths
(2**256 / N), so once the first unannounced key is FLUSH_MARGIN_PEERS * k peer
widths beyond p, p's batch is sent. This heuristic only decides how many
messages are sent, never which keys go to whom; all that is left is sent at the
end. Measured: every node gets exactly one batch when keys are dense (9,999
batches for 100,000 keys on 10,000 nodes).

MAX_BATCH_KEYS = 1,024: a key is 34 bytes of msgpack (bin 8 header + 32), so a
batch is about 35 KiB plus two PeerInfo (<= ~400 bytes each): about 55% of
protocol.framing.MAX_FRAME (64 KiB), leaving room for envelope fields. At 10
keys per node and k = 20 a peer gets ~200 keys per republish, so the cap
splits batches only beyond ~50 keys per node (1,000,000 keys on 10,000 nodes:
2.3 batches per node, 0.042 messages/key).

Network-size estimator. For a target independent of the node ids, the
distances target ^ id are i.i.d. uniform on [0, 2**256) (XOR with a fixed value
is a bijection), so the peers near the target form, to an excellent
approximation, a Poisson process of rate lambda = N / 2**256. A result of m
peers whose farthest is at distance r is then an observation
u = r / 2**256 ~ Gamma(m, lambda); over several results U = sum u_i ~
Gamma(M = sum m_i, lambda), and (M - 1) / U is the unbiased estimate of N
(peers other than us; `network_size` adds 1 for us). Relative standard error
about 1 / sqrt(M): ~22% after one lookup, ~1.5% after 200. Only lookups aimed
at a key feed it: keys are content hashes, independent of node ids, while a
gap target sits on the edge of an earlier ball, which is fixed by a peer
(measured: gap targets alone overestimate by 8-12%, key targets by ~1%). A
result of fewer than k peers means the whole network is known: N is exact.
The estimate sets the peer width used to release batches: the "region" whose
batches are held is FLUSH_MARGIN_PEERS * k peer widths behind the walk.

Accounting (`stats`): lookups, their queries (FIND_NODE requests as reported
by the driver), batch messages, announcements (key x peer pairs);
messages_per_key = (lookup queries + batch messages) / keys, a request and its
reply counting as one message.

Failure handling: an empty lookup result (nobody reachable) ends the sweep and
counts the keys left as `unannounced` (the next republish retries). A result
with 1..k-1 peers is taken as the whole network (Kademlia's own reading of a
short result).
"""
from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass

from .contact import Contact
from .keys import ID_BITS, ID_BYTES
from .lookup import FINISHED, WAITING, Step

K = 20
MAX_BATCH_KEYS = 1024        # keys per AddProviders message (see module docstring)
PRECISION_BITS = 32          # bits of a radius kept when approximating a ball by subtrees
FLUSH_MARGIN_PEERS = 4       # release a batch this many k-neighbourhoods behind the sweep
SPACE = 1 << ID_BITS


@dataclass(frozen=True, slots=True)
class LookupRequest:
    """Run a k-closest lookup towards `target`. `seeds` are the known peers
    closest to it (add the routing table's own). Report with Sweep.on_lookup."""
    target: bytes
    seeds: tuple[Contact, ...]


@dataclass(frozen=True, slots=True)
class Batch:
    """Send one AddProviders request: we provide every key in `keys` to `peer`."""
    peer: Contact
    keys: tuple[bytes, ...]


@dataclass(slots=True)
class SweepStats:
    keys: int = 0
    lookups: int = 0
    lookup_queries: int = 0
    batches: int = 0              # AddProviders messages
    announcements: int = 0        # (key, peer) pairs sent
    unannounced: int = 0          # keys left when nobody was reachable

    @property
    def messages(self) -> int:
        return self.lookup_queries + self.batches

    @property
    def messages_per_key(self) -> float:
        return self.messages / self.keys if self.keys else 0.0


# -- XOR geometry (pure functions, tested on their own) ---------------------------------

def max_xor_upto(c: int, d: int) -> int:
    """max(c ^ z for 0 <= z <= d), in O(1): the farthest a point within distance
    d of x can be from t, where c = t ^ x. So B(x, d) is inside B(t, r) iff
    max_xor_upto(t ^ x, d) <= r. The best z follows d down to the highest bit
    where both c and d are 1, takes 0 there (now z < d, all lower bits free) and
    completes c's lower bits to all ones; with no such bit, z = d is best."""
    common = c & d
    if not common:
        return c ^ d
    low = 1 << common.bit_length()
    return ((c ^ d) & -low) | (low - 1)


def ball_inner(t: int, r: int) -> list[tuple[int, int]]:
    """Intervals [lo, hi) of aligned subtrees inside B(t, r), covering all of it
    but the part lost by keeping only the top PRECISION_BITS bits of r (exact
    when r < 2**PRECISION_BITS). Always contains t."""
    g = max(0, r.bit_length() - PRECISION_BITS)
    rl = r >> g << g
    tr = t ^ rl
    out = []
    for i in range(g, rl.bit_length()):
        if rl >> i & 1:                  # z < rl agreeing with rl above bit i, 0 at bit i
            p = (tr >> i) ^ 1
            out.append((p << i, (p + 1) << i))
    if g == 0:                           # exact: the point z = r itself
        out.append((tr, tr + 1))
    return out


def ball_outer(x: int, d: int) -> list[tuple[int, int]]:
    """Intervals [lo, hi) of at most PRECISION_BITS + 1 aligned subtrees whose
    union contains B(x, d) (exactly B(x, d) when d < 2**PRECISION_BITS)."""
    g = max(0, d.bit_length() - PRECISION_BITS)
    du = d | ((1 << g) - 1)
    xd = x ^ du
    p = xd >> g
    out = [(p << g, (p + 1) << g)]       # z agreeing with du above bit g - 1
    for i in range(g, du.bit_length()):
        if du >> i & 1:
            p = (xd >> i) ^ 1
            out.append((p << i, (p + 1) << i))
    return out


class IntervalSet:
    """Disjoint, non-adjacent half-open intervals of [0, 2**256), merged on add."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def add(self, lo: int, hi: int) -> None:
        if lo >= hi:
            return
        i = bisect.bisect_left(self.ends, lo)          # first interval ending at/after lo
        j = bisect.bisect_right(self.starts, hi)       # intervals starting at/before hi
        if i < j:                                      # overlapping or adjacent: merge
            lo = min(lo, self.starts[i])
            hi = max(hi, self.ends[j - 1])
        self.starts[i:j] = [lo]
        self.ends[i:j] = [hi]

    def contains(self, lo: int, hi: int) -> bool:
        i = bisect.bisect_right(self.starts, lo) - 1
        return i >= 0 and self.ends[i] >= hi

    def first_gap(self, lo: int, hi: int) -> int | None:
        """The first point of [lo, hi) not in the set, or None."""
        i = bisect.bisect_right(self.starts, lo) - 1
        if i >= 0 and self.ends[i] > lo:
            return self.ends[i] if self.ends[i] < hi else None
        return lo

    def nearest_gap(self, x: int, lo: int, hi: int) -> int | None:
        """A point of [lo, hi) not in the set, as near to x (XOR) as the
        intervals next to x allow: the end of the interval holding x or the
        point before its start (the first gap of [lo, hi) when x is elsewhere)."""
        if not lo <= x < hi:
            return self.first_gap(lo, hi)
        i = bisect.bisect_right(self.starts, x) - 1
        if i < 0 or self.ends[i] <= x:
            return x
        right = self.ends[i] if self.ends[i] < hi else None
        left = self.starts[i] - 1 if self.starts[i] > lo else None
        if right is None or left is None:
            return left if right is None else right
        return right if right ^ x <= left ^ x else left

    def __len__(self) -> int:
        return len(self.starts)


def _key(v: int) -> bytes:
    return v.to_bytes(ID_BYTES, "big")


class Sweep:
    """One republish of `keys` as a keyspace sweep (see module docstring)."""

    def __init__(self, keys, *, own_id: bytes, k: int = K, max_batch_keys: int = MAX_BATCH_KEYS):
        if k < 1 or max_batch_keys < 1:
            raise ValueError("k and max_batch_keys must be positive")
        if not isinstance(own_id, bytes) or len(own_id) != ID_BYTES:
            raise ValueError("own id must be 32 bytes")
        keys = sorted(set(keys))
        if any(type(x) is not bytes or len(x) != ID_BYTES for x in keys):
            raise ValueError("keys must be 32 bytes")
        self.own_id = own_id
        self.k = k
        self.max_batch_keys = max_batch_keys
        self.stats = SweepStats(keys=len(keys))
        self._keys = keys
        self._served = bytearray(len(keys))
        self._first = 0                          # every key before it is served
        self._ids: list[int] = []                # known peers, sorted
        self._contacts: dict[int, Contact] = {}
        self._complete = IntervalSet()           # C: the union of complete balls
        self._whole = False                      # the whole network is known
        self._last_ball: tuple[int, int] | None = None
        self._outstanding: int | None = None     # target of the lookup in flight
        self._aimed_at_key = False               # ... and whether it is a key (estimator)
        self._aimed = -1                         # index of the key the last lookup was for
        self._pending: dict[int, list[bytes]] = {}
        self._out: deque[Batch] = deque()         # batches ready, sent in order
        self._sum_m = 0                          # estimator: sum of result sizes
        self._sum_u = 0.0                        # estimator: sum of r / 2**256
        self._done = False

    # -- events -------------------------------------------------------------------------

    def next_event(self) -> LookupRequest | Batch | Step:
        """A Batch to send, a LookupRequest to run, WAITING (a lookup is in
        flight: call on_lookup first) or FINISHED."""
        if self._out:
            return self._out.popleft()
        if self._outstanding is not None:
            return WAITING
        if self._done:
            return FINISHED
        target, self._aimed_at_key = self._advance()
        if target is None:
            self._done = True
            self._release(everything=True)
            return self.next_event()
        self._outstanding = target
        return LookupRequest(_key(target), tuple(self.seeds(_key(target))))

    def on_lookup(self, target: bytes, result: list[Contact], queries: int = 0) -> None:
        """The lookup asked for by the last LookupRequest finished with `result`
        (its k closest peers that answered) after `queries` requests."""
        if self._outstanding is None or target != _key(self._outstanding):
            raise ValueError("no lookup towards this target was requested")
        t = self._outstanding
        self._outstanding = None
        self.stats.lookups += 1
        self.stats.lookup_queries += queries
        peers = {}
        for c in result:
            if c.id != self.own_id:
                peers.setdefault(int.from_bytes(c.id, "big"), c)
        for pid, c in peers.items():
            if pid not in self._contacts:
                bisect.insort(self._ids, pid)
                self._contacts[pid] = c
        if not peers:                            # nobody reachable: stop, retry next time
            left = len(self._served) - self._first - sum(self._served[self._first:])
            self.stats.unannounced += left
            self._served[self._first:] = b"\x01" * (len(self._served) - self._first)
            self._first = len(self._served)
            return
        if len(peers) < self.k:                  # short result: the whole network
            self._whole = True
            self._complete.add(0, SPACE)
            extent = SPACE
        else:
            r = max(t ^ p for p in peers)
            if self._aimed_at_key:               # a target independent of the ids
                self._sum_m += len(peers)
                self._sum_u += r / SPACE
            self._last_ball = (t, r)
            pieces = ball_inner(t, r)
            for lo, hi in pieces:
                self._complete.add(lo, hi)
            extent = max(hi for _, hi in pieces)
        stop = len(self._keys) if extent >= SPACE else bisect.bisect_left(self._keys, _key(extent))
        self._serve_range(self._first, stop)
        self._release(everything=False)

    # -- outputs ------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self._done and not self._out

    def seeds(self, target: bytes, n: int | None = None) -> list[Contact]:
        """The known peers closest to `target`, nearest first (lookup seeds)."""
        t = int.from_bytes(target, "big")
        ids, _ = self._closest(t, n or self.k)
        return [self._contacts[p] for p in sorted(ids, key=lambda p: p ^ t)]

    def network_size(self) -> float | None:
        """Estimated number of nodes, us included (None before any lookup)."""
        if self._whole:
            return float(len(self._ids) + 1)
        if self._sum_m < 2 or self._sum_u <= 0:
            return None
        return (self._sum_m - 1) / self._sum_u + 1

    # -- internals ----------------------------------------------------------------------

    def _closest(self, x: int, k: int) -> tuple[list[int], int]:
        """The k closest known peers to x (any order), and a bit b such that every
        x' with x' >> b == x >> b has the same k closest known peers."""
        ids = self._ids
        n = len(ids)
        if n <= k:
            return list(ids), ID_BITS
        lo_h, hi_h = 0, ID_BITS                  # smallest subtree of x with >= k peers
        while lo_h < hi_h:
            h = (lo_h + hi_h) // 2
            base = x >> h << h
            if bisect.bisect_left(ids, base + (1 << h)) - bisect.bisect_left(ids, base) >= k:
                hi_h = h
            else:
                lo_h = h + 1
        h = lo_h
        base = x >> h << h
        cand = ids[bisect.bisect_left(ids, base):bisect.bisect_left(ids, base + (1 << h))]
        # every peer in the subtree is closer than every peer outside it
        if len(cand) == k:
            return cand, h
        cand.sort(key=lambda p: p ^ x)
        # (d_k ^ d_k+1 == p_k ^ p_k+1: the top bit where the two distances differ)
        return cand[:k], (cand[k - 1] ^ cand[k]).bit_length() - 1

    def _covered(self, x: int, d: int) -> bool:
        """B(x, d) lies in the complete region C (see the coverage rule)."""
        if self._whole:
            return True
        if self._last_ball is not None:
            t, r = self._last_ball
            if max_xor_upto(t ^ x, d) <= r:
                return True
        e = d.bit_length()
        base = x >> e << e
        if self._complete.contains(base, base + (1 << e)):
            return True
        return all(self._complete.contains(lo, hi) for lo, hi in ball_outer(x, d))

    def _serve_range(self, i: int, stop: int) -> int | None:
        """Announce every covered key with index in [i, stop); return the index
        of the first key found not covered (None if all were)."""
        keys, served = self._keys, self._served
        first_uncovered = None
        while i < stop:
            if served[i]:
                i += 1
                continue
            x = int.from_bytes(keys[i], "big")
            group, b = self._closest(x, self.k)
            hi = ((x >> b) + 1) << b
            end = stop if hi >= SPACE else min(stop, bisect.bisect_left(keys, _key(hi), i))
            for j in range(i, end):
                if served[j]:
                    continue
                xj = int.from_bytes(keys[j], "big")
                if len(group) >= self.k or self._whole:
                    d = max(xj ^ p for p in group) if group else 0
                    if self._covered(xj, d):
                        self._announce(j, group)
                        continue
                if first_uncovered is None:
                    first_uncovered = j
            i = end
        return first_uncovered

    def _advance(self) -> tuple[int | None, bool]:
        """Serve the keys already covered from the first unserved one on; return
        the target of the lookup the first uncovered key needs (None: all done),
        and whether that target is the key itself."""
        n = len(self._keys)
        while True:
            while self._first < n and self._served[self._first]:
                self._first += 1
            if self._first >= n:
                return None, False
            i = self._first
            if self._serve_range(i, i + 1) is None:
                continue                          # it was covered: announced now
            x = int.from_bytes(self._keys[i], "big")
            group, _ = self._closest(x, self.k)
            retry, self._aimed = self._aimed == i, i
            if retry or len(group) < self.k or self._complete.first_gap(x, x + 1) is not None:
                return x, True                    # aim at x itself: that covers it
            d = max(x ^ p for p in group)
            # the part of B(x, d) outside C nearest to x (pieces nearest first)
            for lo, hi in sorted(ball_outer(x, d), key=lambda piece: piece[0] ^ x):
                gap = self._complete.nearest_gap(x, lo, hi)
                if gap is not None:
                    return gap, False
            # outer pieces all in C yet not covered cannot happen (_covered tests them)
            raise AssertionError("uncovered key with its ball inside the complete region")

    def _announce(self, j: int, group: list[int]) -> None:
        key = self._keys[j]
        self._served[j] = 1
        self.stats.announcements += len(group)
        for p in group:
            batch = self._pending.setdefault(p, [])
            batch.append(key)
            if len(batch) >= self.max_batch_keys:
                self._emit(p)

    def _emit(self, p: int) -> None:
        batch = self._pending.pop(p, None)
        if batch:
            self._out.append(Batch(self._contacts[p], tuple(batch)))
            self.stats.batches += 1

    def _release(self, *, everything: bool) -> None:
        """Send the batches of the peers the walk has moved past (see Batches)."""
        while self._first < len(self._keys) and self._served[self._first]:
            self._first += 1
        if everything or self._first >= len(self._keys):
            ready = sorted(self._pending)
        else:
            size = self.network_size()
            if size is None:
                return
            margin = int(FLUSH_MARGIN_PEERS * self.k * SPACE / size)
            front = int.from_bytes(self._keys[self._first], "big") - margin
            ready = sorted(p for p in self._pending if p < front)
        for p in ready:
            self._emit(p)
