"""Possession challenges keep working with keyed chunk ids: the holder answers
BLAKE3(nonce || plaintext) from its sealed store; the verifier checks its reference
copies against the keyed ids (a store read it trusts, or the key). simnet."""
from __future__ import annotations

import random

import trio
from conftest import mixed_image
from test_possession_io import sim_pair

from hypersdk.node.audit.possession import prove_holder
from hypersdk.node.exchange.chunk_source import StoreSource
from hypersdk.node.net import datakey
from hypersdk.node.service.backup import backup
from hypersdk.node.store import catalog
from hypersdk.node.store.store import ChunkStore
from hypersdk.protocol.chunks import ZERO_ID
from hypersdk.protocol.possession import MAX_SAMPLE

CS = 64 << 10


async def test_challenges_over_keyed_ids(nursery, autojump_clock, tmp_path):
    img = mixed_image(tmp_path / "disk.img", 30 * CS, chunk=CS)
    key = datakey.create(tmp_path / "holder")
    datakey.install(tmp_path / "verifier", key.secret)
    with ChunkStore(tmp_path / "holder") as h, ChunkStore(tmp_path / "verifier") as v:
        r = backup(h, str(img), name="vm", chunk_size=CS)
        backup(v, str(img), name="vm", chunk_size=CS)       # the verifier's own copy
        m = catalog.load_manifest(h, r.manifest_id)
        ids = [c for _, c in catalog.iter_chunk_ids(h, m)]
        distinct = {c for c in ids if c != ZERO_ID}
        net, a, b, contact, server = await sim_pair(nursery, StoreSource(h, threaded=False))
        ref = StoreSource(v, threaded=False)
        plain_copies = {c: bytes(v.read(c)) for c in distinct}

        async def plain_reader(cid):               # bytes nobody checked yet
            await trio.lowlevel.checkpoint()
            return plain_copies.get(cid)

        def prove(reader, **kw):
            return prove_holder(a, contact, r.manifest_id, ids, reader, rng=random.Random(3),
                                sample_size=MAX_SAMPLE, timeout=30, **kw)

        res = await prove(ref.read)                # verified store reads: no key needed
        assert (res.result, res.proven) == ("ok", len(distinct))
        res = await prove(plain_reader, key=key)   # unchecked bytes, checked under the key
        assert (res.result, res.proven) == ("ok", len(distinct))
        res = await prove(plain_reader)            # unchecked bytes, no key: no reference
        assert res.result == "failed" and res.unverifiable == len(distinct)
        # a bad reference copy is no reference (an honest holder is not "damaged")
        victim = sorted(distinct)[0]
        plain_copies[victim] = b"\0" + plain_copies[victim][1:]
        res = await prove(plain_reader, key=key)
        assert res.result == "ok" and res.unverifiable == 1
        # a damaged sealed record at the holder reads as not held there
        pack, offset = h.location(victim)[:2]
        with open(h.pack_path(pack), "r+b") as f:
            f.seek(offset + 100)
            byte = f.read(1)
            f.seek(offset + 100)
            f.write(bytes([byte[0] ^ 1]))
        res = await prove(ref.read)
        assert res.result == "missing" and res.missing_ids == (victim,)
        assert server.errors == []


async def test_sealed_challenges_prove_a_storage_only_holder(nursery, autojump_clock, tmp_path):
    """A holder without the key (its records fetched opaque from the author) answers
    the sealed form; the author checks the answers against its own sealed records.
    A reference that is another encoding of the chunk is settled by fetching the
    holder's record (retrieve); a damaged record there is "damaged", and a holder
    that answers without holding is caught the same way."""
    from test_swarm import Net

    from hypersdk.node.exchange.chunk_source import StoreSink
    from hypersdk.node.exchange.client import get_some
    from hypersdk.node.exchange.server import ExchangeServer
    from hypersdk.node.store import packfile
    from hypersdk.protocol.exchange import CODEC_SEALED
    from hypersdk.protocol.exchange import PROTOCOL_ID as EXCHANGE
    from hypersdk.protocol.sealing import KIND_CHUNK, seal

    img = mixed_image(tmp_path / "disk.img", 30 * CS, chunk=CS)
    key = datakey.create(tmp_path / "author")
    datakey.create(tmp_path / "holder")                        # its own key, not the author's
    with ChunkStore(tmp_path / "author") as au, ChunkStore(tmp_path / "holder") as h:
        r = backup(au, str(img), name="vm", chunk_size=CS)
        net = await Net(nursery).start()
        async with StoreSink(h, threaded=False) as sink:
            res = await net.downloader(sink, [net.provider(StoreSource(au, threaded=False))],
                                       opaque_ok=True).download(r.manifest_id)
        assert res.opaque
        m = catalog.load_manifest(au, r.manifest_id)
        ids = [c for _, c in catalog.iter_chunk_ids(au, m)]
        distinct = {c for c in ids if c != ZERO_ID}
        hsrc = StoreSource(h, threaded=False)
        _, a, b, contact, server = await sim_pair(nursery, hsrc)
        b.set_handler(EXCHANGE, ExchangeServer(hsrc).handle)     # the holder serves records
        mine = StoreSource(au, threaded=False)

        async def own_records(cid):
            got = await mine.get(cid)
            return got[2] if got and got[0] == CODEC_SEALED else None

        async def retrieve(c, cids):
            return {i: d.payload for i, d in (await get_some(a, c, cids)).items()
                    if d.codec == CODEC_SEALED}

        def prove(reader, **kw):
            return prove_holder(a, contact, r.manifest_id, ids, reader, rng=random.Random(5),
                                sample_size=MAX_SAMPLE, timeout=30, key=key, sealed=True, **kw)

        res = await prove(own_records, retrieve=retrieve)
        assert (res.result, res.proven, res.retrieved) == ("ok", len(distinct), 0)
        # the plaintext form: this holder cannot answer it (it holds no plaintext)
        plain = await prove_holder(a, contact, r.manifest_id, ids, mine.read,
                                   rng=random.Random(5), sample_size=MAX_SAMPLE, timeout=30)
        assert plain.result == "missing" and plain.not_held == len(distinct)

        # references of another encoding (the same chunk sealed raw): retrieval settles it
        async def raw_records(cid):
            data = au.read(cid)
            return bytes(seal(key, KIND_CHUNK, cid, 0, len(data), data))
        res = await prove(raw_records)                             # no second look: wrong
        assert res.result == "damaged"
        res = await prove(raw_records, retrieve=retrieve)
        assert res.result == "ok" and 0 < res.retrieved <= 8
        assert res.proven + res.unverifiable == len(distinct) and res.proven >= 8

        # damage at the holder: a flipped byte inside one sealed record
        victim = sorted(distinct)[0]
        pack, offset, stored_len = h.location(victim)[:3]
        assert packfile.is_opaque(h.location(victim)[4])
        with open(h.pack_path(pack), "r+b") as f:
            f.seek(offset + packfile.HDR_LEN + stored_len // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 1]))
        res = await prove(own_records, retrieve=retrieve)
        assert res.result == "damaged" and res.wrong_ids == (victim,) and res.retrieved == 1
        assert server.errors == []
