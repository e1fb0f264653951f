"""Corruption detection, verify reports, delete and garbage collection."""
import os

import pytest
from conftest import mixed_image, random_image, same_bytes

from hypersdk.node.errors import UserError
from hypersdk.node.service.backup import backup
from hypersdk.node.service.restore import restore
from hypersdk.node.store import catalog
from hypersdk.node.store.gc import gc
from hypersdk.node.store.packfile import HDR_LEN
from hypersdk.node.store.verify import verify_backup, verify_store
from hypersdk.protocol.errors import ChunkCorrupt, ChunkHashMismatch

CS = 64 << 10


def _flip(store, cid: bytes, delta: int = HDR_LEN + 10):
    """Flip one byte of a stored chunk record on disk."""
    pack, offset = store.location(cid)[:2]
    path = store.pack_path(pack)
    with open(path, "r+b") as f:
        f.seek(offset + delta)
        b = f.read(1)
        f.seek(offset + delta)
        f.write(bytes([b[0] ^ 0x40]))


def _data_chunks(store, b):
    m = catalog.load_manifest(store, b.manifest_id)
    return [c for _, c in catalog.iter_chunk_ids(store, m) if c != bytes(32)]


@pytest.fixture
def two_backups(store, tmp_path):
    a = random_image(tmp_path / "a.img", 6 * CS, seed=1)
    b = tmp_path / "b.img"
    b.write_bytes(a.read_bytes()[:3 * CS] + random_image(tmp_path / "x", 3 * CS, 2).read_bytes())
    backup(store, str(a), chunk_size=CS)
    backup(store, str(b), chunk_size=CS)
    return catalog.resolve(store, "a.img"), catalog.resolve(store, "b.img")


def test_flipped_byte_is_named_with_every_affected_backup(store, two_backups):
    a, b = two_backups
    shared = _data_chunks(store, a)[0]          # in both backups
    only_b = _data_chunks(store, b)[-1]
    _flip(store, shared)
    _flip(store, only_b)
    report = verify_store(store)
    assert not report.ok
    assert set(report.damaged) == {shared, only_b}
    affected = {bk.ref: cids for bk, cids in report.affected.values()}
    assert affected == {"a.img@1": {shared}, "b.img@1": {shared, only_b}}
    # per-backup verify names only that backup's damage
    ra = verify_backup(store, "a.img")
    assert set(ra.damaged) == {shared}


def test_restore_of_damaged_backup_fails_and_leaves_no_output(store, two_backups, tmp_path):
    a, _ = two_backups
    victim = _data_chunks(store, a)[2]
    _flip(store, victim)
    out = tmp_path / "out.img"
    with pytest.raises(ChunkHashMismatch) as ei:
        restore(store, "a.img", str(out))
    assert ei.value.cid == victim
    assert not out.exists()
    assert [p for p in tmp_path.iterdir() if "partial" in p.name] == []


def test_damaged_record_header_and_truncated_pack_are_reported(store, two_backups):
    a, _ = two_backups
    chunks = _data_chunks(store, a)
    _flip(store, chunks[1], delta=10)           # inside the header's chunk id
    with pytest.raises(ChunkCorrupt, match="header"):
        store.read(chunks[1])
    pack, offset = store.location(chunks[-1])[:2]
    last_end = max(o for p, o, *_ in store.db.execute(
        "SELECT pack, offset FROM chunks WHERE pack=?", (pack,)))
    os.truncate(store.pack_path(pack), last_end + 5)
    report = verify_store(store)
    assert chunks[1] in report.damaged
    assert any("truncated" in d.reason for d in report.damaged.values())


def test_damaged_hash_list_marks_the_backup(store, two_backups):
    a, _ = two_backups
    m = catalog.load_manifest(store, a.manifest_id)
    _flip(store, m.lists[0])
    report = verify_store(store)
    assert m.lists[0] in report.damaged
    assert a.seq in report.affected
    with pytest.raises(UserError, match="nothing deleted"):
        gc(store)                               # cannot know what that list references


def test_delete_then_gc_reclaims_only_unreferenced_chunks(store, two_backups, tmp_path):
    a, b = two_backups
    before = store.stats()
    catalog.delete_backup(store, a)
    r = gc(store, threshold=0.0)
    only_a = set(_data_chunks(store, b))
    assert r["chunks_deleted"] == 3 + 1          # a's own 3 data chunks + its hash list
    assert store.stats()["unique_chunks"] == before["unique_chunks"] - 4
    assert all(store.has(c) for c in only_a)
    assert r["disk_bytes_after"] < r["disk_bytes_before"]
    out = tmp_path / "out.img"
    restore(store, "b.img", str(out))
    assert same_bytes(out, tmp_path / "b.img")
    assert verify_store(store).ok
    with pytest.raises(UserError, match="no backup"):
        catalog.resolve(store, "a.img")


def test_gc_removes_chunks_of_an_interrupted_backup(store, tmp_path):
    src = mixed_image(tmp_path / "s.img", 9 * CS)
    backup(store, str(src), chunk_size=CS)
    # chunks committed by a run that never recorded its backup
    with store.write_lock(), store.writer() as w:
        from hypersdk.node.store.store import compress
        from hypersdk.protocol.chunks import chunk_id
        data = os.urandom(CS)
        codec, stored = compress(data, 3)
        w.put(chunk_id(data), CS, codec, stored)
        w.commit()
    assert not verify_store(store).damaged
    r = gc(store)
    assert r["chunks_deleted"] == 1
    assert verify_store(store).ok


@pytest.mark.parametrize("punch", [True, False], ids=["punch-holes", "compact"])
def test_gc_frees_disk_and_everything_still_restores(store, tmp_path, punch):
    imgs = [random_image(tmp_path / f"i{k}.img", 8 * CS, seed=k) for k in range(4)]
    for p in imgs:
        backup(store, str(p), chunk_size=CS)
    for k in (0, 2):
        catalog.delete_backup(store, catalog.resolve(store, f"i{k}.img"))
    r = gc(store, threshold=0.2, punch=punch)
    if punch:
        assert r["packs_rewritten"] == 0 and r["dead_gap_bytes"] >= 16 * CS
    else:
        assert r["packs_rewritten"] == 1
    # the dead chunks' disk space really came back
    assert r["disk_bytes_after"] <= r["disk_bytes_before"] - 15 * CS
    assert store.stats()["pack_bytes_on_disk"] == r["disk_bytes_after"]
    again = gc(store)
    assert again["chunks_deleted"] == 0 and again["disk_bytes_after"] == r["disk_bytes_after"]
    for k in (1, 3):
        out = tmp_path / f"o{k}.img"
        restore(store, f"i{k}.img", str(out))
        assert same_bytes(out, imgs[k])
    assert verify_store(store).ok


def test_ref_forms(store, tmp_path):
    src = mixed_image(tmp_path / "vm.img", 3 * CS)
    r1 = backup(store, str(src), name="vm", chunk_size=CS)
    r2 = backup(store, str(src), name="vm", chunk_size=CS)
    assert catalog.resolve(store, "vm").manifest_id == r2.manifest_id
    assert catalog.resolve(store, "vm@1").manifest_id == r1.manifest_id
    assert catalog.resolve(store, r1.manifest_id.hex()[:12]).version == 1
    with pytest.raises(UserError, match="versions: 1, 2"):
        catalog.resolve(store, "vm@3")
    with pytest.raises(UserError, match="no backup"):
        catalog.resolve(store, "nothing")
    # versions keep their numbers when an older one is deleted
    catalog.delete_backup(store, catalog.resolve(store, "vm@1"))
    assert catalog.resolve(store, "vm@2").manifest_id == r2.manifest_id
    r3 = backup(store, str(src), name="vm", chunk_size=CS)
    assert r3.version == 3


def test_compaction_with_many_batch_commits_repoints_every_row(store, tmp_path, monkeypatch):
    """gc's relocating writer commits in batches; every batch must repoint its
    rows (an INSERT OR IGNORE batch would leave rows at the unlinked pack)."""
    monkeypatch.setenv("HYPERSDK_COMMIT_BYTES", str(CS))      # a commit per chunk
    imgs = [random_image(tmp_path / f"i{k}.img", 6 * CS, seed=10 + k) for k in range(2)]
    for p in imgs:
        backup(store, str(p), chunk_size=CS)
    catalog.delete_backup(store, catalog.resolve(store, "i0.img"))
    r = gc(store, threshold=0.2, punch=False)
    assert r["packs_rewritten"] == 1
    assert verify_store(store).ok
    out = tmp_path / "o.img"
    restore(store, "i1.img", str(out))
    assert same_bytes(out, imgs[1])
