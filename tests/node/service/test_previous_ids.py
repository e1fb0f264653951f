"""PreviousIds (node/service/vm_backup.py): a disk's previous chunk ids read lazily,
one hash-list piece at a time, identical to the manifest's ids, and safe when the
previous backup is collected before the incremental reads it."""
from __future__ import annotations

import os

import pytest

from hypersdk.node.service.backup import backup
from hypersdk.node.service.vm_backup import PreviousIds
from hypersdk.node.store import catalog
from hypersdk.node.store.gc import gc
from hypersdk.protocol.chunks import ZERO_ID
from hypersdk.protocol.manifest import LIST_ENTRIES

CS = 64 << 10


def _sparse_disk(path, pieces: float, data_at) -> None:
    """A sparse file of `pieces` hash-list pieces of 64 KiB chunks with a distinct
    64 KiB of data at each chunk index in data_at (the rest holes)."""
    with open(path, "wb") as f:
        f.truncate(int(pieces * LIST_ENTRIES) * CS)
        for i in data_at:
            f.seek(i * CS)
            f.write(os.urandom(CS))


@pytest.mark.parametrize("keyed", [False, True])
def test_lazy_previous_ids_equal_the_manifests_and_hold_one_piece(tmp_path, keyed):
    from hypersdk.node.net import datakey
    from hypersdk.node.store.store import ChunkStore
    data = tmp_path / "data"
    if keyed:
        datakey.create(data)
    n = int(2.5 * LIST_ENTRIES)
    at = [0, 5, LIST_ENTRIES - 1, 2 * LIST_ENTRIES + 7, n - 1]      # piece 1: all zero
    _sparse_disk(tmp_path / "disk.img", 2.5, at)
    with ChunkStore(data) as store:
        mid = backup(store, str(tmp_path / "disk.img"), name="d", chunk_size=CS).manifest_id
        m = catalog.load_manifest(store, mid)
        assert m.lists[1] == ZERO_ID and m.lists[0] != ZERO_ID
        want = [cid for _, cid in catalog.iter_chunk_ids(store, m)]
        ids = PreviousIds(store, m)
        assert len(ids) == n
        got = []
        for i in range(n):
            got.append(ids[i])
            assert len(ids._ids) <= LIST_ENTRIES            # one piece in memory
        assert got == want and sum(c != ZERO_ID for c in got) == len(at)
        with pytest.raises(IndexError):
            ids[n]

        # the previous backup deleted and collected before the next one reads it:
        # its ids become UNREADABLE (held nowhere, so read whole from vSphere),
        # all-zero pieces stay zero
        catalog.delete_backup(store, catalog.resolve(store, "d@1"))
        gc(store)
        late = PreviousIds(store, m)
        assert {late[i] for i in range(LIST_ENTRIES)} == {PreviousIds.UNREADABLE}
        assert late[LIST_ENTRIES + 3] == ZERO_ID
        assert not store.has(PreviousIds.UNREADABLE)


def test_a_damaged_or_collected_previous_chunk_is_read_again_not_a_crash(tmp_path, store):
    """_local (the source's read_previous): a previous chunk that is corrupt or gone
    gives None, so the incremental downloads that whole chunk from vSphere (it used
    to raise ChunkCorrupt / ChunkMissing out of the backup)."""
    from test_verify_gc import _flip

    from hypersdk.node.service.vm_backup import _local
    _sparse_disk(tmp_path / "disk.img", 0.001, [0, 1])
    mid = backup(store, str(tmp_path / "disk.img"), name="d", chunk_size=CS).manifest_id
    a, b = [c for _, c in catalog.iter_chunk_ids(store, catalog.load_manifest(store, mid))
            if c != ZERO_ID]
    assert len(_local(store, a)) == CS
    _flip(store, a)
    assert _local(store, a) is None
    assert _local(store, PreviousIds.UNREADABLE) is None and len(_local(store, b)) == CS
