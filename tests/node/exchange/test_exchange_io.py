"""ExchangeServer + ExchangeSession over real transports (simnet, and libp2p on 127.0.0.1).

Simnet tests run on trio's MockClock (autojump); waits are bounded with
trio.fail_after (virtual seconds there, real seconds for libp2p).
"""
from __future__ import annotations

import random

import pytest
import trio
from p2p_helpers import STEP_LIMIT, start_transport

from hypersdk.dht.contact import Contact
from hypersdk.node.exchange.chunk_source import MemorySource, StoreSource
from hypersdk.node.exchange.client import ChunkData, ChunkMissing, SessionFailed, open_session
from hypersdk.node.exchange.server import (
    CORRUPT_ENV,
    RATE_ENV,
    ExchangeServer,
    corrupt_rate_from_env,
    serve_rate_from_env,
)
from hypersdk.node.net.transport import TransportError
from hypersdk.node.store.packfile import CODEC_ZSTD_DELTA
from hypersdk.protocol.chunks import ZERO_ID, chunk_id
from hypersdk.protocol.errors import ChunkHashMismatch, RemoteProtocolError
from hypersdk.protocol.exchange import (
    CODEC_RAW,
    CODEC_ZSTD,
    PROTOCOL_ID,
    GetManifest,
    ManifestData,
    open_data,
    open_manifest,
)
from hypersdk.protocol.exchange_framing import encode_message
from hypersdk.protocol.manifest import split_list
from hypersdk.simnet.transport import LinkModel, SimNetwork

CS = 64 << 10


def image(seed: int = 1, n: int = 6) -> list[bytes]:
    """Chunks: random, zero, compressible, random, ..., a short last chunk."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 3 == 1:
            out.append(bytes(CS))
        elif i % 3 == 2:
            out.append((b"line %d " % i * CS)[:CS])
        else:
            out.append(rng.randbytes(CS))
    out[-1] = out[-1][:CS // 2 + 1]
    return out


async def sim_pair(nursery, source, **server_kw):
    net = SimNetwork(LinkModel(delay=0.01))
    await nursery.start(net.run)
    a = net.add_node(b"a" * 32, "/ip4/10.0.0.1/tcp/1")
    b = net.add_node(b"b" * 32, "/ip4/10.0.0.2/tcp/1")
    server = ExchangeServer(source, **server_kw)
    b.set_handler(PROTOCOL_ID, server.handle)
    return net, a, Contact(b.peer_id, b.addr), server


async def collect(recv, n):
    out = []
    for _ in range(n):
        out.append(await recv.receive())
    return out


async def test_manifest_have_and_pipelined_gets(nursery, autojump_clock):
    src = MemorySource(compress=True)
    chunks = image()
    mid = src.add_image(chunks, CS)
    net, a, b, server = await sim_pair(nursery, src)
    ids = [ZERO_ID if c == bytes(len(c)) else chunk_id(c) for c in chunks]
    absent = ids[3]
    del src.chunks[absent]                         # the server lost one chunk
    send, recv = trio.open_memory_channel(100)
    with trio.fail_after(STEP_LIMIT):
        async with open_session(a, b, events=send) as s:
            m = open_manifest(await s.get_manifest(mid))
            assert m.id == mid and m.n_chunks == len(chunks)
            assert open_manifest(await s.get_manifest(b"\x07" * 32)) is None

            bits = await s.have(mid, 0, 10)        # past the end: 0
            want = [c != ZERO_ID and c != absent for c in ids] + [False] * 4
            assert [bits.has(i) for i in range(10)] == want
            bits = await s.have(mid, 2, 2)
            assert list(bits.positions()) == [2]
            assert not any((await s.have(b"\x07" * 32, 0, 5)).bits)

            nonzero = [c for c in ids if c != ZERO_ID]
            batches = [nonzero[:2], nonzero[2:], [b"\x09" * 32]]
            for batch in batches:                  # all three outstanding at once
                await s.get(batch)
            assert s.outstanding == 3
            evs = await collect(recv, sum(map(len, batches)))
            order = [e.data.id if type(e) is ChunkData else e.cid for e in evs]
            assert order == [c for batch in batches for c in batch]
            by_id = {chunk_id(c): c for c in chunks if c != bytes(len(c))}
            codecs = set()
            for e in evs:
                if type(e) is ChunkMissing:
                    assert e.cid in (absent, b"\x09" * 32)
                    continue
                codecs.add(e.data.codec)
                assert open_data(e.data) == by_id[e.data.id]
            assert codecs == {CODEC_RAW, CODEC_ZSTD}
            assert sum(type(e) is ChunkMissing for e in evs) == 2
    assert server.counters["malformed"] == 0
    assert net.handler_errors == []


async def test_delta_stored_chunk_is_served_plain_and_verifies(nursery, autojump_clock,
                                                              store, tmp_path):
    from hypersdk.node.service.backup import backup
    img = tmp_path / "disk.img"
    rng = random.Random(5)
    data = bytearray(rng.randbytes(6 * CS))
    img.write_bytes(data)
    backup(store, str(img), name="vm", chunk_size=CS)
    data[CS + 100:CS + 4196] = rng.randbytes(4096)           # change chunk 1 a little
    img.write_bytes(data)
    r2 = backup(store, str(img), name="vm", chunk_size=CS)
    cid = chunk_id(bytes(data[CS:2 * CS]))
    assert store.location(cid)[4] == CODEC_ZSTD_DELTA
    net, a, b, server = await sim_pair(nursery, StoreSource(store, threaded=False))
    send, recv = trio.open_memory_channel(10)
    with trio.fail_after(STEP_LIMIT):
        async with open_session(a, b, events=send) as s:
            m = open_manifest(await s.get_manifest(r2.manifest_id))
            assert m.n_chunks == 6
            bits = await s.have(r2.manifest_id, 0, 6)
            assert list(bits.positions()) == list(range(6))
            await s.get([cid, chunk_id(bytes(data[:CS]))])
            (e1, e2) = await collect(recv, 2)
    assert e1.data.codec in (CODEC_RAW, CODEC_ZSTD)
    assert open_data(e1.data) == bytes(data[CS:2 * CS])
    assert open_data(e2.data) == bytes(data[:CS])


@pytest.mark.parametrize("garbage", [
    b"\xff\xff\xff\xff" + b"x" * 100,                         # oversized prefix
    b"\x00\x00\x00\x05hello",                                  # not msgpack
    encode_message(ManifestData(1, b"\x01" * 32, None)),       # a response, not a request
    encode_message(GetManifest(1, b"\x01" * 32))[:-3],         # EOF inside a frame
])
async def test_garbage_closes_the_stream_and_the_server_lives_on(nursery, autojump_clock,
                                                                 garbage):
    src = MemorySource()
    mid = src.add_image(image(), CS)
    net, a, b, server = await sim_pair(nursery, src)
    with trio.fail_after(STEP_LIMIT):
        raw = await a.open_stream(b.id, b.addr, PROTOCOL_ID)
        await raw.send_all(garbage)
        await raw.aclose()                  # half-close: the server reads EOF after it
        while server.counters["malformed"] == 0:
            await trio.sleep(0.01)          # virtual time: the server's answer to bytes
        async with open_session(a, b) as s:  # the server still serves
            assert open_manifest(await s.get_manifest(mid)).id == mid
    assert server.counters["malformed"] == 1
    assert server.counters["errors"] == 0 and net.handler_errors == []


async def test_a_malformed_response_fails_the_session(nursery, autojump_clock):
    net = SimNetwork(LinkModel(delay=0.01))
    await nursery.start(net.run)
    a = net.add_node(b"a" * 32, "/ip4/10.0.0.1/tcp/1")
    b = net.add_node(b"b" * 32, "/ip4/10.0.0.2/tcp/1")

    async def liar(stream, peer_id):        # answers every request with the wrong rid
        await stream.receive_some(1000)
        await stream.send_all(encode_message(ManifestData(999, b"\x01" * 32, None)))
        await stream.receive_some(1000)

    b.set_handler(PROTOCOL_ID, liar)
    send, recv = trio.open_memory_channel(10)
    with trio.fail_after(STEP_LIMIT):
        async with open_session(a, Contact(b.peer_id, b.addr), events=send) as s:
            with pytest.raises(RemoteProtocolError):
                await s.get_manifest(b"\x01" * 32)
            ev = await recv.receive()
            assert type(ev) is SessionFailed and isinstance(ev.error, RemoteProtocolError)
            assert s.closed
            with pytest.raises(RemoteProtocolError):
                await s.have(b"\x01" * 32, 0, 1)


async def test_unreachable_peer_is_a_transport_error(nursery, autojump_clock):
    net, a, b, server = await sim_pair(nursery, MemorySource())
    with trio.fail_after(STEP_LIMIT):
        with pytest.raises(TransportError):
            async with open_session(a, Contact(b"z" * 32, "/ip4/10.9.9.9/tcp/1")):
                pass


def test_corrupt_env_parsing():
    assert corrupt_rate_from_env({}) == 0.0
    assert corrupt_rate_from_env({CORRUPT_ENV: "all"}) == 1.0
    assert corrupt_rate_from_env({CORRUPT_ENV: "0.25"}) == 0.25
    for bad in ("often", "2"):
        with pytest.raises(ValueError):
            corrupt_rate_from_env({CORRUPT_ENV: bad})


def test_rate_env_parsing():
    assert serve_rate_from_env({}) == 0.0
    assert serve_rate_from_env({RATE_ENV: "40M"}) == 40 << 20
    for bad in ("fast", "0", "-3"):
        with pytest.raises(ValueError, match=RATE_ENV):
            serve_rate_from_env({RATE_ENV: bad})


async def test_test_only_rate_hook_caps_the_payload_rate(nursery, autojump_clock, monkeypatch):
    monkeypatch.setenv(RATE_ENV, "64K")
    src = MemorySource()
    chunks = [random.Random(i).randbytes(CS) for i in range(8)]    # 8 x 64 KiB, raw
    src.add_image(chunks, CS)
    net, a, b, server = await sim_pair(nursery, src)
    assert server.rate == 64 << 10
    send, recv = trio.open_memory_channel(10)
    ids = [chunk_id(c) for c in chunks]
    with trio.fail_after(60):
        async with open_session(a, b, events=send) as s:
            t0 = trio.current_time()
            await s.get(ids)
            evs = await collect(recv, len(ids))
            took = trio.current_time() - t0
    assert [open_data(e.data) for e in evs] == chunks
    # 512 KiB at 64 KiB/s: the first chunk leaves at once, the 8th after 7 s
    assert 7.0 <= took < 9.0, took


async def test_cancel_turns_unsent_answers_into_missing(nursery, autojump_clock):
    """A Cancel is read while earlier Gets are still being answered: ids not sent yet
    are answered Missing, in order; an id already sent, and one never asked for, are
    ignored and do not linger (asked again, they come as Data)."""
    src = MemorySource()
    chunks = [random.Random(i).randbytes(CS) for i in range(5)]
    src.add_image(chunks, CS)
    net, a, b, server = await sim_pair(nursery, src, rate=64 << 10)   # 1 chunk/s
    ids = [chunk_id(c) for c in chunks]
    send, recv = trio.open_memory_channel(10)
    with trio.fail_after(60):
        async with open_session(a, b, events=send) as s:
            await s.get(ids[:3])
            await s.get(ids[3:])
            first = await recv.receive()                 # ids[0] left at once
            assert type(first) is ChunkData and first.data.id == ids[0]
            await s.cancel([ids[0], ids[2], ids[4], b"\x09" * 32])
            evs = await collect(recv, 4)
            got = [(type(e).__name__, e.data.id if type(e) is ChunkData else e.cid)
                   for e in evs]
            assert got == [("ChunkData", ids[1]), ("ChunkMissing", ids[2]),
                           ("ChunkData", ids[3]), ("ChunkMissing", ids[4])]
            assert server.counters["cancelled"] == 2 and server.counters["missing"] == 0
            await s.get([ids[0], ids[2]])                # nothing lingers
            evs = await collect(recv, 2)
            assert [open_data(e.data) for e in evs] == [chunks[0], chunks[2]]
    assert server.counters["chunks_sent"] == 5 and server.counters["malformed"] == 0


async def test_test_only_corruption_hook(nursery, autojump_clock, monkeypatch):
    monkeypatch.setenv(CORRUPT_ENV, "all")
    src = MemorySource(compress=True)
    chunks = image()
    src.add_image(chunks, CS)
    net, a, b, server = await sim_pair(nursery, src)
    assert server.corrupt == 1.0
    send, recv = trio.open_memory_channel(10)
    ids = [chunk_id(c) for c in chunks if c != bytes(len(c))]
    with trio.fail_after(STEP_LIMIT):
        async with open_session(a, b, events=send) as s:
            await s.get(ids)
            evs = await collect(recv, len(ids))
    for e in evs:
        with pytest.raises((ChunkHashMismatch, RemoteProtocolError)):
            open_data(e.data)
    assert server.counters["corrupted"] == len(ids)


async def test_round_trip_over_libp2p(nursery):
    src = MemorySource(compress=True)
    MiB = 1 << 20
    rng = random.Random(3)
    chunks = [rng.randbytes(MiB), bytes(MiB), (b"text " * MiB)[:MiB], rng.randbytes(1000)]
    mid = src.add_image(chunks, MiB)
    server = ExchangeServer(src)
    a = (await start_transport(nursery)).transport
    b = (await start_transport(nursery)).transport
    b.set_handler(PROTOCOL_ID, server.handle)
    ids = [chunk_id(c) for c in chunks if c != bytes(len(c))]
    send, recv = trio.open_memory_channel(10)
    with trio.fail_after(STEP_LIMIT):
        async with open_session(a, Contact(b.peer_id, b.addr), events=send) as s:
            m = open_manifest(await s.get_manifest(mid))
            assert m.n_chunks == len(chunks)
            pieces = [src.chunks[l] for l in m.lists]
            assert split_list(pieces[0], m.n_chunks)[1] == ZERO_ID
            bits = await s.have(mid, 0, len(chunks))
            assert [bits.has(i) for i in range(len(chunks))] == [c != ZERO_ID for c in
                                                                   split_list(pieces[0], m.n_chunks)]
            await s.get(ids[:2])
            await s.get(ids[2:])
            evs = await collect(recv, len(ids))
    assert [open_data(e.data) for e in evs] == [c for c in chunks if c != bytes(len(c))]
    assert b.handler_errors == [] and server.counters["malformed"] == 0
