"""The swarm with keyed chunk ids (encryption at rest): a store sends its sealed
records with keyed ids as stored (exchange.CODEC_SEALED), anything else as codec +
payload; the receiver checks keyed ids and keeps a sealed record as received (or
seals what it stores); a node without the key is refused before any chunk moves.
simnet, virtual time unless a test says otherwise."""
from __future__ import annotations

import random

import pytest
import trio
from conftest import mixed_image
from test_swarm import LIMIT, MBIT, Net, image_ids

from hypersdk.node.exchange.chunk_source import MemorySink, MemorySource, StoreSink, StoreSource
from hypersdk.node.exchange.swarm import DownloadError
from hypersdk.node.net import datakey
from hypersdk.node.service.backup import backup
from hypersdk.node.service.restore import restore
from hypersdk.node.store import catalog, packfile
from hypersdk.node.store.sealed import open_payload, seal_payload
from hypersdk.node.store.store import ChunkStore
from hypersdk.node.store.verify import verify_store
from hypersdk.protocol.chunks import ZERO_ID, chunk_id
from hypersdk.protocol.exchange import CODEC_SEALED, CODEC_ZSTD
from hypersdk.protocol.manifest import Manifest
from hypersdk.protocol.sealing import KIND_CHUNK, KIND_HASHLIST, DataKey, keyed_id, seal

CS = 64 << 10
K = DataKey.generate(bytes(range(7, 39)))
OTHER = DataKey.generate(bytes(range(9, 41)))


def keyed_image(n=30, seed=1):
    rng = random.Random(seed)
    chunks = [rng.randbytes(CS) if i % 5 else bytes(CS) for i in range(n)]
    src = MemorySource(key=K, compress=True)
    return src, src.add_image(chunks, CS), chunks


async def test_a_key_holder_fetches_a_keyed_image_checking_keyed_ids(nursery, autojump_clock):
    src, mid, chunks = keyed_image()
    liar = MemorySource(src.chunks, src.manifests, corrupt=1.0, rng=random.Random(1))
    net = await Net(nursery, up=50 * MBIT).start()
    peers = [net.provider(src), net.provider(liar)]
    sink = MemorySink(key=K)
    with trio.fail_after(LIMIT):
        res = await net.downloader(sink, peers).download(mid)
    assert res.bad_chunks >= 1 and peers[1].id in res.banned     # the liar's bytes failed
    for i, cid in enumerate(image_ids(src, mid)):
        if cid != ZERO_ID:
            assert cid == keyed_id(K, chunks[i]) and sink.chunks[cid] == chunks[i]


@pytest.mark.parametrize("have", [None, OTHER])
async def test_a_node_without_the_key_is_refused_before_any_chunk(nursery, autojump_clock,
                                                                   have):
    src, mid, _ = keyed_image()
    net = await Net(nursery).start()
    sink = MemorySink(key=have)
    with trio.fail_after(LIMIT), pytest.raises(DownloadError) as e:
        await net.downloader(sink, [net.provider(src)]).download(mid)
    assert str(e.value) == (f"this backup is encrypted with data key "
                            f"{K.fingerprint.hex()[:16]}; this node does not have it")
    assert src.served == 0 and sink.puts == 0 and not sink.manifests


def _store_with(path, key=None):
    if key is not None:
        datakey.install(path, key.secret)
    return ChunkStore(path)


async def test_store_to_store_fetch_of_a_keyed_backup_is_sealed_at_the_receiver(
        nursery, tmp_path):
    img = mixed_image(tmp_path / "disk.img", 20 * CS + 77, chunk=CS)
    data = bytearray(img.read_bytes())
    with _store_with(tmp_path / "a", K) as a, _store_with(tmp_path / "b", K) as b:
        backup(a, str(img), name="vm", chunk_size=CS)
        data[4 * CS + 10:4 * CS + 4106] = random.Random(9).randbytes(4096)   # a sealed delta
        img.write_bytes(data)
        r2 = backup(a, str(img), name="vm", chunk_size=CS)
        assert a.stats()["delta_chunks"] >= 1
        net = await Net(nursery).start()
        peer_source = StoreSource(a, threaded=True)
        peer = net.provider(peer_source)
        with trio.fail_after(LIMIT):
            async with StoreSink(b, threaded=True, batch_bytes=4 * CS) as sink:
                res = await net.downloader(sink, [peer], verify_in_thread=True).download(
                    r2.manifest_id)
        assert res.chunks_fetched > 0
        # every record but the re-encoded deltas went out sealed, as stored
        deltas = b.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0] - sum(
            1 for (c,) in a.db.execute("SELECT id FROM chunks WHERE base IS NULL")
            if b.has(bytes(c)))
        assert peer_source.served_sealed == res.chunks_fetched - deltas > 0
        catalog.add_backup(b.db, catalog.load_manifest(b, r2.manifest_id), {}, b.key)
        b.db.commit()
        rows = b.db.execute("SELECT id, codec FROM chunks").fetchall()
        assert rows and all(c & 0x60 == packfile.SEALED | packfile.KEYED for _, c in rows)
        (fp,) = b.db.execute("SELECT key FROM manifests").fetchone()
        assert bytes(fp) == K.fingerprint
        # what both sites hold whole (not as a delta at the server) is the same record
        same = [bytes(c) for c, codec in rows
                if packfile.inner(a.location(bytes(c))[4]) != packfile.CODEC_ZSTD_DELTA]
        assert same and all(bytes(a.read_stored(c)[2]) == bytes(b.read_stored(c)[2])
                            for c in same)
        restore(b, "vm", str(tmp_path / "out"))
        assert (tmp_path / "out").read_bytes() == bytes(data)
        assert verify_store(b).ok


async def test_store_without_the_key_fetches_nothing(nursery, autojump_clock, tmp_path):
    img = mixed_image(tmp_path / "disk.img", 8 * CS, chunk=CS)
    with _store_with(tmp_path / "a", K) as a, _store_with(tmp_path / "b") as b:
        r = backup(a, str(img), name="vm", chunk_size=CS)
        net = await Net(nursery).start()
        peer = net.provider(StoreSource(a, threaded=False))
        with trio.fail_after(LIMIT), pytest.raises(DownloadError, match="data key"):
            async with StoreSink(b, threaded=False) as sink:
                await net.downloader(sink, [peer]).download(r.manifest_id)
        assert b.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0] == 0
        assert b.db.execute("SELECT COUNT(*) FROM manifests").fetchone()[0] == 0


async def test_a_key_holder_seals_a_plain_backup_it_fetches(nursery, autojump_clock, tmp_path):
    img = mixed_image(tmp_path / "disk.img", 8 * CS, chunk=CS)
    with _store_with(tmp_path / "a") as a, _store_with(tmp_path / "b", K) as b:
        r = backup(a, str(img), name="vm", chunk_size=CS)          # plain ids, plaintext
        net = await Net(nursery).start()
        peer = net.provider(StoreSource(a, threaded=False))
        with trio.fail_after(LIMIT):
            async with StoreSink(b, threaded=False) as sink:
                await net.downloader(sink, [peer]).download(r.manifest_id)
        codecs = {c for (c,) in b.db.execute("SELECT codec FROM chunks")}
        assert codecs and all(c & 0x60 == packfile.SEALED for c in codecs)   # sealed, plain ids
        m = catalog.load_manifest(b, r.manifest_id)
        assert m.key is None
        (fp,) = b.db.execute("SELECT key FROM manifests").fetchone()
        assert bytes(fp) == K.fingerprint
        for _, cid in catalog.iter_chunk_ids(b, m):
            if cid != ZERO_ID:
                assert chunk_id(b.read(cid)) == cid
        assert verify_store(b).ok


def _records(store):
    return {bytes(c): (codec, bytes(store.read_stored(bytes(c))[2]))
            for c, codec in store.db.execute("SELECT id, codec FROM chunks")}


@pytest.mark.parametrize("threaded", [True, False])
async def test_keyed_stores_exchange_sealed_records_as_stored(nursery, tmp_path, request,
                                                               threaded):
    """Server: every chunk record (raw or zstd inside) goes out CODEC_SEALED, never
    opened; hash-list pieces go out opened (a storage-only holder needs their ids);
    receiver: stores a sealed chunk as received and seals a piece itself. Both stores
    hold byte-identical records, and they are exactly what sealing at the receiver
    would have produced."""
    if not threaded:
        request.getfixturevalue("autojump_clock")
    img = mixed_image(tmp_path / "disk.img", 24 * CS + 77, chunk=CS)
    with _store_with(tmp_path / "a", K) as a, _store_with(tmp_path / "b", K) as b:
        r = backup(a, str(img), name="vm", chunk_size=CS)
        assert a.stats()["delta_chunks"] == 0
        net = await Net(nursery).start()
        source = StoreSource(a, threaded=threaded)
        with trio.fail_after(LIMIT):
            async with StoreSink(b, threaded=threaded, batch_bytes=4 * CS) as sink:
                res = await net.downloader(sink, [net.provider(source)],
                                           verify_in_thread=threaded).download(r.manifest_id)
        pieces = {lid for lid in catalog.load_manifest(a, r.manifest_id).lists
                  if lid != ZERO_ID}
        assert pieces and source.served_sealed > 0
        assert res.chunks_fetched == source.served_sealed + len(pieces)
        ra, rb = _records(a), _records(b)
        assert ra == rb                                   # same ids, codecs, record bytes
        assert {packfile.inner(c) for c, _ in rb.values()} == {0, 1}   # raw and zstd inside
        m = catalog.load_manifest(b, r.manifest_id)
        catalog.add_backup(b.db, m, {}, b.key)
        b.db.commit()
        lists = set(m.lists)
        for cid, (codec, rec) in rb.items():               # = what b would have sealed itself
            kind = KIND_HASHLIST if cid in lists else KIND_CHUNK
            inner, payload = open_payload(K, cid, codec, b.location(cid)[3], rec)
            assert seal_payload(K, kind, cid, inner, b.location(cid)[3], bytes(payload),
                                True) == (codec, rec)
        restore(b, "vm", str(tmp_path / "out"))
        assert (tmp_path / "out").read_bytes() == img.read_bytes()
        assert verify_store(b).ok


async def test_sink_reseals_a_sealed_record_of_another_kind(tmp_path):
    """A record the server sealed as a chunk that this sink stores as a hash-list
    piece is opened and sealed again under the sink's kind; one of its own kind is
    kept as received. Either way the result is seal_payload's."""
    piece, chunk = b"\x11" * 64, b"data " * 100
    pid, cid = keyed_id(K, piece), keyed_id(K, chunk)
    m = Manifest(name="vm", size=CS, chunk_size=CS, lists=(pid,), key=K.fingerprint)
    with _store_with(tmp_path / "b", K) as b:
        async with StoreSink(b, threaded=False) as sink:
            assert await sink.begin(m) == K
            for oid, plain in ((pid, piece), (cid, chunk)):
                rec = bytes(seal(K, KIND_CHUNK, oid, 0, len(plain), plain))
                await sink.put(oid, None, wire=(CODEC_SEALED, len(plain), rec))
        got = _records(b)
        assert got[pid] == tuple(seal_payload(K, KIND_HASHLIST, pid, 0, len(piece), piece, True))
        assert got[cid] == (packfile.SEALED | packfile.KEYED, rec)
        assert b.read(pid) == piece and b.read(cid) == chunk


async def test_a_plaintext_sink_stores_the_plaintext_of_a_sealed_wire_record(tmp_path):
    plain = b"plain " * 300
    cid = keyed_id(K, plain)
    rec = bytes(seal(K, KIND_CHUNK, cid, 0, len(plain), plain))
    with _store_with(tmp_path / "p") as p:
        async with StoreSink(p, threaded=False) as sink:
            await sink.put(cid, plain, wire=(CODEC_SEALED, len(plain), rec))
            with pytest.raises(ValueError):
                await sink.put(keyed_id(K, b"x"), None, wire=(CODEC_SEALED, 1, rec))
        ((codec, stored),) = _records(p).values()
        assert codec == CODEC_ZSTD and not codec & packfile.SEALED
