"""VM backup sets: one backup of a whole VM (every disk plus its configuration).

A set NAME@N records, in the store's index database, the VM's configuration and
for each disk the disk's own backup (an ordinary backup named NAME/LABEL, so
restore, verify, replication, certificates and gc treat it as any image backup),
the CBT changeId of the snapshot it was read from and how it was read. The set
row and its disks' backup rows are written in one transaction: a VM backup is
recorded whole or not at all.

Set names share the backup namespace: a name is either a VM's or an image's.
A set is deleted whole (delete_set: its row and its disks' backups in one
transaction); while a set holds a disk backup, that backup alone is not deleted
(node/service/ops.py says so to the user): the set would no longer restore.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from hypersdk.node.errors import UsageError, UserError

TABLE = """
CREATE TABLE IF NOT EXISTS vm_sets(
    name TEXT NOT NULL, version INTEGER NOT NULL, created INTEGER NOT NULL,
    doc TEXT NOT NULL, PRIMARY KEY(name, version));
"""


@dataclass(frozen=True)
class VmSet:
    name: str
    version: int
    created: int
    doc: dict                   # {"vm": config, "source": url, "disks": [...]}

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def disk(self, key: int) -> dict | None:
        return next((d for d in self.doc["disks"] if d["key"] == key), None)

    def to_json(self) -> dict:
        return {"name": self.name, "version": self.version, "ref": self.ref, "kind": "vm",
                "created_ns": self.created, "vm": self.doc["vm"]["name"],
                "source": self.doc["source"],
                "size": sum(d["capacity"] for d in self.doc["disks"]),
                "disks": [{k: d[k] for k in ("label", "ref", "capacity", "change_id", "mode",
                                             "manifest")} for d in self.doc["disks"]]}


def _row(r) -> VmSet:
    return VmSet(r[0], r[1], r[2], json.loads(r[3]))


def ensure(db) -> None:
    db.executescript(TABLE)


def next_version(db, name: str) -> int:
    (last,) = db.execute("SELECT COALESCE(MAX(version), 0) FROM vm_sets WHERE name=?",
                         (name,)).fetchone()
    return last + 1


def add(db, name: str, version: int, created: int, doc: dict) -> None:
    db.execute("INSERT INTO vm_sets(name, version, created, doc) VALUES (?,?,?,?)",
               (name, version, created, json.dumps(doc, sort_keys=True)))


def latest(db, name: str) -> VmSet | None:
    r = db.execute("SELECT name, version, created, doc FROM vm_sets WHERE name=? ORDER BY "
                   "version DESC LIMIT 1", (name,)).fetchone()
    return _row(r) if r else None


def list_sets(db) -> list[VmSet]:
    return [_row(r) for r in db.execute(
        "SELECT name, version, created, doc FROM vm_sets ORDER BY name, version")]


def is_image_name(db, name: str) -> bool:
    return db.execute("SELECT 1 FROM backups WHERE name=? LIMIT 1", (name,)).fetchone() \
        is not None


def resolve(db, ref: str) -> VmSet | None:
    """The set REF (NAME or NAME@N) names, None when NAME is no VM's; UserError for
    a version that does not exist."""
    name, _, ver = ref.rpartition("@") if "@" in ref else (ref, "", "")
    if not db.execute("SELECT 1 FROM vm_sets WHERE name=? LIMIT 1", (name,)).fetchone():
        return None
    if not ver:
        return latest(db, name)
    if not ver.isdigit() or int(ver) < 1:
        raise UsageError(f"bad REF {ref!r}: the version after @ must be a number >= 1")
    r = db.execute("SELECT name, version, created, doc FROM vm_sets WHERE name=? AND "
                   "version=?", (name, int(ver))).fetchone()
    if r is None:
        have = [v for (v,) in db.execute("SELECT version FROM vm_sets WHERE name=? ORDER BY "
                                         "version", (name,))]
        raise UserError(f"no VM backup {ref!r} (versions: {', '.join(map(str, have))})")
    return _row(r)


def versions(db, name: str) -> list[VmSet]:
    """Every version of the VM backup NAME, oldest first ([] if NAME is no VM's)."""
    return [_row(r) for r in db.execute(
        "SELECT name, version, created, doc FROM vm_sets WHERE name=? ORDER BY version", (name,))]


def _disk_key(d: dict) -> tuple[str, int, bytes]:
    name, _, ver = d["ref"].rpartition("@")
    return name, int(ver), bytes.fromhex(d["manifest"])


def owners(db) -> dict[tuple[str, int, bytes], str]:
    """(name, version, manifest id) of every disk backup a set holds -> the set's REF.
    The manifest is part of the key: a deleted latest version's number is reused."""
    return {_disk_key(d): s.ref for s in list_sets(db) for d in s.doc["disks"]}


def owner(db, name: str, version: int, manifest: bytes) -> VmSet | None:
    """The set that holds backup NAME@VERSION (of that manifest) as a disk, or None.
    A disk backup is named SET/LABEL, so only names before a '/' can hold it."""
    for i in (i for i, c in enumerate(name) if c == "/"):
        for s in versions(db, name[:i]):
            if any(_disk_key(d) == (name, version, manifest) for d in s.doc["disks"]):
                return s
    return None


def delete_set(db, vmset: VmSet, extra=None) -> list[tuple[str, int, bytes]]:
    """Remove set NAME@N and every disk backup it holds (each backup row, and its
    manifest once no other row uses it), all in one transaction; extra(conn, name,
    version, manifest) runs in it for each disk backup removed (its audit intent).
    Returns the (name, version, manifest) removed; a disk backup already gone is
    skipped. The rows are catalog.delete_backup's, in the set's transaction.
    Chunks stay until `gc`."""
    gone = []
    with db:
        db.execute("DELETE FROM vm_sets WHERE name=? AND version=?", (vmset.name, vmset.version))
        for d in vmset.doc["disks"]:
            name, version, mid = _disk_key(d)
            cur = db.execute("DELETE FROM backups WHERE name=? AND version=? AND manifest=?",
                             (name, version, mid))
            if cur.rowcount == 0:
                continue
            db.execute("DELETE FROM manifests WHERE id=? AND NOT EXISTS "
                       "(SELECT 1 FROM backups WHERE manifest=?)", (mid, mid))
            if extra is not None:
                extra(db, name, version, mid)
            gone.append((name, version, mid))
    return gone
