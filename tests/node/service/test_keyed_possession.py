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
