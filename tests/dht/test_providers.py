"""dht.providers: provider records expire, refresh, never duplicate, stay bounded;
the Republisher schedule."""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypersdk.dht.contact import Contact
from hypersdk.dht.providers import (
    MAX_PROVIDERS_PER_KEY,
    PROVIDER_TTL,
    REPUBLISH_INTERVAL,
    ProviderStore,
    Republisher,
)

H = 3600.0


def key(i: int) -> bytes:
    return bytes([0xAA]) + i.to_bytes(31, "big")


def peer(i: int, addr: str | None = None) -> Contact:
    return Contact(bytes([0x55]) + i.to_bytes(31, "big"), addr or f"/ip4/10.0.0.{i % 256}/tcp/4001")


def test_constants():
    assert PROVIDER_TTL == 48 * H and REPUBLISH_INTERVAL == 22 * H
    assert REPUBLISH_INTERVAL < PROVIDER_TTL / 2        # one missed republish is survivable


def test_record_expires_at_exactly_ttl():
    s = ProviderStore()
    assert s.add(key(1), peer(1), now=100.0)
    assert s.get(key(1), 100.0 + PROVIDER_TTL - 0.001) == [peer(1)]
    assert s.get(key(1), 100.0 + PROVIDER_TTL) == []      # gone even before expire()
    assert len(s) == 0 and s.key_count == 0


def test_expire_removes_and_counts():
    s = ProviderStore(ttl=10)
    s.add(key(1), peer(1), 0)
    s.add(key(1), peer(2), 5)
    s.add(key(2), peer(1), 3)
    assert s.expire(9.99) == 0
    assert s.expire(10) == 1                               # key 1 / peer 1
    assert s.get(key(1), 10) == [peer(2)] and s.key_count == 2
    assert s.expire(13) == 1 and s.key_count == 1          # key 2 gone
    assert s.expire(15) == 1 and len(s) == 0 and s.key_count == 0
    assert s.expire(1e9) == 0


def test_readd_refreshes_expiry_and_address_without_duplicating():
    s = ProviderStore(ttl=10)
    s.add(key(1), peer(1), 0)
    s.add(key(1), peer(2), 1)
    s.add(key(1), peer(1, "/ip4/192.168.1.1/tcp/9"), 8)    # moved, and refreshed
    assert s.get(key(1), 9) == [peer(1, "/ip4/192.168.1.1/tcp/9"), peer(2)]   # first-announced first
    assert len(s) == 2
    assert s.get(key(1), 12) == [peer(1, "/ip4/192.168.1.1/tcp/9")]          # peer 2 expired at 11
    assert s.get(key(1), 18) == []


def test_full_key_keeps_live_providers_and_newcomers_wait():
    s = ProviderStore(ttl=10, max_providers_per_key=3)
    for i in range(3):
        assert s.add(key(1), peer(i), i)
    assert not s.add(key(1), peer(9), 5)                  # full, all alive: established stay
    assert s.waiting(key(1)) == peer(9)
    assert s.add(key(1), peer(0), 5)                      # a refresh is always accepted
    assert not s.add(key(1), peer(8), 10.5)               # the latest newcomer waits instead
    assert s.waiting(key(1)) == peer(8)
    assert s.add(key(1), peer(9), 11)                     # peer 1 expired at 11: room again
    assert {c.id for c in s.get(key(1), 11)} == {peer(0).id, peer(2).id, peer(9).id}


def test_a_failing_provider_makes_room_for_the_waiting_newcomer():
    s = ProviderStore(ttl=10 * H, max_providers_per_key=3)
    for i in range(3):
        s.add(key(1), peer(i), 0)
    s.add(key(2), peer(1), 0)
    assert not s.add(key(1), peer(9), 1)
    assert s.to_check(key(1), 1) == []                    # all heard from just now
    s.mark_ok(peer(0).id, 500)
    assert [c.id for c in s.to_check(key(1), 700)] == [peer(1).id, peer(2).id]
    assert s.mark_failed(peer(1).id, 701) == 1            # its place on key 1 goes to peer 9
    assert [c.id for c in s.get(key(1), 701)] == [peer(0).id, peer(2).id, peer(9).id]
    assert s.get(key(2), 701) == [peer(1)]                # kept where nobody waits for it
    assert s.waiting(key(1)) is None and s.evicted == 1
    assert s.mark_failed(peer(1).id, 702) == 0


def test_a_suspect_provider_is_replaced_at_once_and_banned_ones_are_never_returned():
    s = ProviderStore(ttl=100, max_providers_per_key=2)
    s.add(key(1), peer(1), 0)
    s.add(key(1), peer(2), 0)
    s.mark_failed(peer(2).id, 1, banned=True)
    assert s.get(key(1), 1) == [peer(1)]                  # banned: never handed out
    s.mark_failed(peer(1).id, 2)
    assert s.add(key(1), peer(3), 3)                      # the banned one goes first
    assert [c.id for c in s.get(key(1), 3)] == [peer(1).id, peer(3).id]
    assert s.add(key(1), peer(4), 4)                      # then the one that failed
    assert [c.id for c in s.get(key(1), 4)] == [peer(3).id, peer(4).id]
    s.mark_failed(peer(3).id, 5)
    s.mark_ok(peer(3).id, 6)                              # it answered again: not suspect
    assert not s.add(key(1), peer(5), 7)


def test_a_flooding_provider_cannot_crowd_out_others():
    """A peer announcing random keys fills the free room, then only pushes out
    its own records: honest providers keep being stored (rule 3)."""
    s = ProviderStore(ttl=1000, max_records=100)
    for i in range(300):
        s.add(key(1000 + i), peer(66), 0)
    assert len(s) == 100 and s.records_of(peer(66).id) == 100
    for i in range(40):                                   # honest newcomers get room
        assert s.add(key(i), peer(i % 4), 1)
    assert len(s) == 100 and s.records_of(peer(66).id) == 60
    assert all(s.get(key(i), 2) == [peer(i % 4)] for i in range(40))
    assert not s.add(key(5000), peer(66), 2)              # the largest is refused
    assert s.get(key(1099), 2) == [peer(66)]              # its newest stayed, oldest went
    assert s.get(key(1100), 2) == []                      # refused once the store was full
    assert s.get(key(1000), 2) == []


def test_store_refuses_when_the_newcomer_would_be_the_largest():
    s = ProviderStore(ttl=1000, max_records=4)
    for i in range(2):
        s.add(key(i), peer(1), 0)
        s.add(key(10 + i), peer(2), 0)
    assert not s.add(key(20), peer(1), 1)                 # 2 v 2: nobody is over their share
    assert s.add(key(20), peer(3), 1)                     # a third provider: room from a largest
    assert s.records_of(peer(3).id) == 1 and len(s) == 4


def test_invalid_arguments():
    with pytest.raises(ValueError):
        ProviderStore(ttl=0)
    with pytest.raises(ValueError):
        ProviderStore(max_records=0)
    with pytest.raises(ValueError):
        ProviderStore().add(b"short", peer(1), 0)
    with pytest.raises(ValueError):
        Republisher(interval=0)


ops = st.lists(st.tuples(st.sampled_from(["add", "add", "get", "expire", "ok", "fail", "ban"]),
                         st.integers(0, 5), st.integers(0, 7), st.floats(0, 30)), max_size=100)


@settings(max_examples=400, deadline=None)
@given(ops, st.integers(1, 12), st.integers(1, 4))
def test_property_store_bounds_and_fairness(ops, max_records, max_per_key):
    """Against a model of what was accepted: nothing is returned that was not
    accepted within ttl, banned providers never; bounds hold; a refresh is
    always accepted; a refusal in a full store means the newcomer already
    holds as many records as anyone, less one (rule 3); a refusal at a full key
    means none of its providers is suspect (rule 4)."""
    ttl, now = 10.0, 0.0
    s = ProviderStore(ttl=ttl, max_records=max_records, max_providers_per_key=max_per_key)
    model: dict[tuple[int, int], float] = {}            # (key, peer) -> expires at
    suspect: set[int] = set()
    banned: set[int] = set()
    for op, k, p, dt in ops:
        now += dt
        model = {kp: e for kp, e in model.items() if now < e}
        held = {kp for kp in model if peer(kp[1]) in s.get(key(kp[0]), now)
                or kp[1] in banned}
        model = {kp: e for kp, e in model.items() if kp in held}     # evictions
        if op == "add":
            refresh = (k, p) in model
            on_key = [pp for kk, pp in model if kk == k]
            counts = {}
            for _, pp in model:
                counts[pp] = counts.get(pp, 0) + 1
            ok = s.add(key(k), peer(p), now)
            assert ok or not refresh
            if not ok and len(on_key) >= max_per_key:
                assert not (set(on_key) & (suspect | banned))
            elif not ok:
                assert len(model) >= max_records
                assert counts.get(p, 0) + 1 >= max(counts.values())
            if ok:
                model[(k, p)] = now + ttl
                suspect.discard(p)
                banned.discard(p)
        elif op == "get":
            got = s.get(key(k), now)
            assert len({c.id for c in got}) == len(got) <= max_per_key
            assert {c.id for c in got} <= {peer(pp).id for kk, pp in model if kk == k}
            assert not {c.id for c in got} & {peer(b).id for b in banned}
        elif op == "expire":
            before = len(s)
            assert s.expire(now) == before - len(s)
        elif op == "ok":
            s.mark_ok(peer(p).id, now)
            suspect.discard(p)
        else:
            s.mark_failed(peer(p).id, now, banned=op == "ban")
            if any(pp == p for _, pp in model):
                suspect.add(p)
                if op == "ban":
                    banned.add(p)
        assert len(s) <= max_records


def test_many_random_records_expire_completely():
    rng, s = random.Random(1), ProviderStore(max_records=5000, max_providers_per_key=MAX_PROVIDERS_PER_KEY)
    for _ in range(5000):
        s.add(key(rng.randrange(400)), peer(rng.randrange(50)), rng.uniform(0, 24 * H))
    n = len(s)
    assert 0 < n <= 400 * MAX_PROVIDERS_PER_KEY and s.expire(24 * H) == 0
    assert s.expire(24 * H + PROVIDER_TTL) == n
    assert len(s) == 0 and s.key_count == 0


def test_republisher_schedule():
    r = Republisher()
    assert not r.due(0)                                   # nothing provided
    r.provide(key(2))
    r.provide(key(1))
    assert r.keys == [key(1), key(2)]
    assert r.due(0) and r.next_due() is None              # never ran: due at once
    r.mark_done(100)
    assert not r.due(100 + REPUBLISH_INTERVAL - 1)
    assert r.due(100 + REPUBLISH_INTERVAL) and r.next_due() == 100 + REPUBLISH_INTERVAL
    r.mark_done(100 + REPUBLISH_INTERVAL)
    assert not r.due(100 + REPUBLISH_INTERVAL + 1)
    r.withdraw(key(1))
    r.withdraw(key(2))
    assert not r.due(1e9)                                 # nothing left to announce


def test_republishing_keeps_a_record_alive_indefinitely():
    store, r, now = ProviderStore(), Republisher(), 0.0
    r.provide(key(1))
    for _ in range(10 * 24):                              # ten days, hourly ticks
        if r.due(now):
            for k in r.keys:
                store.add(k, peer(1), now)
            r.mark_done(now)
        store.expire(now)
        assert store.get(key(1), now) == [peer(1)]
        now += H
