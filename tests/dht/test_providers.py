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


def test_full_key_refuses_newcomers_until_a_record_expires():
    s = ProviderStore(ttl=10, max_providers_per_key=3)
    for i in range(3):
        assert s.add(key(1), peer(i), i)
    assert not s.add(key(1), peer(9), 5)                  # full: established providers stay
    assert s.add(key(1), peer(0), 5)                      # a refresh is always accepted
    assert not s.add(key(1), peer(9), 10.5)               # peer 0 was refreshed; peers 1, 2 alive
    assert s.add(key(1), peer(9), 11)                     # peer 1 expired at 11: room again
    assert {c.id for c in s.get(key(1), 11)} == {peer(0).id, peer(2).id, peer(9).id}


def test_full_store_refuses_new_keys_until_one_expires():
    s = ProviderStore(ttl=10, max_keys=2)
    assert s.add(key(1), peer(1), 0) and s.add(key(2), peer(1), 1)
    assert not s.add(key(3), peer(1), 5)
    assert s.add(key(1), peer(2), 5)                      # existing keys still take providers
    assert s.add(key(3), peer(1), 11)                     # key 2 expired at 11
    assert s.key_count == 2 and s.get(key(2), 11) == []


def test_invalid_arguments():
    with pytest.raises(ValueError):
        ProviderStore(ttl=0)
    with pytest.raises(ValueError):
        ProviderStore().add(b"short", peer(1), 0)
    with pytest.raises(ValueError):
        Republisher(interval=0)


ops = st.lists(st.tuples(st.sampled_from(["add", "get", "expire"]), st.integers(0, 5),
                         st.integers(0, 7), st.floats(0, 30)), max_size=80)


@settings(max_examples=300, deadline=None)
@given(ops, st.integers(1, 4), st.integers(1, 4))
def test_property_store_matches_a_model(ops, max_keys, max_per_key):
    """Against a plain model: no duplicates, nothing expired returned, bounds hold,
    and a record is present exactly while its last accepted add is younger than ttl."""
    ttl, now = 10.0, 0.0
    s = ProviderStore(ttl=ttl, max_keys=max_keys, max_providers_per_key=max_per_key)
    model: dict[tuple[int, int], float] = {}            # (key, peer) -> expires at
    for op, k, p, dt in ops:
        now += dt
        model = {kp: e for kp, e in model.items() if now < e}
        if op == "add":
            keys = {kk for kk, _ in model}
            on_key = [pp for kk, pp in model if kk == k]
            ok = (p in on_key or len(on_key) < max_per_key) and (k in keys or len(keys) < max_keys)
            assert s.add(key(k), peer(p), now) == ok
            if ok:
                model[(k, p)] = now + ttl
        elif op == "get":
            got = s.get(key(k), now)
            assert len({c.id for c in got}) == len(got) <= max_per_key
            assert {c.id for c in got} == {peer(pp).id for kk, pp in model if kk == k}
        else:
            before = len(s)
            assert s.expire(now) == before - len(s)
            assert len(s) == len(model)
        assert s.key_count <= max_keys


def test_many_random_records_expire_completely():
    rng, s = random.Random(1), ProviderStore(max_keys=500, max_providers_per_key=MAX_PROVIDERS_PER_KEY)
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
