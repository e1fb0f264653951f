"""A storage-only holder (a member without the tenant's data key) keeps a keyed
backup's sealed records for the key's holders: it fetches them (Downloader
opaque_ok), stores chunks exactly as the tenant sealed them and hash-list pieces
sealed under its own key, checks what it can, cannot read a byte of the image,
serves the records as stored, and a key holder restores the image from it alone.
simnet (virtual time unless a test says otherwise), real stores."""
from __future__ import annotations

import pytest
import trio
from conftest import mixed_image
from test_keyed_swarm import CS, OTHER, K, _records, _store_with
from test_swarm import LIMIT, Net

from hypersdk.node.exchange.chunk_source import StoreSink, StoreSource
from hypersdk.node.exchange.swarm import DownloadError
from hypersdk.node.service.backup import backup
from hypersdk.node.service.replication import held_completely, record_replica
from hypersdk.node.service.restore import restore
from hypersdk.node.store import catalog, packfile
from hypersdk.node.store.gc import gc
from hypersdk.node.store.sealed import DataKeyNotHeld
from hypersdk.node.store.verify import verify_backup, verify_store
from hypersdk.protocol.chunks import ZERO_ID

OPAQUE = packfile.FOREIGN | packfile.SEALED | packfile.KEYED


def _two_versions(tmp_path, a):
    """Back up an image, change a few bytes of most chunks, back it up again: the
    second version's changed chunks are zstd deltas at `a` (sealed, keyed)."""
    img = mixed_image(tmp_path / "disk.img", 24 * CS + 77, chunk=CS)
    r1 = backup(a, str(img), name="vm", chunk_size=CS)
    data = bytearray(img.read_bytes())
    for at in range(CS // 2, len(data), CS):
        data[at:at + 16] = b"changed 16 bytes"
    img.write_bytes(bytes(data))
    r2 = backup(a, str(img), name="vm", chunk_size=CS)
    assert a.stats()["delta_chunks"] > 0
    return img, r1.manifest_id, r2.manifest_id


async def _fetch(net, store, peers, mid, **kw):
    async with StoreSink(store, threaded=False) as sink:
        return await net.downloader(sink, peers, **kw).download(mid)


async def test_a_storage_only_holder_keeps_sealed_records_and_a_key_holder_restores_from_it(
        nursery, autojump_clock, tmp_path):
    with _store_with(tmp_path / "a", K) as a, _store_with(tmp_path / "h", OTHER) as h, \
            _store_with(tmp_path / "c", K) as c:
        img, mid1, mid2 = _two_versions(tmp_path, a)
        net = await Net(nursery).start()
        source_a = StoreSource(a, threaded=False)
        pa = net.provider(source_a)
        with trio.fail_after(LIMIT):
            for mid in (mid1, mid2):
                # without opaque_ok the holder refuses as before: one clear line
                with pytest.raises(DownloadError, match="this node does not have it"):
                    await _fetch(net, h, [pa], mid)
                res = await _fetch(net, h, [pa], mid, opaque_ok=True)
                assert res.opaque and res.bad_chunks == 0
                assert held_completely(h, mid)
                assert record_replica(h, mid, res)
        rows = catalog.list_backups(h)
        # their names are sealed (manifest version 3): each is listed under its id
        assert [(b.name, b.version, b.stats.get("opaque")) for b in rows] == sorted(
            (catalog.sealed_name(mid), 1, True) for mid in (mid1, mid2))
        assert not catalog.load_manifest(h, mid1, opaque_ok=True).opened

        # what it stores: the tenant's sealed chunk records as A serves them (A's own
        # records where A stores them whole; deltas re-encoded and sealed again by A),
        # and the pieces sealed under H's own key; not one plaintext record
        m2 = catalog.load_manifest(h, mid2, opaque_ok=True)
        assert m2.key == K.fingerprint
        lists = {lid for mid in (mid1, mid2)
                 for lid in catalog.load_manifest(h, mid, opaque_ok=True).lists}
        rh, ra = _records(h), _records(a)
        assert rh.keys() == ra.keys() - {ZERO_ID}
        for cid, (codec, rec) in rh.items():
            if cid in lists:
                assert codec & ~packfile.INNER == packfile.FOREIGN | packfile.SEALED
            else:
                assert codec & ~packfile.INNER == OPAQUE
                a_codec = ra[cid][0]
                if packfile.inner(a_codec) != packfile.CODEC_ZSTD_DELTA:
                    assert (codec & ~packfile.FOREIGN, rec) == ra[cid]   # byte for byte
        assert source_a.served_sealed == len(rh) - len(lists)

        # H checks what it can, reads nothing, and gc keeps everything it holds
        for cid in rh.keys() - lists:
            with pytest.raises(DataKeyNotHeld, match="another tenant's sealed record"):
                h.read(cid)
        rep = verify_store(h)
        assert rep.ok and rep.chunks_checked == len(rh)
        assert verify_backup(h, catalog.sealed_name(mid2)).ok
        with pytest.raises(DataKeyNotHeld, match="this node does not have it"):
            restore(h, mid2.hex(), str(tmp_path / "h.img"))
        assert not (tmp_path / "h.img").exists()
        assert gc(h)["chunks_deleted"] == 0

        # a key holder restores from H alone, byte for byte, every record checked
        ph = net.provider(StoreSource(h, threaded=False))
        net.kill(pa)
        with trio.fail_after(LIMIT):
            res = await _fetch(net, c, [ph], mid2)
        assert not res.opaque and res.bad_chunks == 0 and res.bytes_by_peer.keys() == {ph.id}
        m = catalog.load_manifest(c, mid2)
        assert (m.name, m.source["path"]) == ("vm", str(img))     # the key opens the labels
        catalog.add_backup(c.db, m, {}, c.key)
        c.db.commit()
        restore(c, "vm", str(tmp_path / "c.img"))
        assert (tmp_path / "c.img").read_bytes() == img.read_bytes()
        assert verify_store(c).ok


async def test_damage_at_a_storage_only_holder_is_found_by_the_key_holder_not_by_it(
        nursery, autojump_clock, tmp_path):
    """H can check sizes and headers only: a flipped byte inside a sealed payload is
    invisible to it (verify ok) and caught by the first key holder that fetches it
    (the record does not open: that chunk comes from another holder instead)."""
    with _store_with(tmp_path / "a", K) as a, _store_with(tmp_path / "h", OTHER) as h, \
            _store_with(tmp_path / "c", K) as c:
        img = mixed_image(tmp_path / "disk.img", 12 * CS, chunk=CS)
        mid = backup(a, str(img), name="vm", chunk_size=CS).manifest_id
        net = await Net(nursery).start()
        pa = net.provider(StoreSource(a, threaded=False))
        with trio.fail_after(LIMIT):
            await _fetch(net, h, [pa], mid, opaque_ok=True)
        victim = next(cid for cid, (codec, _) in _records(h).items()
                      if codec & OPAQUE == OPAQUE)
        pack, offset, stored_len = h.location(victim)[:3]
        with open(h.pack_path(pack), "r+b") as f:
            f.seek(offset + packfile.HDR_LEN + stored_len - 5)     # inside the GCM tag
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 1]))
        assert verify_store(h).ok                      # nothing H could see
        ph = net.provider(StoreSource(h, threaded=False))
        with trio.fail_after(LIMIT), pytest.raises(DownloadError) as e:
            await _fetch(net, c, [ph], mid)           # H alone: that chunk is unobtainable
        assert victim in e.value.missing and not c.has(victim)
        with trio.fail_after(LIMIT):
            res = await _fetch(net, c, [ph, pa], mid)     # A has it
        assert res.chunks_fetched >= 1      # (H may be asked again: its copy fails again)
        assert c.has(victim) and len(c.read(victim)) > 0


async def test_a_holder_without_any_key_keeps_nothing(nursery, autojump_clock, tmp_path):
    with _store_with(tmp_path / "a", K) as a, _store_with(tmp_path / "h") as h:
        img = mixed_image(tmp_path / "disk.img", 6 * CS, chunk=CS)
        mid = backup(a, str(img), name="vm", chunk_size=CS).manifest_id
        net = await Net(nursery).start()
        pa = net.provider(StoreSource(a, threaded=False))
        with trio.fail_after(LIMIT), pytest.raises(DataKeyNotHeld, match="no data key at all"):
            await _fetch(net, h, [pa], mid, opaque_ok=True)
        assert h.stats()["unique_chunks"] == 0


async def test_a_restore_never_takes_the_opaque_path(nursery, autojump_clock, tmp_path):
    """opaque_ok is ignored with a tee (a restore writing an image): one clear line."""
    with _store_with(tmp_path / "a", K) as a, _store_with(tmp_path / "h", OTHER) as h:
        img = mixed_image(tmp_path / "disk.img", 6 * CS, chunk=CS)
        mid = backup(a, str(img), name="vm", chunk_size=CS).manifest_id
        net = await Net(nursery).start()
        pa = net.provider(StoreSource(a, threaded=False))
        with trio.fail_after(LIMIT), pytest.raises(DownloadError, match="does not have it"):
            await _fetch(net, h, [pa], mid, opaque_ok=True, tee=object())
        assert h.stats()["unique_chunks"] == 0
