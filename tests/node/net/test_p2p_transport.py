"""py-libp2p specifics of node/net/identity.py and node/net/p2p_transport.py.

The behaviour both transports share is in tests/test_transport.py (the
conformance suite); this file covers the identity key file and what only the
libp2p transport has: multiaddrs with /p2p/ ids, connection reuse, resets,
log hygiene, clean shutdown, and a bulk-transfer smoke test. Real clock,
127.0.0.1 only, every wait bounded by trio.fail_after.
"""
from __future__ import annotations

import hashlib
import os
import stat

import pytest
import trio
import trio.testing
from conftest import echo, read_exactly
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from p2p_helpers import STEP_LIMIT, closed_port, start_transport

from hypersdk.dht.keys import node_id
from hypersdk.node.errors import UserError
from hypersdk.node.net.identity import Identity, IdentityError
from hypersdk.node.net.p2p_transport import P2PTransport
from hypersdk.node.net.transport import TransportError

ECHO = "/test/echo/1"
HASH = "/test/hash/1"
MiB = 1 << 20


# ---------------------------------------------------------------- identity

def test_identity_keys_and_ids():
    ident = Identity.generate()
    assert len(ident.public_key) == 32
    assert ident.node_id == node_id(ident.public_key)
    sig = ident.sign(b"data")
    Ed25519PublicKey.from_public_bytes(ident.public_key).verify(sig, b"data")
    pid = ident.libp2p_peer_id
    assert str(pid).startswith("12D3KooW")
    assert pid.extract_public_key().to_bytes() == ident.public_key
    kp = ident.libp2p_key_pair()
    assert kp.public_key.to_bytes() == ident.public_key
    assert Identity.generate().node_id != ident.node_id


def test_identity_save_load_round_trip(tmp_path):
    path = tmp_path / "node.key"
    ident = Identity.generate()
    ident.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.stat().st_size == 32
    assert os.listdir(tmp_path) == ["node.key"]             # no temp file left behind
    again = Identity.load(path)
    assert again.node_id == ident.node_id
    assert str(again.libp2p_peer_id) == str(ident.libp2p_peer_id)
    assert again.public_key == ident.public_key


def test_identity_save_replaces_and_tightens(tmp_path):
    path = tmp_path / "node.key"
    path.write_bytes(b"old")
    os.chmod(path, 0o644)
    ident = Identity.generate()
    ident.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert Identity.load(path).node_id == ident.node_id


def test_identity_load_or_generate(tmp_path):
    path = tmp_path / "node.key"
    first = Identity.load_or_generate(path)
    assert Identity.load_or_generate(path).node_id == first.node_id


@pytest.mark.parametrize("content, mode, words", [
    (os.urandom(32), 0o644, "accessible by others"),
    (os.urandom(32), 0o640, "accessible by others"),
    (os.urandom(31), 0o600, "31 bytes"),
    (os.urandom(64), 0o600, "64 bytes"),
    (b"", 0o600, "0 bytes"),
    (b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n", 0o600, "bytes"),
])
def test_identity_rejects_bad_key_files(tmp_path, content, mode, words):
    path = tmp_path / "node.key"
    path.write_bytes(content)
    os.chmod(path, mode)
    with pytest.raises(IdentityError, match=words) as info:
        Identity.load(path)
    assert isinstance(info.value, UserError)
    assert str(path) in str(info.value)


def test_identity_rejects_missing_and_non_regular(tmp_path):
    with pytest.raises(IdentityError, match="does not exist"):
        Identity.load(tmp_path / "absent.key")
    (tmp_path / "dir.key").mkdir(mode=0o700)
    with pytest.raises(IdentityError):
        Identity.load(tmp_path / "dir.key")


# ---------------------------------------------------------------- transport

async def hasher(stream, peer_id):
    """Reads an 8-byte length, then that many bytes; replies with their SHA-256."""
    n = int.from_bytes(await read_exactly(stream, 8), "big")
    h = hashlib.sha256()
    while n:
        data = await stream.receive_some(min(n, 1 << 20))
        if not data:
            raise ValueError("short upload")
        h.update(data)
        n -= len(data)
    await stream.send_all(h.digest())


@pytest.fixture
async def ab(nursery):
    a = (await start_transport(nursery)).transport
    b = (await start_transport(nursery)).transport
    b.set_handler(ECHO, echo)
    b.set_handler(HASH, hasher)
    return a, b


async def test_addresses_and_ids(tmp_path, nursery):
    ident = Identity.generate()
    ident.save(tmp_path / "k")
    t = P2PTransport(Identity.load(tmp_path / "k"))
    with pytest.raises(RuntimeError):
        t.addr                                        # not listening yet
    assert t.listen_addrs == []
    with trio.fail_after(STEP_LIMIT):
        await start_transport(nursery, t)
    assert t.peer_id == ident.node_id
    assert str(t.libp2p_peer_id) == str(ident.libp2p_peer_id)
    assert t.addr.startswith("/ip4/127.0.0.1/tcp/")
    assert t.addr.endswith(f"/p2p/{ident.libp2p_peer_id}")
    assert t.addr in t.listen_addrs


async def test_connect_learns_node_id(ab):
    a, b = ab
    with trio.fail_after(STEP_LIMIT):
        assert await a.connect(b.addr) == b.peer_id
        assert await b.connect(a.addr) == a.peer_id       # reuses the same connection
    assert a.connection_count(b.peer_id) == 1
    assert b.connection_count(a.peer_id) == 1


async def test_bad_addresses_raise_transport_error(ab):
    a, b = ab
    no_p2p = b.addr.split("/p2p/")[0]
    with trio.fail_after(STEP_LIMIT):
        for addr in (no_p2p, "not a multiaddr", "/ip4/127.0.0.1/tcp/1/p2p/notanid"):
            with pytest.raises(TransportError):
                await a.connect(addr)
            with pytest.raises(TransportError):
                await a.open_stream(b.peer_id, addr, ECHO)
        with pytest.raises(TransportError):
            await a.connect(a.addr)                           # ourselves


async def test_someone_else_at_the_address(ab):
    """The addr names node c, but b listens there: Noise authenticates b, not c."""
    a, b = ab
    c = Identity.generate()
    port = b.addr.split("/tcp/")[1].split("/")[0]
    addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{c.libp2p_peer_id}"
    with trio.fail_after(STEP_LIMIT):
        with pytest.raises(TransportError):
            await a.open_stream(c.node_id, addr, ECHO)
        with pytest.raises(TransportError):
            await a.connect(addr)
    assert a.connection_count(b.peer_id) == 0


async def test_refused_port_raises(ab):
    a, _ = ab
    c = Identity.generate()
    addr = f"/ip4/127.0.0.1/tcp/{closed_port()}/p2p/{c.libp2p_peer_id}"
    with trio.fail_after(STEP_LIMIT):
        with pytest.raises(TransportError):
            await a.connect(addr)


async def test_dialing_again_reuses_one_connection(ab):
    a, b = ab
    with trio.fail_after(STEP_LIMIT):
        async with trio.open_nursery() as n:              # concurrent first dials
            for _ in range(8):
                n.start_soon(a.connect, b.addr)
        for _ in range(5):                                # and sequential streams
            s = await a.open_stream(b.peer_id, b.addr, ECHO)
            await s.send_all(b"x")
            assert await read_exactly(s, 1) == b"x"
            await s.aclose()
    assert a.connection_count(b.peer_id) == 1
    assert b.connection_count(a.peer_id) == 1
    assert a.connection_count() == 1


async def test_reconnects_after_peer_restarts(nursery):
    a = (await start_transport(nursery)).transport
    ident = Identity.generate()
    first = await start_transport(nursery, P2PTransport(ident))
    with trio.fail_after(STEP_LIMIT):
        assert await a.connect(first.transport.addr) == ident.node_id
        await first.stop()
        # gone: a stream needs an answer, so it fails (connect() alone may still
        # find the old connection if a has not yet read the socket's close)
        with pytest.raises(TransportError):
            await a.open_stream(ident.node_id, first.transport.addr, ECHO)
        again = P2PTransport(ident)
        again.set_handler(ECHO, echo)
        await start_transport(nursery, again)
        s = await a.open_stream(ident.node_id, again.addr, ECHO)
        await s.send_all(b"back")
        assert await read_exactly(s, 4) == b"back"
        await s.aclose()


async def test_reset_reaches_the_other_side(ab):
    a, b = ab
    seen = []
    done = trio.Event()

    async def waits(stream, peer_id):
        await stream.send_all(b"ready")
        try:
            await stream.receive_some(10)
        except TransportError as exc:
            seen.append(exc)
        done.set()

    b.set_handler("/test/waits/1", waits)
    with trio.fail_after(STEP_LIMIT):
        s = await a.open_stream(b.peer_id, b.addr, "/test/waits/1")
        assert await read_exactly(s, 5) == b"ready"
        await s.reset()
        await done.wait()
    assert len(seen) == 1
    assert b.handler_errors == []


async def test_handler_exception_resets_stream(ab):
    a, b = ab

    async def broken(stream, peer_id):
        await stream.receive_some(10)
        raise ValueError("bug")

    b.set_handler(ECHO, broken)
    with trio.fail_after(STEP_LIMIT):
        s = await a.open_stream(b.peer_id, b.addr, ECHO)
        await s.send_all(b"hi")
        with pytest.raises(TransportError):
            await s.receive_some(10)
    assert [type(e) for e in b.handler_errors] == [ValueError]


async def test_failures_do_not_print_libp2p_logs(ab, capfd):
    a, b = ab
    with trio.fail_after(STEP_LIMIT):
        with pytest.raises(TransportError):
            await a.open_stream(b.peer_id, b.addr, "/unknown/1")
    out, err = capfd.readouterr()
    assert "libp2p" not in err and "Failed to open stream" not in err


def _open_sockets() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                n += 1
        except OSError:
            pass
    return n


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
async def test_shutdown_closes_every_socket():
    before = _open_sockets()
    with trio.fail_after(STEP_LIMIT):
        async with trio.open_nursery() as n:
            a = (await start_transport(n)).transport
            b = (await start_transport(n)).transport
            b.set_handler(ECHO, echo)
            s = await a.open_stream(b.peer_id, b.addr, ECHO)
            await s.send_all(b"x")
            assert await read_exactly(s, 1) == b"x"
            assert _open_sockets() >= before + 4          # 2 listeners + 2 ends
            n.cancel_scope.cancel()                       # stream left open on purpose
    assert _open_sockets() == before


async def test_bulk_transfer_64_mib_smoke(ab):
    """64 MiB on one stream arrives intact (hash compared). No timing asserts:
    bench/bench_p2p_stream.py measures throughput."""
    a, b = ab
    block = os.urandom(MiB)
    total = 64 * MiB
    expect = hashlib.sha256()
    with trio.fail_after(6 * STEP_LIMIT):
        s = await a.open_stream(b.peer_id, b.addr, HASH)
        await s.send_all(total.to_bytes(8, "big"))
        for i in range(total // MiB):
            chunk = block[i:] + block[:i]                 # every MiB different
            expect.update(chunk)
            await s.send_all(chunk)
        assert await read_exactly(s, 32) == expect.digest()
        await s.aclose()
    assert b.handler_errors == []
