"""Yamux flow control is enforced (issue 17, attack 2): real P2PTransports on 127.0.0.1.

The attacker's yamux stream is told it may send without limit (its send window set
to 2^40, as a sender ignoring flow control behaves) and writes 64 MiB at a handler
that never reads. The victim (node/net/yamux_guard.py) keeps at most the stream's
window plus SLACK unread and drops the connection; it stays up and serves an honest
peer at once. On py-libp2p's own Yamux the victim buffered every byte (the check
below that would fail: `held` reaches 64 MiB and the connection stays up)."""
from __future__ import annotations

import trio
from libp2p.stream_muxer.yamux.yamux import MAX_WINDOW_SIZE
from p2p_helpers import STEP_LIMIT, start_transport

from hypersdk.node.net import yamux_guard
from hypersdk.node.net.p2p_transport import P2PTransport
from hypersdk.node.net.transport import TransportError
from hypersdk.node.net.yamux_guard import SLACK, GuardedYamux

SINK = "/test/sink/1"
ECHO = "/test/echo/1"
MiB = 1 << 20


def _muxers(t: P2PTransport) -> list:
    return [c.muxed_conn for conns in t.host.get_network().connections.values()
            for c in (conns if isinstance(conns, list) else [conns])]


async def test_a_peer_ignoring_the_receive_window_loses_its_connection(nursery):
    victim, attacker, honest = P2PTransport(), P2PTransport(), P2PTransport()
    entered = trio.Event()
    held = []                                          # victim: the most it ever buffered

    async def sink(stream, peer):                      # accepts, never reads
        entered.set()
        await trio.sleep_forever()

    async def echo(stream, peer):
        data = await stream.receive_some(1024)
        await stream.send_all(data)
        await stream.aclose()

    victim.set_handler(SINK, sink)
    victim.set_handler(ECHO, echo)
    for t in (victim, attacker, honest):
        await start_transport(nursery, t)
    before = yamux_guard.counters["window violations"]

    with trio.fail_after(STEP_LIMIT):
        s = await attacker.open_stream(victim.peer_id, victim.addr, SINK)
        await s.send_all(b"x")
        await entered.wait()
    muxers = _muxers(victim)
    assert muxers and all(isinstance(m, GuardedYamux) for m in muxers)
    s.libp2p_stream.muxed_stream.send_window = 1 << 40     # ignore flow control
    sent, failed = 0, None
    block = b"\xab" * MiB
    with trio.fail_after(STEP_LIMIT):
        for _ in range(64):                            # bounded: 64 MiB at most
            held.append(max((len(b) for m in _muxers(victim)
                             for b in m.stream_buffers.values()), default=0))
            try:
                await s.send_all(block)
            except TransportError as exc:
                failed = exc
                break
            sent += MiB
            await trio.sleep(0)                        # let the victim's reader run
        # the victim drops the connection; the attacker notices on its next write or read
        while not failed:
            try:
                await s.send_all(block)
                await trio.sleep(0.01)                 # pace of the bounded poll
            except TransportError as exc:
                failed = exc
    assert yamux_guard.counters["window violations"] == before + 1
    # py-libp2p grows a window up to 16 MiB (MAX_WINDOW_SIZE) by itself; never more
    limit = MAX_WINDOW_SIZE + SLACK
    assert max(held) <= limit, (max(held), limit)
    assert sent < 64 * MiB

    # the victim is up and serves an honest peer at once
    with trio.fail_after(STEP_LIMIT):
        e = await honest.open_stream(victim.peer_id, victim.addr, ECHO)
        await e.send_all(b"hello")
        got = b""
        while len(got) < 5:
            got += await e.receive_some(5 - len(got))
    assert got == b"hello"


async def test_honest_bulk_transfer_never_trips_the_guard(nursery):
    """64 MiB from a fast writer to a slow reader, windows respected: no violation."""
    a, b = P2PTransport(), P2PTransport()
    got = []

    async def slow_reader(stream, peer):
        n = 0
        while True:
            data = await stream.receive_some(1 << 16)
            if not data:
                break
            n += len(data)
            if n % (4 * MiB) < len(data):
                await trio.sleep(0.01)                 # a slow consumer, now and then
        got.append(n)
        await stream.aclose()

    b.set_handler(SINK, slow_reader)
    for t in (a, b):
        await start_transport(nursery, t)
    before = yamux_guard.counters["window violations"]
    with trio.fail_after(STEP_LIMIT * 3):
        s = await a.open_stream(b.peer_id, b.addr, SINK)
        for _ in range(64):
            await s.send_all(b"\xcd" * MiB)
        await s.aclose()
        while not got:
            await trio.sleep(0.01)                     # bounded by fail_after
    assert got == [64 * MiB]
    assert yamux_guard.counters["window violations"] == before
