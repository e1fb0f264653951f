"""Encryption at rest in the chunk store (step 1): a data dir with a data key stores
keyed ids and sealed records; one without works as before; old plaintext stores
stay readable. Real stores on disk, no mocks."""
from __future__ import annotations

import os
import random
import shutil
import sqlite3

import pytest
from conftest import mixed_image, random_image, same_bytes

from hypersdk.node.errors import UserError
from hypersdk.node.net import datakey
from hypersdk.node.service.backup import backup
from hypersdk.node.service.restore import restore
from hypersdk.node.service.verify_source import verify_against
from hypersdk.node.store import catalog, packfile
from hypersdk.node.store.gc import gc
from hypersdk.node.store.store import SCHEMA_VERSION, ChunkStore
from hypersdk.node.store.verify import verify_backup, verify_store
from hypersdk.protocol.chunks import ZERO_ID, chunk_id
from hypersdk.protocol.errors import ChunkCorrupt
from hypersdk.protocol.manifest import LIST_ENTRIES
from hypersdk.protocol.sealing import RECORD_OVERHEAD, keyed_id

CS = 64 << 10
SEALED_KEYED = packfile.SEALED | packfile.KEYED


def _keyed_store(path):
    datakey.create(path)
    return ChunkStore(path)


def _codecs(store) -> set[int]:
    return {c for (c,) in store.db.execute("SELECT DISTINCT codec FROM chunks")}


def _ids(store) -> set[bytes]:
    return {bytes(c) for (c,) in store.db.execute("SELECT id FROM chunks")}


def _sparse(path, size, at):
    """A sparse file of `size` bytes with random 3-chunk runs at offsets `at`."""
    rng = random.Random(5)
    with open(path, "wb") as f:
        f.truncate(size)
        for off in at:
            f.seek(off)
            f.write(rng.randbytes(min(3 * CS, size - off)))
    return path


def _image(kind, path):
    """The interesting sizes and shapes (each with its reason)."""
    rng = random.Random(kind)
    if kind == "empty":                    # 0 bytes: no chunk, no hash list
        path.write_bytes(b"")
    elif kind == "one":                    # 1 byte: a short, sealed last chunk
        path.write_bytes(b"\x01")
    elif kind == "chunk-1":                # one byte short of a chunk
        path.write_bytes(rng.randbytes(CS - 1))
    elif kind == "chunk":                  # exactly one chunk
        path.write_bytes(rng.randbytes(CS))
    elif kind == "chunk+1":                # a full chunk and a 1-byte chunk
        path.write_bytes(rng.randbytes(CS + 1))
    elif kind == "zeros":                  # all zero: never stored, never sealed
        path.write_bytes(bytes(4 * CS))
    elif kind == "incompressible":         # raw payloads inside the seals
        random_image(path, 6 * CS + 17, seed=9)
    elif kind == "mixed":                  # zero, compressible and random chunks
        mixed_image(path, 12 * CS + 5, chunk=CS)
    elif kind == "sparse-two-lists":       # holes anywhere; two hash-list pieces
        n = LIST_ENTRIES + 3
        _sparse(path, n * CS - 100, [0, 10_000 * CS + 7, (n - 2) * CS])
    return path


@pytest.mark.parametrize("kind", ["empty", "one", "chunk-1", "chunk", "chunk+1", "zeros",
                                  "incompressible", "mixed", "sparse-two-lists"])
def test_round_trip_with_a_key(tmp_path, kind):
    img = _image(kind, tmp_path / "img")
    with _keyed_store(tmp_path / "data") as s:
        key = s.key
        r = backup(s, str(img), chunk_size=CS)
        m = catalog.load_manifest(s, r.manifest_id)
        assert m.key == key.fingerprint
        assert m.id == chunk_id(m.encode())             # the manifest id stays plain
        data = img.read_bytes() if kind != "sparse-two-lists" else None
        for i, cid in catalog.iter_chunk_ids(s, m):
            if data is not None:
                piece = data[i * CS:(i + 1) * CS]
                want = ZERO_ID if piece == bytes(len(piece)) else keyed_id(key, piece)
                assert cid == want
            if cid != ZERO_ID:
                assert cid != chunk_id(s.read(cid))     # never a plain BLAKE3 id
        assert _codecs(s) <= {SEALED_KEYED | c for c in packfile.INNER_CODECS}
        for cid in _ids(s):
            loc = s.location(cid)
            assert loc[2] >= RECORD_OVERHEAD and loc[4] & SEALED_KEYED == SEALED_KEYED
        (fp,) = s.db.execute("SELECT key FROM manifests").fetchone()
        assert bytes(fp) == key.fingerprint
        if kind in ("empty", "zeros"):
            assert not _ids(s)
        restore(s, "img", str(tmp_path / "out"))
        assert same_bytes(img, tmp_path / "out")
        assert verify_backup(s, "img").ok and verify_store(s).ok


def test_two_sites_sharing_a_key_dedup_and_other_keys_share_nothing(tmp_path):
    img = mixed_image(tmp_path / "img", 20 * CS, chunk=CS)
    a_dir, b_dir, c_dir = (tmp_path / n for n in "abc")
    key = datakey.create(a_dir)
    datakey.install(b_dir, key.secret)                  # the second site of the tenant
    datakey.create(c_dir)                                # another tenant
    got = {}
    for d in (a_dir, b_dir, c_dir):
        with ChunkStore(d) as s:
            r = backup(s, str(img), chunk_size=CS, now_ns=lambda: 1)
            got[d] = (r.manifest_id, _ids(s),
                      {c: bytes(s.read_stored(c)[2]) for c in _ids(s)})
    (ma, ids_a, recs_a), (mb, ids_b, recs_b), (mc, ids_c, _) = got.values()
    assert ids_a and ids_a == ids_b and ma == mb
    assert recs_a == recs_b                  # deterministic seals: the same records, byte for byte
    assert not ids_a & ids_c and ma != mc


def test_plaintext_store_stays_readable_after_a_key_is_added(tmp_path):
    img = mixed_image(tmp_path / "img", 16 * CS, chunk=CS)
    d = tmp_path / "data"
    with ChunkStore(d) as s:
        assert s.key is None
        backup(s, str(img), name="vm", chunk_size=CS)
        assert _codecs(s) <= set(packfile.INNER_CODECS)          # plaintext, as before
        (fp,) = s.db.execute("SELECT key FROM manifests").fetchone()
        assert fp is None
        old = set(_ids(s))
    old_bytes = img.read_bytes()
    data = bytearray(old_bytes)
    data[2 * CS + 5:2 * CS + 4101] = random.Random(2).randbytes(4096)   # a delta candidate
    img.write_bytes(data)
    key = datakey.create(d)
    with ChunkStore(d) as s:                      # a running node would see it too
        assert s.key == key
        r2 = backup(s, str(img), name="vm", chunk_size=CS)
        new = _ids(s) - old
        assert new and all(s.location(c)[4] & SEALED_KEYED == SEALED_KEYED for c in new)
        # no sealed delta leans on a plaintext record (that would keep it alive)
        bases = {bytes(b) for (b,) in s.db.execute(
            "SELECT base FROM chunks WHERE base IS NOT NULL")}
        assert not bases & old
        assert catalog.load_manifest(s, r2.manifest_id).key == key.fingerprint
        restore(s, "vm@1", str(tmp_path / "v1"))
        restore(s, "vm@2", str(tmp_path / "v2"))
        assert (tmp_path / "v1").read_bytes() == old_bytes
        assert (tmp_path / "v2").read_bytes() == bytes(data)
        assert verify_store(s).ok
        # once the old backup is gone, no plaintext record is left
        catalog.delete_backup(s, catalog.resolve(s, "vm@1"))
        gc(s)
        assert _codecs(s) <= {SEALED_KEYED | c for c in packfile.INNER_CODECS}
        assert verify_store(s).ok


def test_a_schema_2_store_is_upgraded_in_place(tmp_path):
    img = mixed_image(tmp_path / "img", 6 * CS, chunk=CS)
    d = tmp_path / "data"
    with ChunkStore(d) as s:
        backup(s, str(img), name="vm", chunk_size=CS)
    db = sqlite3.connect(d / "index.sqlite")             # as the previous release left it
    db.execute("ALTER TABLE manifests DROP COLUMN key")
    db.execute("PRAGMA user_version=2")
    db.commit()
    db.close()
    datakey.create(d)
    with ChunkStore(d) as s:
        assert s.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
        restore(s, "vm", str(tmp_path / "out"))
        assert same_bytes(img, tmp_path / "out")
        backup(s, str(img), name="vm", chunk_size=CS)   # a new backup is sealed
        assert verify_store(s).ok
        assert [r[0] is None for r in s.db.execute(
            "SELECT key FROM manifests ORDER BY key IS NULL")] == [False, True]


def _flip(store, cid, at):
    pack, offset = store.location(cid)[:2]
    with open(store.pack_path(pack), "r+b") as f:
        f.seek(offset + packfile.HDR_LEN + at)
        b = f.read(1)
        f.seek(offset + packfile.HDR_LEN + at)
        f.write(bytes([b[0] ^ 0x10]))


@pytest.mark.parametrize("at", [3, 20, 200])     # the seal's header, its IV, its ciphertext
def test_a_flipped_byte_in_a_sealed_record_is_a_named_corrupt_chunk(tmp_path, at):
    img = random_image(tmp_path / "img", 8 * CS, seed=4)
    with _keyed_store(tmp_path / "data") as s:
        r = backup(s, str(img), chunk_size=CS)
        m = catalog.load_manifest(s, r.manifest_id)
        victim = [c for _, c in catalog.iter_chunk_ids(s, m)][5]
        _flip(s, victim, at)
        with pytest.raises(ChunkCorrupt) as e:
            s.read(victim)
        assert e.value.cid == victim and "sealed record" in e.value.reason
        assert "pack-" in e.value.where
        rep = verify_backup(s, "img")
        assert set(rep.damaged) == {victim} and "sealed record" in rep.damaged[victim].reason
        assert set(verify_store(s).damaged) == {victim}
        with pytest.raises(ChunkCorrupt, match=victim.hex()):
            restore(s, "img", str(tmp_path / "out"))
        assert not (tmp_path / "out").exists()


def test_a_damaged_sealed_manifest_is_reported_not_decoded(tmp_path):
    img = random_image(tmp_path / "img", 3 * CS, seed=5)
    with _keyed_store(tmp_path / "data") as s:
        r = backup(s, str(img), chunk_size=CS)
        (body,) = s.db.execute("SELECT body FROM manifests").fetchone()
        bad = bytearray(body)
        bad[-3] ^= 1
        with s.db:
            s.db.execute("UPDATE manifests SET body=?", (bytes(bad),))
        rep = verify_backup(s, "img")
        assert set(rep.damaged) == {r.manifest_id}
        assert "sealed manifest does not open" in rep.damaged[r.manifest_id].reason
        with pytest.raises(ChunkCorrupt, match="sealed manifest"):
            restore(s, "img", str(tmp_path / "out"))


@pytest.mark.parametrize("other", ["no key", "another key"])
def test_a_node_without_the_key_gets_one_clear_line(tmp_path, other):
    img = mixed_image(tmp_path / "img", 6 * CS, chunk=CS)
    d = tmp_path / "data"
    with _keyed_store(d) as s:
        fp = s.key.fingerprint.hex()[:16]
        backup(s, str(img), name="vm", chunk_size=CS)
    shutil.move(datakey.path(d), tmp_path / "kept.key")
    if other == "another key":
        datakey.create(d)
    line = f"this backup is encrypted with data key {fp}; this node does not have it"
    with ChunkStore(d) as s:
        for op in (lambda: restore(s, "vm", str(tmp_path / "out")),
                   lambda: verify_backup(s, "vm"),
                   lambda: verify_store(s),
                   lambda: verify_against(s, "vm", str(img))):
            with pytest.raises(UserError) as e:
                op()
            assert str(e.value) == line
        assert not (tmp_path / "out").exists()
        assert [b.ref for b in catalog.list_backups(s)] == ["vm@1"]   # still listed
        with pytest.raises(UserError, match="gc stopped, nothing deleted"):
            gc(s)


def test_verify_against_compares_keyed_ids(tmp_path):
    img = mixed_image(tmp_path / "img", 9 * CS + 3, chunk=CS)
    with _keyed_store(tmp_path / "data") as s:
        backup(s, str(img), name="vm", chunk_size=CS)
        rep = verify_against(s, "vm", str(img))
        assert rep.ok and rep.chunks_compared == 10
        data = bytearray(img.read_bytes())
        data[4 * CS + 9] ^= 0xFF
        img.write_bytes(data)
        rep = verify_against(s, "vm", str(img))
        assert not rep.ok and rep.differing == 1
        (d,) = rep.listed
        assert d.index == 4 and d.source == keyed_id(s.key, bytes(data[4 * CS:5 * CS]))


def test_sealed_deltas_survive_compaction(tmp_path):
    img = mixed_image(tmp_path / "img", 24 * CS, chunk=CS)
    with _keyed_store(tmp_path / "data") as s:
        backup(s, str(img), name="vm", chunk_size=CS)
        data = bytearray(img.read_bytes())
        for i in range(1, 24, 3):                       # small changes in many chunks
            data[i * CS + 100:i * CS + 600] = random.Random(i).randbytes(500)
        img.write_bytes(data)
        backup(s, str(img), name="vm", chunk_size=CS)
        assert s.stats()["delta_chunks"] >= 1
        assert any(packfile.inner(c) == packfile.CODEC_ZSTD_DELTA for c in _codecs(s))
        packs_before = sorted(os.listdir(s.packs_dir))
        catalog.delete_backup(s, catalog.resolve(s, "vm@1"))
        rep = gc(s, punch=False, threshold=0.0)        # copy every live record
        assert rep["packs_rewritten"] >= 1 and sorted(os.listdir(s.packs_dir)) != packs_before
        assert verify_store(s).ok
        restore(s, "vm", str(tmp_path / "out"))
        assert (tmp_path / "out").read_bytes() == bytes(data)
