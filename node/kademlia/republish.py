"""Announcing many provided keys at once: the keyspace sweep (dht/reprovide.py)
driven over a DhtService.

The republish every REPUBLISH_INTERVAL, and `DhtService.provide_many`, run one
`dht.reprovide.Sweep` over the keys: each LookupRequest becomes an ordinary
k-closest lookup (DhtService.closest_peers, seeded with the peers the sweep
already knows), each Batch one AddProviders request carrying up to
MAX_BATCH_KEYS keys. So the cost is set by the network's size, not by the
number of keys: a few lookups to complete the keyspace plus about one
AddProviders per peer (issue: "at most 2 messages per key per republish").

One lookup at a time per sweep (a sweep is sequential; a lookup already keeps
alpha requests in flight); with many keys (KEYS_PER_PART per slice) the keys
are split by their top bits into up to SWEEP_PARTS slices swept at once, while batches are sent in
the background, at most
BATCH_CONCURRENCY at once, so a slow peer does not hold up the walk. A batch
that fails (no reply, or Ack(stored=False)) is counted, not retried: the next
republish (22 h) comes well before the records expire (48 h), as for the
one-key AddProvider.

Measured (tests/test_dht_service.py, 300 simnet nodes, one node republishing
3,000 keys): 21 lookups (483 FIND_NODE queries) + 299 AddProviders = 0.26
messages/key, every sampled key found and held by exactly its 20 closest peers.

Accounting (`RepublishStats`): a request and its reply count as one message;
messages = lookup queries (FIND_NODE requests sent) + AddProviders sent.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import trio

from hypersdk.dht.lookup import FINISHED
from hypersdk.dht.reprovide import Batch, LookupRequest, Sweep, SweepStats
from hypersdk.protocol.dht_messages import MAX_BATCH_KEYS, Ack, AddProviders

BATCH_CONCURRENCY = 16          # AddProviders requests in flight at once
SWEEP_PARTS = 8                 # at most this many sweeps at once, over keyspace slices
KEYS_PER_PART = 10_000          # a slice per this many keys (fewer: one sweep)


@dataclass(slots=True)
class RepublishStats(SweepStats):
    """The sweep's own accounting (messages, messages_per_key) plus what only
    the driver knows."""
    batches_failed: int = 0    # AddProviders that got no reply or Ack(stored=False)
    seconds: float = 0.0       # trio time the whole sweep took


async def announce_keys(svc, keys) -> RepublishStats:
    """Announce every key of `keys` to its k closest peers with one sweep; also
    (re)store our own provider record for each key locally."""
    start = trio.current_time()
    keys = list(keys)
    for key in keys:
        svc.providers.add(key, svc.own, start)
    # Independent sweeps over disjoint keyspace slices run at once (dht/reprovide.py:
    # "run one Sweep per keyspace prefix concurrently"): each is sequential, so
    # one sweep of 100,000 keys on 10,000 nodes is ~770 lookups one after another.
    # A slice needs enough keys per node that its own lookups stay amortised.
    parts = 1
    while parts < SWEEP_PARTS and len(keys) >= parts * 2 * KEYS_PER_PART:
        parts *= 2
    shift = 8 - (parts.bit_length() - 1)
    slices: list[list[bytes]] = [[] for _ in range(parts)]
    for key in keys:
        slices[key[0] >> shift if parts > 1 else 0].append(key)
    sweeps = [Sweep(part, own_id=svc.own.id, k=svc.k, max_batch_keys=MAX_BATCH_KEYS)
              for part in slices if part or parts == 1]
    limiter = trio.CapacityLimiter(BATCH_CONCURRENCY)
    failed = 0

    async def send(batch: Batch) -> None:
        nonlocal failed
        async with limiter:
            if svc.scores.banned(batch.peer.id, trio.current_time()):
                failed += 1
                return
            msg = AddProviders(svc._rid(), tuple(sorted(batch.keys)), svc.info, svc.info)
            reply = await svc.request(batch.peer, msg)
        if not (isinstance(reply, Ack) and reply.stored):
            failed += 1

    async def run(sweep: Sweep, nursery) -> None:
        while (event := sweep.next_event()) is not FINISHED:
            if isinstance(event, LookupRequest):
                peers, stats = await svc.closest_peers(event.target, seeds=event.seeds)
                sweep.on_lookup(event.target, peers, stats.queries)
            elif isinstance(event, Batch):
                nursery.start_soon(send, event)
            else:                   # WAITING: impossible, each lookup is awaited above
                raise AssertionError(f"unexpected sweep event {event!r}")

    async with trio.open_nursery() as nursery:
        for sweep in sweeps:
            nursery.start_soon(run, sweep, nursery)
    total = {f.name: sum(getattr(sw.stats, f.name) for sw in sweeps)
             for f in dataclasses.fields(SweepStats)}
    svc.counters["republish batches failed"] += failed
    return RepublishStats(**total, batches_failed=failed,
                          seconds=trio.current_time() - start)
