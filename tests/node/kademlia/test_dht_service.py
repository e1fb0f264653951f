"""node.kademlia.service: whole DHT nodes on the simnet in-memory network, virtual time.

Every test runs under pytest-trio's autojump clock: the network's delays and the
service's timers are trio time, so days pass in seconds and a test waits for
events or bounded virtual deadlines, never for wall-clock sleeps. All
randomness is seeded.
"""
from __future__ import annotations

import collections
import dataclasses
import random
import statistics

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hypersdk.dht.contact import Contact
from hypersdk.dht.keys import closest, distance, node_id
from hypersdk.dht.providers import ProviderStore
from hypersdk.node.kademlia.rpc import (
    BAN_TIME,
    PENALTIES,
    PROTOCOL,
    PeerScores,
    RecordStore,
    to_info,
)
from hypersdk.node.kademlia.service import DhtService
from hypersdk.node.net.transport import TransportError
from hypersdk.protocol.dht_messages import (
    Ack,
    AddProviders,
    FindNode,
    Nodes,
    Pong,
    PutRecord,
    SignedRecord,
)
from hypersdk.protocol.framing import HEADER, MAX_FRAME, FrameDecoder, encode_message
from hypersdk.simnet.network import NetworkModel
from hypersdk.simnet.transport import LinkModel, SimNetwork

HOUR = 3600.0


def _contact(rng: random.Random, i: int) -> Contact:
    return Contact(node_id(rng.randbytes(32)), f"/ip4/10.{i >> 8}.{i & 255}.1/tcp/4001",
                   f"site{i % 40}")


async def start_network(nursery, n: int, *, seed: int = 1, model=None, fast_rpc=False,
                        **opts):
    """A SimNetwork with n running DhtServices (not yet joined); fast_rpc: the
    one-shot request path simnet runs use (simnet/transport.py)."""
    net = SimNetwork(model, fast_rpc=fast_rpc)
    await nursery.start(net.run)
    rng = random.Random(seed)
    nodes = []
    for i in range(n):
        c = _contact(rng, i)
        svc = DhtService(net.add_node(c.id, c.addr), c, rng=random.Random(rng.getrandbits(64)),
                         **opts)
        await nursery.start(svc.run)
        nodes.append(svc)
    return net, nodes


async def join(nodes: list[DhtService]) -> None:
    """Every node bootstraps through nodes[0], all at the same time."""
    async with trio.open_nursery() as n:
        for svc in nodes[1:]:
            n.start_soon(svc.bootstrap, [nodes[0].own])


def assert_healthy(net: SimNetwork, nodes) -> None:
    assert net.handler_errors == []
    for svc in nodes:
        assert svc.counters["handler errors"] == 0, list(svc.errors)


def raw_peer(net: SimNetwork, rng: random.Random, i: int, handler) -> Contact:
    """A peer that speaks PROTOCOL with a hand-written handler (an attacker)."""
    c = _contact(rng, i)
    net.add_node(c.id, c.addr).set_handler(PROTOCOL, handler)
    return c


async def read_request(stream):
    dec = FrameDecoder()
    while (msg := dec.next_message()) is None:
        data = await stream.receive_some(dec.room)
        if not data:        # the requester gave up before sending (its walk ended):
            raise trio.ClosedResourceError("no request")   # don't spin on EOF
        dec.receive_data(data)
    return msg


# -- (1)-(3) joining, providing, finding -------------------------------------------------

@pytest.mark.slow                             # ~30 s of CPU: 50,000 requests
async def test_200_nodes_join_concurrently_then_every_provider_is_found(nursery, autojump_clock):
    net, nodes = await start_network(nursery, 200)
    t0 = trio.current_time()
    await join(nodes)
    joined_in = trio.current_time() - t0
    sizes = sorted(len(svc.table) for svc in nodes)
    print(f"\njoin: {joined_in:.1f} s virtual; table sizes min {sizes[0]} "
          f"median {sizes[100]} max {sizes[-1]}")
    assert joined_in < 60
    assert sizes[0] >= 20                     # every table is non-trivial (k = 20)

    rng = random.Random(7 + 1000)
    find_hops = []
    for svc in rng.sample(nodes, 20):         # every node can be found by id
        target = rng.choice([x for x in nodes if x is not svc])
        found, stats = await svc.closest_peers(target.own.id)
        assert found[0] == target.own
        assert found == closest(target.own.id, [x.own for x in nodes if x is not svc], 20)
        find_hops.append(stats.hops)

    keys = [rng.randbytes(32) for _ in range(50)]
    owners = [rng.choice(nodes) for _ in keys]
    async with trio.open_nursery() as n:
        for key, owner in zip(keys, owners):
            n.start_soon(owner.provide, key)

    results = []

    async def search(svc, key, owner):
        providers, stats = await svc.find_providers(key)
        results.append((owner.own in providers, len({p.id for p in providers}) == len(providers),
                        stats.hops))

    async with trio.open_nursery() as n:
        for key, owner in zip(keys, owners):
            for svc in rng.sample([x for x in nodes if x is not owner], 4):
                n.start_soon(search, svc, key, owner)
    assert len(results) == 200
    assert all(found for found, _, _ in results)              # success 100 %
    assert all(unique for _, unique, _ in results)
    hops = [h for _, _, h in results]
    print("find_providers hops histogram:", sorted(collections.Counter(hops).items()),
          "median", statistics.median(hops))
    print("find_node hops histogram:", sorted(collections.Counter(find_hops).items()),
          "median", statistics.median(find_hops))
    assert statistics.median(hops) <= 3
    assert statistics.median(find_hops) <= 3
    assert_healthy(net, nodes)


async def test_several_providers_of_a_key_come_back_once_each(nursery, autojump_clock):
    net, nodes = await start_network(nursery, 40, seed=3)
    await join(nodes)
    rng = random.Random(3 + 1000)
    for _ in range(5):
        key = rng.randbytes(32)
        owners = rng.sample(nodes, 4)
        for owner in owners:
            await owner.provide(key)
            await owner.provide(key)          # announcing twice adds no second record
        for svc in rng.sample([x for x in nodes if x not in owners], 3):
            providers, _ = await svc.find_providers(key, count=20)
            assert len(providers) == len({p.id for p in providers}) == 4
            assert set(providers) == {o.own for o in owners}
    for svc in nodes:                         # nor does any store hold duplicates
        for key_records in svc.providers._records.values():
            assert len(key_records) <= 4
    assert_healthy(net, nodes)


# -- (4) misbehaving peers -----------------------------------------------------------------

async def garbage(stream, peer_id):
    await read_request(stream)
    await stream.send_all(b"\x00\x00\x00\x10" + bytes(range(16)))     # 16 bytes of non-msgpack


async def oversized(stream, peer_id):
    await read_request(stream)
    await stream.send_all((MAX_FRAME + 1).to_bytes(HEADER, "big") + b"x" * 100)


async def endless(stream, peer_id):
    """Announces a full-size frame, then trickles bytes that never complete it."""
    await read_request(stream)
    await stream.send_all(MAX_FRAME.to_bytes(HEADER, "big"))
    for _ in range(2000):                     # 'forever' (100 s) at 1.3 KB/s
        await stream.send_all(b"\x00" * 64)
        await trio.sleep(0.05)


async def wrong_rid(stream, peer_id):
    req = await read_request(stream)
    await stream.send_all(encode_message(Nodes((req.rid + 1) % 2**64, [])))


async def test_peers_sending_garbage_oversized_endless_or_wrong_replies_are_dropped(
        nursery, autojump_clock):
    net, nodes = await start_network(nursery, 12, seed=4)
    await join(nodes[:-1])
    victim = nodes[-1]
    rng = random.Random(4 + 1000)
    bad = {name: raw_peer(net, rng, 100 + i, handler) for i, (name, handler) in enumerate(
        [("garbage", garbage), ("oversized", oversized), ("endless", endless),
         ("wrong rid", wrong_rid)])}
    await victim.bootstrap([*bad.values(), nodes[0].own])
    for _ in range(3):
        found = await victim.find_node(rng.randbytes(32))
        assert {c.id for c in found} == {x.own.id for x in nodes[:-1]}     # every honest peer
    for name, c in bad.items():
        assert victim.scores.score(c.id) < 0, (name, victim.counters)
        assert c.id not in victim.table, name
    for name in ("garbage", "oversized", "wrong rid", "endless"):
        assert victim.scores.banned(bad[name].id, trio.current_time()), name
    reasons = {k: v for k, v in victim.counters.items() if k.startswith("penalty")}
    assert set(reasons) == {"penalty: malformed", "penalty: oversized", "penalty: stalled",
                            "penalty: wrong reply"}
    queried = victim.counters["failed: malformed"]
    await victim.find_node(rng.randbytes(32))            # banned: never asked again
    assert victim.counters["failed: malformed"] == queried
    assert_healthy(net, nodes)


async def test_inbound_garbage_is_dropped_scored_down_and_banned(nursery, autojump_clock):
    net, nodes = await start_network(nursery, 6, seed=5)
    await join(nodes)
    victim = nodes[0]
    rng = random.Random(5 + 1000)
    attackers = [net.add_node(c.id, c.addr) for c in (_contact(rng, 200 + i) for i in range(4))]

    async def attack(t, payload: bytes, trickle: bool = False) -> bytes:
        """Open a stream to the victim, send payload (then trickle), return what came back."""
        s = await t.open_stream(victim.own.id, victim.own.addr, PROTOCOL)
        await s.send_all(payload)
        async with trio.open_nursery() as n:
            if trickle:
                async def forever():
                    while True:
                        await s.send_all(b"\x00" * 64)
                        await trio.sleep(0.05)
                n.start_soon(forever)
            with trio.fail_after(60):
                got = await s.receive_some(MAX_FRAME)
            n.cancel_scope.cancel()
        return got

    payloads = [
        b"\x00\x00\x00\x05hello",                                  # not msgpack
        (2**32 - 1).to_bytes(HEADER, "big"),                        # 4 GiB announced
        encode_message(Pong(1)),                                    # a response, not a request
    ]
    for t, payload in zip(attackers, payloads):
        for _ in range(2):                                           # dropped each time: EOF
            assert await attack(t, payload) == b""
    t0 = trio.current_time()
    assert await attack(attackers[3], MAX_FRAME.to_bytes(HEADER, "big"), trickle=True) == b""
    assert trio.current_time() - t0 == pytest.approx(victim.request_timeout, abs=0.1)
    assert await attack(attackers[3], MAX_FRAME.to_bytes(HEADER, "big"), trickle=True) == b""
    now = trio.current_time()
    for t in attackers:
        assert victim.scores.banned(t.peer_id, now)
    refused = victim.counters["refused"]
    assert await attack(attackers[0], encode_message(FindNode(1, b"t" * 32))) == b""
    assert victim.counters["refused"] == refused + 1                # ignored while banned
    assert victim.counters["penalty: not a request"] == 2
    assert victim.counters["penalty: stalled"] == 2
    # the victim still works for everybody else
    assert nodes[1].own in await nodes[2].find_node(nodes[1].own.id)
    found = await victim.find_node(rng.randbytes(32))
    assert {c.id for c in found} == {svc.own.id for svc in nodes[1:]}
    # "for a while": after BAN_TIME the peer is answered again, starting over at 0
    await trio.sleep(BAN_TIME)
    reply = await attack(attackers[0], encode_message(FindNode(2, b"t" * 32)))
    assert reply[HEADER:] and not victim.scores.banned(attackers[0].peer_id, trio.current_time())
    assert_healthy(net, nodes)


async def test_a_false_sender_claim_is_ignored(nursery, autojump_clock):
    net, nodes = await start_network(nursery, 3, seed=6)
    a, b, c = nodes
    reply = await a.request(b.own, FindNode(1, b"t" * 32, sender=to_info(c.own)))  # a says it is c
    assert isinstance(reply, Nodes)
    assert b.counters["false sender"] == 1 and c.own.id not in b.table
    assert a.own.id not in b.table                        # and a said nothing true about itself
    await a.request(b.own, FindNode(2, b"t" * 32, sender=to_info(a.own)))
    assert a.own.id in b.table
    assert_healthy(net, nodes)


# -- (5) departed and hung nodes -------------------------------------------------------------

async def test_departed_and_hung_nodes_are_tolerated(nursery, autojump_clock):
    net, nodes = await start_network(nursery, 40, seed=8)
    await join(nodes)
    rng = random.Random(8 + 1000)
    keys = [rng.randbytes(32) for _ in range(10)]
    searchers = nodes[:4]
    owners = nodes[4:14]
    for key, owner in zip(keys, owners):
        await owner.provide(key)
    departed = nodes[30:36]
    for svc in departed:                      # gone: dials fail after a round trip
        net.remove_node(svc.own.addr)

    async def hang(stream, peer_id):          # up, but never answers: requests time out
        await trio.sleep_forever()

    hung = nodes[36:]
    for svc in hung:
        net.nodes[svc.own.addr].set_handler(PROTOCOL, hang)
    dead = {svc.own.id for svc in departed + hung}
    live = [svc.own for svc in nodes if svc.own.id not in dead]

    timeouts = 0
    for svc in searchers:
        for _ in range(5):
            target = rng.randbytes(32)
            found, stats = await svc.closest_peers(target)
            assert not dead & {c.id for c in found}
            expected = closest(target, [c for c in live if c != svc.own], 20)
            # Only live peers, nearest first, and the nearest ten exactly. The tail can
            # be short or skip a peer while the responders' tables still list the dead
            # (they fill 20-peer answers); over 200 lookups on 10 seeds the exact prefix
            # was never under 12.
            assert found == sorted(found, key=lambda c: distance(c.id, target))
            assert len(found) >= 10 and found[:10] == expected[:10]
            assert stats.seconds < 4 * svc.request_timeout
            timeouts += stats.failures
        for key, owner in zip(keys, owners):
            providers, _ = await svc.find_providers(key)
            assert owner.own in providers
    assert timeouts > 0
    assert sum(svc.counters["failed: timeout"] for svc in searchers) > 0
    assert sum(svc.counters["failed: unreachable"] for svc in searchers) > 0
    svc = searchers[0]                        # three failed requests evict (routing rule 6)
    for _ in range(3):
        async with trio.open_nursery() as n:
            for gone in departed + hung:
                n.start_soon(svc.find_node, gone.own.id)
    assert not dead & {c.id for bucket in svc.table.buckets() for c in bucket}
    assert_healthy(net, nodes[:30])


# -- (6) provider records expire unless republished --------------------------------------------

async def test_provider_records_expire_after_48h_unless_republished(nursery, autojump_clock):
    net, nodes = await start_network(nursery, 20, seed=9, refresh_interval=12 * HOUR)
    await join(nodes)
    rng = random.Random(9 + 1000)
    kept, dropped = rng.randbytes(32), rng.randbytes(32)
    owner, seeker = nodes[5], nodes[12]
    t0 = trio.current_time()
    await owner.provide(kept)
    await owner.provide(dropped)
    owner.stop_providing(dropped)             # announced once, never republished

    async def found(key) -> bool:
        providers, _ = await seeker.find_providers(key)
        return owner.own in providers

    await trio.sleep_until(t0 + 47 * HOUR)
    assert await found(kept) and await found(dropped)
    await trio.sleep_until(t0 + 48 * HOUR + 60)
    assert await found(kept) and not await found(dropped)
    for day in (2, 3):                         # the republish loop keeps `kept` alive
        await trio.sleep_until(t0 + day * 24 * HOUR + 60)
        assert await found(kept) and not await found(dropped)
    holders = sum(1 for svc in nodes if svc.providers.get(kept, trio.current_time()))
    assert holders >= 10
    assert not any(svc.providers.get(dropped, trio.current_time()) for svc in nodes)
    assert_healthy(net, nodes)


# -- (6b) batched reprovide: the keyspace sweep over the network ----------------------------

@pytest.mark.slow                             # ~300-node join plus 3,000 keys
async def test_republishing_3000_keys_costs_under_2_messages_per_key_and_finds_them(
        nursery, autojump_clock):
    net, nodes = await start_network(nursery, 300, seed=21, refresh_interval=100 * HOUR)
    await join(nodes)
    rng = random.Random(21 + 1000)
    provider, quitter = nodes[17], nodes[42]
    keys = [rng.randbytes(32) for _ in range(3000)]
    gone = [rng.randbytes(32) for _ in range(100)]
    t0 = trio.current_time()
    first = await provider.provide_many(keys)
    await quitter.provide_many(gone)
    for key in gone:                          # announced once, then no longer provided
        quitter.stop_providing(key)
    assert first.unannounced == 0 and first.batches_failed == 0

    await trio.sleep_until(t0 + 23 * HOUR)    # the first republish ran at ~22 h
    s = provider.last_republish
    assert s is not None and s.keys == 3000
    print(f"\n300 nodes, 3,000 keys: provide_many {first.messages_per_key:.3f} messages/key; "
          f"republish {s.lookups} lookups, {s.lookup_queries} queries, {s.batches} "
          f"AddProviders, {s.messages_per_key:.3f} messages/key, {s.seconds:.1f} s virtual")
    assert s.messages_per_key <= 2
    assert s.unannounced == 0 and s.batches_failed == 0
    assert s.batches <= 2 * len(nodes)        # about one batch per peer
    assert quitter.last_republish is None     # it had nothing left to republish

    async def providers_of(key, svc) -> set[bytes]:
        found, _ = await svc.find_providers(key)
        return {p.id for p in found}

    others = [svc for svc in nodes if svc not in (provider, quitter)]
    await trio.sleep_until(t0 + 47 * HOUR)    # the quitter's records still live
    for key in gone[:10]:
        assert quitter.own.id in await providers_of(key, rng.choice(others))

    await trio.sleep_until(t0 + 48 * HOUR + 60)     # the first announcements expired
    now = trio.current_time()
    for key in rng.sample(keys, 100):         # found through the republishes alone
        for svc in rng.sample(others, 3):
            assert provider.own.id in await providers_of(key, svc)
        holders = closest(key, [x.own for x in nodes if x is not provider], 20)
        by_id = {svc.own.id: svc for svc in nodes}
        assert all(provider.own in by_id[c.id].providers.get(key, now) for c in holders)
    for key in gone:                          # a node that stopped providing: gone
        assert not any(quitter.own in svc.providers.get(key, now) for svc in nodes)
    for key in gone[:10]:
        assert await providers_of(key, rng.choice(others)) == set()
    assert_healthy(net, nodes)


async def test_add_providers_stores_only_the_sender_and_respects_store_bounds(
        nursery, autojump_clock):
    net, nodes = await start_network(nursery, 3, seed=22)
    a, holder, c = nodes
    holder.providers = ProviderStore(max_records=3)
    rng = random.Random(22)
    keys = tuple(sorted(rng.randbytes(32) for _ in range(5)))
    me, other = to_info(a.own), to_info(c.own)
    assert await a.request(holder.own, AddProviders(1, keys[:2], other, me)) == Ack(1, False)
    assert holder.providers.key_count == 0             # a peer may announce only itself
    assert await a.request(holder.own, AddProviders(2, keys[:2], me, me)) == Ack(2, True)
    assert await a.request(holder.own, AddProviders(3, keys, me, me)) == Ack(3, False)
    now = trio.current_time()
    assert [holder.providers.get(k, now) for k in keys] == [[a.own]] * 3 + [[]] * 2
    assert holder.counters["batch keys refused"] == 2  # the store's bound, key by key
    assert_healthy(net, nodes)


async def test_a_provider_record_flood_cannot_hide_a_new_provider(nursery, autojump_clock):
    """Attack 4: a member floods every node's provider store with random keys
    (AddProviders batches of itself); a backup announced afterwards is still
    stored on its k closest and found (dht/providers.py rule 3)."""
    net, nodes = await start_network(nursery, 24, seed=24)
    for svc in nodes:
        svc.providers = ProviderStore(max_records=400)
    await join(nodes)
    attacker, owner, seeker = nodes[-1], nodes[1], nodes[2]
    rng = random.Random(24)
    me = to_info(attacker.own)
    for target in nodes[:-1]:                 # 1,000 keys at every node: 2.5x its store
        for batch in range(10):
            keys = tuple(sorted(rng.randbytes(32) for _ in range(100)))
            await attacker.request(target.own, AddProviders(batch, keys, me, me))
    assert all(len(svc.providers) == 400 for svc in nodes[:-1])   # full of the flood
    key = rng.randbytes(32)
    assert await owner.provide(key) >= 15
    found, _ = await seeker.find_providers(key)
    assert owner.own in found
    refused = sum(svc.counters["provider records refused"] for svc in nodes)
    assert refused > 0 and all(svc.providers.records_of(attacker.own.id) < 400
                               for svc in nodes[:-1] if svc.providers.get(key, trio.current_time()))
    assert_healthy(net, nodes)


async def test_dead_providers_give_their_place_to_a_new_one(nursery, autojump_clock):
    """Attack 4: a key's provider slots full of providers that died; a new
    provider waits while the holder pings them and takes the place of the
    first that does not answer, and is then found (rule 4)."""
    model = NetworkModel(rng=random.Random(25))
    net, nodes = await start_network(nursery, 30, seed=25, model=model)
    for svc in nodes:
        svc.providers = ProviderStore(max_providers_per_key=3)
        model.set_region(svc.own.addr, "eu-west")
    await join(nodes)
    rng = random.Random(25)
    key = rng.randbytes(32)
    dead = nodes[10:13]
    for svc in dead:
        await svc.provide(key)
    for svc in dead:
        model.set_fault(svc.own.addr, "drop")
    await trio.sleep(15 * 60)                 # long enough that they are worth a check
    newcomer, seeker = nodes[20], nodes[21]
    full = [svc for svc in nodes if len(svc.providers.get(key, trio.current_time())) == 3]
    assert len(full) >= 15
    await newcomer.provide(key)               # refused (full), waits; the holders ping
    for _ in range(3):                        # each ping ends within its request timeout
        found, _ = await seeker.find_providers(key, count=4)
        if newcomer.own in found:
            break
        await trio.sleep(nodes[0].request_timeout)
    holders = [svc for svc in full if newcomer.own in svc.providers.get(key, trio.current_time())]
    assert len(holders) >= 10                 # full of dead providers, it took one's place
    assert all(svc.providers.evicted >= 1 for svc in holders)
    found, _ = await seeker.find_providers(key, count=4)
    assert newcomer.own in found
    assert_healthy(net, nodes)


async def test_provide_many_announces_with_a_sweep_and_republishes(nursery, autojump_clock):
    net, nodes = await start_network(nursery, 30, seed=23, refresh_interval=24 * HOUR)
    await join(nodes)
    rng = random.Random(23 + 1000)
    owner = nodes[3]
    keys = [rng.randbytes(32) for _ in range(200)]
    stats = await owner.provide_many(keys)
    assert stats.keys == 200 and stats.unannounced == 0 and stats.batches_failed == 0
    assert stats.batches <= len(nodes) - 1 and stats.messages_per_key < 1
    empty = await owner.provide_many([])
    assert (empty.keys, empty.messages, empty.messages_per_key) == (0, 0, 0.0)
    for key in rng.sample(keys, 10):
        found, _ = await nodes[20].find_providers(key)
        assert owner.own in found
    await trio.sleep(23 * HOUR)               # republished by the loop, counted
    assert owner.last_republish is not None and owner.last_republish.keys == 200
    assert owner.last_republish.messages_per_key < 1
    assert_healthy(net, nodes)


# -- (7) signed records ----------------------------------------------------------------------

async def test_signed_records_round_trip_and_forgeries_are_rejected(nursery, autojump_clock):
    net, nodes = await start_network(nursery, 20, seed=10)
    await join(nodes)
    a, b, c = nodes[1], nodes[7], nodes[13]
    sk = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    key = random.Random(10).randbytes(32)
    v1 = SignedRecord.sign(sk, key, b"head 1", 1)
    assert await a.put_record(v1) >= 10
    got, _ = await b.get_record(key)
    assert got == v1 and got.verify()

    v2 = SignedRecord.sign(sk, key, b"head 2", 2)
    assert await c.put_record(v2) >= 10        # anyone may carry a newer record
    got, _ = await b.get_record(key)
    assert got == v2                            # highest seq wins

    holder = next(svc for svc in nodes if svc.records.get(key) == v2 and svc is not a)
    ack = await a.request(holder.own, PutRecord(5, v1, to_info(a.own)))
    assert ack == Ack(5, False)                 # an older seq does not replace a newer one

    forged = dataclasses.replace(v2, value=b"evil", seq=3)
    with pytest.raises(ValueError):
        await a.put_record(forged)
    ack = await a.request(holder.own, PutRecord(6, forged, to_info(a.own)))
    assert ack == Ack(6, False)
    assert holder.records.get(key) == v2
    assert holder.scores.score(a.own.id) < 0   # forging is an offence
    other = SignedRecord.sign(Ed25519PrivateKey.from_private_bytes(b"\x01" * 32), key, b"x", 9)
    assert (await a.request(holder.own, PutRecord(7, other, to_info(a.own)))).stored is False
    missing, _ = await b.get_record(bytes(32))
    assert missing is None
    assert_healthy(net, nodes)


# -- malicious responders (the network model's is_malicious hook) ---------------------------

class LyingModel(LinkModel):
    """The minimal model the service's hook needs: is_malicious only."""

    def __init__(self, liars: set[str]):
        super().__init__()
        self.liars = liars

    def is_malicious(self, addr: str) -> bool:
        return addr in self.liars


@pytest.mark.parametrize("strategy,paths", [("mixed", 1), ("mixed", 3), ("far-peers", 1),
                                            ("fabricated", 1), ("eclipse", 3)])
async def test_lookups_succeed_despite_lying_responders(nursery, autojump_clock, strategy,
                                                        paths):
    if strategy == "mixed":
        model = LyingModel(set())
    else:                                     # simnet's network model, its "malicious" fault
        model = NetworkModel(rng=random.Random(11))
    net, nodes = await start_network(nursery, 40, seed=11, model=model, disjoint_paths=paths)
    for svc in nodes:
        if isinstance(model, NetworkModel):
            model.set_region(svc.own.addr, "eu-west")
    await join(nodes)
    rng = random.Random(11 + 1000)
    liars = rng.sample(nodes[1:], 4)
    accomplices = tuple(to_info(svc.own) for svc in liars)     # eclipse: they collude
    for svc in liars:
        if isinstance(model, NetworkModel):
            model.set_fault(svc.own.addr, "malicious", strategy=strategy, accomplices=accomplices)
        else:
            model.liars.add(svc.own.addr)
    honest = [svc for svc in nodes if svc not in liars]
    keys = [rng.randbytes(32) for _ in range(20)]
    owners = [rng.choice(honest) for _ in keys]
    for key, owner in zip(keys, owners):
        await owner.provide(key)
    ok = total = 0
    for key, owner in zip(keys, owners):
        for svc in rng.sample([x for x in honest if x is not owner], 3):
            providers, _ = await svc.find_providers(key)
            ok += owner.own in providers
            total += 1
    print(f"\n{strategy}, {paths} path(s): {ok}/{total} found with {len(liars)} of 40 lying")
    assert ok == total
    if strategy not in ("far-peers", "eclipse"):   # fabricated peers offered, dialling failed
        assert sum(svc.counters["failed: unreachable"] for svc in honest) > 0
    assert_healthy(net, nodes)


# -- the pure helpers ------------------------------------------------------------------------

def test_scores_ban_below_the_threshold_for_a_while():
    s = PeerScores()
    stranger, veteran = b"s" * 32, b"v" * 32
    for _ in range(40):
        s.reward(veteran, 0.0)
    assert s.score(veteran) == 20                  # credit is capped
    assert not s.penalize(stranger, "malformed", 0.0)
    assert s.penalize(stranger, "oversized", 1.0)          # the 2nd violation bans
    assert s.banned(stranger, 2.0) and not s.banned(veteran, 2.0)
    assert not s.penalize(veteran, "malformed", 0.0)
    assert not s.penalize(veteran, "malformed", 0.0)
    assert s.penalize(veteran, "malformed", 0.0)  # a veteran survives two, not three
    assert s.banned(stranger, 1.0 + BAN_TIME - 0.001)
    assert not s.banned(stranger, 1.0 + BAN_TIME)  # the ban ends, the score starts over
    assert s.score(stranger) == 0
    assert PENALTIES["stalled"] < PENALTIES["malformed"]


def test_scores_track_a_bounded_number_of_peers_and_never_forget_a_ban():
    s = PeerScores(max_tracked=8)
    banned = b"b" * 32
    s.penalize(banned, "malformed", 0.0)
    s.penalize(banned, "malformed", 0.0)
    for i in range(100):
        s.reward(i.to_bytes(32, "big"), 0.0)
    assert len(s) <= 8 and s.banned(banned, 1.0)


def test_record_store_keeps_the_highest_seq_of_the_first_author():
    a, b = (Ed25519PrivateKey.from_private_bytes(bytes([i]) * 32) for i in (1, 2))
    key = b"k" * 32
    store = RecordStore(max_records=2)
    r1, r2 = SignedRecord.sign(a, key, b"1", 1), SignedRecord.sign(a, key, b"2", 2)
    assert store.put(r2) and not store.put(r1) and store.get(key) == r2
    assert store.put(r2)                                   # the same record again
    assert not store.put(SignedRecord.sign(a, key, b"other", 2))
    assert not store.put(SignedRecord.sign(b, key, b"b", 99))
    assert store.put(SignedRecord.sign(a, b"x" * 32, b"", 0))
    assert not store.put(SignedRecord.sign(a, b"y" * 32, b"", 0))   # full


async def test_republishing_idles_once_nothing_is_provided(nursery, autojump_clock):
    net, nodes = await start_network(nursery, 4, seed=12)
    await join(nodes)
    key = random.Random(12).randbytes(32)
    await nodes[1].provide(key)
    nodes[1].stop_providing(key)
    t0 = trio.current_time()
    await trio.sleep(5 * 24 * HOUR)            # hangs if the republish loop spins
    assert trio.current_time() - t0 == 5 * 24 * HOUR
    providers, _ = await nodes[2].find_providers(key)
    assert providers == []
    assert_healthy(net, nodes)


# -- the fast request path (simnet runs) ----------------------------------------------------

async def test_fast_rpc_path_finds_providers_and_drops_misbehaving_peers(nursery,
                                                                        autojump_clock):
    """Over SimNetwork(fast_rpc=True) the same service answers through
    Responder.handle_rpc and asks through dht_rpc._request_rpc: lookups work,
    bad replies and bad requests cost the same penalties as on streams."""
    net, nodes = await start_network(nursery, 40, seed=8, fast_rpc=True)
    await join(nodes)
    rng = random.Random(8 + 1000)
    key = rng.randbytes(32)
    assert await nodes[3].provide(key) == 20
    for svc in rng.sample(nodes, 5):
        providers, _ = await svc.find_providers(key)
        assert nodes[3].own in providers
    victim = nodes[0]
    replies = {"garbage": b"\x00\x00\x00\x10" + bytes(range(16)),
               "wrong reply": encode_message(Pong(1)),
               "trailing": encode_message(Nodes(7, [])) + b"\x00"}
    bad = {}
    for i, (name, reply) in enumerate(replies.items()):
        c = _contact(rng, 100 + i)
        net.add_node(c.id, c.addr).set_rpc_handler(PROTOCOL, lambda data, peer, r=reply: r)
        bad[name] = c
    for c in bad.values():
        assert await victim.request(c, FindNode(7, b"t" * 32, victim.info)) is None
    assert victim.counters["penalty: malformed"] == 1
    assert victim.counters["penalty: wrong reply"] == 1
    assert victim.counters["penalty: trailing data"] == 1
    for i, (payload, reason) in enumerate([(b"\x00\x00\x00\x05hello", "malformed"),
                                           ((2**32 - 1).to_bytes(HEADER, "big"), "oversized"),
                                           (encode_message(Pong(1)), "not a request")]):
        c = _contact(rng, 200 + i)
        attacker = net.add_node(c.id, c.addr)
        before = victim.counters[f"penalty: {reason}"]
        with pytest.raises(TransportError):                 # closed without a reply
            await attacker.rpc(victim.own.id, victim.own.addr, PROTOCOL, payload)
        assert victim.counters[f"penalty: {reason}"] == before + 1, (reason, victim.counters)
    reply = await nodes[1].transport.rpc(victim.own.id, victim.own.addr, PROTOCOL,
                                         encode_message(FindNode(5, b"t" * 32)))
    dec = FrameDecoder()
    dec.receive_data(reply)
    assert isinstance(dec.next_message(), Nodes)
    assert_healthy(net, nodes)


async def test_provide_many_sweeps_keyspace_slices_at_once(nursery, autojump_clock,
                                                            monkeypatch):
    """Many keys: up to SWEEP_PARTS sweeps over disjoint slices run concurrently;
    every key still reaches exactly its k closest, at well under 2 messages/key."""
    from hypersdk.node.kademlia import republish as dht_republish
    monkeypatch.setattr(dht_republish, "KEYS_PER_PART", 250)
    net, nodes = await start_network(nursery, 200, seed=23, refresh_interval=100 * HOUR,
                                     fast_rpc=True)
    await join(nodes)
    rng = random.Random(23 + 1000)
    provider = nodes[9]
    keys = [rng.randbytes(32) for _ in range(3000)]
    t0 = trio.current_time()
    concurrent = []
    real = provider.closest_peers

    async def counting(*a, **kw):
        concurrent.append(trio.current_time())
        return await real(*a, **kw)

    provider.closest_peers = counting
    s = await provider.provide_many(keys)
    seconds = trio.current_time() - t0
    assert s.keys == 3000 and s.unannounced == 0 and s.batches_failed == 0
    assert s.messages_per_key <= 1
    # 8 slices at once: their first lookups all start together
    assert sum(1 for t in concurrent if t == t0) == dht_republish.SWEEP_PARTS
    assert seconds < s.lookups * 0.5                # far less than the lookups in a row
    now = trio.current_time()
    by_id = {svc.own.id: svc for svc in nodes}
    for key in rng.sample(keys, 50):
        holders = closest(key, [x.own for x in nodes if x is not provider], 20)
        assert all(provider.own in by_id[c.id].providers.get(key, now) for c in holders)
    assert_healthy(net, nodes)


async def test_records_of_non_members_are_not_stored(nursery, autojump_clock):
    """With a membership predicate (node/net/gate.py author_ok), a node stores signed
    records of members only."""
    net, nodes = await start_network(nursery, 12, seed=11)
    await join(nodes)
    member_sk = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    member = SignedRecord.sign(member_sk, bytes(32), b"m", 1).author
    for svc in nodes:
        svc.author_ok = lambda author: author == member
    key = random.Random(11).randbytes(32)
    assert await nodes[1].put_record(SignedRecord.sign(member_sk, key, b"ok", 1)) >= 5
    stranger_sk = Ed25519PrivateKey.from_private_bytes(b"\x05" * 32)
    other = random.Random(12).randbytes(32)
    assert await nodes[2].put_record(SignedRecord.sign(stranger_sk, other, b"no", 1)) == 0
    assert all(svc.records.get(other) is None for svc in nodes if svc is not nodes[2])
    assert sum(svc.counters["records of non-members refused"] for svc in nodes) >= 5
    got, _ = await nodes[5].get_record(key)
    assert got is not None and got.value == b"ok"
