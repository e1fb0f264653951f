"""node/daemon/daemon.py in-process: two daemons in one trio run on 127.0.0.1, the
control protocol (node/daemon/control.py) from a client thread, join, byte counting,
malformed control input, socket permissions, identity persistence, the node lock.
Real clock; every wait is bounded by trio.fail_after, with a limit for the one
thing it waits for (one daemon starting or stopping, one control request), and
every polling loop is bounded in time and in count (until())."""
from __future__ import annotations

import math
import os
import stat

import pytest
import trio
from conftest import random_image, same_bytes

from hypersdk.node.daemon import control
from hypersdk.node.daemon.daemon import CountingTransport, Daemon, public_addrs
from hypersdk.node.errors import UserError
from hypersdk.node.net.identity import Identity
from hypersdk.node.net.peers import SavedPeers

# Each wait is for one thing (the daemons of a test start one after the other);
# generous for a loaded 2-core machine, a wait ends as soon as its event happens.
START_LIMIT = 30.0       # one daemon: store, libp2p host, DHT, control socket
REQUEST_LIMIT = 30.0     # one control request answered (at most a few-chunk backup)
STOP_LIMIT = 30.0        # one daemon shut down (shielded closes are bounded at 5 s)
LOOP = "/ip4/127.0.0.1/tcp/0"


async def until(cond, limit: float, what: str, interval: float = 0.01) -> None:
    """Poll cond() until true; fail after `limit` seconds or as many attempts as fit."""
    try:
        with trio.fail_after(limit):
            for _ in range(math.ceil(limit / interval) + 1):
                if cond():
                    return
                await trio.sleep(interval)      # the pace of the polling
    except trio.TooSlowError:
        pass
    pytest.fail(f"timed out after {limit:.0f} s waiting for {what}")


class Running:
    def __init__(self, daemon: Daemon):
        self.daemon = daemon
        self.scope = trio.CancelScope()
        self.done = trio.Event()

    async def _run(self, *, task_status=trio.TASK_STATUS_IGNORED):
        try:
            with self.scope:
                await self.daemon.run(task_status=task_status)
        finally:
            self.done.set()

    async def stop(self):
        self.scope.cancel()
        with trio.fail_after(STOP_LIMIT):
            await self.done.wait()


async def start(nursery, data_dir, identity=None, **kw) -> Running:
    identity = identity or Identity.generate()
    r = Running(Daemon(data_dir, identity, listen=LOOP, **kw))
    with trio.fail_after(START_LIMIT):
        await nursery.start(r._run)
    return r


async def ask(data_dir, cmd, args=None, **kw):
    """A control call from a worker thread (the client is blocking, like the CLI)."""
    with trio.fail_after(REQUEST_LIMIT):
        return await trio.to_thread.run_sync(
            lambda: control.call_json(data_dir, cmd, args, timeout=REQUEST_LIMIT, **kw))


async def raw_exchange(path, data: bytes, *, half_close=True) -> bytes:
    """Send raw bytes to the control socket; everything the node sends back."""
    with trio.fail_after(REQUEST_LIMIT):
        s = await trio.open_unix_socket(str(path))
        async with s:
            await s.send_all(data)
            if half_close:
                await s.send_eof()
            out = b""
            while chunk := await s.receive_some(65536):
                out += chunk
            return out


def error_frame(raw: bytes) -> dict:
    from hypersdk.protocol import codec
    n = int.from_bytes(raw[:4], "big")
    assert len(raw) == 4 + n
    doc = codec.decode(raw[4:])
    assert doc["t"] == "error"
    return doc


async def test_status_socket_mode_and_clean_stop(tmp_path):
    data = tmp_path / "a"
    ident = Identity.generate()
    async with trio.open_nursery() as n:
        r = await start(n, data, ident)
        sock = data / "control.sock"
        assert stat.S_ISSOCK(os.stat(sock).st_mode)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        addrs = (data / "node.addrs").read_text().split()
        assert addrs == r.daemon.addrs and addrs[0].endswith(f"/p2p/{ident.libp2p_peer_id}")
        s = await ask(data, "status")
        assert s["peer_id"] == str(ident.libp2p_peer_id)
        assert s["node_id"] == ident.node_id.hex()
        assert s["addrs"] == addrs and s["transfers"] == []
        assert [q["cmd"] for q in s["requests"]] == ["status"]     # itself, in flight
        assert s["dht"]["routing_table"] == 0 and s["store"]["chunks"] == 0
        assert s["bootstrap"]["state"] == "no peers"
        assert s["served"] == {}
        assert (await ask(data, "status"))["served"] == {"status": 1}
        # a second node on the same data dir is refused
        with pytest.raises(UserError, match="already running"):
            await Daemon(data, ident, listen=LOOP).run()
        await r.stop()
    assert not (data / "control.sock").exists() and not (data / "node.addrs").exists()
    with pytest.raises(control.NoNode):
        control.call(data, "status")


async def test_malformed_control_input_does_not_hurt_the_node(tmp_path):
    data = tmp_path / "a"
    async with trio.open_nursery() as n:
        r = await start(n, data)
        sock = data / "control.sock"
        cases = [
            b"\xff\xff\xff\xff",                              # length far over MAX_REQUEST
            b"\x00\x00\x00\x05hello",                         # not msgpack
            b"\x00\x00\x00\x01\xc1",                          # msgpack's never-used byte
            control.frame({"v": 2, "cmd": "status"}),         # unknown version
            control.frame({"v": 1, "cmd": 7}),                # wrong type
            control.frame({"v": 1, "cmd": "status", "x": 1}), # unknown field
            control.frame({"v": 1, "cmd": "rm -rf /"}),       # unknown command
            control.frame([1, 2, 3]),                         # not a map
        ]
        for raw in cases:
            doc = error_frame(await raw_exchange(sock, raw))
            assert doc["exit"] == 2
        assert await raw_exchange(sock, b"\x00\x00") == b""      # truncated: just closed
        assert await raw_exchange(sock, b"") == b""
        with pytest.raises(control.NodeError, match="bad request: `dht find` needs `key`"
                                                    r" \(64 hex digits") as bad:
            await ask(data, "dht find", {"key": "zz"})
        assert bad.value.exit_code == 2
        with pytest.raises(control.NodeError, match="no backup matches"):
            await ask(data, "restore", {"ref": "nope", "out": str(tmp_path / "o"),
                                        "force": False})
        s = await ask(data, "status")                          # still serving
        # a bad request runs nothing: it is neither served nor failed
        assert s["served"] == {} and s["failed"] == {"restore": 1}
        assert r.daemon.control_errors == len(cases) + 1 == s["bad_requests"]
        await r.stop()


async def test_two_daemons_join_peers_and_count_bytes(tmp_path):
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    async with trio.open_nursery() as n:
        a = await start(n, a_dir)
        b = await start(n, b_dir)
        a_addr = a.daemon.addrs[0]
        with pytest.raises(control.NodeError, match="cannot reach"):
            bad = Identity.generate().libp2p_peer_id
            await ask(b_dir, "join", {"addr": f"/ip4/127.0.0.1/tcp/1/p2p/{bad}"})
        j = await ask(b_dir, "join", {"addr": a_addr})
        assert j["node_id"] == a.daemon.identity.node_id.hex()
        assert j["routing_table"] >= 1
        assert SavedPeers(b_dir).load() == [a_addr]
        peers_b = await ask(b_dir, "peers")
        assert [p["node_id"] for p in peers_b] == [j["node_id"]]
        p = peers_b[0]
        assert p["addr"] == a_addr and p["connected"] and p["rtt_ms"] is not None
        assert p["bytes_in"] > 0 and p["bytes_out"] > 0
        peers_a = await ask(a_dir, "peers")                 # A learned B from its requests
        assert [q["node_id"] for q in peers_a] == [b.daemon.identity.node_id.hex()]
        # bytes counted on both sides of the same streams
        key = os.urandom(32).hex()
        assert (await ask(a_dir, "dht provide", {"key": key}))["stored"] >= 1
        f = await ask(b_dir, "dht find", {"key": key})
        assert [x["node_id"] for x in f["providers"]] == [a.daemon.identity.node_id.hex()]
        assert f["hops"] >= 0 and f["latency"] >= 0     # 0: B itself holds A's record
        await b.stop()
        await a.stop()


async def test_store_op_streams_progress_and_serves_from_the_node(tmp_path):
    data = tmp_path / "a"
    src = random_image(tmp_path / "disk.img", 5 * 65536 + 7)
    async with trio.open_nursery() as n:
        r = await start(n, data)
        events = []

        def run():
            return control.call(data, "backup", {"path": str(src), "name": None,
                                                  "chunk_size": 65536, "zstd_level": 2},
                                progress=True, on_event=events.append, timeout=REQUEST_LIMIT)
        with trio.fail_after(REQUEST_LIMIT):
            final = await trio.to_thread.run_sync(run)
        import json
        doc = json.loads(final["doc"])
        assert doc["ref"] == "disk.img@1" and final["exit"] == 0
        assert final["text"].decode().startswith("backup disk.img@1")
        kinds = [e["t"] for e in events]
        assert kinds[0] == "bar" and kinds[-1] == "end" and "adv" in kinds
        assert events[0]["total"] == src.stat().st_size
        assert sum(e["n"] for e in events if e["t"] == "adv") == src.stat().st_size
        out = tmp_path / "out.img"
        rr = await ask(data, "restore", {"ref": "disk.img", "out": str(out), "force": False})
        assert rr["bytes"] == src.stat().st_size and same_bytes(out, src)
        assert (await ask(data, "status"))["served"] == {"backup": 1, "restore": 1}
        await r.stop()


async def test_identity_persists_across_restarts(tmp_path):
    data = tmp_path / "a"
    data.mkdir()
    Identity.generate().save(data / "node.key")
    ids = []
    for _ in range(2):
        async with trio.open_nursery() as n:
            r = await start(n, data, Identity.load(data / "node.key"))
            ids.append((await ask(data, "status"))["peer_id"])
            await r.stop()
    assert ids[0] == ids[1] and ids[0].startswith("12D3KooW")


async def test_counting_transport_counts_both_directions():
    class FakeStream:
        async def send_all(self, data):
            pass

        async def receive_some(self, max_bytes=65536):
            return b"abc"

        async def aclose(self):
            pass

    class FakeTransport:
        peer_id, addr = b"\x01" * 32, "/ip4/127.0.0.1/tcp/1"

        async def open_stream(self, peer_id, addr, protocol):
            return FakeStream()

        def set_handler(self, protocol, handler):
            self.handler = handler

    inner = FakeTransport()
    t = CountingTransport(inner)
    peer = b"\x02" * 32
    s = await t.open_stream(peer, "x", "p")
    await s.send_all(b"12345")
    assert await s.receive_some() == b"abc"
    seen = []

    async def handler(stream, pid):
        seen.append(await stream.receive_some())
        await stream.send_all(b"zz")
    t.set_handler("p", handler)
    await inner.handler(FakeStream(), peer)
    tally = t.tallies[peer]
    assert (tally.bytes_out, tally.bytes_in, tally.streams) == (7, 6, 2)
    assert seen == [b"abc"] and t.peer_id == inner.peer_id


async def test_client_going_away_cancels_a_store_op(tmp_path):
    """Closing the control connection mid-backup stops the backup at its next
    progress step; nothing is recorded and the node keeps serving. The test
    holds the store's write lock so the backup is certainly still running
    when the client leaves."""
    from hypersdk.node.files import flock
    from hypersdk.protocol import codec
    data = tmp_path / "a"
    src = random_image(tmp_path / "disk.img", 4 * 65536)
    async with trio.open_nursery() as n:
        r = await start(n, data)
        with flock(data / "write.lock", exclusive=True):
            with trio.fail_after(REQUEST_LIMIT):
                s = await trio.open_unix_socket(str(data / "control.sock"))
                await s.send_all(control.frame({"v": 1, "cmd": "backup", "progress": True,
                                                "args": {"path": str(src), "name": None,
                                                         "chunk_size": 65536,
                                                         "zstd_level": 1}}))
                got = b""
                while b"wait" not in got:             # blocked on our lock
                    chunk = await s.receive_some(4096)
                    assert chunk, "node closed early"
                    got += chunk
                first = codec.decode(got[4:4 + int.from_bytes(got[:4], "big")])
                assert first["t"] == "bar" and first["total"] == 4 * 65536
                await s.aclose()
            await until(lambda: r.daemon.abandoned, REQUEST_LIMIT, "the node to notice")
        # lock released: the op runs, stops at its next progress step
        await until(lambda: r.daemon.failed, REQUEST_LIMIT, "the backup to stop")
        assert r.daemon.failed == {"backup": 1} and not r.daemon.served
        assert await ask(data, "backups") == []
        await r.stop()


def test_public_addrs():
    pid = "12D3KooWExample"
    assert public_addrs(["/ip4/127.0.0.1/tcp/5/p2p/X"], [], pid) == ["/ip4/127.0.0.1/tcp/5/p2p/X"]
    wild = public_addrs(["/ip4/0.0.0.0/tcp/4001/p2p/X"], [], pid)
    assert not wild[0].startswith("/ip4/0.0.0.0/") and wild[0].endswith("/tcp/4001/p2p/X")
    assert public_addrs(["/ip4/0.0.0.0/tcp/4001/p2p/X"], ["/dns4/a.example/tcp/4001"], pid) \
        == [f"/dns4/a.example/tcp/4001/p2p/{pid}"]


async def test_refuses_bad_setups_with_one_clear_error(tmp_path):
    long_dir = tmp_path / ("d" * 100)
    with pytest.raises(UserError, match="too long for a Unix socket"):
        await Daemon(long_dir, Identity.generate(), listen=LOOP).run()
    assert not long_dir.exists()
    data = tmp_path / "a"
    data.mkdir()
    (data / "peers.json").write_text("{not json")
    with pytest.raises(UserError, match="peers.json is malformed"):
        await Daemon(data, Identity.generate(), listen=LOOP).run()
    assert not (data / "node.addrs").exists() and not (data / "control.sock").exists()


def test_saved_peers_round_trip(tmp_path):
    p = SavedPeers(tmp_path)
    assert p.load() == []
    assert p.add("/ip4/1.2.3.4/tcp/1/p2p/A") and p.add("/ip4/1.2.3.4/tcp/2/p2p/B")
    assert not p.add("/ip4/1.2.3.4/tcp/2/p2p/B")
    assert p.add("/ip4/1.2.3.4/tcp/1/p2p/A")
    assert SavedPeers(tmp_path).load() == ["/ip4/1.2.3.4/tcp/2/p2p/B", "/ip4/1.2.3.4/tcp/1/p2p/A"]
    assert sorted(os.listdir(tmp_path)) == ["peers.json"]


async def test_idle_control_connections_cannot_lock_out_a_request(tmp_path):
    """1,000 connections that never send a request (issue 17, attack 7: a `status`
    behind them failed after 120 s): the node keeps at most MAX_PENDING silent ones,
    closing the oldest, and answers a real request at once."""
    from hypersdk.node.daemon.daemon import MAX_PENDING
    data = tmp_path / "a"
    idle = []
    async with trio.open_nursery() as n:
        r = await start(n, data)
        try:
            with trio.fail_after(REQUEST_LIMIT * 3):
                for _ in range(1000):
                    idle.append(await trio.open_unix_socket(str(data / "control.sock")))
                    await trio.sleep(0)                    # let the node accept it
                s = await ask(data, "status")
            assert s["idle_control_closed"] >= 1000 - MAX_PENDING
            assert len(r.daemon._silent) <= MAX_PENDING
            closed = 0
            with trio.fail_after(REQUEST_LIMIT):            # the oldest were closed: EOF
                for c in idle[:100]:
                    closed += await c.receive_some(1) == b""
            assert closed == 100
        finally:
            for c in idle:
                await c.aclose()
        await r.stop()
