"""Audit gossip: the messages (pure) and AuditGossip nodes on simnet (virtual
time). Every wait is bounded (trio.fail_after on the virtual clock)."""
from __future__ import annotations

import random

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from hypersdk.dht.contact import Contact
from hypersdk.node.audit import gossip as ag
from hypersdk.node.audit.gossip import AuditGossip
from hypersdk.node.audit.log import AuditLog
from hypersdk.node.net.identity import Identity
from hypersdk.protocol import audit
from hypersdk.protocol import audit_gossip as msg
from hypersdk.protocol.errors import LocalProtocolError, RemoteProtocolError
from hypersdk.simnet.gossip_run import GossipConfig, run_gossip
from hypersdk.simnet.transport import LinkModel, SimNetwork

T0 = 1_790_000_000 * 10**9
M = bytes(range(32))
LIMIT = 120.0                     # virtual seconds any one test step may take


def body(k=0):
    return {"manifest": M, "holder": bytes(32), "result": "ok", "summary": {"k": k}}


# -- messages ----------------------------------------------------------------------

def _examples():
    ident = Identity.from_private_bytes(bytes(32))
    e = audit.make_entry(ident, 0, None, T0, "verify", body())
    a = ident.public_key
    return [msg.Push(1, (e.raw,)), msg.Ack(2, ((a, 3),)),
            msg.Sync(3, bytes(32), (bytes(32),) * msg.BUCKETS),
            msg.Heads(4, (bytes(32),) * msg.BUCKETS, ((a, 0, e.id),), False),
            msg.GetRange(5, a, 0, 64), msg.Entries(6, (e.raw,)),
            msg.ForkProof(7, e.raw, e.raw + b"x")]


def test_messages_round_trip_canonically():
    for m in _examples():
        frame = msg.encode_message(m)
        assert msg.decode_message(frame[4:]) == m
        dec = msg.frame_decoder()
        dec.receive_data(frame)
        assert dec.next_message() == m


def test_message_bounds():
    big = b"x" * audit.MAX_ENTRY
    with pytest.raises(LocalProtocolError):
        msg.Push(1, (big,) * (msg.MAX_ENTRIES + 1))
    with pytest.raises(LocalProtocolError):
        msg.Push(1, (big,) * 13)                      # > MAX_PUSH_BYTES in all
    with pytest.raises(LocalProtocolError):
        msg.GetRange(1, bytes(32), 0, msg.MAX_ENTRIES + 1)
    with pytest.raises(LocalProtocolError):
        msg.Sync(1, bytes(32), (bytes(32),) * 3)
    # the largest valid messages fit a frame
    msg.encode_message(msg.Push(1, (b"x" * 3000,) * msg.MAX_ENTRIES))
    msg.encode_message(msg.Heads(1, (bytes(32),) * 16,
                                 tuple((bytes(32), 2**62, bytes(32)) for _ in range(msg.MAX_HEADS)),
                                 True))
    dec = msg.frame_decoder()
    with pytest.raises(RemoteProtocolError):          # an oversized prefix, at once
        dec.receive_data((msg.MAX_FRAME + 1).to_bytes(4, "big"))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_hostile_frames_raise_only_remote_protocol_error(data):
    frame = msg.encode_message(data.draw(st.sampled_from(_examples())))[4:]
    how = data.draw(st.sampled_from(["random", "flip", "cut", "extend"]))
    if how == "random":
        payload = data.draw(st.binary(max_size=300))
    elif how == "flip":
        i = data.draw(st.integers(0, len(frame) - 1))
        payload = frame[:i] + bytes([frame[i] ^ data.draw(st.integers(1, 255))]) + frame[i + 1:]
    elif how == "cut":
        payload = frame[:data.draw(st.integers(0, len(frame) - 1))]
    else:
        payload = frame + data.draw(st.binary(min_size=1, max_size=20))
    try:
        msg.decode_message(payload)
    except RemoteProtocolError:
        pass


def test_digests_name_the_differing_buckets():
    heads = {bytes([i * 16]) + bytes(31): (i, bytes([i]) * 32) for i in range(16)}
    root, buckets = msg.digests(heads)
    other = dict(heads)
    other[bytes([5 * 16]) + bytes(31)] = (9, bytes(32))
    root2, buckets2 = msg.digests(other)
    assert root != root2 and msg.differing(buckets, buckets2) == [5]
    assert msg.digests(dict(reversed(list(heads.items())))) == (root, buckets)


# -- nodes on simnet -----------------------------------------------------------------

class Net:
    """n gossip nodes that all know each other (the peers() a DHT table gives)."""

    def __init__(self, nursery, n, *, seed=1, **kw):
        self.nursery = nursery
        self.sim = SimNetwork(LinkModel(delay=0.05))
        self.rng = random.Random(seed)
        self.kw = kw
        self.nodes: list[AuditGossip] = []
        self.n = n

    async def start(self):
        await self.nursery.start(self.sim.run)
        for i in range(self.n):
            await self.add()
        return self

    async def add(self, peers=None, ident=None, **extra):
        i = len(self.nodes)
        ident = ident or Identity.from_private_bytes(self.rng.randbytes(32))
        t = self.sim.add_node(ident.node_id, f"/ip4/10.0.{i}.1/tcp/1")
        c = Contact(ident.node_id, t.addr)
        kw = dict(fanout=3, sync_interval=5.0, witness_interval=None, own_poll=None,
                  threaded=False, clock_ns=lambda: T0 + int(trio.current_time() * 1e9))
        kw.update(self.kw)
        kw.update(extra)
        from hypersdk.node.kademlia.rpc import PeerScores
        g = AuditGossip(t, AuditLog(None, identity=ident),
                        peers if peers is not None else (lambda c=c: self.contacts(c)),
                        rng=random.Random(self.rng.getrandbits(64)), scores=PeerScores(), **kw)
        g.contact, g.ident = c, ident
        self.nodes.append(g)
        await self.nursery.start(g.run)
        return g

    def contacts(self, me):
        return [g.contact for g in self.nodes if g.contact != me]

    def total(self, g):
        return sum(s + 1 for s, _ in g.log.heads().values())

    async def until(self, cond, what, limit=LIMIT):
        with trio.fail_after(limit):
            while not cond():
                await trio.sleep(0.05)


async def test_an_entry_reaches_every_node_by_push(nursery, autojump_clock):
    net = await Net(nursery, 12, sync_interval=1e6).start()     # no anti-entropy: push only
    t0 = trio.current_time()
    e = await net.nodes[0].append("verify", body())
    await net.until(lambda: all(g.log.entry(e.author, 0) == e for g in net.nodes), "spread")
    assert trio.current_time() - t0 < 1.0                   # a few 50 ms hops
    assert sum(g.counters["entries pulled"] for g in net.nodes) == 0    # all by push
    for g in net.nodes[1:]:
        assert g.log.verify(e.author).ok


async def test_a_late_node_gets_the_whole_log_through_wants(nursery, autojump_clock):
    net = await Net(nursery, 2, sync_interval=1e6).start()
    a, b = net.nodes
    alone = []
    a.peers = lambda: alone                                   # a knows nobody yet
    for k in range(70):                                       # more than one batch
        await a.append("verify", body(k))
    assert net.total(b) == 0
    alone.append(b.contact)
    await a.append("verify", body(70))                        # b cannot attach seq 70 ...
    await net.until(lambda: net.total(b) == 71, "the range")  # ... asks for 0.., gets all
    assert b.log.verify(a.own_author).ok
    assert b.counters["entries rejected"] == 0


async def test_anti_entropy_repairs_what_pushes_lost(nursery, autojump_clock):
    net = await Net(nursery, 6, sync_interval=2.0, fanout=0).start()   # no push overlay
    for g in net.nodes:
        await g.append("verify", body())
    await net.until(lambda: all(net.total(g) == 6 for g in net.nodes), "convergence")
    assert all(g.neighbours == [] and not g.subscribers for g in net.nodes)
    assert sum(g.counters["syncs"] for g in net.nodes) > 0
    assert len({msg.digests(g.log.heads())[0] for g in net.nodes}) == 1


async def test_invalid_entries_are_rejected_not_forwarded_and_the_sender_banned(
        nursery, autojump_clock):
    net = await Net(nursery, 4, sync_interval=1e6).start()
    liar = net.nodes[0]
    e = await liar.append("verify", body())
    await net.until(lambda: all(net.total(g) == 1 for g in net.nodes), "spread")
    victim = net.nodes[1]
    forged = audit.make_entry(liar.ident, 1, e.id, T0, "verify", body(1))
    bad = bytearray(forged.raw)
    bad[-5] ^= 1                                              # inside the signature
    for round_ in range(2):
        reply = await liar._request(victim.contact, msg.Push(100 + round_, (bytes(bad),)))
        assert reply.wants == ()
    assert victim.counters["entries rejected"] == 2
    assert victim.scores.banned(liar.own_id, trio.current_time())
    assert all(net.total(g) == 1 for g in net.nodes)          # stored and forwarded nowhere
    with pytest.raises(ag._Failed):                           # banned: refused
        await liar._request(victim.contact, msg.Push(200, (e.raw,)))


async def test_malformed_bytes_are_dropped_and_the_node_keeps_serving(nursery, autojump_clock):
    net = await Net(nursery, 2, sync_interval=1e6).start()
    a, b = net.nodes
    for junk in (b"\x00\x00\x00\x05hello", b"\xff\xff\xff\xff", b"\x00\x00"):
        s = await a.net.open_stream(b.own_id, b.contact.addr, msg.PROTOCOL_ID)
        await s.send_all(junk)
        with trio.fail_after(LIMIT):
            assert await s.receive_some(100) == b""             # dropped, no reply
        await s.aclose()
    assert b.counters["handler errors"] == 0
    assert b.counters["penalty malformed"] >= 2
    c = await net.add()                                       # an honest peer is served
    e = await c.append("verify", body())
    await net.until(lambda: b.log.entry(e.author, 0) == e, "served")


async def test_pushes_over_the_rate_are_refused(nursery, autojump_clock):
    net = await Net(nursery, 2, sync_interval=1e6, rate=1.0).start()
    a, b = net.nodes
    a.peers = lambda: []
    raws = [(await a.append("verify", body(k))).raw for k in range(64)]
    for i in range(int(ag.BURST // 64) + 2):                  # past the bucket's depth
        await a._request(b.contact, msg.Push(i + 1, tuple(raws)))
    assert b.counters["rate limited"] > 0
    assert net.total(b) == 64                                 # what was accepted is whole


async def test_a_fork_is_proven_and_the_proof_reaches_every_node(nursery, autojump_clock):
    net = await Net(nursery, 10, sync_interval=3.0).start()
    rogue = Identity.from_private_bytes(b"r" * 32)
    one = audit.make_entry(rogue, 0, None, T0, "verify", body(1))
    two = audit.make_entry(rogue, 0, None, T0, "verify", body(2))
    sender = net.nodes[0]
    # the rogue shows one history to node 1 and another to node 2 (via node 0's pipe)
    await sender._request(net.nodes[1].contact, msg.Push(1, (one.raw,)))
    await sender._request(net.nodes[2].contact, msg.Push(2, (two.raw,)))
    await net.until(lambda: all(rogue.public_key in g.log.fork_authors() for g in net.nodes),
                    "the fork proof everywhere")
    for g in net.nodes:
        (f,) = g.log.forks(rogue.public_key)
        assert {f.first.id, f.second.id} == {one.id, two.id}
        assert not g.log.verify(rogue.public_key).ok
    # a false proof (the same entry twice) is refused and its sender scored down
    await sender._request(net.nodes[3].contact, msg.ForkProof(9, one.raw, one.raw))
    assert net.nodes[3].counters["false fork proofs"] == 1
    assert net.nodes[3].scores.score(sender.own_id) < 0


async def test_periodic_witness_entries_name_the_heads_seen(nursery, autojump_clock):
    net = await Net(nursery, 3, sync_interval=2.0, witness_interval=30.0).start()
    for g in net.nodes:
        await g.append("verify", body())
    await net.until(lambda: all(g.counters["witness entries"] >= 1 for g in net.nodes),
                    "witnesses", limit=200)
    g = net.nodes[0]
    w = [e for e in g.log.entries(g.own_author) if e.kind == "witness"][0]
    named = {a for a, _, _ in audit.witness_heads(w)}
    assert named == {x.own_author for x in net.nodes[1:]}
    # and the others' witness entries of our log come back: certificates can use them
    await net.until(lambda: g.log.witnesses_of(g.own_author, 0), "witnessed", limit=200)
    counts = [x.counters["witness entries"] for x in net.nodes]
    await trio.sleep(300)                 # only witnesses happened since: no new witness
    assert [x.counters["witness entries"] for x in net.nodes] == counts
    await net.nodes[1].append("verify", body(5))              # news: witnessed again
    await net.until(lambda: g.counters["witness entries"] > counts[0], "again", limit=200)


def test_witness_contradicted_by_a_later_view_proves_a_rewrite(tmp_path):
    x = Identity.from_private_bytes(b"x" * 32)
    w = Identity.from_private_bytes(b"w" * 32)
    es, prev = [], None
    for s in range(3):
        e = audit.make_entry(x, s, prev, T0 + s, "verify", body(s))
        es.append(e)
        prev = e.id
    other = audit.make_entry(x, 2, es[1].id, T0 + 9, "verify", body(99))   # what W was shown
    seen = audit.make_entry(w, 0, None, T0 + 10, "witness",
                            {"heads": [[x.public_key, 2, other.id]]})
    for order in ([seen, *es], [*es, seen]):                  # witness first, or log first
        with AuditLog(tmp_path / str(len(order) + order.index(seen))) as log:
            r = log.add_foreign(order, now_ns=T0 + 100)
            assert r.added == 4 and r.contradictions == 1
            rep = log.verify(x.public_key)
            assert not rep.ok and "rewritten" in rep.problems[0].reason
            assert rep.problems[0].seq == 2
            assert log.verify(w.public_key).ok
            (c,) = log.contradictions(x.public_key)
            assert c["witness"] == w.public_key and c["witnessed_id"] == other.id


async def test_sync_pages_through_many_authors(nursery, autojump_clock, monkeypatch):
    monkeypatch.setattr(ag, "MAX_HEADS", 3)
    net = await Net(nursery, 2, sync_interval=1e6).start()
    a, b = net.nodes
    logs = [Identity.from_private_bytes(bytes([i]) * 32) for i in range(1, 12)]
    entries = [audit.make_entry(i, 0, None, T0, "verify", body()) for i in logs]
    a.log.add_foreign(entries, now_ns=T0)
    a._digests = None
    for _ in range(20):                                       # bounded: each round moves some
        if net.total(b) == len(entries):
            break
        await b.sync_with(a.contact)
        await trio.sleep(1)
    assert net.total(b) == len(entries)
    assert msg.digests(a.log.heads())[0] == msg.digests(b.log.heads())[0]


def test_simnet_gossip_spread_and_partition_heal():
    r = run_gossip(GossipConfig(nodes=60, entries=5, partition_entries=4, partition_time=8.0,
                                heal_limit=120.0))
    s, h = r["spread"], r["heal"]
    assert s["entries_reaching_all"] == 5 and s["missing_deliveries"] == 0
    assert s["reached_all_s"]["max"] < 1.0
    assert h["converged_after_s"] is not None and h["nodes_complete"] == 60
    assert h["distinct_head_digests"] == 1
    assert r["totals"]["entries rejected"] == 0 and r["handler_errors"] == 0
    assert r["totals"]["handler errors"] == 0


@pytest.mark.slow
def test_simnet_gossip_1000_nodes_50ms_links():
    """The issue's scenario: every entry reaches all 1,000 nodes within 1 s
    simulated, and after a partition heals every log converges, none lost."""
    r = run_gossip(GossipConfig(nodes=1000, entries=5, partition_entries=5,
                                partition_time=10.0, heal_limit=120.0))
    s, h = r["spread"], r["heal"]
    assert s["entries_reaching_all"] == 5 and s["missing_deliveries"] == 0
    assert s["reached_all_s"]["max"] < 1.0, s
    assert h["nodes_complete"] == 1000 and h["distinct_head_digests"] == 1, h
    assert r["totals"]["entries rejected"] == 0 and r["handler_errors"] == 0


async def test_catch_up_pulls_wait_while_the_node_moves_bulk_data(nursery, autojump_clock):
    """A node that joins while it restores (busy) pulls the logs it lacks after the
    transfer, not during it; a busy() that never clears delays them max_defer s."""
    net = await Net(nursery, 3, sync_interval=1e6, fanout=0).start()   # no pushes
    for g in net.nodes:
        await g.append("verify", body())
    for g in net.nodes[1:]:
        await net.nodes[0].sync_with(g.contact)       # node 0 holds all 3 logs
    assert net.total(net.nodes[0]) == 3
    moving = [True]
    late = await net.add()
    late.busy, late.max_defer = (lambda: moving[0]), 60.0
    t0 = trio.current_time()
    nursery.start_soon(late.sync_with, net.nodes[0].contact)
    await trio.sleep(10)
    assert net.total(late) == 0                       # nothing pulled yet
    assert late.counters["pulls deferred"] >= 1
    moving[0] = False
    await net.until(lambda: net.total(late) == 3, "catch-up after the transfer", limit=5)
    assert 10 <= trio.current_time() - t0 < 11

    stuck = await net.add()                           # a transfer that never ends
    stuck.busy, stuck.max_defer = (lambda: True), 30.0
    t1 = trio.current_time()
    nursery.start_soon(stuck.sync_with, net.nodes[0].contact)
    await net.until(lambda: net.total(stuck) == 3, "catch-up after max_defer", limit=40)
    assert 30 <= trio.current_time() - t1 < 31
