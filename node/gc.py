"""Garbage collection: mark every chunk a manifest references, sweep the rest,
then compact packs that are mostly dead.

Mark-and-sweep rather than refcounts: the live set is recomputed from the
manifests each time, so no crash or bug can leave a count that frees a
chunk still in use. If any hash list cannot be read, gc stops before
deleting anything (it cannot know what that list references).

Compaction copies the live records of a pack that is more than
`threshold` dead into a fresh pack, commits the new locations, and only then
unlinks the old file. A crash in between leaves an unreferenced old pack,
which the next gc deletes.
"""
from __future__ import annotations

import os

from protocol.chunks import ZERO_ID
from protocol.errors import IntegrityError, ProtocolError
from protocol.manifest import decode_manifest, split_list

from . import packfile
from .errors import UserError


def _mark(store) -> None:
    db = store.db
    db.execute("DROP TABLE IF EXISTS temp.live")
    db.execute("CREATE TEMP TABLE live(id BLOB PRIMARY KEY) WITHOUT ROWID")
    for mid, body in db.execute("SELECT id, body FROM manifests").fetchall():
        try:
            m = decode_manifest(bytes(body))
            for li, lid in enumerate(m.lists):
                if lid == ZERO_ID:
                    continue
                ids = split_list(store.read(lid), m.list_len(li))
                db.executemany("INSERT OR IGNORE INTO temp.live VALUES (?)",
                               ((c,) for c in ids + [lid] if c != ZERO_ID))
        except (IntegrityError, ProtocolError) as exc:
            raise UserError(f"gc stopped, nothing deleted: manifest {bytes(mid).hex()[:16]} "
                            f"cannot be read ({exc}); run `hypersdk verify`") from None


def gc(store, *, threshold: float = 0.2, on_wait=None) -> dict:
    with store.write_lock(on_wait), store.compact_lock(on_wait):
        db = store.db
        _mark(store)
        with db:
            dead_n, dead_bytes = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(stored_len + ?), 0) FROM chunks "
                "WHERE id NOT IN (SELECT id FROM temp.live)", (packfile.HDR_LEN,)).fetchone()
            db.execute("DELETE FROM chunks WHERE id NOT IN (SELECT id FROM temp.live)")
        db.execute("DROP TABLE temp.live")
        before = _disk_bytes(store)
        rewritten, removed = _compact(store, threshold)
        after = _disk_bytes(store)
    return {"chunks_deleted": dead_n, "bytes_released": dead_bytes,
            "packs_rewritten": rewritten, "packs_removed": removed,
            "disk_bytes_before": before, "disk_bytes_after": after,
            "disk_bytes_reclaimed": before - after}


def _disk_bytes(store) -> int:
    return sum(p.stat().st_size for p in store.packs_dir.glob("pack-*.dat"))


def _compact(store, threshold: float):
    db = store.db
    live = dict(db.execute(
        "SELECT pack, SUM(stored_len + ?) FROM chunks GROUP BY pack", (packfile.HDR_LEN,)))
    packs = dict(db.execute("SELECT id, end FROM packs"))
    removed = rewritten = 0
    # files no committed row knows of: torn new packs of killed writers
    for p in store.packs_dir.iterdir():
        pid = packfile.parse_pack_name(p.name)
        if pid is not None and pid not in packs:
            p.unlink()
            removed += 1
    victims = []
    for pid, end in sorted(packs.items()):
        lb = live.get(pid, 0)
        if lb == 0:
            with db:
                db.execute("DELETE FROM packs WHERE id=?", (pid,))
            store.forget_pack(pid)
            _unlink(store.pack_path(pid))
            removed += 1
        elif end - lb > threshold * end:
            victims.append(pid)
        elif os.path.getsize(store.pack_path(pid)) > end:
            os.truncate(store.pack_path(pid), end)      # torn tail
    if victims:
        with store.writer(fresh_pack=True) as w:
            for pid in victims:
                rows = db.execute(
                    "SELECT id, pack, offset, stored_len, raw_len, codec FROM chunks "
                    "WHERE pack=? ORDER BY offset", (pid,)).fetchall()
                try:
                    for r in rows:
                        cid = bytes(r[0])
                        codec, raw_len, stored = store.read_stored(cid, tuple(r[1:]))
                        w.put(cid, raw_len, codec, stored, move=True)
                except IntegrityError:
                    w.abort()           # keep this pack (and its evidence) as it is
                    continue
                w.commit(lambda conn, pid=pid: conn.execute(
                    "DELETE FROM packs WHERE id=?", (pid,)), replace=True)
                store.forget_pack(pid)
                _unlink(store.pack_path(pid))
                rewritten += 1
    return rewritten, removed


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
