"""Iterative Kademlia lookup as a sans-I/O state machine.

Theory of operation
-------------------
A Lookup walks the keyspace towards `target`: it asks the closest peers it
knows for peers closer still, until the k closest peers it knows have all
answered. It never sends anything and never reads a clock; the caller owns the
I/O and passes `now` (seconds, any monotonic origin: trio time or simnet's
virtual time)::

    lookup = Lookup(target, seeds, own_id=me)
    while (step := lookup.next(now)) is not FINISHED:
        if step is WAITING:
            wait for a reply, or until lookup.next_deadline(); continue
        send FIND_NODE(target) to step (a Contact); on its reply call
        lookup.on_success(step.id, closer, now), on an error lookup.on_failure(step.id, now)
    lookup.result()            # the k closest peers that answered, nearest first

The shape follows rust-libp2p `protocols/kad/src/query/peers/closest.rs`,
plus S/Kademlia's disjoint paths (Baumgart & Mies, 2007).

Rules
-----
1. Each peer the lookup knows is in one state: NOT_CONTACTED -> WAITING ->
   SUCCEEDED | FAILED | UNRESPONSIVE. A WAITING request whose deadline
   (`request_timeout` after it was issued) has passed becomes UNRESPONSIVE at
   the next call that carries a `now`: it counts as failed and frees its slot.
   A late reply from an UNRESPONSIVE peer is still accepted (its peers are
   learned, it may appear in the result) but changes no in-flight count.
2. A peer is yielded at most once, and `own_id` never.
3. There are `disjoint_paths` (d) paths. Seeds, nearest first, are dealt
   round-robin to the paths. A peer belongs to the path that first learned of
   it, and only that path queries it; peers already known elsewhere are
   ignored. So no peer is on two paths, and a malicious peer can only mislead
   the path that asked it (S/Kademlia). d = 1 is plain Kademlia.
4. Each path has at most `alpha` requests in flight, and issues at most
   `max_queries // d` requests in all (hard cap; default `QUERY_CAP_FACTOR * k`
   per path, i.e. 160 for k = 20, about 6x what an honest lookup needs: in
   tests/test_lookup.py's 2,000-node network one takes 25 queries on average,
   29 at most). The cap bounds the work an adversary feeding endless fresh
   contacts can cause. Past its budget a path only waits for its requests.
   Unlike rust-libp2p, a stalled lookup does not widen to k in flight: alpha
   is a hard bound.
5. A path finishes when, walking its peers nearest first (skipping failed and
   unresponsive ones, and never-contacted ones once its budget is spent), k
   have SUCCEEDED before any WAITING or NOT_CONTACTED one (the k closest known
   have all answered), or when it has nothing left to ask and
   nothing in flight. The lookup finishes when every path has, or at `stop()`
   (GET_PROVIDERS: once enough providers are found). Finished is final.
6. From each reply at most k new contacts are taken (the k closest to the
   target; own_id, duplicates and peers already known are dropped first; a
   known id with another address does not replace the first one): an honest
   peer sends no more than k, and a flood cannot grow the state unboundedly.

Worst-case termination: every step either issues one of at most max_queries
requests or waits for one of at most alpha * d requests, each of which ends by
a reply or its deadline; so with next() called at the deadlines the lookup
ends within max_queries * request_timeout (far less in practice).
"""
from __future__ import annotations

import bisect
import enum
from dataclasses import dataclass

from .contact import Contact
from .keys import ID_BYTES, as_int

K = 20                   # Kademlia replication parameter: result size
ALPHA = 3                # requests in flight per path
REQUEST_TIMEOUT = 5.0    # seconds of the caller's clock
QUERY_CAP_FACTOR = 8     # default hard cap: QUERY_CAP_FACTOR * k queries per path


class Step(enum.Enum):
    """What next() returns when it has no peer to query right now."""
    WAITING = "waiting"      # call next() again after a reply or next_deadline()
    FINISHED = "finished"    # done: read result()

    def __repr__(self) -> str:
        return self.name


WAITING = Step.WAITING
FINISHED = Step.FINISHED


class _State(enum.Enum):
    NOT_CONTACTED = 0
    WAITING = 1
    SUCCEEDED = 2
    FAILED = 3
    UNRESPONSIVE = 4      # deadline passed; a late reply may still come


@dataclass(slots=True, eq=False)
class _Peer:
    contact: Contact
    distance: int
    path: int
    depth: int                    # seeds are depth 1, peers they named depth 2, ...
    state: _State = _State.NOT_CONTACTED
    deadline: float = 0.0


class _Path:
    __slots__ = ("order", "in_flight", "queries", "done")

    def __init__(self) -> None:
        self.order: list[tuple[int, bytes]] = []   # (distance, id), nearest first
        self.in_flight = 0
        self.queries = 0
        self.done = False


class Lookup:
    """One FIND_NODE / GET_PROVIDERS walk towards `target` (see module docstring)."""

    def __init__(self, target: bytes, seeds: list[Contact], *, own_id: bytes, k: int = K,
                 alpha: int = ALPHA, request_timeout: float = REQUEST_TIMEOUT,
                 disjoint_paths: int = 1, max_queries: int | None = None):
        if not isinstance(target, bytes) or len(target) != ID_BYTES:
            raise ValueError("target must be 32 bytes")
        if k < 1 or alpha < 1 or disjoint_paths < 1 or not request_timeout > 0:
            raise ValueError("k, alpha, disjoint_paths and request_timeout must be positive")
        if max_queries is None:
            max_queries = QUERY_CAP_FACTOR * k * disjoint_paths
        if max_queries < disjoint_paths:
            raise ValueError("max_queries must allow at least one query per path")
        self.target = target
        self.own_id = own_id
        self.k = k
        self.alpha = alpha
        self.request_timeout = request_timeout
        self.disjoint_paths = disjoint_paths
        self.max_queries = max_queries
        self.queries = 0                           # requests issued so far
        self.hops = 0                              # max depth of a peer that answered
        self._t = as_int(target)
        self._budget = max_queries // disjoint_paths
        self._peers: dict[bytes, _Peer] = {}
        self._waiting: dict[bytes, _Peer] = {}     # in flight, deadline not yet passed
        self._paths = [_Path() for _ in range(disjoint_paths)]
        self._next_path = 0                        # round-robin start for fairness
        self._finished = False
        t = self._t
        for i, c in enumerate(sorted(self._unique(seeds), key=lambda c: t ^ c.n)):
            self._learn(c, i % disjoint_paths, 1)

    # -- inputs -----------------------------------------------------------------------

    def next(self, now: float) -> Contact | Step:
        """The next peer to query now, or WAITING, or FINISHED."""
        if self._finished:
            return FINISHED
        self._expire(now)
        n = len(self._paths)
        all_done = True
        for j in range(n):
            p = (self._next_path + j) % n
            step = self._step(self._paths[p], now)
            if isinstance(step, Contact):
                self._next_path = (p + 1) % n
                return step
            if step is WAITING:
                all_done = False
        if all_done:
            self._finished = True
            return FINISHED
        return WAITING

    def on_success(self, peer_id: bytes, closer: list[Contact], now: float) -> bool:
        """`peer_id` answered with `closer`. False (and no change) if the reply is
        not expected: unknown peer, never asked, or already settled."""
        self._expire(now)
        peer = self._peers.get(peer_id)
        if peer is None or peer.state not in (_State.WAITING, _State.UNRESPONSIVE):
            return False
        self._settle(peer, _State.SUCCEEDED)
        self.hops = max(self.hops, peer.depth)
        if not self._finished and not self._paths[peer.path].done:
            t = self._t
            for c in sorted(self._unique(closer), key=lambda c: t ^ c.n)[:self.k]:
                self._learn(c, peer.path, peer.depth + 1)
        return True

    def on_failure(self, peer_id: bytes, now: float) -> bool:
        """The request to `peer_id` failed. False if it was not expected."""
        self._expire(now)
        peer = self._peers.get(peer_id)
        if peer is None or peer.state not in (_State.WAITING, _State.UNRESPONSIVE):
            return False
        self._settle(peer, _State.FAILED)
        return True

    def stop(self) -> None:
        """Finish now (e.g. GET_PROVIDERS found enough providers). Final."""
        self._finished = True

    # -- outputs ----------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self._finished

    def result(self) -> list[Contact]:
        """The k closest peers that answered, nearest first."""
        answered = [p for p in self._peers.values() if p.state is _State.SUCCEEDED]
        answered.sort(key=lambda p: p.distance)
        return [p.contact for p in answered[:self.k]]

    def confirmed(self, min_prefix: int) -> list[Contact]:
        """The answered prefix: walking the known peers nearest first (failed and
        unresponsive ones skipped), the peers that SUCCEEDED before the first one
        still waiting or never contacted, at most k; empty while it holds fewer
        than `min_prefix`. Every peer closer than these has answered, so they
        stay among the k closest unless a later reply names closer peers; an
        optimistic provide stores on them while the walk goes on."""
        out: list[Contact] = []
        order = (self._paths[0].order if len(self._paths) == 1 else
                 sorted(e for path in self._paths for e in path.order))
        for _, peer_id in order:
            peer = self._peers[peer_id]
            if peer.state is _State.SUCCEEDED:
                out.append(peer.contact)
                if len(out) >= self.k:
                    break
            elif peer.state is _State.WAITING or peer.state is _State.NOT_CONTACTED:
                break
        return out if len(out) >= min_prefix else []

    def rank(self, peer_id: bytes) -> int:
        """How many known peers that have not failed are nearer than `peer_id`
        (0: it is the nearest); len(known) for an unknown peer."""
        peer = self._peers.get(peer_id)
        if peer is None:
            return len(self._peers)
        return sum(1 for p in self._peers.values()
                   if p.distance < peer.distance
                   and p.state is not _State.FAILED and p.state is not _State.UNRESPONSIVE)

    def next_deadline(self) -> float | None:
        """When the earliest request in flight times out (None if none is):
        the latest time the caller should call next() again without a reply."""
        return min((p.deadline for p in self._waiting.values()), default=None)

    def in_flight(self, path: int | None = None) -> int:
        """Requests in flight (not yet timed out), on one path or on all."""
        if path is None:
            return len(self._waiting)
        return self._paths[path].in_flight

    def closest_known(self, n: int) -> list[Contact]:
        """The n nearest peers known that have not failed (answered, in flight
        or never asked), nearest first."""
        live = [p for p in self._peers.values()
                if p.state is not _State.FAILED and p.state is not _State.UNRESPONSIVE]
        live.sort(key=lambda p: p.distance)
        return [p.contact for p in live[:n]]

    def knows(self, peer_id: bytes) -> bool:
        """The lookup has seen this peer (as a seed or in a reply)."""
        return peer_id in self._peers

    def path_of(self, peer_id: bytes) -> int | None:
        """The path a known peer belongs to (None if unknown)."""
        peer = self._peers.get(peer_id)
        return None if peer is None else peer.path

    # -- internals --------------------------------------------------------------------

    def _unique(self, contacts) -> list[Contact]:
        """Contacts with a new id (first occurrence wins), never own_id."""
        seen: set[bytes] = set()
        out = []
        for c in contacts:
            if c.id != self.own_id and c.id not in self._peers and c.id not in seen:
                seen.add(c.id)
                out.append(c)
        return out

    def _learn(self, contact: Contact, path: int, depth: int) -> None:
        peer = _Peer(contact, self._t ^ contact.n, path, depth)
        self._peers[contact.id] = peer
        bisect.insort(self._paths[path].order, (peer.distance, contact.id))

    def _expire(self, now: float) -> None:
        for peer in [p for p in self._waiting.values() if now >= p.deadline]:
            self._settle(peer, _State.UNRESPONSIVE)

    def _settle(self, peer: _Peer, state: _State) -> None:
        if peer.state is _State.WAITING:
            del self._waiting[peer.contact.id]
            self._paths[peer.path].in_flight -= 1
        peer.state = state

    def _step(self, path: _Path, now: float) -> Contact | Step:
        """Rule 5 for one path: a peer to query, WAITING or FINISHED."""
        if path.done:
            return FINISHED
        at_capacity = path.in_flight >= self.alpha
        may_query = path.queries < self._budget
        answered: int | None = 0        # None once a closer request is still open
        for _, peer_id in path.order:
            peer = self._peers[peer_id]
            if peer.state is _State.SUCCEEDED:
                if answered is not None:
                    answered += 1
                    if answered >= self.k:
                        path.done = True
                        return FINISHED
            elif peer.state is _State.WAITING:
                if at_capacity:
                    return WAITING
                answered = None
            elif peer.state is _State.NOT_CONTACTED and may_query:
                if at_capacity:
                    return WAITING
                peer.state = _State.WAITING
                peer.deadline = now + self.request_timeout
                self._waiting[peer_id] = peer
                path.in_flight += 1
                path.queries += 1
                self.queries += 1
                return peer.contact
        if path.in_flight:
            return WAITING
        path.done = True
        return FINISHED
