"""Garbage collection: mark every chunk a manifest references, sweep the rest,
then compact packs that are mostly dead.

Mark-and-sweep rather than refcounts: the live set is recomputed from the
manifests (plus the bases of live delta chunks) each time, so no crash or bug can leave a count that frees a
chunk still in use. If any hash list cannot be read, gc stops before
deleting anything (it cannot know what that list references).

Space comes back in three ways. A pack with no live record is unlinked.
Otherwise every gap between live records is freed in place with
fallocate(PUNCH_HOLE): no copying, and stateless -- gc punches all gaps each
time, so a crash after the sweep leaks nothing the next gc won't free.
Where the filesystem cannot punch holes, a pack more than `threshold` dead is
compacted instead: its live records are copied to a fresh pack, the new
locations commit, and only then is the old file unlinked (a crash in between
leaves an unreferenced old pack, which the next gc deletes).

(The `gc` operation also removes the partial image files of killed restores:
node/service/ops.py, with node/service/restore_partials.py.)
"""
from __future__ import annotations

import os

from hypersdk.node.config import commit_bytes
from hypersdk.node.errors import UserError
from hypersdk.node.store import catalog, packfile
from hypersdk.node.store.sealed import DataKeyNotHeld
from hypersdk.protocol.chunks import ZERO_ID
from hypersdk.protocol.errors import IntegrityError, ProtocolError
from hypersdk.protocol.manifest import split_list


def _mark(store) -> None:
    db = store.db
    db.execute("DROP TABLE IF EXISTS temp.live")
    db.execute("CREATE TEMP TABLE live(id BLOB PRIMARY KEY) WITHOUT ROWID")
    for (mid,) in db.execute("SELECT id FROM manifests").fetchall():
        try:
            m = catalog.load_manifest(store, bytes(mid), opaque_ok=True)
            for li, lid in enumerate(m.lists):
                if lid == ZERO_ID:
                    continue
                ids = split_list(store.read(lid), m.list_len(li))
                db.executemany("INSERT OR IGNORE INTO temp.live VALUES (?)",
                               ((c,) for c in ids + [lid] if c != ZERO_ID))
        except (IntegrityError, ProtocolError, DataKeyNotHeld) as exc:
            refs = [f"{n}@{v}" for n, v in db.execute(
                "SELECT name, version FROM backups WHERE manifest=? ORDER BY name, version",
                (bytes(mid),))]
            which = (f"backup {', '.join(refs)} (manifest {bytes(mid).hex()[:16]})" if refs
                     else f"manifest {bytes(mid).hex()[:16]}")
            fix = (f"remove it with `hypersdk delete {refs[0]}`" if len(refs) == 1 else
                   f"remove them with `hypersdk delete` ({', '.join(refs)})" if refs else
                   "run `hypersdk verify`")
            raise UserError(f"gc stopped, nothing deleted: {which} cannot be read ({exc}); "
                            f"gc cannot know which chunks it uses: {fix}, or restore its "
                            "data from a replica first") from None
    # the bases of live delta chunks are live (bases are never deltas: one pass)
    db.execute("INSERT OR IGNORE INTO temp.live SELECT c.base FROM chunks c "
               "JOIN temp.live l ON c.id = l.id WHERE c.base IS NOT NULL")


def gc(store, *, threshold: float = 0.2, punch: bool = True, on_wait=None) -> dict:
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
        removed = _remove_dead_packs(store)
        punched = _punch_gaps(store) if punch else None
        rewritten = _compact(store, threshold) if punched is None else 0
        after = _disk_bytes(store)
    return {"chunks_deleted": dead_n, "bytes_released": dead_bytes,
            "packs_rewritten": rewritten, "packs_removed": removed,
            "dead_gap_bytes": punched or 0,
            "disk_bytes_before": before, "disk_bytes_after": after,
            "disk_bytes_reclaimed": before - after}


def _disk_bytes(store) -> int:
    return sum(packfile.allocated_bytes(p) for p in store.packs_dir.glob("pack-*.dat"))


def _remove_dead_packs(store) -> int:
    """Unlink packs with no live record, and pack files no committed row knows
    of (torn new packs of killed writers); cut torn tails. Returns files removed."""
    db = store.db
    live = {pid for (pid,) in db.execute("SELECT DISTINCT pack FROM chunks")}
    packs = dict(db.execute("SELECT id, end FROM packs"))
    removed = 0
    for p in store.packs_dir.iterdir():
        pid = packfile.parse_pack_name(p.name)
        if pid is None:
            continue
        if pid not in packs or pid not in live:
            if pid in packs:
                with db:
                    db.execute("DELETE FROM packs WHERE id=?", (pid,))
            store.forget_pack(pid)
            p.unlink()
            removed += 1
        elif p.stat().st_size > packs[pid]:
            os.truncate(p, packs[pid])                  # torn tail
    return removed


def _punch_gaps(store) -> int | None:
    """Punch out every byte range of every pack that no live record covers.
    Returns the bytes punched, or None if the filesystem cannot punch holes."""
    db = store.db
    total = 0
    for pid, end in db.execute("SELECT id, end FROM packs ORDER BY id").fetchall():
        fd = os.open(store.pack_path(pid), os.O_WRONLY)
        try:
            pos = 0
            rows = db.execute("SELECT offset, stored_len FROM chunks WHERE pack=? "
                              "ORDER BY offset", (pid,))
            for off, slen in [*rows, (end, 0)]:
                if off > pos:
                    if not packfile.punch_hole(fd, pos, off - pos):
                        return None
                    total += off - pos
                pos = max(pos, off + packfile.HDR_LEN + slen)
        finally:
            os.close(fd)
    return total


def _compact(store, threshold: float) -> int:
    db = store.db
    live = dict(db.execute(
        "SELECT pack, SUM(stored_len + ?) FROM chunks GROUP BY pack", (packfile.HDR_LEN,)))
    packs = dict(db.execute("SELECT id, end FROM packs"))
    rewritten = 0
    victims = [pid for pid, end in sorted(packs.items())
               if end - live.get(pid, 0) > threshold * end]
    if victims:
        with store.writer(fresh_pack=True, relocate=True, batch_bytes=commit_bytes()) as w:
            for pid in victims:
                rows = db.execute(
                    "SELECT id, pack, offset, stored_len, raw_len, codec, base FROM chunks "
                    "WHERE pack=? ORDER BY offset", (pid,)).fetchall()
                try:
                    for r in rows:
                        cid = bytes(r[0])
                        codec, raw_len, stored = store.read_stored(cid, tuple(r[1:6]))
                        w.put(cid, raw_len, codec, stored,     # sealed records move as they are
                              base=bytes(r[6]) if r[6] is not None else None)
                except IntegrityError:
                    w.abort()           # keep this pack (and its evidence) as it is
                    continue
                w.commit(lambda conn, pid=pid: conn.execute(
                    "DELETE FROM packs WHERE id=?", (pid,)))
                store.forget_pack(pid)
                _unlink(store.pack_path(pid))
                rewritten += 1
    return rewritten


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
