"""node/net/fast_channel.py: the authenticated TCP bulk channel beside libp2p.

Handshake and records on raw TCP (both identities checked, tampering, truncation,
oversized records, replayed/foreign tokens), and the whole path (offer over a real
libp2p transport, the exchange over the channel, fallback to libp2p)."""
from __future__ import annotations

import random

import pytest
import trio
from p2p_helpers import STEP_LIMIT, start_transport

from hypersdk.dht.contact import Contact
from hypersdk.node.exchange.chunk_source import MemorySource
from hypersdk.node.exchange.client import open_session
from hypersdk.node.exchange.server import ExchangeServer
from hypersdk.node.net.fast_channel import (
    MAX_RECORD,
    OFFER_PROTOCOL,
    FastChannelError,
    FastChannelServer,
    FastDialer,
    client_handshake,
)
from hypersdk.node.net.identity import Identity
from hypersdk.node.net.p2p_transport import P2PTransport
from hypersdk.protocol.chunks import chunk_id
from hypersdk.protocol.exchange import PROTOCOL_ID, open_data

MiB = 1 << 20


class Echo:
    """A handler that echoes everything back until EOF; records what it saw."""

    def __init__(self):
        self.peers = []
        self.errors = []

    async def __call__(self, stream, peer_id):
        self.peers.append(peer_id)
        try:
            while True:
                d = await stream.receive_some(1 << 20)
                if not d:
                    return
                await stream.send_all(d)
        except Exception as exc:
            self.errors.append(exc)


async def _server(nursery, handler=None, ident=None):
    ident = ident or Identity.generate()
    srv = FastChannelServer(ident, handler or Echo())
    await nursery.start(srv.run)
    return srv, ident


async def _dial(srv, client_ident, expected, token=None):
    token = srv.issue(client_ident.node_id) if token is None else token
    st = await trio.open_tcp_stream("127.0.0.1", srv.port)
    return await client_handshake(st, client_ident, expected, token)


async def _echo_round(fs, data):
    got = bytearray()

    async def reader():
        while len(got) < len(data):
            d = await fs.receive_some(len(data))
            assert d
            got.extend(d)

    async with trio.open_nursery() as n:
        n.start_soon(reader)
        await fs.send_all(data)
    return bytes(got)


async def test_round_trip_and_identities(nursery):
    echo = Echo()
    srv, sid = await _server(nursery, echo)
    cid = Identity.generate()
    with trio.fail_after(STEP_LIMIT):
        fs = await _dial(srv, cid, sid.node_id)
        data = random.Random(1).randbytes(MAX_RECORD * 2 + 12345)
        assert await _echo_round(fs, data) == data
        await fs.send_parts((b"head", b"payload"))
        got = b""
        while len(got) < 11:                  # one record per part
            got += await fs.receive_some(100)
        assert got == b"headpayload"
        await fs.aclose()
        await trio.sleep(0.05)
    assert echo.peers == [cid.node_id] and echo.errors == []
    assert srv.counters["accepted"] == 1


async def test_wrong_server_identity_is_refused(nursery):
    srv, sid = await _server(nursery)
    cid = Identity.generate()
    with trio.fail_after(STEP_LIMIT):
        with pytest.raises(FastChannelError, match="not the expected node"):
            await _dial(srv, cid, Identity.generate().node_id)


async def test_client_not_the_token_holder_is_refused(nursery):
    echo = Echo()
    srv, sid = await _server(nursery, echo)
    holder, intruder = Identity.generate(), Identity.generate()
    with trio.fail_after(STEP_LIMIT):
        token = srv.issue(holder.node_id)
        with pytest.raises(FastChannelError):
            fs = await _dial(srv, intruder, sid.node_id, token=token)
            await fs.receive_some(10)          # the server hung up
        # unknown token, and a token used twice
        with pytest.raises(FastChannelError):
            fs = await _dial(srv, holder, sid.node_id, token=bytes(16))
            await fs.receive_some(10)
        t2 = srv.issue(holder.node_id)
        fs = await _dial(srv, holder, sid.node_id, token=t2)
        await fs.aclose()
        with pytest.raises(FastChannelError):
            fs = await _dial(srv, holder, sid.node_id, token=t2)
            await fs.receive_some(10)
    assert echo.peers == [holder.node_id]
    assert srv.counters["refused"] == 3


class Proxy:
    """A TCP relay between a client and the server that can flip a byte of the
    server->client bytes after `after` bytes, or cut the connection."""

    def __init__(self, port, flip_at=None, cut_after=None):
        self.port = port
        self.flip_at = flip_at
        self.cut_after = cut_after

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
        ls = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(ls[0].socket.getsockname()[1])
        await trio.serve_listeners(self._conn, ls)

    async def _conn(self, client):
        server = await trio.open_tcp_stream("127.0.0.1", self.port)

        async def pump(a, b, mangle):
            seen = 0
            try:
                while True:
                    d = await a.receive_some(65536)
                    if not d:
                        break
                    if mangle and self.flip_at is not None and seen <= self.flip_at < seen + len(d):
                        d = bytearray(d)
                        d[self.flip_at - seen] ^= 0x40
                        d = bytes(d)
                    if mangle and self.cut_after is not None and seen + len(d) > self.cut_after:
                        await b.send_all(d[:self.cut_after - seen])
                        break
                    seen += len(d)
                    await b.send_all(d)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                await a.aclose()
                await b.aclose()

        async with trio.open_nursery() as n:
            n.start_soon(pump, client, server, False)
            n.start_soon(pump, server, client, True)


async def _via_proxy(nursery, **kw):
    srv, sid = await _server(nursery)
    cid = Identity.generate()
    port = await nursery.start(Proxy(srv.port, **kw).run)
    st = await trio.open_tcp_stream("127.0.0.1", port)
    return await client_handshake(st, cid, sid.node_id, srv.issue(cid.node_id))


async def test_tampered_record_is_never_delivered(nursery):
    with trio.fail_after(STEP_LIMIT):
        # the server's handshake reply is 128 bytes; flip a byte inside the first record
        fs = await _via_proxy(nursery, flip_at=128 + 4 + 100)
        await fs.send_all(b"x" * 1000)
        with pytest.raises(FastChannelError, match="authentication"):
            await fs.receive_some(2000)


async def test_tampered_handshake_is_refused(nursery):
    with trio.fail_after(STEP_LIMIT):
        with pytest.raises(FastChannelError):
            await _via_proxy(nursery, flip_at=40)      # inside the server's identity key
    with trio.fail_after(STEP_LIMIT):
        with pytest.raises(FastChannelError):
            await _via_proxy(nursery, flip_at=100)     # inside its signature


async def test_truncated_stream_is_an_error_not_eof(nursery):
    with trio.fail_after(STEP_LIMIT):
        fs = await _via_proxy(nursery, cut_after=128 + 50)
        await fs.send_all(b"y" * 1000)
        with pytest.raises(FastChannelError, match="truncated"):
            while await fs.receive_some(2000):
                pass


async def test_oversized_record_length_is_refused(nursery):
    """A server that sends a huge length prefix: refused before anything is read."""
    sid, cid = Identity.generate(), Identity.generate()

    class Liar(FastChannelServer):
        async def _conn(self, stream):
            fs = await self.server_handshake(stream)
            await stream.send_all((MAX_RECORD + 1000).to_bytes(4, "big") + b"z" * 100)
            await trio.sleep(1)
            await fs.reset()

    srv = Liar(sid, Echo())
    await nursery.start(srv.run)
    with trio.fail_after(STEP_LIMIT):
        fs = await _dial(srv, cid, sid.node_id)
        with pytest.raises(FastChannelError, match="out of bounds"):
            await fs.receive_some(10)


async def test_garbage_hello_does_not_hurt_the_server(nursery):
    echo = Echo()
    srv, sid = await _server(nursery, echo)
    with trio.fail_after(STEP_LIMIT):
        for junk in (b"", b"GET / HTTP/1.0\r\n\r\n" * 10, bytes(200)):
            st = await trio.open_tcp_stream("127.0.0.1", srv.port)
            try:                              # the server hangs up (maybe at once)
                if junk:
                    await st.send_all(junk)
                await st.send_eof()
                assert await st.receive_some(1000) == b""
            except trio.BrokenResourceError:
                pass
            await st.aclose()
        cid = Identity.generate()
        fs = await _dial(srv, cid, sid.node_id)
        assert await _echo_round(fs, b"still alive") == b"still alive"
        await fs.aclose()
    assert srv.counters["accepted"] == 1


async def test_exchange_over_the_fast_channel_with_libp2p_offer(nursery):
    src = MemorySource(compress=True)
    rng = random.Random(3)
    chunks = [rng.randbytes(MiB), (b"text " * MiB)[:MiB], rng.randbytes(1000)]
    mid = src.add_image(chunks, MiB)
    server = ExchangeServer(src)
    ia, ib = Identity.generate(), Identity.generate()
    a = (await start_transport(nursery, P2PTransport(ia))).transport
    b = (await start_transport(nursery, P2PTransport(ib))).transport
    b.set_handler(PROTOCOL_ID, server.handle)
    fsrv = FastChannelServer(ib, server.handle)
    await nursery.start(fsrv.run)
    b.set_handler(OFFER_PROTOCOL, fsrv.offer_handler)
    ids = [chunk_id(c) for c in chunks]
    send, recv = trio.open_memory_channel(10)
    with trio.fail_after(STEP_LIMIT):
        async with open_session(a, Contact(b.peer_id, b.addr), events=send,
                                fast=FastDialer(ia, a)) as s:
            assert s.via_fast
            assert (await s.get_manifest(mid)).data is not None
            await s.get(ids)
            evs = [await recv.receive() for _ in ids]
    assert [open_data(e.data) for e in evs] == chunks
    assert fsrv.counters["accepted"] == 1 and fsrv.counters["offers"] == 1

    # a peer without the offer protocol: the session falls back to libp2p
    c = (await start_transport(nursery, P2PTransport(Identity.generate()))).transport
    c.set_handler(PROTOCOL_ID, server.handle)
    with trio.fail_after(STEP_LIMIT):
        async with open_session(a, Contact(c.peer_id, c.addr), events=send,
                                fast=FastDialer(ia, a)) as s:
            assert not s.via_fast
            assert (await s.get_manifest(mid)).data is not None


async def test_records_sealed_into_the_reused_send_buffer_arrive_intact(nursery):
    """Records are encrypted into one per-stream send buffer, reused by every send:
    sends of shrinking and growing sizes (parts given as views too) all arrive
    whole and in order."""
    srv, sid = await _server(nursery, Echo())
    rng = random.Random(5)
    with trio.fail_after(STEP_LIMIT):
        fs = await _dial(srv, Identity.generate(), sid.node_id)
        for size in (MiB + 7, 10, 3 * MiB, 1, MiB):
            data = rng.randbytes(size)
            assert await _echo_round(fs, data) == data
        parts = [rng.randbytes(n) for n in (40, MiB, 3)]
        await fs.send_parts([memoryview(p) for p in parts])
        want = b"".join(parts)
        got = bytearray()
        while len(got) < len(want):
            got += await fs.receive_some(len(want))
        assert got == want
        await fs.aclose()


def test_malloc_is_tuned_once_on_glibc():
    import platform

    from hypersdk.node.net.fast_channel import tune_malloc
    glibc = platform.libc_ver()[0] == "glibc"
    assert tune_malloc() is glibc and tune_malloc() is glibc


def _cached_store(tmp_path, make_image=None):
    """A store holding an image (default: 12 MiB mixed), its records read into the
    page cache: (store, manifest id, manifest, the non-zero chunk ids in order)."""
    from conftest import mixed_image

    from hypersdk.node.service.backup import backup
    from hypersdk.node.store.store import ChunkStore
    from hypersdk.protocol.chunks import ZERO_ID
    from hypersdk.protocol.manifest import decode_manifest, split_list

    img = (make_image or (lambda p: mixed_image(p, 12 * MiB, seed=4)))(tmp_path / "img")
    store = ChunkStore(tmp_path / "store")
    mid = backup(store, str(img), chunk_size=MiB).manifest_id
    m = decode_manifest(store.db.execute("SELECT body FROM manifests WHERE id=?",
                                         (mid,)).fetchone()[0])
    ids = [c for li in range(len(m.lists))
           for c in split_list(store.read(m.lists[li]), m.list_len(li)) if c != ZERO_ID]
    for cid in ids:                           # the records are now in the page cache
        store.read(cid)
    return store, mid, m, ids


async def _answers(fs, n: int) -> list:
    from hypersdk.protocol.exchange_framing import ExchangeDecoder
    dec, got = ExchangeDecoder(), []
    while len(got) < n:
        msg = dec.next_message()
        if msg is None:
            dec.receive_data(await fs.receive_some(4 * MiB))
        else:
            got.append(msg)
    return got


async def test_page_cached_records_are_sent_several_per_send(nursery, tmp_path):
    """A StoreSource whose records are in the page cache answers a Get over the fast
    channel from the event loop (ExchangeServer._send_cached: no thread hop, several
    chunks per send); a chunk it does not hold still gets its Missing, in order, and
    the chunks after it are served (the usual path takes over at the miss)."""
    from hypersdk.node.exchange.chunk_source import StoreSource
    from hypersdk.protocol.exchange import Data, Get, Have, HaveBits, Missing
    from hypersdk.protocol.exchange_framing import encode_message

    store, mid, m, ids = _cached_store(tmp_path)
    try:
        src = StoreSource(store)
        server = ExchangeServer(src)
        srv, sid = await _server(nursery, server.handle)
        ask = ids[:3] + [chunk_id(b"not held")] + ids[3:]
        with trio.fail_after(STEP_LIMIT):
            fs = await _dial(srv, Identity.generate(), sid.node_id)
            await fs.send_all(encode_message(Have(1, mid, 0, m.n_chunks)))
            await fs.send_all(encode_message(Get(2, tuple(ask))))
            got = await _answers(fs, 1 + len(ask))
            await fs.aclose()
        assert type(got[0]) is HaveBits and len(list(got[0].positions())) == len(ids)
        answers = got[1:]
        assert [type(a) for a in answers] == [Data] * 3 + [Missing] + [Data] * (len(ids) - 3)
        datas = [a for a in answers if type(a) is Data]
        assert [a.id for a in datas] == ids
        assert [open_data(a) for a in datas] == [store.read(c) for c in ids]
        assert src.served_cached == len(ids)          # no thread hop for a cached record
        assert server.counters["chunks_sent"] == len(ids)
        assert server.counters["missing"] == 1
    finally:
        store.close()


async def test_a_cancel_reaches_page_cached_answers_queued_behind_others(nursery, tmp_path):
    """Over the fast channel, a Cancel sent behind two Gets is read while the server
    still sends the first one's 20 MiB (more than the socket buffers; nobody reads
    them yet): the second Get's cancelled ids are answered Missing from the cached
    path, its others as Data."""
    from conftest import random_image

    from hypersdk.node.exchange.chunk_source import StoreSource
    from hypersdk.protocol.exchange import Cancel, Data, Get, Have, HaveBits, Missing
    from hypersdk.protocol.exchange_framing import encode_message

    store, mid, m, ids = _cached_store(tmp_path, lambda p: random_image(p, 24 * MiB))
    try:
        src = StoreSource(store)
        server = ExchangeServer(src)
        srv, sid = await _server(nursery, server.handle)
        first, second = ids[:-4], ids[-4:]
        with trio.fail_after(STEP_LIMIT):
            fs = await _dial(srv, Identity.generate(), sid.node_id)
            await fs.send_all(encode_message(Have(1, mid, 0, m.n_chunks)))   # (locations)
            await fs.send_all(encode_message(Get(2, tuple(first))))
            await fs.send_all(encode_message(Get(3, tuple(second))))
            await fs.send_all(encode_message(Cancel((second[1], second[3]))))
            got = await _answers(fs, 1 + len(ids))
            await fs.aclose()
        assert type(got[0]) is HaveBits
        assert [type(a) for a in got[1:1 + len(first)]] == [Data] * len(first)
        tail = [(type(a), a.rid, a.id) for a in got[1 + len(first):]]
        assert tail == [(Data, 3, second[0]), (Missing, 3, second[1]),
                        (Data, 3, second[2]), (Missing, 3, second[3])]
        assert server.counters["cancelled"] == 2 and server.counters["missing"] == 0
        assert src.served_cached == len(ids) - 2      # the cached path answered them all
    finally:
        store.close()


async def test_membership_admits_and_cuts_fast_channels(nursery):
    """The server re-checks membership at the handshake (a token of a peer cut off since
    is refused) and cut(peer) closes that peer's open channels, on both sides: a
    blocked reader gets an error at once, never a silent end of stream."""
    members = set()
    echo = Echo()
    ident = Identity.generate()
    srv = FastChannelServer(ident, echo, admit=members.__contains__)
    await nursery.start(srv.run)
    cid = Identity.generate()
    with trio.fail_after(STEP_LIMIT):
        with pytest.raises(FastChannelError):            # not (or no longer) a member
            await _echo_round(await _dial(srv, cid, ident.node_id), b"x")
        assert srv.counters["refused"] == 1
        members.add(cid.node_id)
        fs = await _dial(srv, cid, ident.node_id)
        assert await _echo_round(fs, b"hello") == b"hello"
        members.discard(cid.node_id)
        assert srv.cut(cid.node_id) == 1
        with pytest.raises(FastChannelError):
            for _ in range(100):                          # bounded: the cut shows at once
                await fs.send_all(b"more")
                if not await fs.receive_some(10):
                    break
        # the dialer side: FastDialer.admit and cut()
        dialer = FastDialer(cid, None, admit=lambda nid: False)
        with pytest.raises(FastChannelError, match="not a member"):
            await dialer.open(ident.node_id, "/ip4/127.0.0.1/tcp/1")
