"""ServeBudget (node/exchange/budget.py): streams and bytes held for peers, bounded per
peer and in all, with back-pressure instead of buffering. trio, virtual time."""
from __future__ import annotations

import pytest
import trio

from hypersdk.node.exchange.budget import ServeBudget, StreamAccount

A, B, C = b"a" * 32, b"b" * 32, b"c" * 32
MiB = 1 << 20


def test_stream_caps_per_peer_and_in_all():
    b = ServeBudget(total=64 * MiB, per_peer=8 * MiB, streams=5, streams_per_peer=2)
    assert b.open_stream(A) and b.open_stream(A)
    assert not b.open_stream(A)                               # per peer
    assert b.open_stream(B) and b.open_stream(B) and b.open_stream(C)
    assert not b.open_stream(C)                               # node-wide
    assert b.counters["streams refused: per peer"] == 1
    assert b.counters["streams refused: node"] == 1
    b.close_stream(A)
    assert b.open_stream(C)
    for p in (A, B, B, C, C):
        b.close_stream(p)
    assert b.streams == 0 and b.status()["peers"] == 0          # nothing kept for gone peers


async def test_bytes_wait_for_room_and_one_peer_cannot_take_it_all(autojump_clock):
    b = ServeBudget(total=10 * MiB, per_peer=6 * MiB)
    order = []
    await b.acquire(A, 6 * MiB)

    async def want(peer, n, tag):
        await b.acquire(peer, n)
        order.append(tag)

    async with trio.open_nursery() as n:
        n.start_soon(want, A, MiB, "a more")                  # A is at its own limit
        n.start_soon(want, B, 4 * MiB, "b")                    # fits: B is not blocked by A
        await trio.sleep(1)
        assert order == ["b"] and b.used == 10 * MiB
        n.start_soon(want, C, MiB, "c")                        # the total is full: waits
        await trio.sleep(1)
        assert order == ["b"]
        b.release(B, 4 * MiB)                                  # room for C, not for A
        await trio.sleep(1)
        assert order == ["b", "c"]
        b.release(A, 6 * MiB)
    assert order == ["b", "c", "a more"]
    assert b.high_water == 10 * MiB and b.counters["waits"] >= 2


async def test_a_chunk_larger_than_a_limit_still_goes_alone(autojump_clock):
    b = ServeBudget(total=4 * MiB, per_peer=2 * MiB)
    with trio.fail_after(1):
        await b.acquire(A, 8 * MiB)                            # nothing else held: progress
    assert b.used == 8 * MiB
    b.release(A, 8 * MiB)
    assert b.used == 0


async def test_a_stream_account_gives_back_what_it_held(autojump_clock):
    b = ServeBudget(total=8 * MiB, per_peer=8 * MiB)
    acct = StreamAccount(b, A)
    await acct.take(3 * MiB)
    await acct.take(2 * MiB)
    acct.give(MiB)
    assert b.used == acct.held == 4 * MiB
    acct.close()                                               # a stream that died mid-Get
    assert b.used == 0 and acct.held == 0
    none = StreamAccount(None, A)                              # no budget: a no-op
    await none.take(MiB)
    none.close()


def test_limits_must_be_positive():
    with pytest.raises(ValueError):
        ServeBudget(total=0)
