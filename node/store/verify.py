"""Re-reading and re-hashing stored chunks, and naming what damage affects.

`verify_store` checks every chunk in the index (in pack order, so reads are
sequential) and then walks every manifest to find missing chunks and the
backups that damaged chunks belong to. `verify_backup` checks the chunks of
one backup in image order.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from hypersdk.node.errors import UserError
from hypersdk.node.store import catalog, packfile
from hypersdk.node.store.chunker import default_workers
from hypersdk.node.store.sealed import DataKeyNotHeld
from hypersdk.protocol.chunks import ZERO_ID
from hypersdk.protocol.errors import IntegrityError, ProtocolError


@dataclass
class Damage:
    cid: bytes
    reason: str

    def to_json(self):
        return {"chunk": self.cid.hex(), "reason": self.reason}


@dataclass
class VerifyReport:
    chunks_checked: int = 0
    bytes_checked: int = 0
    damaged: dict = field(default_factory=dict)         # cid -> Damage
    affected: dict = field(default_factory=dict)        # backup seq -> (Backup, {cid})
    backups_checked: int = 0

    def hit(self, backup, cid: bytes):
        self.affected.setdefault(backup.seq, (backup, set()))[1].add(cid)

    @property
    def ok(self) -> bool:
        return not self.damaged and not self.affected

    def to_json(self) -> dict:
        return {"ok": self.ok, "chunks_checked": self.chunks_checked,
                "bytes_checked": self.bytes_checked,
                "backups_checked": self.backups_checked,
                "damaged": [d.to_json() for d in self.damaged.values()],
                "affected_backups": [
                    {**b.to_json(), "bad_chunks": sorted(c.hex() for c in cids)}
                    for b, cids in self.affected.values()]}


def _check(store, cid, loc=None):
    """(bytes checked, Damage or None); DataKeyNotHeld (not damage) is raised.
    Another tenant's sealed record (a storage-only holder's replica) is checked as
    far as a node without its key can: read back whole, header against the index
    (ChunkStore.check_opaque); its owner proves the rest by possession challenges."""
    try:
        loc = loc or store.location(cid)
        if loc is not None and packfile.is_opaque(loc[4]):
            return store.check_opaque(cid, loc), None
        return len(store.read(cid, loc)), None
    except (IntegrityError, ProtocolError) as exc:
        return 0, Damage(cid, str(exc))
    except OSError as exc:
        return 0, Damage(cid, f"read error: {exc.strerror or exc}")


def _parallel(store, items, report: VerifyReport, progress, workers):
    """Check (cid, loc) items with a bounded thread pool; yields (cid, Damage|None)."""
    inflight: deque = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="verify") as pool:
        def pop():
            cid, fut = inflight.popleft()
            n, dmg = fut.result()
            report.chunks_checked += 1
            report.bytes_checked += n
            if progress:
                progress(1)
            return cid, dmg
        for cid, loc in items:
            inflight.append((cid, pool.submit(_check, store, cid, loc)))
            if len(inflight) >= workers * 4:
                yield pop()
        while inflight:
            yield pop()


def _backup_chunks(store, b, report):
    """Yield the chunk ids of backup b (hash-list pieces first); damage to the
    manifest or a hash list is recorded in report and ends the walk."""
    try:
        m = catalog.load_manifest(store, b.manifest_id, opaque_ok=True)
    except DataKeyNotHeld:
        raise                                   # not damage: the key is elsewhere
    except (ProtocolError, IntegrityError, UserError) as exc:   # an undecodable manifest
        # (or a sealed one that does not open) is damage too
        report.hit(b, b.manifest_id)
        report.damaged[b.manifest_id] = Damage(b.manifest_id, f"manifest unreadable: {exc}")
        return
    for lid in m.lists:
        if lid != ZERO_ID:
            yield lid
    try:
        for _, cid in catalog.iter_chunk_ids(store, m):
            if cid != ZERO_ID:
                yield cid
    except (IntegrityError, ProtocolError) as exc:
        bad = getattr(exc, "cid", b.manifest_id)
        report.damaged.setdefault(bad, Damage(bad, f"hash list unreadable: {exc}"))
        report.hit(b, bad)


def verify_backup(store, ref: str, *, progress=None, workers=None) -> VerifyReport:
    report = VerifyReport(backups_checked=1)
    with store.read_lock():
        b = catalog.resolve(store, ref)
        items = ((cid, None) for cid in _backup_chunks(store, b, report))
        for cid, dmg in _parallel(store, items, report, progress, workers or default_workers()):
            if dmg:
                report.damaged.setdefault(cid, dmg)
                report.hit(b, cid)
    return report


def verify_store(store, *, progress=None, workers=None) -> VerifyReport:
    report = VerifyReport()
    with store.read_lock():
        for (fp,) in store.db.execute(
                f"SELECT DISTINCT {store.manifest_key_sql} FROM manifests").fetchall():
            store.key_for(fp)     # backups sealed with a key not held here: one clear line
        rows = store.db.execute(
            "SELECT id, pack, offset, stored_len, raw_len, codec FROM chunks "
            "ORDER BY pack, offset").fetchall()
        items = ((bytes(r[0]), tuple(r[1:])) for r in rows)
        for cid, dmg in _parallel(store, items, report, progress, workers or default_workers()):
            if dmg:
                report.damaged[cid] = dmg
        # every chunk a backup references must be present and undamaged
        for b in catalog.list_backups(store):
            report.backups_checked += 1
            for cid in _backup_chunks(store, b, report):
                if cid in report.damaged:
                    report.hit(b, cid)
                elif not store.has(cid):
                    report.damaged[cid] = Damage(cid, "missing from the store")
                    report.hit(b, cid)
    return report
