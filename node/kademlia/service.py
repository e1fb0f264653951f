"""DhtService: runs the Kademlia DHT of one node over a Transport.

Glue only. The decisions live in the pure cores: dht.routing.RoutingTable (who
we know), dht.lookup.Lookup (whom to ask next), dht.providers (provider
records, when to republish), node.kademlia.rpc (one request per stream, peer
scores, signed records). This module feeds them trio.current_time() (the only
clock of the DHT; under simnet it is virtual), performs the I/O they ask for,
and owns the background tasks:

    run()  ├─ request handler  node.kademlia.rpc.Responder: one request per stream
           ├─ bucket refresh   every refresh_interval/4: look up a random id in each stale
           │                   bucket, until REFRESH_ANSWERS peers in its range answered (a
           │                   refresh only needs live contacts in the range, not a
           │                   record's k holders)
           ├─ provider expiry  every hour: drop expired provider records
           ├─ provider checks  when a newcomer waits at a key full of providers, ping
           │                   the ones not heard from lately; the first that fails
           │                   gives the newcomer its place (dht/providers.py rule 4)
           └─ republish        every 22 h: re-announce every provided key with one
                               keyspace sweep (node/kademlia/republish.py): a few lookups
                               and batched AddProviders, not a lookup per key

Every request we send carries our PeerInfo as `sender`, so responders learn us;
we use a requester's claim only when its id is the transport-authenticated
peer id. Misbehaving peers are scored down and banned (node/kademlia/rpc.py rules).
A handler never lets an exception escape: it is counted in `counters` and the
stream is closed. Testing hook: when the transport's network model says
`is_malicious(our addr)`, we answer FIND_NODE and GET_PROVIDERS with far or
fabricated peers.
"""
from __future__ import annotations

import collections
import logging
import math
import random
from dataclasses import dataclass

import trio

from hypersdk.dht.contact import Contact
from hypersdk.dht.keys import ID_BITS, bucket_index
from hypersdk.dht.lookup import ALPHA, FINISHED, REQUEST_TIMEOUT, K, Lookup
from hypersdk.dht.providers import REPUBLISH_INTERVAL, ProviderStore, Republisher
from hypersdk.dht.routing import (
    MAX_PER_PREFIX24,
    MAX_PER_SITE,
    REFRESH_ANSWERS,
    REFRESH_INTERVAL,
    REFRESH_K,
    RoutingTable,
)
from hypersdk.node.kademlia.republish import RepublishStats, announce_keys
from hypersdk.node.kademlia.rpc import (
    PROTOCOL,
    PeerScores,
    RecordStore,
    RequestFailed,
    Responder,
    request,
    to_contact,
    to_info,
)
from hypersdk.protocol.dht_messages import (
    Ack,
    AddProvider,
    FindNode,
    GetProviders,
    GetRecord,
    Nodes,
    Ping,
    Providers,
    PutRecord,
    RecordFound,
    SignedRecord,
)

log = logging.getLogger(__name__)
EXPIRE_EVERY = 3600.0           # seconds between provider-store sweeps
LOOKUP_GRACE = 0.5              # seconds a lookup waits past a request's own deadline
EARLY_STORE_PREFIX = 5          # a provide stores early once this many closest answered
PROVIDE_WALK_K = 15             # a provide's walk ends once this many closest answered
JOIN_MIN_MEMBERS = 2            # a join walks into a far bucket with fewer members
MAX_CHECKS = 8                  # provider liveness pings in flight (check_providers)


@dataclass(frozen=True, slots=True)
class LookupStats:
    hops: int          # depth of the deepest peer that answered (seeds are hop 1)
    queries: int       # requests sent
    failures: int      # requests that got no usable reply
    seconds: float     # trio time the lookup took


class DhtService:
    def __init__(self, transport, own: Contact, *, rng: random.Random, k: int = K,
                 alpha: int = ALPHA, request_timeout: float = REQUEST_TIMEOUT,
                 disjoint_paths: int = 1, max_per_prefix24: int | None = MAX_PER_PREFIX24,
                 max_per_site: int | None = MAX_PER_SITE,
                 refresh_interval: float = REFRESH_INTERVAL,
                 republish_interval: float = REPUBLISH_INTERVAL,
                 providers: ProviderStore | None = None, scores: PeerScores | None = None):
        self.transport, self.own, self.info = transport, own, to_info(own)
        # author key -> bool: may a signed record of this author be stored (members
        # only, node/net/gate.py); None: any author
        self.author_ok = None
        self.k, self.alpha, self.disjoint_paths = k, alpha, disjoint_paths
        self.request_timeout = request_timeout
        self.refresh_interval = refresh_interval
        self.table = RoutingTable(own.id, rng=rng, k=k, max_per_prefix24=max_per_prefix24,
                                  max_per_site=max_per_site)
        self.providers = providers if providers is not None else ProviderStore()
        self.republisher = Republisher(republish_interval)
        self.records = RecordStore()
        self.scores = scores if scores is not None else PeerScores()
        self.counters: collections.Counter = collections.Counter()
        self.errors: collections.deque = collections.deque(maxlen=10)   # last handler bugs
        self.rng = rng
        self.last_republish: RepublishStats | None = None    # the last sweep's figures
        self._nursery: trio.Nursery | None = None
        self._checking: set[bytes] = set()      # providers being pinged (check_providers)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                responder = Responder(self)
                self.transport.set_handler(PROTOCOL, responder.handle)
                if hasattr(self.transport, "set_rpc_handler"):     # simnet's fast path
                    self.transport.set_rpc_handler(PROTOCOL, responder.handle_rpc)
                nursery.start_soon(self._refresh_loop)
                nursery.start_soon(self._expire_loop)
                nursery.start_soon(self._republish_loop)
                task_status.started()
        finally:
            self._nursery = None

    @property
    def running(self) -> bool:
        return self._nursery is not None

    # -- public API ----------------------------------------------------------------------

    async def bootstrap(self, seeds: list[Contact]) -> None:
        """Join through `seeds`: look up our own id, which fills the near buckets and
        announces us to our neighbourhood, then refresh the buckets we heard
        nothing from on the way (routing rule 8). Without that a node whose seeds
        all sit in its own half of the keyspace never learns the other half."""
        now = trio.current_time()
        for seed in seeds:
            self.observe(seed, now)
        peers, _ = await self.closest_peers(self.own.id)
        # The self-lookup's k closest have all answered, so every bucket nearer
        # than the farthest of them is complete: a lookup into its range
        # completed (routing rule 8). A farther bucket with fewer than
        # JOIN_MIN_MEMBERS members gets a refresh walk; the far contacts the
        # replies taught us (routing rule 9) seed it, so it is short. Learned
        # contacts alone do not cover a bucket: the peers that route through
        # us see only members (a table whose far quarter is only learned
        # sends every lookup for that quarter to the wrong region).
        now = trio.current_time()
        cover = (bucket_index(self.own.id, peers[-1].id) if len(peers) >= self.k
                 else ID_BITS)       # fewer than k found: the walk saw everyone it could
        for i in range(min(cover, ID_BITS)):
            self.table.touch_bucket(i, now)
        stale = self.table.stale_buckets(now, self.refresh_interval)
        for i in stale:
            if i >= cover and self.table.size(i) < JOIN_MIN_MEMBERS:
                await self._refresh_bucket(i)

    async def refresh(self) -> None:
        """Look up a random id in each stale bucket, farthest first (routing rule 8)."""
        for i in self.table.stale_buckets(trio.current_time(), self.refresh_interval):
            await self._refresh_bucket(i)

    async def _refresh_bucket(self, i: int) -> None:
        """One refresh walk into bucket i: a random target in its range, until
        REFRESH_ANSWERS peers in that range have answered (or the REFRESH_K
        closest found have: a range with nobody in it), REFRESH_ANSWERS in
        flight. The answers prove the range has live members (they land in our
        table, and the bucket is fresh) and their replies teach us up to k more
        of the range (routing rule 9): that is what routing needs. Walking on to
        the target's own k closest costs several times as many requests for the
        same table, and with ~14 buckets per node an hour it is most of a quiet
        network's traffic."""
        target = self.table.refresh_target(i)
        own = self.own.id
        in_range = 0

        def absorb(peer: Contact, reply) -> bool:
            nonlocal in_range
            in_range += bucket_index(own, peer.id) == i
            return in_range >= REFRESH_ANSWERS

        await self._walk(target, lambda rid: FindNode(rid, target, self.info), absorb,
                         k=REFRESH_K, alpha=min(self.alpha, REFRESH_ANSWERS))
        self.table.touch_bucket(i, trio.current_time())

    async def find_node(self, target: bytes) -> list[Contact]:
        return (await self.closest_peers(target))[0]

    async def closest_peers(self, target: bytes, *, seeds=(), k: int | None = None
                            ) -> tuple[list[Contact], LookupStats]:
        """The k (default: the service's k) closest live peers to `target`
        (iterative FIND_NODE), starting from our routing table's closest plus `seeds`."""
        lookup, stats = await self._walk(target, lambda rid: FindNode(rid, target, self.info),
                                         seeds=seeds, k=k)
        if target != self.own.id:
            self.table.touch_bucket(bucket_index(self.own.id, target), trio.current_time())
        return lookup.result(), stats

    async def provide(self, key: bytes) -> int:
        """Announce that we hold `key` to the k peers closest to it, and keep announcing
        it every republish interval. Returns how many peers stored the record."""
        stored = await self._announce(key)
        self._start_providing([key])
        return stored

    async def provide_many(self, keys) -> RepublishStats:
        """provide() for many keys at once: one keyspace sweep announces them all
        (a few lookups and one AddProviders per peer, not a lookup per key), and
        they are republished from then on."""
        keys = list(keys)
        stats = await announce_keys(self, keys)
        self._start_providing(keys)
        return stats

    async def republish(self) -> RepublishStats:
        """Re-announce every provided key now (one sweep); kept in last_republish."""
        self.last_republish = await announce_keys(self, self.republisher.keys)
        return self.last_republish

    def _start_providing(self, keys) -> None:
        for key in keys:
            self.republisher.provide(key)
        if keys and self.republisher.next_due() is None:   # first keys: the schedule starts
            self.republisher.mark_done(trio.current_time())

    def stop_providing(self, key: bytes) -> None:
        """Stop republishing `key`; the records elsewhere expire within their ttl."""
        self.republisher.withdraw(key)

    async def find_providers(self, key: bytes, count: int = 1
                             ) -> tuple[list[Contact], LookupStats]:
        """Peers that announced `key`, stopping once `count` distinct ones are known."""
        found = {c.id: c for c in self.providers.get(key, trio.current_time())}
        if len(found) >= count:
            return list(found.values()), LookupStats(0, 0, 0, 0.0)
        banned = self.scores.banned

        def absorb(peer: Contact, reply: Providers) -> bool:
            now = trio.current_time()
            for p in reply.providers:
                if not banned(p.id, now):       # a peer we banned is asked for nothing
                    found.setdefault(p.id, to_contact(p))
            return len(found) >= count

        _, stats = await self._walk(key, lambda rid: GetProviders(rid, key, self.info), absorb)
        return list(found.values()), stats

    async def put_record(self, record: SignedRecord) -> int:
        """Store a signed record here and on the k peers closest to its key.
        Returns how many peers stored it. ValueError if the signature is bad."""
        if not record.verify():
            raise ValueError("record signature does not verify")
        self.records.put(record)
        peers, _ = await self.closest_peers(record.key)
        replies = await self._fan_out(peers, lambda rid: PutRecord(rid, record, self.info))
        return sum(1 for r in replies if isinstance(r, Ack) and r.stored)

    async def get_record(self, key: bytes, quorum: int = 3
                         ) -> tuple[SignedRecord | None, LookupStats]:
        """The highest-seq verified record for `key` among the first `quorum` peers
        (and ourselves) that hold one."""
        best, holders = self.records.get(key), 0

        def absorb(peer: Contact, reply: RecordFound) -> bool:
            nonlocal best, holders
            rec = reply.record
            if rec is None:
                return False
            if rec.key != key or not rec.verify():
                self.penalize(peer.id, "bad signature", trio.current_time())
                return False
            holders += 1
            if best is None or (rec.author == best.author and rec.seq > best.seq):
                best = rec
            return holders >= quorum

        _, stats = await self._walk(key, lambda rid: GetRecord(rid, key, self.info), absorb)
        return best, stats

    async def request(self, contact: Contact, msg):
        """One request to one peer: its reply, or None (the failure is recorded)."""
        try:
            reply = await request(self.transport, contact, msg, self.request_timeout)
        except RequestFailed as exc:
            now = trio.current_time()
            self.counters[f"failed: {exc.reason}"] += 1
            if exc.misbehaved:
                self.penalize(contact.id, exc.reason, now)
            elif exc.reason == "timeout":       # counts, but cannot ban by itself
                self.scores.penalize(contact.id, "timeout", now)
            self.table.failed(contact.id, now)
            self.counters["providers let in"] += self.providers.mark_failed(contact.id, now)
            return None
        now = trio.current_time()
        self.scores.reward(contact.id, now)
        self.providers.mark_ok(contact.id, now)
        self.observe(contact, now)
        return reply

    def check_providers(self, key: bytes) -> None:
        """A newcomer waits at the full provider list of `key` (dht/providers.py
        rule 4): ping the providers of it nobody heard from lately, in the
        background (at most MAX_CHECKS at once, one per provider); the first
        that fails gives its place to the newcomer."""
        if not self.running:
            return
        for c in self.providers.to_check(key, trio.current_time()):
            if len(self._checking) >= MAX_CHECKS:
                self.counters["provider checks skipped"] += 1
                return
            if c.id not in self._checking:
                self._checking.add(c.id)
                self._nursery.start_soon(self._check_provider, c)

    async def _check_provider(self, contact: Contact) -> None:
        try:
            self.counters["provider checks"] += 1
            await self.request(contact, Ping(self._rid(), self.info))
        finally:
            self._checking.discard(contact.id)

    # -- lookups -------------------------------------------------------------------------

    async def _walk(self, target: bytes, make, absorb=None, seeds=(), k: int | None = None,
                    on_reply=None, on_query=None, alpha: int | None = None
                    ) -> tuple[Lookup, LookupStats]:
        """Drive a Lookup to its end: send make(rid) to each peer it names, feed the
        replies back; absorb(peer, reply) -> True stops the walk early;
        on_reply(lookup) hears of every answer once the lookup has taken it in,
        on_query(lookup, peer) of every query as it is sent.
        `seeds`: contacts to start from besides the routing table's closest."""
        start = trio.current_time()
        # Each request ends by its own deadline and reports (a timeout is scored or
        # counted); the lookup's own deadline, a little later, never fires first.
        lookup = Lookup(target, [*seeds, *self.table.closest(target, self.k, learned=True)],
                        own_id=self.own.id, k=k or self.k, alpha=alpha or self.alpha,
                        disjoint_paths=self.disjoint_paths,
                        request_timeout=self.request_timeout + LOOKUP_GRACE)
        send, receive = trio.open_memory_channel(math.inf)
        failures = 0

        async def query(peer: Contact):
            send.send_nowait((peer, await self.request(peer, make(self._rid()))))

        async with trio.open_nursery() as nursery:
            while (step := lookup.next(now := trio.current_time())) is not FINISHED:
                if isinstance(step, Contact):
                    if self.scores.banned(step.id, now):
                        lookup.on_failure(step.id, now)
                    else:
                        nursery.start_soon(query, step)
                        if on_query is not None:
                            on_query(lookup, step)
                    continue
                # WAITING means a request is in flight, and every request ends
                # by its own deadline and reports: no timer is needed here.
                peer, reply = await receive.receive()
                now = trio.current_time()
                if reply is None:
                    failures += 1
                    lookup.on_failure(peer.id, now)
                    continue
                closer = reply.peers if isinstance(reply, Nodes) else reply.closer
                if absorb is not None and absorb(peer, reply):
                    lookup.stop()
                usable = self._usable(closer, now)
                learn, knows = self.table.learn, lookup.knows
                for c in usable:
                    if not knows(c.id):         # a peer the walk knows was learned already
                        learn(c)
                lookup.on_success(peer.id, usable, now)
                if on_reply is not None:
                    on_reply(lookup)
            nursery.cancel_scope.cancel()       # late replies are not needed
        stats = LookupStats(lookup.hops, lookup.queries, failures,
                            trio.current_time() - start)
        return lookup, stats

    def _usable(self, peers, now: float) -> list[Contact]:
        banned = self.scores.banned
        return [to_contact(p) for p in peers if not banned(p.id, now)]

    async def _fan_out(self, peers: list[Contact], make) -> list:
        replies: list = []

        async def one(peer: Contact):
            replies.append(await self.request(peer, make(self._rid())))

        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(one, peer)
        return replies

    async def _announce(self, key: bytes) -> int:
        """Store our provider record on the k peers closest to `key`. Optimistic:
        while the FIND_NODE walk goes on, each peer in its answered prefix
        (Lookup.confirmed, once it holds EARLY_STORE_PREFIX peers) gets its
        ADD_PROVIDER at once, so the stores overlap the walk's last rounds
        instead of following them; at the end the rest of the k closest get
        theirs. The walk ends once the PROVIDE_WALK_K closest have answered:
        the k closest are then the k nearest known that have not failed, and
        the record's store is what checks the rest are alive (a peer nearer
        the key than those answers' peers would have to be unknown to all of
        the PROVIDE_WALK_K nearest, whose tables cover their neighbourhood);
        it saves the walk's last rounds, alpha queries per round trip. A peer stored on early that a
        later reply pushes out of the k
        closest is an extra message (counted like any request: the simnet
        runner charges it to the provide) and an extra replica. The walk keeps
        its alpha bound; the stores are the fan-out, as before. Returns how
        many of the final k closest stored the record."""
        now = trio.current_time()
        self.providers.add(key, self.own, now)
        acked: dict[bytes, bool] = {}
        sent: set[bytes] = set()

        async def store(peer: Contact):
            reply = await self.request(peer, AddProvider(self._rid(), key, self.info, self.info))
            acked[peer.id] = isinstance(reply, Ack) and reply.stored

        async with trio.open_nursery() as stores:
            def send(peers):
                for peer in peers:
                    if peer.id not in sent:
                        sent.add(peer.id)
                        stores.start_soon(store, peer)

            def on_reply(lk: Lookup) -> None:
                # the walk is converging (its answered prefix is long): store on
                # the k nearest known now, so the stores overlap the walk's end
                if lk.confirmed(EARLY_STORE_PREFIX):
                    send(lk.closest_known(self.k))

            lookup, _ = await self._walk(
                key, lambda rid: FindNode(rid, key, self.info), k=PROVIDE_WALK_K,
                on_reply=on_reply)
            self.table.touch_bucket(bucket_index(self.own.id, key), trio.current_time())
            peers = lookup.closest_known(self.k)
            send(peers)
        extra = len(sent) - len(peers)
        if extra:
            self.counters["early stores outside the k closest"] += extra
        return sum(1 for p in peers if acked.get(p.id))

    def _rid(self) -> int:
        return self.rng.getrandbits(64)

    # -- routing table upkeep and peer scores (also used by the Responder) ---------------

    def observe(self, contact: Contact, now: float) -> None:
        if self.scores.banned(contact.id, now):
            return
        outcome = self.table.observe(contact, now)
        if outcome.ping is not None and self.running:
            self._nursery.start_soon(self._ping, outcome.ping)

    async def _ping(self, contact: Contact) -> None:
        reply = await self.request(contact, Ping(self._rid(), self.info))
        self.table.ping_result(contact.id, reply is not None, trio.current_time())

    def penalize(self, peer_id: bytes, reason: str, now: float) -> None:
        self.counters[f"penalty: {reason}"] += 1
        if self.scores.penalize(peer_id, reason, now):
            log.info("banning peer %s: %s", peer_id.hex()[:12], reason)
            self.counters["bans"] += 1
            self.table.remove(peer_id)          # from its bucket and the replacements
            self.providers.mark_failed(peer_id, now, banned=True)   # never handed out

    async def _refresh_loop(self) -> None:
        while True:
            await trio.sleep(self.refresh_interval / 4)
            await self.refresh()

    async def _expire_loop(self) -> None:
        while True:
            await trio.sleep(EXPIRE_EVERY)
            self.providers.expire(trio.current_time())

    async def _republish_loop(self) -> None:
        while True:
            now = trio.current_time()
            if self.republisher.due(now):
                await self.republish()
                self.republisher.mark_done(now)
            due = self.republisher.next_due()       # None or past: nothing to provide yet
            await trio.sleep_until(due if due is not None and due > now
                                   else now + self.republisher.interval)
