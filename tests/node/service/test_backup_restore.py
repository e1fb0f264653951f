"""Backup/restore round trips through the store API at the interesting sizes."""
import os
import random

import pytest
from conftest import same_bytes

from hypersdk.node.service.backup import backup
from hypersdk.node.service.restore import restore
from hypersdk.node.store import catalog
from hypersdk.node.store.verify import verify_store
from hypersdk.protocol.chunks import ZERO_ID
from hypersdk.protocol.manifest import LIST_ENTRIES

CS = 64 << 10          # smallest chunk size: many chunks from small files


def _content(kind: str, size: int, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    if kind == "zero":
        return bytes(size)
    if kind == "random":
        return rng.randbytes(size)
    text = b"".join(b"%06d some log text\n" % rng.randrange(10**6) for _ in range(size // 20 + 1))
    return text[:size]


# (size, kind): each an edge of the chunker
SIZES = [
    (0, "text"),              # empty image: valid, no chunks
    (1, "text"),              # one byte: a single short chunk
    (CS - 1, "text"),         # one short chunk, just under a full one
    (CS, "text"),             # exactly one chunk
    (CS + 1, "text"),         # a full chunk and a 1-byte tail
    (5 * CS, "zero"),         # all-zero: nothing stored, restored as holes
    (3 * CS + 7, "random"),   # incompressible: stored raw
    (7 * CS + 100, "zero"),   # zero with a short zero tail
]


@pytest.mark.parametrize("direct", [None, False], ids=["o_direct", "buffered"])
@pytest.mark.parametrize("size, kind", SIZES)
def test_round_trip_is_byte_identical(store, tmp_path, size, kind, direct):
    src = tmp_path / "src.img"
    src.write_bytes(_content(kind, size))
    r = backup(store, str(src), chunk_size=CS)
    assert r.size == size
    assert r.chunks == -(-size // CS)
    out = tmp_path / "out.img"
    restore(store, r.manifest_id.hex(), str(out), direct=direct)
    assert out.read_bytes() == src.read_bytes()
    assert verify_store(store).ok


def test_zero_chunks_are_never_stored_and_restore_as_holes(store, tmp_path):
    src = tmp_path / "src.img"
    data = bytes(40 * CS) + _content("random", CS) + bytes(40 * CS)
    src.write_bytes(data)
    r = backup(store, str(src), chunk_size=CS)
    assert (r.zero_chunks, r.new_chunks) == (80, 1)
    # one data chunk + one hash list is all the store holds
    assert store.stats()["unique_chunks"] == 2
    out = tmp_path / "out.img"
    restore(store, "src.img", str(out))
    assert out.read_bytes() == data
    assert os.stat(out).st_blocks * 512 < 4 * CS      # holes, not written zeros


def test_incompressible_chunks_are_stored_raw(store, tmp_path):
    src = tmp_path / "src.img"
    src.write_bytes(_content("random", 4 * CS))
    backup(store, str(src), chunk_size=CS)
    codecs = {c for (c,) in store.db.execute("SELECT codec FROM chunks WHERE raw_len=?", (CS,))}
    assert codecs == {0}
    stored = store.db.execute("SELECT SUM(stored_len) FROM chunks WHERE raw_len=?", (CS,))
    assert stored.fetchone()[0] == 4 * CS


def test_compressible_chunks_are_compressed(store, tmp_path):
    src = tmp_path / "src.img"
    src.write_bytes(_content("text", 4 * CS))
    r = backup(store, str(src), chunk_size=CS)
    assert r.new_bytes_stored < r.size / 2


def test_dedup_across_images_and_versions(store, tmp_path):
    shared = _content("random", 6 * CS, seed=7)
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(shared + _content("random", 2 * CS, seed=8))
    b.write_bytes(_content("random", 2 * CS, seed=9) + shared)
    ra = backup(store, str(a), chunk_size=CS)
    rb = backup(store, str(b), chunk_size=CS)
    assert ra.new_chunks == 8
    assert rb.new_chunks == 2            # the 6 shared chunks are stored once
    again = backup(store, str(a), chunk_size=CS)
    assert again.new_chunks == 0 and again.version == 2
    assert store.stats()["unique_chunks"] == 10 + 2   # 10 data + 2 distinct hash lists (a twice)


def test_repeated_chunk_within_one_image_is_stored_once(store, tmp_path):
    block = _content("random", CS, seed=3)
    src = tmp_path / "src.img"
    src.write_bytes(block * 5)
    r = backup(store, str(src), chunk_size=CS)
    assert r.new_chunks == 1


def test_many_chunks_span_several_hash_list_pieces(store, tmp_path):
    """An image of LIST_ENTRIES + 2 chunks (2 GiB sparse at 64 KiB) needs two list
    pieces; data placed around the boundary must come back in its place."""
    n = LIST_ENTRIES + 2
    src = tmp_path / "big.img"
    marks = {0: b"first", LIST_ENTRIES - 1: b"before", LIST_ENTRIES: b"after", n - 1: b"last"}
    with open(src, "wb") as f:
        f.truncate(n * CS - 10)           # last chunk is short
        for i, tag in marks.items():
            f.seek(i * CS)
            f.write(tag * 100)
    r = backup(store, str(src), chunk_size=CS)
    m = catalog.load_manifest(store, r.manifest_id)
    assert len(m.lists) == 2 and ZERO_ID not in m.lists
    assert r.new_chunks == 4 and r.zero_chunks == n - 4
    out = tmp_path / "out.img"
    restore(store, "big.img", str(out))
    assert same_bytes(out, src)
    assert os.stat(out).st_blocks * 512 < 16 * CS


def test_all_zero_hash_list_piece_is_not_stored(store, tmp_path):
    src = tmp_path / "zero.img"
    with open(src, "wb") as f:
        f.truncate((LIST_ENTRIES + 1) * CS)
        f.seek(LIST_ENTRIES * CS)
        f.write(b"x")
    r = backup(store, str(src), chunk_size=CS)
    m = catalog.load_manifest(store, r.manifest_id)
    assert m.lists[0] == ZERO_ID and m.lists[1] != ZERO_ID
    out = tmp_path / "out.img"
    restore(store, "zero.img", str(out))
    assert same_bytes(out, src)


def test_interrupted_backup_keeps_committed_batches_and_rerun_reuses_them(
        store, tmp_path, monkeypatch):
    monkeypatch.setenv("HYPERSDK_COMMIT_BYTES", str(2 * CS))
    src = tmp_path / "src.img"
    src.write_bytes(_content("random", 10 * CS, seed=5))

    class Stop(Exception):
        pass

    seen = []

    def interrupt(n):
        seen.append(n)
        if len(seen) == 7:
            raise Stop

    with pytest.raises(Stop):
        backup(store, str(src), chunk_size=CS, progress=interrupt)
    assert catalog.list_backups(store) == []             # no partial backup
    kept = store.stats()["unique_chunks"]
    assert 2 <= kept < 7                                  # whole batches only
    assert verify_store(store).ok
    r = backup(store, str(src), chunk_size=CS)
    assert r.new_chunks == 10 - kept
    out = tmp_path / "out.img"
    restore(store, "src.img", str(out))
    assert out.read_bytes() == src.read_bytes()
