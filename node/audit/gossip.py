"""Audit-log gossip: every node ends up holding every author's log.

Runs over the Transport interface (libp2p or simnet) with the messages of
protocol/audit_gossip.py, one request per stream.

Push (fast path): an entry this node appends, or receives and stores for the
first time, is pushed at once to its neighbours, except the peer it came
from. Neighbours: `fanout` random peers of the DHT routing table (re-drawn
now and then and when one fails), each told so with a Hello (renewed every
sync round), plus the peers that said Hello to us (subscribers, until
SUBSCRIPTION_TTL without renewal; at most MAX_SUBSCRIBERS). The Hello makes
the overlay symmetric: with out-edges only, ~e^-fanout of the nodes are
nobody's neighbour and would wait for anti-entropy; undirected it is
connected, so a push reaches every node. Entries are queued per neighbour and sent in batches of at
most MAX_ENTRIES / MAX_PUSH_BYTES, one Push in flight per neighbour; a queue
holds at most MAX_QUEUE entries (beyond that they are dropped: anti-entropy
fills the hole). A receiver that cannot attach a pushed entry (it lacks the
entries before it) answers with `wants` and the pusher sends that range.

Anti-entropy (repair path): every `sync_interval` (jittered) the node syncs
with one random peer: it sends the digests of its heads (16 buckets); the
peer answers with its heads in the buckets that differ; the node pulls what
it lacks (GetRange, bounded per round), pushes what the peer lacks, and a
head with the same seq but another id is a fork, whose proof it fetches.
So a dropped push, a partition or a node that was down only delays an entry.

Checks: every received entry goes through AuditLog.add_foreign (signature,
author, seq order, prev link, size and body bounds, future time) before it is
stored or forwarded. A sender of an invalid entry, a false fork proof or
malformed bytes is penalized in the node's PeerScores (the DHT's: a liar here
is not trusted there either) and banned at the threshold. Inbound entries
are limited per peer and per author (node/audit/limits.py: entries and bytes
per second, new authors per peer when membership does not vet them); over a
peer's limit a push is refused (Ack without reading it), over an author's its
entries wait for anti-entropy; each limit counts what it stopped.

Forks: a new fork proof (from add_foreign, a sync or a ForkProof message) is
kept, its author flagged, and the proof sent to every neighbour; a node that
already holds it does not forward it again, so the flood ends.

Yielding to transfers: anti-entropy pulls (the bulk of a joining node's
catch-up: one GetRange stream per author it lacks) wait while busy() says
the node is moving bulk data (a restore or fetch), polling every BUSY_POLL s,
at most max_defer s per sync round; then they go ahead anyway. Measured on a
2 GiB 4-seed restore by a node that had just joined: pulling 30 authors'
logs during it cost 0.1-0.2 s of its 1.4-1.7 s (BENCHMARKS.md, swarm
section). Pushes are not held back: they carry one new entry at a time.

Witnessing (the cosigning rule of protocol/audit.py): every `witness_interval`
(jittered) the node appends a witness entry naming the changed heads of the
other logs it holds, if some log gained an entry other than a witness since the
last one (witnesses of witnesses would never stop); and, at most once per
`cosign_refresh`, when its last cosign of some head is older than that, one
naming every head it holds, least recently cosigned first (so an idle author's
head is cosigned again and certificates of it stay fresh). In an idle network
a node thus appends one witness entry per refresh. Witness entries are gossiped
like any other.

Database work (SQLite, Ed25519) runs in a worker thread when `threaded`
(the daemon), inline in simnet (virtual time must not run while a thread
works). Counters (bytes and messages in both directions, entries added,
duplicates, rejections) feed `status` and the simnet bandwidth figures.
"""
from __future__ import annotations

import collections
import logging
import random

import trio

from hypersdk.dht.contact import Contact
from hypersdk.node import runtime
from hypersdk.node.audit.limits import PEER_BURST, PEER_RATE, InboundLimits
from hypersdk.node.kademlia.rpc import FrameReader, PeerClosed
from hypersdk.node.net.transport import TransportError
from hypersdk.protocol import audit
from hypersdk.protocol.audit_gossip import (
    MAX_CERT_BYTES,
    MAX_CERTS,
    MAX_ENTRIES,
    MAX_HEADS,
    MAX_PUSH_BYTES,
    MAX_WANTS,
    PROTOCOL_ID,
    Ack,
    Entries,
    ForkProof,
    GetRange,
    Heads,
    Hello,
    Push,
    Sync,
    answers,
    bucket_of,
    differing,
    digests,
    encode_message,
    frame_decoder,
)
from hypersdk.protocol.errors import RemoteProtocolError

log = logging.getLogger(__name__)

FANOUT = 3
SUBSCRIPTION_TTL = 300.0
MAX_SUBSCRIBERS = 64
SYNC_INTERVAL = 30.0
WITNESS_INTERVAL = float(audit.WITNESS_INTERVAL_S)
COSIGN_REFRESH = float(audit.COSIGN_REFRESH_S)
OWN_POLL = 1.0                  # s between checks for entries other processes appended
REQUEST_TIMEOUT = 10.0
BUSY_POLL = 0.25                # s between checks of busy() while pulls wait
MAX_DEFER = 120.0               # s a sync round's pulls wait at most for busy() to clear
MAX_QUEUE = 4096                # entries waiting for one neighbour
REPAIR_INTERVAL = 3600.0        # s between re-verifications of our copies (jittered)
REPAIR_PEERS = 3                # peers asked for a damaged range
REPAIR_ROUNDS = 16              # GetRange batches asked of one peer per damaged log
MAX_PULL_PER_SYNC = 4096        # entries pulled in one anti-entropy round
MAX_PUSH_PER_SYNC = 4096        # entries pushed in one anti-entropy round
RATE = PEER_RATE                # inbound entries/s per peer (token bucket) ...
BURST = PEER_BURST              # ... and its depth


class AuditGossip:
    def __init__(self, net, audit_log, peers, *, rng: random.Random, scores=None,
                 fanout: int = FANOUT, sync_interval: float = SYNC_INTERVAL,
                 witness_interval: float | None = WITNESS_INTERVAL,
                 cosign_refresh: float = COSIGN_REFRESH,
                 own_poll: float | None = OWN_POLL, request_timeout: float = REQUEST_TIMEOUT,
                 threaded: bool = True, clock_ns=runtime.now_ns, rate: float = RATE,
                 on_new=None, busy=None, max_defer: float = MAX_DEFER, author_ok=None,
                 certs_of=None, learn_certs=None, vetted=None, limits=None):
        """peers() -> the Contacts this node may gossip with (e.g. its DHT table);
        on_new(entries), if given, sees every batch of foreign entries stored;
        busy() -> True while the node moves bulk data (pulls wait, see above);
        vetted() -> True while membership vets authors (author_ok): then no
        new-author limit (None: vetted exactly when author_ok is given);
        limits: an InboundLimits (default: node/audit/limits.py's, with `rate`)."""
        self.net, self.log, self.peers, self.rng = net, audit_log, peers, rng
        self.scores = scores
        self.fanout, self.sync_interval = fanout, sync_interval
        self.witness_interval, self.own_poll = witness_interval, own_poll
        self.cosign_refresh = cosign_refresh
        self.request_timeout, self.threaded, self.clock_ns = request_timeout, threaded, clock_ns
        self.rate = rate
        self.on_new = on_new
        self.author_ok = author_ok        # author key -> bool: a member now (None: anyone)
        self.vetted = vetted if vetted is not None else (lambda: author_ok is not None)
        self.limits = limits if limits is not None else InboundLimits(
            peer_rate=rate, peer_burst=max(BURST, 2 * rate))
        self._known: dict[bytes, int] | None = None   # author -> head seq held (lazy)
        self._kept_certs: dict[bytes, bool] = {}      # member certificates stored (raw)
        self.certs_of = certs_of          # author keys -> their certificates (raw), to send
        self.learn_certs = learn_certs    # raw certificates received -> None
        self.busy, self.max_defer = busy, max_defer
        self.own_id = net.peer_id
        self.own_author = audit_log.own_author
        self.counters: collections.Counter = collections.Counter()
        self.neighbours: list[Contact] = []
        self.subscribers: dict[bytes, tuple[Contact, float]] = {}    # id -> (contact, until)
        self.own_addr = net.addr
        self._queues: dict[bytes, collections.deque] = {}
        self._senders: set[bytes] = set()
        self._contacts: dict[bytes, Contact] = {}
        self._db_lock = trio.Lock()
        self._digests = None                       # cached (root, buckets); None: stale
        self._own_spread = -1                      # highest own seq pushed
        self._witnessed: dict | None = None        # foreign heads at the last witness
        self._refreshed: int | None = None         # clock_ns of our last refresh entry
        self._nursery: trio.Nursery | None = None
        self._rid = rng.getrandbits(32)

    # -- running ----------------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
        async with trio.open_nursery() as n:
            self._nursery = n
            self.net.set_handler(PROTOCOL_ID, self.handle)
            head = await self._db(self.log.head_seq, self.own_author)
            self._own_spread = -1 if head is None else head
            n.start_soon(self._sync_loop)
            n.start_soon(self._neighbour_loop)
            n.start_soon(self._repair_loop)
            if self.own_poll:
                n.start_soon(self._own_loop)
            if self.witness_interval:
                n.start_soon(self._witness_loop)
            task_status.started()

    async def _db(self, fn, *args, **kw):
        async with self._db_lock:
            if self.threaded:
                return await runtime.run_sync(lambda: fn(*args, **kw))
            return fn(*args, **kw)

    def _now_ns(self) -> int:
        return self.clock_ns()

    # -- publishing ---------------------------------------------------------------------
    async def append(self, kind: str, body: dict) -> audit.Entry:
        """Append an own entry and push it (simnet and tests; the daemon's own
        entries are appended by the store ops and found by the own-entry poll)."""
        e = await self._db(self.log.append, kind, body, self._now_ns())
        await self.spread_own()
        return e

    async def spread_own(self) -> int:
        """Push own entries not pushed yet; returns how many."""
        def read():
            h = self.log.head_seq(self.own_author)
            if h is None or h <= self._own_spread:
                return []
            return self.log.raw_range(self.own_author, self._own_spread + 1, MAX_QUEUE)
        raws = await self._db(read)
        if raws:
            self._own_spread += len(raws)
            self._digests = None
            self._spread(raws, exclude=None)
        return len(raws)

    async def announce_own_certificate(self) -> bool:
        """Push our newest entry again, to every neighbour: our certificate goes with
        it (a renewed one reaches the peers that admitted us under the old one)."""
        head = await self._db(self.log.head, self.own_author)
        if head is None:
            return False
        self._spread([head.raw], exclude=None)
        return True

    def _spread(self, raws: list[bytes], exclude: bytes | None) -> None:
        for c in self._targets():
            if c.id != exclude:
                self._enqueue(c, raws)

    def _targets(self) -> list[Contact]:
        """Neighbours and live subscribers, each once."""
        self._refresh_neighbours()
        now = trio.current_time()
        out = {c.id: c for c in self.neighbours}
        for pid, (c, until) in list(self.subscribers.items()):
            if until < now or self._banned(pid):
                del self.subscribers[pid]
            else:
                out.setdefault(pid, c)
        return list(out.values())

    async def _hello(self, c: Contact) -> None:
        try:
            await self._request(c, Hello(self._next_rid(), self.own_addr))
        except _Failed:
            self.neighbours = [n for n in self.neighbours if n.id != c.id]

    def _enqueue(self, c: Contact, raws) -> None:
        q = self._queues.setdefault(c.id, collections.deque())
        room = MAX_QUEUE - len(q)
        if room < len(raws):
            self.counters["queue overflow"] += len(raws) - max(room, 0)
        q.extend(raws[:max(room, 0)])
        self._contacts[c.id] = c
        if q and c.id not in self._senders and self._nursery is not None:
            self._senders.add(c.id)
            self._nursery.start_soon(self._sender, c)

    def _refresh_neighbours(self, force: bool = False) -> None:
        live = [c for c in self.neighbours if not self._banned(c.id)][:self.fanout]
        if len(live) == self.fanout and not force:
            self.neighbours = live
            return
        if force and live:
            live.pop(self.rng.randrange(len(live)))     # let one new peer in
        pool = [c for c in self.peers() if c.id != self.own_id and not self._banned(c.id)]
        have = {c.id for c in live}
        fresh = [c for c in pool if c.id not in have]
        self.rng.shuffle(fresh)
        added = fresh[:max(0, self.fanout - len(live))]
        self.neighbours = live + added
        for c in added:
            if self._nursery is not None:
                self._nursery.start_soon(self._hello, c)

    async def _sender(self, c: Contact) -> None:
        q = self._queues[c.id]
        try:
            for _ in range(10_000):                        # bounded; queues drain fast
                if not q:
                    return
                batch, size = [], 0
                while q and len(batch) < MAX_ENTRIES and size + len(q[0]) <= MAX_PUSH_BYTES:
                    size += len(q[0])
                    batch.append(q.popleft())
                try:
                    reply = await self._request(c, Push(self._next_rid(), tuple(batch),
                                                        self._certs_for(batch)))
                except _Failed as exc:
                    self.counters["push failed"] += 1
                    q.clear()
                    if not exc.misbehaved:
                        self.neighbours = [n for n in self.neighbours if n.id != c.id]
                    return
                self.counters["pushes"] += 1
                if reply.wants:
                    for raws in await self._db(self._ranges, list(reply.wants)):
                        q.extendleft(reversed(raws))
        finally:
            self._senders.discard(c.id)
            if not q:
                self._queues.pop(c.id, None)

    def _ranges(self, wants) -> list[list[bytes]]:
        return [self.log.raw_range(a, s, MAX_ENTRIES, MAX_PUSH_BYTES) for a, s in wants]

    # -- receiving ---------------------------------------------------------------------
    async def handle(self, stream, peer_id: bytes) -> None:
        """Transport handler: one request, one reply. Never raises."""
        try:
            await self._serve(stream, peer_id)
        except (TransportError, trio.BrokenResourceError, trio.ClosedResourceError):
            self.counters["inbound broken"] += 1
        except Exception:                              # a bug: never kill the host
            self.counters["handler errors"] += 1
            log.exception("audit gossip handler failed")
        finally:
            with trio.move_on_after(1.0) as cs:
                cs.shield = True
                try:
                    await stream.aclose()
                except Exception:
                    pass

    async def _serve(self, stream, peer_id: bytes) -> None:
        if self._banned(peer_id):
            self.counters["refused"] += 1
            return
        with trio.move_on_after(self.request_timeout) as cs:
            try:
                req, n = await _read_one(stream)
            except RemoteProtocolError:
                self._penalize(peer_id, "malformed")
                return
            except PeerClosed:
                return
            self.counters["bytes in"] += n
            t = type(req)
            if t not in (Push, Sync, GetRange, ForkProof, Hello):
                self._penalize(peer_id, "not a request")
                return
            reply = await self._answer(req, peer_id)
            data = encode_message(reply)
            self.counters["bytes out"] += len(data)
            await stream.send_all(data)
        if cs.cancelled_caught:
            self.counters["inbound timeout"] += 1

    async def _answer(self, req, peer_id: bytes):
        t = type(req)
        if t is Push:
            self.counters["pushes in"] += 1
            if not self.limits.push(peer_id, len(req.entries), sum(map(len, req.entries)),
                                    trio.current_time()):
                self.counters["rate limited"] += len(req.entries)
                return Ack(req.rid, ())
            res = await self._absorb(req.entries, peer_id, req.certs)
            wants = tuple(list(res.gaps.items())[:MAX_WANTS])
            return Ack(req.rid, wants)
        if t is Sync:
            self.counters["syncs in"] += 1
            heads, more, buckets = await self._db(self._heads_for, req.buckets)
            return Heads(req.rid, buckets, heads, more)
        if t is GetRange:
            raws = await self._db(self.log.raw_range, req.author, req.start, req.count,
                                  MAX_PUSH_BYTES)
            return Entries(req.rid, tuple(raws), self._certs_for(raws))
        if t is Hello:
            self._subscribe(Contact(peer_id, req.addr))
            return Ack(req.rid, ())
        # ForkProof
        await self._absorb_fork(req.first, req.second, peer_id)
        return Ack(req.rid, ())

    def _subscribe(self, c: Contact) -> None:
        now = trio.current_time()
        if c.id not in self.subscribers and len(self.subscribers) >= MAX_SUBSCRIBERS:
            oldest = min(self.subscribers, key=lambda p: self.subscribers[p][1])
            del self.subscribers[oldest]
        self.subscribers[c.id] = (c, now + SUBSCRIPTION_TTL)
        self.counters["hellos in"] += 1

    def _heads_for(self, their_buckets) -> tuple[tuple, bool, tuple]:
        heads = self.log.heads()
        mine = self._my_digests(heads)
        diff = set(differing(mine[1], their_buckets))
        out = [(a, s, i) for a, (s, i) in sorted(heads.items()) if bucket_of(a) in diff]
        return tuple(out[:MAX_HEADS]), len(out) > MAX_HEADS, mine[1]

    def _my_digests(self, heads=None):
        if self._digests is None:
            self._digests = digests(self.log.heads() if heads is None else heads)
        return self._digests

    def _certs_for(self, raws) -> tuple:
        """The certificates of the authors of these entries, to send with them."""
        if self.certs_of is None:
            return ()
        authors = set()
        for r in raws:
            try:
                authors.add(audit.decode_entry(r, verify=False).author)
            except RemoteProtocolError:
                continue
        out, size = [], 0
        for c in self.certs_of(sorted(authors)):
            if len(out) >= MAX_CERTS or size + len(c) > MAX_CERT_BYTES:
                break
            out.append(c)
            size += len(c)
        return tuple(out)

    async def _absorb(self, raws, sender: bytes | None, certs=()):
        """Check and store entries; forward the new ones; score the sender.
        Entries of authors that are not members (author_ok, after learning the
        certificates that came with them) are neither stored nor forwarded."""
        if certs and self.learn_certs is not None:
            self.learn_certs(certs)
            if self.certs_of is not None:   # kept for audit certificates (valid ones only)
                new = [raw for raw in self.certs_of(sorted(_cert_nodes(certs)))
                       if self._kept_certs.get(raw) is None]
                if new:
                    await self._db(self.log.keep_member_certs, new)
                    if len(self._kept_certs) > 4096:
                        self._kept_certs.clear()
                    self._kept_certs.update(dict.fromkeys(new, True))
        if self.author_ok is not None:
            kept = [r for r in raws if self._member_entry(r)]
            if len(kept) != len(raws):
                self.counters["non-member entries dropped"] += len(raws) - len(kept)
            raws = kept
        raws = await self._within_limits(raws, sender)
        res = await self._db(self.log.add_foreign, list(raws), now_ns=self._now_ns())
        if self._known is not None:
            for e in res.new:
                self._known[e.author] = max(e.seq, self._known.get(e.author, -1))
        self.counters["entries in"] += len(raws)
        self.counters["entries added"] += res.added
        self.counters["duplicates"] += res.replays
        if res.repaired:                # our copy was damaged; a valid entry mended it
            self.counters["entries repaired"] += res.repaired
        if res.new:
            self._digests = None
            if self.on_new is not None:
                self.on_new(res.new)
            self._spread([e.raw for e in res.new], exclude=sender)
        if res.rejected:
            self.counters["entries rejected"] += len(res.rejected)
            if sender is not None:
                self._penalize(sender, "bad signature")
        for fork in res.forks:
            self.counters["forks found"] += 1
            self._spread_fork(fork.first.raw, fork.second.raw, exclude=sender)
        for author, seq in res.diverged.items():
            # the author signed another entry at seq than ours (its later entries do not
            # link to ours): fetch that entry from whoever sent them: a fork proof
            self.counters["divergences"] += 1
            c = self._contact_of(sender)
            if c is not None and self._nursery is not None:
                self._nursery.start_soon(self._fetch_proof, c, author, seq)
        return res

    def _contact_of(self, peer_id: bytes | None) -> Contact | None:
        if peer_id is None:
            return None
        sub = self.subscribers.get(peer_id)
        if sub is not None:
            return sub[0]
        return next((c for c in [*self.neighbours, *self.peers()] if c.id == peer_id), None)

    async def _fetch_proof(self, c: Contact, author: bytes, seq: int) -> None:
        """Get c's entry (author, seq); one that differs from ours is a fork proof
        (add_foreign records and _absorb spreads it)."""
        try:
            reply = await self._request(c, GetRange(self._next_rid(), author, seq, 1))
        except _Failed:
            return
        if reply.entries:
            await self._absorb(reply.entries[:1], c.id, reply.certs)

    async def _within_limits(self, raws, sender: bytes | None) -> list:
        """The entries the per-author and new-author limits let in (limits.py), as
        decoded Entry objects (add_foreign takes them as they are: one decode per
        entry). Undecodable ones pass as bytes: the log rejects them and the sender
        is scored."""
        if self._known is None:
            heads = await self._db(self.log.heads)
            self._known = {a: seq for a, (seq, _) in heads.items()}
        known = self._known
        decoded, passed = [], []
        for r in raws:
            try:
                e = audit.decode_entry(r, verify=False)
            except RemoteProtocolError:
                passed.append(r)
                continue
            if e.seq <= known.get(e.author, -1):
                passed.append(e)          # a replay (or a fork): nothing new is stored
            else:
                decoded.append((e.author, e.seq, e))
        decoded.sort(key=lambda t: (t[0], t[1]))      # the order the log applies them
        ok = self.limits.admit(sender, [(a, len(e.raw)) for a, _, e in decoded],
                               known.__contains__, self.vetted(), trio.current_time())
        dropped = len(decoded) - len(ok)
        if dropped:
            self.counters["entries limited"] += dropped
        return passed + [decoded[i][2] for i in ok]

    def _member_entry(self, raw) -> bool:
        try:
            e = audit.decode_entry(raw, verify=False)     # the log checks signatures
        except RemoteProtocolError:
            return True                                   # the log rejects it, and scores
        return self.author_ok(e.author)

    async def _absorb_fork(self, first: bytes, second: bytes, sender: bytes | None) -> None:
        try:
            fork = await self._db(self.log.add_fork_proof, first, second)
        except RemoteProtocolError:
            self.counters["false fork proofs"] += 1
            if sender is not None:
                self._penalize(sender, "bad signature")
            return
        if fork is not None:
            self.counters["forks learned"] += 1
            self._spread_fork(first, second, exclude=sender)

    def _spread_fork(self, first: bytes, second: bytes, exclude: bytes | None) -> None:
        for c in self._targets():
            if c.id != exclude and self._nursery is not None:
                self._nursery.start_soon(self._send_fork, c, first, second)

    async def _send_fork(self, c: Contact, first: bytes, second: bytes) -> None:
        try:
            await self._request(c, ForkProof(self._next_rid(), first, second))
            self.counters["fork proofs sent"] += 1
        except _Failed:
            self.counters["push failed"] += 1

    # -- anti-entropy ------------------------------------------------------------------
    async def _neighbour_loop(self) -> None:
        """Fill the neighbour set as soon as the DHT knows peers, then keep it.
        The first neighbour found is synced with at once: a node that joins
        (or comes back) catches up now, not at its first anti-entropy round."""
        caught_up = False
        while True:
            self._refresh_neighbours()
            if not caught_up and self.neighbours:
                caught_up = True
                self._nursery.start_soon(self.sync_with, self.neighbours[0])
            short = len(self.neighbours) < self.fanout
            await trio.sleep(1.0 if short else self.sync_interval)

    async def _sync_loop(self) -> None:
        while True:
            await trio.sleep(self.sync_interval * (0.5 + self.rng.random()))
            await self.spread_own()
            before = {c.id for c in self.neighbours}
            self._refresh_neighbours(force=self.rng.random() < 0.1)
            for c in self.neighbours:                 # renew the others' subscriptions
                if c.id in before:
                    self._nursery.start_soon(self._hello, c)
            pool = [c for c in self.peers() if c.id != self.own_id and not self._banned(c.id)]
            if pool:
                await self.sync_with(self.rng.choice(pool))

    async def repair(self, authors=None) -> int:
        """Find where our stored copies of other authors' logs are damaged (a row
        missing, altered or not linking: AuditLog.damaged, which re-verifies) and
        pull those ranges again from peers; add_foreign puts every valid entry that
        links in place of the damage. Heads alone cannot show a hole in the middle
        of a log: this compares ranges. Returns how many entries were repaired;
        counters "entries repaired" and "damage found"; a warning says so."""
        damaged = await self._db(self.log.damaged)
        if authors is not None:
            damaged = {a: s for a, s in damaged.items() if a in set(authors)}
        fixed = 0
        for author, start in damaged.items():
            self.counters["damage found"] += 1
            pool = [c for c in self.peers() if c.id != self.own_id and not self._banned(c.id)]
            self.rng.shuffle(pool)
            for c in pool[:REPAIR_PEERS]:
                got = await self._repair_from(c, author, start)
                fixed += got
                if got and author not in await self._db(self.log.damaged, [author]):
                    break
        if fixed:
            log.warning("audit: repaired %d damaged entr%s of our copies of other logs",
                        fixed, "y" if fixed == 1 else "ies")
        return fixed

    async def _repair_from(self, c: Contact, author: bytes, start: int) -> int:
        fixed = 0
        for _ in range(REPAIR_ROUNDS):
            try:
                reply = await self._request(c, GetRange(self._next_rid(), author, start,
                                                        MAX_ENTRIES))
            except _Failed:
                return fixed
            if not reply.entries:
                return fixed
            res = await self._absorb(reply.entries, c.id, reply.certs)
            fixed += res.repaired
            left = (await self._db(self.log.damaged, [author])).get(author)
            if left is None:
                return fixed
            start = left if left > start else start + len(reply.entries)
        return fixed

    async def _repair_loop(self) -> None:
        while True:
            await trio.sleep(REPAIR_INTERVAL * (0.5 + self.rng.random()))
            await self.repair()

    async def sync_with(self, c: Contact) -> dict:
        """One anti-entropy round with c: pull what we lack, push what it lacks,
        fetch the proof of any fork. Returns what it moved."""
        stats = {"pulled": 0, "pushed": 0, "forks": 0}
        root, buckets = await self._db(self._my_digests)
        try:
            reply = await self._request(c, Sync(self._next_rid(), root, buckets))
        except _Failed:
            self.counters["sync failed"] += 1
            return stats
        self.counters["syncs"] += 1
        diff = set(differing(buckets, reply.buckets))
        if not diff:
            return stats
        mine = await self._db(self.log.heads)
        theirs = {a: (s, i) for a, s, i in reply.heads}
        # with more=True the list was cut after its last author (they are sorted)
        cutoff = reply.heads[-1][0] if reply.more and reply.heads else None
        to_push: list[bytes] = []
        defer_until = trio.current_time() + self.max_defer
        for a, (s, i) in theirs.items():
            m = mine.get(a)
            if m is not None and s < m[0]:
                # their head is behind ours: is it one of our entries? (a fork whose
                # other side is shorter: heads of equal seq are compared below)
                held = await self._db(self.log.entry, a, s)
                if held is not None and held.id != i:
                    await self._fetch_proof(c, a, s)
                    stats["forks"] += 1
            if m is None or m[0] < s:
                await self._yield_to_transfers(defer_until)
                stats["pulled"] += await self._pull_range(c, a, 0 if m is None else m[0] + 1, s,
                                                          MAX_PULL_PER_SYNC - stats["pulled"])
            elif m[0] > s:
                to_push.extend(await self._db(self.log.raw_range, a, s + 1,
                                              MAX_PUSH_PER_SYNC - len(to_push)))
            elif m[1] != i:                                 # same seq, other entry: a fork
                if await self._pull(c, a, s, 1) is not None:
                    stats["forks"] += 1
        for a in sorted(mine):                              # authors the peer lacks entirely
            if len(to_push) >= MAX_PUSH_PER_SYNC:
                break
            if a not in theirs and bucket_of(a) in diff and (cutoff is None or a < cutoff):
                to_push.extend(await self._db(self.log.raw_range, a, 0,
                                              MAX_PUSH_PER_SYNC - len(to_push)))
        stats["pushed"] = len(to_push)
        if to_push:
            self._enqueue(c, to_push)
        return stats

    async def _yield_to_transfers(self, until: float) -> None:
        """Wait while busy(), but not past `until` (trio time)."""
        if self.busy is None or not self.busy():
            return
        self.counters["pulls deferred"] += 1
        while self.busy() and trio.current_time() < until:
            await trio.sleep(min(BUSY_POLL, max(0.0, until - trio.current_time())))

    async def _pull_range(self, c: Contact, author: bytes, start: int, last: int,
                          budget: int) -> int:
        """Pull author's entries start..last from c (at most budget); returns how
        many were added."""
        added = 0
        for _ in range((last - start) // MAX_ENTRIES + 1):
            if start > last or added >= budget:
                break
            got = await self._pull(c, author, start, min(MAX_ENTRIES, last - start + 1))
            if not got:
                break
            added += got
            start += got
        return added

    async def _pull(self, c: Contact, author: bytes, start: int, count: int) -> int | None:
        try:
            reply = await self._request(c, GetRange(self._next_rid(), author, start, count))
        except _Failed:
            return None
        if not reply.entries:
            return 0
        res = await self._absorb(reply.entries, c.id, reply.certs)
        self.counters["entries pulled"] += res.added
        return res.added if not res.rejected else None

    # -- own entries and witnesses -----------------------------------------------------
    async def _own_loop(self) -> None:
        while True:
            await trio.sleep(self.own_poll)
            await self.spread_own()

    async def _witness_loop(self) -> None:
        while True:
            await trio.sleep(self.witness_interval * (0.75 + 0.5 * self.rng.random()))
            await self.witness()

    async def witness(self) -> audit.Entry | None:
        """Append a witness entry if a foreign log has news since the last one, or
        if a refresh is due (see the module doc); None otherwise."""
        def go():
            now, refresh = self._now_ns(), int(self.cosign_refresh * 1e9)
            heads = {a: h for a, h in self.log.heads().items() if a != self.own_author}
            old = self._witnessed or {}
            # only news other than witness entries calls for a witness at once:
            # witnesses of witnesses would never end; they wait for the refresh
            if any(self.log.has_news(a, old.get(a, (-1,))[0])
                   for a, h in heads.items() if old.get(a) != h):
                self._witnessed = heads
                return self.log.witness(now, refresh)
            if (self._refreshed is not None and now - self._refreshed < refresh
                    or not self.log.cosign_due(now, refresh)):
                return None
            self._witnessed, self._refreshed = heads, now
            return self.log.witness(now, 0)          # every head: our cosigns in step
        e = await self._db(go)
        if e is not None:
            self.counters["witness entries"] += 1
            await self.spread_own()
        return e

    # -- requests, scores ----------------------------------------------------------------
    def _next_rid(self) -> int:
        self._rid = (self._rid + 1) & ((1 << 63) - 1)
        return self._rid

    async def _request(self, c: Contact, msg):
        if self._banned(c.id):
            raise _Failed("banned")
        data = encode_message(msg)
        try:
            with trio.fail_after(self.request_timeout):
                stream = await self.net.open_stream(c.id, c.addr, PROTOCOL_ID)
                try:
                    await stream.send_all(data)
                    self.counters["bytes out"] += len(data)
                    reply, n = await _read_one(stream)
                    self.counters["bytes in"] += n
                    # traffic by exchange (request + reply), for the bandwidth figures
                    self.counters[f"bytes {type(msg).TAG}"] += len(data) + n
                finally:
                    await stream.aclose()
        except trio.TooSlowError:
            raise _Failed("timeout") from None
        except RemoteProtocolError:
            self._penalize(c.id, "malformed")
            raise _Failed("malformed", misbehaved=True) from None
        except (PeerClosed, TransportError, trio.BrokenResourceError, trio.ClosedResourceError):
            raise _Failed("unreachable") from None
        if not answers(msg, reply):
            self._penalize(c.id, "wrong reply")
            raise _Failed("wrong reply", misbehaved=True)
        return reply

    def _banned(self, peer_id: bytes) -> bool:
        return self.scores is not None and self.scores.banned(peer_id, trio.current_time())

    def _penalize(self, peer_id: bytes, reason: str) -> None:
        self.counters[f"penalty {reason}"] += 1
        if self.scores is not None and self.scores.penalize(peer_id, reason,
                                                            trio.current_time()):
            self.counters["banned"] += 1
            self.neighbours = [c for c in self.neighbours if c.id != peer_id]



def _cert_nodes(raws) -> set:
    """The node keys certificates name (undecodable ones are skipped)."""
    from hypersdk.protocol import membership as ms
    out = set()
    for raw in raws:
        try:
            out.add(ms.decode_certificate(raw).node)
        except RemoteProtocolError:
            continue
    return out


class _Failed(Exception):
    def __init__(self, reason: str, misbehaved: bool = False):
        super().__init__(reason)
        self.misbehaved = misbehaved


async def _read_one(stream):
    """One message off a stream: (message, bytes read). RemoteProtocolError for
    bad bytes, PeerClosed at an EOF before a frame began."""
    reader = FrameReader(stream, frame_decoder())
    msg = await reader.message()
    return msg, reader.received


__all__ = ["AuditGossip", "PROTOCOL_ID", "FANOUT", "SYNC_INTERVAL", "WITNESS_INTERVAL"]
