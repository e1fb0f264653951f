"""A holder lets go of a copy when its author deletes the backup, or is long gone.

A copy we hold for another member (a catalog row with stats.replica) is released,
like `delete` (the catalog row and our own signed `delete` entry in one
transaction: node/audit/intents.py), when

    deleted   its author's log, as gossip brought it here, holds a `delete` entry
              for the manifest (`hypersdk delete` or `forget` at the author). The
              author is the one member whose `backup` entry names the manifest (a
              manifest claimed by several authors is ambiguous: nothing is
              released), and, when the copy was placed by replication, the member
              that asked us to hold it: no other member's entry can make us drop it;
    orphaned  its author's log has had no entry for longer than ORPHAN_AFTER (a
              live node signs witness entries every hour), unless the node keeps
              orphans (`node run --keep-orphans`): a site that burned down is exactly
              when its copies matter, so keep them where nobody else holds the data.

    asked     its author asks for it back (release_asked: it has more copies than it
              wants, e.g. a holder it had given up for lost came back).

Released chunks are reclaimed by the gc that follows a release.
"""
from __future__ import annotations

from dataclasses import dataclass

ORPHAN_AFTER_S = 180 * 86400      # 180 days without a word from the author


@dataclass(frozen=True)
class Released:
    manifest: bytes
    ref: str
    reason: str


def releasable(store, log, asked_by: dict, *, now_ns: int, orphan_after_s: float,
               keep_orphans: bool) -> list[tuple]:
    """[(catalog Backup, reason)] of the copies to release (see the module doc).
    asked_by: manifest -> the member that placed the copy here (replicas.sqlite)."""
    from hypersdk.dht.keys import node_id
    from hypersdk.node.store import catalog
    out = []
    for b in catalog.list_backups(store):
        if not b.stats.get("replica"):
            continue
        author = log.sole_author(b.manifest_id)
        if author is None:
            continue                     # unknown here yet, or claimed by several
        placer = asked_by.get(b.manifest_id)
        if placer is not None and placer != node_id(author):
            continue                     # asked by one member, "authored" by another
        deleted = log.db.execute("SELECT seq FROM entries WHERE manifest=? AND kind='delete' "
                                 "AND author=? LIMIT 1", (b.manifest_id, author)).fetchone()
        if deleted is not None:
            out.append((b, f"its author deleted it (entry {deleted[0]})"))
            continue
        (last,) = log.db.execute("SELECT MAX(time) FROM entries WHERE author=?",
                                 (author,)).fetchone()
        if not keep_orphans and last is not None and now_ns - last > orphan_after_s * 1e9:
            days = (now_ns - last) / 86400e9
            out.append((b, f"orphaned: its author has been silent for {days:.0f} days"))
    return out


def release_asked(store, data_dir, mid: bytes, asker: bytes, asked_by: dict) -> str:
    """A member asks us to drop copy `mid` (its backup has more copies than it wants):
    released when `asker` is the member that placed it here or the one author of its
    backup entry; refused otherwise. Returns the state."""
    from hypersdk.dht.keys import node_id
    from hypersdk.node.audit.log import AuditLog
    from hypersdk.node.store import catalog
    rows = [b for b in catalog.list_backups(store)
            if b.manifest_id == mid and b.stats.get("replica")]
    if not rows:
        return "unknown"
    with AuditLog(data_dir) as log:
        key = log.sole_author(mid)
    author = node_id(key) if key is not None else None
    if asker not in (asked_by.get(mid), author) or asker is None:
        return "refused"
    _drop(store, [(b, "its author asked for it back") for b in rows])
    return "released"


def _drop(store, todo) -> list:
    from hypersdk.node.audit import intents as audit_intents
    from hypersdk.node.service.replication import announce_keys
    from hypersdk.node.store import catalog
    from hypersdk.node.store import intents as store_intents
    from hypersdk.node.store.gc import gc
    out, keys = [], set()
    with store.write_lock():
        for b, why in todo:
            try:
                keys.update(announce_keys(store, b.manifest_id))
            except Exception:            # an unreadable manifest: release it all the same
                pass
            catalog.delete_backup(store, b, extra=lambda db, b=b: store_intents.add(
                db, "delete", {"manifest": b.manifest_id, "name": b.name,
                               "version": b.version}))
            out.append(Released(b.manifest_id, b.ref, why))
    audit_intents.flush(store)
    gc(store)
    gone = [k for k in keys if not store.has(k) and
            store.db.execute("SELECT 1 FROM manifests WHERE id=?", (k,)).fetchone() is None]
    return out, gone


def release(store, data_dir, asked_by: dict, *, now_ns: int, orphan_after_s: float,
            keep_orphans: bool) -> tuple[list[Released], list[bytes]]:
    """Release what `releasable` names (one transaction and one delete entry each),
    then collect the freed chunks. Returns what was released and the keys no longer
    held (to stop announcing). Runs in a worker thread."""
    from hypersdk.node.audit.log import AuditLog
    with AuditLog(data_dir) as log:
        todo = releasable(store, log, asked_by, now_ns=now_ns, orphan_after_s=orphan_after_s,
                          keep_orphans=keep_orphans)
    if not todo:
        return [], []
    return _drop(store, todo)
