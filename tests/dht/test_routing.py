"""Routing table (dht/routing.py): one plain test per rule, then Hypothesis
properties over random ids and random sequences of observe/ping_result/failed."""
from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from hypersdk.dht.contact import Contact
from hypersdk.dht.keys import ID_BITS, ID_BYTES, as_int, bucket_index, distance
from hypersdk.dht.routing import RoutingTable, Status

OWN = bytes.fromhex("5a" * 32)
FAR = ID_BITS - 1          # the farthest bucket: half the keyspace


def id_in(bucket: int, low: int = 0, own: bytes = OWN) -> bytes:
    """An id whose distance from own falls in `bucket` (low: the lower bits)."""
    d = (1 << bucket) | (low % (1 << bucket))
    return (as_int(own) ^ d).to_bytes(ID_BYTES, "big")


def peer(n: int, bucket: int = FAR, *, ip: str | None = None, site: str = "") -> Contact:
    """Peer number n in `bucket`; by default alone in its own /24."""
    ip = ip or f"10.{n // 256}.{n % 256}.1"
    return Contact(id_in(bucket, n), f"/ip4/{ip}/tcp/4001", site)


def table(**kw) -> RoutingTable:
    """A small table; pings are asked for at once (ping_after=0) unless a test
    sets the questionable age."""
    kw.setdefault("k", 3)
    kw.setdefault("ping_after", 0)
    return RoutingTable(OWN, rng=random.Random(7), **kw)


def full_bucket(rt: RoutingTable, n: int = 3) -> list[Contact]:
    contacts = [peer(i) for i in range(1, n + 1)]
    for t, c in enumerate(contacts):
        assert rt.observe(c, now=t).status is Status.INSERTED
    return contacts


# -- insert and update -------------------------------------------------------

def test_insert_then_update_moves_to_most_recent():
    rt = table()
    a, b = peer(1), peer(2)
    assert rt.observe(a, 0).status is Status.INSERTED
    assert rt.observe(b, 1).status is Status.INSERTED
    assert a.id in rt and rt.get(a.id) == a and len(rt) == 2
    assert rt.buckets()[FAR] == [a, b]
    assert rt.observe(a, 2).status is Status.UPDATED
    assert rt.buckets()[FAR] == [b, a]
    assert len(rt) == 2


def test_own_id_is_never_stored():
    rt = table()
    out = rt.observe(Contact(OWN, "/ip4/10.0.0.1/tcp/1"), 0)
    assert out.status is Status.REJECTED and out.reason == "own id"
    assert OWN not in rt and len(rt) == 0
    assert rt.ping_result(OWN, False, 1) is None and rt.failed(OWN, 1) is None


# -- full bucket: ping the oldest, prefer long-lived contacts ----------------

def test_full_bucket_caches_candidate_and_pings_oldest_once():
    rt = table()
    a, b, c = full_bucket(rt)
    d, e = peer(4), peer(5)
    out = rt.observe(d, 10)
    assert out.status is Status.CACHED and out.ping == a
    assert rt.pending_ping(FAR) == a.id
    out = rt.observe(e, 11)                     # a ping is already pending
    assert out.status is Status.CACHED and out.ping is None
    assert rt.buckets()[FAR] == [a, b, c]
    assert rt.replacements(FAR) == [d, e]


def test_alive_oldest_stays_and_candidate_stays_cached():
    rt = table()
    a, b, c = full_bucket(rt)
    d = peer(4)
    rt.observe(d, 10)
    assert rt.ping_result(a.id, True, 11) is None
    assert rt.buckets()[FAR] == [b, c, a]       # a moved to most recent
    assert rt.replacements(FAR) == [d]
    assert rt.pending_ping(FAR) is None
    assert rt.observe(peer(5), 12).ping == b    # the next ping goes to the new oldest


def test_dead_oldest_is_replaced_by_most_recent_candidate():
    rt = table()
    a, b, c = full_bucket(rt)
    d, e = peer(4), peer(5)
    rt.observe(d, 10)
    rt.observe(e, 11)
    assert rt.ping_result(a.id, False, 12) == e
    assert a.id not in rt
    assert rt.buckets()[FAR] == [b, c, e]
    assert rt.replacements(FAR) == [d]
    assert rt.pending_ping(FAR) is None


def test_replacement_is_placed_by_its_last_seen():
    rt = table()
    a, b, c = full_bucket(rt)
    d = peer(4)
    rt.observe(d, 10)
    rt.observe(c, 20)                           # c seen after d was cached
    rt.ping_result(a.id, False, 21)
    assert rt.buckets()[FAR] == [b, d, c]


def test_consecutive_failures_evict_and_success_resets():
    rt = table()
    a, b, c = full_bucket(rt)
    d = peer(4)
    rt.observe(d, 10)
    assert rt.failed(b.id, 11) is None
    assert rt.failed(b.id, 12) is None
    rt.observe(b, 13)                           # an answer resets the count
    assert rt.failed(b.id, 14) is None
    assert rt.failed(b.id, 15) is None
    assert b.id in rt
    assert rt.failed(b.id, 16) == d             # third in a row
    assert b.id not in rt and d.id in rt


def test_eviction_of_pinged_contact_clears_pending_ping():
    rt = table(max_failures=1)
    a, b, c = full_bucket(rt)
    assert rt.observe(peer(4), 10).ping == a
    rt.failed(a.id, 11)
    assert rt.pending_ping(FAR) is None and a.id not in rt


def test_failing_candidate_is_dropped_from_cache():
    rt = table()
    full_bucket(rt)
    d = peer(4)
    rt.observe(d, 10)
    rt.failed(d.id, 11)
    assert rt.replacements(FAR) == []


def test_remove_drops_a_contact_at_once_and_fills_its_slot():
    rt = table()
    a, b, c = full_bucket(rt)
    d, e = peer(4), peer(5)
    assert rt.observe(d, 10).ping == a          # a ping to a is pending
    rt.observe(e, 11)
    assert rt.remove(a.id) == e                 # one call, no failure count: gone
    assert a.id not in rt and rt.pending_ping(FAR) is None
    assert rt.buckets()[FAR] == [b, c, e] and rt.replacements(FAR) == [d]
    assert rt.remove(d.id) is None              # a candidate leaves the cache
    assert rt.replacements(FAR) == []
    assert rt.remove(b.id) is None              # no candidate left: the slot stays free
    assert rt.buckets()[FAR] == [c, e]
    assert rt.remove(b.id) is None and rt.remove(OWN) is None    # unknown ids: no-op
    assert rt.observe(peer(9), 12).status is Status.INSERTED
    rt.ping_result(a.id, False, 13)             # a late ping answer for it changes nothing
    assert len(rt) == 3


def test_eviction_without_candidates_leaves_room():
    rt = table()
    a, b, c = full_bucket(rt)
    assert rt.ping_result(a.id, False, 10) is None
    assert rt.buckets()[FAR] == [b, c]
    assert rt.observe(peer(9), 11).status is Status.INSERTED


def test_replacement_cache_is_bounded_and_drops_least_recent():
    rt = table(k=2)
    full_bucket(rt, 2)
    d, e, f = peer(4), peer(5), peer(6)
    for t, x in enumerate((d, e, f), start=10):
        rt.observe(x, t)
    assert rt.replacements(FAR) == [e, f]
    rt.observe(d, 13)
    assert rt.replacements(FAR) == [f, d]


# -- diversity ---------------------------------------------------------------

def test_prefix24_limit_rejects_without_caching():
    rt = table(k=5)
    same = [peer(i, ip=f"10.9.9.{i}") for i in range(1, 4)]
    assert rt.observe(same[0], 0).status is Status.INSERTED
    assert rt.observe(same[1], 1).status is Status.INSERTED
    out = rt.observe(same[2], 2)
    assert out.status is Status.REJECTED and out.reason == "ip /24"
    assert same[2].id not in rt and rt.replacements(FAR) == []
    # the limit is per bucket: the same /24 is welcome in another bucket
    assert rt.observe(peer(3, FAR - 1, ip="10.9.9.3"), 3).status is Status.INSERTED


def test_prefix24_limit_applies_to_a_full_bucket_too():
    rt = table(k=2)
    rt.observe(peer(1, ip="10.9.9.1"), 0)
    rt.observe(peer(2, ip="10.9.9.2"), 1)
    out = rt.observe(peer(3, ip="10.9.9.3"), 2)
    assert out.status is Status.REJECTED and out.ping is None
    assert rt.replacements(FAR) == [] and rt.pending_ping(FAR) is None


def test_site_limit():
    rt = table(k=10)
    for i in range(4):
        assert rt.observe(peer(i, site="paris"), i).status is Status.INSERTED
    out = rt.observe(peer(4, site="paris"), 4)
    assert out.status is Status.REJECTED and out.reason == "site"
    assert rt.observe(peer(5, site="lyon"), 5).status is Status.INSERTED


def test_undeclared_site_and_non_ipv4_are_not_limited():
    rt = table(k=10)
    for i in range(6):
        assert rt.observe(peer(i), i).status is Status.INSERTED          # site ""
    for i in range(6, 10):
        c = Contact(id_in(FAR, i), f"/ip6/fd00::{i}/tcp/4001")
        assert rt.observe(c, i).status is Status.INSERTED


def test_limits_can_be_disabled_for_loopback_test_networks():
    rt = table(k=10, max_per_prefix24=None, max_per_site=None)
    for i in range(10):
        assert rt.observe(peer(i, ip="127.0.0.1", site="lab"), i).status is Status.INSERTED


def test_replacement_skips_candidates_the_limits_now_forbid():
    rt = table()
    a, c, x = peer(1, ip="10.9.9.1"), peer(2), peer(3)
    for t, p in enumerate((a, c, x)):
        rt.observe(p, t)
    d = peer(4)                                 # its own /24
    e = peer(5, ip="10.9.9.5")                  # second of 10.9.9: allowed, cached
    rt.observe(d, 10)
    assert rt.observe(e, 11).status is Status.CACHED
    rt.observe(Contact(c.id, "/ip4/10.9.9.3/tcp/4001"), 12)    # c moves into 10.9.9
    assert rt.ping_result(x.id, False, 13) == d     # e is more recent but now forbidden
    assert rt.replacements(FAR) == [e]


def test_candidate_leaves_the_cache_when_it_enters_the_bucket():
    rt = table()
    a, c, x = peer(1, ip="10.9.9.1"), peer(2), peer(3)
    for t, p in enumerate((a, c, x)):
        rt.observe(p, t)
    e = peer(5, ip="10.9.9.5")
    assert rt.observe(e, 10).status is Status.CACHED
    rt.observe(Contact(c.id, "/ip4/10.9.9.3/tcp/4001"), 11)    # e now forbidden
    assert rt.ping_result(x.id, False, 12) is None              # so the slot stays free
    rt.observe(Contact(c.id, "/ip4/10.8.8.8/tcp/4001"), 13)    # e allowed again
    assert rt.observe(e, 14).status is Status.INSERTED
    assert rt.replacements(FAR) == []


def test_cache_obeys_limits_newer_candidate_replaces_oldest_of_its_group():
    rt = table(k=4)
    full_bucket(rt, 4)
    x1, x2, x3 = (peer(10 + i, ip=f"10.7.7.{i}") for i in range(3))
    y = peer(20)
    for t, c in enumerate((x1, y, x2, x3), start=10):
        assert rt.observe(c, t).status is Status.CACHED
    assert rt.replacements(FAR) == [y, x2, x3]


def test_known_contact_keeps_old_record_when_new_address_breaks_a_limit():
    rt = table(k=5)
    rt.observe(peer(1, ip="10.9.9.1"), 0)
    rt.observe(peer(2, ip="10.9.9.2"), 1)
    c = peer(3)
    rt.observe(c, 2)
    moved = Contact(c.id, "/ip4/10.9.9.3/tcp/4001")
    assert rt.observe(moved, 3).status is Status.UPDATED
    assert rt.get(c.id) == c
    ok = Contact(c.id, "/ip4/10.8.8.8/tcp/4001")
    rt.observe(ok, 4)
    assert rt.get(c.id) == ok


# -- refresh -----------------------------------------------------------------

def test_refresh_targets_fall_in_their_bucket_and_come_from_the_injected_rng():
    rt = table()
    targets = [rt.refresh_target(i) for i in range(ID_BITS)]
    assert [bucket_index(OWN, t) for t in targets] == list(range(ID_BITS))
    again = table()
    assert [again.refresh_target(i) for i in range(ID_BITS)] == targets
    assert len({rt.refresh_target(200) for _ in range(20)}) > 1


def test_stale_buckets_from_farthest_down_to_nearest_non_empty():
    rt = table()
    assert rt.stale_buckets(now=0) == []
    rt.observe(peer(1, 250), -5000)
    rt.observe(peer(2, FAR), -5000)
    assert rt.stale_buckets(now=0) == list(range(FAR, 249, -1))   # heard long ago
    rt.touch_bucket(FAR, 100)
    rt.touch_bucket(252, 100)
    assert rt.stale_buckets(now=3699) == [254, 253, 251, 250]
    assert rt.stale_buckets(now=3700) == list(range(FAR, 249, -1))
    assert rt.stale_buckets(now=200, interval=50) == list(range(FAR, 249, -1))


def test_hearing_from_a_contact_keeps_its_bucket_fresh():
    rt = table()
    a = peer(1, 250)
    rt.observe(a, 0)                                   # inserted: bucket 250 heard from
    rt.observe(peer(2, FAR), -5000)
    assert rt.stale_buckets(now=3000) == list(range(FAR, 250, -1))
    rt.observe(a, 2000)                                # updated
    assert 250 not in rt.stale_buckets(now=5000)
    assert rt.stale_buckets(now=5600) == list(range(FAR, 249, -1))
    b = peer(3, FAR)
    rt.observe(b, 5600)
    rt.ping_result(b.id, True, 6000)                    # a live ping answer counts too
    assert FAR not in rt.stale_buckets(now=9500)


def test_full_bucket_of_recently_seen_contacts_asks_for_no_ping():
    rt = table(ping_after=900)
    a, b, c = full_bucket(rt)                          # seen at 0, 1, 2 (full_bucket)
    out = rt.observe(peer(4), 899)
    assert out.status is Status.CACHED and out.ping is None
    assert rt.replacements(FAR) == [peer(4)] and rt.pending_ping(FAR) is None
    out = rt.observe(peer(5), 900)                      # a is now questionable
    assert out.status is Status.CACHED and out.ping == a
    rt.ping_result(a.id, True, 900)                    # alive: b is the oldest, seen at 1
    assert rt.observe(peer(6), 900).ping is None
    assert rt.observe(peer(7), 901).ping == b


# -- closest -----------------------------------------------------------------

def test_closest_is_nearest_first_and_never_own_id():
    rt = table(k=20)
    contacts = [peer(i, b) for i, b in enumerate([FAR, FAR, 200, 100, 3, 0])]
    for t, c in enumerate(contacts):
        rt.observe(c, t)
    got = rt.closest(OWN, 4)
    assert got == [contacts[5], contacts[4], contacts[3], contacts[2]]
    assert all(c.id != OWN for c in rt.closest(OWN, 100))
    assert len(rt.closest(OWN, 100)) == 6
    assert rt.closest(contacts[0].id, 1) == [contacts[0]]
    assert rt.closest(OWN, 0) == []


# -- the keyspace ------------------------------------------------------------

def test_bucket_ranges_tile_the_keyspace():
    ranges = [RoutingTable.bucket_range(i) for i in range(ID_BITS)]
    assert ranges[0][0] == 1 and ranges[-1][1] == 1 << ID_BITS     # 0 is our own id
    assert all(ranges[i][1] == ranges[i + 1][0] for i in range(ID_BITS - 1))


ids = st.binary(min_size=ID_BYTES, max_size=ID_BYTES)


@given(own=ids, other=ids)
def test_every_id_falls_in_exactly_one_bucket(own, other):
    d = distance(own, other)
    holders = [i for i in range(ID_BITS)
               if RoutingTable.bucket_range(i)[0] <= d < RoutingTable.bucket_range(i)[1]]
    if other == own:
        assert holders == [] and bucket_index(own, other) == -1
    else:
        assert holders == [bucket_index(own, other)]


@settings(max_examples=20)
@given(own=ids)
def test_boundary_ids_fall_in_the_expected_bucket(own):
    o = as_int(own)
    for i in range(ID_BITS):
        lo, hi = RoutingTable.bucket_range(i)
        for d in (lo, hi - 1):                       # own^(1<<i) .. own^(2^(i+1)-1)
            assert bucket_index(own, (o ^ d).to_bytes(ID_BYTES, "big")) == i
        if i < ID_BITS - 1:
            assert bucket_index(own, (o ^ hi).to_bytes(ID_BYTES, "big")) == i + 1


# -- random operation sequences ---------------------------------------------

BUCKETS = [FAR] * 4 + [FAR - 1, FAR - 2, 128, 2, 1, 0]  # few buckets, mostly one: they fill up
IPS = ["10.0.0", "10.0.1", "10.0.2", "192.168.5"]
SITES = ["", "paris", "lyon", "oslo"]


@st.composite
def scenarios(draw):
    own = draw(ids)
    pool = []
    for _ in range(draw(st.integers(4, 30))):
        b = draw(st.sampled_from(BUCKETS))
        pool.append(Contact(id_in(b, draw(st.integers(0, 31)), own),
                            f"/ip4/{draw(st.sampled_from(IPS))}.{draw(st.integers(1, 9))}/tcp/1",
                            draw(st.sampled_from(SITES))))
    pool.append(Contact(own, "/ip4/10.0.0.1/tcp/1"))      # our own id among the peers
    ops = draw(st.lists(st.tuples(st.sampled_from(["observe"] * 3 + ["ping", "answer", "failed",
                                                                   "remove"]),
                                  st.integers(0, len(pool) - 1), st.booleans()),
                        min_size=10, max_size=80))
    limits = dict(k=draw(st.integers(1, 4)),
                  max_per_prefix24=draw(st.sampled_from([None, 1, 2])),
                  max_per_site=draw(st.sampled_from([None, 1, 2, 3])),
                  max_failures=draw(st.integers(1, 3)))
    return own, pool, ops, limits, draw(ids)


def check_invariants(rt: RoutingTable, own: bytes, targets: list[bytes]):
    buckets = rt.buckets()
    assert len(buckets) == ID_BITS
    stored = [c for bucket in buckets for c in bucket]
    assert len({c.id for c in stored}) == len(stored) == len(rt)          # disjoint
    for i, bucket in enumerate(buckets):
        cache = rt.replacements(i)
        if not bucket and not cache:
            continue
        assert len(bucket) <= rt.k and len(cache) <= rt.k
        lo, hi = rt.bucket_range(i)
        for c in bucket:
            assert c.id != own
            assert bucket_index(own, c.id) == i and lo <= distance(own, c.id) < hi
            assert c.id in rt and rt.get(c.id) == c
        assert not {c.id for c in cache} & {c.id for c in bucket}
        for group, limit in ((lambda c: c.ip_prefix24, rt.max_per_prefix24),
                             (lambda c: c.site, rt.max_per_site)):
            for contacts in (bucket, cache):
                counts = Counter(group(c) for c in contacts if group(c))
                assert limit is None or all(n <= limit for n in counts.values())
    for t in targets:
        for n in (0, 1, 3, len(stored) + 1):
            want = sorted(stored, key=lambda c: distance(t, c.id))[:n]
            assert rt.closest(t, n) == want


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_random_operations_keep_the_table_consistent(scenario):
    own, pool, ops, limits, target = scenario
    rt = RoutingTable(own, rng=random.Random(0), ping_after=0, **limits)
    for now, (op, i, flag) in enumerate(ops):
        c = pool[i]
        if op == "observe":
            out = rt.observe(c, now)
            if out.ping is not None:
                assert out.ping.id in rt
                assert out.ping == rt.buckets()[bucket_index(own, c.id)][0]
        elif op == "ping":
            rt.ping_result(c.id, flag, now)
        elif op == "answer" and c.id != own:                 # answer the pending ping
            pending = rt.pending_ping(bucket_index(own, c.id))
            if pending is not None:
                before = rt.buckets()[bucket_index(own, c.id)]
                rt.ping_result(pending, flag, now)
                assert (pending in rt) == flag                   # alive stays, dead goes
                if flag:
                    assert {x.id for x in before} == {x.id for x in rt.buckets()[bucket_index(own, c.id)]}
        elif op == "failed":
            rt.failed(c.id, now)
        elif op == "remove":
            rt.remove(c.id)
            if c.id != own:
                b = bucket_index(own, c.id)
                assert c.id not in rt and rt.pending_ping(b) != c.id
                assert c.id not in {x.id for x in rt.replacements(b)}
        check_invariants(rt, own, [own, target, c.id])
    for b in range(ID_BITS):
        assert bucket_index(own, rt.refresh_target(b)) == b


# -- rule 9: learned contacts ------------------------------------------------------

def test_learned_contacts_fill_only_room_and_stay_out_of_answers_to_others():
    rt = table(k=3)
    a, b, c, d = peer(1), peer(2), peer(3), peer(4)
    rt.observe(a, 0)
    assert rt.learn(b) and rt.learn(c)
    assert not rt.learn(b) and not rt.learn(a)          # known already
    assert not rt.learn(d)                              # member + learned fill k
    assert not rt.learn(Contact(OWN, "/ip4/10.9.9.1/tcp/4001"))
    assert rt.known(FAR) == 3 and len(rt) == 1 and rt.learned(FAR) == [b, c]
    assert rt.closest(OWN, 10) == [a]                   # never handed to other peers
    t = as_int(OWN)
    assert rt.closest(OWN, 10, learned=True) == sorted([a, b, c], key=lambda x: t ^ x.n)
    assert rt.stale_buckets(now=20, interval=10) == [FAR]  # learning is not hearing
    rt.observe(b, 5)                                    # it answered: a member now
    assert rt.buckets()[FAR] == [a, b] and rt.learned(FAR) == [c]
    rt.failed(c.id, 6)                                  # one failure forgets it
    assert rt.learned(FAR) == [] and rt.known(FAR) == 2
    near = peer(9, 10)
    assert rt.learn(near) and rt.closest(near.id, 1, learned=True) == [near]
    rt.remove(near.id)
    assert rt.known(10) == 0


@given(st.lists(st.tuples(st.sampled_from(["observe", "learn", "failed"]),
                          st.integers(0, 40), st.sampled_from([FAR, 250, 200, 3])),
                max_size=80),
       st.binary(min_size=32, max_size=32))
@settings(max_examples=60, deadline=None)
def test_closest_with_learned_is_the_sorted_union(ops, target):
    rt = table(k=3)
    for t, (op, n, b) in enumerate(ops):
        c = peer(n, b)
        if op == "observe":
            rt.observe(c, t)
        elif op == "learn":
            rt.learn(c)
        else:
            rt.failed(c.id, t)
    every = [c for bucket in rt.buckets() for c in bucket]
    every += [c for i in range(ID_BITS) for c in rt.learned(i)]
    assert len({c.id for c in every}) == len(every)     # learned never duplicates a member
    tn = as_int(target)
    want = sorted(every, key=lambda c: tn ^ c.n)
    for n in (1, 3, 7, 100):
        assert rt.closest(target, n, learned=True) == want[:n]
