"""Transport conformance, run on every Transport implementation (simnet now;
the libp2p transport joins this list in the networking issue)."""
import pytest
import trio

from node.transport import TransportError
from simnet.transport import LinkModel, SimNetwork
from conftest import echo, read_exactly

ECHO = "/test/echo/1"


@pytest.fixture
async def pair(nursery):
    net = SimNetwork(LinkModel(delay=0.05))
    await nursery.start(net.run)
    a = net.add_node(b"a" * 32, "/ip4/10.0.0.1/tcp/1")
    b = net.add_node(b"b" * 32, "/ip4/10.0.0.2/tcp/1")
    b.set_handler(ECHO, echo)
    return net, a, b


async def test_round_trip_bytes_in_order_and_eof(pair, autojump_clock):
    net, a, b = pair
    s = await a.open_stream(b.peer_id, b.addr, ECHO)
    msgs = [bytes([i]) * (i * 100 + 1) for i in range(20)]
    for m in msgs:
        await s.send_all(m)
    assert await read_exactly(s, sum(map(len, msgs))) == b"".join(msgs)
    await s.aclose()
    assert net.handler_errors == []


async def test_latency_is_one_way_delay_each_direction(pair, autojump_clock):
    net, a, b = pair
    s = await a.open_stream(b.peer_id, b.addr, ECHO)
    t0 = trio.current_time()
    await s.send_all(b"ping")
    assert await read_exactly(s, 4) == b"ping"
    assert trio.current_time() - t0 == pytest.approx(0.1)      # one RTT


async def test_receive_some_respects_max_bytes(pair, autojump_clock):
    _, a, b = pair
    s = await a.open_stream(b.peer_id, b.addr, ECHO)
    await s.send_all(b"x" * 1000)
    first = await s.receive_some(10)
    assert first == b"x" * 10
    assert await read_exactly(s, 990) == b"x" * 990


async def test_unreachable_peer_and_wrong_id_raise(pair, autojump_clock):
    net, a, b = pair
    with pytest.raises(TransportError):
        await a.open_stream(b"c" * 32, "/ip4/10.0.0.3/tcp/1", ECHO)
    with pytest.raises(TransportError):
        await a.open_stream(b"z" * 32, b.addr, ECHO)          # not who lives there
    with pytest.raises(TransportError):
        await a.open_stream(b.peer_id, b.addr, "/unknown/1")
    net.remove_node(b.addr)
    with pytest.raises(TransportError):
        await a.open_stream(b.peer_id, b.addr, ECHO)


async def test_handler_exception_is_contained(nursery, autojump_clock):
    net = SimNetwork()
    await nursery.start(net.run)
    a = net.add_node(b"a" * 32, "/ip4/10.0.0.1/tcp/1")
    b = net.add_node(b"b" * 32, "/ip4/10.0.0.2/tcp/1")

    async def broken(stream, peer_id):
        await stream.receive_some(10)
        raise ValueError("bug")

    b.set_handler(ECHO, broken)
    s = await a.open_stream(b.peer_id, b.addr, ECHO)
    await s.send_all(b"hi")
    assert await s.receive_some(10) == b""                  # the stream ends...
    assert [type(e) for e in net.handler_errors] == [ValueError]
    b.set_handler(ECHO, echo)                                 # ...the node lives on
    s = await a.open_stream(b.peer_id, b.addr, ECHO)
    await s.send_all(b"ok")
    assert await read_exactly(s, 2) == b"ok"
