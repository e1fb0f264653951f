"""node/service/restore_staged.py StagedImage: a network restore writes OUT's temporary file while
chunks arrive, and restore() completes it (only the positions not written yet),
keeps OUT untouched until the rename, and never leaves a temporary file behind."""
from __future__ import annotations

import os

import pytest
from conftest import mixed_image, same_bytes

from hypersdk.node.errors import UserError
from hypersdk.node.service.backup import backup
from hypersdk.node.service.restore import restore
from hypersdk.node.service.restore_staged import _STAGED, discard_staged, stage
from hypersdk.node.store import catalog

CS = 64 << 10


def _leftovers(d):
    return [p for p in os.listdir(d) if "hypersdk-partial" in p]


def _setup(store, tmp_path):
    img = mixed_image(tmp_path / "img", 40 * CS + 123, seed=4, chunk=CS)
    r = backup(store, str(img), chunk_size=CS)
    m = catalog.load_manifest(store, r.manifest_id)
    ids = [cid for _, cid in catalog.iter_chunk_ids(store, m)]
    return img, m, ids


def test_staged_chunks_plus_store_make_the_image(store, tmp_path):
    img, m, ids = _setup(store, tmp_path)
    out = tmp_path / "out.img"
    st = stage(str(out), m.id)
    st.begin(m, ids)
    data = img.read_bytes()
    # half the chunks "arrive" (a repeated chunk is written at every position)
    items = [(cid, data[i * CS:(i + 1) * CS]) for i, cid in enumerate(ids) if i % 2]
    st.write_many(items)
    assert st.written and not out.exists()
    written = set(st.written)
    r = restore(store, m.id.hex(), str(out))
    assert same_bytes(img, out) and r.chunks == len(ids)
    assert written and not _leftovers(tmp_path) and not _STAGED


def test_a_stage_for_another_manifest_is_discarded(store, tmp_path):
    img, m, ids = _setup(store, tmp_path)
    out = tmp_path / "out.img"
    st = stage(str(out), b"\x01" * 32)
    st.begin(m, ids)
    st.write_many([(ids[1], b"\xff" * CS)])           # garbage for a different manifest
    restore(store, m.id.hex(), str(out))
    assert same_bytes(img, out) and not _leftovers(tmp_path) and not _STAGED


def test_refused_restore_leaves_out_untouched_and_no_stage(store, tmp_path):
    img, m, ids = _setup(store, tmp_path)
    out = tmp_path / "out.img"
    out.write_bytes(b"keep me")
    stage(str(out), m.id)
    with pytest.raises(UserError, match="exists"):
        restore(store, m.id.hex(), str(out))
    assert out.read_bytes() == b"keep me" and not _leftovers(tmp_path) and not _STAGED
    stage(str(out), m.id)
    discard_staged(str(out))
    assert not _leftovers(tmp_path) and not _STAGED


def test_pool_buffers_go_through_the_writer_thread(store, tmp_path):
    """The fetch's path: decode into a pool buffer, submit it; the writer thread
    writes it (buffers are reused: more chunks than the pool holds); restore()
    waits for the queued writes before it takes the file."""
    img, m, ids = _setup(store, tmp_path)
    out = tmp_path / "out.img"
    st = stage(str(out), m.id)
    st.begin(m, ids)
    data = img.read_bytes()
    st.POOL_BYTES = 4 * CS                        # 4 buffers for ~40 chunks: reuse
    sent = set()
    for i, cid in enumerate(ids):
        if cid in sent or not any(data[i * CS:(i + 1) * CS]):
            continue
        plain = data[i * CS:(i + 1) * CS]
        buf = st.buffer(len(plain))
        if i % 7 == 3:                            # e.g. a copy that failed its check
            st.release(buf)
            continue
        if i % 2:
            st.fill(buf, plain)                   # the raw-chunk path (GIL released)
        else:
            buf[:len(plain)] = plain
        st.submit(cid, buf, len(plain))
        sent.add(cid)
    r = restore(store, m.id.hex(), str(out))
    assert same_bytes(img, out) and r.chunks == len(ids)
    assert st.written and not _leftovers(tmp_path) and not _STAGED
    with pytest.raises(RuntimeError, match="closed"):
        st.buffer(CS)                             # finished: no buffer, no hang


def test_a_write_error_of_the_writer_thread_fails_the_restore(store, tmp_path):
    img, m, ids = _setup(store, tmp_path)
    out = tmp_path / "out.img"
    st = stage(str(out), m.id)
    st.begin(m, ids)
    os.close(st.fd)
    st.fd = os.open(st.tmp, os.O_RDONLY)          # every write fails (EBADF)
    data = img.read_bytes()
    buf = st.buffer(CS)
    buf[:CS] = data[CS:2 * CS]
    st.submit(ids[1], buf, CS)
    with pytest.raises(UserError, match="cannot write"):
        restore(store, m.id.hex(), str(out))
    assert not out.exists() and not _leftovers(tmp_path) and not _STAGED


def test_every_writer_thread_drains_and_stops(store, tmp_path):
    """Several writes in flight (StagedImage.WRITERS threads): finish() returns only
    when every queued write is in the file and every writer thread has ended."""
    import threading
    img, m, ids = _setup(store, tmp_path)
    out = tmp_path / "out.img"
    st = stage(str(out), m.id)
    st.WRITERS = 4
    st.POOL_BYTES = 6 * CS
    st.begin(m, ids)
    data = img.read_bytes()
    sent = set()
    for i, cid in enumerate(ids):
        plain = data[i * CS:(i + 1) * CS]
        if cid in sent or not any(plain):
            continue
        buf = st.buffer(len(plain))
        buf[:len(plain)] = plain
        st.submit(cid, buf, len(plain))
        sent.add(cid)
    names = {t.name for t in threading.enumerate() if t.name.startswith("stage-writer")}
    assert len(names) == 4
    st.finish()
    assert not [t for t in threading.enumerate() if t.name.startswith("stage-writer")]
    want = {i for i, cid in enumerate(ids) if cid in sent}
    assert st.written == want
    restore(store, m.id.hex(), str(out))
    assert same_bytes(img, out) and not _leftovers(tmp_path) and not _STAGED
