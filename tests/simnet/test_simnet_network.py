"""simnet's network model (simnet/network.py) and churn driver (simnet/churn.py),
on the in-memory transport under virtual time."""
import hashlib
import random
import time

import pytest
import trio
import trio.testing
from conftest import echo, read_exactly

from hypersdk.node.net.transport import TransportError
from hypersdk.simnet.churn import churn
from hypersdk.simnet.network import DEFAULT_RTT, MIN_RTO, REGIONS, NetworkModel
from hypersdk.simnet.transport import SimNetwork, seed_scheduler

ECHO, SINK, REQ = "/test/echo/1", "/test/sink/1", "/test/req/1"
MBIT, GBIT = 1e6 / 8, 1e9 / 8           # bytes/s
FRAME = 64 * 1024


def pid(i: int) -> bytes:
    return i.to_bytes(32, "big")


def addr(i: int) -> str:
    return f"/ip4/10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/tcp/4001"


async def start_net(nursery, model, regions):
    """A network with node i in regions[i], every node echoing."""
    net = SimNetwork(model)
    await nursery.start(net.run)
    nodes = []
    for i, region in enumerate(regions):
        model.set_region(addr(i), region)
        t = net.add_node(pid(i), addr(i))
        t.set_handler(ECHO, echo)
        nodes.append(t)
    return net, nodes


async def ping(a, b, payload=b"ping"):
    s = await a.open_stream(b.peer_id, b.addr, ECHO)
    t0 = trio.current_time()
    await s.send_all(payload)
    got = await read_exactly(s, len(payload))
    elapsed = trio.current_time() - t0
    await s.aclose()
    return elapsed, got


# -- latency ---------------------------------------------------------------

async def test_rtt_between_regions_matches_matrix(nursery, autojump_clock):
    model = NetworkModel(rng=random.Random(1))
    net, nodes = await start_net(nursery, model, REGIONS + REGIONS)
    for i, ra in enumerate(REGIONS):
        for j, rb in enumerate(REGIONS):
            b = nodes[len(REGIONS) + j]            # a second node, also for ra == rb
            elapsed, _ = await ping(nodes[i], b)
            want = DEFAULT_RTT.get((ra, rb)) or DEFAULT_RTT[rb, ra]
            assert elapsed == pytest.approx(want), (ra, rb)
    assert net.handler_errors == []


async def test_rtt_matrix_must_be_complete():
    with pytest.raises(ValueError):
        NetworkModel({("a", "a"): 0.01, ("a", "b"): 0.1}, rng=random.Random(1))
    m = NetworkModel({("a", "a"): 0.01, ("b", "b"): 0.02, ("a", "b"): 0.1},
                     rng=random.Random(1), regions={"x": "a", "y": "b"})
    assert m.rtt("x", "y") == m.rtt("y", "x") == 0.1
    with pytest.raises(ValueError):
        m.set_region("z", "mars")


async def test_jitter_adds_bounded_random_delay(nursery, autojump_clock):
    model = NetworkModel(rng=random.Random(2), jitter=0.02)
    _, (a, b) = await start_net(nursery, model, ["na-east", "eu-west"])
    times = [(await ping(a, b))[0] for _ in range(50)]
    assert all(0.080 <= t <= 0.080 + 2 * 0.02 + 1e-9 for t in times)
    assert len({round(t, 9) for t in times}) > 40


# -- bandwidth -------------------------------------------------------------

def sink(done: dict, n: int):
    """A handler that records when the n-th byte from each peer has arrived."""
    async def handler(stream, peer_id):
        got = 0
        while data := await stream.receive_some(FRAME):
            got += len(data)
            if got == n:
                done[peer_id] = trio.current_time()
    return handler


async def send_framed(stream, n):
    for off in range(0, n, FRAME):
        await stream.send_all(bytes(min(FRAME, n - off)))


async def test_uplink_serializes_transfer(nursery, autojump_clock):
    n = 10_000_000
    model = NetworkModel(rng=random.Random(3), downlink=1 * GBIT)
    _, (a, b) = await start_net(nursery, model, ["eu-west", "eu-west"])
    model.set_bandwidth(a.addr, up=100 * MBIT)
    done = {}
    b.set_handler(SINK, sink(done, n))
    s = await a.open_stream(b.peer_id, b.addr, SINK)
    t0 = trio.current_time()
    await send_framed(s, n)
    await s.aclose()
    await trio.sleep(5)
    assert done[a.peer_id] - t0 == pytest.approx(n * 8 / 1e8 + 0.005)


async def test_concurrent_senders_share_a_downlink(nursery, autojump_clock):
    n = 10_000_000
    model = NetworkModel(rng=random.Random(4))          # uplinks unlimited
    _, (a, b, c) = await start_net(nursery, model, ["eu-west"] * 3)
    model.set_bandwidth(c.addr, down=1 * GBIT)
    done = {}
    c.set_handler(SINK, sink(done, n))
    t0 = trio.current_time()

    async def send(x):
        s = await x.open_stream(c.peer_id, c.addr, SINK)
        await send_framed(s, n)
        await s.aclose()

    async with trio.open_nursery() as senders:
        senders.start_soon(send, a)
        senders.start_soon(send, b)
    await trio.sleep(5)
    shared = 2 * n * 8 / 1e9                            # 0.16 s for both together
    finish = sorted(t - t0 for t in done.values())
    assert len(finish) == 2
    assert finish[1] == pytest.approx(0.005 + shared)
    assert finish[0] > 0.005 + 0.9 * shared             # neither had the link alone


async def test_downlink_serves_bytes_in_arrival_order(nursery, autojump_clock):
    """A far sender's reservation does not hold up a near sender whose bytes
    reach the downlink first (slots fill gaps, not the end of a queue)."""
    n = 1_000_000
    model = NetworkModel(rng=random.Random(5))
    _, (far, near, dst) = await start_net(nursery, model, ["ap-east", "na-east", "na-east"])
    model.set_bandwidth(dst.addr, down=1 * GBIT)
    done = {}
    dst.set_handler(SINK, sink(done, n))
    s_far = await far.open_stream(dst.peer_id, dst.addr, SINK)
    s_near = await near.open_stream(dst.peer_id, dst.addr, SINK)
    t0 = trio.current_time()
    await s_far.send_all(bytes(n))
    await s_near.send_all(bytes(n))
    await trio.sleep(5)
    assert done[near.peer_id] - t0 == pytest.approx(0.005 + n * 8 / 1e9)
    assert done[far.peer_id] - t0 == pytest.approx(0.100 + n * 8 / 1e9)


# -- partitions ------------------------------------------------------------

async def test_partition_blocks_then_heals(nursery, autojump_clock):
    model = NetworkModel(rng=random.Random(6))
    _, (a, b, c) = await start_net(nursery, model, ["eu-west"] * 3)
    before = await a.open_stream(b.peer_id, b.addr, ECHO)
    model.partition([{a.addr}, {b.addr}])
    with pytest.raises(TransportError):
        await a.open_stream(b.peer_id, b.addr, ECHO)
    with pytest.raises(TransportError):
        await b.open_stream(a.peer_id, a.addr, ECHO)
    with pytest.raises(TransportError):                 # an open stream breaks too
        await before.send_all(b"x")
    assert (await ping(a, c))[1] == b"ping"              # c is in no group
    assert (await ping(b, c))[1] == b"ping"
    model.heal()
    assert (await ping(a, b))[1] == b"ping"


# -- faults ----------------------------------------------------------------

async def test_fault_drop_makes_node_unreachable(nursery, autojump_clock):
    model = NetworkModel(rng=random.Random(7))
    net, (a, b, c) = await start_net(nursery, model, ["eu-west"] * 3)
    seen = []

    async def recorder(stream, peer_id):
        try:
            await stream.receive_some(10)
        except TransportError as exc:
            seen.append(exc)

    b.set_handler(SINK, recorder)
    open_ = await a.open_stream(b.peer_id, b.addr, SINK)
    model.set_fault(b.addr, "drop")
    t0 = trio.current_time()
    with pytest.raises(TransportError):
        await a.open_stream(b.peer_id, b.addr, ECHO)
    assert trio.current_time() - t0 == pytest.approx(0.010)    # no route: one RTT
    with pytest.raises(TransportError):
        await b.open_stream(c.peer_id, c.addr, ECHO)             # both directions
    with pytest.raises(TransportError):
        await open_.send_all(b"lost")                             # lost: stream breaks
    await trio.sleep(1)
    assert len(seen) == 1                                          # the far end sees it
    model.clear_fault(b.addr)
    assert (await ping(a, b))[1] == b"ping"


async def test_dial_timeout_makes_unreachable_silent(nursery, autojump_clock):
    model = NetworkModel(rng=random.Random(7), dial_timeout=10.0)
    _, (a, b) = await start_net(nursery, model, ["eu-west"] * 2)
    model.set_fault(b.addr, "drop")
    t0 = trio.current_time()
    with pytest.raises(TransportError):
        await a.open_stream(b.peer_id, b.addr, ECHO)
    assert trio.current_time() - t0 == pytest.approx(10.0)
    t0 = trio.current_time()
    with pytest.raises(TransportError):                       # nobody at that address
        await a.open_stream(pid(99), addr(99), ECHO)
    assert trio.current_time() - t0 == pytest.approx(10.0)


async def test_fault_delay_adds_seconds_each_way(nursery, autojump_clock):
    model = NetworkModel(rng=random.Random(8))
    _, (a, b) = await start_net(nursery, model, ["na-east", "eu-west"])
    model.set_fault(b.addr, "delay", seconds=0.5)
    assert (await ping(a, b))[0] == pytest.approx(0.080 + 2 * 0.5)
    assert (await ping(b, a))[0] == pytest.approx(0.080 + 2 * 0.5)
    model.clear_fault(b.addr, "delay")
    assert (await ping(a, b))[0] == pytest.approx(0.080)


async def test_fault_hang_never_delivers(nursery, autojump_clock):
    model = NetworkModel(rng=random.Random(9))
    _, (a, b) = await start_net(nursery, model, ["eu-west"] * 2)
    received = []

    async def recorder(stream, peer_id):
        received.append(await stream.receive_some(10))

    b.set_handler(SINK, recorder)
    model.set_fault(b.addr, "hang")
    s = await a.open_stream(b.peer_id, b.addr, ECHO)          # connections open...
    await s.send_all(b"ping")
    with trio.move_on_after(30) as scope:                      # ...nothing comes back
        await s.receive_some(10)
    assert scope.cancelled_caught
    s2 = await a.open_stream(b.peer_id, b.addr, SINK)
    await s2.send_all(b"hello")
    await s2.aclose()
    await trio.sleep(60)
    assert received == []                                       # b never got it either
    model.clear_fault(b.addr, "hang")
    assert (await ping(a, b))[1] == b"ping"                     # new streams work


async def test_fault_corrupt_flips_what_the_node_sends(nursery, autojump_clock):
    model = NetworkModel(rng=random.Random(10))
    _, (a, b) = await start_net(nursery, model, ["eu-west"] * 2)
    got_at_b = []

    async def check_and_echo(stream, peer_id):
        data = await read_exactly(stream, 1000)
        got_at_b.append(data)
        await stream.send_all(data)

    b.set_handler(SINK, check_and_echo)
    model.set_fault(b.addr, "corrupt", flips=3)
    payload = bytes(range(250)) * 4
    s = await a.open_stream(b.peer_id, b.addr, SINK)
    await s.send_all(payload)
    back = await read_exactly(s, 1000)
    assert got_at_b == [payload]                       # what b receives is intact
    assert len(back) == len(payload)
    assert sum(x != y for x, y in zip(back, payload)) == 3
    model.clear_fault(b.addr)
    assert (await ping(a, b, payload))[1] == payload


async def test_fault_malicious_is_a_flag(nursery, autojump_clock):
    model = NetworkModel(rng=random.Random(11))
    _, (a, b) = await start_net(nursery, model, ["eu-west"] * 2)
    model.set_fault(b.addr, "malicious", strategy="far-peers")
    assert model.is_malicious(b.addr) and not model.is_malicious(a.addr)
    assert model.faults(b.addr) == {"malicious": {"strategy": "far-peers"}}
    assert (await ping(a, b))[1] == b"ping"            # the wire is unaffected
    model.clear_fault(b.addr)
    assert not model.is_malicious(b.addr)


def test_fault_arguments_are_checked():
    model = NetworkModel(rng=random.Random(12))
    with pytest.raises(ValueError):
        model.set_fault("x", "explode")
    with pytest.raises(TypeError):
        model.set_fault("x", "delay")                   # seconds is required
    with pytest.raises(TypeError):
        model.set_fault("x", "drop", seconds=1)
    model.set_fault("x", "corrupt")
    assert model.faults("x") == {"corrupt": {"rate": 1.0, "flips": 1}}


# -- loss ------------------------------------------------------------------

async def test_loss_costs_retransmission_timeouts(nursery, autojump_clock):
    model = NetworkModel(rng=random.Random(13))
    _, (a, b) = await start_net(nursery, model, ["na-east", "eu-west"])
    model.set_loss(a.addr, b.addr, 0.3)
    rtt, rto = 0.080, 0.080 + MIN_RTO
    # one way: 0, 1, 2... losses cost rto, rto+2rto, ...: (2^k - 1) * rto
    one_way = [(2 ** k - 1) * rto for k in range(7)]      # at most 6 retries
    allowed = sorted({x + y for x in one_way for y in one_way})
    times = [(await ping(a, b))[0] - rtt for _ in range(200)]
    for t in times:
        assert min(abs(t - x) for x in allowed) < 1e-9, t
    clean = sum(t < 1e-9 for t in times)
    assert 0.35 * 200 < clean < 0.65 * 200              # (1 - 0.3)^2 = 0.49


async def test_total_loss_breaks_the_connection(nursery, autojump_clock):
    model = NetworkModel(rng=random.Random(14), loss=1.0)
    _, (a, b) = await start_net(nursery, model, ["eu-west"] * 2)
    s = await a.open_stream(b.peer_id, b.addr, ECHO)
    with pytest.raises(TransportError):
        await s.send_all(b"x")
    with pytest.raises(TransportError):
        await s.receive_some(10)


async def test_remove_node_resets_its_streams(nursery, autojump_clock):
    model = NetworkModel(rng=random.Random(15))
    net, (a, b) = await start_net(nursery, model, ["eu-west"] * 2)
    s = await a.open_stream(b.peer_id, b.addr, ECHO)
    net.remove_node(b.addr)
    with pytest.raises(TransportError):
        await s.receive_some(10)
    assert net.handler_errors == []


# -- churn -----------------------------------------------------------------

async def run_churn(nursery, seed, *, nodes=20, rate=60.0, hours=100.0):
    model = NetworkModel(rng=random.Random(seed))
    net, _ = await start_net(nursery, model, [REGIONS[i % 5] for i in range(nodes)])
    rng = random.Random(seed)
    counter = iter(range(nodes, 1 << 30))
    retired = []

    def spawn():
        i = next(counter)
        model.set_region(addr(i), rng.choice(REGIONS))
        net.add_node(pid(i), addr(i)).set_handler(ECHO, echo)

    async def retire(a):
        assert a in net.nodes
        retired.append(a)
        await trio.sleep(0)

    events = await churn(net, rate_per_hour=rate, rng=rng, spawn=spawn,
                         retire=retire, duration=hours * 3600)
    return net, events, retired


async def test_churn_replaces_nodes_at_the_configured_rate(nursery, autojump_clock):
    t0 = trio.current_time()
    net, events, retired = await run_churn(nursery, seed=16)
    assert trio.current_time() - t0 == pytest.approx(100 * 3600)
    leaves = [e for e in events if e.kind == "leave"]
    joins = [e for e in events if e.kind == "join"]
    assert len(leaves) == len(joins)
    assert abs(len(leaves) - 6000) < 0.05 * 6000           # 60/h over 100 h
    assert [e.addr for e in leaves] == retired
    assert len(net.nodes) == 20
    assert all(e.addr not in net.nodes for e in leaves)
    assert set(net.nodes) <= {e.addr for e in joins} | {addr(i) for i in range(20)}
    gaps = [b.time - a.time for a, b in zip(leaves, leaves[1:])]
    assert sum(gaps) / len(gaps) == pytest.approx(60, rel=0.05)


async def test_churn_is_deterministic_for_a_seed(nursery, autojump_clock):
    _, first, _ = await run_churn(nursery, seed=17, hours=5)
    _, again, _ = await run_churn(nursery, seed=17, hours=5)
    _, other, _ = await run_churn(nursery, seed=18, hours=5)
    rel = lambda evs: [(round(e.time - evs[0].time, 6), e.kind, e.addr) for e in evs]
    assert rel(first) == rel(again)
    assert rel(first) != rel(other)


# -- determinism of a whole run --------------------------------------------

def scenario(seed: int) -> list:
    """A busy little network: jitter, loss, bandwidth, a corrupting node and
    100 concurrent clients. Returns every request's (time, src, dst, digest)."""
    seed_scheduler(seed)
    log = []

    async def main():
        rng = random.Random(seed)
        model = NetworkModel(rng=random.Random(rng.random()), jitter=0.01, loss=0.01,
                             uplink=100 * MBIT, downlink=1 * GBIT)
        async with trio.open_nursery() as nursery:
            net, nodes = await start_net(nursery, model, [rng.choice(REGIONS) for _ in range(30)])
            model.set_fault(nodes[3].addr, "corrupt", rate=0.5)

            async def client(c, crng):
                for _ in range(10):
                    b = crng.choice(nodes)
                    payload = crng.randbytes(crng.randrange(1, 200_000))
                    try:
                        _, got = await ping(nodes[c], b, payload)
                    except TransportError:
                        got = b"lost"
                    log.append((trio.current_time(), c, b.addr,
                                hashlib.blake2b(got, digest_size=8).hexdigest()))

            async with trio.open_nursery() as clients:
                for c in range(100):
                    clients.start_soon(client, c % 30, random.Random(rng.random()))
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return log


def test_same_seed_same_event_sequence():
    first = scenario(42)
    assert len(first) == 1000
    assert first == scenario(42)
    assert first != scenario(43)


# -- scale -----------------------------------------------------------------

async def test_scale_smoke_5000_nodes_20000_streams(nursery, autojump_clock):
    wall0 = time.perf_counter()
    rng = random.Random(19)
    model = NetworkModel(rng=random.Random(20), jitter=0.005,
                         uplink=100 * MBIT, downlink=1 * GBIT)
    net = SimNetwork(model)
    await nursery.start(net.run)

    async def serve(stream, peer_id):
        req = await stream.receive_some(256)
        await stream.send_all(req * 4)

    nodes = []
    for i in range(5000):
        model.set_region(addr(i), REGIONS[i % 5])
        t = net.add_node(pid(i), addr(i))
        t.set_handler(REQ, serve)
        nodes.append(t)
    done = 0

    async def client(crng):
        nonlocal done
        for _ in range(100):
            a, b = crng.choice(nodes), crng.choice(nodes)
            s = await a.open_stream(b.peer_id, b.addr, REQ)
            await s.send_all(b"req-%05d" % done)
            assert len(await read_exactly(s, 36)) == 36
            await s.aclose()
            done += 1

    async with trio.open_nursery() as clients:
        for _ in range(200):
            clients.start_soon(client, random.Random(rng.random()))
    wall = time.perf_counter() - wall0
    assert done == 20_000
    assert net.handler_errors == []
    print(f"\nscale smoke: 5000 nodes, 20000 streams, {trio.current_time():.1f} s "
          f"virtual, {wall:.2f} s wall")


# -- the fast request path (SimNetwork(fast_rpc=True)) -----------------------------

async def start_rpc_net(nursery, model, regions):
    net = SimNetwork(model, fast_rpc=True)
    await nursery.start(net.run)
    nodes = []
    for i, region in enumerate(regions):
        model.set_region(addr(i), region)
        t = net.add_node(pid(i), addr(i))
        t.set_rpc_handler(REQ, lambda data, peer: b"re:" + data)
        nodes.append(t)
    return net, nodes


async def test_rpc_takes_one_round_trip_and_reports_failures_like_streams(nursery,
                                                                          autojump_clock):
    model = NetworkModel(rng=random.Random(1))
    net, (a, b, c) = await start_rpc_net(nursery, model, ["na-east", "ap-east", "eu-west"])
    assert a.rpc_enabled and not SimNetwork(model).fast_rpc
    t0 = trio.current_time()
    assert await a.rpc(b.peer_id, b.addr, REQ, b"x") == b"re:x"
    assert trio.current_time() - t0 == pytest.approx(DEFAULT_RTT["na-east", "ap-east"])
    with pytest.raises(TransportError):                     # nobody speaks it
        await a.rpc(b.peer_id, b.addr, "/other/1", b"x")
    with pytest.raises(TransportError):                     # wrong peer id at that address
        await a.rpc(pid(9), b.addr, REQ, b"x")
    b.set_rpc_handler(REQ, lambda data, peer: None)         # closes without a reply
    with pytest.raises(TransportError):
        await a.rpc(b.peer_id, b.addr, REQ, b"x")
    model.set_fault(c.addr, "hang")                         # never answers: callers time out
    with trio.move_on_after(30) as scope:
        await a.rpc(c.peer_id, c.addr, REQ, b"x")
    assert scope.cancelled_caught
    model.clear_fault(c.addr)
    model.set_fault(c.addr, "drop")
    with pytest.raises(TransportError):
        await a.rpc(c.peer_id, c.addr, REQ, b"x")
    model.clear_fault(c.addr)
    model.set_fault(c.addr, "corrupt", flips=1)             # what c sends is corrupted
    assert await a.rpc(c.peer_id, c.addr, REQ, b"abc") != b"re:abc"


async def test_rpc_fails_when_the_peer_leaves_while_the_request_is_out(nursery,
                                                                       autojump_clock):
    model = NetworkModel(rng=random.Random(1))
    net, (a, b) = await start_rpc_net(nursery, model, ["na-east", "ap-east"])
    got = []

    async def ask():
        try:
            got.append(await a.rpc(b.peer_id, b.addr, REQ, b"x"))
        except TransportError as exc:
            got.append(exc)

    async with trio.open_nursery() as n:
        n.start_soon(ask)
        await trio.sleep(DEFAULT_RTT["na-east", "ap-east"] / 4)
        net.remove_node(b.addr)
    assert len(got) == 1 and isinstance(got[0], TransportError)
