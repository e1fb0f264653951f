"""Transport conformance: one suite, run on every Transport implementation.

`kind` is "sim" (simnet's in-memory network on trio's MockClock with
autojump) or "p2p" (two py-libp2p P2PTransports on 127.0.0.1, real clock).
Every conformance test takes the `clock` fixture: pytest-trio only picks a
Clock out of a test's *own* arguments, and `clock` is MockClock(autojump) for
"sim" and None (the real clock) for "p2p". Waits are bounded with
trio.fail_after(STEP_LIMIT) (virtual seconds on sim); no test sleeps to
synchronise.

Where the two transports legitimately differ, the conformance test accepts
both outcomes and the exact behaviour is pinned in the transport's own
section (sim below, p2p in tests/test_p2p_transport.py):
- a handler that raises: simnet closes the stream (the opener reads EOF),
  libp2p resets it (the opener gets TransportError).
"""
from __future__ import annotations

import hashlib
import random

import pytest
import trio
import trio.testing
from conftest import echo, read_exactly
from p2p_helpers import STEP_LIMIT, start_transport, unreachable_peer

from hypersdk.node.net.p2p_transport import P2PTransport
from hypersdk.node.net.transport import TransportError
from hypersdk.simnet.transport import LinkModel, SimNetwork

ECHO = "/test/echo/1"
WHOAMI = "/test/whoami/1"
GREET = "/test/greet/1"
SINK = "/test/sink/1"
MiB = 1 << 20


async def whoami(stream, peer_id):
    """Tells the opener which node id the transport authenticated it as."""
    await stream.send_all(peer_id)


async def greet(stream, peer_id):
    """Sends a fixed reply and closes: the opener reads it, then EOF."""
    await stream.send_all(b"hello")


class Pair:
    """Two transports: `a` opens streams, `b` serves ECHO, WHOAMI, GREET."""

    def __init__(self, kind, a, b, errors, kill_b):
        self.kind, self.a, self.b = kind, a, b
        self._errors, self._kill_b = errors, kill_b

    @property
    def handler_errors(self) -> list:
        return self._errors()

    async def kill_b(self) -> None:
        """b leaves the network: its streams break, it cannot be reached."""
        await self._kill_b()

    def unreachable(self) -> tuple[bytes, str]:
        """(peer_id, addr) of a peer that is well formed but not there."""
        if self.kind == "sim":
            return b"c" * 32, "/ip4/10.0.0.3/tcp/1"
        return unreachable_peer()


@pytest.fixture(params=["sim", "p2p"])
def kind(request):
    return request.param


@pytest.fixture
def clock(kind):
    return trio.testing.MockClock(autojump_threshold=0) if kind == "sim" else None


@pytest.fixture
async def pair(kind, nursery):
    if kind == "sim":
        net = SimNetwork(LinkModel(delay=0.05))
        await nursery.start(net.run)
        a = net.add_node(b"a" * 32, "/ip4/10.0.0.1/tcp/1")
        b = net.add_node(b"b" * 32, "/ip4/10.0.0.2/tcp/1")

        async def kill_b():
            net.remove_node(b.addr)
            await trio.lowlevel.checkpoint()

        p = Pair(kind, a, b, lambda: net.handler_errors, kill_b)
    else:
        a = (await start_transport(nursery)).transport
        running_b = await start_transport(nursery)
        b = running_b.transport
        p = Pair(kind, a, b, lambda: b.handler_errors, running_b.stop)
    for proto, handler in ((ECHO, echo), (WHOAMI, whoami), (GREET, greet)):
        p.b.set_handler(proto, handler)
    return p


async def ended(stream) -> bool:
    """True once the stream has ended, cleanly (EOF) or not (TransportError)."""
    try:
        return await stream.receive_some(1024) == b""
    except TransportError:
        return True


# ---------------------------------------------------------------- conformance

async def test_round_trip_bytes_in_order(pair, clock):
    a, b = pair.a, pair.b
    with trio.fail_after(STEP_LIMIT):
        s = await a.open_stream(b.peer_id, b.addr, ECHO)
        msgs = [bytes([i]) * (i * 100 + 1) for i in range(20)]
        for m in msgs:
            await s.send_all(m)
        assert await read_exactly(s, sum(map(len, msgs))) == b"".join(msgs)
        await s.aclose()
    assert pair.handler_errors == []


async def test_eof_after_peer_closes_and_again_after(pair, clock):
    a, b = pair.a, pair.b
    with trio.fail_after(STEP_LIMIT):
        s = await a.open_stream(b.peer_id, b.addr, GREET)
        assert await read_exactly(s, 5) == b"hello"
        assert await s.receive_some(10) == b""
        assert await s.receive_some(10) == b""            # EOF is sticky
        await s.send_all(b"late")                         # half-closed: we may still send
        await s.aclose()


async def test_handler_sees_eof_when_opener_closes(pair, clock):
    a, b = pair.a, pair.b
    got = []
    done = trio.Event()

    async def sink(stream, peer_id):
        total = 0
        while data := await stream.receive_some(65536):
            total += len(data)
        got.append(total)
        done.set()

    b.set_handler(SINK, sink)
    with trio.fail_after(STEP_LIMIT):
        s = await a.open_stream(b.peer_id, b.addr, SINK)
        await s.send_all(b"x" * 100_000)
        await s.aclose()
        await done.wait()
    assert got == [100_000]


async def test_closed_stream_refuses_use(pair, clock):
    a, b = pair.a, pair.b
    with trio.fail_after(STEP_LIMIT):
        s = await a.open_stream(b.peer_id, b.addr, ECHO)
        await s.send_all(b"")                             # no-op, not an EOF
        await s.send_all(b"ab")
        assert await read_exactly(s, 2) == b"ab"
        await s.aclose()
        await s.aclose()                                  # idempotent
        with pytest.raises(trio.ClosedResourceError):
            await s.send_all(b"x")
        with pytest.raises(trio.ClosedResourceError):
            await s.receive_some(10)


async def test_receive_some_respects_max_bytes(pair, clock):
    a, b = pair.a, pair.b
    with trio.fail_after(STEP_LIMIT):
        s = await a.open_stream(b.peer_id, b.addr, ECHO)
        await s.send_all(b"x" * 1000)
        first = await s.receive_some(10)
        assert 1 <= len(first) <= 10 and set(first) == {ord("x")}
        assert await read_exactly(s, 1000 - len(first)) == b"x" * (1000 - len(first))
        await s.aclose()


async def test_large_transfer_intact(pair, clock):
    """8 MiB through the echo, sent and read concurrently (a yamux writer whose
    reader stalls > 5 s fails, so a stream's two directions must both drain)."""
    a, b = pair.a, pair.b
    payload = random.Random(8).randbytes(8 * MiB)
    received = hashlib.blake2b()

    async def send(s):
        for i in range(0, len(payload), 256 * 1024):
            await s.send_all(payload[i:i + 256 * 1024])

    with trio.fail_after(4 * STEP_LIMIT):
        s = await a.open_stream(b.peer_id, b.addr, ECHO)
        async with trio.open_nursery() as n:
            n.start_soon(send, s)
            left = len(payload)
            while left:
                data = await s.receive_some(min(left, 1 << 18))
                assert data, "unexpected EOF"
                received.update(data)
                left -= len(data)
        await s.aclose()
    assert received.digest() == hashlib.blake2b(payload).digest()
    assert pair.handler_errors == []


async def test_many_concurrent_streams(pair, clock):
    a, b = pair.a, pair.b
    results = {}

    async def one(i):
        s = await a.open_stream(b.peer_id, b.addr, ECHO)
        msg = i.to_bytes(4, "big") * (1000 + i)
        await s.send_all(msg)
        results[i] = await read_exactly(s, len(msg)) == msg
        await s.aclose()

    with trio.fail_after(STEP_LIMIT):
        async with trio.open_nursery() as n:
            for i in range(64):
                n.start_soon(one, i)
    assert results == {i: True for i in range(64)}
    assert pair.handler_errors == []


async def test_handler_gets_authenticated_opener_id(pair, clock):
    a, b = pair.a, pair.b
    with trio.fail_after(STEP_LIMIT):
        s = await a.open_stream(b.peer_id, b.addr, WHOAMI)
        assert await read_exactly(s, 32) == a.peer_id
        assert await s.receive_some(10) == b""
        await s.aclose()


async def test_unknown_protocol_raises(pair, clock):
    a, b = pair.a, pair.b
    with trio.fail_after(STEP_LIMIT):
        with pytest.raises(TransportError):
            await a.open_stream(b.peer_id, b.addr, "/unknown/1")
        s = await a.open_stream(b.peer_id, b.addr, ECHO)    # the peer is fine
        await s.send_all(b"ok")
        assert await read_exactly(s, 2) == b"ok"
        await s.aclose()


async def test_unreachable_peer_raises(pair, clock):
    peer_id, addr = pair.unreachable()
    with trio.fail_after(STEP_LIMIT):
        with pytest.raises(TransportError):
            await pair.a.open_stream(peer_id, addr, ECHO)


async def test_peer_id_mismatch_raises(pair, clock):
    a, b = pair.a, pair.b
    with trio.fail_after(STEP_LIMIT):
        with pytest.raises(TransportError):
            await a.open_stream(b"z" * 32, b.addr, ECHO)         # not who lives there
        with pytest.raises(TransportError):
            await a.open_stream(a.peer_id, b.addr, ECHO)
        s = await a.open_stream(b.peer_id, b.addr, ECHO)        # the right id works
        await s.send_all(b"ok")
        assert await read_exactly(s, 2) == b"ok"
        await s.aclose()


async def test_peer_leaving_breaks_streams_and_dials(pair, clock):
    a, b = pair.a, pair.b
    with trio.fail_after(STEP_LIMIT):
        s = await a.open_stream(b.peer_id, b.addr, ECHO)
        await s.send_all(b"hi")
        assert await read_exactly(s, 2) == b"hi"
        async with trio.open_nursery() as n:
            async def reader():
                with pytest.raises(TransportError):
                    await s.receive_some(10)              # blocked when b leaves
            n.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            await pair.kill_b()
        with pytest.raises(TransportError):
            await a.open_stream(b.peer_id, b.addr, ECHO)


async def test_handler_exception_is_contained(pair, clock):
    a, b = pair.a, pair.b

    async def broken(stream, peer_id):
        await stream.receive_some(10)
        raise ValueError("bug")

    b.set_handler(ECHO, broken)
    with trio.fail_after(STEP_LIMIT):
        s = await a.open_stream(b.peer_id, b.addr, ECHO)
        await s.send_all(b"hi")
        assert await ended(s)                             # the stream ends...
        assert [type(e) for e in pair.handler_errors] == [ValueError]
        b.set_handler(ECHO, echo)                         # ...the node lives on
        s = await a.open_stream(b.peer_id, b.addr, ECHO)
        await s.send_all(b"ok")
        assert await read_exactly(s, 2) == b"ok"
        await s.aclose()


async def test_transport_errors_in_handler_are_not_bugs(pair, clock):
    """A handler that dies of TransportError/ClosedResourceError (the peer went
    away, the handler closed its stream) is not recorded as a handler bug."""
    a, b = pair.a, pair.b

    async def closes_then_reads(stream, peer_id):
        await stream.aclose()
        await stream.receive_some(10)                     # ClosedResourceError

    b.set_handler(ECHO, closes_then_reads)
    with trio.fail_after(STEP_LIMIT):
        s = await a.open_stream(b.peer_id, b.addr, ECHO)
        assert await ended(s)
        await s.aclose()
        s = await a.open_stream(b.peer_id, b.addr, WHOAMI)
        assert await read_exactly(s, 32) == a.peer_id
        await s.aclose()
    assert pair.handler_errors == []


# ---------------------------------------------------------------- simnet only

@pytest.fixture
async def sim_pair(nursery):
    net = SimNetwork(LinkModel(delay=0.05))
    await nursery.start(net.run)
    a = net.add_node(b"a" * 32, "/ip4/10.0.0.1/tcp/1")
    b = net.add_node(b"b" * 32, "/ip4/10.0.0.2/tcp/1")
    b.set_handler(ECHO, echo)
    return net, a, b


async def test_sim_latency_is_one_way_delay_each_direction(sim_pair, autojump_clock):
    net, a, b = sim_pair
    s = await a.open_stream(b.peer_id, b.addr, ECHO)
    t0 = trio.current_time()
    await s.send_all(b"ping")
    assert await read_exactly(s, 4) == b"ping"
    assert trio.current_time() - t0 == pytest.approx(0.1)      # one RTT


async def test_sim_unreachable_and_removed_node_raise(sim_pair, autojump_clock):
    net, a, b = sim_pair
    with pytest.raises(TransportError):
        await a.open_stream(b"c" * 32, "/ip4/10.0.0.3/tcp/1", ECHO)
    net.remove_node(b.addr)
    with pytest.raises(TransportError):
        await a.open_stream(b.peer_id, b.addr, ECHO)


async def test_sim_handler_exception_closes_stream_cleanly(sim_pair, autojump_clock):
    net, a, b = sim_pair

    async def broken(stream, peer_id):
        await stream.receive_some(10)
        raise ValueError("bug")

    b.set_handler(ECHO, broken)
    s = await a.open_stream(b.peer_id, b.addr, ECHO)
    await s.send_all(b"hi")
    assert await s.receive_some(10) == b""                  # EOF, not a reset
    assert [type(e) for e in net.handler_errors] == [ValueError]


async def test_sim_receive_some_returns_exactly_max_bytes(sim_pair, autojump_clock):
    _, a, b = sim_pair
    s = await a.open_stream(b.peer_id, b.addr, ECHO)
    await s.send_all(b"x" * 1000)
    assert await s.receive_some(10) == b"x" * 10
    assert await read_exactly(s, 990) == b"x" * 990
