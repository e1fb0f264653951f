"""Delta compression of changed chunks against the previous version of an image."""
import random

import pytest
from conftest import same_bytes

from hypersdk.node.service.backup import backup
from hypersdk.node.service.restore import restore
from hypersdk.node.store import catalog
from hypersdk.node.store.delta import DeltaPolicy
from hypersdk.node.store.gc import gc
from hypersdk.node.store.packfile import CODEC_ZSTD_DELTA
from hypersdk.node.store.verify import verify_store
from hypersdk.protocol.chunks import chunk_id
from hypersdk.protocol.errors import ChunkCorrupt

CS = 64 << 10
BLOCK = 4096


def _day(path, data: bytearray, changes: dict[int, int], seed: int):
    """Rewrite some 4 KiB blocks: {chunk index: blocks changed in it}."""
    rng = random.Random(seed)
    for idx, nblocks in changes.items():
        for b in rng.sample(range(CS // BLOCK), nblocks):
            off = idx * CS + b * BLOCK
            data[off:off + BLOCK] = rng.randbytes(BLOCK)
    path.write_bytes(data)
    return bytes(data)


def _codec_base(store, data: bytes, index: int):
    cid = chunk_id(data[index * CS:(index + 1) * CS])
    return store.location(cid)[4], store.base_of(cid), cid


@pytest.fixture
def versions(store, tmp_path):
    """Three daily versions of an incompressible 8-chunk disk named 'vm'."""
    img = tmp_path / "disk.img"
    data = bytearray(random.Random(1).randbytes(8 * CS))
    days = [_day(img, data, {}, 0)]
    backup(store, str(img), name="vm", chunk_size=CS)
    days.append(_day(img, data, {1: 2, 5: 1}, 2))
    r2 = backup(store, str(img), name="vm", chunk_size=CS)
    days.append(_day(img, data, {1: 1, 6: 3}, 3))
    r3 = backup(store, str(img), name="vm", chunk_size=CS)
    return days, r2, r3


def test_changed_chunks_cost_only_their_changed_blocks(store, versions, tmp_path):
    days, r2, r3 = versions
    assert r2.new_chunks == 2
    # random data: plain zstd could not shrink 2 chunks below 2 * CS; the deltas
    # hold the 3 changed 4 KiB blocks plus small overheads
    assert r2.new_bytes_stored < 3 * BLOCK + 2 * 400
    assert _codec_base(store, days[1], 1)[0] == CODEC_ZSTD_DELTA
    assert store.stats()["delta_chunks"] == 4      # 2 changed on day 2, 2 on day 3
    for k, day in enumerate(days, 1):
        out = tmp_path / f"out{k}.img"
        restore(store, f"vm@{k}", str(out))
        assert out.read_bytes() == day
    assert verify_store(store).ok


def test_bases_are_always_full_chunks(store, versions):
    days, _, _ = versions
    # chunk 1 changed on day 2 (a delta on day 1) and again on day 3: day 3's
    # delta must be against day 1's full chunk, never against day 2's delta
    codec3, base3, _ = _codec_base(store, days[2], 1)
    assert codec3 == CODEC_ZSTD_DELTA
    assert base3 == chunk_id(days[0][CS:2 * CS])
    assert store.location(base3)[4] != CODEC_ZSTD_DELTA


def test_gc_keeps_bases_of_live_deltas(store, versions, tmp_path):
    days, _, _ = versions
    catalog.delete_backup(store, catalog.resolve(store, "vm@1"))
    catalog.delete_backup(store, catalog.resolve(store, "vm@2"))
    r = gc(store)
    # day 2's own deltas go; day 1's chunks 1 and 6 stay as bases of day 3's deltas
    assert r["chunks_deleted"] >= 1
    _, base, _ = _codec_base(store, days[2], 1)
    assert store.has(base)
    out = tmp_path / "out.img"
    restore(store, "vm", str(out))
    assert out.read_bytes() == days[2]
    assert verify_store(store).ok
    catalog.delete_backup(store, catalog.resolve(store, "vm@3"))
    gc(store)
    assert store.stats()["unique_chunks"] == 0


def test_damaged_base_damages_its_deltas_and_their_backups(store, versions):
    days, _, _ = versions
    _, base, delta_cid = _codec_base(store, days[1], 1)
    pack, offset, stored_len = store.location(base)[:3]
    with open(store.pack_path(pack), "r+b") as f:
        f.seek(offset + 45 + stored_len // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ChunkCorrupt, match="delta base"):
        store.read(delta_cid)
    report = verify_store(store)
    assert {base, delta_cid} <= set(report.damaged)
    assert {b.ref for b, _ in report.affected.values()} == {"vm@1", "vm@2", "vm@3"}


def test_unrelated_image_under_the_same_name_is_stored_plain(store, tmp_path):
    img = tmp_path / "disk.img"
    text = b"".join(b"%08d line of a log file\n" % i for i in range(40000))
    img.write_bytes(text[:8 * CS])
    backup(store, str(img), name="vm", chunk_size=CS)
    other = bytes(reversed(text))[:8 * CS]
    img.write_bytes(other)
    backup(store, str(img), name="vm", chunk_size=CS)
    codecs = {_codec_base(store, other, i)[0] for i in range(8)}
    assert CODEC_ZSTD_DELTA not in codecs
    out = tmp_path / "o.img"
    restore(store, "vm", str(out))
    assert same_bytes(out, img)


def test_other_chunk_size_is_no_parent(store, tmp_path):
    img = tmp_path / "disk.img"
    data = bytearray(random.Random(4).randbytes(8 * CS))
    img.write_bytes(data)
    backup(store, str(img), name="vm", chunk_size=CS)
    data[100] ^= 1
    img.write_bytes(data)
    r = backup(store, str(img), name="vm", chunk_size=2 * CS)
    assert r.new_bytes_stored > 8 * CS        # no deltas across chunk sizes


def test_policy_stops_trying_deltas_that_lose_and_keeps_sampling():
    p = DeltaPolicy()
    for _ in range(p.WARMUP):
        assert p.should_try()
        p.record(False)
    tries = sum(p.should_try() for _ in range(160))
    assert tries == 10                        # 1 in 16 keep sampling
    for _ in range(40):
        p.record(True)
    assert p.should_try()                     # winning again: back to every chunk
