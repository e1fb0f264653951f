"""node/audit/limits.py (pure) and the limits inside AuditGossip (simnet, virtual
time): audit gossip spam (issue 17, attack 6) is bounded per peer and per author,
and every limit that triggers is counted under its name."""
from __future__ import annotations

import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from test_audit_gossip import T0, Net, body

from hypersdk.node.audit import limits as L
from hypersdk.node.audit.limits import Buckets, InboundLimits
from hypersdk.node.net.identity import Identity
from hypersdk.protocol import audit
from hypersdk.protocol import audit_gossip as msg

P, Q = b"p" * 32, b"q" * 32


def test_buckets_refill_at_their_rate_and_never_exceed_their_depth():
    b = Buckets(rate=10.0, burst=100.0, max_tracked=2)
    assert b.take(P, 100, 0.0) and not b.take(P, 1, 0.0)
    assert not b.take(P, 11, 1.0) and b.take(P, 10, 1.0)      # 10 tokens a second
    assert b.level(P, 1000.0) == 100.0                        # never more than the depth
    b.take(Q, 1, 0.0)
    b.take(b"r" * 32, 1, 0.0)                                 # a third key: P forgotten
    assert len(b) == 2 and b.level(P, 1.0) == 100.0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 5), st.integers(0, 60)), max_size=60))
def test_a_bucket_never_grants_more_than_burst_plus_rate_times_time(steps):
    b, now, granted = Buckets(rate=7.0, burst=50.0), 0.0, 0
    for dt, n in steps:
        now += dt
        granted += n if b.take(P, n, now) else 0
        assert granted <= 50.0 + 7.0 * now + 1e-9


def test_a_push_over_a_peers_entry_or_byte_rate_is_refused_and_counted():
    lim = InboundLimits(peer_rate=100, peer_burst=100, peer_bytes_rate=1000,
                        peer_bytes_burst=1000)
    assert lim.push(P, 60, 500, 0.0)
    assert not lim.push(P, 60, 100, 0.0)                      # entries: 40 left
    assert not lim.push(P, 10, 600, 0.0)                      # bytes: 500 left
    assert lim.push(Q, 60, 500, 0.0)                          # another peer: its own buckets
    assert lim.push(P, 40, 500, 0.0)
    assert lim.limited == {"peer entries": 60, "peer bytes": 10}


def test_admit_limits_authors_and_new_authors_and_stops_an_author_at_its_first_refusal():
    lim = InboundLimits(author_rate=1, author_burst=3, author_bytes_rate=100,
                        author_bytes_burst=1000, new_author_rate=0.1, new_author_burst=2)
    a, b, c, d = (bytes([i]) * 32 for i in range(4))
    known = {a}.__contains__
    batch = [(a, 10)] * 5 + [(b, 10), (c, 10), (d, 10), (b, 10)]
    ok = lim.admit(P, batch, known, vetted=False, now=0.0)
    assert ok == [0, 1, 2, 5, 6, 8]          # a: 3 entries; b, c new (burst 2); d refused
    assert lim.limited == {"author entries": 2, "new authors": 1}
    assert lim.admit(P, [(d, 10)], known, vetted=True, now=0.0) == [0]   # members: vetted
    assert lim.admit(Q, [(a, 2000)], known, vetted=True, now=100.0) == []  # > 1000 bytes
    assert lim.limited["author bytes"] == 1
    assert lim.admit(None, [(b"e" * 32, 5)], known, vetted=False, now=0.0) == [0]  # asked for


def _entries(ident, n, size):
    """n chained entries of about `size` bytes (a summary map of 1,000-byte texts)."""
    out, prev = [], None
    for seq in range(n):
        b = body(seq)
        b["summary"] = {f"k{j}": "x" * 1000 for j in range(size // 1000)} or {"k": seq}
        b["summary"]["seq"] = seq
        e = audit.make_entry(ident, seq, prev, T0, "verify", b)
        out.append(e.raw)
        prev = e.id
    return out


def _push_all(raws):
    """Push-sized batches (MAX_ENTRIES entries, MAX_PUSH_BYTES bytes at most)."""
    out, cur, size = [], [], 0
    for r in raws:
        if len(cur) == msg.MAX_ENTRIES or size + len(r) > msg.MAX_PUSH_BYTES:
            out.append(tuple(cur))
            cur, size = [], 0
        cur.append(r)
        size += len(r)
    return out + [tuple(cur)] if cur else out


async def test_2000_throwaway_authors_pushed_by_one_peer_are_bounded(nursery, autojump_clock):
    """The measured attack: one peer pushes 2,000 valid entries of 2,000 throwaway
    authors. In no network (authors not vetted) the victim stores at most the
    new-author burst and counts the rest; an honest author still gets in."""
    net = await Net(nursery, 2, sync_interval=1e6).start()
    attacker, victim = net.nodes
    victim.vetted = lambda: False
    attacker.peers = lambda: []
    raws = [audit.make_entry(Identity.generate(), 0, None, T0, "verify", body(i)).raw
            for i in range(2000)]
    t0 = trio.current_time()
    for i, batch in enumerate(_push_all(raws)):
        await attacker._request(victim.contact, msg.Push(i + 1, batch))
    stored = len(victim.log.heads())                          # + what refilled meanwhile:
    assert stored <= L.NEW_AUTHOR_BURST + L.NEW_AUTHOR_RATE * (trio.current_time() - t0) + 1
    assert victim.limits.limited["new authors"] >= 2000 - stored
    assert victim.counters["entries limited"] == victim.limits.limited["new authors"]
    honest = await net.add()                                  # its own peer: its own bucket
    e = await honest.append("verify", body())
    await net.until(lambda: victim.log.entry(e.author, 0) == e, "the honest entry")


async def test_one_author_flooding_its_own_log_is_bounded(nursery, autojump_clock):
    """A member (vetted) pushing thousands of its own large entries: the victim
    takes the author's byte burst, counts the rest, and takes more as it refills."""
    net = await Net(nursery, 2, sync_interval=1e6).start()
    spammer, victim = net.nodes
    spammer.peers = lambda: []
    raws = _entries(spammer.ident, 1200, 12_000)             # ~14 MiB
    t0 = trio.current_time()
    for i, batch in enumerate(_push_all(raws)):
        await spammer._request(victim.contact, msg.Push(i + 1, batch))
    held = victim.log.head_seq(spammer.own_author) + 1
    took = trio.current_time() - t0
    assert held * 12_000 <= L.AUTHOR_BYTES_BURST + L.AUTHOR_BYTES_RATE * took
    assert held < len(raws)
    assert victim.limits.limited["author bytes"] > 0 or victim.limits.limited["peer bytes"] > 0
    assert victim.log.verify(spammer.own_author).ok
